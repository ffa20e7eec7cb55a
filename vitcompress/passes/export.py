"""Export to ONNX, then prove the file: checker, ONNX Runtime session, parity against PyTorch.

Default exporter: TorchScript (`torch.onnx.export(dynamo=False)`). Measured here (torch 2.15,
onnxruntime 1.31, deit_tiny): both exporters give the same logits, but ORT's `quantize_dynamic` fails
on the dynamo graph with a shape-inference error, while the TorchScript graph quantizes and gets
the same LayerNorm/GELU fusions from ORT's transformer optimizer. `dynamo` stays available.
A dynamic batch axis is always exported; parity is checked at batch 1 and at the parity batch
(an unchecked export once cost timm users 7% accuracy: timm#2463).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from vitcompress.choices import FileRuntime, Runtime
from vitcompress.errors import ExportError, ParityError
from vitcompress.passes.base import PassConfig
from vitcompress.runtimes.base import METADATA_KEY, default_ir_precision
from vitcompress.state import Measured, ModelState, Parity

if TYPE_CHECKING:
    from vitcompress.models.loader import InputSpec, LoadedModel
    from vitcompress.runtime import OnnxRunner
    from vitcompress.runtimes.base import Runner
    from vitcompress.runtimes.target import TargetSection

log = logging.getLogger(__name__)

MIN_OPSET = 14  # scaled_dot_product_attention exports from opset 14
MAX_OPSET = 21


class Exporter(str, Enum):
    torchscript = "torchscript"
    dynamo = "dynamo"


class ExportConfig(PassConfig):
    """Export the current model to ONNX (fp32) and verify it against PyTorch."""

    summary: ClassVar[str] = "export to ONNX (fp32) and check parity against PyTorch"
    engine: ClassVar[str] = "vitcompress.passes.export"
    produces_onnx: ClassVar[bool] = True

    @classmethod
    def target_defaults(cls, target: TargetSection) -> dict[str, Any]:
        if target.runtime != "openvino":
            return {}
        hint = target.precision_hint
        return {"runtime": "openvino", **({"precision": hint} if hint else {})}

    kind: Literal["export"] = "export"
    exporter: Exporter = Field(
        Exporter.torchscript,
        description="torchscript: graphs ONNX Runtime quantizes and fuses (default); dynamo: torch.export based.",
    )
    opset: int = Field(17, description=f"ONNX opset, {MIN_OPSET}-{MAX_OPSET}.")
    filename: str = Field("model.onnx", description="File name inside the output directory.")
    parity_batch: int = Field(8, ge=2, le=256, description="Images in the parity batch (random, seeded).")
    atol: float = Field(1e-4, gt=0, description="Parity gate: max |Δlogit| <= atol + rtol * max|logit|.")
    rtol: float = Field(1e-4, ge=0, description="Relative part of the parity gate.")
    min_top1_agreement: float = Field(1.0, gt=0, le=1, description="Parity gate on top-1 agreement.")
    runtime: FileRuntime = Field(
        Runtime.ort,
        description="ort: the ONNX file; openvino: also an OpenVINO IR (.xml + .bin, same name) converted "
        "from the parity-checked ONNX, carrying the same metadata and itself checked against PyTorch.",
    )
    precision: Literal["fp32", "bf16"] | None = Field(
        None,
        description="openvino: the inference precision hint recorded with the IR and checked for parity "
        "(fp32 is always checked; bf16 with its looser tolerance). Default: bf16 on CPUs with AVX512_BF16 "
        "or AMX (what OpenVINO would pick), else fp32.",
    )

    @field_validator("opset")
    @classmethod
    def _opset_range(cls, value: int) -> int:
        if value < MIN_OPSET:
            raise ValueError(
                f"opset {value} is too old for ViT attention (scaled_dot_product_attention exports from "
                f"opset {MIN_OPSET}); use {MIN_OPSET}-{MAX_OPSET}, 17 recommended"
            )
        if value > MAX_OPSET:
            raise ValueError(
                f"opset {value} is newer than this toolchain supports; use {MIN_OPSET}-{MAX_OPSET}"
            )
        return value


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str
    opset: int
    size_bytes: int
    parity: Parity
    batch_sizes_checked: tuple[int, ...]
    op_counts: dict[str, int]
    wall_s: float
    ir_path: Path | None = None  # the OpenVINO IR, with runtime openvino
    ir_parity: dict[str, dict[str, object]] | None = None  # per precision hint: parity, tolerance, runner


@contextlib.contextmanager
def _static_attention_scale() -> Iterator[None]:
    """During a TorchScript export, give scaled_dot_product_attention its scale as a number.

    Called without one (as timm and transformers do), the exporter computes 1/sqrt(head_dim) at run
    time from the query's shape: Shape, Slice, Cast, Sqrt and Div nodes in every block, which ONNX
    Runtime cannot fold under a dynamic batch axis. The head size is fixed, so the value is too.
    """
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def with_scale(query, key, value, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(args) < 4 and kwargs.get("scale") is None:  # args: attn_mask, dropout_p, is_causal, scale
            kwargs["scale"] = float(query.shape[-1]) ** -0.5
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = with_scale
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _torch_export(loaded: LoadedModel, path: Path, cfg: ExportConfig) -> None:
    import torch

    example = loaded.example_input(2, seed=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # the TorchScript exporter's deprecation notice; our choice is explicit
        if cfg.exporter is Exporter.torchscript:
            with _static_attention_scale():
                torch.onnx.export(
                    loaded.model,
                    (example,),
                    str(path),
                    dynamo=False,
                    opset_version=cfg.opset,
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                    input_names=["input"],
                    output_names=["logits"],
                )
        else:
            try:
                import onnxscript  # noqa: F401
            except ImportError as err:
                raise ExportError(
                    "the dynamo exporter needs the 'onnxscript' package",
                    hint="pip install onnxscript, or use --exporter torchscript",
                ) from err
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(
                loaded.model,
                (example,),
                dynamo=True,
                opset_version=cfg.opset,
                dynamic_shapes=({0: batch},),
                verbose=False,
                input_names=["input"],
                output_names=["logits"],
            )
            assert program is not None
            program.save(str(path))




def metadata(
    loaded: LoadedModel, input_spec: InputSpec | None = None, classes: tuple[str, ...] | None = None
) -> dict[str, object]:
    """What the file records: the preprocessing (size, interpolation, crop, pixel range, mean/std:
    the model's own, or the data's overrides when the run had them), the class count and, when the
    run's data named them, the class names."""
    spec = input_spec or loaded.input
    out: dict[str, object] = {
        "input": spec.to_dict(),
        "num_classes": loaded.num_classes,
        "source": loaded.label,
    }
    if classes is not None and len(classes) == loaded.num_classes:
        out["classes"] = list(classes)
    elif classes is not None:
        log.warning(
            "class names not recorded: the data names %d classes, the model has %d",
            len(classes),
            loaded.num_classes,
        )
    return out


def _write_metadata(path: Path, entry_value: dict[str, object]) -> None:
    """Record the preprocessing and classes in the file, so `eval` and calibration can feed it real data."""
    import json

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = (
        next((p for p in model.metadata_props if p.key == METADATA_KEY), None) or model.metadata_props.add()
    )
    entry.key = METADATA_KEY
    entry.value = json.dumps(entry_value)
    onnx.save(model, str(path))


def measure_parity(
    loaded: LoadedModel, runner: OnnxRunner | Runner, batch: int, seed: int, reference: str
) -> Parity:
    import numpy as np
    import torch

    images = loaded.example_input(batch, seed=seed)
    with torch.no_grad():
        expected = loaded.model(images).float().numpy()
    got = runner.run(images.numpy())
    if got.shape != expected.shape:
        raise ParityError(f"{runner.path.name}: output shape {got.shape}, PyTorch gives {expected.shape}")
    return Parity(
        max_abs_diff=float(np.abs(got - expected).max()),
        max_abs_reference=float(np.abs(expected).max()),
        top1_agreement=float((got.argmax(1) == expected.argmax(1)).mean()),
        batch=batch,
        reference=reference,
    )


def export_model(
    loaded: LoadedModel,
    path: Path,
    cfg: ExportConfig,
    seed: int = 0,
    input_spec: InputSpec | None = None,
    classes: tuple[str, ...] | None = None,
) -> ExportResult:
    """Export `loaded` to `path` atomically and verify it; raises ParityError past the tolerance.

    `input_spec` (default: the model's) and `classes` go into the file's metadata."""
    import onnx

    from vitcompress.fileio import atomic_dir
    from vitcompress.runtime import OnnxRunner, onnx_size

    start = time.perf_counter()
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"output {path} must end in .onnx", hint=f"use {path.with_suffix('.onnx')}")
    loaded.model.eval()
    with atomic_dir(path.parent) as tmp:
        staged = tmp / path.name
        try:
            _torch_export(loaded, staged, cfg)
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(
                f"{cfg.exporter.value} export of {loaded.label} failed: {str(err).strip().splitlines()[0]}",
                hint="try the other --exporter, or rerun with --debug for the traceback",
            ) from err
        _write_metadata(staged, metadata(loaded, input_spec, classes))
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as err:
            raise ExportError(f"the exported graph fails onnx.checker: {str(err).splitlines()[0]}") from err
        graph = onnx.load(str(staged), load_external_data=False).graph
        op_counts = dict(Counter(node.op_type for node in graph.node).most_common())
        # Dynamic batch: the file must match at batch 1 as well as at the parity batch.
        runner = OnnxRunner(staged)
        for batch in (1, cfg.parity_batch):
            parity = measure_parity(loaded, runner, batch, seed + batch, reference=f"PyTorch {loaded.label}")
            tolerance = cfg.atol + cfg.rtol * parity.max_abs_reference
            if parity.max_abs_diff > tolerance or parity.top1_agreement < cfg.min_top1_agreement:
                raise ParityError(
                    f"{path.name} does not match PyTorch at batch {batch}: max |Δlogit| "
                    f"{parity.max_abs_diff:.3g} (allowed {tolerance:.3g}), top-1 agreement "
                    f"{parity.top1_agreement:.3f} (required {cfg.min_top1_agreement:.3f})",
                    hint="try the other --exporter or another --opset; the file was not written",
                )
        ir_parity = None
        if cfg.runtime == "openvino":
            ir_parity = _export_ir(loaded, staged, tmp / path.with_suffix(".xml").name, cfg, seed)
    size = onnx_size(path)
    return ExportResult(
        path=path,
        exporter=cfg.exporter.value,
        opset=cfg.opset,
        size_bytes=size,
        parity=parity,
        batch_sizes_checked=(1, cfg.parity_batch),
        op_counts=op_counts,
        wall_s=time.perf_counter() - start,
        ir_path=path.with_suffix(".xml") if ir_parity is not None else None,
        ir_parity=ir_parity,
    )


def _export_ir(
    loaded: LoadedModel, onnx_file: Path, xml: Path, cfg: ExportConfig, seed: int
) -> dict[str, dict[str, object]]:
    """Convert the parity-checked ONNX file to OpenVINO IR beside it (in the staging folder) with the
    ONNX file's metadata plus the precision hint, then check the IR against PyTorch under fp32 and
    under that hint, each with its own tolerance (runtimes.parity)."""
    from vitcompress.runtimes import parity as gate
    from vitcompress.runtimes.base import Precision
    from vitcompress.runtimes.openvino import OpenVINORunner, convert_onnx, onnx_file_metadata, save_ir

    hint = cfg.precision or default_ir_precision()
    meta = {**(onnx_file_metadata(onnx_file) or {}), "precision_hint": hint}
    save_ir(convert_onnx(onnx_file), xml, meta, atomic=False)
    checked: dict[str, dict[str, object]] = {}
    for precision in dict.fromkeys([Precision.fp32, Precision(hint)]):
        runner = OpenVINORunner(xml, precision=precision, threads=None)
        tolerance = gate.tolerance_for(runner.info.precision)
        for batch in (1, cfg.parity_batch):
            parity = measure_parity(loaded, runner, batch, seed + batch, reference=f"PyTorch {loaded.label}")
            gate.check(
                parity,
                tolerance,
                f"OpenVINO IR {xml.name} ({runner.info.precision})",
                "export with runtime ort and report the model; the files were not written",
            )
        checked[precision.value] = gate.report(parity, tolerance, runner.info.to_dict())
    return checked


def run(state: ModelState, cfg: ExportConfig) -> ModelState:
    from vitcompress.data import describe_input, recipe_preprocessing
    from vitcompress.models.stats import count_macs

    input_spec, classes, split = recipe_preprocessing(state.settings.data, state.model.input)
    result = export_model(
        state.model,
        state.settings.out_dir / cfg.filename,
        cfg,
        seed=state.settings.seed,
        input_spec=input_spec,
        classes=classes,
    )
    log.info(
        "%s records its preprocessing (%s, from %s)%s",
        result.path.name,
        describe_input(input_spec),
        f"data.{split}" if split else "the model",
        f" and {len(classes)} class names" if classes else "",
    )
    log.info(
        "exported %s: max |Δlogit| %.2e, top-1 agreement %.3f",
        result.path.name,
        result.parity.max_abs_diff,
        result.parity.top1_agreement,
    )
    macs, _ = count_macs(state.model)
    outcome = Measured(
        params=sum(p.numel() for p in state.model.model.parameters()),
        macs=macs,
        size_bytes=result.size_bytes,
        parity=result.parity,
        artifact=str(result.path),
        details={
            "exporter": result.exporter,
            "opset": result.opset,
            "nodes": sum(result.op_counts.values()),
            "preprocessing": {**input_spec.to_dict(), "from": f"data.{split}" if split else "model"},
            **({"classes": list(classes)} if classes and len(classes) == state.model.num_classes else {}),
            **(
                {"openvino": {"ir": str(result.ir_path), "parity": result.ir_parity}}
                if result.ir_path is not None
                else {}
            ),
        },
    )
    baseline = state.baseline_onnx or (None if state.model_changed else result.path)
    return state.passed(cfg, outcome, onnx_path=result.path, baseline_onnx=baseline)
