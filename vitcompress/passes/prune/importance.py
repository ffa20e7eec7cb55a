"""Importance of each prunable channel group: L1/L2 magnitude, first-order Taylor (Molchanov et al.,
CVPR 2019) or NViT's Hessian-aware saliency, gathered per block and for the embedding width."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitcompress.errors import PruneError
from vitcompress.passes.prune.config import Importance

if TYPE_CHECKING:
    import torch

    from vitcompress.models.loader import LoadedModel

log = logging.getLogger(__name__)


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
