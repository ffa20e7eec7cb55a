"""Measure the exported model on the target runtime, against the fp32 baseline on ONNX Runtime, in one run.

The model file runs on `runtime` (default: the one its suffix names: .onnx on ONNX Runtime, an
OpenVINO .xml on OpenVINO); with `compare_runtimes` it is also timed, in the same interleaved run,
on every other runtime that opens it on this device (an .onnx file on OpenVINO too), and the
record names the fastest. Budgets are checked on `runtime`, and the record says which one that was,
with its version, the precision it ran in and the threads.

The baseline is the fp32 export of the model as loaded. If the recipe changed the model before its
first export, the original model is exported here (as `baseline.onnx`) so the ratio is always taken
in the same run on the same machine. Budgets are enforced by the pipeline after the reports are written.

With data.eval, the fp32 baseline's score is checked before anything is compared against it
(`accuracy.check_sanity`): a baseline near chance, inputs off scale, or a preprocessing under which
the same images score far better is warned about loudly and recorded as `sanity`, and the pipeline
fails a max_top1_drop budget measured against such a baseline.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field

from vitcompress.choices import Provider, Runtime
from vitcompress.errors import RecipeError
from vitcompress.passes.base import Needs, PassConfig
from vitcompress.state import Measured, ModelState

if TYPE_CHECKING:
    from vitcompress.runtimes.target import TargetSection

log = logging.getLogger(__name__)


class ValidateConfig(PassConfig):
    """Bench the current ONNX model (and the fp32 baseline, interleaved) with ONNX Runtime."""

    summary: ClassVar[str] = "measure ONNX Runtime latency against the fp32 baseline"
    engine: ClassVar[str] = "vitcompress.passes.validate"
    needs: ClassVar[Needs] = Needs.onnx
    measures: ClassVar[bool] = True

    @classmethod
    def target_defaults(cls, target: TargetSection) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "runtime": "ort" if target.runtime == "tensorrt" else target.runtime,
            "provider": target.provider,
            "compare_runtimes": True,
        }
        if target.precision_hint and target.runtime == "openvino":
            settings["precision"] = target.precision_hint
        if target.threads:
            settings["threads"] = target.threads
        return settings

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
    runtime: Runtime | None = Field(
        None,
        description="Runtime the budgets are checked on (default: the model file's own: .onnx ort, .xml "
        "openvino). The fp32 baseline always runs on ort.",
    )
    precision: Literal["fp32", "bf16"] | None = Field(
        None,
        description="OpenVINO's precision hint (default: the one recorded with the IR, else OpenVINO's choice).",
    )
    compare_runtimes: bool = Field(
        False,
        description="Also time the model on every other runtime that opens its file on this device, in "
        "the same run, and record the fastest.",
    )
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

    def wants_original_model(self) -> bool:
        return self.compare_baseline  # exports the model as loaded when none was exported before


def run(state: ModelState, cfg: ValidateConfig) -> ModelState:
    from vitcompress.passes.export import ExportConfig, export_model
    from vitcompress.runtime import onnx_size
    from vitcompress.timing import bench_models, compute_floor

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
    from vitcompress.runtimes import RUNTIMES, Device, Precision, Runtime, runtime_for

    runtime = Runtime(cfg.runtime) if cfg.runtime else runtime_for(state.onnx_path)
    paths = [state.onnx_path]
    # The baseline is the fp32 file on ORT. An unchanged model is its own baseline: timed once on
    # ORT, but on another runtime (or precision hint) it is a different measurement and is compared.
    same_file = baseline is not None and baseline.resolve() == state.onnx_path.resolve()
    if cfg.compare_baseline and baseline is not None and (not same_file or runtime is not Runtime.ort):
        paths = [baseline, state.onnx_path]
    entries = [(p, Runtime.ort if i < len(paths) - 1 else runtime) for i, p in enumerate(paths)]
    device = Device.gpu if cfg.provider is not Provider.cpu or runtime is Runtime.tensorrt else Device.cpu
    if cfg.compare_runtimes:
        entries += [
            (state.onnx_path, spec.runtime)
            for spec in RUNTIMES.values()
            if spec.runtime is not runtime
            and not (same_file and spec.runtime is Runtime.ort)  # the baseline entry is that run
            and state.onnx_path.suffix.lower() in spec.suffixes
            and device in spec.devices
            and _installed(spec.runtime)
        ]
    threads = cfg.threads or state.settings.threads
    hint = Precision(cfg.precision) if cfg.precision else None
    report = bench_models(
        [], cfg.provider, threads, cfg.batch_sizes, cfg.warmup, cfg.runs, block=cfg.block,
        precision=hint, entries=entries,
    )  # fmt: skip
    primary = report.find(str(state.onnx_path), cfg.batch_sizes[0], runtime.value)
    on_runtimes = {
        r.runtime: {"p50_ms": r.p50_ms, "precision": r.precision, "version": r.runtime_version}
        for r in report.results
        if r.model == str(state.onnx_path) and r.batch_size == cfg.batch_sizes[0]
    }
    fastest = min(on_runtimes, key=lambda rt: float(on_runtimes[rt]["p50_ms"]))  # type: ignore[arg-type]
    if len(on_runtimes) > 1:
        log.info(
            "fastest runtime for %s at batch %d: %s (%s)",
            state.onnx_path.name,
            cfg.batch_sizes[0],
            fastest,
            ", ".join(f"{rt} {v['p50_ms']:.2f} ms" for rt, v in on_runtimes.items()),
        )
    log.info(
        "p50 %.2f ms at batch %d (%.2fx the fp32 baseline)",
        primary.p50_ms,
        primary.batch_size,
        primary.speedup_vs_first,
    )
    details: dict[str, object] = {
        "runner": {
            "runtime": primary.runtime,
            "version": primary.runtime_version,
            "precision": primary.precision,
            "threads": primary.threads,
        },
        "budget_runtime": primary.runtime,
        "runtimes": on_runtimes,
        "fastest_runtime": fastest,
    }
    last = state.records[-1] if state.records else None
    if cfg.provider is Provider.cpu and last is not None and last.macs:
        floor = compute_floor(state.onnx_path, last.macs, primary.p50_ms, threads)
        details["compute_floor"] = floor.to_dict()
        log.info("compute floor: %s", floor.describe())
    top1 = None
    eval_fn = state.settings.eval_fn
    if cfg.accuracy and eval_fn is not None:
        from vitcompress.accuracy import score_file

        top1 = score_file(eval_fn, state.onnx_path, cfg.provider, threads, runtime=runtime, precision=hint)
        details["accuracy"] = {"top1": top1, "by": "eval_fn"}
        if len(paths) == 2:
            details["baseline_top1"] = score_file(eval_fn, paths[0], cfg.provider, threads)
            details["top1_drop_points"] = 100 * (details["baseline_top1"] - top1)  # type: ignore[operator]
        log.info("top-1 %.2f%% (eval_fn)", 100 * top1)
    elif cfg.accuracy and state.data_spec("eval") is not None:
        from vitcompress.accuracy import evaluate_onnx, sanity_onnx, warn_if_insane

        data = state.load_split("eval", cfg.step_name)
        details["preprocessing"] = data.preprocessing()
        result = evaluate_onnx(state.onnx_path, data, cfg.provider, threads, runtime=runtime, precision=hint)
        top1 = result.top1
        details["accuracy"] = result.to_dict()
        reference, reference_result = state.onnx_path, result
        if len(paths) == 2:
            base = evaluate_onnx(paths[0], data, cfg.provider, threads)
            details["baseline_top1"] = base.top1
            details["top1_drop_points"] = 100 * (base.top1 - result.top1)
            reference, reference_result = paths[0], base
        log.info("top-1 %.2f%% on %s", 100 * result.top1, result.data)
        if cfg.sanity and data.spec.source.value != "memory":  # in-memory inputs: no pixels to probe
            # the reference every drop is taken against: the fp32 baseline, or this model when it
            # is the baseline itself (or no baseline is measured)
            is_baseline = baseline is not None and reference.resolve() == baseline.resolve()
            label = f"fp32 baseline ({reference.name})" if is_baseline else reference.name
            sanity = sanity_onnx(
                reference,
                data,
                reference_result,
                cfg.provider,
                threads,
                label=label,
                runtime=runtime if len(paths) == 1 else None,  # the baseline runs on ORT
                precision=hint if len(paths) == 1 else None,
            )
            details["sanity"] = sanity.to_dict()
            warn_if_insane(sanity)
    outcome = Measured(
        params=last.params if last else None,
        macs=last.macs if last else None,
        size_bytes=onnx_size(state.onnx_path),
        latency_p50_ms=primary.p50_ms,
        top1=top1,
        artifact=str(state.onnx_path),
        details={
            "speedup_vs_baseline": primary.speedup_vs_first,
            "baseline": str(paths[0]),
            "bench": report.to_dict(),
            **details,
        },
    )
    return state.passed(cfg, outcome, baseline_onnx=baseline)


def _installed(runtime: object) -> bool:
    """Whether a runtime's package imports here (OpenVINO is a dependency; TensorRT an extra)."""
    import importlib.util

    from vitcompress.runtimes import Runtime

    package = {Runtime.ort: "onnxruntime", Runtime.openvino: "openvino", Runtime.tensorrt: "tensorrt"}
    return importlib.util.find_spec(package[runtime]) is not None  # type: ignore[index]
