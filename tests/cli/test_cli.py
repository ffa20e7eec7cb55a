"""The real commands through CliRunner: exit codes, messages, JSON; start-up stays light."""

from __future__ import annotations

import json
import subprocess
import sys

from safetensors.torch import save_file

from tests.conftest import tiny_ref
from vitcompress.models import load_model

TINY = ["timm:vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10"]


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys, vitcompress.cli; print(sorted(m for m in ('torch', 'timm', 'onnxruntime', 'onnx') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "vitcompress", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.startswith("vitcompress 0.")


def test_inspect_json_numbers(cli):
    result = cli("inspect", *TINY, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["family"] == "timm-vit"
    assert data["input_shape"] == [3, 32, 32]
    assert len(data["blocks"]) == 12
    assert {b["num_heads"] for b in data["blocks"]} == {3}
    assert data["macs"] == sum(b["macs"] for b in data["blocks"]) + 4 * 3 * 16 * 16 * 192 + 10 * 192
    table = cli("inspect", *TINY)
    assert table.exit_code == 0
    assert "total" in table.stdout and "timm-vit" in table.stdout


def test_inspect_checkpoint_and_hf(cli, tmp_path, hf_deit_dir):
    loaded = load_model(
        tiny_ref("timm:vit_tiny_patch16_224", num_classes=5, kwargs={"depth": 2, "patch_size": 16})
    )
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(path))
    result = cli("inspect", "timm:vit_tiny_patch16_224", "--checkpoint", path, "--img-size", "32", "--json")
    assert result.exit_code == 2  # a depth-2 checkpoint vs the 12-block constructor: keys listed
    assert "missing (" in result.stderr and "blocks.2." in result.stderr
    hf = cli("inspect", f"hf:{hf_deit_dir}", "--json")
    assert hf.exit_code == 0, hf.output
    assert json.loads(hf.stdout)["num_classes"] == 10


def test_export_command_reports_parity(cli, tmp_path):
    out = tmp_path / "m.onnx"
    result = cli("export", *TINY, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["parity"]["max_abs_diff"] < 1e-4
    assert data["parity"]["top1_agreement"] == 1.0
    assert data["batch_sizes_checked"] == [1, 8]
    assert out.is_file() and data["size_bytes"] == out.stat().st_size
    human = cli("export", *TINY, "--out", tmp_path / "h.onnx")
    assert "parity vs PyTorch on 8 images" in human.stdout and "top-1 agreement 100.0%" in human.stdout


def test_export_parity_failure_exits_4(cli, tmp_path):
    result = cli("export", *TINY, "--out", tmp_path / "m.onnx", "--atol", "1e-12", "--rtol", "0")
    assert result.exit_code == 4
    assert "does not match PyTorch" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_bad_input_is_one_line_exit_2_no_traceback(cli, tmp_path):
    evil = tmp_path / "evil.pth"
    canary = tmp_path / "canary"
    import os

    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    torch.save({"model": {}, "x": Payload()}, evil)
    cases = {
        ("inspect", "timm:deit_smal_patch16_224"): "did you mean 'deit_small_patch16_224'",
        ("inspect", "timm:vit_tiny_patch16_224", "--checkpoint", str(evil)): "refusing to load",
        ("inspect", str(tmp_path / "missing")): "not found",
        ("export", *TINY, "--out", str(tmp_path / "m.onnx"), "--opset", "11"): "--opset: opset 11 is too old",
        ("export", *TINY, "--out", str(tmp_path / "m.txt")): "must end in .onnx",
        ("compress", "--recipe", str(tmp_path / "none.yaml"), "--out", str(tmp_path)): "does not exist",
    }
    for args, message in cases.items():
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output
    assert not canary.exists()


def test_debug_flag_shows_the_traceback(cli):
    result = cli("--debug", "inspect", "timm:deit_smal_patch16_224")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "ModelNotFoundError" in result.stderr


def test_unexpected_errors_exit_1_with_hint(cli, monkeypatch):
    import vitcompress.models.stats as stats

    def boom(_loaded):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(stats, "model_stats", boom)
    result = cli("inspect", *TINY)
    assert result.exit_code == 1
    assert "internal error: RuntimeError: kaboom" in result.stderr
    assert "--debug" in result.stderr


def test_full_or_read_only_disk_is_a_user_error_other_os_errors_are_bugs(cli, monkeypatch):
    import errno

    import vitcompress.models.stats as stats

    def wrapped(_loaded):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("writer failed") from err  # a library wrapping the OS error

    monkeypatch.setattr(stats, "model_stats", wrapped)
    full = cli("inspect", *TINY)
    assert full.exit_code == 2, full.output
    assert "disk full" in full.stderr and "free space or choose another --out" in full.stderr

    def read_only(_loaded):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/report.json")

    monkeypatch.setattr(stats, "model_stats", read_only)
    ro = cli("inspect", *TINY)
    assert ro.exit_code == 2
    assert "not writable while writing /mnt/ro/report.json" in ro.stderr

    def missing(_loaded):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere")

    monkeypatch.setattr(stats, "model_stats", missing)
    bug = cli("inspect", *TINY)
    assert bug.exit_code == 1
    assert "internal error: FileNotFoundError" in bug.stderr
