"""Build, verify and describe integer-only ONNX files: what the quantize pass and the CLI call."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcompress.errors import IntegerOnlyError, IntegerOnlyVerificationError

if TYPE_CHECKING:
    from vitcompress.data import Dataset
    from vitcompress.models.loader import LoadedModel
    from vitcompress.passes.intonly.vit import IntViT

log = logging.getLogger(__name__)


# ONNX element types by name; the integer region may hold these only
_TYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}  # fmt: skip
INTEGER_TYPES = frozenset({"uint8", "int8", "int16", "int32", "int64", "uint32", "uint64"})
BOUNDARY_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class IntegerOnlyReport:
    """What the checker found: every op type and tensor element type inside the integer region
    (between the input quantizer and the output dequantizer), and anything float in there."""

    integer_only: bool
    ops: dict[str, int]  # op type -> count, inside the integer region
    tensor_types: dict[str, int]  # element type -> tensors, inside the integer region
    boundary: dict[str, int]  # the quantizer / dequantizer nodes at the graph's edges
    violations: list[str]  # "node (op): tensor is float32", at most 20

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "yes" if self.integer_only else f"NO ({len(self.violations)} float tensor(s) inside)"
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.ops.items()))
        types = ", ".join(f"{t} {n}" for t, n in sorted(self.tensor_types.items()))
        return f"integer-only: {verdict}\nops a target must support: {ops}\ntensor types: {types}"


def check_integer_only(model: Any) -> IntegerOnlyReport:
    """Prove a graph integer-only: every node except QuantizeLinear nodes fed by a graph input and
    DequantizeLinear nodes feeding a graph output must read and write integer tensors only.

    `model`: an onnx ModelProto or a path. Types come from ONNX shape inference (strict); a tensor
    whose type cannot be inferred counts as a violation.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as err:
        raise IntegerOnlyVerificationError(
            f"shape inference failed, types cannot be proven: {str(err).splitlines()[0]}"
        ) from err
    graph = inferred.graph
    types: dict[str, str] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        types[info.name] = _TYPE_NAMES.get(
            info.type.tensor_type.elem_type, str(info.type.tensor_type.elem_type)
        )
    for init in graph.initializer:
        types[init.name] = _TYPE_NAMES.get(init.data_type, str(init.data_type))
    graph_inputs = {i.name for i in graph.input}
    graph_outputs = {o.name for o in graph.output}
    ops: Counter[str] = Counter()
    boundary: Counter[str] = Counter()
    seen: dict[str, str] = {}
    violations: list[str] = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in graph_inputs:
            boundary[f"{node.op_type} (input quantizer)"] += 1
            tensors = list(node.output)
        elif node.op_type == "DequantizeLinear" and node.output[0] in graph_outputs:
            boundary[f"{node.op_type} (output dequantizer)"] += 1
            tensors = [node.input[0]]
        else:
            ops[node.op_type] += 1
            tensors = [*node.input, *node.output]
        for name in tensors:
            if not name:
                continue
            kind = types.get(name, "unknown")
            seen[name] = kind
            if kind not in INTEGER_TYPES and len(violations) < 20:
                violations.append(f"{node.name or node.op_type} ({node.op_type}): {name} is {kind}")
    has_boundary = any("quantizer" in b for b in boundary) and any("dequantizer" in b for b in boundary)
    if not has_boundary:
        violations.append("no input quantizer / output dequantizer pair at the graph's edges")
    return IntegerOnlyReport(
        integer_only=not violations,
        ops=dict(sorted(ops.items())),
        tensor_types=dict(sorted(Counter(seen.values()).items())),
        boundary=dict(boundary),
        violations=violations,
    )


def _calibration_batches(data: Dataset, image: tuple[int, int, int], batch: int) -> list[np.ndarray]:
    batches = [x.numpy() for x, _ in data.batches(batch)]
    count = sum(len(b) for b in batches)
    if count == 0:
        raise IntegerOnlyError(
            "calibration data is empty", hint="give data.calibration (or data.train) some images"
        )
    for b in batches:
        if tuple(b.shape[1:]) != tuple(image):
            raise IntegerOnlyError(
                f"calibration batch has shape {tuple(b.shape[1:])}, the model takes {tuple(image)}"
            )
        if not np.isfinite(b).all():
            raise IntegerOnlyError(
                "calibration data holds NaN or Inf values", hint="check the images and mean/std"
            )
    return batches


@dataclass(frozen=True)
class Finetune:
    """Integer-aware fine-tuning before the build (see `qat`): steps of KD from the float model."""

    data: Dataset
    steps: int
    lr: float
    batch_size: int = 64


def plan_model(
    loaded: LoadedModel,
    calibration: Dataset,
    percentile: float | None,
    batch: int = 16,
    finetune: Finetune | None = None,
) -> IntViT:
    """Read the model, calibrate it on `calibration` (minmax, or the mean per-batch percentile of |x|
    on the int8 points when `percentile` is given) and fix every integer constant. With `finetune`,
    the weights are first trained through the integer arithmetic at the calibrated scales, which
    stay frozen: the plan quantizes where training did."""
    from vitcompress.passes.intonly.vit import calibrate, plan_integer, read_vit

    c, h, w = loaded.input.shape
    loaded.model.eval()
    vit = read_vit(loaded.model, (h, w))
    batches = _calibration_batches(calibration, (c, h, w), batch)
    stats = calibrate(vit, batches, percentile if percentile is not None else 100.0)
    plan = plan_integer(vit, stats, use_percentile=percentile is not None)
    if finetune is None or finetune.steps == 0:
        return plan
    from vitcompress.passes.intonly.qat import finetune as integer_aware_finetune

    trained, losses = integer_aware_finetune(
        vit, plan.scales, finetune.data, finetune.steps, finetune.lr, finetune.batch_size
    )
    log.info(
        "integer-aware fine-tuning: KD loss %.4f -> %.4f in %d steps", losses[0], losses[-1], len(losses)
    )
    tuned = plan_integer(trained, stats, use_percentile=percentile is not None)
    return dataclasses.replace(tuned, finetune_losses=(losses[0], losses[-1]))


SELF_CHECK_IMAGES = 2  # images run through both the NumPy reference and ONNX Runtime after every build


def write_integer_only(
    plan: IntViT, target: Path, metadata: dict[str, Any] | None, check_images: np.ndarray
) -> dict[str, Any]:
    """Write the plan's ONNX file atomically after proving it: onnx.checker, the integer-only
    checker, and ONNX Runtime's integer outputs equal to the NumPy reference's, bit for bit."""
    import onnx

    from vitcompress.fileio import atomic_path
    from vitcompress.passes.export import METADATA_KEY
    from vitcompress.passes.intonly.vit import build_onnx, reference_accumulators

    start = time.perf_counter()
    model = build_onnx(plan, expose_accumulators=True)
    report = check_integer_only(model)
    if not report.integer_only:
        raise IntegerOnlyVerificationError(f"the built graph is not integer-only: {report.violations[0]}")
    onnx.checker.check_model(model, full_check=True)
    got = _run_accumulators(model, check_images)
    expected = reference_accumulators(plan, check_images)
    if not np.array_equal(got, expected):
        diff = int(np.abs(got.astype(np.int64) - expected).max())
        raise IntegerOnlyVerificationError(
            f"ONNX Runtime's integer logits differ from the NumPy reference (max |Δ| {diff})",
            hint="this onnxruntime's integer kernels changed semantics; report it with --debug",
        )
    del model.graph.output[1:]  # the accumulator output served the check; users get float logits
    if metadata is not None:
        model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
    with atomic_path(target) as staged:
        onnx.save(model, str(staged))
    return {
        "integer_only": report.to_dict(),
        "reference_match": {"images": len(check_images), "bit_exact": True},
        "nodes": sum(report.ops.values()) + sum(report.boundary.values()),
        "build_s": time.perf_counter() - start,
    }


def _run_accumulators(model: Any, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run([model.graph.output[1].name], {"input": images.astype(np.float32)})[0])


def quantize_integer_only(
    loaded: LoadedModel,
    target: Path,
    calibration: Dataset,
    percentile: float | None,
    metadata: dict[str, Any] | None,
    finetune: Finetune | None = None,
) -> dict[str, Any]:
    """Calibrate (fine-tune), build, verify and write the integer-only model of `loaded`; returns the details."""
    plan = plan_model(loaded, calibration, percentile, finetune=finetune)
    images = next(iter(calibration.batches(SELF_CHECK_IMAGES)))[0].numpy()
    details = write_integer_only(plan, target, metadata, images)
    ops = details["integer_only"]["ops"]
    details["quantized_counts"] = {op: n for op, n in ops.items() if op in ("MatMulInteger", "BitShift")}
    details["calibration_images"] = len(calibration)
    details["scales"] = {k: float(v) for k, v in plan.scales.items()}
    if plan.finetune_losses is not None and finetune is not None:
        details["finetune"] = {
            "steps": finetune.steps,
            "lr": finetune.lr,
            "kd_loss_first_last": plan.finetune_losses,
        }
    return details
