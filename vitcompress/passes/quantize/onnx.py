"""ONNX Runtime quantization of one file: QDQ/dynamic INT8 or fp16, the quantized-node check, and the
accuracy gate that puts layers back in float until the top-1 drop holds."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.errors import QuantizeError, VitcompressError
from vitcompress.passes.quantize.calibration import DatasetReader, check_calibration
from vitcompress.passes.quantize.config import Calibration, Mode, QuantizeConfig

if TYPE_CHECKING:
    import numpy as np

    from vitcompress.data import Dataset

log = logging.getLogger(__name__)


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
