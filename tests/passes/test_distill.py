"""Distillation: learning on real data, KD vs labels, exact resume, DDP = single process, bad input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import tiny_ref
from vitcompress.data import DataSpec, load_dataset
from vitcompress.evaluate import evaluate_torch
from vitcompress.models import load_model
from vitcompress.passes.distill import DistillConfig, DistillError, block_pairs, distill_model
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


def test_training_on_real_digits_lowers_the_loss_and_raises_accuracy(tmp_path, digits_teacher):
    test = _digits(digits_teacher, "test")
    assert evaluate_torch(digits_teacher, test).top1 > 0.8
    student = _tiny(embed_dim=96, num_heads=3, seed=1)
    before = evaluate_torch(student, test).top1
    cfg = DistillConfig(steps=80, batch_size=32, lr=2e-3, hard_label=1.0, soft_kd=0.0, eval_every=40)
    result = distill_model(student, None, cfg, _digits(student), test, tmp_path, seed=0)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first
    assert result.best_top1 is not None and result.best_top1 > before + 0.25
    assert [e["step"] for e in result.evals] == [40, 80]
    # the best weights are what the student keeps
    assert evaluate_torch(student, test).top1 == pytest.approx(result.best_top1)


def test_kd_beats_labels_alone_from_the_same_pruned_start(tmp_path, digits_teacher):
    test = _digits(digits_teacher, "test")
    pruned = copy.deepcopy(digits_teacher)
    prune_model(pruned, PruneConfig(target_macs=0.4, structures=["heads", "mlp"], round_to=8))
    train = _digits(pruned, limit=256)  # little data: where a teacher helps most
    scores = {}
    for name, weights in {"labels": (1.0, 0.0), "kd": (0.3, 0.7)}.items():
        student = copy.deepcopy(pruned)
        cfg = DistillConfig(
            steps=40, batch_size=32, lr=1e-3, hard_label=weights[0], soft_kd=weights[1], temperature=4.0
        )
        distill_model(student, digits_teacher, cfg, train, None, tmp_path / name, seed=0)
        scores[name] = evaluate_torch(student, test).top1
    assert scores["kd"] > scores["labels"], scores


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
    with pytest.raises(DistillError, match="loss is nan at step 0.*last good checkpoint"):
        distill_model(student, None, cfg, nan_data, None, tmp_path / "n")


def test_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) at batch 8 each follows 1 process at batch 16."""
    from safetensors.torch import load_file

    from vitcompress.models.artifact import save_artifact

    artifact = save_artifact(_tiny(), tmp_path / "start")
    common = [
        "distill", str(artifact), "--data", "digits", "--data-limit", "128", "--steps", "5", "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "vitcompress", *common, "--batch-size", "16", "--out", str(tmp_path / "one")],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
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
