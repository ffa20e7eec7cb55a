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
matching is top-k and 0/1 selection matmuls (see `merge_tokens`), plain ops for every runtime.

Implementation: the blocks' classes (and a timm model's own) are swapped for subclasses (as ToMe
does) that override `forward`; no parameter is added or renamed, so the state dict, the adapters and
the artifact stay as they are. timm ViT/DeiT and Hugging Face ViT/DeiT (transformers >= 5) are
supported. The artifact records the schedule as the edit `tokens`, and loading
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


# --------------------------------------------------------------------------- the arithmetic


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: torch.Tensor | None,
    proportional: bool,
    want_cls: bool,
    prefix: int,
    scale: float,
    dropout: float,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention of q, k, v (B, H, N, D) with a log(size) bias on the keys. Returns the output
    (B, H, N, D), the keys averaged over heads (the matching metric) and, if asked, the class
    token's attention over the patch tokens averaged over heads (the pruning score). `keys`: the
    same keys as (B, N, H * D) before the heads were split, when that is what k is; their head mean
    is then one matmul with a constant (H * D, D) matrix, which runs faster than a mean over the
    head axis of the transposed tensor."""
    bias = None
    if size is not None and proportional:
        bias = size.log()[:, None, None, :, 0].to(q.dtype)  # (B, 1, 1, N): every query, every head
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    cls_attention = None
    if want_cls:
        logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
        if bias is not None:
            logits = logits + bias
        cls_attention = logits.softmax(dim=-1).mean(dim=1)[:, 0, prefix:]  # (B, N - prefix)
    if keys is not None:
        heads, head_dim = int(k.shape[1]), int(k.shape[-1])
        averaging = torch.eye(head_dim, dtype=keys.dtype, device=keys.device).repeat(heads, 1) / heads
        metric = keys @ averaging
    else:
        metric = k.mean(dim=1)
    return out, metric, cls_attention


def _timm_attention(
    attn: Any, x: torch.Tensor, size: torch.Tensor | None, proportional: bool, want_cls: bool, prefix: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """timm Attention's forward through `_attend` (same projections, norms, gate and dropout)."""
    batch, tokens, _ = x.shape
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    projected = attn.qkv(x)
    qkv = projected.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    width = heads * head_dim
    keys = projected[..., width : 2 * width] if isinstance(attn.k_norm, nn.Identity) else None
    dropout = attn.attn_drop.p if attn.training else 0.0
    out, metric, cls_attention = _attend(
        q, k, v, size, proportional, want_cls, prefix, float(attn.scale), dropout, keys
    )
    out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), metric, cls_attention


def _hf_attention(
    attn: Any, x: torch.Tensor, size: torch.Tensor | None, proportional: bool, want_cls: bool, prefix: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hugging Face ViT/DeiT attention (q/k/v/o_proj) through `_attend`."""
    batch, tokens, _ = x.shape
    head_dim = int(attn.head_dim)
    heads = int(attn.q_proj.out_features) // head_dim
    keys = attn.k_proj(x)
    q, k, v = (
        flat.view(batch, tokens, heads, head_dim).transpose(1, 2)
        for flat in (attn.q_proj(x), keys, attn.v_proj(x))
    )
    dropout = float(attn.attention_dropout) if attn.training else 0.0
    out, metric, cls_attention = _attend(
        q, k, v, size, proportional, want_cls, prefix, float(attn.scaling), dropout, keys
    )
    out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    return attn.o_proj(out), metric, cls_attention


def _one_hot(index: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) indices -> (B, K, count) rows of a 0/1 selection matrix. A comparison with a constant
    range broadcasts, so the exported graph has no index Expand (whose target shape would be
    computed from the batch at run time) and no Gather/Scatter: one Equal, one Cast."""
    return (index[..., None] == torch.arange(count, device=index.device)).to(dtype)


def _with_prefix(index: torch.Tensor, prefix: int, batch_of: torch.Tensor) -> torch.Tensor:
    """Patch indices (B, K) -> token indices (B, prefix + K), the prefix tokens first. The prefix
    range takes its batch size by broadcasting against `batch_of` (B, >= 1), so the graph has no
    Expand (K may be 0)."""
    head = batch_of[:, :1] * 0 + torch.arange(prefix, device=index.device)
    return torch.cat([head, index + prefix], dim=1)


def _select(rows: torch.Tensor, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a (B, N_out, N) 0/1 (or sum) matrix to tokens: size-weighted averages and summed sizes."""
    out_size = rows @ size
    return (rows @ (x * size)) / out_size, out_size


def merge_tokens(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    r: int,
    prefix: int,
    tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching on the patch tokens: merge the r most similar A->B pairs.

    x (B, N, C), size (B, N, 1), metric (B, N, D); returns x and size with N - r tokens, the
    prefix tokens first and unchanged, then the A tokens that stay (most similar first), then the
    B tokens. Merged values are size-weighted averages. `tokens` is N as a plain number (the
    schedule's), so the exported top-k and matrix shapes are constants rather than computed from the
    input's shape.

    The gather/scatter-add of ToMe is written as one matmul with a (B, N - r, N) matrix built from
    the indices: a 0/1 row per token that stays, plus the A tokens merged into each B token. The
    result is ToMe's; the graph is a handful of nodes per block instead of ~200 (strided slices,
    index Expand, Gather, ScatterElements and their shape arithmetic), which on a small model cost
    more than the tokens they removed. The extra multiply-adds are (N - r) x N x C per block, a few
    percent of the block's own.
    """
    total = tokens if tokens is not None else int(x.shape[1])
    count = total - prefix
    num_a, num_b = (count + 1) // 2, count // 2
    metric = metric[:, prefix:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (B, |A|, |B|) cosine similarity
    node_max, node_idx = scores.max(dim=-1)  # each A token's best B partner
    edge_idx = node_max.topk(num_a, dim=-1).indices  # A tokens, most similar first
    src_idx = edge_idx[:, :r]  # A tokens merged into their partner
    dst_idx = node_idx.gather(dim=1, index=src_idx)  # (B, r): their B partners

    dtype = x.dtype
    kept = _one_hot(_with_prefix(edge_idx[:, r:] * 2, prefix, edge_idx), total, dtype)  # prefix + A that stay
    b_rows = _one_hot(torch.arange(num_b, device=x.device) * 2 + 1 + prefix, total, dtype)  # (|B|, N)
    merged_in = _one_hot(dst_idx, num_b, dtype).transpose(1, 2) @ _one_hot(src_idx * 2 + prefix, total, dtype)
    return _select(torch.cat([kept, b_rows + merged_in], dim=1), x, size)


def prune_tokens(
    x: torch.Tensor,
    size: torch.Tensor,
    cls_attention: torch.Tensor,
    r: int,
    prefix: int,
    fuse: bool,
    tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT: keep the patch tokens the class token attends to most; `fuse` adds one token that is
    the attention-weighted average of the dropped ones. Returns N - r tokens (`tokens`: N as a
    plain number, for constant shapes in the exported graph). The selection is a 0/1 matmul, as in
    `merge_tokens`."""
    total = tokens if tokens is not None else int(x.shape[1])
    patch_count = total - prefix
    keep = patch_count - r - (1 if fuse else 0)
    order = cls_attention.topk(patch_count if fuse else keep, dim=-1).indices  # most attended first
    kept = _one_hot(_with_prefix(order[:, :keep], prefix, order), total, x.dtype)
    out_x, out_size = kept @ x, kept @ size
    if not fuse:
        return out_x, out_size
    dropped = _one_hot(order[:, keep:], patch_count, x.dtype).sum(dim=1, keepdim=True)  # (B, 1, N - prefix)
    weight = dropped * cls_attention[:, None, :]  # the dropped tokens' attention, others 0
    fused = (weight @ x[:, prefix:]) / weight.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([out_x, fused], dim=1), torch.cat([out_size, dropped @ size[:, prefix:]], dim=1)


# --------------------------------------------------------------------------- the patched classes


class _Reducer:
    """What a patched block knows about its place in the schedule, and the reduction step."""

    token_r: int
    token_count: int  # tokens entering the block, from the schedule
    token_method: Method
    token_prefix: int
    token_proportional: bool
    token_fuse: bool

    def _reduce(
        self,
        x: torch.Tensor,
        size: torch.Tensor | None,
        metric: torch.Tensor,
        cls_attention: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.token_r == 0:
            return x, size
        if size is None:
            size = torch.ones_like(x[..., :1])
        if self.token_method == "prune":
            assert cls_attention is not None
            return prune_tokens(
                x,
                size,
                cls_attention,
                self.token_r,
                self.token_prefix,
                self.token_fuse,
                self.token_count,
            )
        return merge_tokens(x, size, metric, self.token_r, self.token_prefix, self.token_count)

    @property
    def _wants_cls(self) -> bool:
        return self.token_r > 0 and self.token_method == "prune"


class _TokenBlock(_Reducer):
    """Mixed in front of a timm Block: reduces tokens between its attention and its MLP.

    The token sizes come in through `token_size_in` (set by the model's forward just before the
    call; None: all ones) and leave through `token_size_out`, so the block keeps timm's
    one-tensor-in, one-tensor-out signature that hooks and other code expect.
    """

    token_size_in: torch.Tensor | None
    token_size_out: torch.Tensor | None

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
        block: Any = self
        size = getattr(self, "token_size_in", None)
        out, metric, cls_attention = _timm_attention(
            block.attn, block.norm1(x), size, self.token_proportional, self._wants_cls, self.token_prefix
        )
        x = x + block.drop_path1(block.ls1(out))
        x, size = self._reduce(x, size, metric, cls_attention)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        self.token_size_out = size
        return x


class _HFTokenLayer(_Reducer):
    """Mixed in front of a Hugging Face ViTLayer/DeiTLayer. transformers runs the layers in its own
    loop, so the sizes pass from layer to layer through one dict the layers of a model share: the
    first layer starts it, the last one clears it."""

    token_state: dict[str, torch.Tensor | None]
    token_first: bool
    token_last: bool

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: Any = None, **_kwargs: Any
    ) -> torch.Tensor:
        layer: Any = self
        size = None if self.token_first else self.token_state.get("size")
        out, metric, cls_attention = _hf_attention(
            layer.attention,
            layer.layernorm_before(hidden_states),
            size,
            self.token_proportional,
            self._wants_cls,
            self.token_prefix,
        )
        x = layer.dropout(out) + hidden_states
        x, size = self._reduce(x, size, metric, cls_attention)
        x = layer.dropout(layer.mlp(layer.layernorm_after(x))) + x
        self.token_state["size"] = None if self.token_last else size
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


def token_schedule_of(model: nn.Module) -> TokenSchedule | None:
    """The schedule a model runs with, or None for a model without token reduction."""
    schedule = getattr(model, "token_schedule", None)
    return schedule if isinstance(schedule, TokenSchedule) else None


def apply_token_schedule(model: nn.Module, schedule: TokenSchedule) -> None:
    """Make a timm or Hugging Face ViT/DeiT reduce tokens as `schedule` says (in place)."""
    from vitcompress.models.adapters import adapter_for

    if token_schedule_of(model) is not None:
        raise ValueError("the model already reduces tokens")
    adapter = adapter_for(model)
    depth = len(adapter.blocks())
    if len(schedule.r) != depth:
        raise ValueError(f"the schedule has {len(schedule.r)} entries for {depth} blocks")
    if adapter.family == "timm-vit":
        _apply_timm(model, schedule)
    elif adapter.family == "hf-vit":
        _apply_hf(model, adapter, schedule)
    else:
        raise UnsupportedModelError(f"token reduction does not support the {adapter.family} family")


def _configure(block: Any, r: int, count: int, prefix: int, schedule: TokenSchedule) -> None:
    block.token_r = int(r)
    block.token_count = count
    block.token_method = schedule.method
    block.token_prefix = prefix
    block.token_proportional = schedule.proportional_attention
    block.token_fuse = schedule.fuse


def _apply_hf(model: nn.Module, adapter: Any, schedule: TokenSchedule) -> None:
    layers = [b.module for b in adapter.blocks()]
    for index, layer in enumerate(layers):
        if type(layer).__name__ not in ("ViTLayer", "DeiTLayer") or not hasattr(layer.attention, "q_proj"):
            raise UnsupportedModelError(
                f"token reduction: layer {index} is a {type(layer).__name__}; only ViTLayer and DeiTLayer "
                "(transformers >= 5) are supported"
            )
    prefix = adapter.num_prefix_tokens
    counts = tokens_per_block(adapter.num_tokens, schedule)
    state: dict[str, torch.Tensor | None] = {"size": None}
    for index, (layer, r, (count, _)) in enumerate(zip(layers, schedule.r, counts, strict=True)):
        layer.__class__ = _subclass(_HFTokenLayer, type(layer))
        _configure(layer, r, count, prefix, schedule)
        layer.token_state = state
        layer.token_first = index == 0
        layer.token_last = index == len(layers) - 1
    model.token_schedule = schedule  # type: ignore[assignment]


def _apply_timm(model: Any, schedule: TokenSchedule) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    blocks: Any = model.blocks
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
    model.__class__ = _subclass(_TokenViT, type(model))
    model.token_schedule = schedule
    for block, r, (count, _) in zip(blocks, schedule.r, counts, strict=True):
        block.__class__ = _subclass(_TokenBlock, type(block))
        _configure(block, r, count, prefix, schedule)
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
    except (ValueError, UnsupportedModelError) as err:
        raise CheckpointError(f"artifact edit tokens does not fit the model: {err}") from err
