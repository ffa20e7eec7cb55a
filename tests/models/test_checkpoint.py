"""Safe checkpoint loading (RELIABILITY 1-8)."""

from __future__ import annotations

import argparse
import fractions
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitcompress.errors import CheckpointError
from vitcompress.models.checkpoint import load_state_dict

WEIGHTS = {"blocks.0.weight": torch.arange(6.0).reshape(2, 3), "head.bias": torch.ones(2)}


class CanaryPayload:
    """Unpickling this runs a shell command that writes the canary file."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def _assert_same(loaded: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(WEIGHTS)
    for key, value in WEIGHTS.items():
        assert torch.equal(loaded[key], value)


def test_safetensors_loads(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(WEIGHTS, str(path))
    _assert_same(load_state_dict(path))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {
            "model": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "args": argparse.Namespace(model="vit", lr=0.1),
            "epoch": 3,
        },
        lambda sd: {"state_dict": sd, "version": 2},
        lambda sd: {"state_dict_ema": sd, "state_dict": {k: v * 0 for k, v in sd.items()}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["plain", "timm-train", "state_dict", "ema-preferred", "ddp-prefix", "nested-ddp"],
)
def test_training_checkpoints_yield_weights(tmp_path, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(dict(WEIGHTS)), path)
    _assert_same(load_state_dict(path))


def test_malicious_pickle_is_refused_and_payload_never_runs(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pth"
    torch.save({"model": dict(WEIGHTS), "x": CanaryPayload(canary)}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert "system" in info.value.message  # names the offending global (posix.system / os.system)
    assert "refusing to load" in info.value.message
    assert "--trust-checkpoint" in (info.value.hint or "")
    assert not canary.exists()


def test_non_data_global_needs_trust_flag(tmp_path):
    path = tmp_path / "extra.pth"
    torch.save({"model": dict(WEIGHTS), "ratio": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        load_state_dict(path)
    _assert_same(load_state_dict(path, trust=True))


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"a": torch.ones(4)})


def _damaged() -> dict[str, bytes]:
    raw = _safetensors_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    bad_offsets = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,1600]}}'
    return {
        "zero-byte": b"",
        "header-past-end": struct.pack("<Q", 10**6) + raw[8:],
        "non-json-header": struct.pack("<Q", 5) + b"{{{{{",
        "offsets-out-of-range": struct.pack("<Q", len(bad_offsets)) + bad_offsets + raw[8 + n :],
        "trailing-garbage": raw + b"garbage!",
        "truncated": raw[:-4],
    }


@pytest.mark.parametrize("case", list(_damaged()))
def test_damaged_safetensors_fail_with_one_line(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(_damaged()[case])
    with pytest.raises(CheckpointError, match="corrupt or incomplete checkpoint") as info:
        load_state_dict(path)
    assert str(path) in info.value.message
    assert "\n" not in info.value.message


def test_truncated_and_html_pth_are_corrupt(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(dict(WEIGHTS), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    html = tmp_path / "page.pth"
    html.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    for path in (truncated, html):
        with pytest.raises(CheckpointError, match="corrupt or incomplete checkpoint") as info:
            load_state_dict(path)
        assert str(path) in info.value.message


def test_wrong_extension_and_missing_file(tmp_path):
    odd = tmp_path / "weights.txt"
    odd.write_text("x")
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint extension '\.txt'"):
        load_state_dict(odd)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")


def test_nan_and_inf_weights_are_named(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_file(
        {
            "ok": torch.ones(2),
            "blocks.1.attn.qkv.weight": torch.tensor([1.0, float("nan")]),
            "head.weight": torch.tensor([float("inf")]),
        },
        str(path),
    )
    with pytest.raises(CheckpointError, match="NaN or Inf values in 2 tensor") as info:
        load_state_dict(path)
    assert "blocks.1.attn.qkv.weight" in info.value.message and "head.weight" in info.value.message


def test_old_torch_refuses_pickles_without_trust(tmp_path, monkeypatch):
    from vitcompress.models import checkpoint

    path = tmp_path / "w.pth"
    torch.save(dict(WEIGHTS), path)
    monkeypatch.setattr(checkpoint, "_torch_version", lambda: (2, 5))
    with pytest.raises(CheckpointError, match="not safe before torch 2.6"):
        load_state_dict(path)
    sfile = tmp_path / "w.safetensors"
    save_file(WEIGHTS, str(sfile))
    _assert_same(load_state_dict(sfile))  # safetensors always loads
