"""The interface every runtime adapter implements, and the facts every measurement records.

A runner is one loaded model on one runtime: it checks a batch against the model's declared input,
runs it, and says what it is (`RunnerInfo`: runtime, version, device, precision, threads). Adapters
live one per module (`ort`, `openvino`, `tensorrt`) and are listed in `vitcompress.runtimes.RUNTIMES`;
a new runtime is one module plus one entry there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# the choices live in vitcompress.choices (the configs use them without the runtimes); re-exported
from vitcompress.choices import Choice as Choice
from vitcompress.choices import Device as Device
from vitcompress.choices import FileRuntime as FileRuntime
from vitcompress.choices import Precision as Precision
from vitcompress.choices import Provider as Provider
from vitcompress.choices import Runtime as Runtime
from vitcompress.errors import InputShapeError, PrecisionUnavailableError

if TYPE_CHECKING:
    import numpy as np


# The vitcompress metadata (preprocessing, class count and names) travels with every model file:
# ONNX metadata_props under this key, OpenVINO rt_info under this path.
METADATA_KEY = "vitcompress.input"
RT_INFO_PATH = ["vitcompress", "input"]


@dataclass(frozen=True)
class RunnerInfo:
    """What a measurement ran on; every bench result, eval result and ledger entry carries it."""

    runtime: str
    version: str
    device: str
    precision: str  # what the runtime computes in (OpenVINO: the precision hint it applied)
    threads: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def label(self) -> str:
        threads = f", {self.threads} threads" if self.threads else ""
        return f"{self.runtime} {self.version} {self.device} {self.precision}{threads}"


class Runner:
    """One model loaded on one runtime. Subclasses set the attributes in __init__ and implement
    `infer`; `run` adds the input check and float32 output every caller wants."""

    path: Path
    input_name: str
    input_shape: list[Any]  # the declared input dims: int, or a name / None where dynamic
    input_dtype: Any  # numpy dtype the model takes
    info: RunnerInfo

    def infer(self, batch: np.ndarray) -> Any:
        """Run one batch with no checks (what latency measurement times); returns the raw output."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any] | None:
        """The vitcompress metadata the file carries (input spec, classes), or None."""
        raise NotImplementedError

    def expected(self) -> str:
        return "x".join(str(d) for d in self.input_shape[1:])

    def check_input(self, batch: np.ndarray) -> None:
        fixed = self.input_shape[1:]
        if batch.ndim != len(self.input_shape) or any(
            isinstance(d, int) and d != s for d, s in zip(fixed, batch.shape[1:], strict=False)
        ):
            got = "x".join(str(s) for s in batch.shape[1:])
            height, width = fixed[-2:] if len(fixed) >= 2 else [*fixed, "?", "?"][:2]
            raise InputShapeError(
                f"{self.path.name}: expected {height}x{width} input ({self.expected()} per image), got {got}",
                hint="resize the images to the model's resolution or export the model at yours",
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        import numpy as np

        self.check_input(batch)
        return np.asarray(self.infer(batch.astype(self.input_dtype, copy=False)), dtype=np.float32)


def parse_metadata(text: str | None) -> dict[str, Any] | None:
    return dict(json.loads(text)) if text else None


def cpu_flags() -> set[str]:
    """The ISA flags /proc/cpuinfo lists (empty where there is none, e.g. macOS)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    return flags


# A CPU computes bf16 natively with AVX512_BF16 (Cooper Lake, Zen 4+) or AMX-BF16 (Sapphire Rapids+);
# fp16 with AVX512_FP16 or AMX-FP16. Without them OpenVINO would emulate or refuse.
CPU_PRECISION_FLAGS = {
    Precision.bf16: ("avx512_bf16", "amx_bf16"),
    Precision.fp16: ("avx512_fp16", "amx_fp16"),
}


def require_cpu_precision(precision: Precision, flags: set[str] | None = None) -> None:
    """Refuse a precision this CPU has no instructions for (exit 2), naming the flags it needs."""
    needed = CPU_PRECISION_FLAGS.get(precision)
    if not needed:
        return
    flags = cpu_flags() if flags is None else flags
    if not any(f in flags for f in needed):
        raise PrecisionUnavailableError(
            f"precision {precision.value} needs a CPU with {' or '.join(f.upper() for f in needed)}; this "
            "CPU has neither (/proc/cpuinfo)",
            hint="use --precision fp32 here (or int8 via quantize), or run on a CPU that has them",
        )


def default_ir_precision() -> str:
    """What OpenVINO picks on this CPU for an fp32 model: bf16 with AVX512_BF16 or AMX, else fp32."""
    return "bf16" if any(f in cpu_flags() for f in CPU_PRECISION_FLAGS[Precision.bf16]) else "fp32"
