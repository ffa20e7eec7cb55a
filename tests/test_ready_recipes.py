"""Every ready recipe in recipes/ runs end to end on tiny settings (`compress --set ...`).

The recipes name the Fashion-MNIST reference checkpoint; here the model is random-init (the
checkpoint is set to null), the data is cut to a few hundred images, training to a few steps and the
accuracy gates are lifted: what is tested is that each chain runs and produces what it promises
(an INT8 model with quantized nodes, a pruned or factorized model, a report with a plot).
The GPU recipes run on the CPU with the provider check off: the file they build is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from tests.test_data import needs_fmnist

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.slow, needs_fmnist]

TINY = [
    "model.checkpoint=null",
    "model.kwargs.depth=2",
    "data.eval.limit=200",
    "budgets.max_top1_drop=null",
]


def _run(cli, tmp_path, name: str, *extra: str) -> tuple[dict, Path]:
    recipe = ROOT / "recipes" / name
    sets = [*TINY, *extra]
    text = recipe.read_text()
    if "  train:" in text:
        sets.append("data.train.limit=256")
    if "  calibration:" in text:
        sets.append("data.calibration.limit=64")
    out = tmp_path / name.removesuffix(".yaml")
    args = ["compress", "--recipe", recipe, "--out", out, "--json"]
    for item in sets:
        args += ["--set", item]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def _quantized_ops(path: str) -> dict[str, int]:
    model = onnx.load(path)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _assert_int8(report: dict) -> None:
    """The CPU presets' auto mode ships static QDQ or dynamic INT8, whichever ran faster here."""
    quantize = next(r for r in report["ledger"] if r["kind"] == "quantize")
    chosen = quantize["details"]["auto"]["chosen"]
    ops = _quantized_ops(report["final_onnx"])
    expected = {"static": "DequantizeLinear", "dynamic": "DynamicQuantizeLinear"}[chosen]
    assert ops.get(expected, 0) > 0 and ops.get("MatMul", 0) + ops.get("MatMulInteger", 0) > 0


def _kinds(report: dict) -> list[str]:
    return [r["kind"] for r in report["ledger"]]


def test_edge_cpu_int8_recipe_runs(cli, tmp_path):
    report, out = _run(
        cli,
        tmp_path,
        "edge-cpu-int8.yaml",
        "passes.quantize.calibration_size=32",
        "passes.quantize.max_top1_drop=null",
        "passes.validate.runs=5",
        "passes.validate.batch_sizes=[1]",
    )
    assert _kinds(report) == ["load", "export", "quantize", "validate"]
    _assert_int8(report)
    validate = report["ledger"][-1]
    assert 0.0 <= validate["top1"] <= 1.0 and validate["details"]["accuracy"]["samples"] == 200
    assert (out / "pareto.png").stat().st_size > 1000
    assert "![accuracy vs latency" in (out / "report.md").read_text()
    # the INT8 model's compute floor: its MACs at this CPU's measured int8 GEMM peak
    floor = validate["details"]["compute_floor"]
    assert floor["precision"] == "int8" and floor["macs"] == report["ledger"][0]["macs"]
    assert abs(floor["floor_ms"] - floor["macs"] / (floor["peak_gmacs"] * 1e9) * 1e3) < 1e-9
    assert 0 < floor["fraction"] < 1.5 and "Compute floor:" in (out / "report.md").read_text()


def test_prune_kd_int8_recipe_runs(cli, tmp_path):
    report, _ = _run(
        cli,
        tmp_path,
        "prune-kd-int8.yaml",
        "passes.prune.calibration_batches=2",
        "passes.distill.steps=3",
        "passes.distill.batch_size=32",
        "passes.distill.eval_every=null",
        "passes.quantize.calibration_size=32",
        "passes.quantize.max_top1_drop=null",
        "passes.validate.runs=5",
        "passes.validate.batch_sizes=[1]",
    )
    assert _kinds(report) == ["load", "prune", "distill", "export", "quantize", "validate"]
    load, prune = report["ledger"][0], report["ledger"][1]
    assert abs(prune["macs"] / load["macs"] - 0.5) <= 0.02  # the recipe's target_macs, met
    _assert_int8(report)


def test_lowrank_kd_recipe_runs(cli, tmp_path):
    report, _ = _run(
        cli,
        tmp_path,
        "lowrank-kd.yaml",
        "passes.lowrank.calibration_batches=2",
        "passes.distill.steps=3",
        "passes.distill.batch_size=32",
        "passes.validate.runs=5",
        "passes.validate.batch_sizes=[1]",
    )
    assert _kinds(report) == ["load", "lowrank", "distill", "export", "validate"]
    load, lowrank = report["ledger"][0], report["ledger"][1]
    assert lowrank["params"] < load["params"]
    graph = onnx.load(report["final_onnx"]).graph
    assert len([n for n in graph.node if n.op_type in ("MatMul", "Gemm")]) > 0
    floor = report["ledger"][-1]["details"]["compute_floor"]
    assert floor["precision"] == "fp32" and floor["macs"] == lowrank["macs"]


@pytest.mark.parametrize(
    ("name", "expected_op"), [("gpu-fp16.yaml", "Cast"), ("tensorrt-int8.yaml", "QuantizeLinear")]
)
def test_gpu_recipes_build_their_model_on_cpu(cli, tmp_path, name, expected_op):
    extra = [
        "passes.quantize.verify_provider=false",
        "passes.quantize.max_top1_drop=null",
        "passes.validate.provider=cpu",
        "passes.validate.runs=5",
        "passes.validate.batch_sizes=[1]",
    ]
    if name.startswith("tensorrt"):
        extra.append("passes.quantize.calibration_size=32")
    report, _ = _run(cli, tmp_path, name, *extra)
    model = onnx.load(report["final_onnx"])
    onnx.checker.check_model(model)
    assert _quantized_ops(report["final_onnx"]).get(expected_op, 0) > 0
    # float32 in and out, whatever is inside
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_gpu_tensorrt_sparse_recipe_builds_a_2_4_int8_model_on_cpu(cli, tmp_path):
    from vitcompress.runtime import holds_2_4_weights

    report, out = _run(
        cli,
        tmp_path,
        "gpu-tensorrt-sparse.yaml",
        "passes.sparsify.calibration_batches=1",
        "passes.quantize.verify_provider=false",
        "passes.quantize.max_top1_drop=null",
        "passes.quantize.calibration_size=32",
        "passes.validate.provider=cpu",
        "passes.validate.runs=5",
        "passes.validate.batch_sizes=[1]",
    )
    assert _kinds(report) == ["load", "sparsify", "export", "quantize", "validate"]
    sparsify = report["ledger"][1]
    assert sparsify["details"]["pattern"] == "2:4" and sparsify["details"]["sparsity"] == 0.5
    assert holds_2_4_weights(out / "model.onnx") and holds_2_4_weights(report["final_onnx"])
    assert _quantized_ops(report["final_onnx"]).get("QuantizeLinear", 0) > 0


def test_int_only_recipe_builds_a_proven_integer_graph_that_eval_reads(cli, tmp_path):
    report, out = _run(
        cli,
        tmp_path,
        "int-only.yaml",
        "passes.quantize.calibration_size=1",  # one calibration image is allowed (I-Segmenter's setting)
        "passes.quantize.max_top1_drop=null",
        "passes.validate.runs=5",
        "passes.validate.batch_sizes=[1]",
    )
    assert _kinds(report) == ["load", "export", "quantize", "validate"]
    quantize = next(r for r in report["ledger"] if r["kind"] == "quantize")
    details = quantize["details"]
    assert details["integer_only"]["integer_only"] is True and details["reference_match"]["bit_exact"]
    assert details["calibration_images"] == 1 and details["integer_only"]["ops"]["MatMulInteger"] == 16
    assert report["final_onnx"] == str(out / "model.intonly.onnx")
    assert "integer-only: yes" in (out / "report.md").read_text()
    result = cli("eval", report["final_onnx"], "--data", "fashion-mnist:test", "--data-limit", "64", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 64


def test_tome_int8_recipe_runs(cli, tmp_path):
    report, _ = _run(
        cli,
        tmp_path,
        "tome-int8.yaml",
        "passes.tokens.r=[16,0]",  # the tiny model has 2 blocks, the reference 6
        "passes.quantize.calibration_size=32",
        "passes.quantize.max_top1_drop=null",
        "passes.validate.runs=5",
        "passes.validate.batch_sizes=[1]",
    )
    assert _kinds(report) == ["load", "tokens", "export", "quantize", "validate"]
    tokens = report["ledger"][1]
    assert tokens["details"]["r"] == [16, 0] and tokens["details"]["final_tokens"] == 50 - 16
    assert tokens["macs"] < report["ledger"][0]["macs"]
    _assert_int8(report)
