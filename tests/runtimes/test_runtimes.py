"""Runtimes behind one interface: OpenVINO IR export and parity, runners on every runtime, mixed-runtime
bench, eval on OpenVINO, bad model files and precisions (exit 2), TensorRT without a GPU, ORT mobile."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_ref
from vitcompress.errors import InputShapeError, PrecisionUnavailableError, RuntimeModelError
from vitcompress.models import load_model
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.runtimes import Precision, Runtime, open_runner, runtime_for
from vitcompress.runtimes.base import cpu_flags

HAS_BF16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ViT exported to ONNX and OpenVINO IR in one export (parity-checked both ways)."""
    directory = tmp_path_factory.mktemp("runtimes")
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    result = export_model(loaded, directory / "m.onnx", ExportConfig(runtime="openvino"), classes=None)
    return loaded, result


def _one_line_exit_2(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result.stderr


def test_export_writes_ir_checked_against_pytorch_under_each_precision(exported):
    _, result = exported
    assert result.ir_path == result.path.with_suffix(".xml")
    assert result.ir_path.is_file() and result.ir_path.with_suffix(".bin").is_file()
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["m.bin", "m.onnx", "m.xml"]
    parity = result.ir_parity
    assert parity is not None
    fp32 = parity["fp32"]
    assert fp32["max_abs_diff"] < 1e-4 and fp32["top1_agreement"] == 1.0
    assert fp32["tolerance"] == {"atol": 1e-4, "rtol": 1e-4, "min_top1_agreement": 1.0}
    assert fp32["runner"]["runtime"] == "openvino" and fp32["runner"]["precision"] == "fp32"
    if HAS_BF16:  # OpenVINO's default on this CPU: checked with the looser, stated tolerance
        bf16 = parity["bf16"]
        assert bf16["runner"]["precision"] == "bf16"
        assert bf16["tolerance"] == {"atol": 1e-2, "rtol": 5e-2, "min_top1_agreement": 0.75}
        assert fp32["max_abs_diff"] < bf16["max_abs_diff"] <= bf16["allowed_max_abs_diff"]
    # the same metadata as the ONNX file, plus the precision hint
    from vitcompress.accuracy import onnx_metadata

    onnx_meta, ir_meta = onnx_metadata(result.path), onnx_metadata(result.ir_path)
    assert ir_meta is not None and onnx_meta is not None
    assert ir_meta["input"] == onnx_meta["input"] and ir_meta["num_classes"] == 10
    assert ir_meta["precision_hint"] == ("bf16" if HAS_BF16 else "fp32")


def test_runners_on_every_runtime_agree_and_say_what_ran(exported):
    loaded, result = exported
    x = loaded.example_input(3, seed=7)
    with torch.no_grad():
        expected = loaded.model(x).numpy()
    ort = open_runner(result.path, threads=1)
    ov32 = open_runner(result.ir_path, precision=Precision.fp32, threads=1)
    ov_onnx = open_runner(result.path, Runtime.openvino, precision=Precision.fp32, threads=1)
    for runner in (ort, ov32, ov_onnx):
        out = runner.run(x.numpy())
        assert out.shape == (3, 10)
        assert np.abs(out - expected).max() < 1e-4
        assert runner.metadata()["num_classes"] == 10
    assert (ort.info.runtime, ort.info.precision, ort.info.threads) == ("ort", "fp32", 1)
    assert ov32.info.runtime == "openvino" and ov32.info.version.startswith("20")
    assert ov32.info.precision == "fp32"
    # no precision asked: the hint recorded with the IR
    recorded = open_runner(result.ir_path, threads=1)
    assert recorded.info.precision == ("bf16" if HAS_BF16 else "fp32")
    # OpenVINO reuses its output buffer: results handed out must not change on the next call
    first = ov32.run(x.numpy())
    ov32.run(loaded.example_input(3, seed=8).numpy())
    assert np.array_equal(first, ov32.run(x.numpy()))
    with pytest.raises(InputShapeError, match="expected 32x32 input"):
        ov32.run(np.zeros((1, 3, 16, 16), np.float32))
    assert runtime_for(Path("a.engine")) is Runtime.tensorrt
    with pytest.raises(RuntimeModelError, match="no runtime opens '.txt'"):
        runtime_for(Path("model.txt"))
    with pytest.raises(PrecisionUnavailableError, match="own precision, fp32"):
        open_runner(result.path, precision=Precision.bf16)


def test_bench_times_files_of_different_runtimes_in_one_run(exported, cli):
    _, result = exported
    out = cli(
        "bench", result.path, result.ir_path, "--threads", "1", "--runs", "5", "--warmup", "1", "--json"
    )
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)["results"]
    assert [(Path(r["model"]).name, r["runtime"]) for r in rows] == [("m.onnx", "ort"), ("m.xml", "openvino")]
    assert rows[0]["runtime_version"] and rows[1]["runtime_version"].startswith("20")
    assert rows[0]["precision"] == "fp32" and rows[1]["precision"] == ("bf16" if HAS_BF16 else "fp32")
    assert {r["threads"] for r in rows} == {1} and rows[0]["speedup_vs_first"] == 1.0
    # one file on two runtimes, the precision hint pinned
    out = cli(
        "bench", result.path, "-r", "ort", "-r", "openvino", "--precision", "fp32",
        "--threads", "1", "--runs", "5", "--warmup", "1", "-b", "1", "-b", "2", "--json",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert [(r["runtime"], r["batch_size"], r["precision"]) for r in data["results"]] == [
        ("ort", 1, "fp32"),
        ("openvino", 1, "fp32"),
        ("ort", 2, "fp32"),
        ("openvino", 2, "fp32"),
    ]
    assert data["gate"]["runtime"] == "openvino" and data["settings"]["precision"] == "fp32"
    # an IR cannot run on ONNX Runtime
    _one_line_exit_2(cli("bench", result.ir_path, "-r", "ort"), "none of the runtimes", "run on openvino")


def test_eval_on_openvino_matches_onnx_runtime(exported, cli):
    _, result = exported
    scores = {}
    for args in (
        [result.path],
        [result.ir_path, "--precision", "fp32"],
        [result.path, "--runtime", "openvino", "--precision", "fp32"],
    ):
        out = cli(
            "eval",
            *args,
            "--data",
            "digits:test",
            "--data-limit",
            "64",
            "--threads",
            "1",
            "--no-sanity",
            "--json",
        )
        assert out.exit_code == 0, out.output
        data = json.loads(out.stdout)
        scores[(data["runtime"], data["precision"])] = (data["top1"], data["loss"])
    assert set(scores) == {("onnxruntime-cpu", "fp32"), ("openvino-cpu", "fp32")}
    (top1_ort, loss_ort), (top1_ov, loss_ov) = scores.values()
    assert top1_ort == top1_ov and abs(loss_ort - loss_ov) < 1e-5


def test_bad_model_files_and_precisions_exit_2(exported, cli, tmp_path, monkeypatch):
    _, result = exported
    # an IR without its weights
    lonely = tmp_path / "lonely.xml"
    shutil.copyfile(result.ir_path, lonely)
    _one_line_exit_2(cli("bench", lonely), "no weights file lonely.bin", "copy the .bin")
    # an IR from an incompatible OpenVINO (an IR version this one does not read)
    old = tmp_path / "old.xml"
    text = result.ir_path.read_text()
    old.write_text(text.replace('version="11"', 'version="3"', 1))
    shutil.copyfile(result.ir_path.with_suffix(".bin"), old.with_suffix(".bin"))
    assert 'version="3"' in old.read_text()
    _one_line_exit_2(
        cli("eval", old, "--data", "digits:test"), "cannot read", "incompatible OpenVINO version"
    )
    # a precision this CPU lacks: bf16 without AVX512_BF16/AMX
    monkeypatch.setattr("vitcompress.runtimes.base.cpu_flags", lambda: {"avx2", "avx512f"})
    _one_line_exit_2(
        cli("bench", result.ir_path, "--precision", "bf16", "--runs", "5"),
        "bf16 needs a CPU with AVX512_BF16 or AMX_BF16",
        "--precision fp32",
    )
    # TensorRT: not installed / no GPU here
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 64)
    for args in (
        ("bench", engine),
        ("convert", result.path, "--to", "tensorrt", "--out", tmp_path / "x.engine"),
    ):
        _one_line_exit_2(cli(*args), "TensorRT", "NVIDIA GPU")
    assert not (tmp_path / "x.engine").exists()
    # a runtime is for model files: a PyTorch model is evaluated in PyTorch
    torch_model = cli("eval", "timm:vit_tiny_patch16_224", "--data", "digits", "--runtime", "openvino")
    assert torch_model.exit_code == 2 and "apply to model files" in torch_model.output


def test_ort_mobile_format_runs_with_parity_and_usability(exported, cli, tmp_path):
    _, result = exported
    out = cli("convert", result.path, "--to", "ort-mobile", "--out", tmp_path / "m.ort", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["runner"]["runtime"] == "ort" and data["runner"]["precision"] == "fp32"
    assert data["parity"]["max_abs_diff"] < 1e-4 and data["parity"]["top1_agreement"] == 1.0
    assert set(data["details"]["mobile_usability"]) == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}
    assert set(data["details"]["mobile_usability"].values()) <= {"YES", "MAYBE", "NO"}
    runner = open_runner(tmp_path / "m.ort")
    assert runner.metadata()["num_classes"] == 10
    _one_line_exit_2(
        cli("convert", result.path, "--to", "ort-mobile", "--out", tmp_path / "m.xml"), "writes .ort files"
    )


def test_engine_for_another_gpu_or_tensorrt_version_exits_2(tmp_path, cli, monkeypatch):
    """TensorRT refuses an engine built elsewhere by returning None; that becomes a clear error.
    (No GPU here: a stand-in tensorrt module and a CUDA that says it is there.)"""
    import sys
    import types

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.9.0"

    class Logger:
        ERROR = WARNING = 0

        def __init__(self, level: int) -> None:
            pass

    class TrtRuntime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, blob: bytes) -> None:
            return None  # what TensorRT does with an engine of another GPU model or version

    fake.Logger, fake.Runtime = Logger, TrtRuntime
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    engine = tmp_path / "other-gpu.engine"
    engine.write_bytes(b"not for this GPU")
    _one_line_exit_2(
        cli("bench", engine, "--runs", "5"),
        "TensorRT 10.9.0 cannot load",
        "NVIDIA H200",
        "vitcompress convert model.onnx --to tensorrt",
    )
