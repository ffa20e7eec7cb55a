"""Token reduction inside a timm ViT: merge (ToMe) or prune (EViT) tokens between attention and MLP.

Token merging (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023) splits the patch
tokens into two alternating sets A and B after each block's attention, matches every A token to its
most similar B token by the cosine similarity of the attention keys (averaged over heads), and merges
the r best-matched pairs (bipartite soft matching). Merged tokens are size-weighted averages; the size
of each token (how many patches it stands for) rides along, and the next attention adds log(size)
to its logits (proportional attention), so a merged token weighs as much as its patches did.

Token pruning (Liang et al., "EViT: Expediting Vision Transformers via Token Reorganizations",
ICLR 2022) keeps the patch tokens the class token attends to most and drops the rest, or fuses them
into one token weighted by that attention (`fuse`).

The class and distillation tokens (the first `num_prefix_tokens`) are never merged or pruned and stay
in front, so the class head and the DeiT distillation head read them where they always did.

The schedule is fixed: block i removes r_i tokens whatever the image, so every tensor shape is
known when the model is traced and the ONNX graph has no dynamic dimension beyond the batch. The
matching is argsort/top-k, gather and scatter-add, which the exporter and ONNX Runtime handle
(ScatterElements with reduction, opset >= 16).

Implementation: the model's and its blocks' classes are swapped for subclasses (as ToMe does) that
override `forward`; no parameter is added or renamed, so the state dict, the adapters and the
artifact stay as they are. The artifact records the schedule as the edit `tokens`, and loading
applies it again (`apply_token_edit`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.errors import UnsupportedModelError

Method = Literal["merge", "prune"]
EDIT_KIND = "tokens"


@dataclass(frozen=True)
class TokenSchedule:
    """How one model reduces its tokens: the method and the tokens each block removes."""

    method: Method
    r: tuple[int, ...]  # tokens removed in each block (0: the block keeps all)
    proportional_attention: bool = True
    fuse: bool = False  # prune: fuse the dropped tokens into one (EViT); the count already includes it

    def to_edit(self) -> dict[str, Any]:
        return {
            "kind": EDIT_KIND,
            "module": "",
            **{k: v for k, v in asdict(self).items() if k != "r"},
            "r": list(self.r),
        }

    @classmethod
    def from_edit(cls, edit: dict[str, Any]) -> TokenSchedule:
        method = str(edit["method"])
        if method not in ("merge", "prune"):
            raise ValueError(f"unknown token reduction method {method!r}")
        return cls(
            method=method,  # type: ignore[arg-type]
            r=tuple(int(v) for v in edit["r"]),
            proportional_attention=bool(edit.get("proportional_attention", True)),
            fuse=bool(edit.get("fuse", False)),
        )


def tokens_per_block(num_tokens: int, schedule: TokenSchedule) -> list[tuple[int, int]]:
    """(tokens entering, tokens leaving) each block: attention sees the first, the MLP the second."""
    counts = []
    current = num_tokens
    for r in schedule.r:
        counts.append((current, current - r))
        current -= r
    return counts


def max_reduction(patch_tokens: int, method: Method, fuse: bool) -> int:
    """The most tokens one block can remove from `patch_tokens` patch tokens."""
    if method == "merge":
        return patch_tokens // 2  # each merged token of set A needs a partner in set B
    # prune keeps at least one patch token; fusing needs one more slot for the fused token
    return max(0, patch_tokens - (2 if fuse else 1))


# --------------------------------------------------------------------------- the arithmetic


def _attention(
    attn: Any, x: torch.Tensor, size: torch.Tensor | None, proportional: bool, want_cls: bool, prefix: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """timm Attention's forward with a log(size) bias on the keys; also returns the keys averaged
    over heads (the matching metric) and, if asked, the class token's attention over the tokens
    averaged over heads (the pruning score)."""
    batch, tokens, _ = x.shape
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None
    if size is not None and proportional:
        bias = size.log()[:, None, None, :, 0].to(q.dtype)  # (B, 1, 1, N): every query, every head
    scale = float(attn.scale)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    cls_attention = None
    if want_cls:
        logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
        if bias is not None:
            logits = logits + bias
        cls_attention = logits.softmax(dim=-1).mean(dim=1)[:, 0, prefix:]  # (B, N - prefix)
    return out, k.mean(dim=1), cls_attention


def merge_tokens(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    r: int,
    prefix: int,
    tokens: int | None = None,
    channels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching on the patch tokens: merge the r most similar A->B pairs.

    x (B, N, C), size (B, N, 1), metric (B, N, D); returns x and size with N - r tokens, the
    prefix tokens first and unchanged. Merged values are size-weighted averages. `tokens` and
    `channels` are N and C as plain numbers (the schedule's, the block's width), so the exported
    top-k and index shapes are constants rather than computed from the input's shape.
    """
    count = (tokens if tokens is not None else int(x.shape[1])) - prefix
    num_a = (count + 1) // 2
    channels = channels if channels is not None else int(x.shape[-1])
    batch = x.shape[0]
    head_x, patches = x[:, :prefix], x[:, prefix:]
    head_size, patch_size = size[:, :prefix], size[:, prefix:]
    metric = metric[:, prefix:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (B, |A|, |B|) cosine similarity
    node_max, node_idx = scores.max(dim=-1)  # each A token's best B partner
    edge_idx = node_max.topk(num_a, dim=-1).indices[..., None]  # A tokens, most similar first
    unmerged_idx = edge_idx[:, r:]  # A tokens that stay
    src_idx = edge_idx[:, :r]  # A tokens merged into their partner
    dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)

    def merge(values: torch.Tensor, width: int) -> torch.Tensor:
        src, dst = values[:, ::2], values[:, 1::2]
        kept = src.gather(dim=1, index=unmerged_idx.expand(batch, num_a - r, width))
        moved = src.gather(dim=1, index=src_idx.expand(batch, r, width))
        dst = dst.scatter_add(1, dst_idx.expand(batch, r, width), moved)
        return torch.cat([kept, dst], dim=1)

    merged = merge(patches * patch_size, channels)
    merged_size = merge(patch_size, 1)
    return (
        torch.cat([head_x, merged / merged_size], dim=1),
        torch.cat([head_size, merged_size], dim=1),
    )


def prune_tokens(
    x: torch.Tensor,
    size: torch.Tensor,
    cls_attention: torch.Tensor,
    r: int,
    prefix: int,
    fuse: bool,
    tokens: int | None = None,
    channels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT: keep the patch tokens the class token attends to most; `fuse` adds one token that is
    the attention-weighted average of the dropped ones. Returns N - r tokens (`tokens`: N as a
    plain number, for constant shapes in the exported graph)."""
    head_x, patches = x[:, :prefix], x[:, prefix:]
    head_size, patch_size = size[:, :prefix], size[:, prefix:]
    channels = channels if channels is not None else int(x.shape[-1])
    batch = x.shape[0]
    patch_count = (tokens if tokens is not None else int(x.shape[1])) - prefix
    keep = patch_count - r - (1 if fuse else 0)
    order = cls_attention.topk(patch_count if fuse else keep, dim=-1).indices[
        ..., None
    ]  # most attended first
    kept_idx = order[:, :keep]
    kept = patches.gather(dim=1, index=kept_idx.expand(batch, keep, channels))
    kept_size = patch_size.gather(dim=1, index=kept_idx)
    parts, sizes = [head_x, kept], [head_size, kept_size]
    if fuse:
        dropped_idx = order[:, keep:]
        weight = cls_attention[..., None].gather(dim=1, index=dropped_idx)  # (B, r + 1, 1)
        dropped = patches.gather(dim=1, index=dropped_idx.expand(batch, r + 1, channels))
        fused = (dropped * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
        parts.append(fused)
        sizes.append(patch_size.gather(dim=1, index=dropped_idx).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1), torch.cat(sizes, dim=1)


# --------------------------------------------------------------------------- the patched classes


class _TokenBlock:
    """Mixed in front of a timm Block: reduces tokens between its attention and its MLP.

    The token sizes come in through `token_size_in` (set by the model's forward just before the
    call; None: all ones) and leave through `token_size_out`, so the block keeps timm's
    one-tensor-in, one-tensor-out signature that hooks and other code expect.
    """

    token_r: int
    token_count: int  # tokens entering the block, from the schedule
    token_method: Method
    token_prefix: int
    token_proportional: bool
    token_fuse: bool
    token_size_in: torch.Tensor | None
    token_size_out: torch.Tensor | None

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
        block: Any = self
        size = getattr(self, "token_size_in", None)
        r = self.token_r
        prune = r > 0 and self.token_method == "prune"
        out, metric, cls_attention = _attention(
            block.attn, block.norm1(x), size, self.token_proportional, prune, self.token_prefix
        )
        x = x + block.drop_path1(block.ls1(out))
        if r > 0:
            width = int(block.mlp.fc1.in_features)  # a number, not the input's traced shape
            if size is None:
                size = torch.ones_like(x[..., :1])
            if prune:
                assert cls_attention is not None
                x, size = prune_tokens(
                    x, size, cls_attention, r, self.token_prefix, self.token_fuse, self.token_count, width
                )
            else:
                x, size = merge_tokens(x, size, metric, r, self.token_prefix, self.token_count, width)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        self.token_size_out = size
        return x


class _TokenViT:
    """Mixed in front of a timm VisionTransformer: runs the blocks one by one, carrying token sizes,
    and pools by the size-weighted average when the model pools by average."""

    token_schedule: TokenSchedule

    def forward_features(
        self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False
    ) -> torch.Tensor:
        model: Any = self
        x = model.patch_embed(x)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        x = model.norm_pre(x)
        size: torch.Tensor | None = None
        try:
            for block in model.blocks:
                block.token_size_in = size
                x = block(x)
                size = block.token_size_out
        finally:  # no tensors of this forward stay on the modules (deepcopy, memory)
            for block in model.blocks:
                block.token_size_in = block.token_size_out = None
        self._token_size = size
        return model.norm(x)  # type: ignore[no-any-return]

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        model: Any = self
        size = getattr(self, "_token_size", None)
        self._token_size = None
        pool_type = model.global_pool if pool_type is None else pool_type
        if pool_type == "avg" and size is not None and not getattr(model, "pool_include_prefix", False):
            prefix = int(model.num_prefix_tokens)
            weights = size[:, prefix:]
            return (x[:, prefix:] * weights).sum(dim=1) / weights.sum(dim=1)  # type: ignore[no-any-return]
        return super().pool(x, pool_type)  # type: ignore[misc,no-any-return]


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, base: type) -> type:
    """One subclass per (mixin, base), so a patched class is the same object on every call."""
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Token{base.__name__}", (mixin, base), {"__module__": __name__})
    return _SUBCLASSES[key]


def _base(cls: type, mixin: type) -> type:
    return cls.__mro__[2] if issubclass(cls, mixin) else cls


def token_schedule_of(model: nn.Module) -> TokenSchedule | None:
    """The schedule a model runs with, or None for a model without token reduction."""
    return getattr(model, "token_schedule", None) if isinstance(model, _TokenViT) else None


def apply_token_schedule(model: nn.Module, schedule: TokenSchedule) -> None:
    """Make a timm ViT reduce tokens as `schedule` says (in place; replaces an earlier schedule)."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"token reduction supports timm ViT/DeiT models, not {type(model).__name__}",
            hint="load the model as timm:NAME (Hugging Face ViT/DeiT is not supported by the tokens pass yet)",
        )
    blocks: Any = model.blocks
    if len(schedule.r) != len(blocks):
        raise ValueError(f"the schedule has {len(schedule.r)} entries for {len(blocks)} blocks")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg", "max", ""):
        raise UnsupportedModelError(
            f"token reduction: pooling {model.global_pool!r} is not supported (token, avg, max are)"
        )
    for index, block in enumerate(blocks):
        if not isinstance(block, Block) or type(block.attn) is not Attention:
            raise UnsupportedModelError(
                f"token reduction: blocks.{index} is a {type(block).__name__} with "
                f"{type(getattr(block, 'attn', None)).__name__}; only timm's standard Block and Attention are supported"
            )
    prefix = int(model.num_prefix_tokens)
    counts = tokens_per_block(int(model.patch_embed.num_patches) + prefix, schedule)
    model.__class__ = _subclass(_TokenViT, _base(type(model), _TokenViT))
    model.token_schedule = schedule  # type: ignore[assignment]
    for block, r, (count, _) in zip(blocks, schedule.r, counts, strict=True):
        block.__class__ = _subclass(_TokenBlock, _base(type(block), _TokenBlock))
        block.token_r = int(r)
        block.token_count = count
        block.token_method = schedule.method
        block.token_prefix = prefix
        block.token_proportional = schedule.proportional_attention
        block.token_fuse = schedule.fuse
        block.token_size_in = block.token_size_out = None


def token_edits(model: nn.Module) -> list[dict[str, Any]]:
    """The artifact edit that rebuilds the schedule ([] for a model without one)."""
    schedule = token_schedule_of(model)
    return [schedule.to_edit()] if schedule is not None else []


def apply_token_edit(model: nn.Module, edit: dict[str, Any]) -> None:
    from vitcompress.errors import CheckpointError

    try:
        schedule = TokenSchedule.from_edit(edit)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"artifact edit tokens is malformed: {err}") from err
    try:
        apply_token_schedule(model, schedule)
    except ValueError as err:
        raise CheckpointError(f"artifact edit tokens does not fit the model: {err}") from err
