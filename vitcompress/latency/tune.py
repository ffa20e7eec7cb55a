"""`tune`: search the compression for a goal "p50 <= X ms on this target, at most Y points of top-1 lost".

1. Tables: the target's latency table for every runtime and precision the goal allows, and fp32 on
   each runtime (the original's p50 there), measured once and cached.
2. Refusal: if even the smallest prunable model in the fastest runtime and precision is predicted
   slower than the goal, the goal is refused before any work, with the fastest reachable p50.
3. Candidates: for each runtime, precision and low-rank choice (`lowrank`: dense, or the MLPs factorized
   at a rank fraction after pruning), the latency-aware pruning plan (Hessian saliency per ms saved)
   that meets the goal, and around it plans for tighter and looser goals (the frontier). With low
   rank the planner reads the table's factorized-MLP view, so pruning stops earlier by what the
   factorization saves; a choice whose ranks would save no MACs at the pruned widths is not offered.
   Each is scored by a cheap accuracy proxy: the PyTorch top-1 of the pruned (and factorized) model,
   before any distillation, on a few hundred eval images, plus a fixed allowance for INT8
   (`int8_allowance`).
4. Attempts: the candidate with the least predicted loss that meets the latency is run for real as a
   recipe (prune, lowrank when chosen, distil, export, quantize, validate). Its prune step times the
   pruned model against the original before distilling and re-plans when it missed (`remeasure`;
   a speedup goal is judged against the original timed in that same run), so the first attempt
   lands near the goal even where the table errs (small, uneven plans). If the measured p50 still
   misses, the next attempt aims lower by measured/goal; if the accuracy misses, the next candidate
   (another runtime, precision or low-rank choice) is tried. If it meets the goal but runs faster
   than asked by more than the tolerance, the next attempt aims looser (less pruning, more top-1)
   and the result is the most accurate attempt that met the goal. An attempt that cannot run (a
   re-plan below the floor) ends the search with what was measured. Every attempt, predicted
   against measured, is reported.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.errors import BudgetExceededError, VitcompressError

if TYPE_CHECKING:
    from vitcompress.latency.goal import GoalSection
    from vitcompress.latency.table import LatencyTable
    from vitcompress.models.loader import LoadedModel
    from vitcompress.recipe import Recipe

log = logging.getLogger(__name__)

FRONTIER_FACTORS = (0.7, 0.85, 1.0, 1.2, 1.5)  # planner goals around the goal, for the frontier plot


class UnreachableGoalError(VitcompressError):
    """No configuration the goal allows is predicted to reach its latency."""


@dataclass
class Candidate:
    runtime: str
    precision: str
    goal_factor: float
    planner_goal_ms: float
    predicted_ms: float
    proxy_top1: float
    predicted_drop: float  # points: proxy loss plus the int8 allowance
    blocks: list[tuple[int, int, int]]
    lowrank: float | None = None  # MLPs factorized at this rank fraction after pruning (None: dense)

    @property
    def meets(self) -> bool:
        return self.goal_factor <= 1.0


@dataclass
class Attempt:
    attempt: int
    runtime: str
    precision: str
    planner_goal_ms: float  # what the prune step aimed at (the goal, corrected by earlier attempts)
    predicted_ms: float
    measured_ms: float | None
    top1: float | None
    top1_drop: float | None
    out_dir: str
    verdict: str = ""
    goal_ms: float | None = None  # a speedup goal, against the original measured in the same run
    lowrank: float | None = None
    pruned_ms: float | None = None  # the prune step's own measurement, before distilling
    prune_tries: int = 1  # plans the prune step made (1 + its re-plans)
    validate_ms: float | None = None  # validate's reading, when a miss was timed again (measured_ms)


@dataclass
class TuneReport:
    goal_ms: float
    max_top1_drop: float
    runtime: str
    baseline_ms: float
    base_proxy_top1: float
    candidates: list[Candidate] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    met: bool = False
    final: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prune_config(
    goal: GoalSection,
    runtime: str,
    precision: str,
    goal_ms: float,
    lowrank: float | None = None,
    speedup: float | None = None,
    remeasure: int = 0,
) -> Any:
    """Prune's latency target for one attempt: `goal_ms`, or with `speedup` a speedup over the
    original in this precision (judged against the original timed in the same run when it re-measures)."""
    from vitcompress.passes.prune import PruneConfig

    return PruneConfig(
        target_latency_ms=None if speedup is not None else goal_ms,
        target_speedup=speedup,
        structures=list(goal.structures),  # type: ignore[arg-type]
        importance="hessian",  # type: ignore[arg-type]
        latency_runtime=runtime,  # type: ignore[arg-type]
        latency_precision=precision,  # type: ignore[arg-type]
        latency_threads=goal.threads,
        latency_batch=goal.batch,
        remeasure=remeasure,
        latency_tolerance=goal.tolerance / 2,  # land inside the goal's band with room for validate's noise
        latency_miss="keep",  # tune measures again after distilling; a miss there is its next step
        round_to=8,
        latency_lowrank=lowrank,
    )


def _recipe_for(
    recipe: Recipe,
    goal: GoalSection,
    runtime: str,
    precision: str,
    prune: Any | None,
    lowrank: float | None = None,
) -> Recipe:
    """The recipe one attempt runs: prune (the PruneConfig `prune`; None when the precision alone
    meets the goal), factorize the MLPs (when `lowrank`), distil, export, quantize, validate."""
    from vitcompress.recipe import validate_recipe

    template = next((p for p in recipe.passes if p.kind == "distill"), None)
    distill: dict[str, Any] = (
        template.model_dump(mode="json")
        if template is not None
        else {"kind": "distill", "epochs": goal.distill_epochs, "steps": goal.distill_steps}
    )
    passes: list[dict[str, Any]] = []
    if prune is not None:
        passes.append(prune.model_dump(mode="json", exclude_none=True))
    if lowrank is not None:  # what the planner's factorized view assumed: rank_fraction, svd, round_to 8
        passes.append({"kind": "lowrank", "rank_fraction": lowrank, "method": "svd", "round_to": 8})
    if passes:  # an unchanged model has nothing to recover
        passes.append(distill)
    passes.append({"kind": "export"})
    if precision == "int8":
        quantize: dict[str, Any] = {"kind": "quantize", "mode": "static"}
        if runtime == "openvino":
            quantize["runtime"] = "openvino"
        else:
            quantize["preset"] = "cpu-x86-vnni"
            quantize["mode"] = "static"  # what the int8 table measured
        passes.append(quantize)
    validate: dict[str, Any] = {
        "kind": "validate",
        "runtime": runtime,
        "batch_sizes": [goal.batch],
        "threads": goal.threads,
        "runs": 50,
    }
    if runtime == "openvino" and precision in ("fp32", "bf16"):
        validate["precision"] = precision
    passes.append(validate)
    data = recipe.model_dump(mode="json", exclude={"passes", "goal", "sweep", "budgets", "target"})
    data["passes"] = passes
    data["name"] = f"{recipe.name or 'tune'}-{runtime}-{precision}" + (
        f"-lowrank{lowrank:g}" if lowrank else ""
    )
    return validate_recipe(data, None, "tune")


def _proxy_top1(loaded: LoadedModel, eval_data: Any) -> float:
    from vitcompress.accuracy import evaluate_torch

    return float(evaluate_torch(loaded, eval_data).top1)


def _pruned_copy(loaded: LoadedModel, planner: Any, removed: Any) -> LoadedModel:
    from vitcompress.models.adapters import adapter_for
    from vitcompress.passes.prune import _graph, apply_plan

    copy_ = copy.copy(loaded)
    copy_.model = copy.deepcopy(loaded.model)
    copy_.adapter = adapter_for(copy_.model)
    if removed:
        apply_plan(copy_, _graph(copy_), planner.plan(removed))
    return copy_


def tune(
    recipe: Recipe,
    out_dir: Path,
    on_status: Callable[[str], None] | None = None,
    on_profile: Any = None,
    overwrite: bool = False,
) -> TuneReport:
    """Search for `recipe.goal` and run it for real; raises BudgetExceededError if no attempt meets it."""
    from vitcompress.data import load_dataset
    from vitcompress.latency.plan import (
        factorized_copy,
        latency_planner,
        plan_removal,
        shape_blocks,
        smallest_ms,
    )
    from vitcompress.latency.predict import mlp_ranks
    from vitcompress.latency.profile import get_table
    from vitcompress.latency.table import FactorizedMlpTable, TargetSpec
    from vitcompress.models import as_model_ref, load_model
    from vitcompress.passes.prune import _batches, _graph, compute_stats, current_shape
    from vitcompress.pipeline import run_recipe

    goal = recipe.goal
    if goal is None:
        raise VitcompressError("tune needs a goal: give --target-p50-ms (or a recipe with a goal: section)")
    status = on_status or (lambda _msg: None)
    if recipe.data.eval is None or recipe.data.for_calibration() is None:
        raise VitcompressError(
            "tune needs data.eval (accuracy) and data.train or data.calibration (importance, distillation)",
            hint="pass --data, e.g. --data fashion-mnist",
        )
    out_dir = Path(out_dir)
    status("loading the model")
    loaded = load_model(as_model_ref(recipe.model))
    seed = recipe.run.seed
    tables: dict[tuple[str, str], LatencyTable] = {}
    for rt in goal.runtime:  # fp32 on every runtime: the original's p50 there
        for precision in dict.fromkeys(["fp32", *(p for r, p in goal.targets() if r == rt)]):
            spec = TargetSpec(rt, precision, goal.threads, goal.batch)
            status(f"latency table for {spec.label()}")
            tables[rt, precision] = get_table(loaded, spec, on_progress=on_profile)
    if goal.target_speedup is not None and ("ort", "fp32") not in tables:
        # validate times its fp32 baseline on ORT: the original's ORT p50 tells how the machine drifted
        spec = TargetSpec("ort", "fp32", goal.threads, goal.batch)
        status(f"latency table for {spec.label()} (the reference validate's baseline is judged by)")
        tables["ort", "fp32"] = get_table(loaded, spec, on_progress=on_profile)
    originals = {key: _whole_ms(table) for key, table in tables.items()}
    first = goal.runtime[0]
    baseline_ms = originals[first, "fp32"]
    goal_ms = (
        goal.target_p50_ms
        if goal.target_p50_ms is not None
        else baseline_ms / float(goal.target_speedup or 1)
    )
    shape0 = current_shape(loaded)

    def allowed(_s: Any, _i: int) -> bool:
        return True

    options = _lowrank_options(goal, tables)
    views = {
        (r, p, f): tables[r, p] if f is None else tables[r, p].factorized(f)
        for r, p in goal.targets()
        for f in options
    }
    floors = {
        key: smallest_ms(view, _prune_config(goal, key[0], key[1], goal_ms), shape0, allowed)
        for key, view in views.items()
    }
    fastest = min(floors, key=lambda k: floors[k])
    where = " or ".join(goal.runtime)
    # A floor within the goal's tolerance is offered. Prune's own check is half as tolerant, so a
    # candidate in between can be refused there: a first attempt then ends tune with prune's message
    # (tune.md lists the candidates), a later one is recorded in the previous attempt's verdict.
    reach = 1 + goal.tolerance
    if floors[fastest] > goal_ms * reach:
        raise UnreachableGoalError(
            f"p50 {goal_ms:.3f} ms cannot be reached on {where}: the fastest reachable p50 is "
            f"{floors[fastest]:.3f} ms ({_label(*fastest)}, every block pruned to its floor; the original runs "
            f"{baseline_ms:.3f} ms in fp32 on {first})",
            hint=f"ask for at least {floors[fastest]:.3f} ms, allow int8 or more structures, or another runtime",
        )
    status("scoring candidates (Hessian importance, proxy accuracy)")
    cfg0 = _prune_config(goal, *goal.targets()[0], goal_ms)
    calibration = load_dataset(recipe.data.for_calibration(), loaded.input, loaded.num_classes)  # type: ignore[arg-type]
    stats = compute_stats(loaded, cfg0.importance, _graph(loaded), _batches(calibration, cfg0, seed))
    eval_spec = recipe.data.eval.model_copy(update={"limit": goal.proxy_samples})
    eval_data = load_dataset(eval_spec, loaded.input, loaded.num_classes)
    base_top1 = _proxy_top1(loaded, eval_data)
    report = TuneReport(goal_ms, goal.max_top1_drop, ", ".join(goal.runtime), baseline_ms, base_top1)
    planners: dict[tuple[str, str, float | None], Any] = {}
    for (runtime, precision, lowrank), table in views.items():
        cfg = _prune_config(goal, runtime, precision, goal_ms)
        planner = planners[runtime, precision, lowrank] = latency_planner(stats, shape0, cfg, table)
        for factor in FRONTIER_FACTORS:
            target = goal_ms * factor
            removed = plan_removal(cfg, planner, table, shape0, target, allowed)
            pruned = _pruned_copy(loaded, planner, removed)
            blocks = shape_blocks(current_shape(pruned))
            if isinstance(table, FactorizedMlpTable):
                if all(table.mlp_ranks(mlp) == (None, None) for _h, _d, mlp in blocks):
                    continue  # at these widths no rank saves MACs: the same model as dense
                pruned = factorized_copy(pruned, table.rank_fraction)
            predicted = table.predict_ms(blocks, mlp_ranks(pruned))
            if predicted > target * reach:
                continue  # below this choice's floor
            top1 = _proxy_top1(pruned, eval_data)
            drop = 100 * (base_top1 - top1) + (goal.int8_allowance if precision == "int8" else 0.0)
            report.candidates.append(
                Candidate(runtime, precision, factor, target, predicted, top1, drop, blocks, lowrank)
            )
    ranked = sorted((c for c in report.candidates if c.goal_factor == 1.0), key=lambda c: c.predicted_drop)
    if not ranked:
        raise UnreachableGoalError(
            f"no runtime and precision of {goal.targets()} (low rank {goal.lowrank}) reaches {goal_ms:.3f} ms"
        )
    queue = list(ranked)
    choice = queue.pop(0)
    goal0_ms = goal_ms
    aim = 1.0  # the prune step aims at goal x aim: corrected by what earlier attempts measured
    met: list[Attempt] = []
    for n in range(1, goal.max_attempts + 1):
        key = (choice.runtime, choice.precision, choice.lowrank)
        aimed_ms = goal0_ms * aim  # in the tables' terms (for a speedup goal, as the machine ran then)
        removes = bool(plan_removal(
            _prune_config(goal, choice.runtime, choice.precision, aimed_ms), planners[key], views[key],
            shape0, aimed_ms, allowed,
        ))  # fmt: skip
        # a speedup goal is handed to prune as a speedup over the original in this precision, so its
        # re-measure judges it against the original timed in its own run
        over = originals[choice.runtime, choice.precision] / aimed_ms if goal.target_speedup else None
        if over is not None and over <= 1.0:
            over = None  # the table's original already meets the aim: prune to the aim in ms instead
        prune_cfg = None  # the precision alone meets the aim: nothing to prune
        if removes:
            prune_cfg = _prune_config(
                goal, choice.runtime, choice.precision, aimed_ms, choice.lowrank, over, goal.remeasure
            )
        status(f"attempt {n}: {_label(*key)}, aimed at {aimed_ms:.3f} ms")
        attempt_recipe = _recipe_for(
            recipe, goal, choice.runtime, choice.precision, prune_cfg, choice.lowrank
        )
        attempt_dir = out_dir / f"attempt-{n}"
        try:
            result = run_recipe(attempt_recipe, attempt_dir, overwrite=True)
        except VitcompressError as err:  # e.g. a re-plan below the floor: keep what was measured
            if not report.attempts:
                write_reports(report, out_dir)  # the candidates, for the user to see what was tried
                raise
            report.attempts[-1].verdict += f"; attempt {n} could not run: {err.message}"
            break
        pruned_target = next((r.details["target"] for r in result.ledger if r.kind == "prune"), None)
        validate = result.ledger[-1]
        measured: float | None = validate.latency_p50_ms
        drop_points = validate.details.get("top1_drop_points")
        if drop_points is None and validate.details.get("baseline") == validate.artifact:
            drop_points = 0.0  # nothing changed the model: it is the baseline itself
        attempt = Attempt(
            n, choice.runtime, choice.precision, aimed_ms,
            float(pruned_target["predicted_ms"]) if pruned_target else choice.predicted_ms,
            measured, validate.top1, None if drop_points is None else float(drop_points), str(attempt_dir),
            lowrank=choice.lowrank,
            pruned_ms=pruned_target.get("measured_ms") if pruned_target else None,
            prune_tries=max(1, len(pruned_target.get("attempts", []))) if pruned_target else 0,
        )  # fmt: skip
        report.attempts.append(attempt)
        speedup = validate.details.get("speedup_vs_baseline")
        # A speedup goal is judged against the original timed in the same run: validate's fp32
        # baseline runs on ORT, so the goal moves by how that original drifted from its ORT table.
        drift_ref = originals["ort", "fp32"] if goal.target_speedup is not None else None
        if drift_ref and measured is not None and speedup:
            goal_ms = goal0_ms * float(measured * float(speedup)) / drift_ref
            attempt.goal_ms = goal_ms
        fast = measured is not None and measured <= goal_ms * (1 + goal.tolerance)
        if not fast and measured is not None and goal.confirm_runs and validate.artifact:
            # A miss costs a whole attempt (prune, distil, ...): time it again, longer, first. On a
            # shared machine one disturbed reading adds the same milliseconds to the model and its
            # baseline and shrinks the speedup (a 0.3 ms model read 0.6 ms once, 0.3 ms again).
            status(f"attempt {n}: {measured:.3f} ms misses {goal_ms:.3f} ms; timing it again")
            try:
                again, original_again = _time_again(validate, choice.runtime, goal)
            except Exception as err:  # a confirmation that fails leaves validate's reading
                log.warning("tune: timing attempt %d again failed (%s); validate's reading stands", n, err)
            else:
                attempt.validate_ms, attempt.measured_ms, measured = measured, again, again
                if drift_ref:
                    goal_ms = goal0_ms * original_again / drift_ref
                    attempt.goal_ms = goal_ms
                fast = measured <= goal_ms * (1 + goal.tolerance)
        accurate = attempt.top1_drop is not None and attempt.top1_drop <= goal.max_top1_drop
        if fast and accurate and measured is not None:
            met.append(attempt)
            slack = 1 - measured / goal_ms
            if slack <= goal.tolerance or n == goal.max_attempts or prune_cfg is None:
                attempt.verdict = "meets the goal"
                break
            # Faster than asked by more than the tolerance: a less pruned model may keep more top-1.
            aim *= goal_ms / measured
            attempt.verdict = (
                f"meets the goal, {slack:.0%} faster than asked: next, aim at "
                f"{goal0_ms * aim:.3f} ms (this one is kept if that misses)"
            )
            continue
        if met:
            attempt.verdict = f"misses; attempt {met[-1].attempt} met the goal and is the result"
            break
        if not fast and measured is not None:
            aim *= goal_ms / measured
            attempt.verdict = (
                f"measured {measured:.3f} ms > goal {goal_ms:.3f} ms (+{goal.tolerance:.0%}): "
                f"next, aim at {goal0_ms * aim:.3f} ms"
            )
        elif queue and attempt.top1_drop is not None:
            nxt = queue.pop(0)
            attempt.verdict = (
                f"top-1 dropped {attempt.top1_drop:.2f} points > {goal.max_top1_drop:g}: next, "
                f"{_label(nxt.runtime, nxt.precision, nxt.lowrank)} "
                f"(proxy drop {nxt.predicted_drop:.2f})"
            )
            choice, aim = nxt, 1.0
        else:
            attempt.verdict = (
                f"top-1 dropped {attempt.top1_drop} points (max {goal.max_top1_drop:g}): no candidate left"
            )
            break
        log.info("tune attempt %d: %s", n, attempt.verdict)
    if met:
        best = max(met, key=lambda a: (a.top1 or 0.0, -a.attempt))
        report.met, report.final = True, best.out_dir
    write_reports(report, out_dir)
    if not report.met:
        raise BudgetExceededError(
            f"tune: no attempt met p50 <= {goal_ms:.3f} ms at <= {goal.max_top1_drop:g} points "
            f"({len(report.attempts)} tried; see {out_dir / 'tune.md'})",
            hint="allow more distillation (distill_epochs), a larger max_top1_drop, or a slower p50",
        )
    return report


def _time_again(validate: Any, runtime: str, goal: GoalSection) -> tuple[float, float]:
    """p50 of the validated model and of its fp32 baseline, timed as validate timed them (the
    baseline on ORT, the model on `runtime`), median over `goal.confirm_runs` interleaved rounds."""
    import statistics

    from vitcompress.runtimes import Precision, Runtime
    from vitcompress.timing import bench_models

    model, baseline = Path(str(validate.artifact)), Path(str(validate.details["baseline"]))
    hint = validate.details.get("runner", {}).get("precision")
    precision = Precision(hint) if runtime == "openvino" and hint in ("fp32", "bf16") else None
    entries = [(baseline, Runtime.ort), (model, Runtime(runtime))]
    rounds = [
        bench_models(
            [], threads=goal.threads, batch_sizes=[goal.batch], runs=50, precision=precision, entries=entries
        )
        for _ in range(goal.confirm_runs)
    ]
    model_ms = statistics.median(r.find(str(model), goal.batch, runtime).p50_ms for r in rounds)
    baseline_ms = statistics.median(r.find(str(baseline), goal.batch, "ort").p50_ms for r in rounds)
    return float(model_ms), float(baseline_ms)


def _whole_ms(table: LatencyTable) -> float:
    """The original model's p50 as the table measured it."""
    return float(next(a for a in table.anchors if a["name"] == "whole")["measured_ms"])


def _lowrank_options(goal: GoalSection, tables: dict[tuple[str, str], LatencyTable]) -> list[float | None]:
    """The goal's low-rank choices that every table can predict (tables without factorized-MLP probes,
    e.g. a model whose MLP no rank can shrink, offer dense only)."""
    options = goal.lowrank_fractions()
    if any(not tables[t].lowrank_ranks for t in goal.targets()) and any(f is not None for f in options):
        log.warning("tune: the latency table has no factorized-MLP probes; low rank is not offered")
        options = [f for f in options if f is None] or [None]
    return options


def _label(runtime: str, precision: str, lowrank: float | None) -> str:
    what = f"{runtime} {precision}"
    return what if lowrank is None else f"{what} + low rank {lowrank:g}"


def write_reports(report: TuneReport, out_dir: Path) -> None:
    """tune.json, tune.md (candidates and attempts, predicted vs measured) and tune.png (the frontier)."""
    from vitcompress.fileio import write_json, write_text
    from vitcompress.plot import ParetoPoint, plot_pareto

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "tune.json", report.to_dict())
    lines = [
        f"# tune: p50 <= {report.goal_ms:.3f} ms on {report.runtime}, top-1 drop <= {report.max_top1_drop:g}",
        "",
        f"Original: {report.baseline_ms:.3f} ms (fp32 on {report.runtime.split(', ')[0]}, measured when the "
        f"table was profiled); proxy top-1 "
        f"{100 * report.base_proxy_top1:.2f}%.",
        "",
        "## Candidates (predicted)",
        "",
        "| runtime | precision | low rank | planned for (ms) | predicted p50 (ms) | proxy top-1 | predicted drop (pts) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c.runtime} | {c.precision} | {_rank_cell(c.lowrank)} | {c.planner_goal_ms:.3f} | {c.predicted_ms:.3f} | {100 * c.proxy_top1:.2f}% | {c.predicted_drop:.2f} |"
        for c in report.candidates
    ]
    lines += [
        "",
        "## Attempts (measured)",
        "",
        "Each attempt's prune step times the pruned model against the original before distilling "
        "(`after pruning`, with its number of plans) and re-plans when it missed; `measured p50` is "
        "validate's, after distilling, exporting and quantizing (a miss there is timed again, "
        "longer, before it counts: `confirm_runs`). `goal` is the goal the attempt was judged by: for a "
        "speedup, the original timed in the same run over the speedup.",
        "",
        "| # | runtime | precision | low rank | aimed at | predicted p50 | after pruning | measured p50 | goal | top-1 | drop | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in report.attempts:
        measured = f"{a.measured_ms:.3f}" if a.measured_ms is not None else "-"
        if a.validate_ms is not None:
            measured += f" (validate read {a.validate_ms:.3f})"
        pruned = f"{a.pruned_ms:.3f} ({a.prune_tries} plans)" if a.pruned_ms is not None else "-"
        top1 = f"{100 * a.top1:.2f}%" if a.top1 is not None else "-"
        drop = f"{a.top1_drop:.2f}" if a.top1_drop is not None else "-"
        lines.append(
            f"| {a.attempt} | {a.runtime} | {a.precision} | {_rank_cell(a.lowrank)} | {a.planner_goal_ms:.3f} | {a.predicted_ms:.3f} | {pruned} | {measured} | {a.goal_ms or report.goal_ms:.3f} | {top1} | {drop} | {a.verdict} |"
        )
    lines += [
        "",
        f"Result: {report.final} (the most accurate attempt that met the goal)."
        if report.final
        else "Result: none; no attempt met the goal.",
    ]
    write_text(out_dir / "tune.md", "\n".join(lines) + "\n")
    points = [ParetoPoint("original", report.baseline_ms, report.base_proxy_top1, baseline=True)]
    points += [
        ParetoPoint(
            f"{_label(c.runtime, c.precision, c.lowrank)} x{c.goal_factor:g}",
            c.predicted_ms,
            c.proxy_top1 - (c.predicted_drop - 100 * (report.base_proxy_top1 - c.proxy_top1)) / 100,
        )
        for c in report.candidates
    ]
    try:
        plot_pareto(
            points,
            out_dir / "tune.png",
            f"tune candidates (predicted p50, proxy top-1); goal {report.goal_ms:.2f} ms",
        )
    except ImportError:  # matplotlib is optional for the plot only
        log.warning("matplotlib missing: tune.png not written")


def _rank_cell(lowrank: float | None) -> str:
    return "-" if lowrank is None else f"MLP x{lowrank:g}"
