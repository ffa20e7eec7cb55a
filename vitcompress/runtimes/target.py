"""The recipe's `target:` section: where the model will run, expanded into explicit pass settings.

    target: {runtime: openvino, device: cpu, threads: 2, precision: int8}

Like a quantization preset, the target writes what it means into the passes (explicit settings
win), so the resolved recipe shows every choice:
- export: `runtime: openvino` also writes the OpenVINO IR; a fp32/bf16 precision is its hint;
- quantize: `runtime: openvino` makes INT8 OpenVINO IR (NNCF, or vitcompress's QDQ file, whichever
  runs faster); on a GPU with ORT or TensorRT the provider follows the device;
- validate: budgets are checked on the target's runtime, precision hint and threads, and the model
  is also timed on the other runtimes that open it (the record names the fastest);
- run.threads: the target's threads.
TensorRT engines are built from the final ONNX file with `vitcompress convert --to tensorrt`; in a
recipe, `runtime: tensorrt` measures through ONNX Runtime's TensorRT execution provider.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vitcompress.choices import Device, Runtime


class TargetSection(BaseModel):
    """Where the compressed model will run."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    runtime: Runtime = Field(
        Runtime.ort, description="ort (portable), openvino (x86 CPUs), tensorrt (NVIDIA GPUs)."
    )
    device: Device | None = Field(None, description="Default: gpu for tensorrt, else cpu.")
    threads: int | None = Field(None, ge=1, description="Threads on the target (sets run.threads).")
    precision: Literal["fp32", "bf16", "fp16", "int8"] | None = Field(
        None,
        description="What the deployed model computes in: int8 needs a quantize pass; bf16 is OpenVINO's hint "
        "(AVX512_BF16/AMX CPUs); fp16 for GPUs.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TargetSection:
        device = self.device or ("gpu" if self.runtime == "tensorrt" else "cpu")
        if self.runtime == "openvino" and device != "cpu":
            raise ValueError(
                "target: runtime openvino runs on device cpu here (use tensorrt or ort for GPUs)"
            )
        if self.runtime == "tensorrt" and device != "gpu":
            raise ValueError(
                "target: runtime tensorrt runs on device gpu (NVIDIA); use ort or openvino for CPUs"
            )
        if self.precision == "bf16" and self.runtime != "openvino":
            raise ValueError(
                "target: precision bf16 is an OpenVINO hint; use runtime openvino (or fp32/int8)"
            )
        if self.precision == "fp16" and device != "gpu":
            raise ValueError("target: precision fp16 is for GPUs; on a CPU use fp32, bf16 (openvino) or int8")
        return self

    @property
    def resolved_device(self) -> str:
        return self.device or ("gpu" if self.runtime == "tensorrt" else "cpu")

    @property
    def provider(self) -> str | None:
        """The ONNX Runtime execution provider on this target (None: OpenVINO on a GPU, refused)."""
        if self.resolved_device != "gpu":
            return "cpu"
        return {"tensorrt": "tensorrt", "ort": "cuda"}.get(self.runtime)

    @property
    def precision_hint(self) -> str | None:
        """OpenVINO's precision hint this target implies (fp32 or bf16), if any."""
        return self.precision if self.precision in ("fp32", "bf16") else None


class TargetAware(Protocol):
    """What a pass config class says about a target (see PassConfig): an object with these (the
    class itself, whose `lowers_precision` is a class attribute)."""

    @property
    def lowers_precision(self) -> bool: ...

    def target_defaults(self, target: TargetSection) -> dict[str, Any]: ...


def apply_target(data: Any, configs: Mapping[str, TargetAware]) -> Any:
    """Expand `target` into the raw recipe's pass settings (explicit settings win): each pass's
    config class (`configs`, by kind) says what the target means for it."""
    if not isinstance(data, dict) or not isinstance(data.get("target"), dict):
        return data
    target = TargetSection(**data["target"])
    passes = data.get("passes")
    if not isinstance(passes, list):
        return data
    steps = [(p, configs.get(str(p.get("kind")))) if isinstance(p, dict) else (p, None) for p in passes]
    lowered = any(cls is not None and cls.lowers_precision for _, cls in steps)
    if target.precision == "int8" and not lowered:
        raise ValueError("target.precision int8 needs a quantize pass after the export")
    if target.precision == "fp16" and not lowered:
        raise ValueError("target.precision fp16 needs a quantize pass (preset gpu-fp16) after the export")
    expanded = [
        {**cls.target_defaults(target), **cfg} if cls is not None and isinstance(cfg, dict) else cfg
        for cfg, cls in steps
    ]
    out = {**data, "passes": expanded}
    if target.threads:
        run = dict(out.get("run") or {})
        if run.get("threads", target.threads) != target.threads:
            raise ValueError(
                f"target.threads {target.threads} and run.threads {run['threads']} disagree: set one of them"
            )
        run["threads"] = target.threads
        out["run"] = run
    return out
