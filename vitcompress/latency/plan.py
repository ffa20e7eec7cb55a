"""Latency-aware pruning: prune until the target's measured p50 meets a goal (NViT's redistribution).

NViT (Yang et al., CVPR 2023) ranks every prunable structure (heads, head-size chunks, MLP chunks,
in every block) globally by its Hessian-aware saliency divided by the latency its removal saves,
read from a lookup table measured on the target. Here the table is `vitcompress.latency`'s, and the
cost of a unit is the marginal latency at the model's current shape (the table is not linear: the
first heads removed save less than the last), recomputed after every removal. MLP widths are cut in
chunks of the multiple the table found fast (at least `round_to`); head sizes in `round_to` chunks
(the fast multiple is measured on MLP widths, and at 32 it would leave a 32-wide head nothing to
cut but the whole head: the batch-32 plans of BENCHMARKS.md's frontier dropped only whole heads).

The prediction is only a model, so the result is exported to the target, measured against the
original in one interleaved run, and, if it misses the goal by more than `latency_tolerance`, the
goal given to the planner is corrected by the measured/predicted ratio and the plan is redone from
the original weights (`remeasure` times at most). What was predicted and measured at each attempt
goes into the ledger.

With `latency_lowrank: f` the plan is for the model a later `lowrank` pass (rank_fraction f) makes:
the planner reads the table's factorized-MLP view (`LatencyTable.factorized`), so an MLP chunk
saves what it saves once factorized, and the remeasure step times a factorized copy.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.errors import PruneError

if TYPE_CHECKING:
    from vitcompress.data import Dataset
    from vitcompress.latency.table import LatencyTable, TargetSpec
    from vitcompress.models.loader import LoadedModel
    from vitcompress.passes.prune import Planner, PruneConfig, PruneResult, Shape, Structure, Unit
    from vitcompress.passes.prune.importance import ChannelStats

log = logging.getLogger(__name__)

Removed = dict[tuple["Structure", int], Any]


def spec_of(cfg: PruneConfig) -> TargetSpec:
    from vitcompress.latency.table import TargetSpec

    return TargetSpec(cfg.latency_runtime, cfg.latency_precision, cfg.latency_threads, cfg.latency_batch)


def shape_blocks(shape: Shape) -> list[tuple[int, int, int]]:
    return [(b.heads, b.head_dim, b.mlp) for b in shape.blocks]


def factorized_copy(loaded: LoadedModel, rank_fraction: float) -> LoadedModel:
    """A copy of `loaded` with every block's MLP factorized as `lowrank` (rank_fraction, svd) does."""
    from vitcompress.models.adapters import adapter_for
    from vitcompress.passes.lowrank.config import LowRankConfig
    from vitcompress.passes.lowrank.run import factorize_model

    out = copy.copy(loaded)
    out.model = copy.deepcopy(loaded.model)
    out.adapter = adapter_for(out.model)
    factorize_model(out, LowRankConfig(rank_fraction=rank_fraction))
    return out


def steps(cfg: PruneConfig, table: LatencyTable) -> tuple[int, int]:
    """(MLP chunk, head-size chunk) of a latency plan: the table's fast multiple for MLP widths,
    round_to for head sizes."""
    return max(cfg.round_to, table.fast_multiple), cfg.round_to


def latency_planner(stats: ChannelStats, shape: Shape, cfg: PruneConfig, table: LatencyTable) -> Planner:
    from vitcompress.passes.prune import Planner

    return Planner(stats, shape, *steps(cfg, table))


def smallest_ms(
    table: LatencyTable, cfg: PruneConfig, shape: Shape, allowed: Callable[[Structure, int], bool]
) -> float:
    """The predicted p50 of the smallest model a latency plan reaches (every allowed width at its floor)."""
    from vitcompress.passes.prune import smallest_shape

    return table.predict_ms(shape_blocks(smallest_shape(cfg, shape, allowed, *steps(cfg, table))))


def plan_removal(
    cfg: PruneConfig,
    planner: Planner,
    table: LatencyTable,
    shape: Shape,
    goal_ms: float,
    allowed: Callable[[Structure, int], bool],
) -> Removed:
    """Greedy: remove the unit of least saliency per millisecond saved until the prediction meets
    `goal_ms`. Each block offers its next head (least salient first) and its next head-size and
    MLP chunk; their costs are the table's marginal latencies at the block's current shape."""
    from vitcompress.passes.prune import Structure, Unit, _add, _fits, planned_shape

    enabled = [s for s in cfg.enabled() if s is not Structure.embed]
    saliency = {(u.structure, u.block, u.index): u.saliency for s in enabled for u in planner.units(s)}
    removed: Removed = {}
    current = planned_shape(shape, removed, planner.r, planner.hr)
    predicted = table.predict_ms(shape_blocks(current))
    while predicted > goal_ms:
        best: tuple[tuple[float, float, int, int], Unit] | None = None
        for i, block in enumerate(current.blocks):
            before = table.block_ms(block.heads, block.head_dim, block.mlp)
            for structure in enabled:
                if not allowed(structure, i):
                    continue
                if structure is Structure.heads:
                    gone = removed.get((structure, i), set())
                    index = next((h for h in planner.head_order[i] if h not in gone), None)
                    after = table.block_ms(block.heads - 1, block.head_dim, block.mlp)
                elif structure is Structure.head_dim:
                    index = int(removed.get((structure, i), 0))
                    after = table.block_ms(block.heads, block.head_dim - planner.hr, block.mlp)
                else:
                    index = int(removed.get((structure, i), 0))
                    after = table.block_ms(block.heads, block.head_dim, block.mlp - planner.r)
                key = (structure, i, index)
                if index is None or key not in saliency:
                    continue
                unit = Unit(structure, i, index, saliency[key])
                step = planner.hr if structure is Structure.head_dim else planner.r
                if not _fits(cfg, shape, unit, removed, step):
                    continue
                saved = before - after  # raw ms: the calibration scales every unit alike here
                score = unit.saliency / saved if saved > 1e-6 else math.inf
                rank = (score, unit.saliency, i, index)
                if best is None or rank < best[0]:
                    best = (rank, unit)
        if best is None:
            break  # nothing left to remove: the caller checks reachability first
        _add(removed, best[1])
        current = planned_shape(shape, removed, planner.r, planner.hr)
        predicted = table.predict_ms(shape_blocks(current))
    return removed


def _kept(loaded: LoadedModel, plan: Any, shape0: Shape) -> dict[str, list[int]]:
    kept: dict[str, list[int]] = {}
    for i, (b, b0) in enumerate(zip(loaded.adapter.blocks(), shape0.blocks, strict=True)):
        gone = set(plan.attn_remove.get(i, []))
        kept[f"{b.name}.attn"] = [c for c in range(b0.heads * b0.head_dim) if c not in gone]
        gone = set(plan.mlp_remove.get(i, []))
        kept[f"{b.name}.mlp"] = [c for c in range(b0.mlp) if c not in gone]
    kept["embed"] = list(range(shape0.embed))
    return kept


def prune_to_latency(
    loaded: LoadedModel,
    cfg: PruneConfig,
    data: Dataset | None,
    seed: int,
    allowed: Callable[[Structure, int], bool],
    on_step: Callable[[int, int], None] | None = None,
) -> PruneResult:
    """Prune `loaded` in place to `cfg.target_latency_ms` (or `target_speedup`) on the target."""
    from vitcompress.latency.profile import get_table, target_file, time_files
    from vitcompress.models.adapters import adapter_for
    from vitcompress.models.stats import count_macs
    from vitcompress.passes.prune import (
        PruneResult,
        StepReport,
        Structure,
        _batches,
        _graph,
        apply_plan,
        check_model,
        compute_stats,
        current_shape,
    )

    if Structure.embed in cfg.enabled():
        raise PruneError(
            "structures: a latency target prunes heads, head_dim and mlp; the table is measured at the "
            "model's embedding width",
            hint="remove embed from structures",
        )
    spec = spec_of(cfg)
    table = get_table(loaded, spec, path=cfg.latency_table)
    if cfg.latency_lowrank is not None:
        table = table.factorized(cfg.latency_lowrank)
    shape0 = current_shape(loaded)
    from vitcompress.latency.predict import predict_model

    base_pred = predict_model(table, loaded)
    whole = next((a for a in table.anchors if a["name"] == "whole"), None)
    is_original = whole is not None and all(tuple(b) == tuple(whole["shape"]) for b in shape_blocks(shape0))
    baseline_ms = float(whole["measured_ms"]) if is_original and whole else base_pred
    goal_ms = (
        cfg.target_latency_ms
        if cfg.target_latency_ms is not None
        else baseline_ms / float(cfg.target_speedup or 1)
    )
    what = (
        f"target_latency_ms={cfg.target_latency_ms:g}"
        if cfg.target_latency_ms is not None
        else f"target_speedup={cfg.target_speedup:g}"
    )
    if goal_ms >= baseline_ms:
        raise PruneError(
            f"{what}: the model already runs in {baseline_ms:.3f} ms on {spec.label()}",
            hint="ask for less than that, or nothing needs pruning",
        )
    floor_ms = smallest_ms(table, cfg, shape0, allowed)
    if floor_ms > goal_ms * (1 + cfg.latency_tolerance):
        raise PruneError(
            f"{what} cannot be reached on {spec.label()}: pruning {', '.join(s.value for s in cfg.enabled())} "
            f"to the floor gives {floor_ms:.3f} ms predicted (the fastest reachable p50); goal {goal_ms:.3f} ms",
            hint=f"ask for at least {floor_ms:.3f} ms (speedup {baseline_ms / floor_ms:.2f}x), add structures, "
            "lower min_heads, or use a faster runtime/precision (e.g. int8)",
        )
    macs0, _ = count_macs(loaded)
    params0 = sum(p.numel() for p in loaded.model.parameters())
    batches = _batches(data, cfg, seed)
    stats = compute_stats(loaded, cfg.importance, _graph(loaded), batches)
    planner = latency_planner(stats, shape0, cfg, table)
    original = copy.deepcopy(loaded.model) if cfg.remeasure else None
    attempts: list[dict[str, Any]] = []
    removals: list[Any] = []  # each attempt's removal, to go back to the closest one (latency_miss: keep)
    planner_goal = goal_ms
    with tempfile.TemporaryDirectory(prefix="vitcompress-latency-") as scratch:
        base_file: Path | None = None
        for attempt in range(1, cfg.remeasure + 2):
            if attempt > 1:
                assert original is not None
                loaded.model = copy.deepcopy(original)
                loaded.adapter = adapter_for(loaded.model)
            removed = plan_removal(cfg, planner, table, shape0, planner_goal, allowed)
            removals.append(removed)
            plan = planner.plan(removed)
            apply_plan(loaded, _graph(loaded), plan)
            check_model(loaded)
            predicted = predict_model(table, loaded)
            record: dict[str, Any] = {
                "attempt": attempt,
                "planner_goal_ms": planner_goal,
                "predicted_ms": predicted,
            }
            attempts.append(record)
            if not cfg.remeasure:
                break
            assert original is not None
            if base_file is None:
                base = copy.copy(loaded)
                base.model, base.adapter = original, adapter_for(original)
                base_file = target_file(base, spec, Path(scratch) / "original", "original")
            timed = loaded if cfg.latency_lowrank is None else factorized_copy(loaded, cfg.latency_lowrank)
            candidate = target_file(timed, spec, Path(scratch) / f"attempt{attempt}", "candidate")
            base_ms, measured = time_files([base_file, candidate], spec, cfg.measure_runs)
            if cfg.target_speedup is not None:
                goal_ms = base_ms / cfg.target_speedup
            record.update(measured_ms=measured, baseline_measured_ms=base_ms, goal_ms=goal_ms)
            log.info(
                "latency attempt %d: predicted %.3f ms, measured %.3f ms, goal %.3f ms",
                attempt,
                predicted,
                measured,
                goal_ms,
            )
            if abs(measured - goal_ms) <= cfg.latency_tolerance * goal_ms:
                break
            planner_goal = planner_goal * goal_ms / measured  # the model's error near this shape
        last = attempts[-1]
        if "measured_ms" in last and _missed(last, cfg) and cfg.latency_miss == "keep":
            closest = min(attempts, key=lambda a: _miss_rank(a, cfg))
            if closest is not last:  # go back to it: the original weights, its plan
                assert original is not None
                loaded.model = copy.deepcopy(original)
                loaded.adapter = adapter_for(loaded.model)
                # a fresh plan: torch-pruning may rewrite the index lists it was given
                plan = planner.plan(removals[closest["attempt"] - 1])
                apply_plan(loaded, _graph(loaded), plan)
                check_model(loaded)
            closest["kept"] = True
            log.warning(
                "latency target missed after %d attempts: kept attempt %d (measured %.3f ms, goal %.3f ms)",
                len(attempts),
                closest["attempt"],
                closest["measured_ms"],
                closest["goal_ms"],
            )
    if on_step:
        on_step(1, 1)
    macs, _ = count_macs(loaded)
    params = sum(p.numel() for p in loaded.model.parameters())
    last = next((a for a in attempts if a.get("kept")), attempts[-1])
    result = PruneResult(
        _kept(loaded, plan, shape0),
        [StepReport(1, macs, params, loaded.adapter.structure(), loaded.adapter.embed_dim)],
        macs0,
        params0,
        macs,
        params,
    )
    result.target = {
        "goal_ms": goal_ms,
        "predicted_ms": last["predicted_ms"],
        "baseline_ms": last.get("baseline_measured_ms", baseline_ms),
        "runtime": spec.label(),
        "table": str(cfg.latency_table or table.key.path()),
        "lowrank": cfg.latency_lowrank,
        "attempts": attempts,
    }
    if "measured_ms" in last:
        result.target["measured_ms"] = last["measured_ms"]
        result.target["speedup"] = last["baseline_measured_ms"] / last["measured_ms"]
        result.target["goal_ms"] = last["goal_ms"]
        if _missed(last, cfg) and cfg.latency_miss == "fail":
            raise PruneError(
                f"{what}: measured {last['measured_ms']:.3f} ms after {len(attempts)} attempts, goal "
                f"{goal_ms:.3f} ms (tolerance {cfg.latency_tolerance:.0%})",
                hint="raise remeasure or latency_tolerance, or profile the target again (--force) on a quiet machine",
            )
    return result


def _missed(attempt: dict[str, Any], cfg: PruneConfig) -> bool:
    """Whether a measured attempt landed outside the tolerance around its goal (both sides)."""
    return bool(abs(attempt["measured_ms"] - attempt["goal_ms"]) > cfg.latency_tolerance * attempt["goal_ms"])


def _miss_rank(attempt: dict[str, Any], cfg: PruneConfig) -> tuple[bool, float]:
    """Which missed attempt to keep: one that is not slower than the band first (the goal is an upper
    bound: a plan too fast still meets it), then the smallest relative miss (with a speedup target each
    attempt has its own goal, from the original timed in its run)."""
    ratio = attempt["measured_ms"] / attempt["goal_ms"]
    return ratio > 1 + cfg.latency_tolerance, abs(ratio - 1)
