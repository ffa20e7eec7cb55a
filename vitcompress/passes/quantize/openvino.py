"""INT8 for OpenVINO: NNCF's post-training quantization, and vitcompress's own QDQ file run by OpenVINO.

NNCF (`nncf.quantize` with `model_type=TRANSFORMER`, which keeps LayerNorm, Softmax and GELU in
float the way ViTs need, the SmoothQuant-free default for this model type) calibrates on the same
class-stratified calibration images as the ONNX Runtime path. With `max_top1_drop` it runs
`nncf.quantize_with_accuracy_control`, NNCF's own layer-by-layer fallback, driven by the same eval
split and the same budget in top-1 points; the drop recorded is always the one vitcompress measures
itself, the IR on OpenVINO against the float ONNX file on ONNX Runtime, on the same batches as the
ORT path's gate (quantize.agreement).

`mode: auto` (the `cpu-x86-openvino-int8` preset) builds both candidates: NNCF's INT8 IR and
vitcompress's static QDQ ONNX file (the ORT path, gate included) converted to IR, whose Q/DQ pairs
OpenVINO reads as FakeQuantize. Both are timed on OpenVINO at batch 1, interleaved, and the faster
one that holds max_top1_drop is kept: on DeiT-S the QDQ file ran 1.07x faster on OpenVINO than
NNCF's default INT8.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitcompress.data import Dataset
    from vitcompress.passes.quantize.config import QuantizeConfig

log = logging.getLogger(__name__)


def _nncf() -> Any:
    from vitcompress.errors import MissingDependencyError

    try:
        import nncf
    except ImportError as err:
        raise MissingDependencyError(
            "INT8 for OpenVINO needs the 'nncf' package",
            hint="pip install 'nncf>=2.14,<4' (vitcompress installs it)",
        ) from err
    return nncf


def ir_op_counts(xml: Path) -> dict[str, int]:
    from vitcompress.runtimes.openvino import read_model

    return dict(Counter(op.get_type_name() for op in read_model(xml).get_ops()))


def nncf_quantize(
    source: Path, xml: Path, cfg: QuantizeConfig, calibration: Dataset, eval_data: Dataset | None
) -> dict[str, Any]:
    """NNCF INT8 of the float ONNX file into IR `xml` (with the ONNX file's metadata)."""
    from vitcompress.errors import QuantizeError
    from vitcompress.passes.quantize.calibration import check_calibration
    from vitcompress.runtimes.base import default_ir_precision
    from vitcompress.runtimes.openvino import convert_onnx, onnx_file_metadata, save_ir

    nncf = _nncf()
    model = convert_onnx(source)
    shape = tuple(d.get_length() for d in model.inputs[0].get_partial_shape()[1:])
    images = [x.numpy() for x, _ in calibration.batches(1)]
    check_calibration(images, shape)
    common: dict[str, Any] = {"subset_size": len(images), "model_type": nncf.ModelType.TRANSFORMER}
    if cfg.exclude:
        common["ignored_scope"] = nncf.IgnoredScope(names=list(cfg.exclude), validate=False)
    logging.getLogger("nncf").setLevel(logging.WARNING)
    # NNCF draws its progress bars on stdout, which belongs to --json: they go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        quantized, method = _run_nncf(nncf, model, nncf.Dataset(images), cfg, eval_data, common)
    meta = onnx_file_metadata(source)
    if meta is not None:
        meta = {**meta, "precision_hint": default_ir_precision()}
    save_ir(quantized, xml, meta, atomic=False)
    counts = ir_op_counts(xml)
    if not counts.get("FakeQuantize"):
        raise QuantizeError(f"NNCF quantized nothing in {source.name}", hint="check exclude")
    return {
        "method": method,
        "nncf": nncf.__version__,
        "model_type": "transformer",
        "subset_size": len(images),
        "op_counts": counts,
        "quantized_counts": {"FakeQuantize": counts["FakeQuantize"]},
        "excluded": list(cfg.exclude),
    }


def _run_nncf(
    nncf: Any,
    model: Any,
    calibration_set: Any,
    cfg: QuantizeConfig,
    eval_data: Dataset | None,
    common: dict[str, Any],
) -> tuple[Any, str]:
    import numpy as np

    from vitcompress.accuracy import EVAL_BATCH_SIZE
    from vitcompress.errors import QuantizeError

    if cfg.max_top1_drop is None:
        return nncf.quantize(model, calibration_set, **common), "nncf.quantize"
    if eval_data is None:
        raise QuantizeError("max_top1_drop needs held-out data", hint="add data.eval (or --eval-data)")
    batches = [(x.numpy(), y.numpy()) for x, y in eval_data.batches(EVAL_BATCH_SIZE)]

    def top1(compiled: Any, items: Any) -> tuple[float, None]:
        hits = total = 0
        for x, y in items:
            logits = compiled(x)[0]
            hits += int((np.asarray(logits).argmax(1) == y).sum())
            total += len(y)
        return hits / max(1, total), None

    quantized = nncf.quantize_with_accuracy_control(
        model,
        calibration_set,
        nncf.Dataset(batches),
        top1,
        max_drop=cfg.max_top1_drop / 100,
        drop_type=nncf.DropType.ABSOLUTE,
        **common,
    )
    return quantized, "nncf.quantize_with_accuracy_control"


def qdq_for_openvino(
    source: Path,
    xml: Path,
    cfg: QuantizeConfig,
    calibration: Dataset,
    eval_data: Dataset | None,
    scratch: Path,
) -> dict[str, Any]:
    """vitcompress's static QDQ file (the ORT path, its gate included), converted to IR."""
    from vitcompress.passes.quantize.config import Mode
    from vitcompress.passes.quantize.onnx import _quantize_one
    from vitcompress.runtimes.base import default_ir_precision
    from vitcompress.runtimes.openvino import onnx_to_ir

    qdq = scratch / "qdq.onnx"
    ort_cfg = cfg.model_copy(update={"runtime": "ort", "mode": Mode.static})
    details = _quantize_one(source, qdq, ort_cfg, calibration, eval_data)
    onnx_to_ir(qdq, xml, atomic=False, extra={"precision_hint": default_ir_precision()})
    counts = ir_op_counts(xml)
    return {
        **details,
        "method": "vitcompress static QDQ (onnxruntime.quantization), read by OpenVINO",
        "onnx_quantized_counts": details["quantized_counts"],
        "op_counts": counts,
        "quantized_counts": {"FakeQuantize": counts.get("FakeQuantize", 0)},
    }


def quantize_openvino(
    source: Path,
    target: Path,
    cfg: QuantizeConfig,
    calibration: Dataset | None,
    eval_data: Dataset | None,
    threads: int,
) -> dict[str, Any]:
    """Build the OpenVINO INT8 IR `target` (.xml + .bin, written together once decided)."""
    from vitcompress.errors import QuantizeError
    from vitcompress.fileio import atomic_dir
    from vitcompress.passes.quantize.config import Mode
    from vitcompress.passes.quantize.onnx import agreement
    from vitcompress.runtime import check_onnx_file
    from vitcompress.runtimes.openvino import version
    from vitcompress.timing import bench_models

    target = Path(target)
    if target.suffix != ".xml":
        raise QuantizeError(
            f"runtime openvino writes OpenVINO IR: {target} must end in .xml",
            hint=f"use {target.with_suffix('.xml')}",
        )
    check_onnx_file(source)
    if cfg.mode not in (Mode.static, Mode.auto):
        raise QuantizeError(
            f"runtime openvino has no {cfg.mode.value} mode: its INT8 is calibrated (static) NNCF or QDQ",
            hint="use mode static (NNCF) or auto (NNCF and vitcompress's QDQ file, the faster kept)",
        )
    if calibration is None:
        raise QuantizeError("INT8 for OpenVINO needs calibration data", hint="add data.calibration or --data")
    kinds = ["nncf", "qdq"] if cfg.mode is Mode.auto else ["nncf"]
    built: dict[str, tuple[Path, dict[str, Any]]] = {}
    from vitcompress.passes.quantize.onnx import AUTO_SCRATCH

    # the ORT path's scratch prefix: a killed run's leftovers are cleaned the same way
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f"{AUTO_SCRATCH}{os.getpid()}-ov-") as scratch:
        for kind in kinds:
            xml = Path(scratch) / kind / target.name
            xml.parent.mkdir()
            if kind == "nncf":
                details = nncf_quantize(source, xml, cfg, calibration, eval_data)
            else:
                details = qdq_for_openvino(source, xml, cfg, calibration, eval_data, Path(scratch))
            if eval_data is not None:
                measured = agreement(source, xml, eval_data)
                details["agreement"] = measured
                if cfg.max_top1_drop is not None:
                    drop = 100 * (measured["float_top1"] - measured["quantized_top1"])
                    ort_gate = details.pop("gate", None)
                    details["gate"] = {
                        "max_top1_drop": cfg.max_top1_drop,
                        "drop_points": drop,
                        "met": drop <= cfg.max_top1_drop,
                        "kept_float": (ort_gate or {}).get("kept_float", []),
                        "models_tried": (ort_gate or {}).get("models_tried", 1),
                    }
            built[kind] = (xml, details)
        chosen = kinds[0]
        if len(built) > 1:
            report = bench_models([p for p, _ in built.values()], threads=threads, warmup=5, runs=30)
            p50 = {kind: report.find(str(path), 1).p50_ms for kind, (path, _) in built.items()}

            def preference(kind: str) -> tuple[bool, float]:
                gate = built[kind][1].get("gate")
                if gate is None or gate["met"]:
                    return (False, p50[kind])
                return (True, gate["drop_points"])

            chosen = min(built, key=preference)
            log.info(
                "auto on OpenVINO: NNCF %.3f ms, vitcompress QDQ %.3f ms at batch 1 (%d threads): kept %s",
                p50["nncf"],
                p50["qdq"],
                threads,
                chosen,
            )
        path, details = built[chosen]
        with atomic_dir(target.parent) as staging:
            for part in (path, path.with_suffix(".bin")):
                os.replace(part, staging / part.name)
    from vitcompress.runtimes.openvino import is_int8, read_model

    details["runtime"] = {
        "runtime": "openvino",
        "version": version(),
        "precision": "int8" if is_int8(read_model(target)) else "fp32",
        "threads": threads,
    }
    if len(built) > 1:
        details["auto"] = {
            "chosen": chosen,
            "p50_ms": p50,
            "threads": threads,
            "candidates": {
                kind: {k: v for k, v in d.items() if k in ("method", "agreement", "gate", "quantized_counts")}
                for kind, (_, d) in built.items()
            },
        }
    return details
