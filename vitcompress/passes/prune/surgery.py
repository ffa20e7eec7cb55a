"""Surgery: apply a plan through torch-pruning's dependency graph (every coupled tensor shrinks
together), record the new shapes in the adapters, and check the pruned model block by block."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from vitcompress.errors import PruneError
from vitcompress.passes.prune.plan import Plan

if TYPE_CHECKING:
    from vitcompress.models.adapters import AttentionInfo
    from vitcompress.models.loader import LoadedModel

log = logging.getLogger(__name__)


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
