"""Planning: which heads and channels go, per block or ranked across blocks, within the rules (whole
heads, uniform head size, min_heads, round_to, protected modules) and towards a fraction or a target."""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitcompress.errors import PruneError
from vitcompress.passes.prune.config import PruneConfig, Structure
from vitcompress.passes.prune.cost import CostModel, Shape
from vitcompress.passes.prune.importance import ChannelStats

if TYPE_CHECKING:
    import torch

    from vitcompress.models.loader import LoadedModel

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Unit:
    """One removable piece: a head, a chunk of head dims (in every head), MLP or embed channels."""

    structure: Structure
    block: int  # -1 for the embedding
    index: int  # head index, or chunk number (chunks go in order, least important first)
    saliency: float


@dataclass
class Plan:
    """What to remove in one step, as indices into the current model's channels."""

    attn_remove: dict[int, list[int]] = field(default_factory=dict)  # block -> attention channels
    heads: dict[int, tuple[int, int]] = field(default_factory=dict)  # block -> new (heads, head_dim)
    mlp_remove: dict[int, list[int]] = field(default_factory=dict)
    embed_remove: list[int] = field(default_factory=list)


class Planner:
    """Turns channel statistics into units and counts into concrete channel indices.

    MLP and embedding widths go in chunks of `round_to`, head sizes in chunks of `head_step` (default
    `round_to`). A latency plan cuts MLP widths in the multiple the target's kernels like (16 or 32 on
    some CPUs at batch 32) but head sizes still in 8s: a 32-wide head cut in 32s could only go whole.
    """

    def __init__(
        self, stats: ChannelStats, shape: Shape, round_to: int, head_step: int | None = None
    ) -> None:
        import torch

        self.stats, self.shape, self.r = stats, shape, round_to
        self.hr = head_step or round_to
        self.head_order: list[list[int]] = []  # per block: heads, least important first
        self.head_sal: list[list[float]] = []
        self.dim_order: list[list[torch.Tensor]] = []  # per block, per head: dims least important first
        self.mlp_order: list[torch.Tensor] = []
        for i, b in enumerate(shape.blocks):
            s = stats.attn[i]
            hd = b.head_dim
            sal = [stats.unit_score(s, torch.arange(h * hd, (h + 1) * hd)) for h in range(b.heads)]
            self.head_sal.append(sal)
            self.head_order.append(sorted(range(b.heads), key=lambda h: (sal[h], h)))
            per_channel = stats.score(s).view(b.heads, hd)
            self.dim_order.append([torch.argsort(per_channel[h], stable=True) for h in range(b.heads)])
            self.mlp_order.append(torch.argsort(stats.score(stats.mlp[i]), stable=True))
        self.embed_order = torch.argsort(stats.score(stats.embed), stable=True)

    # chunk saliencies (cumulative max keeps chunks of one block in order when sorted by saliency)
    def _chunks(self, stats: torch.Tensor, order: torch.Tensor, n_chunks: int) -> list[float]:
        out, best = [], -math.inf
        for k in range(n_chunks):
            best = max(best, self.stats.unit_score(stats, order[k * self.r : (k + 1) * self.r]))
            out.append(best)
        return out

    def dim_chunk_channels(self, block: int, k: int) -> torch.Tensor:
        import torch

        hd = self.shape.blocks[block].head_dim
        return torch.cat(
            [h * hd + order[k * self.hr : (k + 1) * self.hr] for h, order in enumerate(self.dim_order[block])]
        )

    def units(self, structure: Structure) -> list[Unit]:
        units: list[Unit] = []
        for i, b in enumerate(self.shape.blocks):
            if structure is Structure.heads:
                units += [Unit(structure, i, h, self.head_sal[i][h]) for h in range(b.heads)]
            elif structure is Structure.head_dim:
                best = -math.inf
                for k in range(b.head_dim // self.hr - 1):
                    best = max(best, self.stats.unit_score(self.stats.attn[i], self.dim_chunk_channels(i, k)))
                    units.append(Unit(structure, i, k, best))
            elif structure is Structure.mlp:
                sal = self._chunks(self.stats.mlp[i], self.mlp_order[i], b.mlp // self.r - 1)
                units += [Unit(structure, i, k, s) for k, s in enumerate(sal)]
        if structure is Structure.embed:
            sal = self._chunks(self.stats.embed, self.embed_order, self.shape.embed // self.r - 1)
            units += [Unit(structure, -1, k, s) for k, s in enumerate(sal)]
        return units

    def plan(self, removed: dict[tuple[Structure, int], set[int] | int]) -> Plan:
        """Concrete indices for: heads removed per block (a set), chunks removed per block/embed (a count)."""

        plan = Plan()
        for i, b in enumerate(self.shape.blocks):
            gone_heads = removed.get((Structure.heads, i), set())
            assert isinstance(gone_heads, set)
            dim_chunks = int(removed.get((Structure.head_dim, i), 0))  # type: ignore[arg-type]
            keep_hd = b.head_dim - dim_chunks * self.hr
            channels: list[int] = []
            for h in range(b.heads):
                if h in gone_heads:
                    channels += range(h * b.head_dim, (h + 1) * b.head_dim)
                elif dim_chunks:
                    channels += (h * b.head_dim + self.dim_order[i][h][: dim_chunks * self.hr]).tolist()
            if channels:
                plan.attn_remove[i] = sorted(channels)
                plan.heads[i] = (b.heads - len(gone_heads), keep_hd)
            mlp_chunks = int(removed.get((Structure.mlp, i), 0))  # type: ignore[arg-type]
            if mlp_chunks:
                plan.mlp_remove[i] = sorted(self.mlp_order[i][: mlp_chunks * self.r].tolist())
        embed_chunks = int(removed.get((Structure.embed, -1), 0))  # type: ignore[arg-type]
        if embed_chunks:
            plan.embed_remove = sorted(self.embed_order[: embed_chunks * self.r].tolist())
        return plan


def planned_shape(
    shape: Shape, removed: dict[tuple[Structure, int], Any], r: int, head_r: int | None = None
) -> Shape:
    """The shape after `removed`: widths cut in chunks of r, head sizes in chunks of head_r (default r)."""
    out = shape.copy()
    for i, b in enumerate(out.blocks):
        b.heads -= len(removed.get((Structure.heads, i), ()))
        b.head_dim -= int(removed.get((Structure.head_dim, i), 0)) * (head_r or r)
        b.mlp -= int(removed.get((Structure.mlp, i), 0)) * r
    out.embed -= int(removed.get((Structure.embed, -1), 0)) * r
    return out


def _keep_chunks(width0: int, width: int, fraction: float, r: int) -> int:
    """Chunks of r to remove now so the width reaches round(width0 * (1 - fraction)) in multiples of r."""
    goal = max(r, round(width0 * (1 - fraction) / r) * r)
    return max(0, (width - goal) // r)


def _protected_owners(loaded: LoadedModel, cfg: PruneConfig) -> list[str]:
    adapter = loaded.adapter
    names = [n for n, _ in loaded.model.named_modules() if n]
    globs = cfg.protect if cfg.protect is not None else [*adapter.head_names, adapter.patch_embed_name]
    matched: list[str] = []
    for glob in globs:
        hits = [n for n in names if fnmatch.fnmatchcase(n, glob)]
        if not hits:
            from vitcompress.errors import did_you_mean

            raise PruneError(
                f"protect: {glob!r} matches no module of the model", hint=did_you_mean(glob, names)
            )
        matched += hits
    return matched


def _is_protected(owners: list[str], protected: list[str]) -> bool:
    return any(o == p or o.startswith(p + ".") or p.startswith(o + ".") for o in owners for p in protected)


def _owners(loaded: LoadedModel, structure: Structure, block: int) -> list[str]:
    adapter = loaded.adapter
    if structure is Structure.embed:
        return [adapter.patch_embed_name, adapter.module_name(adapter.patch_conv)]
    b = adapter.blocks()[block]
    if structure is Structure.mlp:
        fc1, fc2 = adapter.module_name(b.mlp.fc1), adapter.module_name(b.mlp.fc2)
        return [fc1.rsplit(".", 1)[0], fc1, fc2]
    return [adapter.module_name(b.attn.module), *(adapter.module_name(m) for m in (*b.attn.qkv, b.attn.proj))]


def _removal_uniform(
    cfg: PruneConfig, shape0: Shape, shape: Shape, fraction: float, allowed: Callable[[Structure, int], bool]
) -> dict[tuple[Structure, int], Any]:
    """Counts to remove now so every block reaches `fraction` of the configured ratio (step schedule)."""
    r = cfg.round_to
    removed: dict[tuple[Structure, int], Any] = {}
    for i, (b0, b) in enumerate(zip(shape0.blocks, shape.blocks, strict=True)):
        if cfg.heads and allowed(Structure.heads, i):
            keep = b0.heads - round(cfg.heads * fraction * b0.heads)
            if keep < cfg.min_heads:
                raise PruneError(
                    f"heads={cfg.heads:g} would leave {keep} of {b0.heads} heads in block {i} (min_heads {cfg.min_heads})",
                    hint="lower heads, or use scope: global, which keeps min_heads per block",
                )
            removed[(Structure.heads, i)] = (
                b.heads - keep
            )  # which ones: the planner picks the least important
        if cfg.head_dim and allowed(Structure.head_dim, i):
            removed[(Structure.head_dim, i)] = _keep_chunks(
                b0.head_dim, b.head_dim, cfg.head_dim * fraction, r
            )
        if cfg.mlp and allowed(Structure.mlp, i):
            removed[(Structure.mlp, i)] = _keep_chunks(b0.mlp, b.mlp, cfg.mlp * fraction, r)
    if cfg.embed and allowed(Structure.embed, -1):
        removed[(Structure.embed, -1)] = _keep_chunks(shape0.embed, shape.embed, cfg.embed * fraction, r)
    return removed


def _heads_to_sets(planner: Planner, removed: dict[tuple[Structure, int], Any]) -> None:
    """Uniform head counts -> the least important heads of each block."""
    for key, value in list(removed.items()):
        if key[0] is Structure.heads and isinstance(value, int):
            removed[key] = set(planner.head_order[key[1]][:value])


def _fits(
    cfg: PruneConfig,
    shape: Shape,
    unit: Unit,
    removed: dict[tuple[Structure, int], Any],
    step: int | None = None,
) -> bool:
    """Whether `unit` can go next: a head while more than min_heads stay, a chunk (of `step`, default
    round_to) in order while one chunk of the width stays."""
    r = step or cfg.round_to
    if unit.structure is Structure.heads:
        return (
            shape.blocks[unit.block].heads - len(removed.get((Structure.heads, unit.block), ()))
            > cfg.min_heads
        )
    count = int(removed.get((unit.structure, unit.block), 0))
    if unit.index != count:  # chunks go in order
        return False
    width = (
        shape.embed
        if unit.structure is Structure.embed
        else getattr(shape.blocks[unit.block], "head_dim" if unit.structure is Structure.head_dim else "mlp")
    )
    return width - (count + 1) * r >= r


def _add(removed: dict[tuple[Structure, int], Any], unit: Unit) -> None:
    key = (unit.structure, unit.block)
    if unit.structure is Structure.heads:
        removed.setdefault(key, set()).add(unit.index)
    else:
        removed[key] = int(removed.get(key, 0)) + 1


def _removal_global(
    cfg: PruneConfig,
    planner: Planner,
    shape0: Shape,
    shape: Shape,
    fraction: float,
    allowed: Callable[[Structure, int], bool],
) -> dict[tuple[Structure, int], Any]:
    """Per structure kind, remove the least salient units across all blocks until its fraction is met."""
    r = cfg.round_to
    removed: dict[tuple[Structure, int], Any] = {}
    for structure in cfg.enabled():
        ratio = getattr(cfg, structure.value) * fraction
        if structure is Structure.heads:
            total0, now = sum(b.heads for b in shape0.blocks), sum(b.heads for b in shape.blocks)
        elif structure is Structure.head_dim:
            total0 = sum(b.head_dim for b in shape0.blocks) // r
            now = sum(b.head_dim for b in shape.blocks) // r
        elif structure is Structure.mlp:
            total0, now = sum(b.mlp for b in shape0.blocks) // r, sum(b.mlp for b in shape.blocks) // r
        else:
            total0, now = shape0.embed // r, shape.embed // r
        goal = total0 - round(ratio * total0)
        todo = now - goal
        for unit in sorted(planner.units(structure), key=lambda u: (u.saliency, u.block, u.index)):
            if todo <= 0:
                break
            if allowed(structure, unit.block) and _fits(cfg, shape, unit, removed):
                _add(removed, unit)
                todo -= 1
    return removed


def _removal_target(
    cfg: PruneConfig,
    planner: Planner,
    costs: CostModel,
    shape: Shape,
    goal: float,
    floor: float,
    allowed: Callable[[Structure, int], bool],
) -> dict[tuple[Structure, int], Any]:
    """Greedy by saliency per unit of cost until the predicted total meets `goal`, skipping units that
    would land below `floor` (the goal minus the tolerance).

    Taylor and Hessian saliencies are loss changes, so they are ranked per MAC (or parameter) of the
    target, as NViT does. Magnitude is not a loss change: per MAC it would be biased against attention
    heads (their q@k and attn@v MACs carry no weights), so magnitude ranks per parameter removed.
    """
    metric = costs.macs if cfg.target_macs is not None else costs.params
    rank_by = metric if cfg.importance.needs_data else costs.params
    base, rank_base = metric(shape), rank_by(shape)
    units = []
    for structure in cfg.enabled():
        for one in planner.units(structure):
            if not allowed(structure, one.block):
                continue
            single: dict[tuple[Structure, int], Any] = {}
            _add(single, one)
            cost = rank_base - rank_by(planned_shape(shape, single, cfg.round_to))
            if cost > 0:
                units.append((one.saliency / cost, one))
    removed: dict[tuple[Structure, int], Any] = {}
    if base <= goal:
        return removed
    # Chunks of one block must go in order; their saliency is a running max, so sorting keeps that
    # order except on ties, which the (block, index) tiebreak settles.
    ordered = [u for _, u in sorted(units, key=lambda item: (item[0], item[1].block, item[1].index))]
    pending: list[Unit | None] = list(ordered)
    current = base
    for _ in range(3):  # a later pass picks up chunks whose predecessor came later in the order
        progress = False
        for n, unit in enumerate(pending):
            if unit is None or not _fits(cfg, shape, unit, removed):
                continue
            trial = {k: (set(v) if isinstance(v, set) else v) for k, v in removed.items()}
            _add(trial, unit)
            predicted = metric(planned_shape(shape, trial, cfg.round_to))
            if predicted < floor:  # too big a step past the goal: look for smaller units
                continue
            removed, current, pending[n], progress = trial, predicted, None, True
            if current <= goal:
                return removed
        if not progress:
            break
    return removed


def smallest_shape(
    cfg: PruneConfig,
    shape: Shape,
    allowed: Callable[[Structure, int], bool],
    step: int | None = None,
    head_step: int | None = None,
) -> Shape:
    """The smallest model the planner may reach: every allowed structure cut to its floor (min_heads
    heads, one chunk of head size, MLP and embedding width; chunks as the Planner's, default round_to)."""
    enabled = cfg.enabled()

    def floor(width: int, r: int) -> int:
        return width - max(0, width // r - 1) * r

    r = step or cfg.round_to
    hr = head_step or r

    out = shape.copy()
    for i, b in enumerate(out.blocks):
        if Structure.heads in enabled and allowed(Structure.heads, i):
            b.heads = min(b.heads, cfg.min_heads)
        if Structure.head_dim in enabled and allowed(Structure.head_dim, i):
            b.head_dim = floor(b.head_dim, hr)
        if Structure.mlp in enabled and allowed(Structure.mlp, i):
            b.mlp = floor(b.mlp, r)
    if Structure.embed in enabled and allowed(Structure.embed, -1):
        out.embed = floor(out.embed, r)
    return out


def _check_reachable(
    cfg: PruneConfig,
    costs: CostModel,
    shape: Shape,
    goal: float,
    allowed: Callable[[Structure, int], bool],
) -> None:
    """Refuse a target the allowed structures cannot reach, before any importance is scored."""
    assert cfg.target is not None
    name, value = cfg.target
    metric = costs.macs if name == "target_macs" else costs.params
    total0, best = metric(shape), metric(smallest_shape(cfg, shape, allowed))
    if best - goal > cfg.tolerance * total0:
        raise PruneError(
            f"{name}={value:g} cannot be reached: with structures {', '.join(s.value for s in cfg.enabled())} "
            f"the model goes at best to {best / total0:.1%} of the original "
            f"({best:,.0f} {'MACs' if name == 'target_macs' else 'params'}), goal {goal / total0:.1%}",
            hint="add structures (heads, head_dim, mlp, embed), lower min_heads or round_to, "
            f"unprotect modules, or ask for at least {best / total0:.2f}",
        )
