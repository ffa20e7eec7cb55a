"""A broken reference is said loudly and fails the accuracy budget ("your model, your data").

The story: a model trained on inputs in [0, 1] evaluated with ImageNet's mean/std scored near chance,
and the run said "drop 0.56 points, budget met" because the fp32 baseline was equally wrong. Here a
tiny ViT is fitted on digits in [0, 1] (random features + a closed-form ridge head: about a second,
no training loop), then fed digits with ImageNet's mean/std (the warning fires, the budget fails
with exit 3 and the reason) and with its own normalization (nothing fires, the budget holds).
"""

from __future__ import annotations

import json
import logging
from math import comb

import numpy as np
import pytest
import torch

from tests.conftest import tiny_ref
from vitcompress.accuracy import (
    PROBE_IMAGES,
    _result,
    _Tally,
    binomial_tail,
    check_sanity,
    evaluate_onnx,
    onnx_classes,
    onnx_input_spec,
    onnx_metadata,
    sanity_onnx,
)
from vitcompress.data import DIGITS_CLASSES, DataSpec, load_dataset
from vitcompress.models.loader import InputSpec

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
RAW01 = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # pixels in [0, 1], no normalization
KWARGS = {"depth": 1, "patch_size": 2, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(loaded model, its weights file): a tiny ViT whose head is fitted on digits in [0, 1]."""
    from safetensors.torch import save_file

    from vitcompress.models import load_model

    torch.manual_seed(0)
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224", img_size=8, kwargs=KWARGS))
    train = load_dataset(DataSpec(source="digits", **RAW01), loaded.input, 10)
    model = loaded.model
    with torch.no_grad():
        x, y = train.take(np.arange(len(train)))
        features = model.forward_head(model.forward_features(x), pre_logits=True).double()
        features = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], 1)
        targets = torch.nn.functional.one_hot(y, 10).double()
        eye = torch.eye(features.shape[1], dtype=torch.float64)
        weights = torch.linalg.solve(features.T @ features + 1e-2 * eye, features.T @ targets)
        model.head.weight.copy_(weights[:-1].T.float())
        model.head.bias.copy_(weights[-1].float())
    path = tmp_path_factory.mktemp("fitted") / "fitted.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return loaded, path


def test_binomial_tail_is_exact():
    assert binomial_tail(8, 10, 0.5) == pytest.approx(sum(comb(10, k) for k in range(8, 11)) / 1024)
    assert binomial_tail(0, 10, 0.3) == 1.0 and binomial_tail(11, 10, 0.3) == 0.0
    assert binomial_tail(36, 359, 0.1) == pytest.approx(0.5, abs=0.1)  # chance itself: p about 1/2
    assert binomial_tail(300, 359, 0.1) < 1e-100


def _linear_digits():
    """A bias-free linear classifier fitted on 8x8 grey digits in [0, 1]: mean/std offsets shift
    its logits per class, so a wrong normalization costs accuracy without reaching chance."""
    spec = InputSpec(1, 8, 8, (0.0,), (1.0,))
    train = load_dataset(DataSpec(source="digits"), spec, 10)
    x, y = train.take(np.arange(len(train)))
    feats = x.reshape(len(x), -1).double()
    targets = torch.nn.functional.one_hot(y, 10).double() * 2 - 1
    w = torch.linalg.solve(feats.T @ feats + torch.eye(64, dtype=torch.float64), feats.T @ targets)
    weights = w.float().numpy()

    def predict(batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1) @ weights

    return spec, predict


def _score(predict, data):
    tally = _Tally()
    for x, y in data.batches(64):
        tally.add(predict(x.numpy()), y.numpy())
    return _result("linear", "numpy", data, tally, 1.0)


def test_the_probe_catches_a_plausible_score_that_is_not_the_models():
    spec, predict = _linear_digits()
    right = load_dataset(DataSpec(source="digits", split="test"), spec, 10)
    good = _score(predict, right)
    sane = check_sanity(predict, right, good, "linear")
    assert good.top1 > 0.9 and sane.ok and sane.problems == ()
    assert sane.chance == pytest.approx(36 / 359) and sane.p_above_chance < 1e-100
    # a model this good on the probe images leaves no room for a 10-point gain: nothing re-run
    assert [p["preprocessing"] for p in sane.probe] == ["as used"]

    wrong = load_dataset(DataSpec(source="digits", split="test", mean=[0.449], std=[0.226]), spec, 10)
    bad = _score(predict, wrong)
    checked = check_sanity(predict, wrong, bad, "linear")
    # 70-85%: not near chance, so only the probe can tell
    assert 0.7 < bad.top1 < 0.85 and checked.p_above_chance < 1e-50
    assert not checked.ok and len(checked.problems) == 1
    problem = checked.problems[0]
    assert problem.startswith(f"the same {PROBE_IMAGES} images score ")
    assert "with pixels in [0, 1] without mean/std but" in problem and "mean (0.449), std (0.226)" in problem
    tried = {p["preprocessing"]: p["top1"] for p in checked.probe}
    assert tried["pixels in [0, 1] without mean/std"] - tried["as used"] >= 0.10

    # a mild mismatch moves the score by a few points: not flagged
    mild = load_dataset(DataSpec(source="digits", split="test", mean=[0.2], std=[0.8]), spec, 10)
    assert check_sanity(predict, mild, _score(predict, mild), "linear").ok


def test_chance_and_off_scale_inputs_are_named():
    spec = InputSpec(1, 8, 8, (0.0,), (1.0,))
    data = load_dataset(DataSpec(source="digits", split="test"), spec, 10)

    def constant(batch: np.ndarray) -> np.ndarray:  # always class 0: exactly the majority's share
        return np.tile(np.eye(10)[0], (len(batch), 1))

    checked = check_sanity(constant, data, _score(constant, data), "constant")
    assert checked.problems[0].startswith("top-1 10.0% on 359 images is near chance (10.0%, the most")
    # pixels on the 0-255 scale into a model normalized for 0-1 (mean 0.5, std 0.5): mean ~ +40
    unscaled = load_dataset(
        DataSpec(source="digits", split="test", input_range="0-255", mean=[0.5], std=[0.5]), spec, 10
    )
    off = check_sanity(constant, unscaled, _score(constant, unscaled), "constant")
    stats = [p for p in off.problems if p.startswith("preprocessed inputs are off scale")]
    assert len(stats) == 1 and "channel 0 has mean +" in stats[0] and off.input_mean[0] > 30


def _recipe(tmp_path, weights, data_extra: dict, name: str):
    recipe = {
        "version": 1,
        "model": {
            "source": "timm:vit_tiny_patch16_224",
            "checkpoint": str(weights),
            "num_classes": 10,
            "img_size": 8,
            "kwargs": KWARGS,
        },
        "data": {"eval": {"source": "digits", "split": "test", **data_extra}},
        "passes": [
            # full rank saves nothing, so every layer stays as it is: the "compressed" model is the
            # baseline's equal, and validate exports the baseline next to it
            {"kind": "lowrank", "rank_fraction": 1.0},
            {"kind": "export"},
            {"kind": "validate", "runs": 5, "warmup": 1},
        ],
        "budgets": {"max_top1_drop": 5},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def test_a_misnormalized_baseline_warns_and_fails_the_budget(cli, tmp_path, fitted):
    _, weights = fitted
    wrong = cli(
        "compress", "--recipe", _recipe(tmp_path, weights, IMAGENET, "wrong"), "--out", tmp_path / "w"
    )
    assert wrong.exit_code == 3, wrong.output
    assert "SANITY CHECK FAILED for fp32 baseline (baseline.onnx)" in wrong.stderr
    assert "max_top1_drop cannot be judged: the fp32 baseline (baseline.onnx) it is measured" in wrong.stderr
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    validate = report["ledger"][-1]
    sanity = validate["details"]["sanity"]
    assert sanity["ok"] is False and validate["details"]["baseline_top1"] < 0.2  # near chance
    assert any("with pixels in [0, 1] without mean/std" in p for p in sanity["problems"])
    # the drop itself is nil: before the check, this run said "budget met"
    assert validate["details"]["top1_drop_points"] == pytest.approx(0.0)
    assert report["budgets"]["passed"] is False
    assert report["budgets"]["failures"][0].startswith("max_top1_drop cannot be judged")
    assert "Budgets: FAILED: max_top1_drop cannot be judged" in (tmp_path / "w" / "report.md").read_text()

    right = cli("compress", "--recipe", _recipe(tmp_path, weights, RAW01, "right"), "--out", tmp_path / "r")
    assert right.exit_code == 0, right.output
    assert "SANITY CHECK FAILED" not in right.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    validate = report["ledger"][-1]
    assert validate["details"]["sanity"]["ok"] is True and validate["details"]["baseline_top1"] > 0.8
    assert validate["details"]["preprocessing"]["mean"] == [0.0, 0.0, 0.0]
    assert validate["details"]["preprocessing"]["source_modes"] == {"L": 359}
    # the exported file records the preprocessing the run used (data.eval's) and the class names
    meta = onnx_metadata(tmp_path / "r" / "model.onnx")
    assert meta is not None and meta["classes"] == list(DIGITS_CLASSES)
    assert meta["input"] == {
        "channels": 3,
        "height": 8,
        "width": 8,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "interpolation": "bicubic",
        "crop_pct": 0.9,  # timm's data config for vit_tiny_patch16_224
        "crop_mode": "center",
        "input_range": "0-1",
    }
    assert onnx_metadata(tmp_path / "r" / "baseline.onnx") == meta  # the baseline records the same
    export = next(r for r in report["ledger"] if r["kind"] == "export")
    assert export["details"]["preprocessing"]["from"] == "data.eval"


def test_eval_reuses_the_files_preprocessing_and_overrides_warn(cli, tmp_path, fitted):
    from vitcompress.passes.export import ExportConfig, export_model

    loaded, _ = fitted
    spec = InputSpec(3, 8, 8, (0.0,) * 3, (1.0,) * 3, "bicubic", 1.0, "center")
    path = export_model(
        loaded, tmp_path / "m.onnx", ExportConfig(), input_spec=spec, classes=DIGITS_CLASSES
    ).path
    assert onnx_input_spec(path)[0] == spec
    # a quantized file keeps the metadata: `eval model.int8.onnx` preprocesses like its source
    from vitcompress.passes.quantize import QuantizeConfig, quantize_model

    quantize_model(path, tmp_path / "m.int8.onnx", QuantizeConfig(mode="dynamic"), None)
    assert onnx_input_spec(tmp_path / "m.int8.onnx") == (spec, 10)
    assert onnx_classes(tmp_path / "m.int8.onnx") == DIGITS_CLASSES
    ok = cli("eval", path, "--data", "digits:test", "--json")
    assert ok.exit_code == 0, ok.output
    result = json.loads(ok.stdout)
    assert result["top1"] > 0.8 and result["sanity"]["ok"] is True
    assert result["preprocessing"]["mean"] == [0.0, 0.0, 0.0] and result["samples"] == 359

    bad = cli(
        "eval", path, "--data", "digits:test", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"
    )
    assert bad.exit_code == 0, bad.output  # eval reports; only budgets gate
    assert "The score above is not trustworthy" in bad.stderr and "near chance" in bad.stderr
    assert "top-1 " in bad.stdout
    one_value = cli("eval", path, "--data", "digits:test", "--mean", "0.5", "--std", "0.5", "--json")
    assert json.loads(one_value.stdout)["preprocessing"]["std"] == [0.5, 0.5, 0.5]
    assert json.loads(one_value.stdout)["sanity"]["ok"] is False
    wrong_count = cli("eval", path, "--data", "digits:test", "--mean", "0.5,0.5")
    assert wrong_count.exit_code == 2 and "2 values for a model with 3 channels" in wrong_count.output

    # the same ONNX file, direct: the validate-style sanity names the model and the data
    from vitcompress.accuracy import warn_if_insane

    data = load_dataset(DataSpec(source="digits", split="test", **IMAGENET), spec, 10)
    checked = sanity_onnx(path, data, evaluate_onnx(path, data), label="fp32 baseline m.onnx")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("vitcompress.accuracy")
    logger.addHandler(handler)
    try:
        warn_if_insane(checked)
    finally:
        logger.removeHandler(handler)
    assert [r.levelno for r in records] == [logging.WARNING] * len(checked.problems) == [logging.WARNING] * 2
    assert (
        records[0].getMessage().startswith("SANITY CHECK FAILED for fp32 baseline m.onnx on digits (test): ")
    )


def test_eval_per_class_on_an_image_folder(cli, tmp_path, fitted):
    """The digits test split written as PNGs under named class folders: per-class counts sum to the
    totals, and the folder (decoded per image by timm's transform) scores like the arrays."""
    from PIL import Image

    from vitcompress.data import digits
    from vitcompress.passes.export import ExportConfig, export_model

    loaded, _ = fitted
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    raw = digits(DataSpec(source="digits", split="test"))
    for i, (image, label) in enumerate(zip(raw.images, raw.labels, strict=True)):
        folder = tmp_path / "imgs" / f"{label}-{names[label]}"  # sorted like the labels
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / f"{i:04d}.png")
    spec = InputSpec(3, 8, 8, (0.0,) * 3, (1.0,) * 3, "bicubic", 1.0, "center")
    path = export_model(
        loaded, tmp_path / "m.onnx", ExportConfig(), input_spec=spec, classes=DIGITS_CLASSES
    ).path
    run = cli("eval", path, "--data", tmp_path / "imgs", "--per-class", "--json", "--num-workers", "2")
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    per_class = result["per_class"]
    assert [c["name"] for c in per_class] == [f"{d}-{n}" for d, n in enumerate(names)]
    assert [c["samples"] for c in per_class] == np.bincount(raw.labels).tolist()
    assert sum(c["samples"] for c in per_class) == result["samples"] == 359
    assert sum(c["correct"] for c in per_class) == round(result["top1"] * 359)
    assert all(c["top1"] == pytest.approx(c["correct"] / c["samples"]) for c in per_class)
    arrays = json.loads(cli("eval", path, "--data", "digits:test", "--json").stdout)
    assert abs(result["top1"] - arrays["top1"]) < 0.05  # PIL's resize vs torch's: same images
    assert (
        result["preprocessing"]["source_modes"] == {"L": 359}
        and result["data"] == f"folder {tmp_path / 'imgs'}"
    )
    assert "grey replicated to RGB" in result["preprocessing"]["conversion"]
    table = cli("eval", path, "--data", tmp_path / "imgs", "--per-class")
    assert "top-1 per class" in table.stdout and "9-nine" in table.stdout
    assert "the model's classes (0, 1, 2, 3, 4, ... (10)) are not the data's" in table.stderr
