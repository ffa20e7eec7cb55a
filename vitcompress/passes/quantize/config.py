"""Integer quantization of the exported ONNX model with ONNX Runtime, placed the way ViTs need it.

Static INT8 in QDQ format: activation ranges come from calibration batches of the recipe's data
(class-stratified), with ONNX Runtime's calibrators (minmax, entropy, percentile); weights are
per-channel. Only the linear layers (MatMul/Gemm with a constant weight) are quantized by default:
LayerNorm, Softmax, GELU and the residual adds stay in float, where ViT accuracy is fragile (the
outlier channels of the residual stream, Bondarenko et al. 2021); `quantize_attention` adds the
activation-activation matmuls (q@k, attn@v). Dynamic INT8 (weights only, ranges per batch at run
time) is the no-data option. Pre-processing (symbolic shape inference, graph optimization) runs
first, as ONNX Runtime recommends. Named target presets expand into these settings and are written
into the resolved recipe. `gpu-fp16` converts to float16 instead, keeping float32 inputs/outputs
and the numerically sensitive ops (LayerNorm, Softmax) in float32.

Every result is checked: the quantized node count by op type must be > 0 (a release of ONNX
Runtime once silently stopped quantizing transformer layers), the file opens in ONNX Runtime, and
top-1 agreement with the float model is measured on real data.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from vitcompress.choices import FileRuntime, Provider, Runtime
from vitcompress.passes.base import Needs, PassConfig

if TYPE_CHECKING:
    from vitcompress.runtimes.target import TargetSection

log = logging.getLogger(__name__)


class Mode(str, Enum):
    static = "static"  # int8 QDQ with calibrated activation ranges
    dynamic = "dynamic"  # int8 weights, activation ranges at run time (no data)
    auto = "auto"  # both int8 forms, the faster on this machine that holds the accuracy gate
    fp16 = "fp16"  # float16 (GPU targets)
    integer_only = "integer-only"  # every op integer (I-ViT): built from the PyTorch model


class Calibration(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


# Each preset is the explicit settings it stands for; `resolve` writes them into the config.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-x86-vnni": {  # AVX-512 VNNI / AMX: u8 activations x s8 weights is the fast path
        "mode": "auto", "activation_type": "uint8", "weight_type": "int8", "per_channel": True,
        "reduce_range": False, "quantize_attention": False, "provider": "cpu",
    },
    "cpu-x86-avx2": {  # no VNNI: 7-bit weights avoid the u8 x s8 saturation of vpmaddubsw
        "mode": "auto", "activation_type": "uint8", "weight_type": "int8", "per_channel": True,
        "reduce_range": True, "quantize_attention": False, "provider": "cpu",
    },
    "cpu-arm64": {  # NEON dot-product kernels: signed activations and weights; ORT mobile's .ort file
        "mode": "auto", "activation_type": "int8", "weight_type": "int8", "per_channel": True,
        "reduce_range": False, "quantize_attention": False, "provider": "cpu", "ort_format": True,
    },
    "gpu-tensorrt-int8": {  # TensorRT wants symmetric s8 QDQ on both inputs of every quantized op
        "mode": "static", "activation_type": "int8", "weight_type": "int8", "per_channel": True,
        "reduce_range": False, "quantize_attention": True, "provider": "tensorrt",
    },
    "gpu-fp16": {"mode": "fp16", "provider": "cuda"},
    # OpenVINO on x86: NNCF INT8 and vitcompress's QDQ file, both run by OpenVINO, the faster kept
    "cpu-x86-openvino-int8": {
        "runtime": "openvino", "mode": "auto", "activation_type": "uint8", "weight_type": "int8",
        "per_channel": True, "reduce_range": False, "quantize_attention": False, "provider": "cpu",
    },
    "int-only": {  # no FPU: Shiftmax, ShiftGELU, integer LayerNorm; percentile 99.99 won on validation (BENCHMARKS)
        "mode": "integer-only", "calibration": "percentile", "percentile": 99.99, "provider": "cpu",
    },
}  # fmt: skip


class QuantizeConfig(PassConfig):
    """Quantize the exported ONNX model (needs an export pass before it)."""

    summary: ClassVar[str] = (
        "integer quantization with ONNX Runtime (static QDQ / dynamic int8, presets) or fp16"
    )
    engine: ClassVar[str] = "vitcompress.passes.quantize.run"
    needs: ClassVar[Needs] = Needs.onnx

    lowers_precision: ClassVar[bool] = True

    @classmethod
    def target_defaults(cls, target: TargetSection) -> dict[str, Any]:
        settings: dict[str, Any] = {}
        if target.runtime == "openvino":
            settings["runtime"] = "openvino"
        elif target.resolved_device == "gpu":
            settings["provider"] = target.provider
        if target.precision == "fp16":
            settings["mode"] = "fp16"
        return settings

    kind: Literal["quantize"] = "quantize"
    runtime: FileRuntime = Field(
        Runtime.ort,
        description="ort: ONNX Runtime quantization into an .onnx file; openvino: INT8 OpenVINO IR (.xml) "
        "with NNCF (static), or NNCF and vitcompress's QDQ file run by OpenVINO, the faster kept (auto).",
    )
    preset: str | None = Field(
        None, description=f"Target preset: {', '.join(PRESETS)} (sets the fields below)."
    )
    mode: Mode = Field(
        Mode.static,
        description="static (int8, calibrated; openvino: NNCF), dynamic (int8, no data), auto (two int8 "
        "forms timed on this machine, the faster that holds max_top1_drop kept; CPU only: on ort static vs "
        "dynamic, on openvino NNCF vs vitcompress's QDQ file), fp16, or integer-only (every op in integers, "
        "I-ViT: built from the PyTorch model in a recipe; uses calibration, calibration_size, percentile and "
        "max_top1_drop, no layer falls back to float).",
    )
    calibration: Calibration = Field(Calibration.minmax, description="Activation range method (static).")
    calibration_size: int = Field(
        256, ge=1, description="Calibration images (stratified); at least 2, except integer-only (1 allowed)."
    )
    calibration_batch: int = Field(
        4, ge=1, description="Images per calibration run (ORT holds one run's activations at a time)."
    )
    percentile: float = Field(99.999, gt=90, le=100, description="Percentile for calibration: percentile.")
    per_channel: bool = Field(True, description="Per-output-channel weight scales.")
    activation_type: Literal["uint8", "int8"] = Field("uint8", description="Activation integer type.")
    weight_type: Literal["uint8", "int8"] = Field("int8", description="Weight integer type.")
    reduce_range: bool = Field(False, description="7-bit weights (for CPUs without VNNI).")
    quantize_attention: bool = Field(False, description="Also quantize the q@k and attn@v matmuls.")
    quantize_outputs: bool = Field(
        False,
        description="Q/DQ on MatMul/Gemm outputs too. Off: integer matmul with a float result for the bias add "
        "(measured 1.25-1.4x faster on DeiT-S, AVX-512 VNNI).",
    )
    exclude: list[str] = Field(default_factory=list, description="ONNX node names to keep in float.")
    provider: Provider = Field(Provider.cpu, description="Where the result will run.")
    max_top1_drop: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Accuracy gate: top-1 drop vs float on data.eval, in points; falls back layer by layer.",
    )
    fallback_time_limit_s: float = Field(
        600, gt=0, description="Time for the sensitivity fallback; the best model found is kept."
    )
    finetune_steps: int = Field(
        0,
        ge=0,
        description="integer-only: steps of integer-aware fine-tuning on data.train (KD from the float "
        "model through fake-quant modules that compute like the integer kernels) before the build; 0: off.",
    )
    finetune_lr: float = Field(
        2e-5, gt=0, le=1, description="integer-only: fine-tuning learning rate (AdamW, cosine decay)."
    )
    filename: str = Field("model.int8.onnx", description="Output file name in the run directory.")
    ort_format: bool = Field(
        False,
        description="Also write ONNX Runtime's mobile .ort file of the result (same name, .ort), with ORT's "
        "mobile usability check and parity against the .onnx on this machine (the cpu-arm64 preset's choice).",
    )
    verify_provider: bool = Field(
        True,
        description="Require the target's execution provider on this machine; false: build for another machine.",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            preset = data["preset"]
            if preset not in PRESETS:
                from vitcompress.errors import did_you_mean

                raise ValueError(f"unknown preset {preset!r}; {did_you_mean(str(preset), PRESETS)}")
            # explicit fields win over the preset's
            data = {**PRESETS[preset], **data}
            if data.get("mode") == "fp16" and data.get("filename", "model.int8.onnx") == "model.int8.onnx":
                data["filename"] = "model.fp16.onnx"
            if (
                data.get("mode") == "integer-only"
                and data.get("filename", "model.int8.onnx") == "model.int8.onnx"
            ):
                data["filename"] = "model.intonly.onnx"
        if isinstance(data, dict) and data.get("runtime") == "openvino" and "filename" not in data:
            data = {**data, "filename": "model.int8.xml"}
        return data

    def needs_data(self) -> bool:
        return self.mode in (Mode.static, Mode.auto, Mode.integer_only)

    @model_validator(mode="after")
    def _integer_only_settings(self) -> QuantizeConfig:
        if self.finetune_steps and self.mode is not Mode.integer_only:
            raise ValueError(
                "finetune_steps is integer-only's fine-tuning; fine-tune int8 with a distill pass"
            )
        if self.mode is Mode.integer_only:
            if self.calibration is Calibration.entropy:
                raise ValueError("integer-only calibrates with minmax or percentile, not entropy")
            if self.provider != "cpu":
                raise ValueError("integer-only graphs are built and verified for ONNX Runtime's CPU provider")
        elif self.calibration_size < 2:
            raise ValueError(
                "calibration_size 1: ONNX Runtime's calibrators need at least 2 images (integer-only takes 1)"
            )
        return self

    @model_validator(mode="after")
    def _ort_format_needs_ort(self) -> QuantizeConfig:
        if self.ort_format and (self.runtime != "ort" or self.mode is Mode.fp16):
            raise ValueError(
                "ort_format converts an ONNX Runtime int8 result: runtime ort, mode static/dynamic/auto"
            )
        return self

    @model_validator(mode="after")
    def _openvino_modes(self) -> QuantizeConfig:
        if self.runtime == "openvino" and (self.mode in (Mode.dynamic, Mode.fp16) or self.provider != "cpu"):
            raise ValueError(
                f"runtime openvino quantizes for the CPU with calibration: mode static (NNCF) or auto, not "
                f"mode {self.mode.value} / provider {self.provider}"
            )
        return self

    @model_validator(mode="after")
    def _auto_on_cpu(self) -> QuantizeConfig:
        if self.mode is Mode.auto and self.provider != "cpu":
            raise ValueError(
                "mode auto times the candidates with ONNX Runtime's CPU provider: use static for GPUs"
            )
        return self
