"""Quantization: quantized node counts, ViT-aware placement, agreement on real data, every calibration
method measured, presets, fp16, the accuracy gate and its fallback, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError

from tests.conftest import tiny_ref
from vitcompress.data import DataSpec, load_dataset
from vitcompress.models import load_model
from vitcompress.passes import quantize as q
from vitcompress.passes.distill import DistillConfig, distill_model
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.passes.quantize import (
    Mode,
    QuantizeConfig,
    QuantizeError,
    agreement,
    check_calibration,
    quantize_file,
    quantize_with_gate,
)
from vitcompress.passes.quantize import onnx as q_onnx
from vitcompress.passes.quantize import run as q_run


@pytest.fixture(scope="module")
def trained_onnx(tmp_path_factory):
    """A tiny ViT trained on digits (about 85% top-1), exported: the float model under test."""
    directory = tmp_path_factory.mktemp("q")
    torch.manual_seed(0)
    loaded = load_model(
        tiny_ref(
            "timm:vit_tiny_patch16_224",
            img_size=16,
            kwargs={"depth": 2, "patch_size": 4, "embed_dim": 96, "num_heads": 3},
        )
    )
    train = load_dataset(DataSpec(source="digits"), loaded.input, 10)
    cfg = DistillConfig(steps=300, batch_size=32, lr=2e-3, hard_label=1.0, soft_kd=0.0, checkpoint_every=1000)
    distill_model(loaded, None, cfg, train, None, directory / "train", seed=0)
    path = export_model(loaded, directory / "model.onnx", ExportConfig()).path
    calibration = load_dataset(DataSpec(source="digits", limit=128), loaded.input, 10)
    test = load_dataset(DataSpec(source="digits", split="test"), loaded.input, 10)
    return path, calibration, test


def test_static_int8_quantizes_only_the_linears_and_agrees_on_real_data(trained_onnx, tmp_path):
    path, calibration, test = trained_onnx
    details = quantize_file(path, tmp_path / "int8.onnx", QuantizeConfig(), calibration)
    counts = details["quantized_counts"]
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    # ViT-aware placement: dequantized tensors feed only the linear layers, never LayerNorm/Softmax/Add
    model = onnx.load(str(tmp_path / "int8.onnx"))
    quantized_activations = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    # quantized activations come back to float only inside the linear layers: into their MatMul/Gemm,
    # or (MatMul outputs) into the same linear's bias Add; never into LayerNorm, Softmax, GELU or residuals
    fed = {
        (c.op_type, c.name)
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized_activations
        for c in model.graph.node
        if n.output[0] in c.input
    }
    assert {op for op, _ in fed} <= {"MatMul", "Gemm", "Add"}, fed
    assert all(
        name.rsplit("/", 2)[-2] in ("qkv", "proj", "fc1", "fc2", "head") for op, name in fed if op == "Add"
    ), fed
    measured = agreement(path, tmp_path / "int8.onnx", test)
    assert measured["float_top1"] > 0.8
    assert measured["top1_agreement"] >= 0.97
    assert abs(measured["float_top1"] - measured["quantized_top1"]) <= 0.02
    assert (tmp_path / "int8.onnx").stat().st_size < 0.6 * path.stat().st_size


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_every_calibration_method_is_measured(trained_onnx, tmp_path, method):
    path, calibration, test = trained_onnx
    quantize_file(path, tmp_path / "m.onnx", QuantizeConfig(calibration=method), calibration)
    measured = agreement(path, tmp_path / "m.onnx", test)
    assert measured["top1_agreement"] >= 0.95, (method, measured)


def test_dynamic_and_attention_quantization(trained_onnx, tmp_path):
    path, calibration, _ = trained_onnx
    dynamic = quantize_file(path, tmp_path / "d.onnx", QuantizeConfig(mode="dynamic"), None)
    assert dynamic["quantized_counts"]["MatMulInteger"] > 0
    linears = quantize_file(path, tmp_path / "l.onnx", QuantizeConfig(), calibration)
    with_attention = quantize_file(
        path,
        tmp_path / "a.onnx",
        QuantizeConfig(preset="gpu-tensorrt-int8", verify_provider=False),
        calibration,
    )
    assert (
        with_attention["quantized_counts"]["QuantizeLinear"] > linears["quantized_counts"]["QuantizeLinear"]
    )


def test_presets_expand_to_explicit_settings():
    avx2 = QuantizeConfig(preset="cpu-x86-avx2")
    assert (avx2.mode, avx2.activation_type, avx2.weight_type, avx2.reduce_range) == (
        Mode.auto,
        "uint8",
        "int8",
        True,
    )
    arm = QuantizeConfig(preset="cpu-arm64")
    assert arm.activation_type == "int8" and not arm.reduce_range
    trt = QuantizeConfig(preset="gpu-tensorrt-int8")
    assert trt.quantize_attention and trt.provider == "tensorrt" and trt.activation_type == "int8"
    assert trt.mode is Mode.static  # TensorRT needs the QDQ graph; auto times on the CPU only
    with pytest.raises(ValidationError, match="mode auto times the candidates with ONNX Runtime's CPU"):
        QuantizeConfig(mode="auto", provider="cuda")
    assert QuantizeConfig(preset="cpu-x86-vnni", per_channel=False).per_channel is False  # explicit wins
    fp16 = QuantizeConfig(preset="gpu-fp16")
    assert fp16.mode is Mode.fp16 and fp16.filename == "model.fp16.onnx"
    from vitcompress.recipe import dump_recipe, parse_recipe

    recipe = parse_recipe(
        "version: 1\nmodel: {source: timm:x}\npasses:\n  - kind: export\n  - kind: quantize\n    preset: cpu-x86-avx2\n    mode: dynamic\n"
    )
    resolved = dump_recipe(recipe)
    assert "reduce_range: true" in resolved and "mode: dynamic" in resolved
    with pytest.raises(ValidationError, match="unknown preset 'cpu-x86-vnn'; did you mean 'cpu-x86-vnni'"):
        QuantizeConfig(preset="cpu-x86-vnn")


def test_fp16_keeps_float32_io_and_passes_the_checker(trained_onnx, tmp_path):
    path, _, test = trained_onnx
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(
            QuantizeError, match="preset 'gpu-fp16' targets cuda, which this machine's onnxruntime"
        ):
            quantize_file(path, tmp_path / "h.onnx", QuantizeConfig(preset="gpu-fp16"), None)
        assert not (tmp_path / "h.onnx").exists()
    quantize_file(path, tmp_path / "h.onnx", QuantizeConfig(preset="gpu-fp16", verify_provider=False), None)
    onnx.checker.check_model(str(tmp_path / "h.onnx"), full_check=True)
    model = onnx.load(str(tmp_path / "h.onnx"))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert agreement(path, tmp_path / "h.onnx", test)["top1_agreement"] >= 0.99


def test_bad_calibration_and_models_fail_before_onnx_runtime(trained_onnx, tmp_path):
    path, _, _ = trained_onnx
    good = np.zeros((4, 3, 16, 16), np.float32)
    with pytest.raises(QuantizeError, match="calibration data is empty"):
        check_calibration([], (3, 16, 16))
    with pytest.raises(QuantizeError, match="single image"):
        check_calibration([good[:1]], (3, 16, 16))
    with pytest.raises(QuantizeError, match=r"shape \(3, 8, 8\), the model takes \(3, 16, 16\)"):
        check_calibration([np.zeros((4, 3, 8, 8), np.float32)], (3, 16, 16))
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(QuantizeError, match="NaN or Inf"):
        check_calibration([good, bad], (3, 16, 16))
    quantize_file(path, tmp_path / "once.onnx", QuantizeConfig(mode="dynamic"), None)
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_file(tmp_path / "once.onnx", tmp_path / "twice.onnx", QuantizeConfig(mode="dynamic"), None)
    with pytest.raises(QuantizeError, match="needs calibration data"):
        quantize_file(path, tmp_path / "x.onnx", QuantizeConfig(), None)
    assert not (tmp_path / "x.onnx").exists()


def test_gate_returns_sensitive_layers_to_float_and_keeps_the_best(trained_onnx, tmp_path, monkeypatch):
    """The fallback logic on a scripted accuracy: 5 points lost fully quantized, 0.3 with 2+ float layers."""
    path, calibration, test = trained_onnx

    def float_linears(quant_path) -> int:
        model = onnx.load(str(quant_path))
        dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        names = set(q.quantizable_nodes(path, QuantizeConfig()))
        return sum(1 for n in model.graph.node if n.name in names and not set(n.input) & dequantized)

    def scripted(float_path, quant_path, data, batch_size=64):
        floats = float_linears(quant_path)
        drop = 0.05 if floats == 0 else (0.02 if floats == 1 else 0.003)
        return {
            "top1_agreement": 1 - drop,
            "max_abs_diff": 0.1,
            "float_top1": 0.9,
            "quantized_top1": 0.9 - drop,
            "samples": 10,
        }

    monkeypatch.setattr(q_onnx, "agreement", scripted)  # where the gate calls it
    met = quantize_with_gate(path, tmp_path / "g.onnx", QuantizeConfig(max_top1_drop=0.5), calibration, test)
    assert met.met and len(met.keep_float) == 2 and met.drop_points == pytest.approx(0.3)
    assert (tmp_path / "g.onnx").is_file()
    unmet = quantize_with_gate(
        path,
        tmp_path / "u.onnx",
        QuantizeConfig(max_top1_drop=0.1, fallback_time_limit_s=600),
        calibration,
        test,
    )
    assert not unmet.met and unmet.drop_points == pytest.approx(0.3)
    assert (tmp_path / "u.onnx").is_file()  # never leave the user with nothing


def test_pipeline_gate_failure_exits_3_after_writing_reports_and_the_model(
    trained_onnx, tmp_path, monkeypatch
):
    from vitcompress.errors import BudgetExceededError
    from vitcompress.pipeline import run_recipe
    from vitcompress.recipe import parse_recipe

    def measured(a, b, d):
        return {
            "top1_agreement": 0.9,
            "max_abs_diff": 1.0,
            "float_top1": 0.9,
            "quantized_top1": 0.8,
            "samples": 10,
        }

    for module in (q_onnx, q_run):  # the gate and the pass's own check
        monkeypatch.setattr(module, "agreement", measured)
    text = """
version: 1
model: {source: timm:vit_tiny_patch16_224, num_classes: 10, img_size: 16, kwargs: {depth: 1, patch_size: 4}}
data:
  calibration: {source: digits, limit: 64}
  eval: {source: digits, split: test, limit: 50}
passes:
  - kind: export
  - kind: quantize
    max_top1_drop: 1.0
    fallback_time_limit_s: 5
"""
    with pytest.raises(BudgetExceededError, match="top-1 drop 10.00 points > max_top1_drop 1"):
        run_recipe(parse_recipe(text), tmp_path / "run")
    assert (tmp_path / "run" / "model.int8.onnx").is_file()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["budgets"]["passed"] is False
    del trained_onnx


def test_quantize_command(cli, trained_onnx, tmp_path):
    path, _, _ = trained_onnx
    result = cli("quantize", path, "--out", tmp_path / "c.onnx", "--preset", "cpu-x86-vnni", "--data", "digits",
                 "--eval-data", "digits:test", "--threads", "1", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sum(data["quantized_counts"].values()) > 0 and data["agreement"]["top1_agreement"] >= 0.95
    assert data["auto"]["chosen"] in ("static", "dynamic") and data["auto"]["threads"] == 1
    static = cli("quantize", path, "--out", tmp_path / "s.onnx", "--mode", "static", "--data", "digits")
    assert static.exit_code == 0 and "QuantizeLinear" in static.stdout
    assert data["settings"]["reduce_range"] is False and data["size_bytes"] < data["float_size_bytes"]
    evaluated = cli("eval", tmp_path / "c.onnx", "--data", "digits:test", "--json")
    assert evaluated.exit_code == 0 and json.loads(evaluated.stdout)["top1"] > 0.8
    again = cli("quantize", tmp_path / "c.onnx", "--out", tmp_path / "d.onnx", "--mode", "dynamic")
    assert again.exit_code == 2 and "already quantized" in again.stderr
    no_data = cli("quantize", path, "--out", tmp_path / "e.onnx")
    assert no_data.exit_code == 2 and "quantization needs --data" in no_data.stderr


def test_matmul_outputs_stay_float_unless_asked(trained_onnx, tmp_path):
    path, calibration, _ = trained_onnx

    def quantized_matmul_outputs(file: Path) -> int:
        model = onnx.load(str(file))
        matmul_outputs = {o for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for o in n.output}
        return sum(
            1 for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in matmul_outputs
        )

    quantize_file(path, tmp_path / "default.onnx", QuantizeConfig(), calibration)
    quantize_file(path, tmp_path / "outputs.onnx", QuantizeConfig(quantize_outputs=True), calibration)
    assert quantized_matmul_outputs(tmp_path / "default.onnx") == 0
    assert quantized_matmul_outputs(tmp_path / "outputs.onnx") == len(
        q.quantizable_nodes(path, QuantizeConfig())
    )


def _activation_scales(path: Path) -> dict[str, float]:
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_strided_calibration_gives_the_ranges_of_one_pass(trained_onnx, tmp_path):
    """Calibration runs one small batch at a time (bounded memory); min/max merge across batches
    exactly, so the activation scales equal those of one batch holding every image."""
    path, calibration, _ = trained_onnx
    quantize_file(path, tmp_path / "strided.onnx", QuantizeConfig(calibration_batch=4), calibration)
    quantize_file(path, tmp_path / "whole.onnx", QuantizeConfig(calibration_batch=128), calibration)
    strided, whole = (
        _activation_scales(tmp_path / "strided.onnx"),
        _activation_scales(tmp_path / "whole.onnx"),
    )
    assert strided.keys() == whole.keys() and len(strided) > 0
    assert all(abs(strided[k] - whole[k]) <= 1e-6 * abs(whole[k]) for k in whole)


def test_dataset_reader_serves_ranges_for_strided_calibration(trained_onnx):
    _, calibration, _ = trained_onnx
    reader = q.DatasetReader(calibration, "input", 32)
    assert len(reader) == 4  # 128 images
    reader.set_range(start_index=1, end_index=3)
    served = []
    while (item := reader.get_next()) is not None:
        served.append(item["input"])
    assert len(served) == 2 and np.array_equal(served[0], reader.batches[1])
    reader.rewind()
    assert sum(1 for _ in iter(reader.get_next, None)) == 4


def test_auto_mode_builds_both_int8_forms_and_keeps_the_faster(trained_onnx, tmp_path):
    path, calibration, test = trained_onnx
    out = tmp_path / "auto.int8.onnx"
    details = q.quantize_model(
        path, out, QuantizeConfig(preset="cpu-x86-vnni", max_top1_drop=2.0), calibration, test, 1
    )
    auto = details["auto"]
    assert set(auto["p50_ms"]) == {"static", "dynamic"} and all(t > 0 for t in auto["p50_ms"].values())
    assert auto["chosen"] == min(auto["p50_ms"], key=auto["p50_ms"].get)  # both meet a 2-point gate here
    assert details["gate"]["met"] and details["agreement"]["top1_agreement"] >= 0.95
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("DynamicQuantizeLinear" in ops) == (auto["chosen"] == "dynamic")
    assert [p.name for p in tmp_path.iterdir()] == ["auto.int8.onnx"]  # the other candidate is gone
    with pytest.raises(QuantizeError, match="mode auto is resolved by quantize_model"):
        quantize_file(path, tmp_path / "x.onnx", QuantizeConfig(mode="auto"), calibration)


def test_the_gate_and_validate_score_a_dynamic_int8_file_alike(trained_onnx, tmp_path):
    """One protocol per run: dynamic INT8 scales activations per batch, so the gate (quantize row)
    and validate (validate row) must batch alike or one report shows two top-1s for one file."""
    from vitcompress.accuracy import evaluate_onnx

    path, _, test = trained_onnx
    target = tmp_path / "dyn.onnx"
    details = q.quantize_model(path, target, QuantizeConfig(mode="dynamic", max_top1_drop=100), None, test)
    validated = evaluate_onnx(target, test)
    assert details["agreement"]["samples"] == validated.samples == len(test)
    assert details["agreement"]["quantized_top1"] == validated.top1
