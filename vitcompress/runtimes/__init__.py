"""Runtimes a model can be run on, behind one interface (`Runner`: load, run, metadata, version).

One explicit table, `RUNTIMES`: each entry names the file suffixes it opens, the devices it runs
on, and the module holding its adapter (imported only when used, so `vitcompress --help` stays
fast). `open_runner(path)` picks the runtime from the file's suffix (.onnx/.ort: ONNX Runtime,
.xml: OpenVINO, .engine/.plan: TensorRT) unless one is named; an .onnx file can also be run by
OpenVINO. Adding a runtime is one adapter module and one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vitcompress.errors import RuntimeModelError, did_you_mean
from vitcompress.runtimes.base import Device, Precision, Runner, RunnerInfo, Runtime

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "RUNTIMES",
    "Device",
    "Precision",
    "Runner",
    "RunnerInfo",
    "Runtime",
    "RuntimeSpec",
    "open_runner",
    "runtime_for",
]


@dataclass(frozen=True)
class RuntimeSpec:
    runtime: Runtime
    summary: str
    suffixes: tuple[str, ...]  # the files it opens; the first runtime listing a suffix owns it
    devices: tuple[Device, ...]
    module: str  # adapter module: a `Runner` subclass named in `runner` and a `version()` function
    runner: str

    def adapter(self) -> ModuleType:
        return importlib.import_module(self.module)

    def version(self) -> str:
        return str(self.adapter().version())


RUNTIMES: dict[Runtime, RuntimeSpec] = {
    spec.runtime: spec
    for spec in (
        RuntimeSpec(
            Runtime.ort,
            "ONNX Runtime: the portable default; .onnx, and the mobile .ort format",
            (".onnx", ".ort"),
            (Device.cpu, Device.gpu),
            "vitcompress.runtimes.ort",
            "OrtRunner",
        ),
        RuntimeSpec(
            Runtime.openvino,
            "OpenVINO on x86 CPUs: IR (.xml + .bin) or .onnx; bf16/f32 precision hint, NNCF int8",
            (".xml", ".onnx"),
            (Device.cpu,),
            "vitcompress.runtimes.openvino",
            "OpenVINORunner",
        ),
        RuntimeSpec(
            Runtime.tensorrt,
            "TensorRT engines for NVIDIA GPUs (fp16, int8 from QDQ); needs the tensorrt extra",
            (".engine", ".plan"),
            (Device.gpu,),
            "vitcompress.runtimes.tensorrt",
            "TensorRTRunner",
        ),
    )
}


def runtime_for(path: Path) -> Runtime:
    """The runtime that owns a file's suffix."""
    suffix = Path(path).suffix.lower()
    for spec in RUNTIMES.values():
        if suffix in spec.suffixes:
            return spec.runtime
    known = sorted({s for spec in RUNTIMES.values() for s in spec.suffixes})
    raise RuntimeModelError(
        f"{path}: no runtime opens {suffix or 'files without a suffix'!r} files",
        hint=f"model files are {', '.join(known)}; {did_you_mean(suffix, known)}",
    )


def open_runner(
    path: Path,
    runtime: Runtime | None = None,
    device: Device | None = None,
    precision: Precision | None = None,
    threads: int | None = None,
) -> Runner:
    """Load `path` on `runtime` (default: the one its suffix names) with a precision and thread count."""
    path = Path(path)
    runtime = runtime or runtime_for(path)
    spec = RUNTIMES[runtime]
    if path.suffix.lower() not in spec.suffixes:
        opens = f"{runtime.value} opens {', '.join(spec.suffixes)}"
        owner = f"; {path.suffix} files run on {runtime_for(path).value}" if _known(path) else ""
        raise RuntimeModelError(
            f"{runtime.value} does not open {path.suffix or 'suffix-less'} files ({path})", hint=opens + owner
        )
    device = device or spec.devices[0]
    if device not in spec.devices:
        raise RuntimeModelError(
            f"{runtime.value} does not run on the {device.value}",
            hint=f"use --device {' or '.join(d.value for d in spec.devices)}",
        )
    cls = getattr(spec.adapter(), spec.runner)
    runner: Runner = cls(path, device=device, precision=precision, threads=threads)
    return runner


def _known(path: Path) -> bool:
    return any(path.suffix.lower() in spec.suffixes for spec in RUNTIMES.values())
