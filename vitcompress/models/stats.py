"""Parameter and MAC counts per block, from PyTorch's own FLOP counter.

`torch.utils.flop_counter.FlopCounterMode` counts matmuls, convolutions and fused attention
(scaled_dot_product_attention) at the aten level, so it stays right after pruning or factorization
changes the modules. MACs = FLOPs / 2, at batch 1.

Its table of fused-attention kernels is not complete on every torch we accept: torch 2.14.1 has
no formula for the CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`), so q@kᵀ and
attn@v vanished from the count (DeiT-Ti 1.07 G instead of 1.26 G) and the pruning planner and its
verifier disagreed. Every SDPA kernel the installed torch has but does not count gets the same
formula here (2·B·H·L·S·(E + Ev) FLOPs, the two matmuls), so the count no longer depends on which
attention kernel the dispatcher picks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from vitcompress.models.loader import LoadedModel


@dataclass(frozen=True)
class BlockStats:
    index: int
    name: str
    num_heads: int
    head_dim: int
    mlp_hidden: int
    params: int
    macs: int
    tokens: int = 0  # tokens the block's attention sees
    mlp_tokens: int = 0  # tokens its MLP sees (fewer when the block merges or prunes tokens)


@dataclass(frozen=True)
class ModelStats:
    label: str
    family: str
    input_shape: tuple[int, int, int]
    num_classes: int
    embed_dim: int
    params: int
    macs: int
    blocks: list[BlockStats]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# Fused attention kernels whose first three inputs are query, key and value (B, H, L|S, E).
SDPA_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def _sdpa_flops(query: Any, key: Any, value: Any, *_args: Any, out_shape: Any = None, **_kwargs: Any) -> int:
    """FLOPs of softmax(q kᵀ) v: one matmul of L x E by E x S, one of L x S by S x Ev, per batch and head."""
    *batch, length, dim = query
    source, value_dim = key[-2], value[-1]
    count = 1
    for size in batch:
        count *= size
    return 2 * count * length * source * (dim + value_dim)


def missing_attention_formulas() -> dict[Any, Any]:
    """The SDPA kernels this torch has but its FLOP counter does not count, each with our formula."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    return {
        getattr(aten, name): _sdpa_flops
        for name in SDPA_KERNELS
        if hasattr(aten, name) and getattr(aten, name) not in flop_registry
    }


def count_macs(loaded: LoadedModel) -> tuple[int, dict[str, int]]:
    """Total MACs for one image and MACs per module path."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=missing_attention_formulas())
    with torch.no_grad(), counter:
        loaded.model(loaded.example_input(1))
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        # keys are "ClassName.path.to.module"; the root is the bare class name
        path = key.split(".", 1)[1] if "." in key else ""
        per_module[path] = int(sum(ops.values())) // 2
    return int(counter.get_total_flops()) // 2, per_module


def model_stats(loaded: LoadedModel) -> ModelStats:
    from vitcompress.models.tokens import token_schedule_of, tokens_per_block

    total_macs, per_module = count_macs(loaded)
    depth = len(loaded.adapter.blocks())
    schedule = token_schedule_of(loaded.model)
    counts = (
        tokens_per_block(loaded.adapter.num_tokens, schedule)
        if schedule is not None
        else [(loaded.adapter.num_tokens, loaded.adapter.num_tokens)] * depth
    )
    blocks = [
        BlockStats(
            index=b.index,
            name=b.name,
            num_heads=b.attn.num_heads,
            head_dim=b.attn.head_dim,
            mlp_hidden=b.mlp.hidden,
            params=sum(p.numel() for p in b.module.parameters()),
            macs=per_module.get(b.name, 0),
            tokens=counts[b.index][0],
            mlp_tokens=counts[b.index][1],
        )
        for b in loaded.adapter.blocks()
    ]
    return ModelStats(
        label=loaded.label,
        family=loaded.adapter.family,
        input_shape=loaded.input.shape,
        num_classes=loaded.num_classes,
        embed_dim=loaded.adapter.embed_dim,
        params=sum(p.numel() for p in loaded.model.parameters()),
        macs=total_macs,
        blocks=blocks,
    )
