"""Safe loading of weight files.

`.safetensors` is read directly. Pickle-based files (`.pth`, `.pt`, `.bin`, `.ckpt`) go only through
`torch.load(weights_only=True)`, which refuses any global that is not plain data: a malicious pickle
(CVE-2025-32434 class) fails before its payload runs, and it is never retried unsafely. Unsafe
loading exists only behind an explicit trust flag, and the file's hash is logged when it is used.
A file is recognised by its content where that is unambiguous: a safetensors file named `.pth` loads
as safetensors.
"""

from __future__ import annotations

import argparse
import io
import logging
import pickletools
import re
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitcompress.errors import CheckpointError
from vitcompress.fileio import file_sha256

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


def is_safetensors_file(path: Path) -> bool:
    """True when the file starts like safetensors: an 8-byte little-endian header length, then JSON."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= size - 8 and head[8:9] == b"{"


_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}
# The first pickle of torch's legacy (pre-zip) format is this magic number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _pickle_ops(stream: io.BytesIO) -> Iterator[tuple[str, object]]:
    for op, arg, _pos in pickletools.genops(stream):
        yield op.name, arg


def _scan_pickle(stream: io.BytesIO, found: list[str]) -> tuple[int, object]:
    """Read one pickle without running it: append the globals it imports to `found`.

    Returns its protocol and its first argument (the legacy magic number, when it is one). Raises
    ValueError when the bytes are not a complete pickle.
    """
    protocol, first, seen = 2, None, False
    memo: dict[int, object] = {}
    top: object = None
    strings: list[str] = []
    for name, arg in _pickle_ops(stream):
        if name == "PROTO":
            protocol = int(arg)  # type: ignore[call-overload]
            continue
        if not seen and name != "FRAME":
            first, seen = arg, True
        if name in _STRING_OPS:
            top = arg.decode("latin-1") if isinstance(arg, bytes) else arg
            strings.append(str(top))
        elif name == "MEMOIZE":
            memo[len(memo)] = top
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = top  # type: ignore[call-overload]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            top = memo.get(int(arg))  # type: ignore[call-overload]
            if isinstance(top, str):
                strings.append(top)
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append(f"{module}.{attr}")
            top = None
        elif name == "STACK_GLOBAL":
            if len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            top = None
        elif name != "FRAME":
            top = None
    return protocol, first


def _pickle_globals(path: Path) -> tuple[int, list[str]]:
    """The pickle protocol and the globals a checkpoint imports, read without unpickling anything.

    Raises ValueError, saying why, when the file is not a complete pickle (in a torch zip, torch's
    legacy format, or plain): then it is damaged, not merely refused.
    """
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    raise ValueError("a zip file without the data.pkl of a torch checkpoint")
                data = archive.read(name)
            return _scan_pickle(io.BytesIO(data), found)[0], found
        raw = path.read_bytes()
        if raw[:1] != b"\x80":
            raise ValueError(f"not a pickle nor a zip file (it starts with {raw[:16]!r})")
        stream = io.BytesIO(raw)
        protocol, first = _scan_pickle(stream, found)
        if first == _LEGACY_MAGIC:  # magic, protocol version, system info, then the object itself
            for _ in range(3):
                protocol = _scan_pickle(stream, found)[0]
        return protocol, found
    except (OSError, zipfile.BadZipFile, EOFError, struct.error) as err:
        raise ValueError(str(err) or type(err).__name__) from err


def _allowed_globals() -> set[str]:
    allowed = {"argparse.Namespace"}
    try:
        from torch import _weights_only_unpickler

        allowed |= set(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):  # a private helper; without it every global is named
        pass
    for obj in torch.serialization.get_safe_globals():
        target = obj[0] if isinstance(obj, tuple) else obj
        allowed.add(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}")
    return allowed


def _refused(path: Path, reason: str) -> CheckpointError:
    converted = path.with_suffix(".safetensors")
    return CheckpointError(
        f"refusing to load {path} for safety: {reason} (unpickling it could run code)",
        hint="if you trust the file, convert it once in a trusted Python: "
        f"sd = torch.load('{path}', weights_only=False); safetensors.torch.save_file(sd, '{converted}') "
        "(use sd['model'] or sd['state_dict'] if the weights are nested) and pass the .safetensors "
        "file; or pass --trust-checkpoint only if you made the file yourself",
    )


def _torch_load(path: Path, weights_only: bool) -> object:
    # torch warns about pickle protocols and weights_only defaults; the errors below say it better.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _load_pickle(path: Path, trust: bool) -> object:
    if trust:
        log.warning("unsafe load of trusted checkpoint %s (sha256 %s)", path, file_sha256(path))
        try:
            return _torch_load(path, weights_only=False)
        except Exception as err:  # the file is trusted but may still be damaged
            text = str(err).strip()
            raise _corrupt(path, text.splitlines()[0] if text else type(err).__name__) from err
    if _torch_version() < MIN_SAFE_TORCH:
        raise CheckpointError(
            f"refusing to unpickle {path} with torch {torch.__version__}: weights_only loading is not "
            "safe before torch 2.6 (CVE-2025-32434)",
            hint="convert the file to .safetensors, upgrade torch, or pass --trust-checkpoint if you made it",
        )
    try:
        # argparse.Namespace is plain data; timm's train.py stores its arguments as one.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return _torch_load(path, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise _refused(
                path, f"it contains {found.group(1)}, which a weights-only load does not allow"
            ) from err
        operand = re.search(r"Unsupported operand (\d+)", text)
        if operand:
            # torch's safe unpickler stops at opcodes it does not implement (e.g. FRAME of protocol
            # 4+): a complete pickle is refused, bytes that are no pickle at all are damaged.
            try:
                protocol, globals_ = _pickle_globals(path)
            except ValueError as scan:
                raise _corrupt(path, str(scan).splitlines()[0]) from err
            allowed = _allowed_globals()
            bad = sorted(dict.fromkeys(g for g in globals_ if g not in allowed))
            if bad:
                shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
                raise _refused(
                    path, f"it contains {shown}, which a weights-only load does not allow"
                ) from err
            raise _refused(
                path,
                f"it was pickled with protocol {protocol}, whose opcode {operand.group(1)} a weights-only "
                "load does not read",
            ) from err
        if "Weights only load failed" in text:
            raise _refused(
                path, "it contains an object that is not plain data, which a weights-only load does not allow"
            ) from err
        detail = text.strip().splitlines()[0] if text.strip() else ""
        detail = detail.split(". ")[0]  # torch's messages go on with advice that does not apply here
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


def _plain(value: object, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if depth < 2 and isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if depth < 2 and isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def checkpoint_metadata(obj: object) -> dict[str, Any]:
    """What a training checkpoint records beside its weights: timm's train.py stores the model name
    (`arch`) and its arguments (`args`, an argparse.Namespace with `model`, `model_kwargs`, ...).
    Only plain values are kept."""
    if not isinstance(obj, Mapping):
        return {}
    meta: dict[str, Any] = {}
    if isinstance(obj.get("arch"), str):
        meta["arch"] = obj["arch"]
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, Mapping):
        meta["args"] = {str(k): v for k, v in args.items() if _plain(v)}
    return meta


@dataclass(frozen=True)
class Checkpoint:
    state_dict: StateDict
    metadata: dict[str, Any] = field(default_factory=dict)


def load_state_dict(path: Path, trust: bool = False) -> StateDict:
    """Load the weights in `path` safely; raise CheckpointError with a fix for every failure."""
    return load_checkpoint(path, trust).state_dict


def load_checkpoint(path: Path, trust: bool = False) -> Checkpoint:
    """The weights in `path`, loaded safely, and the training metadata stored beside them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist", hint="check the path")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory",
            hint="give a .safetensors/.pth file, or pass the directory itself as MODEL if it is an artifact",
        )
    suffix = path.suffix.lower()
    metadata: dict[str, Any] = {}
    if suffix in SAFETENSORS_SUFFIXES:
        state_dict = _load_safetensors(path)
    elif is_safetensors_file(path):
        log.info("%s is a safetensors file (by its header); loading it as one", path)
        state_dict = _load_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        obj = _load_pickle(path, trust)
        metadata = checkpoint_metadata(obj)
        state_dict = unwrap_state_dict(obj, path)
    else:
        raise CheckpointError(
            f"unsupported checkpoint extension {suffix or '(none)'!r} for {path}",
            hint="use .safetensors (preferred) or .pth/.pt/.bin",
        )
    check_finite(state_dict, path)
    return Checkpoint(state_dict, metadata)
