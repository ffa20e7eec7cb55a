"""eval: PyTorch and ONNX Runtime agree on the same real data; the pipeline's accuracy ledger and budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_ref
from vitcompress.accuracy import _Tally, evaluate_onnx, evaluate_torch, onnx_input_spec
from vitcompress.data import DataSpec, load_dataset
from vitcompress.errors import DataError, OnnxModelError
from vitcompress.models import load_model
from vitcompress.passes.export import ExportConfig, export_model


def test_tally_numbers():
    tally = _Tally()
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    tally.add(logits, np.array([1, 2]))
    assert tally.top1 == 1 and tally.top5 == 2 and tally.n == 2
    expected = -np.log(np.exp(1.0) / np.exp([2.0, 1.0, 0.0]).sum()) - np.log(np.exp(5.0) / (2 + np.exp(5.0)))
    assert tally.loss == pytest.approx(expected)


def test_torch_and_onnx_agree_on_real_digits(tmp_path):
    torch.manual_seed(0)
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    path = export_model(loaded, tmp_path / "m.onnx", ExportConfig()).path
    spec, classes = onnx_input_spec(path)
    assert spec == loaded.input and classes == 10
    data = load_dataset(DataSpec(source="digits", split="test"), loaded.input, 10)
    a = evaluate_torch(loaded, data, batch_size=100)
    b = evaluate_onnx(path, data, batch_size=64)
    assert a.samples == b.samples == 359
    assert a.top1 == b.top1 and a.top5 == b.top5
    assert a.loss == pytest.approx(b.loss, abs=1e-5)
    assert a.top5 > 0 and a.top1 <= a.top5 <= 1


def test_eval_command_and_its_errors(cli, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224", kwargs={}))
    save_file(loaded.model.state_dict(), tmp_path / "w.safetensors")
    args = ["timm:vit_tiny_patch16_224", "--checkpoint", tmp_path / "w.safetensors", "--img-size", "32"]
    assert cli("export", *args, "--out", tmp_path / "m.onnx").exit_code == 0
    torch_run = cli("eval", *args, "--data", "digits:test", "--data-limit", "100", "--json")
    onnx_run = cli("eval", tmp_path / "m.onnx", "--data", "digits:test", "--data-limit", "100", "--json")
    assert torch_run.exit_code == 0 and onnx_run.exit_code == 0, onnx_run.output
    a, b = json.loads(torch_run.stdout), json.loads(onnx_run.stdout)
    assert a["samples"] == b["samples"] == 100 and b["runtime"] == "onnxruntime-cpu"
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    wrong = cli(
        "eval", "timm:vit_tiny_patch16_224", "--num-classes", "5", "--img-size", "32", "--data", "digits"
    )
    assert wrong.exit_code == 2 and "has 10 classes, the model has 5" in wrong.stderr


def test_onnx_without_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "plain.onnx")
    with pytest.raises(OnnxModelError, match="has no vitcompress input metadata"):
        onnx_input_spec(tmp_path / "plain.onnx")


def test_pipeline_records_accuracy_and_gates_on_the_drop(tmp_path):
    from vitcompress.errors import BudgetExceededError
    from vitcompress.pipeline import run_recipe
    from vitcompress.recipe import parse_recipe

    text = """
version: 1
model: {source: timm:vit_tiny_patch16_224, num_classes: 10, img_size: 32, kwargs: {depth: 2, patch_size: 8}}
data:
  eval: {source: digits, split: test, limit: 100}
passes:
  - kind: prune
    heads: 0.34
    mlp: 0.5
  - kind: export
  - kind: validate
    runs: 5
    warmup: 1
budgets:
  max_top1_drop: 100
"""
    # a random-init baseline scores near chance: no drop measured against it can pass the gate
    with pytest.raises(BudgetExceededError, match="max_top1_drop cannot be judged: the fp32 baseline"):
        run_recipe(parse_recipe(text), tmp_path / "random")
    report = json.loads((tmp_path / "random" / "report.json").read_text())
    assert report["ledger"][-1]["details"]["sanity"]["ok"] is False
    assert "near chance" in report["ledger"][-1]["details"]["sanity"]["problems"][0]
    # the ledger's arithmetic, with the check off (the recipe's own choice)
    unchecked = text.replace("    warmup: 1\n", "    warmup: 1\n    sanity: false\n")
    result = run_recipe(parse_recipe(unchecked), tmp_path / "ok")
    record = result.ledger[-1]
    assert record.top1 is not None and "baseline_top1" in record.details and "sanity" not in record.details
    assert record.details["top1_drop_points"] == pytest.approx(
        100 * (record.details["baseline_top1"] - record.top1)
    )
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["ledger"][-1]["top1"] == record.top1
    no_eval = text.replace("data:\n  eval: {source: digits, split: test, limit: 100}\n", "")
    with pytest.raises(BudgetExceededError, match="max_top1_drop is set but no pass measured accuracy"):
        run_recipe(parse_recipe(no_eval), tmp_path / "no")
    with pytest.raises(DataError):
        load_dataset(DataSpec(source="digits"), load_model(tiny_ref("timm:vit_tiny_patch16_224")).input, 3)
