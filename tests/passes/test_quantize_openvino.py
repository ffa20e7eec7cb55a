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


def test_openvino_preset_builds_nncf_and_qdq_and_keeps_the_faster(fp32, cli):
    out = fp32.parent / "q.xml"
    result = cli(
        "quantize", fp32, "--out", out, "--preset", "cpu-x86-openvino-int8", "--data", "digits:train",
        "--calibration-size", "16", "--eval-data", "digits:test", "--eval-limit", "64",
        "--max-top1-drop", "5", "--threads", "1", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    details = json.loads(result.stdout)
    auto = details["auto"]
    assert set(auto["p50_ms"]) == {"nncf", "qdq"} and all(ms > 0 for ms in auto["p50_ms"].values())
    assert auto["chosen"] in ("nncf", "qdq")
    candidates = auto["candidates"]
    assert candidates["nncf"]["method"] == "nncf.quantize_with_accuracy_control"  # the gate drives NNCF
    assert candidates["qdq"]["method"].startswith("vitcompress static QDQ")
    for candidate in candidates.values():
        assert candidate["quantized_counts"]["FakeQuantize"] > 0
        gate, measured = candidate["gate"], candidate["agreement"]
        # one gate for both: the IR on OpenVINO against the float ONNX on ORT, same 64 images
        assert measured["samples"] == 64
        assert gate["drop_points"] == pytest.approx(
            100 * (measured["float_top1"] - measured["quantized_top1"])
        )
        assert gate["met"] == (gate["drop_points"] <= 5)
    assert details["settings"]["runtime"] == "openvino" and details["settings"]["mode"] == "auto"
    assert details["runtime"]["runtime"] == "openvino"
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["m.onnx", "q.bin", "q.xml"]  # no scratch left
    runner = open_runner(out, threads=1)
    assert runner.info.precision.startswith("int8+")
    assert runner.metadata()["num_classes"] == 10  # the ONNX file's metadata travelled


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
    mobile = json.loads(result.stdout)["ort_mobile"]
    assert mobile["path"] == str(out.with_suffix(".ort")) and out.with_suffix(".ort").is_file()
    assert mobile["parity"]["runner"]["precision"] == "int8"
    assert mobile["parity"]["max_abs_diff"] <= mobile["parity"]["allowed_max_abs_diff"]
    assert "NNAPI" in mobile["details"]["mobile_usability"]
