"""Safe checkpoint loading (RELIABILITY 1-8)."""

from __future__ import annotations

import argparse
import fractions
import os
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitcompress.errors import CheckpointError
from vitcompress.models.checkpoint import load_checkpoint, load_state_dict

WEIGHTS = {"blocks.0.weight": torch.arange(6.0).reshape(2, 3), "head.bias": torch.ones(2)}


class TrainerConfig:
    """A custom class a training script might store beside its weights."""

    def __init__(self) -> None:
        self.lr = 0.1


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


def test_timm_training_metadata_comes_back_with_the_weights(tmp_path):
    path = tmp_path / "ckpt.pth"
    args = argparse.Namespace(
        model="vit_base_patch16_224", model_kwargs={"num_heads": 4}, lr=0.1, img_size=None, mean=(0.5, 0.5)
    )
    torch.save({"arch": "vit_base_patch16_224", "state_dict": dict(WEIGHTS), "args": args, "epoch": 3}, path)
    checkpoint = load_checkpoint(path)
    _assert_same(checkpoint.state_dict)
    assert checkpoint.metadata == {
        "arch": "vit_base_patch16_224",
        "args": {
            "model": "vit_base_patch16_224",
            "model_kwargs": {"num_heads": 4},
            "lr": 0.1,
            "img_size": None,
            "mean": (0.5, 0.5),
        },
    }
    plain = tmp_path / "w.safetensors"
    save_file(WEIGHTS, str(plain))
    assert load_checkpoint(plain).metadata == {}


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


def _load_quietly(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Load with every warning turned into an error: none may reach the console."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_state_dict(path, trust=trust)


@pytest.mark.parametrize(
    "save",
    [
        lambda obj, path: torch.save(obj, path),
        lambda obj, path: torch.save(obj, path, pickle_protocol=4),
        lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=4),
        lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=5)),
    ],
    ids=["zip-protocol-2", "zip-protocol-4", "legacy-protocol-4", "plain-pickle-5"],
)
def test_custom_class_is_refused_for_safety_not_called_corrupt(tmp_path, save):
    path = tmp_path / "train.pth"
    save({"model": dict(WEIGHTS), "cfg": TrainerConfig()}, path)
    with pytest.raises(CheckpointError) as info:
        _load_quietly(path)
    message, hint = info.value.message, info.value.hint or ""
    assert "refusing to load" in message and "for safety" in message
    assert "TrainerConfig" in message  # the offending global, found without unpickling
    assert "corrupt" not in message and "Unsupported operand" not in message
    assert "weights_only=False" in hint and "safetensors.torch.save_file" in hint
    assert "train.safetensors" in hint and "--trust-checkpoint" in hint
    assert str(path) in message


def test_protocol_4_pickle_of_plain_weights_is_refused_with_its_protocol(tmp_path):
    path = tmp_path / "p4.pth"
    torch.save(dict(WEIGHTS), path, pickle_protocol=4)
    with pytest.raises(CheckpointError, match="pickled with protocol 4") as info:
        _load_quietly(path)
    assert "--trust-checkpoint" in (info.value.hint or "")
    _assert_same(_load_quietly(path, trust=True))


def test_truncated_protocol_4_pickle_is_still_corrupt(tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes(pickle.dumps({"model": dict(WEIGHTS), "cfg": TrainerConfig()}, protocol=5)[:120])
    with pytest.raises(CheckpointError, match="corrupt or incomplete checkpoint"):
        _load_quietly(path)


def test_trusted_but_damaged_pickle_is_corrupt_not_a_crash(tmp_path):
    path = tmp_path / "page.pth"
    path.write_text("<html>Sign in</html>")
    with pytest.raises(CheckpointError, match="corrupt or incomplete checkpoint"):
        _load_quietly(path, trust=True)


@pytest.mark.parametrize("name", ["weights.pth", "weights.bin", "weights.ckpt", "weights.data"])
def test_safetensors_is_recognised_by_its_header_whatever_the_extension(tmp_path, name):
    path = tmp_path / name
    save_file(WEIGHTS, str(path))
    _assert_same(_load_quietly(path))


def test_damaged_safetensors_named_pth_is_corrupt(tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes(_safetensors_bytes()[:-4])
    with pytest.raises(CheckpointError, match="corrupt or incomplete checkpoint") as info:
        load_state_dict(path)
    assert "Unsupported operand" not in info.value.message  # read as safetensors, not as a pickle
