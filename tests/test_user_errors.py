"""User mistakes and broken inputs exit 2 with one line naming the file, the bad value and the fix.

Each case here used to end as an internal error (exit 1), a MemoryError, or a misleading message.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_ref
from vitcompress.models import load_model

TINY = ["timm:vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10"]


class RunConfig:
    """A custom class a training script pickles beside its weights."""

    def __init__(self) -> None:
        self.epochs = 3


def _weights(source: str = "timm:vit_tiny_patch16_224", **overrides) -> dict[str, torch.Tensor]:
    loaded = load_model(tiny_ref(source, **overrides))
    return {k: v.contiguous() for k, v in loaded.model.state_dict().items()}


def _one_line_exit_2(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    return result.stderr


# --------------------------------------------------------------------------- 1. refused pickles


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_with_a_custom_class_is_refused_for_safety(cli, tmp_path, protocol):
    path = tmp_path / "train.pth"
    torch.save({"model": _weights(), "cfg": RunConfig()}, path, pickle_protocol=protocol)
    result = cli("inspect", *TINY, "--checkpoint", path)
    stderr = _one_line_exit_2(
        result,
        "refusing to load",
        "for safety",
        "RunConfig",
        "weights_only=False",
        "safetensors.torch.save_file",
        "--trust-checkpoint",
    )
    assert "corrupt" not in stderr and "Unsupported operand" not in stderr and "re-download" not in stderr
    assert "UserWarning" not in result.output and "Warning" not in result.output


def test_trusted_custom_class_checkpoint_loads(cli, tmp_path):
    path = tmp_path / "train.pth"
    weights = _weights(kwargs={"depth": 12, "patch_size": 16})
    torch.save({"model": weights, "cfg": RunConfig()}, path, pickle_protocol=4)
    result = cli("inspect", *TINY, "--checkpoint", path, "--trust-checkpoint", "--json")
    assert result.exit_code == 0, result.output
    assert "UserWarning" not in result.output


def test_truncated_and_html_pth_stay_corrupt(cli, tmp_path):
    good = pickle.dumps({"model": _weights(), "cfg": RunConfig()}, protocol=5)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good[: len(good) // 2])
    page = tmp_path / "page.pth"
    page.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    for path in (cut, page):
        _one_line_exit_2(cli("inspect", *TINY, "--checkpoint", path), "corrupt or incomplete", str(path.name))


# --------------------------------------------------------------------------- 2. safetensors by content


def test_safetensors_named_pth_loads_as_safetensors(cli, tmp_path):
    path = tmp_path / "weights.pth"
    save_file(_weights(kwargs={"depth": 12, "patch_size": 16}), str(path))
    result = cli("inspect", *TINY, "--checkpoint", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_classes"] == 10


# --------------------------------------------------------------------------- 3. architecture mismatch


def test_checkpoint_for_224_into_an_input_smaller_than_a_patch(cli, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_weights(img_size=224, kwargs={"depth": 2}), str(path))
    result = cli("inspect", "timm:vit_tiny_patch16_224", "--checkpoint", path, "--img-size", "8")
    _one_line_exit_2(result, "empty 0x0 patch grid", "16x16", "--img-size of at least 16")


def test_patch_size_mismatch_names_the_tensor_and_patch_size(cli, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_weights(), str(path))  # 8x8 patches: read from the checkpoint, unless a flag contradicts it
    assert cli("inspect", *TINY, "--checkpoint", path).exit_code == 0
    result = cli("inspect", *TINY, "--checkpoint", path, "--model-kwargs", "patch_size=16")
    _one_line_exit_2(
        result,
        "patch_embed.proj.weight",
        "(192, 3, 8, 8)",
        "(192, 3, 16, 16)",
        "patch_size=16",
        "set it to 8",
    )


def test_embed_dim_mismatch_names_the_tensor_and_widths(cli, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_weights("timm:vit_small_patch16_224", kwargs={"depth": 2, "patch_size": 16}), str(path))
    result = cli("inspect", *TINY, "--checkpoint", path, "--model-kwargs", "embed_dim=192")
    _one_line_exit_2(
        result,
        "patch_embed.proj.weight",
        "(384, 3, 16, 16)",
        "(192, 3, 16, 16)",
        "embed_dim=192",
        "set it to 384",
    )


def test_plain_vit_checkpoint_into_distilled_deit(cli, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_weights(img_size=16, kwargs={"depth": 2, "patch_size": 16}), str(path))  # one patch
    result = cli("inspect", "timm:deit_tiny_distilled_patch16_224", "--checkpoint", path)
    _one_line_exit_2(result, "pos_embed", "(1, 2, 192)", "(1, 3, 192)", "dist_token", "deit_*_distilled_*")


# --------------------------------------------------------------------------- 4. absurd ONNX inputs


def _tiny_onnx(path: Path, dims: list, height: int = 32) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    node = helper.make_node("ReduceMean", ["x"], ["logits"], axes=[2, 3], keepdims=0)
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    meta = model.metadata_props.add()
    meta.key = "vitcompress.input"
    meta.value = json.dumps(
        {
            "input": {
                "channels": 3,
                "height": height,
                "width": height,
                "mean": [0.5] * 3,
                "std": [0.5] * 3,
                "interpolation": "bilinear",
            },
            "num_classes": 3,
        }
    )
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("dims", "needles"),
    [
        (["batch", 3, 100000, 100000], ["batchx3x100000x100000", "values per image", "not runnable"]),
        ([1, 3, 100000, 100000], ["1x3x100000x100000", "not runnable"]),
        (["batch", 3, 0, 32], ["batchx3x0x32", "dimension 2 is 0", "cannot be run"]),
        (["batch", 3, -1, 32], ["batchx3x-1x32", "dimension 2 is -1", "cannot be run"]),
    ],
    ids=["huge", "huge-fixed-batch", "zero", "negative"],
)
def test_onnx_with_an_unrunnable_declared_input(cli, tmp_path, dims, needles):
    path = _tiny_onnx(tmp_path / "m.onnx", dims)
    bench = cli("bench", path, "--runs", "5", "--warmup", "1")
    _one_line_exit_2(bench, "m.onnx", "'x'", *needles)
    evaluate = cli("eval", path, "--data", "synthetic", "--data-limit", "8")
    _one_line_exit_2(evaluate, "m.onnx", *needles)


def test_onnx_with_absurd_metadata_input_is_refused_before_data_is_prepared(cli, tmp_path):
    path = _tiny_onnx(tmp_path / "m.onnx", ["batch", 3, "h", "w"], height=100000)
    result = cli("eval", path, "--data", "synthetic", "--data-limit", "8")
    _one_line_exit_2(result, "metadata input", "1x3x100000x100000", "not runnable")


def test_sane_onnx_still_benches_and_evaluates(cli, tmp_path):
    path = _tiny_onnx(tmp_path / "m.onnx", ["batch", 3, 32, 32])
    assert cli("bench", path, "--runs", "5", "--warmup", "1").exit_code == 0
    assert cli("eval", path, "--data", "synthetic", "--data-limit", "8").exit_code == 0


# --------------------------------------------------------------------------- 5. unwritable output


def test_out_that_is_a_file_or_runs_through_one(cli, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for args in (
        ("prune", *TINY, "--heads", "0.34", "--out", afile),
        ("prune", *TINY, "--heads", "0.34", "--out", afile / "sub"),
        ("export", *TINY, "--out", afile / "m.onnx"),
    ):
        _one_line_exit_2(cli(*args), str(afile))
    assert afile.read_text() == "not a directory"


def test_disk_full_while_writing_is_a_user_error(cli, tmp_path, monkeypatch):
    import onnx

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save", full)
    out = tmp_path / "m.onnx"
    result = cli("export", *TINY, "--out", out)
    _one_line_exit_2(
        result, "disk full while writing", "No space left on device", "free space or choose another --out"
    )
    assert not out.exists()


def test_safetensors_disk_full_error_is_a_user_error(cli, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    result = cli("prune", *TINY, "--heads", "0.34", "--out", tmp_path / "run")
    stderr = _one_line_exit_2(result, "disk full while writing", "model.safetensors", "free space")
    assert "SafetensorError" not in stderr


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        (errno.EROFS, "not writable while writing"),
        (errno.EACCES, "permission denied on"),
        (errno.EDQUOT, "quota"),
    ],
)
def test_read_only_or_forbidden_output_is_a_user_error(cli, tmp_path, monkeypatch, code, needle):
    import onnx

    out = tmp_path / "m.onnx"

    def refuse(_model, f, *_args, **_kwargs):
        raise OSError(code, os.strerror(code), str(f))

    monkeypatch.setattr(onnx, "save", refuse)
    result = cli("export", *TINY, "--out", out)
    _one_line_exit_2(result, needle, "m.onnx", "--out")
