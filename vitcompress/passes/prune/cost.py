"""Shapes and costs: the per-block widths a plan produces, and a cost model (MACs, parameters) fitted
to the model as it stands, so that targets are met without pruning to find out."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vitcompress.models.loader import LoadedModel

log = logging.getLogger(__name__)


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
