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

import contextlib
import io
import logging
import time
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from vitcompress.errors import QuantizeError, VitcompressError
from vitcompress.passes.base import Needs, PassConfig
from vitcompress.runtimes.base import FileRuntime, Provider, Runtime

if TYPE_CHECKING:
    import numpy as np

    from vitcompress.data import Dataset
    from vitcompress.runtimes.target import TargetSection
    from vitcompress.state import ModelState

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

    summary: ClassVar[str] = "integer quantization with ONNX Runtime (static QDQ / dynamic int8, presets) or fp16"
    engine: ClassVar[str] = "vitcompress.passes.quantize"
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
            if data.get("mode") == "integer-only" and data.get("filename", "model.int8.onnx") == "model.int8.onnx":
                data["filename"] = "model.intonly.onnx"
        if isinstance(data, dict) and data.get("runtime") == "openvino" and "filename" not in data:
            data = {**data, "filename": "model.int8.xml"}
        return data

    def needs_data(self) -> bool:
        return self.mode in (Mode.static, Mode.auto, Mode.integer_only)

    @model_validator(mode="after")
    def _integer_only_settings(self) -> QuantizeConfig:
        if self.finetune_steps and self.mode is not Mode.integer_only:
            raise ValueError("finetune_steps is integer-only's fine-tuning; fine-tune int8 with a distill pass")
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


# --------------------------------------------------------------------------- calibration data


class DatasetReader:
    """onnxruntime.quantization's CalibrationDataReader over a vitcompress data split.

    It supports ORT's strided calibration (`__len__`, `set_range`): ORT keeps every calibrated
    tensor of every batch it has run until it computes the ranges, which measured 7.7 GB peak for
    DeiT-S on 64 images. Calibrating one batch per stride bounds that to one batch's tensors; the
    ranges (min/max) and histograms (entropy, percentile) are merged across strides.
    """

    def __init__(self, data: Dataset, input_name: str, batch_size: int) -> None:
        self.batches = [x.numpy() for x, _ in data.batches(batch_size)]
        self.input_name = input_name
        self.position, self.end = 0, len(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        batch = self.batches[self.position]
        self.position += 1
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.position, self.end = 0, len(self.batches)


def check_calibration(batches: list[np.ndarray], shape: tuple[int, ...]) -> None:
    """Refuse calibration data ONNX Runtime would turn into garbage ranges, before it runs."""
    import numpy as np

    count = sum(len(b) for b in batches)
    if count == 0:
        raise QuantizeError(
            "calibration data is empty", hint="give data.calibration (or data.train) some images"
        )
    if count < 2:
        raise QuantizeError(
            "calibration data has a single image: activation ranges from one sample are not ranges"
        )
    for batch in batches:
        if tuple(batch.shape[1:]) != tuple(shape):
            raise QuantizeError(
                f"calibration batch has shape {tuple(batch.shape[1:])}, the model takes {tuple(shape)}"
            )
        if not np.isfinite(batch).all():
            raise QuantizeError(
                "calibration data holds NaN or Inf values", hint="check the images and mean/std"
            )


# --------------------------------------------------------------------------- quantization


def check_target(cfg: QuantizeConfig) -> None:
    """A GPU preset on a machine without that execution provider: say so before any work."""
    from vitcompress.runtime import Provider, require_provider

    if cfg.provider == "cpu" or not cfg.verify_provider:
        return
    try:
        require_provider(Provider(cfg.provider))
    except VitcompressError as err:
        target = f"preset {cfg.preset!r}" if cfg.preset else f"provider {cfg.provider!r}"
        raise QuantizeError(
            f"{target} targets {cfg.provider}, which this machine's onnxruntime does not have",
            hint="run on the target machine, or set verify_provider: false (--no-verify-provider) to build "
            "the file here and measure it there",
        ) from err


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(Counter(node.op_type for node in graph.node))


def quantized_counts(counts: dict[str, int]) -> dict[str, int]:
    """Nodes that carry integer math or integer tensors."""
    names = (
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinear",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantize",
    )
    return {op: n for op, n in counts.items() if op.startswith(names)}


def _already_quantized(path: Path) -> bool:
    """Integer nodes or float16 weights: quantizing again would stack errors."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    return bool(quantized_counts(dict(ops))) or fp16


def _attention_matmuls(path: Path) -> list[str]:
    """MatMul nodes whose inputs are both activations (q@k, attn@v): excluded unless asked for."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)
    ]


def quantize_file(
    source: Path,
    target: Path,
    cfg: QuantizeConfig,
    calibration: Dataset | None,
    keep_float: list[str] | None = None,
) -> dict[str, Any]:
    """Quantize `source` into `target` atomically; returns what was done (counts, settings)."""
    import tempfile

    import onnxruntime as ort  # noqa: F401  (fail early with ORT's own import error)
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from vitcompress.fileio import atomic_dir
    from vitcompress.runtime import OnnxRunner, check_onnx_file

    check_onnx_file(source)
    check_target(cfg)
    if _already_quantized(source):
        raise QuantizeError(
            f"{source} is already quantized (or float16)", hint="quantize the float32 export instead"
        )
    if cfg.mode is Mode.auto:
        raise QuantizeError("quantize_file builds one model; mode auto is resolved by quantize_model")
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(target.parent) as staging:
        prepared = Path(scratch) / "prepared.onnx"
        staged = staging / target.name
        if cfg.mode is Mode.fp16:
            _to_fp16(source, staged)
        else:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
            excluded = list(cfg.exclude) + list(keep_float or [])
            if not cfg.quantize_attention:
                excluded += _attention_matmuls(prepared)
            common: dict[str, Any] = {
                "per_channel": cfg.per_channel,
                "reduce_range": cfg.reduce_range,
                "weight_type": types[cfg.weight_type],
                "op_types_to_quantize": ["MatMul", "Gemm"],
                "nodes_to_exclude": excluded,
            }
            if cfg.mode is Mode.dynamic:
                quantize_dynamic(str(prepared), str(staged), **common)
            else:
                if calibration is None:
                    raise QuantizeError(
                        "static quantization needs calibration data",
                        hint="add data.calibration, or mode: dynamic",
                    )
                runner = OnnxRunner(prepared)
                reader = DatasetReader(calibration, runner.input_name, cfg.calibration_batch)
                check_calibration(reader.batches, tuple(runner.input_shape[1:]))
                method = {
                    Calibration.minmax: CalibrationMethod.MinMax,
                    Calibration.entropy: CalibrationMethod.Entropy,
                    Calibration.percentile: CalibrationMethod.Percentile,
                }[cfg.calibration]
                extra: dict[str, Any] = (
                    {"CalibPercentile": cfg.percentile} if cfg.calibration is Calibration.percentile else {}
                )
                if cfg.activation_type == "int8":
                    extra["ActivationSymmetric"] = True
                if not cfg.quantize_outputs:
                    extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
                extra["CalibStridedMinMax"] = 1  # one batch at a time: see DatasetReader
                # ORT's histogram calibrators print progress to stdout, which belongs to --json:
                # kept as debug messages (shown with --verbose)
                chatter = io.StringIO()
                with contextlib.redirect_stdout(chatter):
                    quantize_static(
                        str(prepared),
                        str(staged),
                        reader,
                        quant_format=QuantFormat.QDQ,
                        activation_type=types[cfg.activation_type],
                        calibrate_method=method,
                        extra_options=extra,
                        **common,
                    )
                for line in chatter.getvalue().splitlines():
                    if line.strip():
                        log.debug("onnxruntime: %s", line.strip())
        counts = op_counts(staged)
        quantized = quantized_counts(counts)
        if cfg.mode is not Mode.fp16 and not quantized:
            raise QuantizeError(
                f"ONNX Runtime quantized nothing in {source.name}", hint="check op_types / exclude"
            )
        OnnxRunner(staged)  # the result must open
    return {
        "op_counts": counts,
        "quantized_counts": quantized,
        "excluded": [*cfg.exclude, *(keep_float or [])],
    }


def quantizable_nodes(path: Path, cfg: QuantizeConfig) -> list[str]:
    """The nodes quantization touches: MatMul/Gemm with a weight (and attention matmuls if asked)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    attention = set() if cfg.quantize_attention else set(_attention_matmuls(path))
    return [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and n.name not in attention and n.name not in cfg.exclude
    ]


def _logit_error(float_path: Path, quant_path: Path, batches: list[np.ndarray]) -> float:
    import numpy as np

    from vitcompress.runtime import OnnxRunner

    a, b = OnnxRunner(float_path), OnnxRunner(quant_path)
    return float(np.mean([np.mean((a.run(x) - b.run(x)) ** 2) for x in batches]))


@dataclass
class GateResult:
    drop_points: float
    keep_float: list[str]
    tried: int
    met: bool
    details: dict[str, Any]


def quantize_with_gate(
    source: Path, target: Path, cfg: QuantizeConfig, calibration: Dataset | None, eval_data: Dataset
) -> GateResult:
    """Quantize; while top-1 drops more than `max_top1_drop`, return the most sensitive layers to float.

    Sensitivity of a layer: how much the logit error against the float model falls when only that
    layer stays float. Layers go back to float in that order, doubling the count each round, until
    the budget holds or time runs out; the best model found is always the one left in `target`.
    """
    import shutil
    import tempfile

    assert cfg.max_top1_drop is not None
    started = time.perf_counter()
    details = quantize_file(source, target, cfg, calibration)
    measured = agreement(source, target, eval_data)
    drop = 100 * (measured["float_top1"] - measured["quantized_top1"])
    best = GateResult(drop, [], 1, drop <= cfg.max_top1_drop, {**details, "agreement": measured})
    if best.met:
        return best
    probe = [x.numpy() for x, _ in eval_data.batches(64, limit_batches=4)]
    nodes = quantizable_nodes(source, cfg)
    log.info("top-1 drop %.2f > %.2f points: sensitivity of %d layers", drop, cfg.max_top1_drop, len(nodes))
    ranked: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        trial = Path(scratch) / "trial.onnx"
        base_error = _logit_error(source, target, probe)
        sensitivity: dict[str, float] = {}
        for node in nodes:
            if time.perf_counter() - started > cfg.fallback_time_limit_s:
                break
            quantize_file(source, trial, cfg, calibration, keep_float=[node])
            sensitivity[node] = base_error - _logit_error(source, trial, probe)
        ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
        # 1, 2, 4, ... layers back to float; at least one layer always stays quantized
        counts = sorted({min(2**k, len(ranked) - 1) for k in range(len(ranked).bit_length() + 1)} - {0})
        for count in counts:
            if time.perf_counter() - started > cfg.fallback_time_limit_s:
                break
            keep = ranked[:count]
            trial_details = quantize_file(source, trial, cfg, calibration, keep_float=keep)
            measured = agreement(source, trial, eval_data)
            drop = 100 * (measured["float_top1"] - measured["quantized_top1"])
            log.info("%d layer(s) back to float: top-1 drop %.2f points", count, drop)
            best.tried += 1
            if drop < best.drop_points:
                shutil.copyfile(trial, target)
                best = GateResult(
                    drop,
                    keep,
                    best.tried,
                    drop <= cfg.max_top1_drop,
                    {**trial_details, "agreement": measured},
                )
            if drop <= cfg.max_top1_drop:
                break
    best.details["sensitivity_ranked"] = ranked[:20]
    return best


def _to_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(source))
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        # opset-17 exports carry LayerNormalization as one op; blocking more ops (ReduceMean, Pow, Erf)
        # makes this converter emit duplicate cast names (measured: onnxruntime 1.31)
        op_block_list=["LayerNormalization", "Softmax"],
    )
    wrapped = OnnxModel(converted)
    wrapped.topological_sort()  # the converter appends its input casts after their consumers
    onnx.save(wrapped.model, str(target))
    onnx.checker.check_model(str(target), full_check=True)


def agreement(float_path: Path, quant_path: Path, data: Dataset) -> dict[str, float]:
    """Top-1 agreement and max |Δlogit| of the quantized model against the float one on real data,
    in batches of the run's one evaluation batch size (what validate scores with too). Each file
    runs on its own runtime (.onnx on ONNX Runtime, .xml on OpenVINO)."""
    import numpy as np

    from vitcompress.accuracy import EVAL_BATCH_SIZE, file_runner
    from vitcompress.runtimes import Runtime

    def runner(path: Path):  # type: ignore[no-untyped-def]
        # an OpenVINO IR on OpenVINO (its recorded precision hint); anything else is ONNX, staged
        # files (.onnx.XXXX.tmp) included
        return file_runner(path, runtime=Runtime.openvino if path.suffix == ".xml" else Runtime.ort)

    a, b = runner(Path(float_path)), runner(Path(quant_path))
    same = total = 0
    worst = 0.0
    correct_a = correct_b = 0
    for x, y in data.batches(EVAL_BATCH_SIZE):
        la, lb = a.run(x.numpy()), b.run(x.numpy())
        same += int((la.argmax(1) == lb.argmax(1)).sum())
        correct_a += int((la.argmax(1) == y.numpy()).sum())
        correct_b += int((lb.argmax(1) == y.numpy()).sum())
        worst = max(worst, float(np.abs(la - lb).max()))
        total += len(y)
    return {
        "top1_agreement": same / total,
        "max_abs_diff": worst,
        "float_top1": correct_a / total,
        "quantized_top1": correct_b / total,
        "samples": total,
    }


def _quantize_one(
    source: Path, target: Path, cfg: QuantizeConfig, calibration: Dataset | None, eval_data: Dataset | None
) -> dict[str, Any]:
    """One quantized model: through the accuracy gate when max_top1_drop is set, else as asked."""
    if cfg.max_top1_drop is None:
        details = quantize_file(source, target, cfg, calibration)
        if eval_data is not None:
            details["agreement"] = agreement(source, target, eval_data)
        return details
    if eval_data is None:
        raise QuantizeError("max_top1_drop needs held-out data", hint="add data.eval (or --eval-data)")
    gate = quantize_with_gate(source, target, cfg, calibration, eval_data)
    return {
        **gate.details,
        "gate": {
            "max_top1_drop": cfg.max_top1_drop,
            "drop_points": gate.drop_points,
            "met": gate.met,
            "kept_float": gate.keep_float,
            "models_tried": gate.tried,
        },
    }


def refuse_integer_only_file(cfg: QuantizeConfig) -> None:
    """integer-only reads the PyTorch model's weights: an ONNX file alone is not enough."""
    if cfg.mode is Mode.integer_only:
        raise QuantizeError(
            "integer-only is built from the PyTorch model (its weights and calibrated ranges), not from an "
            "ONNX file",
            hint="run it in a recipe after export: vitcompress compress --recipe int-only (or a quantize "
            "pass with preset: int-only)",
        )


AUTO_SCRATCH = ".quantize-auto-"  # + pid: scratch of auto mode beside the target


def quantize_model(
    source: Path,
    target: Path,
    cfg: QuantizeConfig,
    calibration: Dataset | None,
    eval_data: Dataset | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """Quantize `source` into `target` as `cfg` says: what the pass and the command both run.

    Every candidate is built and gated under a temporary name; `target` appears (one rename) only
    once the accuracy gate has decided, so a kill at any point never leaves an ungated model under
    the final name. Scratch that killed runs left beside `target` is removed first.
    """
    from vitcompress.fileio import atomic_path
    from vitcompress.rundir import clean_dead_scratch

    refuse_integer_only_file(cfg)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_dead_scratch(target.parent, target.name)
    if cfg.runtime == "openvino":  # an IR is two files: written together by the OpenVINO path itself
        from vitcompress.passes.quantize_openvino import quantize_openvino

        return quantize_openvino(source, target, cfg, calibration, eval_data, threads)
    with atomic_path(target) as staged:
        details = _quantize_staged(source, staged, cfg, calibration, eval_data, threads)
    from vitcompress.runtimes.ort import file_precision, version

    # what the result runs on (every record names runtime, version, precision, threads)
    details["runtime"] = {
        "runtime": "ort",
        "version": version(),
        "precision": file_precision(target).value,
        "threads": threads,
    }
    if cfg.ort_format:
        from dataclasses import asdict

        from vitcompress.runtimes.convert import Target, convert_model

        mobile = convert_model(target, Target.ort_mobile, target.with_suffix(".ort"))
        details["ort_mobile"] = {
            **{k: v for k, v in asdict(mobile).items() if k in ("parity", "size_bytes", "details")},
            "path": str(mobile.path),
        }
        log.info("wrote %s (ORT mobile format): %s", mobile.path.name, mobile.details.get("mobile_usability"))
    return details


def _quantize_staged(
    source: Path,
    target: Path,
    cfg: QuantizeConfig,
    calibration: Dataset | None,
    eval_data: Dataset | None,
    threads: int,
) -> dict[str, Any]:
    """quantize_model's work, into a staging path.

    In auto mode, static (calibrated QDQ) and dynamic INT8 are both built, each through the gate,
    and timed against each other on this machine (ONNX Runtime CPU, batch 1, interleaved); the
    faster one that holds max_top1_drop is kept (if neither holds it, the one with the smaller
    drop). Static needs one more kernel per linear layer than dynamic's fused quantize+matmul, so on
    small models the one-liner's graph can be the faster: auto never ships the slower of the two.
    """
    import os
    import tempfile

    from vitcompress.timing import bench_models

    if cfg.mode is not Mode.auto:
        return _quantize_one(source, target, cfg, calibration, eval_data)
    built: dict[Mode, tuple[Path, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f"{AUTO_SCRATCH}{os.getpid()}-") as scratch:
        for mode in (Mode.static, Mode.dynamic):
            path = Path(scratch) / f"{mode.value}.onnx"
            one = cfg.model_copy(update={"mode": mode})
            built[mode] = (
                path,
                _quantize_one(source, path, one, calibration if mode is Mode.static else None, eval_data),
            )
        report = bench_models([path for path, _ in built.values()], threads=threads, warmup=5, runs=30)
        p50 = {mode: report.find(str(path), 1).p50_ms for mode, (path, _) in built.items()}

        def preference(mode: Mode) -> tuple[bool, float]:
            gate = built[mode][1].get("gate")
            if gate is None or gate["met"]:
                return (False, p50[mode])
            return (True, gate["drop_points"])

        chosen = min(built, key=preference)
        os.replace(built[chosen][0], target)
    log.info(
        "auto: static %.3f ms, dynamic %.3f ms at batch 1 (%d threads): kept %s",
        p50[Mode.static],
        p50[Mode.dynamic],
        threads,
        chosen.value,
    )
    details = built[chosen][1]
    details["auto"] = {
        "chosen": chosen.value,
        "p50_ms": {m.value: t for m, t in p50.items()},
        "threads": threads,
    }
    return details


def _integer_only(
    state: ModelState, target: Path, cfg: QuantizeConfig, calibration: Dataset, eval_data: Dataset | None
) -> dict[str, Any]:
    """The integer-only model of the current PyTorch model, with the exported file's metadata; the
    accuracy gate measures it (there is no float to fall back to)."""
    from vitcompress.accuracy import onnx_metadata
    from vitcompress.passes.intonly.build import Finetune, quantize_integer_only

    assert state.onnx_path is not None
    if state.model_changed and state.records and state.records[-1].kind != "export":
        log.info("integer-only reads the current PyTorch model, as exported by the last export pass")
    percentile = cfg.percentile if cfg.calibration is Calibration.percentile else None
    finetune = None
    if cfg.finetune_steps:
        train = state.load_split("train", f"{cfg.step_name} (finetune_steps)")
        finetune = Finetune(train, cfg.finetune_steps, cfg.finetune_lr)
    details = quantize_integer_only(
        state.model, target, calibration, percentile, onnx_metadata(state.onnx_path), finetune
    )
    if cfg.max_top1_drop is not None and eval_data is not None:
        measured = agreement(state.onnx_path, target, eval_data)
        drop = 100 * (measured["float_top1"] - measured["quantized_top1"])
        details["agreement"] = measured
        details["gate"] = {
            "max_top1_drop": cfg.max_top1_drop,
            "drop_points": drop,
            "met": drop <= cfg.max_top1_drop,
            "kept_float": [],
            "models_tried": 1,
        }
    return details


def run(state: ModelState, cfg: QuantizeConfig) -> ModelState:
    from vitcompress.errors import RecipeError
    from vitcompress.runtime import onnx_size
    from vitcompress.state import Measured, Parity

    if state.onnx_path is None:
        raise RecipeError("quantize needs an ONNX model: put an export pass before it")
    calibration = None
    if cfg.needs_data():
        calibration = state.load_split(
            "calibration", f"{cfg.step_name} ({cfg.mode.value})", cfg.calibration_size
        )
    target = state.settings.out_dir / cfg.filename
    has_eval = state.data_spec("eval") is not None
    eval_data = None
    if cfg.max_top1_drop is not None:
        eval_data = state.load_split("eval", f"{cfg.step_name} (max_top1_drop)")
    if cfg.mode is Mode.integer_only:
        assert calibration is not None  # needs_data() loaded it
        details = _integer_only(state, target, cfg, calibration, eval_data)
    else:
        details = quantize_model(state.onnx_path, target, cfg, calibration, eval_data, state.settings.threads)
    gate = details.get("gate")
    if gate is not None and not gate["met"]:
        details["gate_failure"] = (
            f"{cfg.step_name}: top-1 drop {gate['drop_points']:.2f} points > max_top1_drop {cfg.max_top1_drop:g} "
            f"even with {len(gate['kept_float'])} layer(s) in float; the best model found is {target}"
        )
    measured = details.get("agreement")
    if measured is None and (has_eval or state.data_spec("calibration") is not None):
        check_data = state.load_split("eval" if has_eval else "calibration", cfg.step_name, 1000)
        measured = agreement(state.onnx_path, target, check_data)
    parity = None
    top1 = None
    if measured is not None:
        details["agreement"] = measured
        parity = Parity(
            measured["max_abs_diff"],
            0.0,
            measured["top1_agreement"],
            int(measured["samples"]),
            str(state.onnx_path),
        )
        if has_eval:
            top1 = measured["quantized_top1"]
    log.info("quantized %s: %s", target.name, details["quantized_counts"])
    last = state.records[-1] if state.records else None
    outcome = Measured(
        params=last.params if last else None,
        macs=last.macs if last else None,
        size_bytes=onnx_size(target),
        parity=parity,
        top1=top1,
        artifact=str(target),
        details={**details, "settings": cfg.model_dump(mode="json")},
    )
    return state.passed(cfg, outcome, onnx_path=target)
