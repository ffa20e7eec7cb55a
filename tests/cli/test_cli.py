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
    assert result.exit_code == 0, result.output  # depth and patch size read from the checkpoint
    data = json.loads(result.stdout)
    assert len(data["blocks"]) == 2 and data["num_classes"] == 5 and data["input_shape"] == [3, 32, 32]
    settings = {s["setting"]: s for s in data["settings"]}
    assert settings["depth"] == {
        "setting": "depth",
        "value": 2,
        "source": "checkpoint blocks.1.norm1.weight (192,)",
    }
    assert settings["img_size"] == {"setting": "img_size", "value": 32, "source": "--img-size"}
    conflict = cli(
        "inspect", "timm:vit_tiny_patch16_224", "--checkpoint", path, "--model-kwargs", "depth=12", "--json"
    )
    assert conflict.exit_code == 2  # an explicit depth the checkpoint contradicts: tensor and flag named
    assert "blocks.2.norm1.weight is absent from the checkpoint" in conflict.stderr
    assert "depth=12 expects (192,)" in conflict.stderr and "--model-kwargs depth=12" in conflict.stderr
    hf = cli("inspect", f"hf:{hf_deit_dir}", "--json")
    assert hf.exit_code == 0, hf.output
    assert json.loads(hf.stdout)["num_classes"] == 10
    assert {"setting": "num_heads", "value": 4, "source": "config.json num_attention_heads"} in json.loads(
        hf.stdout
    )["settings"]


def test_inspect_prints_what_was_inferred_and_from_where(cli, tmp_path):
    import timm
    import torch

    torch.manual_seed(0)
    original = timm.create_model(
        "vit_base_patch16_224",
        embed_dim=96,
        depth=3,
        num_heads=4,
        patch_size=8,
        img_size=48,
        qkv_bias=False,
        num_classes=7,
    ).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    args = ("timm:vit_base_patch16_224", "--checkpoint", path, "--num-heads", "4")
    result = cli("inspect", *args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["input_shape"] == [3, 48, 48] and data["embed_dim"] == 96 and len(data["blocks"]) == 3
    assert {b["num_heads"] for b in data["blocks"]} == {4}
    settings = {s["setting"]: (s["value"], s["source"]) for s in data["settings"]}
    assert settings["patch_size"] == (8, "checkpoint patch_embed.proj.weight (96, 3, 8, 8)")
    assert settings["qkv_bias"] == (False, "checkpoint: no blocks.0.attn.qkv.bias")
    assert settings["num_heads"] == (4, "--num-heads")
    assert settings["img_size"] == (48, "checkpoint pos_embed (1, 37, 96), 6x6 patches of 8 px")
    table = cli("inspect", *args)
    assert table.exit_code == 0, table.output
    assert "architecture: what was inferred and from where" in table.stdout
    for needle in ("patch_size", "checkpoint patch_embed.proj.weight", "--num-heads", "qkv_bias"):
        assert needle in table.stdout, needle
    guessed = cli("inspect", "timm:vit_base_patch16_224", "--checkpoint", path, "--json")
    assert guessed.exit_code == 0
    assert "WARNING" in guessed.stderr and "num_heads=2 is a GUESS" in guessed.stderr
    wrong = cli("inspect", *args, "--model-kwargs", "patch_size=16")
    assert wrong.exit_code == 2
    assert "patch_embed.proj.weight is (96, 3, 8, 8) in the checkpoint" in wrong.stderr
    assert "(96, 3, 16, 16)" in wrong.stderr and "--model-kwargs patch_size=16" in wrong.stderr


def test_every_model_command_takes_model_kwargs_and_num_heads(cli):
    for command in ("inspect", "export", "eval", "prune", "factorize", "tokens", "distill"):
        result = cli(command, "--help")
        assert result.exit_code == 0
        assert "--model-kwargs" in result.stdout and "--num-heads" in result.stdout, command


def test_model_kwargs_values_are_yaml_and_bad_ones_exit_2(cli):
    from vitcompress.cli.common import parse_model_kwargs

    assert parse_model_kwargs(["depth=2", "qkv_bias=false", "init_values=1e-5", "global_pool=avg"], 4) == {
        "depth": 2,
        "qkv_bias": False,
        "init_values": 1e-5,
        "global_pool": "avg",
        "num_heads": 4,
    }
    for bad, message in (
        ("depth", "--model-kwargs: 'depth' is not KEY=VALUE"),
        ("a.b=1", "is not KEY=VALUE"),
        ("x={a: 1}", "give a scalar or a flat list"),
    ):
        result = cli("inspect", *TINY, "--model-kwargs", bad)
        assert result.exit_code == 2 and message in result.stderr, (bad, result.output)
    clash = cli("inspect", *TINY, "--model-kwargs", "num_heads=2", "--num-heads", "3")
    assert clash.exit_code == 2 and "--num-heads 3 and --model-kwargs num_heads=2 disagree" in clash.stderr


def test_pass_commands_carry_model_kwargs_into_the_recipe(cli, tmp_path):
    import timm
    import torch
    import yaml

    torch.manual_seed(0)
    original = timm.create_model(
        "vit_base_patch16_224", embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=16, num_classes=3
    ).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    out = tmp_path / "pruned"
    args = (
        "timm:vit_base_patch16_224",
        "--checkpoint",
        path,
        "--num-heads",
        "2",
        "--model-kwargs",
        "depth=2",
    )
    result = cli("prune", *args, "--mlp", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["model"]["kwargs"] == {"num_heads": 2, "depth": 2}
    pruned = load_model(tiny_ref(str(out), num_classes=None, img_size=None, kwargs={}))
    assert pruned.adapter.structure()[0] == {
        "num_heads": 2,
        "head_dim": 32,
        "attn_dim": 64,
        "mlp_hidden": 128,
    }
    assert pruned.input.shape == (3, 16, 16) and pruned.num_classes == 3


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
