"""INT8 for OpenVINO: NNCF (with its accuracy control on the same max_top1_drop gate) against
vitcompress's QDQ file run by OpenVINO, the faster kept; and the cpu-arm64 preset's .ort file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import tiny_ref
from vitcompress.models import load_model
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.passes.quantize import QuantizeConfig
from vitcompress.runtimes import open_runner


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("quantize_ov")
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    return export_model(loaded, directory / "m.onnx", ExportConfig()).path


RECIPE = """
version: 1
model: {source: timm:vit_tiny_patch16_224, num_classes: 10, img_size: 32, kwargs: {depth: 2, patch_size: 8}}
target: {runtime: openvino, threads: 1, precision: int8}
data:
  eval: {source: digits, split: test, limit: 32}
  calibration: {source: digits, split: train, limit: 8}
passes:
  - kind: export
  - kind: quantize
    preset: cpu-x86-openvino-int8
    calibration_size: 8
    max_top1_drop: 5
  - kind: validate
    runs: 5
    warmup: 1
    sanity: false
"""


def test_openvino_target_builds_nncf_and_qdq_keeps_the_faster_and_validates_there(cli, tmp_path):
    recipe = tmp_path / "ov.yaml"
    recipe.write_text(RECIPE)
    result = cli("compress", "--recipe", recipe, "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    export, quantize, validate = (
        next(r for r in report["ledger"] if r["kind"] == k) for k in ("export", "quantize", "validate")
    )
    assert export["details"]["openvino"]["ir"].endswith("model.xml")
    details = quantize["details"]
    auto = details["auto"]
    assert set(auto["p50_ms"]) == {"nncf", "qdq"} and all(ms > 0 for ms in auto["p50_ms"].values())
    assert auto["chosen"] in ("nncf", "qdq") and auto["threads"] == 1
    candidates = auto["candidates"]
    assert candidates["nncf"]["method"] == "nncf.quantize_with_accuracy_control"  # the gate drives NNCF
    assert candidates["qdq"]["method"].startswith("vitcompress static QDQ")
    for candidate in candidates.values():
        assert candidate["quantized_counts"]["FakeQuantize"] > 0
        gate, measured = candidate["gate"], candidate["agreement"]
        # one gate for both: the IR on OpenVINO against the float ONNX on ORT, same 32 images
        assert measured["samples"] == 32
        assert gate["drop_points"] == pytest.approx(
            100 * (measured["float_top1"] - measured["quantized_top1"])
        )
        assert gate["met"] == (gate["drop_points"] <= 5)
    assert details["settings"]["runtime"] == "openvino" and details["runtime"]["runtime"] == "openvino"
    final = Path(quantize["artifact"])
    assert final.name == "model.int8.xml" and final.with_suffix(".bin").is_file()
    assert not list(final.parent.glob(".quantize-auto-*"))  # no scratch left
    # validate: budgets on OpenVINO, the fp32 baseline on ORT, the record says what ran
    runner = validate["details"]["runner"]
    assert (runner["runtime"], runner["threads"]) == ("openvino", 1) and runner["precision"].startswith(
        "int8+"
    )
    assert validate["details"]["budget_runtime"] == "openvino"
    assert validate["details"]["fastest_runtime"] == "openvino"  # an IR runs on OpenVINO only
    bench = validate["details"]["bench"]["results"]
    assert [(Path(r["model"]).name, r["runtime"]) for r in bench] == [
        ("model.onnx", "ort"),
        ("model.int8.xml", "openvino"),
    ]
    assert validate["top1"] == pytest.approx(candidates[auto["chosen"]]["agreement"]["quantized_top1"])
    assert open_runner(final, threads=1).metadata()["num_classes"] == 10  # the ONNX file's metadata travelled


def test_openvino_settings_that_cannot_work_are_refused(fp32, cli):
    with pytest.raises(ValidationError, match="runtime openvino quantizes for the CPU with calibration"):
        QuantizeConfig(runtime="openvino", mode="dynamic")
    assert QuantizeConfig(preset="cpu-x86-openvino-int8").filename == "model.int8.xml"
    result = cli(
        "quantize", fp32, "--out", fp32.parent / "q.onnx", "--runtime", "openvino", "--data", "digits"
    )
    assert result.exit_code == 2 and "must end in .xml (runtime openvino)" in result.output


def test_arm64_preset_also_writes_the_ort_mobile_file(fp32, cli, tmp_path):
    out = tmp_path / "arm.onnx"
    result = cli("quantize", fp32, "--out", out, "--preset", "cpu-arm64", "--mode", "dynamic", "--json")
    assert result.exit_code == 0, result.output
    details = json.loads(result.stdout)
    assert details["runtime"]["runtime"] == "ort" and details["runtime"]["precision"] == "int8"
    mobile = details["ort_mobile"]
    assert mobile["path"] == str(out.with_suffix(".ort")) and out.with_suffix(".ort").is_file()
    assert mobile["parity"]["runner"]["precision"] == "int8"
    assert mobile["parity"]["max_abs_diff"] <= mobile["parity"]["allowed_max_abs_diff"]
    assert "NNAPI" in mobile["details"]["mobile_usability"]
