"""The prune pass: the pruning loop (importance, plan, surgery, in one or more steps) and the ledger
record."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitcompress.errors import PruneError
from vitcompress.passes.prune.config import PruneConfig, Scope, Structure
from vitcompress.passes.prune.cost import current_shape, fit_cost_model
from vitcompress.passes.prune.importance import _graph, compute_stats
from vitcompress.passes.prune.plan import (
    Planner,
    _check_reachable,
    _heads_to_sets,
    _is_protected,
    _owners,
    _protected_owners,
    _removal_global,
    _removal_target,
    _removal_uniform,
)
from vitcompress.passes.prune.surgery import apply_plan, check_model

if TYPE_CHECKING:
    import torch

    from vitcompress.data import Dataset
    from vitcompress.models.loader import LoadedModel
    from vitcompress.state import ModelState

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the pruning loop


@dataclass(frozen=True)
class StepReport:
    step: int
    macs: int
    params: int
    shape: list[dict[str, int]]
    embed_dim: int


@dataclass
class PruneResult:
    kept: dict[str, list[int]]  # "blocks.3.attn" / "blocks.3.mlp" / "embed" -> kept original channel ids
    steps: list[StepReport]
    macs_before: int
    params_before: int
    macs_after: int
    params_after: int
    target: dict[str, Any] | None = None


def _batches(data: Dataset | None, cfg: PruneConfig, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not cfg.importance.needs_data:
        return []
    if data is None:
        raise PruneError(
            f"importance {cfg.importance.value!r} needs data",
            hint="add data.calibration (or data.train) to the recipe, or pass --data, or use importance l1/l2",
        )
    batches = list(
        data.batches(cfg.batch_size, shuffle=True, seed=seed, limit_batches=cfg.calibration_batches)
    )
    if not batches:
        raise PruneError("importance: the calibration data is empty")
    return batches


def prune_model(
    loaded: LoadedModel,
    cfg: PruneConfig,
    data: Dataset | None = None,
    seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> PruneResult:
    """Prune `loaded.model` in place as `cfg` asks; returns what was kept and the per-step sizes."""
    import torch

    from vitcompress.models.layers import LowRankLinear
    from vitcompress.models.stats import count_macs
    from vitcompress.models.tokens import token_schedule_of

    if token_schedule_of(loaded.model) is not None:  # the planner's costs assume every token everywhere
        raise PruneError(
            f"{loaded.label} reduces its tokens (a tokens pass): prune before the tokens pass, not after",
            hint="put the prune step before the tokens step, or prune the model without the schedule",
        )

    factorized = [n for n, m in loaded.model.named_modules() if isinstance(m, LowRankLinear)]
    if factorized:
        raise PruneError(
            f"the model has factorized layers ({factorized[0]}, ...): prune before lowrank, not after",
            hint="put the prune pass before the lowrank pass in the recipe",
        )
    torch.manual_seed(seed)
    protected = _protected_owners(loaded, cfg)
    enabled = cfg.enabled()
    nblocks = len(loaded.adapter.blocks())
    allowed_map = {
        (s, i): not _is_protected(_owners(loaded, s, i), protected)
        for s in enabled
        for i in ([-1] if s is Structure.embed else range(nblocks))
    }
    if Structure.embed in enabled and not allowed_map[(Structure.embed, -1)]:
        field_name = "embed" if cfg.target is None else "structures"
        raise PruneError(
            f"{field_name}: pruning the embedding width shrinks the protected patch embedding "
            f"({loaded.adapter.patch_embed_name})",
            hint="set protect to the modules to keep whole without the patch embedding, e.g. "
            f"protect: [{', '.join(repr(h) for h in loaded.adapter.head_names)}]",
        )
    if not any(allowed_map.values()):
        raise PruneError("protect: every structure asked for is protected; nothing can be pruned")

    def allowed(structure: Structure, block: int) -> bool:
        return allowed_map.get((structure, block), False)

    if Structure.head_dim in enabled:
        for b in loaded.adapter.blocks():
            q_norm = getattr(b.attn.module, "q_norm", None)
            if q_norm is not None and not isinstance(q_norm, torch.nn.Identity):
                raise PruneError(
                    f"head_dim: {b.name} normalizes q and k per head (qk_norm); pruning head dims would change it",
                    hint="prune heads and MLP width instead",
                )

    if cfg.latency_goal is not None:  # hook: latency targets are planned against a measured table
        from vitcompress.latency.plan import prune_to_latency

        return prune_to_latency(loaded, cfg, data, seed, allowed, on_step)

    shape0 = current_shape(loaded)
    macs0, _ = count_macs(loaded)
    costs = fit_cost_model(loaded, macs0)
    params0 = sum(p.numel() for p in loaded.model.parameters())
    goal_total: float | None = None
    if cfg.target is not None:
        name, value = cfg.target
        total0 = macs0 if name == "target_macs" else params0
        goal_total = value * total0 if value < 1 else value
        if goal_total >= total0:
            raise PruneError(
                f"{name}={value:g} is not below the model's {total0:,} ({'MACs' if name == 'target_macs' else 'params'})"
            )
    if goal_total is not None:
        _check_reachable(cfg, costs, shape0, goal_total, allowed)
    batches = _batches(data, cfg, seed)
    # original channel ids still present, to report what was kept
    kept: dict[str, list[int]] = {}
    for b in loaded.adapter.blocks():
        kept[f"{b.name}.attn"] = list(range(b.attn.attn_dim))
        kept[f"{b.name}.mlp"] = list(range(b.mlp.hidden))
    kept["embed"] = list(range(shape0.embed))

    reports: list[StepReport] = []
    for step in range(1, cfg.steps + 1):
        fraction = step / cfg.steps
        shape = current_shape(loaded)
        graph = _graph(loaded)
        stats = compute_stats(loaded, cfg.importance, graph, batches)
        planner = Planner(stats, shape, cfg.round_to)
        if goal_total is not None:
            total0 = macs0 if cfg.target_macs is not None else params0
            step_goal = total0 - (total0 - goal_total) * fraction
            floor = step_goal - cfg.tolerance * total0
            removed = _removal_target(cfg, planner, costs, shape, step_goal, floor, allowed)
        elif cfg.scope is Scope.global_:
            removed = _removal_global(cfg, planner, shape0, shape, fraction, allowed)
        else:
            removed = _removal_uniform(cfg, shape0, shape, fraction, allowed)
            _heads_to_sets(planner, removed)
        plan = planner.plan(removed)
        for i, channels in plan.attn_remove.items():
            key = f"{loaded.adapter.blocks()[i].name}.attn"
            drop = set(channels)
            kept[key] = [c for n, c in enumerate(kept[key]) if n not in drop]
        for i, channels in plan.mlp_remove.items():
            key = f"{loaded.adapter.blocks()[i].name}.mlp"
            drop = set(channels)
            kept[key] = [c for n, c in enumerate(kept[key]) if n not in drop]
        if plan.embed_remove:
            drop = set(plan.embed_remove)
            kept["embed"] = [c for n, c in enumerate(kept["embed"]) if n not in drop]
        apply_plan(loaded, graph, plan)
        check_model(loaded)
        macs, _ = count_macs(loaded)
        params = sum(p.numel() for p in loaded.model.parameters())
        reports.append(StepReport(step, macs, params, loaded.adapter.structure(), loaded.adapter.embed_dim))
        log.info(
            "prune step %d/%d: MACs %.1f%%, params %.1f%% of the original",
            step,
            cfg.steps,
            100 * macs / macs0,
            100 * params / params0,
        )
        if on_step:
            on_step(step, cfg.steps)
    result = PruneResult(kept, reports, macs0, params0, reports[-1].macs, reports[-1].params)
    if cfg.target is not None and goal_total is not None:
        name, value = cfg.target
        total0 = macs0 if name == "target_macs" else params0
        reached = result.macs_after if name == "target_macs" else result.params_after
        result.target = {
            "goal": goal_total,
            "reached": reached,
            "goal_fraction": goal_total / total0,
            "reached_fraction": reached / total0,
        }
        if abs(reached - goal_total) > cfg.tolerance * total0:
            raise PruneError(
                f"{name}={value:g}: reached {reached / total0:.1%} of the original, goal {goal_total / total0:.1%} "
                f"(tolerance {cfg.tolerance:.0%})",
                hint="allow more structures, lower round_to or min_heads, unprotect modules, or raise tolerance",
            )
    return result


def run(state: ModelState, cfg: PruneConfig) -> ModelState:
    from vitcompress.models.artifact import save_artifact
    from vitcompress.state import Measured

    loaded = state.model
    needed_by = f"{cfg.step_name} (importance {cfg.importance.value})"
    data = state.load_split("calibration", needed_by) if cfg.importance.needs_data else None
    result = prune_model(loaded, cfg, data, seed=state.settings.seed)
    directory = state.settings.out_dir / cfg.step_name
    history = [
        {
            "pass": cfg.step_name,
            "config": cfg.model_dump(mode="json"),
            "steps": [s.__dict__ for s in result.steps],
        }
    ]
    save_artifact(loaded, directory, history=history)
    details: dict[str, Any] = {
        "importance": cfg.importance.value,
        "macs_ratio": result.macs_after / result.macs_before,
        "params_ratio": result.params_after / result.params_before,
        "embed_dim": loaded.adapter.embed_dim,
        "blocks": loaded.adapter.structure(),
    }
    if result.target:
        details["target"] = result.target
    outcome = Measured(
        params=result.params_after,
        macs=result.macs_after,
        artifact=str(directory),
        details=details,
    )
    return state.passed(cfg, outcome)
