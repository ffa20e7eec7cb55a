"""Sweep a recipe over settings, measure every variant in one run, and mark the Pareto frontier.

Each variant is the recipe with some paths set (`passes.prune.target_macs=0.25`); every combination
of the values runs through the same pipeline as `compress`, into its own directory. Accuracy comes
from the variant's own validate pass (or an ONNX Runtime evaluation on data.eval); latency is
measured afterwards for all variants and the fp32 baseline together, interleaved, so the ratios are
taken in one run on one machine. A variant that fails is reported and the sweep goes on.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitcompress.errors import BudgetExceededError, RecipeError, VitcompressError
from vitcompress.fileio import write_json, write_text
from vitcompress.passes import measuring_kinds
from vitcompress.plot import ParetoPoint, plot_pareto
from vitcompress.recipe import Recipe, apply_overrides, validate_recipe
from vitcompress.runtimes.base import Provider

log = logging.getLogger(__name__)


@dataclass
class Variant:
    index: int
    overrides: dict[str, Any]
    recipe: Recipe
    out_dir: Path
    status: str = "pending"  # ok | budget failed | error
    message: str | None = None
    onnx: str | None = None
    top1: float | None = None
    macs: int | None = None
    params: int | None = None
    size_bytes: int | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    speedup: float | None = None
    frontier: bool = False
    wall_s: float = 0.0
    baseline: tuple[str, float] | None = None  # (fp32 ONNX, top-1) its validate pass measured

    @property
    def label(self) -> str:
        return ", ".join(f"{_short(k)}={_fmt(v)}" for k, v in self.overrides.items())

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "recipe"}
        out["out_dir"] = str(self.out_dir)
        out["label"] = self.label
        return out


@dataclass
class SweepResult:
    out_dir: Path
    variants: list[Variant]
    baseline: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "baseline": self.baseline,
            "variants": [v.to_dict() for v in self.variants],
            "bench": self.bench,
        }


def _short(path: str) -> str:
    return path.removeprefix("passes.")


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _shortest_keys(paths: Sequence[str]) -> dict[str, str]:
    """Each path by its shortest tail that tells it apart from the others: `target_macs` for
    passes.prune.target_macs, `prune.steps` and `distill.steps` when both vary."""
    parts = {p: re.split(r"\.(?![^\[]*\])", p) for p in paths}
    short: dict[str, str] = {}
    for path, pieces in parts.items():
        for n in range(1, len(pieces) + 1):
            tail = pieces[-n:]
            if all(other == path or parts[other][-n:] != tail for other in paths):
                break
        short[path] = ".".join(tail)
    return short


def point_labels(variants: Sequence[Variant]) -> dict[int, str]:
    """A plot label per variant (by index): its settings, shortest unambiguous keys, e.g.
    `target_macs=0.5` or `mlp=0.25, importance=l1`."""
    keys = _shortest_keys(list(dict.fromkeys(k for v in variants for k in v.overrides)))
    return {
        v.index: ", ".join(f"{keys[k]}={_fmt(value)}" for k, value in v.overrides.items()) or f"v{v.index:02d}"
        for v in variants
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60]


def expand(vary: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the values, in order (the last path varies fastest)."""
    paths = list(vary)
    return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*vary.values())]


def plan_variants(
    data: dict[str, Any], vary: dict[str, list[Any]], out_dir: Path, text: str | None, source: str
) -> list[Variant]:
    """Build and validate every variant before any runs: a bad path or value fails in seconds."""
    if not vary:
        raise RecipeError(
            "nothing to sweep: give --vary PATH=V1,V2 or a sweep.vary section in the recipe",
            hint="e.g. --vary passes.prune.target_macs=0.25,0.5",
        )
    empty = [path for path, values in vary.items() if not values]
    if empty:
        validate_recipe(data, text, source)  # a sweep section's own error, with its line
        raise RecipeError(f"{empty[0]}: give at least one value to try")
    variants = []
    for index, overrides in enumerate(expand(vary)):
        label = ", ".join(f"{k}={_fmt(v)}" for k, v in overrides.items())
        recipe = validate_recipe(apply_overrides(data, overrides), text, f"{source} (variant {label})")
        _check_measurable(recipe)
        name = f"v{index:02d}-" + _slug("_".join(f"{_short(k)}-{_fmt(v)}" for k, v in overrides.items()))
        variants.append(Variant(index, overrides, recipe, out_dir / name))
    return variants


def _check_measurable(recipe: Recipe) -> None:
    if not any(cfg.produces_onnx for cfg in recipe.passes):
        raise RecipeError(
            "sweep compares ONNX models: the recipe has no export pass",
            hint="add `- kind: export` (and quantize/validate after it if wanted)",
        )
    if recipe.data.eval is None:
        raise RecipeError(
            "sweep plots accuracy against latency: the recipe has no data.eval",
            hint="add data: {eval: {source: fashion-mnist, split: test}} or your own folder",
        )


def _provider(recipe: Recipe) -> Provider:
    validate = [cfg for cfg in recipe.passes if cfg.measures]
    return getattr(validate[-1], "provider", Provider.cpu) if validate else Provider.cpu


def _read_outcome(variant: Variant) -> None:
    """Fill a variant from the report.json its run wrote (also written when a budget failed)."""
    report = json.loads((variant.out_dir / "report.json").read_text())
    variant.onnx = report.get("final_onnx")
    ledger = report["ledger"]
    with_macs = [r for r in ledger if r.get("macs") is not None]
    if with_macs:
        variant.macs, variant.params = with_macs[-1]["macs"], with_macs[-1]["params"]
    measuring = measuring_kinds()
    with_top1 = [r for r in ledger if r.get("top1") is not None and r["kind"] in measuring]
    if with_top1:
        variant.top1 = with_top1[-1]["top1"]
        details = with_top1[-1]["details"]
        if "baseline_top1" in details:
            variant.baseline = (details["baseline"], details["baseline_top1"])
    variant.wall_s = sum(float(r.get("wall_s") or 0.0) for r in ledger)


def _evaluate(path: Path, recipe: Recipe, provider: Provider) -> float:
    from vitcompress.accuracy import evaluate_onnx, onnx_input_spec
    from vitcompress.data import load_dataset

    assert recipe.data.eval is not None  # checked by _check_measurable
    spec, num_classes = onnx_input_spec(path)
    data = load_dataset(recipe.data.eval, spec, num_classes)
    return evaluate_onnx(path, data, provider, recipe.run.threads).top1


def _baseline(
    recipe: Recipe, out_dir: Path, provider: Provider, measured: Sequence[Variant]
) -> tuple[Path, float]:
    """The fp32 baseline and its top-1 on data.eval: what the variants' validate pass compared
    against (the teacher, after a `become_teacher` step), else the model as the recipe loads it."""
    for variant in measured:
        if variant.baseline is not None:
            return Path(variant.baseline[0]), variant.baseline[1]
    from vitcompress.models import as_model_ref, load_model
    from vitcompress.passes.export import ExportConfig, export_model

    path = out_dir / "baseline.onnx"
    if not path.is_file():
        loaded = load_model(as_model_ref(recipe.model))
        export_model(loaded, path, ExportConfig(), seed=recipe.run.seed)
    return path, _evaluate(path, recipe, provider)


def run_sweep(
    variants: Sequence[Variant],
    out_dir: Path,
    runs: int = 50,
    on_variant: Callable[[int, int, Variant], None] | None = None,
    on_bench: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> SweepResult:
    """Run every variant, then bench the baseline and all finished variants in one interleaved run,
    and write sweep.json, sweep.md and pareto.png to `out_dir` (held by this sweep alone; a sweep of
    the same variants resumes there, another one needs `overwrite`)."""
    from vitcompress.recipe import dump_recipe
    from vitcompress.rundir import claim_run_dir, recipe_fingerprint

    plan = "\n---\n".join(f"{v.out_dir.name}\n{dump_recipe(v.recipe)}" for v in variants)
    with claim_run_dir(out_dir, recipe_fingerprint(plan), overwrite=overwrite):
        return _run_sweep(variants, out_dir, runs, on_variant, on_bench)


def _run_sweep(
    variants: Sequence[Variant],
    out_dir: Path,
    runs: int,
    on_variant: Callable[[int, int, Variant], None] | None,
    on_bench: Callable[[int], None] | None,
) -> SweepResult:
    from vitcompress.pipeline import PrefixCache, run_recipe
    from vitcompress.runtime import onnx_size
    from vitcompress.timing import bench_models

    # variants that share their leading PyTorch passes (a pretrain step, the same pruning) run them once
    prefixes = PrefixCache.for_runs([v.recipe for v in variants])

    first = variants[0].recipe
    provider = _provider(first)
    for number, variant in enumerate(variants):
        if on_variant:
            on_variant(number, len(variants), variant)
        start = time.perf_counter()
        try:
            run_recipe(variant.recipe, variant.out_dir, prefixes=prefixes)
            variant.status = "ok"
        except BudgetExceededError as err:
            variant.status, variant.message = "budget failed", err.message
        except VitcompressError as err:
            variant.status, variant.message = "error", err.message
            log.warning("variant %s failed: %s", variant.label, err.message)
        if variant.status != "error":
            _read_outcome(variant)
            if variant.onnx is None:
                variant.status, variant.message = "error", "the run left no ONNX model"
            elif variant.top1 is None:
                variant.top1 = _evaluate(Path(variant.onnx), variant.recipe, provider)
        variant.wall_s = variant.wall_s or time.perf_counter() - start

    measured = [v for v in variants if v.status != "error" and v.onnx]
    if not measured:
        raise VitcompressError(
            f"every variant failed; the first: {variants[0].message}",
            hint=f"run one variant with `vitcompress compress --set ...` to see it; logs in {out_dir}",
        )
    baseline_path, baseline_top1 = _baseline(first, out_dir, provider, measured)
    from vitcompress.runtimes import RUNTIMES, Runtime, runtime_for

    # the fp32 baseline on ONNX Runtime; each variant's file on the recipe's target runtime where
    # that runtime opens it (an .onnx file on OpenVINO), else on its own
    target = Runtime(first.target.runtime) if first.target else None
    entries = [(baseline_path, Runtime.ort)]
    for path in (Path(v.onnx) for v in measured if v.onnx):
        usable = target is not None and path.suffix.lower() in RUNTIMES[target].suffixes
        entries.append((path, target if usable and target is not None else runtime_for(path)))
    report = bench_models(
        [], provider, first.run.threads, [1], warmup=5, runs=runs, on_step=on_bench, seed=first.run.seed,
        entries=entries,
    )  # fmt: skip
    base = report.find(str(baseline_path), 1, "ort")
    for variant in measured:
        latency = report.find(str(variant.onnx), 1)
        variant.p50_ms, variant.p90_ms = latency.p50_ms, latency.p90_ms
        variant.speedup = latency.speedup_vs_first
        variant.size_bytes = onnx_size(Path(str(variant.onnx)))
    baseline = {
        "onnx": str(baseline_path),
        "top1": baseline_top1,
        "p50_ms": base.p50_ms,
        "p90_ms": base.p90_ms,
        "size_bytes": onnx_size(baseline_path),
    }
    points = [ParetoPoint("fp32 baseline", base.p50_ms, baseline_top1, baseline=True)]
    labels = point_labels(variants)
    points += [ParetoPoint(labels[v.index], v.p50_ms or 0.0, v.top1 or 0.0) for v in measured]
    title = f"{first.name or first.model.source}: {len(measured)} variants, {report.environment.cpu_model}"
    front = plot_pareto(points, out_dir / "pareto.png", title)
    baseline["frontier"] = front[0]
    for variant, on_front in zip(measured, front[1:], strict=True):
        variant.frontier = on_front
    result = SweepResult(out_dir, list(variants), baseline, report.to_dict())
    write_json(out_dir / "sweep.json", result.to_dict())
    write_text(out_dir / "sweep.md", sweep_markdown(result))
    return result


SWEEP_COLUMNS = [
    "variant",
    "settings",
    "top-1",
    "Δ top-1",
    "p50 ms",
    "p90 ms",
    "speed-up",
    "size",
    "MACs",
    "frontier",
    "status",
]


def sweep_rows(result: SweepResult) -> list[list[str]]:
    from vitcompress.report import fmt_bytes, fmt_count

    base = result.baseline
    rows = [
        [
            "baseline",
            "fp32 baseline",
            f"{base['top1']:.2%}",
            "-",
            f"{base['p50_ms']:.2f}",
            f"{base['p90_ms']:.2f}",
            "1.00x",
            fmt_bytes(base["size_bytes"]),
            "-",
            "*" if base.get("frontier") else "",
            "",
        ]
    ]
    for v in result.variants:
        drop = "-" if v.top1 is None else f"{100 * (v.top1 - base['top1']):+.2f}"
        rows.append(
            [
                f"v{v.index:02d}",
                v.label,
                "-" if v.top1 is None else f"{v.top1:.2%}",
                drop,
                "-" if v.p50_ms is None else f"{v.p50_ms:.2f}",
                "-" if v.p90_ms is None else f"{v.p90_ms:.2f}",
                "-" if v.speedup is None else f"{v.speedup:.2f}x",
                fmt_bytes(v.size_bytes),
                fmt_count(v.macs),
                "*" if v.frontier else "",
                v.status if v.message is None else f"{v.status}: {v.message}",
            ]
        )
    return rows


def sweep_markdown(result: SweepResult) -> str:
    from vitcompress.report import md_row

    lines = ["# vitcompress sweep", ""]
    lines += [md_row(SWEEP_COLUMNS), "|" + "---|" * len(SWEEP_COLUMNS)]
    lines += [md_row(row) for row in sweep_rows(result)]
    settings = (result.bench or {}).get("settings", {})
    env = (result.bench or {}).get("environment", {})
    lines += [
        "",
        f"Latency: batch 1, {settings.get('threads')} threads, {settings.get('provider')}, "
        f"{settings.get('runs')} runs per model, all models interleaved in one run on "
        f"{env.get('cpu_model')}. `*`: on the Pareto frontier (nothing else is both faster and "
        "more accurate).",
        "",
        "![accuracy vs latency](pareto.png)",
        "",
    ]
    return "\n".join(lines)
