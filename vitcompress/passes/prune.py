"""Structured pruning of ViTs: attention heads, head dimensions, MLP width and embedding width.

Importance of each structure comes from the weights (L1/L2 magnitude), the first-order Taylor
estimate of the loss change |sum(g * w)| over the structure (Molchanov et al., CVPR 2019), or the
Hessian-aware saliency of NViT (Yang et al., "Global Vision Transformer Pruning with Hessian-Aware
Saliency", CVPR 2023): the second-order loss change of removing the whole structure with the Fisher
approximation of the Hessian, E_batch[(sum_S g * w)^2]. Taylor and Hessian scores are loss changes, so
they compare across blocks and structure kinds; that is what global pruning and MAC/parameter targets
rank by (saliency per MAC or parameter removed, NViT's latency-aware redistribution).

The ViT knowledge lives here: heads are removed whole, a block's head size stays uniform, at least
`min_heads` heads remain, widths stay multiples of `round_to`. The surgery itself is torch-pruning's
dependency graph, so every coupled tensor shrinks together (fused qkv rows and proj columns, fc1 rows
and fc2 columns, the residual stream through tokens, norms and heads). The adapters then record the
new shapes in the attributes each family reads (timm `num_heads`/`head_dim`/`scale`, HF head counts).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from vitcompress.errors import PruneError
from vitcompress.passes.base import PassConfig, fraction_or_count

if TYPE_CHECKING:
    import torch

    from vitcompress.data import Dataset
    from vitcompress.models.adapters import AttentionInfo
    from vitcompress.models.loader import LoadedModel
    from vitcompress.state import ModelState

log = logging.getLogger(__name__)


class Importance(str, Enum):
    l1 = "l1"
    l2 = "l2"
    taylor = "taylor"
    hessian = "hessian"

    @property
    def needs_data(self) -> bool:
        return self in (Importance.taylor, Importance.hessian)


class Structure(str, Enum):
    heads = "heads"
    head_dim = "head_dim"
    mlp = "mlp"
    embed = "embed"


class Scope(str, Enum):
    uniform = "uniform"  # the same fraction in every block
    global_ = "global"  # ranked across blocks: blocks that matter less give more


class PruneConfig(PassConfig):
    """Structured pruning: fractions per structure, or a MAC/parameter target."""

    summary: ClassVar[str] = "structured pruning (torch-pruning): heads, head dims, MLP and embedding width"
    engine: ClassVar[str] = "vitcompress.passes.prune"
    changes_model: ClassVar[bool] = True
    reshapes_linears: ClassVar[bool] = True

    kind: Literal["prune"] = "prune"
    heads: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of attention heads to remove.")
    head_dim: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of each head's q/k/v size to remove.")
    mlp: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of MLP hidden channels to remove.")
    embed: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of the embedding (residual) width to remove."
    )
    scope: Scope = Field(
        Scope.uniform, description="uniform: same fraction per block; global: ranked across blocks."
    )
    target_macs: float | None = Field(
        None,
        description="Instead of fractions: MACs to keep, a fraction in (0, 1) or an absolute count (integer > 1).",
    )
    target_params: float | None = Field(
        None,
        description="Instead of fractions: parameters to keep, a fraction in (0, 1) or a count (integer > 1).",
    )
    structures: list[Structure] = Field(
        default_factory=lambda: [Structure.heads, Structure.mlp],
        description="What a target may remove (fractions say it themselves).",
    )
    tolerance: float = Field(
        0.02, gt=0, lt=0.5, description="How close to the target, as a fraction of the original."
    )
    importance: Importance = Field(
        Importance.l2, description="l1, l2 (magnitude), taylor or hessian (need data)."
    )
    steps: int = Field(1, ge=1, le=100, description="Iterative pruning: reach the goal in this many steps.")
    round_to: int = Field(8, ge=1, description="Keep widths (head size, MLP, embedding) multiples of this.")
    min_heads: int = Field(1, ge=1, description="Never fewer heads than this in a block.")
    protect: list[str] | None = Field(
        None,
        description="Module-name globs to leave whole (default: the classifier head(s) and patch embedding).",
    )
    calibration_batches: int = Field(8, ge=1, description="Batches of data for taylor/hessian importance.")
    batch_size: int = Field(32, ge=1, description="Batch size for the importance batches.")

    @field_validator("target_macs", "target_params")
    @classmethod
    def _target_range(cls, value: float | None) -> float | None:
        return fraction_or_count(value)

    @model_validator(mode="after")
    def _one_goal(self) -> PruneConfig:
        ratios = {s: getattr(self, s.value) for s in Structure if getattr(self, s.value) > 0}
        if self.target_macs is not None and self.target_params is not None:
            raise ValueError("set target_macs or target_params, not both")
        target = self.target_macs if self.target_macs is not None else self.target_params
        if target is not None and ratios:
            raise ValueError(
                f"a target and fractions ({', '.join(s.value for s in ratios)}) both given: "
                "a target chooses the fractions itself; list what it may remove in structures"
            )
        if target is None and not ratios:
            raise ValueError(
                "nothing to prune: set heads, head_dim, mlp or embed, or target_macs/target_params"
            )
        if target is not None and not self.structures:
            raise ValueError("structures is empty: a target needs at least one structure to remove")
        return self

    @property
    def target(self) -> tuple[str, float] | None:
        if self.target_macs is not None:
            return "target_macs", self.target_macs
        if self.target_params is not None:
            return "target_params", self.target_params
        return None

    def enabled(self) -> list[Structure]:
        if self.target is not None:
            return list(dict.fromkeys(self.structures))
        return [s for s in Structure if getattr(self, s.value) > 0]

    def needs_data(self) -> bool:
        return self.importance.needs_data


# --------------------------------------------------------------------------- shapes and costs


@dataclass
class BlockShape:
    heads: int
    head_dim: int
    mlp: int


@dataclass
class Shape:
    embed: int
    blocks: list[BlockShape]

    def copy(self) -> Shape:
        return Shape(self.embed, [replace(b) for b in self.blocks])


@dataclass(frozen=True)
class CostModel:
    """MACs and parameters of a ViT as a function of its widths, fitted exactly to the measured model.

    Per block: qkv D*3A, proj A*D, q@k and attn@v 2*N*N*A, fc1/fc2 2*D*M (MACs per token, N tokens,
    A = heads * head_dim); everything outside the blocks (patch embedding, tokens, norm, head) and the
    norms inside are linear in the embedding width D. The remainder against the measured counts is
    kept as a per-D term, so the prediction equals the measurement on the model it was fitted to.
    """

    tokens: int
    embed0: int
    other_macs_per_d: float
    other_params_per_d: float
    other_params_const: int
    biases: list[tuple[int, int, int, int]]  # per block: qkv, proj, fc1, fc2 have bias (0/1)

    def block_macs(self, b: BlockShape, d: int) -> float:
        a, n = b.heads * b.head_dim, self.tokens
        return n * (d * 3 * a + a * d + 2 * d * b.mlp) + 2 * n * n * a

    def block_params(self, i: int, b: BlockShape, d: int) -> float:
        a = b.heads * b.head_dim
        qkv_b, proj_b, fc1_b, fc2_b = self.biases[i]
        return d * 3 * a + 3 * a * qkv_b + a * d + d * proj_b + 2 * d * b.mlp + b.mlp * fc1_b + d * fc2_b

    def macs(self, shape: Shape) -> float:
        return self.other_macs_per_d * shape.embed + sum(
            self.block_macs(b, shape.embed) for b in shape.blocks
        )

    def params(self, shape: Shape) -> float:
        return (
            self.other_params_const
            + self.other_params_per_d * shape.embed
            + sum(self.block_params(i, b, shape.embed) for i, b in enumerate(shape.blocks))
        )


def current_shape(loaded: LoadedModel) -> Shape:
    blocks = [BlockShape(b.attn.num_heads, b.attn.head_dim, b.mlp.hidden) for b in loaded.adapter.blocks()]
    return Shape(loaded.adapter.embed_dim, blocks)


def fit_cost_model(loaded: LoadedModel, total_macs: int | None = None) -> CostModel:
    """Fit to the model as it is; `total_macs` saves the MAC count when the caller has it."""
    from vitcompress.models.stats import count_macs

    adapter = loaded.adapter
    shape = current_shape(loaded)
    d = shape.embed
    biases = []
    for b in adapter.blocks():
        biases.append(
            (
                int(b.attn.qkv[0].bias is not None),
                int(b.attn.proj.bias is not None),
                int(b.mlp.fc1.bias is not None),
                int(b.mlp.fc2.bias is not None),
            )
        )
    partial = CostModel(adapter.num_tokens, d, 0.0, 0.0, 0, biases)
    if total_macs is None:
        total_macs, _ = count_macs(loaded)
    block_macs = sum(partial.block_macs(b, d) for b in shape.blocks)
    total_params = sum(p.numel() for p in loaded.model.parameters())
    block_params = sum(partial.block_params(i, b, d) for i, b in enumerate(shape.blocks))
    # Parameters outside the block linears: those with a dimension of size D scale with D, the rest
    # (classifier biases) stay.
    linear_ids = {
        id(p)
        for b in adapter.blocks()
        for m in (*b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)
        for p in m.parameters()
    }
    const = sum(p.numel() for p in loaded.model.parameters() if id(p) not in linear_ids and d not in p.shape)
    per_d = (total_params - block_params - const) / d
    return replace(
        partial,
        other_macs_per_d=(total_macs - block_macs) / d,
        other_params_per_d=per_d,
        other_params_const=const,
    )


# --------------------------------------------------------------------------- importance


@dataclass
class ChannelStats:
    """Per-channel statistics, one row per batch (one row in all for magnitude).

    Magnitude rows hold sum |w|^p over each channel's weights; Taylor and Hessian rows hold the
    signed sum of g * w over each channel's weights for one batch, so a structure's score is formed
    from the sum over its channels before squaring (the structure is removed as a whole).
    """

    importance: Importance
    attn: list[torch.Tensor]  # per block: (rows, heads * head_dim)
    mlp: list[torch.Tensor]  # per block: (rows, hidden)
    embed: torch.Tensor  # (rows, embed_dim)

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, units) summed stats -> one saliency per unit (lower = safer to remove)."""
        if self.importance is Importance.taylor:
            return rows.mean(0).abs()
        if self.importance is Importance.hessian:
            return rows.pow(2).mean(0)
        return rows.sum(0)

    def unit_score(self, stats: torch.Tensor, channels: torch.Tensor) -> float:
        return float(self.score(stats[:, channels].sum(-1, keepdim=True))[0])


def _reduce_to(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum every dimension but `dim`."""
    return t.movedim(dim, 0).reshape(t.shape[dim], -1).sum(1)


def _elementwise(importance: Importance, param: torch.Tensor) -> torch.Tensor:
    w = param.detach()
    if importance is Importance.l1:
        return w.abs()
    if importance is Importance.l2:
        return w.pow(2)
    if param.grad is None:
        return w.new_zeros(w.shape)
    return w * param.grad.detach()


def _embed_dependencies(loaded: LoadedModel, graph: Any) -> list[tuple[torch.Tensor, int]]:
    """Every (tensor, dim) that carries the residual stream, read from torch-pruning's group."""
    import torch_pruning as tp
    from torch import nn

    conv = loaded.adapter.patch_conv
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    pairs: list[tuple[torch.Tensor, int]] = []
    for dep, _ in group:
        module = dep.target.module
        out = graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            pairs.append((module.weight, 0 if out else 1))
            if out and module.bias is not None:
                pairs.append((module.bias, 0))
        elif isinstance(module, nn.LayerNorm):
            pairs.extend((p, 0) for p in (module.weight, module.bias) if p is not None)
        elif isinstance(module, nn.Parameter):
            pairs.append((module, module.ndim - 1))
    return pairs


def _block_stats(
    loaded: LoadedModel, importance: Importance
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    attn_rows, mlp_rows = [], []
    for b in loaded.adapter.blocks():
        a = b.attn.attn_dim
        e = lambda p: _elementwise(importance, p)  # noqa: E731
        if len(b.attn.qkv) == 1:  # fused qkv: rows [q | k | v], each A wide
            qkv = b.attn.qkv[0]
            row = e(qkv.weight).view(3, a, -1).sum((0, 2))
            if qkv.bias is not None:
                row = row + e(qkv.bias).view(3, a).sum(0)
        else:
            row = sum(
                (_reduce_to(e(lin.weight), 0) for lin in b.attn.qkv), start=b.attn.proj.weight.new_zeros(a)
            )
            for lin in b.attn.qkv:
                if lin.bias is not None:
                    row = row + e(lin.bias)
        row = row + _reduce_to(e(b.attn.proj.weight), 1)
        attn_rows.append(row)
        fc1, fc2 = b.mlp.fc1, b.mlp.fc2
        mrow = _reduce_to(e(fc1.weight), 0) + _reduce_to(e(fc2.weight), 1)
        if fc1.bias is not None:
            mrow = mrow + e(fc1.bias)
        mlp_rows.append(mrow)
    return attn_rows, mlp_rows


def _graph(loaded: LoadedModel) -> Any:
    import torch_pruning as tp
    from torch import nn

    owned = {
        id(p)
        for m in loaded.model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm))
        for p in m.parameters(recurse=False)
    }
    # Tokens and position embeddings are bare parameters: tell torch-pruning their channel dim.
    unwrapped = [(p, p.ndim - 1) for p in loaded.model.parameters() if id(p) not in owned]
    return tp.DependencyGraph().build_dependency(
        loaded.model, example_inputs=loaded.example_input(1), unwrapped_parameters=unwrapped
    )


def compute_stats(
    loaded: LoadedModel, importance: Importance, graph: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> ChannelStats:
    import torch
    import torch.nn.functional as F

    model = loaded.model
    embed_pairs = _embed_dependencies(loaded, graph)

    def embed_row() -> torch.Tensor:
        return sum(
            (_reduce_to(_elementwise(importance, t), dim) for t, dim in embed_pairs),
            start=torch.zeros(loaded.adapter.embed_dim),
        )

    if not importance.needs_data:
        with torch.no_grad():
            attn, mlp = _block_stats(loaded, importance)
            return ChannelStats(
                importance, [a[None] for a in attn], [m[None] for m in mlp], embed_row()[None]
            )
    was_training = model.training
    model.eval()
    attn_rows: list[list[torch.Tensor]] = []
    mlp_rows: list[list[torch.Tensor]] = []
    embed_rows: list[torch.Tensor] = []
    try:
        for inputs, labels in batches:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(inputs), labels)
                if not torch.isfinite(loss):
                    raise PruneError(
                        f"importance: the loss on the calibration data is {loss.item()}",
                        hint="check the data and the checkpoint",
                    )
                loss.backward()
            with torch.no_grad():
                attn, mlp = _block_stats(loaded, importance)
                attn_rows.append(attn)
                mlp_rows.append(mlp)
                embed_rows.append(embed_row())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    blocks = len(attn_rows[0])
    return ChannelStats(
        importance,
        [torch.stack([r[i] for r in attn_rows]) for i in range(blocks)],
        [torch.stack([r[i] for r in mlp_rows]) for i in range(blocks)],
        torch.stack(embed_rows),
    )


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Unit:
    """One removable piece: a head, a chunk of `round_to` head dims (in every head), MLP or embed channels."""

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
    """Turns channel statistics into units and counts into concrete channel indices."""

    def __init__(self, stats: ChannelStats, shape: Shape, round_to: int) -> None:
        import torch

        self.stats, self.shape, self.r = stats, shape, round_to
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
            [h * hd + order[k * self.r : (k + 1) * self.r] for h, order in enumerate(self.dim_order[block])]
        )

    def units(self, structure: Structure) -> list[Unit]:
        units: list[Unit] = []
        for i, b in enumerate(self.shape.blocks):
            if structure is Structure.heads:
                units += [Unit(structure, i, h, self.head_sal[i][h]) for h in range(b.heads)]
            elif structure is Structure.head_dim:
                best = -math.inf
                for k in range(b.head_dim // self.r - 1):
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
            keep_hd = b.head_dim - dim_chunks * self.r
            channels: list[int] = []
            for h in range(b.heads):
                if h in gone_heads:
                    channels += range(h * b.head_dim, (h + 1) * b.head_dim)
                elif dim_chunks:
                    channels += (h * b.head_dim + self.dim_order[i][h][: dim_chunks * self.r]).tolist()
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


def planned_shape(shape: Shape, removed: dict[tuple[Structure, int], Any], r: int) -> Shape:
    out = shape.copy()
    for i, b in enumerate(out.blocks):
        b.heads -= len(removed.get((Structure.heads, i), ()))
        b.head_dim -= int(removed.get((Structure.head_dim, i), 0)) * r
        b.mlp -= int(removed.get((Structure.mlp, i), 0)) * r
    out.embed -= int(removed.get((Structure.embed, -1), 0)) * r
    return out


def _keep_chunks(width0: int, width: int, fraction: float, r: int) -> int:
    """Chunks of r to remove now so the width reaches round(width0 * (1 - fraction)) in multiples of r."""
    goal = max(r, round(width0 * (1 - fraction) / r) * r)
    return max(0, (width - goal) // r)


# --------------------------------------------------------------------------- surgery and checks


def apply_plan(loaded: LoadedModel, graph: Any, plan: Plan) -> None:
    import torch_pruning as tp

    adapter = loaded.adapter
    blocks = adapter.blocks()
    for i, channels in plan.attn_remove.items():
        old_head_dim = blocks[i].attn.head_dim
        # The downstream proj is the root: torch-pruning maps its input channels onto q, k and v rows.
        graph.get_pruning_group(blocks[i].attn.proj, tp.prune_linear_in_channels, idxs=channels).prune()
        adapter.set_attention_shape(i, *plan.heads[i])
        if plan.heads[i][1] != old_head_dim:
            _keep_attention_temperature(adapter.blocks()[i].attn, old_head_dim)
    for i, channels in plan.mlp_remove.items():
        graph.get_pruning_group(blocks[i].mlp.fc1, tp.prune_linear_out_channels, idxs=channels).prune()
    if plan.embed_remove:
        conv = adapter.patch_conv
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=plan.embed_remove).prune()
        adapter.set_embed_dim(conv.out_channels)


def _keep_attention_temperature(attn: AttentionInfo, old_head_dim: int) -> None:
    """Fold sqrt(new/old head size) into the query rows.

    Attention divides q.k by sqrt(head_dim); with fewer dims the kernels (SDPA, HF's scaling) divide
    by the new, smaller root, which sharpens every softmax. Scaling the queries keeps the logits
    q.k / sqrt(old head_dim), so removing dims that carry nothing changes nothing.
    """
    import torch

    factor = math.sqrt(attn.head_dim / old_head_dim)
    q = attn.qkv[0]
    rows = slice(0, attn.attn_dim)  # fused qkv: the first A rows are q; a separate q_proj: all rows
    with torch.no_grad():
        q.weight[rows] *= factor
        if q.bias is not None:
            q.bias[rows] *= factor


def check_model(loaded: LoadedModel) -> None:
    """Forward and backward on an example batch; a failure names the block it happened in."""
    import torch

    adapter, model = loaded.adapter, loaded.model
    for b in adapter.blocks():
        qkv_width = sum(m.out_features for m in b.attn.qkv) // 3
        if b.attn.num_heads * b.attn.head_dim != qkv_width or b.attn.proj.in_features != qkv_width:
            raise PruneError(
                f"{b.name}: {b.attn.num_heads} heads x {b.attn.head_dim} != attention width {qkv_width} after pruning"
            )
    current: list[str] = ["the embedding"]
    hooks = [
        b.module.register_forward_pre_hook(lambda _m, _a, name=b.name: current.__setitem__(0, name))
        for b in adapter.blocks()
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            out = model(loaded.example_input(2))
            current[0] = "the classifier head"
            if tuple(out.shape) != (2, loaded.num_classes):
                raise PruneError(
                    f"pruned model returns shape {tuple(out.shape)}, expected (2, {loaded.num_classes})"
                )
            out.float().pow(2).mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            raise PruneError(f"pruned model: no gradient reaches {missing[0]}")
    except RuntimeError as err:
        raise PruneError(f"pruned model fails in {current[0]}: {str(err).splitlines()[0]}") from err
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)


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
    target: dict[str, float] | None = None


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


def _fits(cfg: PruneConfig, shape: Shape, unit: Unit, removed: dict[tuple[Structure, int], Any]) -> bool:
    r = cfg.round_to
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


def smallest_shape(cfg: PruneConfig, shape: Shape, allowed: Callable[[Structure, int], bool]) -> Shape:
    """The smallest model the planner may reach: every allowed structure cut to its floor (min_heads
    heads, one `round_to` chunk of head size, MLP and embedding width)."""
    r, enabled = cfg.round_to, cfg.enabled()

    def floor(width: int) -> int:
        return width - max(0, width // r - 1) * r

    out = shape.copy()
    for i, b in enumerate(out.blocks):
        if Structure.heads in enabled and allowed(Structure.heads, i):
            b.heads = min(b.heads, cfg.min_heads)
        if Structure.head_dim in enabled and allowed(Structure.head_dim, i):
            b.head_dim = floor(b.head_dim)
        if Structure.mlp in enabled and allowed(Structure.mlp, i):
            b.mlp = floor(b.mlp)
    if Structure.embed in enabled and allowed(Structure.embed, -1):
        out.embed = floor(out.embed)
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
