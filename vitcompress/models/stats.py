"""Parameter and MAC counts per block, from PyTorch's own FLOP counter.

`torch.utils.flop_counter.FlopCounterMode` counts matmuls, convolutions and fused attention
(scaled_dot_product_attention) at the aten level, so it stays right after pruning or factorization
changes the modules. MACs = FLOPs / 2, at batch 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


def count_macs(loaded: LoadedModel) -> tuple[int, dict[str, int]]:
    """Total MACs for one image and MACs per module path."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
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
    total_macs, per_module = count_macs(loaded)
    blocks = [
        BlockStats(
            index=b.index,
            name=b.name,
            num_heads=b.attn.num_heads,
            head_dim=b.attn.head_dim,
            mlp_hidden=b.mlp.hidden,
            params=sum(p.numel() for p in b.module.parameters()),
            macs=per_module.get(b.name, 0),
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
