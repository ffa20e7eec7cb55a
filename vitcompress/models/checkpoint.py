"""Safe loading of weight files.

`.safetensors` is read directly. Pickle-based files (`.pth`, `.pt`, `.bin`, `.ckpt`) go only through
`torch.load(weights_only=True)`, which refuses any global that is not plain data: a malicious pickle
(CVE-2025-32434 class) fails before its payload runs, and it is never retried unsafely. Unsafe
loading exists only behind an explicit trust flag, and the file's hash is logged when it is used.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from vitcompress.errors import CheckpointError

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# Training checkpoints nest their weights; timm's own loader prefers the EMA weights when present.
NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
MIN_SAFE_TORCH = (2, 6)

StateDict = dict[str, torch.Tensor]


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(re.sub(r"\D.*", "", minor) or 0)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _corrupt(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"corrupt or incomplete checkpoint {path}: {detail}",
        hint="re-download or re-save the file; a .safetensors file is preferred",
    )


def _load_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.stat().st_size < 8:
        raise _corrupt(path, f"{path.stat().st_size} bytes, too short for a safetensors header")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _corrupt(path, str(err).splitlines()[0]) from err


def _load_pickle(path: Path, trust: bool) -> object:
    if trust:
        log.warning("unsafe load of trusted checkpoint %s (sha256 %s)", path, file_sha256(path))
        return torch.load(path, map_location="cpu", weights_only=False)
    if _torch_version() < MIN_SAFE_TORCH:
        raise CheckpointError(
            f"refusing to unpickle {path} with torch {torch.__version__}: weights_only loading is not "
            "safe before torch 2.6 (CVE-2025-32434)",
            hint="convert the file to .safetensors, upgrade torch, or pass --trust-checkpoint if you made it",
        )
    try:
        # argparse.Namespace is plain data; timm's train.py stores its arguments as one.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or ("Weights only load failed" in text and "Unsupported operand" not in text):
            offending = found.group(1) if found else "an object that is not plain data"
            raise CheckpointError(
                f"refusing to load {path}: it contains {offending}, which a weights-only load does not "
                "allow (a pickle can run code)",
                hint="convert it to .safetensors in a trusted environment, or pass --trust-checkpoint "
                "only if you made the file yourself",
            ) from err
        operand = re.search(r"Unsupported operand \d+", text)
        detail = operand.group(0) if operand else (text.strip().splitlines()[0] if text.strip() else "")
        raise _corrupt(path, detail or f"{type(err).__name__} while reading") from err


def unwrap_state_dict(obj: object, path: Path) -> StateDict:
    """Find the weights in a training checkpoint and strip the `module.` prefix left by DDP."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        log.info("using weights under %r of %s", key, path)
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict",
            hint="save model.state_dict(), not the model object",
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path} has no tensors at its top level or under any of {', '.join(NESTED_KEYS)}",
            hint=f"keys found: {', '.join(map(str, list(obj)[:8]))}",
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def check_finite(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{path} has NaN or Inf values in {len(bad)} tensor(s): {shown}",
            hint="the training run that wrote it diverged; use an earlier checkpoint",
        )


def load_state_dict(path: Path, trust: bool = False) -> StateDict:
    """Load the weights in `path` safely; raise CheckpointError with a fix for every failure."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist", hint="check the path")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory",
            hint="give a .safetensors/.pth file, or pass the directory itself as MODEL if it is an artifact",
        )
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state_dict = _load_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        state_dict = unwrap_state_dict(_load_pickle(path, trust), path)
    else:
        raise CheckpointError(
            f"unsupported checkpoint extension {suffix or '(none)'!r} for {path}",
            hint="use .safetensors (preferred) or .pth/.pt/.bin",
        )
    check_finite(state_dict, path)
    return state_dict
