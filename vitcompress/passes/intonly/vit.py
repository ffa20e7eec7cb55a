"""The integer-only ViT: weights read from the PyTorch model, ranges calibrated, one integer program.

`read_vit` turns a timm or Hugging Face ViT into `FloatViT` (NumPy weights in one layout);
`float_forward` runs it in PyTorch and records the activation ranges the integer model needs;
`plan_integer` fixes every integer constant (int8 weights, int32 biases, dyadic factors, Shiftmax
and LayerNorm settings); `integer_forward` is the whole network written against `IntOps`, so the
same code is the NumPy reference (`reference_logits`) and the ONNX graph (`build_onnx`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcompress.errors import UnsupportedModelError
from vitcompress.passes.intonly import arith
from vitcompress.passes.intonly.arith import INT8, Dyadic, IntLayerNormParams, IntOps

if TYPE_CHECKING:
    import torch
    from torch import nn

RESIDUAL_BITS = 20  # the residual stream: int32 tensors holding 20-bit signed values
RESIDUAL = (-(1 << (RESIDUAL_BITS - 1)) + 1, (1 << (RESIDUAL_BITS - 1)) - 1)
GELU_IN = (-32767, 32767)  # fc1 outputs (ShiftGELU's input): 16-bit values in int32
INT32 = (-(2**31) + 1, 2**31 - 1)


# --------------------------------------------------------------------------- float weights


@dataclass(frozen=True)
class FloatNorm:
    weight: np.ndarray
    bias: np.ndarray
    eps: float


@dataclass(frozen=True)
class FloatBlock:
    norm1: FloatNorm
    qkv_w: np.ndarray  # [3 * heads * head_dim, D] (PyTorch layout: out, in)
    qkv_b: np.ndarray
    heads: int
    head_dim: int
    proj_w: np.ndarray
    proj_b: np.ndarray
    norm2: FloatNorm
    fc1_w: np.ndarray
    fc1_b: np.ndarray
    fc2_w: np.ndarray
    fc2_b: np.ndarray


@dataclass(frozen=True)
class FloatViT:
    """A plain ViT classifier: patch embedding, prefix tokens, pre-norm blocks, final norm, one head
    reading the first token (or, distilled DeiT, two heads on the first two tokens, averaged)."""

    in_chans: int
    image: tuple[int, int]
    patch: int
    patch_w: np.ndarray  # [D, C, p, p]
    patch_b: np.ndarray
    prefix: np.ndarray  # [P, D]: class (and distillation) tokens with their position embedding
    patch_pos: np.ndarray  # [N, D]
    blocks: tuple[FloatBlock, ...]
    norm: FloatNorm
    head_w: np.ndarray
    head_b: np.ndarray
    head2_w: np.ndarray | None = None  # distilled DeiT: a second head on the distillation token,
    head2_b: np.ndarray | None = None  # the two heads' logits averaged

    @property
    def width(self) -> int:
        return int(self.patch_w.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return self.image[0] // self.patch, self.image[1] // self.patch


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def _norm(module: nn.Module, what: str) -> FloatNorm:
    from torch import nn

    if not isinstance(module, nn.LayerNorm) or module.weight is None:
        raise UnsupportedModelError(
            f"integer-only: {what} is {type(module).__name__}, not an affine LayerNorm"
        )
    return FloatNorm(_np(module.weight), _np(module.bias), float(module.eps))


def _identity(module: Any, what: str) -> None:
    from torch import nn

    if module is not None and not isinstance(module, nn.Identity | nn.Dropout):
        raise UnsupportedModelError(
            f"integer-only: {what} ({type(module).__name__}) has no integer kernel yet",
            hint="plain ViT/DeiT blocks are supported: pre-norm attention and GELU MLP",
        )


def _exact_gelu(module: Any, what: str) -> None:
    from torch import nn

    name = type(module).__name__
    if isinstance(module, nn.GELU) or name in ("GELUActivation", "GELU"):
        return
    raise UnsupportedModelError(f"integer-only: {what} is {name}; ShiftGELU replaces GELU only")


def _patch_conv(conv: nn.Module, image: tuple[int, int]) -> int:
    from torch import nn

    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride or conv.padding not in ((0, 0), 0):
        raise UnsupportedModelError("integer-only: the patch embedding must be a Conv2d with stride = kernel")
    patch = int(conv.kernel_size[0])
    if conv.kernel_size[0] != conv.kernel_size[1] or image[0] % patch or image[1] % patch:
        raise UnsupportedModelError(f"integer-only: {image} images do not split into {patch}x{patch} patches")
    return patch


HF_CLASSIFIERS = (
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
)


def read_vit(model: nn.Module, image: tuple[int, int]) -> FloatViT:
    """The weights of a timm VisionTransformer or a Hugging Face ViT classifier, in one layout."""
    from timm.models.vision_transformer import VisionTransformer

    inner = getattr(model, "net", model)  # vitcompress wraps Hugging Face models (HFClassifier)
    if isinstance(inner, VisionTransformer):
        return _read_timm(inner, image)
    if type(inner).__name__ in HF_CLASSIFIERS:
        return _read_hf(inner, image)
    raise UnsupportedModelError(
        f"integer-only quantization supports timm ViT/DeiT and Hugging Face ViT/DeiT, not {type(inner).__name__}",
        hint="use mode static or dynamic for this model",
    )


def _read_timm(m: Any, image: tuple[int, int]) -> FloatViT:
    distilled = getattr(m, "head_dist", None) is not None
    if distilled and getattr(m, "distilled_training", False):
        raise UnsupportedModelError(
            "integer-only: a distilled DeiT in distilled-training mode returns two outputs"
        )
    if m.global_pool != "token" or m.num_prefix_tokens < 1 or getattr(m, "num_reg_tokens", 0):
        raise UnsupportedModelError(
            f"integer-only: pooling {m.global_pool!r} with {m.num_prefix_tokens} prefix token(s) is not "
            "supported; the head must read the class token"
        )
    if m.no_embed_class or getattr(m, "dynamic_img_size", False) or getattr(m, "attn_pool", None) is not None:
        raise UnsupportedModelError("integer-only: this timm ViT variant has no integer kernels yet")
    for what in ("norm_pre", "fc_norm", "patch_drop"):
        _identity(getattr(m, what, None), what)
    _identity(m.patch_embed.norm, "patch_embed.norm")
    patch = _patch_conv(m.patch_embed.proj, image)
    pos = _np(m.pos_embed)[0]
    tokens = [_np(m.cls_token)[0]]
    if getattr(m, "dist_token", None) is not None:
        tokens.append(_np(m.dist_token)[0])
    prefix = np.concatenate(tokens, axis=0) + pos[: len(tokens)]
    blocks = []
    for i, b in enumerate(m.blocks):
        for what in ("attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm", "drop_path1", "drop_path2"):
            owner, _, attr = what.rpartition(".")
            _identity(getattr(b.get_submodule(owner) if owner else b, attr, None), f"blocks.{i}.{what}")
        _exact_gelu(b.mlp.act, f"blocks.{i}.mlp.act")
        proj_w, proj_b = _np(b.attn.proj.weight), _np(b.attn.proj.bias)
        fc2_w, fc2_b = _np(b.mlp.fc2.weight), _np(b.mlp.fc2.bias)
        # LayerScale multiplies the branch output per channel: folded into the last linear
        for ls, (w, bias) in ((b.ls1, (proj_w, proj_b)), (b.ls2, (fc2_w, fc2_b))):
            gamma = getattr(ls, "gamma", None)
            if gamma is not None:
                w *= _np(gamma)[:, None]
                bias *= _np(gamma)
            else:
                _identity(ls, f"blocks.{i}.ls")
        attn_dim = b.attn.qkv.out_features // 3
        qkv_b = b.attn.qkv.bias
        blocks.append(
            FloatBlock(
                _norm(b.norm1, f"blocks.{i}.norm1"),
                _np(b.attn.qkv.weight),
                _np(qkv_b) if qkv_b is not None else np.zeros(3 * attn_dim, np.float32),
                int(b.attn.num_heads),
                attn_dim // int(b.attn.num_heads),
                proj_w,
                proj_b,
                _norm(b.norm2, f"blocks.{i}.norm2"),
                _np(b.mlp.fc1.weight),
                _np(b.mlp.fc1.bias),
                fc2_w,
                fc2_b,
            )
        )
    conv = m.patch_embed.proj
    return FloatViT(
        in_chans=int(conv.in_channels),
        image=image,
        patch=patch,
        patch_w=_np(conv.weight),
        patch_b=_np(conv.bias),
        prefix=prefix,
        patch_pos=pos[len(tokens) :],
        blocks=tuple(blocks),
        norm=_norm(m.norm, "norm"),
        head_w=_np(m.head.weight),
        head_b=_np(m.head.bias),
        head2_w=_np(m.head_dist.weight) if distilled else None,
        head2_b=_np(m.head_dist.bias) if distilled else None,
    )


def _read_hf(m: Any, image: tuple[int, int]) -> FloatViT:
    """Hugging Face ViTForImageClassification, transformers 5 (`layers`, q/k/v/o_proj, `mlp`) or 4
    (`encoder.layer`, query/key/value, `intermediate`/`output`)."""
    vit = getattr(m, "vit", None) or m.deit
    emb = vit.embeddings
    conv = emb.patch_embeddings.projection
    patch = _patch_conv(conv, image)
    pos = _np(emb.position_embeddings)[0]
    tokens = [_np(emb.cls_token)[0]]
    if getattr(emb, "distillation_token", None) is not None:
        tokens.append(_np(emb.distillation_token)[0])
    if pos.shape[0] != len(tokens) + (image[0] // patch) * (image[1] // patch):
        raise UnsupportedModelError("integer-only: the position embedding does not match the image size")
    layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
    two_heads = hasattr(m, "distillation_classifier")
    head = m.cls_classifier if two_heads else m.classifier
    blocks = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "mlp"):  # transformers 5
            att = layer.attention
            q, k, v, o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
            heads, head_dim = int(att.num_attention_heads), int(att.head_dim)
            fc1, fc2, act = layer.mlp.fc1, layer.mlp.fc2, layer.mlp.activation_fn
        else:  # transformers 4
            att = layer.attention.attention
            q, k, v, o = att.query, att.key, att.value, layer.attention.output.dense
            heads, head_dim = int(att.num_attention_heads), int(att.attention_head_size)
            fc1, fc2, act = (
                layer.intermediate.dense,
                layer.output.dense,
                layer.intermediate.intermediate_act_fn,
            )
        _exact_gelu(act, f"layers.{i}.mlp.activation_fn")
        blocks.append(
            FloatBlock(
                _norm(layer.layernorm_before, f"layers.{i}.layernorm_before"),
                np.concatenate([_np(q.weight), _np(k.weight), _np(v.weight)]),
                np.concatenate([_np(q.bias), _np(k.bias), _np(v.bias)]),
                heads,
                head_dim,
                _np(o.weight),
                _np(o.bias),
                _norm(layer.layernorm_after, f"layers.{i}.layernorm_after"),
                _np(fc1.weight),
                _np(fc1.bias),
                _np(fc2.weight),
                _np(fc2.bias),
            )
        )
    return FloatViT(
        in_chans=int(conv.in_channels),
        image=image,
        patch=patch,
        patch_w=_np(conv.weight),
        patch_b=_np(conv.bias),
        prefix=np.concatenate(tokens, axis=0) + pos[: len(tokens)],
        patch_pos=pos[len(tokens) :],
        blocks=tuple(blocks),
        norm=_norm(vit.layernorm, "layernorm"),
        head_w=_np(head.weight),
        head_b=_np(head.bias),
        head2_w=_np(m.distillation_classifier.weight) if two_heads else None,
        head2_b=_np(m.distillation_classifier.bias) if two_heads else None,
    )


# --------------------------------------------------------------------------- float forward + calibration


POINTS_INT8 = ("ln1", "q", "k", "v", "ctx", "ln2", "gelu")  # per block, quantized to int8


@dataclass
class RangeStats:
    """Per point: the largest |x| seen (minmax) and the mean of the per-batch percentiles of |x|;
    per LayerNorm input: sqrt(sum (x - mean)**2) of every token, for the integer square root's start."""

    percentile: float
    absmax: dict[str, float] = field(default_factory=dict)
    pct: dict[str, list[float]] = field(default_factory=dict)
    roots: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def observe(self, name: str, x: torch.Tensor) -> None:
        import torch

        flat = x.detach().abs().flatten().float()
        self.absmax[name] = max(self.absmax.get(name, 0.0), float(flat.max()))
        if flat.numel() > 2_000_000:  # quantile of a seeded subsample: torch.quantile caps its input size
            generator = torch.Generator().manual_seed(0)
            flat = flat[torch.randint(flat.numel(), (2_000_000,), generator=generator)]
        self.pct.setdefault(name, []).append(float(torch.quantile(flat, self.percentile / 100)))

    def observe_root(self, name: str, x: torch.Tensor) -> None:
        centered = x - x.mean(dim=-1, keepdim=True)
        self.roots.setdefault(name, []).append(centered.pow(2).sum(-1).sqrt().flatten().numpy())

    def bound(self, name: str, use_percentile: bool) -> float:
        value = float(np.mean(self.pct[name])) if use_percentile else self.absmax[name]
        return max(value, 1e-8)


def float_forward(vit: FloatViT, images: torch.Tensor, stats: RangeStats | None = None) -> torch.Tensor:
    """The float ViT over `FloatViT`'s weights (what the integer model approximates), recording
    the ranges of every quantization point in `stats`."""
    import torch
    import torch.nn.functional as F

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a)

    def see(name: str, x: torch.Tensor) -> None:
        if stats is not None:
            stats.observe(name, x)

    def norm(name: str, x: torch.Tensor, n: FloatNorm) -> torch.Tensor:
        if stats is not None:
            stats.observe_root(name, x)
        return F.layer_norm(x, (x.shape[-1],), t(n.weight), t(n.bias), n.eps)

    see("input", images)
    x = F.conv2d(images, t(vit.patch_w), t(vit.patch_b), stride=vit.patch).flatten(2).transpose(1, 2)
    x = x + t(vit.patch_pos)
    x = torch.cat([t(vit.prefix)[None].expand(len(images), -1, -1), x], dim=1)
    see("embed", x)
    for i, b in enumerate(vit.blocks):
        batch, tokens, _ = x.shape
        h = norm(f"{i}.ln1", x, b.norm1)
        see(f"{i}.ln1", h)
        qkv = F.linear(h, t(b.qkv_w), t(b.qkv_b)).reshape(batch, tokens, 3, b.heads, b.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        see(f"{i}.q", q)
        see(f"{i}.k", k)
        see(f"{i}.v", v)
        attn = ((q @ k.transpose(-2, -1)) * b.head_dim**-0.5).softmax(-1)
        ctx = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
        see(f"{i}.ctx", ctx)
        x = x + F.linear(ctx, t(b.proj_w), t(b.proj_b))
        see(f"{i}.res1", x)
        h = norm(f"{i}.ln2", x, b.norm2)
        see(f"{i}.ln2", h)
        h = F.linear(h, t(b.fc1_w), t(b.fc1_b))
        see(f"{i}.fc1", h)
        h = F.gelu(h)
        see(f"{i}.gelu", h)
        x = x + F.linear(h, t(b.fc2_w), t(b.fc2_b))
        see(f"{i}.res2", x)
    heads = 1 if vit.head2_w is None else 2
    cls = norm("lnf", x[:, :heads], vit.norm)
    see("lnf", cls)
    logits = F.linear(cls[:, 0], t(vit.head_w), t(vit.head_b))
    if vit.head2_w is not None and vit.head2_b is not None:
        logits = (logits + F.linear(cls[:, 1], t(vit.head2_w), t(vit.head2_b))) / 2
    return logits


def calibrate(vit: FloatViT, batches: list[np.ndarray], percentile: float) -> RangeStats:
    import torch

    stats = RangeStats(percentile)
    with torch.no_grad():
        for batch in batches:
            float_forward(vit, torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)), stats)
    return stats


# --------------------------------------------------------------------------- the integer plan


@dataclass(frozen=True)
class IntLinear:
    weight: np.ndarray  # int8 [in, out]
    bias: np.ndarray  # int32 [out]: round(b / (s_in * s_w))
    acc_scale: np.ndarray  # float64 [out]: s_in * s_w, the accumulator's scale per channel


def quantize_linear(w: np.ndarray, b: np.ndarray, s_in: float) -> IntLinear:
    """Per-output-channel symmetric int8 weights; the bias in the int32 accumulator's units."""
    s_w = np.maximum(np.abs(w).max(axis=1).astype(np.float64), 1e-12) / 127
    weight = np.clip(np.rint(w / s_w[:, None]), *INT8).astype(np.int8).T.copy()
    acc = s_in * s_w
    bias = np.clip(np.rint(b / acc), *INT32).astype(np.int32)
    return IntLinear(weight, bias, acc)


@dataclass(frozen=True)
class IntBlock:
    ln1: IntLayerNormParams
    q: IntLinear  # the query third of qkv: its output is the uint8 A input of q @ k^T
    q_out: Dyadic
    kv: IntLinear  # keys and values: int8, the B inputs of q @ k^T and probs @ v
    kv_out: Dyadic  # per channel, to the k / v int8 scales
    heads: int
    head_dim: int
    score_scale: float  # s_q * s_k / sqrt(head_dim): Shiftmax's input scale
    ctx_out: Dyadic  # (s_v / 2**8) -> s_ctx
    proj: IntLinear
    res1_skip: Dyadic  # residual scale before -> after the attention add
    res1_branch: Dyadic  # proj accumulator -> residual scale after the add
    ln2: IntLayerNormParams
    fc1: IntLinear
    fc1_out: Dyadic  # fc1 accumulator -> ShiftGELU's 16-bit input scale
    gelu_scale: float
    gelu_out: Dyadic  # (gelu_scale / 2**8) -> int8 scale of fc2's input
    fc2: IntLinear
    res2_skip: Dyadic
    res2_branch: Dyadic


@dataclass(frozen=True)
class IntViT:
    """Every integer constant of the integer-only model, and the float scales at its two ends."""

    in_chans: int
    image: tuple[int, int]
    patch: int
    input_scale: float
    patch_embed: IntLinear
    embed_out: Dyadic
    prefix: np.ndarray  # int32 [1, P, D]
    patch_pos: np.ndarray  # int32 [1, N, D]
    blocks: tuple[IntBlock, ...]
    norm: IntLayerNormParams
    head: IntLinear
    head2: IntLinear | None  # distilled DeiT: its accumulator joins head's at head's scale
    head2_align: Dyadic | None
    output_scale: np.ndarray  # float32 per class: logits = accumulator * output_scale (the dequantizer)
    scales: dict[str, float]
    finetune_losses: tuple[float, float] | None = None  # KD loss at the first and last step, when fine-tuned


def _root_start(stats: RangeStats, name: str, s_res: float) -> int:
    """Newton's start for the integer square root: the geometric middle of the 1st and 99th
    percentile of sqrt(sum (x - mean)**2) at the residual scale."""
    roots = np.concatenate(stats.roots[name]) / s_res
    low, high = np.percentile(roots, [1, 99])
    return max(1, int(math.sqrt(max(low, 1.0) * max(high, 1.0))))


def plan_integer(vit: FloatViT, stats: RangeStats, use_percentile: bool) -> IntViT:
    """Fix every integer constant from the float weights and the calibrated ranges."""
    scales: dict[str, float] = {}

    def int8_scale(name: str) -> float:
        scales[name] = stats.bound(name, use_percentile) / INT8[1]
        return scales[name]

    def residual_scale(name: str) -> float:
        scales[name] = stats.bound(name, False) / RESIDUAL[1]  # 20 bits: minmax, never clipped
        return scales[name]

    s_in = int8_scale("input")
    patch_w = vit.patch_w.reshape(vit.width, -1)
    patch_embed = quantize_linear(patch_w, vit.patch_b, s_in)
    s_res = residual_scale("embed")
    embed_out = Dyadic.of(patch_embed.acc_scale / s_res)
    prefix = np.clip(np.rint(vit.prefix / s_res), *RESIDUAL).astype(np.int32)[None]
    patch_pos = np.clip(np.rint(vit.patch_pos / s_res), *RESIDUAL).astype(np.int32)[None]
    blocks = []
    for i, b in enumerate(vit.blocks):
        s_ln1 = int8_scale(f"{i}.ln1")
        ln1 = IntLayerNormParams.make(
            b.norm1.weight, b.norm1.bias, s_ln1, _root_start(stats, f"{i}.ln1", s_res)
        )
        attn_dim = b.heads * b.head_dim
        q = quantize_linear(b.qkv_w[:attn_dim], b.qkv_b[:attn_dim], s_ln1)
        kv = quantize_linear(b.qkv_w[attn_dim:], b.qkv_b[attn_dim:], s_ln1)
        s_q, s_k, s_v = (int8_scale(f"{i}.{p}") for p in "qkv")
        s_ctx = int8_scale(f"{i}.ctx")
        proj = quantize_linear(b.proj_w, b.proj_b, s_ctx)
        s_res1 = residual_scale(f"{i}.res1")
        s_ln2 = int8_scale(f"{i}.ln2")
        ln2 = IntLayerNormParams.make(
            b.norm2.weight, b.norm2.bias, s_ln2, _root_start(stats, f"{i}.ln2", s_res1)
        )
        fc1 = quantize_linear(b.fc1_w, b.fc1_b, s_ln2)
        s_fc1 = stats.bound(f"{i}.fc1", False) / GELU_IN[1]
        scales[f"{i}.fc1"] = s_fc1
        s_gelu = int8_scale(f"{i}.gelu")
        fc2 = quantize_linear(b.fc2_w, b.fc2_b, s_gelu)
        s_res2 = residual_scale(f"{i}.res2")
        blocks.append(
            IntBlock(
                ln1=ln1,
                q=q,
                q_out=Dyadic.of(q.acc_scale / s_q),
                kv=kv,
                kv_out=Dyadic.of(kv.acc_scale / np.repeat([s_k, s_v], attn_dim)),
                heads=b.heads,
                head_dim=b.head_dim,
                score_scale=s_q * s_k / math.sqrt(b.head_dim),
                ctx_out=Dyadic.of(s_v / (1 << arith.SHIFTMAX_BITS) / s_ctx),
                proj=proj,
                res1_skip=Dyadic.of(s_res / s_res1),
                res1_branch=Dyadic.of(proj.acc_scale / s_res1),
                ln2=ln2,
                fc1=fc1,
                fc1_out=Dyadic.of(fc1.acc_scale / s_fc1),
                gelu_scale=s_fc1,
                gelu_out=Dyadic.of(s_fc1 / (1 << arith.SIGMOID_BITS) / s_gelu),
                fc2=fc2,
                res2_skip=Dyadic.of(s_res1 / s_res2),
                res2_branch=Dyadic.of(fc2.acc_scale / s_res2),
            )
        )
        s_res = s_res2
    s_lnf = int8_scale("lnf")
    norm = IntLayerNormParams.make(vit.norm.weight, vit.norm.bias, s_lnf, _root_start(stats, "lnf", s_res))
    head = quantize_linear(vit.head_w, vit.head_b, s_lnf)
    head2 = (
        None
        if vit.head2_w is None or vit.head2_b is None
        else quantize_linear(vit.head2_w, vit.head2_b, s_lnf)
    )
    return IntViT(
        in_chans=vit.in_chans,
        image=vit.image,
        patch=vit.patch,
        input_scale=s_in,
        patch_embed=patch_embed,
        embed_out=embed_out,
        prefix=prefix,
        patch_pos=patch_pos,
        blocks=tuple(blocks),
        norm=norm,
        head=head,
        head2=head2,
        head2_align=None if head2 is None else Dyadic.of(head2.acc_scale / head.acc_scale),
        output_scale=(head.acc_scale / (1 if head2 is None else 2)).astype(np.float32),
        scales=scales,
    )


# --------------------------------------------------------------------------- the integer program


def linear(ops: IntOps, x: Any, layer: IntLinear) -> Any:
    """int8 activation (uint8 + 128) x int8 weight -> int32 accumulator, without the bias (the
    requantization after it adds the bias in its one constant)."""
    return ops.matmul_integer(x, ops.const(layer.weight, "weight"), arith.ACT_ZERO)


def residual_add(
    ops: IntOps, skip: Any, x: Any, layer: IntLinear, skip_factor: Dyadic, branch_factor: Dyadic
) -> Any:
    """The residual add with aligned scales: the skip and the branch's linear (bias included)
    requantized to the sum's scale, added, clipped to the residual range."""
    skip = arith.requantize(ops, skip, skip_factor, None, None, np.int64)
    branch = arith.requantize(
        ops, linear(ops, x, layer), branch_factor, None, None, np.int64, acc_bias=layer.bias
    )
    return ops.cast(ops.clip(ops.add(skip, branch), *RESIDUAL), np.int32)


def block_forward(ops: IntOps, r: Any, b: IntBlock) -> Any:
    h = arith.layernorm(ops, r, b.ln1)
    q = arith.to_act8(ops, linear(ops, h, b.q), b.q_out, acc_bias=b.q.bias)
    q = ops.transpose(ops.reshape(q, (0, 0, b.heads, b.head_dim)), (0, 2, 1, 3))
    kv = arith.requantize(ops, linear(ops, h, b.kv), b.kv_out, *INT8, np.int8, acc_bias=b.kv.bias)
    kv = ops.reshape(kv, (0, 0, 2, b.heads, b.head_dim))
    k_t = ops.transpose(ops.take(kv, 0, 2), (0, 2, 3, 1))
    v = ops.transpose(ops.take(kv, 1, 2), (0, 2, 1, 3))
    probs = arith.shiftmax(ops, ops.matmul_integer(q, k_t, arith.ACT_ZERO), b.score_scale)
    ctx = ops.transpose(ops.matmul_integer(probs, v), (0, 2, 1, 3))
    ctx = ops.reshape(ctx, (0, 0, b.heads * b.head_dim))
    ctx = arith.to_act8(ops, ctx, b.ctx_out)
    r = residual_add(ops, r, ctx, b.proj, b.res1_skip, b.res1_branch)
    h = arith.layernorm(ops, r, b.ln2)
    h = arith.requantize(ops, linear(ops, h, b.fc1), b.fc1_out, *GELU_IN, np.int32, acc_bias=b.fc1.bias)
    h = arith.to_act8(ops, arith.shiftgelu(ops, h, b.gelu_scale), b.gelu_out)
    return residual_add(ops, r, h, b.fc2, b.res2_skip, b.res2_branch)


def integer_forward(ops: IntOps, x: Any, plan: IntViT) -> Any:
    """The input image [B, C, H, W] as uint8 + 128 -> int32 logit accumulators [B, classes] (scale
    plan.output_scale)."""
    p = plan.patch
    gh, gw = plan.image[0] // p, plan.image[1] // p
    patches = ops.reshape(x, (0, plan.in_chans, gh, p, gw, p))
    patches = ops.reshape(ops.transpose(patches, (0, 2, 4, 1, 3, 5)), (0, gh * gw, plan.in_chans * p * p))
    tokens = arith.requantize(
        ops,
        linear(ops, patches, plan.patch_embed),
        plan.embed_out,
        *RESIDUAL,
        np.int32,
        acc_bias=plan.patch_embed.bias,
    )
    tokens = ops.clip(ops.add(tokens, ops.const(plan.patch_pos, "pos")), *RESIDUAL)
    prefix = ops.batch_broadcast(ops.const(plan.prefix, "prefix"), tokens)
    r = ops.concat([prefix, tokens], axis=1)
    for i, b in enumerate(plan.blocks):
        if hasattr(ops, "scope"):
            ops.scope = f"blocks.{i}"
        r = block_forward(ops, r, b)
    if hasattr(ops, "scope"):
        ops.scope = "head"
    logits = arith.add_bias(
        ops, linear(ops, arith.layernorm(ops, ops.take(r, 0, 1), plan.norm), plan.head), plan.head.bias
    )
    if plan.head2 is None or plan.head2_align is None:
        return logits
    # distilled DeiT: (head + head_dist) / 2, the second accumulator requantized to the first's scale
    dist = linear(ops, arith.layernorm(ops, ops.take(r, 1, 1), plan.norm), plan.head2)
    dist = arith.requantize(ops, dist, plan.head2_align, None, None, np.int64, acc_bias=plan.head2.bias)
    return ops.cast(ops.clip(ops.add(ops.cast(logits, np.int64), dist), *INT32), np.int32)


def quantize_input(images: np.ndarray, scale: float) -> np.ndarray:
    """The input quantizer, as ONNX Runtime's QuantizeLinear computes it (float32, half to even,
    then zero point 128, saturated to uint8)."""
    q = np.rint(images.astype(np.float32) / np.float32(scale)) + arith.ACT_ZERO
    return np.clip(q, 0, 255).astype(np.uint8)


def reference_accumulators(plan: IntViT, images: np.ndarray) -> np.ndarray:
    """The NumPy reference: int32 logit accumulators for float images."""
    result: np.ndarray = integer_forward(arith.NumpyOps(), quantize_input(images, plan.input_scale), plan)
    return result


def dequantize_output(acc: np.ndarray, plan: IntViT) -> np.ndarray:
    return acc.astype(np.float32) * plan.output_scale


# --------------------------------------------------------------------------- ONNX


INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ACCUMULATOR_NAME = "logits_int32"
OPSET = 17


def build_onnx(plan: IntViT, expose_accumulators: bool = False) -> Any:
    """The integer-only ONNX model: QuantizeLinear, integer ops only, DequantizeLinear."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ops = arith.OnnxOps(scope="embed")
    scale = numpy_helper.from_array(np.array(plan.input_scale, np.float32), "input_scale")
    zero = numpy_helper.from_array(np.array(arith.ACT_ZERO, np.uint8), "input_zero_point")
    ops.initializers += [scale, zero]
    ops.nodes.append(
        helper.make_node(
            "QuantizeLinear", [INPUT_NAME, scale.name, zero.name], ["input_uint8"], name="input_quantizer"
        )
    )
    acc = integer_forward(ops, arith.Sym("input_uint8", np.uint8), plan)
    out_scale = numpy_helper.from_array(plan.output_scale, "output_scale")
    ops.initializers.append(out_scale)
    ops.nodes.append(
        helper.make_node(
            "DequantizeLinear", [acc.name, out_scale.name], [OUTPUT_NAME], name="output_dequantizer", axis=1
        )
    )
    c, (h, w) = plan.in_chans, plan.image
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", c, h, w])]
    classes = int(plan.head.weight.shape[1])
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", classes])]
    if expose_accumulators:
        outputs.append(helper.make_tensor_value_info(acc.name, TensorProto.INT32, ["batch", classes]))
    graph = helper.make_graph(ops.nodes, "vitcompress_integer_only", inputs, outputs, ops.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vitcompress"
    )
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)
