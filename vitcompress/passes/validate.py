"""Measure the exported model on the target with ONNX Runtime, against the fp32 baseline, in one run.

The baseline is the fp32 export of the model as loaded. If the recipe changed the model before its
first export, the original model is exported here (as `baseline.onnx`) so the ratio is always taken
in the same run on the same machine. Budgets are enforced by the pipeline after the reports are written.

With data.eval, the fp32 baseline's score is checked before anything is compared against it
(`evaluate.check_sanity`): a baseline near chance, inputs off scale, or a preprocessing under which
the same images score far better is warned about loudly and recorded as `sanity`, and the pipeline
fails a max_top1_drop budget measured against such a baseline.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Literal

from pydantic import Field

from vitcompress.errors import RecipeError
from vitcompress.passes.base import PassConfig
from vitcompress.runtime import Provider
from vitcompress.state import ModelState, PassRecord

log = logging.getLogger(__name__)


class ValidateConfig(PassConfig):
    """Bench the current ONNX model (and the fp32 baseline, interleaved) with ONNX Runtime."""

    kind: Literal["validate"] = "validate"
    provider: Provider = Field(
        Provider.cpu, description="ONNX Runtime execution provider: cpu, cuda, tensorrt."
    )
    threads: int | None = Field(None, ge=1, description="Intra-op threads (default: run.threads).")
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        [1], min_length=1, description="Batch sizes; budgets apply to the first."
    )
    warmup: int = Field(10, ge=0, description="Untimed runs per model before measuring.")
    runs: int = Field(50, ge=5, description="Timed runs per model and batch size.")
    block: int = Field(
        10, ge=1, description="Timed runs in a row per model before switching (1: round-robin)."
    )
    compare_baseline: bool = Field(True, description="Measure the fp32 baseline in the same run.")
    accuracy: bool = Field(
        True,
        description="With data.eval in the recipe: top-1 of the model and of the baseline (ONNX Runtime).",
    )
    sanity: bool = Field(
        True,
        description="With accuracy: check that the fp32 baseline's score is a trustworthy reference "
        "(not near chance, inputs on the model's scale, no other common preprocessing scoring far "
        "better on a few images); a failed check fails max_top1_drop.",
    )


def run(state: ModelState, cfg: ValidateConfig) -> ModelState:
    from vitcompress.bench import bench_models, compute_floor
    from vitcompress.passes.export import ExportConfig, export_model
    from vitcompress.runtime import onnx_size

    start = time.perf_counter()
    if state.onnx_path is None:
        raise RecipeError("validate needs an ONNX model: put an export pass before it")
    baseline = state.baseline_onnx
    if cfg.compare_baseline and baseline is None:
        from vitcompress.data import recipe_preprocessing

        source = state.teacher or state.model
        input_spec, classes, _ = recipe_preprocessing(state.settings.data, source.input)
        baseline = export_model(
            source,
            state.settings.out_dir / "baseline.onnx",
            ExportConfig(),
            seed=state.settings.seed,
            input_spec=input_spec,
            classes=classes,
        ).path
    paths = [state.onnx_path]
    if cfg.compare_baseline and baseline is not None and baseline.resolve() != state.onnx_path.resolve():
        paths = [baseline, state.onnx_path]
    threads = cfg.threads or state.settings.threads
    report = bench_models(
        paths, cfg.provider, threads, cfg.batch_sizes, cfg.warmup, cfg.runs, block=cfg.block
    )
    primary = report.find(str(state.onnx_path), cfg.batch_sizes[0])
    log.info(
        "p50 %.2f ms at batch %d (%.2fx the fp32 baseline)",
        primary.p50_ms,
        primary.batch_size,
        primary.speedup_vs_first,
    )
    details: dict[str, object] = {}
    last = state.records[-1] if state.records else None
    if cfg.provider is Provider.cpu and last is not None and last.macs:
        floor = compute_floor(state.onnx_path, last.macs, primary.p50_ms, threads)
        details["compute_floor"] = floor.to_dict()
        log.info("compute floor: %s", floor.describe())
    top1 = None
    if cfg.accuracy and state.data_spec("eval") is not None:
        from vitcompress.evaluate import evaluate_onnx, sanity_onnx, warn_if_insane

        data = state.load_split("eval", cfg.step_name)
        details["preprocessing"] = data.preprocessing()
        result = evaluate_onnx(state.onnx_path, data, cfg.provider, threads)
        top1 = result.top1
        details["accuracy"] = result.to_dict()
        reference, reference_result = state.onnx_path, result
        if len(paths) == 2:
            base = evaluate_onnx(paths[0], data, cfg.provider, threads)
            details["baseline_top1"] = base.top1
            details["top1_drop_points"] = 100 * (base.top1 - result.top1)
            reference, reference_result = paths[0], base
        log.info("top-1 %.2f%% on %s", 100 * result.top1, result.data)
        if cfg.sanity:
            # the reference every drop is taken against: the fp32 baseline, or this model when it
            # is the baseline itself (or no baseline is measured)
            is_baseline = baseline is not None and reference.resolve() == baseline.resolve()
            label = f"fp32 baseline ({reference.name})" if is_baseline else reference.name
            sanity = sanity_onnx(reference, data, reference_result, cfg.provider, threads, label=label)
            details["sanity"] = sanity.to_dict()
            warn_if_insane(sanity)
    record = PassRecord(
        name=cfg.step_name,
        kind=cfg.kind,
        params=last.params if last else None,
        macs=last.macs if last else None,
        size_bytes=onnx_size(state.onnx_path),
        latency_p50_ms=primary.p50_ms,
        top1=top1,
        wall_s=time.perf_counter() - start,
        artifact=str(state.onnx_path),
        details={
            "speedup_vs_baseline": primary.speedup_vs_first,
            "baseline": str(paths[0]),
            "bench": report.to_dict(),
            **details,
        },
    )
    return state.with_record(record, baseline_onnx=baseline)
