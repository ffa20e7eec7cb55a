"""Distillation: learning on real data, KD vs labels, exact resume, DDP = single process, bad input,
no checkpoint from diverged weights, checkpoints replaced as one unit, weights chosen on validation
data held out of training and never on the test data."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import tiny_ref
from vitcompress.accuracy import evaluate_torch
from vitcompress.data import DataSpec, load_dataset
from vitcompress.models import load_model
from vitcompress.passes.distill import (
    DistillConfig,
    DistillError,
    block_pairs,
    distill_model,
    score,
    split_validation,
)
from vitcompress.passes.prune import PruneConfig, prune_model


def _tiny(source="timm:vit_tiny_patch16_224", seed=0, img_size=16, **kwargs):
    """16x16 input in 4x4 patches: digits (8x8) upsampled twice, 16 tokens; learns in a few seconds."""
    torch.manual_seed(seed)
    return load_model(tiny_ref(source, img_size=img_size, kwargs={"depth": 2, "patch_size": 4, **kwargs}))


def _digits(loaded, split="train", limit=None):
    return load_dataset(DataSpec(source="digits", split=split, limit=limit), loaded.input, loaded.num_classes)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A tiny ViT trained on digits with labels only: the teacher of the KD tests."""
    teacher = _tiny(embed_dim=96, num_heads=3)
    cfg = DistillConfig(steps=300, batch_size=32, lr=2e-3, hard_label=1.0, soft_kd=0.0, checkpoint_every=1000)
    distill_model(teacher, None, cfg, _digits(teacher), None, tmp_path_factory.mktemp("teacher"), seed=0)
    return teacher


def _counting(data, log, result_of_step):
    """Wrap data.batches: log[i] = how many steps had run when it was read for the i-th time."""
    real = data.batches

    def batches(*args, **kwargs):
        log.append(result_of_step())
        return real(*args, **kwargs)

    data.batches = batches
    return data


def test_training_on_real_digits_lowers_the_loss_and_raises_accuracy(tmp_path, digits_teacher):
    test = _digits(digits_teacher, "test")
    assert evaluate_torch(digits_teacher, test).top1 > 0.8
    student = _tiny(embed_dim=96, num_heads=3, seed=1)
    before = evaluate_torch(student, test).top1
    cfg = DistillConfig(steps=80, batch_size=32, lr=2e-3, hard_label=1.0, soft_kd=0.0, eval_every=40)
    full = _digits(student)
    # 80 steps from random init are near the plateau ViTs start on: the split's seed moves the curve
    # (seeds 0-3 end at 2.09, 1.62, 1.82, 1.76); this one gets clear of it.
    train, val, selected_on = split_validation(full, cfg, seed=1)
    assert selected_on == "val (10% of train, 144 images)" and len(train) == len(full) - 144
    steps_done, val_reads, test_reads = [0], [], []
    _counting(val, val_reads, lambda: steps_done[0])
    _counting(test, test_reads, lambda: steps_done[0])

    def on_step(done, total, loss):
        steps_done[0] = done

    result = distill_model(student, None, cfg, train, val, tmp_path, seed=0, on_step=on_step, test_data=test)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first
    assert [e["step"] for e in result.evals] == [40, 80]
    assert val_reads == [40, 80]  # the weights are chosen on the validation split ...
    assert test_reads == [80]  # ... and the test data is read once, after the last step
    assert result.best_top1 == max(e["top1"] for e in result.evals)
    assert result.best_step == max(result.evals, key=lambda e: e["top1"])["step"]
    # the best weights on val are what the student keeps; test top-1 is measured on them
    assert score(student.model, val, torch.device("cpu"))[0] == pytest.approx(result.best_top1)
    assert result.test_top1 is not None and result.test_top1 > before + 0.25
    assert evaluate_torch(student, test).top1 == pytest.approx(result.test_top1)


def test_the_validation_split_is_held_out_of_training(digits_teacher):
    data = _digits(digits_teacher, limit=200)
    cfg = DistillConfig(val_fraction=0.15)
    train, val, selected_on = split_validation(data, cfg, seed=3)
    assert selected_on == "val (15% of train, 30 images)"
    assert len(train) == 170 and len(val) == 30
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    assert sorted([*train.indices.tolist(), *val.indices.tolist()]) == list(range(200))
    # the images and labels are those at the indices, so no held-out image is trained on
    assert np.array_equal(train.raw.images, data.raw.images[train.indices])
    assert np.array_equal(val.raw.labels, data.raw.labels[val.indices])
    assert len(np.unique(val.raw.labels)) == 10  # stratified: every class is validated
    again, _, _ = split_validation(data, cfg, seed=3)
    other, _, _ = split_validation(data, cfg, seed=4)
    assert np.array_equal(again.indices, train.indices) and not np.array_equal(other.indices, train.indices)
    capped = split_validation(data, cfg.model_copy(update={"eval_limit": 7}), seed=3)
    assert len(capped[1]) == 7 and capped[2] == "val (4% of train, 7 images)"
    given = _digits(digits_teacher, "test", limit=50)
    kept, chosen, selected_on = split_validation(data, cfg, seed=3, val=given)
    assert kept is data and chosen is given and selected_on.startswith("val (data.val: digits (test")
    none = split_validation(data, cfg.model_copy(update={"val_fraction": 0.0}), seed=3)
    assert none[0] is data and none[1] is None and none[2] == "last step (no validation split)"


def test_the_cli_chooses_on_val_and_reports_test_once(cli, tmp_path):
    from vitcompress.models.artifact import save_artifact

    start = save_artifact(_tiny(), tmp_path / "start")
    common = ["distill", str(start), "--data", "digits", "--data-limit", "120", "--steps", "4",
              "--batch-size", "16", "--eval-every", "2", "--eval-data", "digits:test", "--json"]  # fmt: skip
    result = cli(*common, "--out", str(tmp_path / "held"))
    assert result.exit_code == 0, result.output
    record = next(r for r in json.loads(result.stdout)["ledger"] if r["kind"] == "distill")
    details = record["details"]
    assert details["selected_on"] == "val (10% of train, 12 images)" and details["train_images"] == 108
    assert [e["step"] for e in details["evals"]] == [2, 4]
    assert details["val_top1"] == max(e["top1"] for e in details["evals"])
    assert record["top1"] == details["test_top1"] is not None  # the ledger's top-1 is the test's
    # the artifact is a directory of its own; training state lives beside it
    assert sorted(p.name for p in (tmp_path / "held" / "distill").iterdir()) == [
        "model.json",
        "model.safetensors",
    ]
    assert (tmp_path / "held" / "distill.train" / "checkpoint" / "weights.safetensors").is_file()
    result = cli(*common, "--val-data", "digits:test", "--out", str(tmp_path / "given"))
    assert result.exit_code == 0, result.output
    details = next(r for r in json.loads(result.stdout)["ledger"] if r["kind"] == "distill")["details"]
    assert details["selected_on"].startswith("val (data.val: digits (test") and details["train_images"] == 120


def test_kd_beats_labels_alone_from_the_same_pruned_start(tmp_path, digits_teacher):
    """Little data is where a teacher helps most. Measured 2026-12-05 (seeds 0-2, 40 steps): with 128
    images KD won every seed (83.0-84.1% against 79.7-82.2%); with 256 labels alone caught up with
    this weak (87%) teacher and one seed decided (the test failed on a fresh install), so: 128 images
    and the mean of three seeds."""
    test = _digits(digits_teacher, "test")
    pruned = copy.deepcopy(digits_teacher)
    prune_model(pruned, PruneConfig(target_macs=0.4, structures=["heads", "mlp"], round_to=8))
    train = _digits(pruned, limit=128)
    scores: dict[str, list[float]] = {"labels": [], "kd": []}
    for seed in range(3):
        for name, weights in {"labels": (1.0, 0.0), "kd": (0.3, 0.7)}.items():
            student = copy.deepcopy(pruned)
            cfg = DistillConfig(
                steps=40, batch_size=32, lr=1e-3, hard_label=weights[0], soft_kd=weights[1], temperature=4.0
            )
            distill_model(student, digits_teacher, cfg, train, None, tmp_path / f"{name}-{seed}", seed=seed)
            scores[name].append(evaluate_torch(student, test).top1)
    assert np.mean(scores["kd"]) > np.mean(scores["labels"]) + 0.005, scores


def test_a_killed_run_resumes_to_the_same_loss_curve(tmp_path, digits_teacher):
    cfg = DistillConfig(steps=12, batch_size=16, checkpoint_every=4, augment="shift-flip", feature=0.5)
    data = _digits(digits_teacher, limit=128)

    def student():
        s = copy.deepcopy(digits_teacher)
        prune_model(s, PruneConfig(mlp=0.5))
        return s

    whole = student()
    uninterrupted = distill_model(whole, digits_teacher, cfg, data, None, tmp_path / "a", seed=5)

    class Killed(Exception):
        pass

    def kill_at_7(done, total, loss):
        if done == 7:
            raise Killed

    partial = student()
    with pytest.raises(Killed):
        distill_model(partial, digits_teacher, cfg, data, None, tmp_path / "b", seed=5, on_step=kill_at_7)
    resumed_model = student()
    resumed = distill_model(resumed_model, digits_teacher, cfg, data, None, tmp_path / "b", seed=5)
    assert resumed.resumed_from == 4
    assert resumed.losses == pytest.approx(uninterrupted.losses, abs=1e-6)
    for a, b in zip(
        whole.model.state_dict().values(), resumed_model.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    other = DistillConfig(steps=12, batch_size=8, checkpoint_every=4)
    with pytest.raises(DistillError, match="belongs to another run"):
        distill_model(student(), digits_teacher, other, data, None, tmp_path / "b", seed=5)


def _nonfinite_files(root: Path) -> list[str]:
    """Every safetensors file under `root` (hidden leftovers too) that holds a NaN or Inf."""
    return [
        str(f)
        for f in root.rglob("*.safetensors")
        if any(v.is_floating_point() and not torch.isfinite(v).all() for v in load_file(f).values())
    ]


def test_a_diverging_run_writes_no_nonfinite_checkpoint(tmp_path):
    """lr 1e4: after step 2 every weight is NaN while the loss of step 2 was finite."""
    student = _tiny(img_size=32, patch_size=8)
    data = _digits(student, limit=128)
    cfg = DistillConfig(steps=12, batch_size=16, lr=1e4, hard_label=1.0, soft_kd=0.0, checkpoint_every=2)
    for run_dir, every, named in ((tmp_path / "a", 2, "no good checkpoint was written"),
                                  (tmp_path / "b", 1, "the last good checkpoint is step 1 in ")):  # fmt: skip
        with pytest.raises(DistillError, match=f"after step 2 .*loss was finite.*{named}") as caught:
            distill_model(copy.deepcopy(student), None, cfg.model_copy(update={"checkpoint_every": every}),
                          data, data, run_dir, seed=0)  # fmt: skip
        assert _nonfinite_files(run_dir) == []
    assert not (tmp_path / "a" / "checkpoint").exists() and str(tmp_path / "b" / "checkpoint") in str(
        caught.value
    )
    state = torch.load(tmp_path / "b" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 1
    # rerunning resumes from step 1 and stops at the same place, with the same message: no loop
    with pytest.raises(DistillError, match="after step 2 .*last good checkpoint is step 1"):
        distill_model(copy.deepcopy(student), None, cfg.model_copy(update={"checkpoint_every": 1}),
                      data, data, tmp_path / "b", seed=0)  # fmt: skip


def test_weights_that_blow_up_between_checkpoints_stop_the_run(tmp_path):
    """Fault injection: a weight becomes Inf after step 3; the checkpoint of step 2 is the good one."""
    student = _tiny()
    data = _digits(student, limit=64)
    cfg = DistillConfig(steps=8, batch_size=16, hard_label=1.0, soft_kd=0.0, checkpoint_every=2, eval_every=1)

    def blow_up(done, total, loss):
        if done == 3:
            with torch.no_grad():
                student.model.head.weight[0, 0] = float("inf")

    with pytest.raises(DistillError, match="after step 3 .*head.weight.*last good checkpoint is step 2"):
        distill_model(student, None, cfg, data, data, tmp_path, seed=0, on_step=blow_up)
    assert _nonfinite_files(tmp_path) == []
    assert torch.load(tmp_path / "best" / "train_state.pt", weights_only=True)["step"] <= 2


def test_resume_refuses_a_checkpoint_with_nonfinite_weights(cli, tmp_path):
    from vitcompress.models.artifact import save_artifact

    start = save_artifact(_tiny(), tmp_path / "start")
    command = ["distill", str(start), "--data", "digits", "--data-limit", "64", "--steps", "2",
               "--batch-size", "16", "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli(*command).exit_code == 0
    # what an earlier version could leave: a checkpoint of diverged weights, consistent otherwise
    checkpoint = tmp_path / "run" / "distill.train" / "checkpoint"
    weights = load_file(checkpoint / "weights.safetensors")
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()}, checkpoint / "weights.safetensors"
    )
    from vitcompress.fileio import file_sha256

    state = torch.load(checkpoint / "train_state.pt", weights_only=True)
    torch.save(
        {**state, "weights_sha256": file_sha256(checkpoint / "weights.safetensors")},
        checkpoint / "train_state.pt",
    )
    # as if killed before the pass finished: the run's journal does not list it as done
    (tmp_path / "run" / ".passes.json").unlink()
    result = cli(*command)
    assert result.exit_code == 2, result.output
    assert (
        f"checkpoint {checkpoint} (step 2) has NaN/Inf weights in {len(weights)} of {len(weights)}"
        in result.output
    )
    assert f"delete {checkpoint} to start over" in result.output
    shutil.rmtree(checkpoint)
    again = cli(*command)
    assert again.exit_code == 0, again.output  # starting over works and writes a good one
    assert _nonfinite_files(tmp_path / "run") == []


def test_a_kill_between_the_checkpoint_renames_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The kill falls between `checkpoint -> .old-checkpoint-x` and `.tmp-checkpoint-y -> checkpoint`
    of the step-8 checkpoint: the directory loads as the complete step-4 one, and resuming from it
    ends with the weights of an uninterrupted run."""
    from vitcompress.passes.distill import _load_checkpoint

    start = _tiny()
    data = _digits(start, limit=96)
    cfg = DistillConfig(steps=12, batch_size=16, hard_label=1.0, soft_kd=0.0, checkpoint_every=4)
    whole = copy.deepcopy(start)
    distill_model(whole, None, cfg, data, None, tmp_path / "a", seed=0)

    class Killed(Exception):
        pass

    real = os.rename

    def rename(src, dst):
        dst = Path(dst)
        if dst.name == "checkpoint" and any(
            p.name.startswith(".old-checkpoint-") for p in dst.parent.iterdir()
        ):
            raise Killed  # the old checkpoint is moved aside, the new one not yet in place
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        distill_model(copy.deepcopy(start), None, cfg, data, None, tmp_path / "b", seed=0)
    monkeypatch.setattr(os, "rename", real)
    assert not (tmp_path / "b" / "checkpoint").exists()
    loaded = _load_checkpoint(tmp_path / "b" / "checkpoint")  # restores the complete old one
    assert loaded is not None and loaded[1]["step"] == 4 and len(loaded[1]["losses"]) == 4
    resumed_model = copy.deepcopy(start)
    resumed = distill_model(resumed_model, None, cfg, data, None, tmp_path / "b", seed=0)
    assert resumed.resumed_from == 4
    for a, b in zip(
        whole.model.state_dict().values(), resumed_model.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint"]  # no leftovers
    # weights of another step beside this train_state (what renaming the two files one by one could
    # leave) are refused, not resumed into another model
    weights_file = tmp_path / "b" / "checkpoint" / "weights.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(weights_file).items()}, weights_file)
    with pytest.raises(
        DistillError, match="inconsistent: weights.safetensors is not the file its train_state.pt"
    ):
        distill_model(copy.deepcopy(start), None, cfg, data, None, tmp_path / "b", seed=0)
    state_file = tmp_path / "b" / "checkpoint" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "weights_sha256"}, state_file)
    with pytest.raises(DistillError, match="step 12.* written by an earlier vitcompress, without the digest"):
        distill_model(copy.deepcopy(start), None, cfg, data, None, tmp_path / "b", seed=0)


def test_distillation_token_trains_both_heads(tmp_path):
    teacher = _tiny("timm:deit_tiny_distilled_patch16_224")
    student = copy.deepcopy(teacher)
    prune_model(student, PruneConfig(mlp=0.5))
    heads = {n: p.detach().clone() for n, p in student.model.named_parameters() if n.startswith("head")}
    cfg = DistillConfig(steps=3, batch_size=16, deit_hard=0.5, soft_kd=0.5, hard_label=1.0)
    distill_model(student, teacher, cfg, _digits(student, limit=64), None, tmp_path, seed=0)
    changed = {n for n, p in student.model.named_parameters() if n in heads and not torch.equal(p, heads[n])}
    assert {"head.weight", "head_dist.weight"} <= changed
    assert not student.model.distilled_training  # back to averaged logits for inference and export
    assert student.model(student.example_input(2)).shape == (2, 10)


def test_feature_kd_maps_blocks_and_projects_widths(tmp_path):
    assert block_pairs(2, 4) == [(0, 1), (1, 3)] and block_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    teacher = _tiny(depth=4)
    student = _tiny(embed_dim=96, num_heads=3)  # narrower and shallower than the teacher
    data = _digits(student, limit=64)
    base = DistillConfig(steps=1, batch_size=32, hard_label=0.0, soft_kd=1.0, resume=False)
    with_feature = base.model_copy(update={"feature": 1.0})
    plain = distill_model(copy.deepcopy(student), teacher, base, data, None, tmp_path / "p", seed=0)
    featured = distill_model(
        copy.deepcopy(student), teacher, with_feature, data, None, tmp_path / "f", seed=0
    )
    assert featured.losses[0] > plain.losses[0]  # the same KD term plus a positive feature term


def test_cached_teacher_logits_give_the_same_curve(tmp_path, digits_teacher):
    data = _digits(digits_teacher, limit=96)
    start = copy.deepcopy(digits_teacher)
    prune_model(start, PruneConfig(mlp=0.5))
    cfg = DistillConfig(steps=4, batch_size=32, resume=False)
    live = distill_model(copy.deepcopy(start), digits_teacher, cfg, data, None, tmp_path / "live", seed=0)
    cached_cfg = cfg.model_copy(update={"cache_teacher": True})
    cached = distill_model(
        copy.deepcopy(start), digits_teacher, cached_cfg, data, None, tmp_path / "c", seed=0
    )
    assert (tmp_path / "c" / "teacher_logits.safetensors").is_file()
    assert cached.losses == pytest.approx(live.losses, abs=1e-5)


def test_bad_input_is_refused_clearly(tmp_path, digits_teacher):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="every loss weight is 0"):
        DistillConfig(hard_label=0, soft_kd=0)
    with pytest.raises(ValidationError, match="cache_teacher needs augment: none"):
        DistillConfig(cache_teacher=True, augment="shift")
    student = _tiny()
    bigger = _tiny(img_size=32)
    with pytest.raises(DistillError, match="teacher takes 3x32x32 input, the student 3x16x16"):
        distill_model(
            student, bigger, DistillConfig(steps=1), _digits(student, limit=32), None, tmp_path / "m"
        )
    nan_data = _digits(student, limit=64)
    nan_data.preprocess.spec = nan_data.preprocess.spec.__class__(3, 16, 16, (0.0,) * 3, (0.0,) * 3)  # x / 0
    cfg = DistillConfig(steps=3, batch_size=32, hard_label=1.0, soft_kd=0.0)
    with pytest.raises(DistillError, match="loss is nan at step 0.*no good checkpoint was written"):
        distill_model(student, None, cfg, nan_data, None, tmp_path / "n")


def test_two_processes_match_one(tmp_path, cli):
    """torchrun with 2 CPU processes (gloo) at batch 8 each follows 1 process at batch 16. The single
    process is the same command run in this process (1 thread, as each torchrun worker), which saves
    an interpreter's start-up; the 2-process run needs its own processes."""
    from safetensors.torch import load_file

    from vitcompress.models.artifact import save_artifact

    artifact = save_artifact(_tiny(), tmp_path / "start")
    common = [
        "distill", str(artifact), "--data", "digits", "--data-limit", "128", "--steps", "5", "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = cli(*common, "--batch-size", "16", "--out", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vitcompress",
         *common, "--batch-size", "8", "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    curves = []
    for run in (one, two):
        ledger = json.loads(run.stdout)["ledger"]
        record = next(r for r in ledger if r["kind"] == "distill")
        curves.append((record["details"]["first_loss"], record["details"]["last_loss"]))
    assert curves[0] == pytest.approx(curves[1], abs=1e-5)
    a = load_file(tmp_path / "one" / "distill" / "model.safetensors")
    b = load_file(tmp_path / "two" / "distill" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert not any(p.name.startswith("vitcompress-rank") for p in (tmp_path / "two").iterdir())
