"""Integer-aware fine-tuning: train the float weights through a model that computes like the integer one.

`FakeQuantViT` runs the network of `FloatViT` with the integer model's rounding at every point the
integer graph has one, at the calibrated scales the integer plan will use (frozen): int8 weights per
output channel, the uint8 input, int8 activations before every matmul, 20-bit residuals, 16-bit
GELU inputs, Shiftmax probabilities in units of 2**-8. Softmax and GELU are replaced by the same
shift-based approximations as the integer kernels (2**-q · (1 - f/2) for the exponential, x ·
sigmoid(1.702 x) for GELU). Rounding passes gradients straight through (STE), and so do the two
approximations (their value, the exact function's gradient). The loss is knowledge distillation
from the float model (KL divergence at a temperature), so no labels are needed.

After training, the weights go back into a `FloatViT` and the integer plan is built from them with
the scales frozen at calibration, so the exported graph quantizes exactly where training did.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcompress.passes.intonly import arith
from vitcompress.passes.intonly.vit import GELU_IN, RESIDUAL, FloatNorm, FloatViT

if TYPE_CHECKING:
    import torch

    from vitcompress.data import Dataset


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


def fake_quant(x: torch.Tensor, scale: float, lo: int, hi: int) -> torch.Tensor:
    """round(x / scale) clipped to [lo, hi], times scale; gradient straight through inside the range."""
    return _ste_round(x / scale).clamp(lo, hi) * scale


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8, as `quantize_linear` does."""
    scale = (w.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127).expand_as(w)
    return _ste_round(w / scale).clamp(-127, 127) * scale


def _exp2_shift(t: torch.Tensor, n: int) -> torch.Tensor:
    """2**-t for t >= 0 as the integer kernel computes it: 2**-q · (1 - f/2), zero past 2**-n."""
    t = t.clamp(max=n - 1e-6)
    q = t.floor()
    return (-q).exp2() * (1 - (t - q) / 2)


def shiftmax_like(scores: torch.Tensor) -> torch.Tensor:
    exact = scores.softmax(-1)
    t = (scores.max(-1, keepdim=True).values - scores) / math.log(2)
    e = _exp2_shift(t.detach(), arith.SHIFTMAX_N)
    approx = e / e.sum(-1, keepdim=True)
    return exact + (approx - exact).detach()


def shiftgelu_like(x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    exact = F.gelu(x)
    t = x.detach() * arith.GELU_SIGMOID_SLOPE / math.log(2)
    top = t.max(-1, keepdim=True).values.clamp_min(0)
    e_x, e_0 = _exp2_shift(top - t, arith.SHIFTGELU_N), _exp2_shift(top, arith.SHIFTGELU_N)
    approx = x.detach() * e_x / (e_x + e_0)
    return exact + (approx - exact).detach()


def _module(vit: FloatViT) -> torch.nn.Module:
    import torch
    from torch import nn

    def p(a: np.ndarray) -> nn.Parameter:
        return nn.Parameter(torch.from_numpy(np.array(a, dtype=np.float32)))

    module = nn.Module()
    module.patch_w, module.patch_b = p(vit.patch_w), p(vit.patch_b)
    module.prefix, module.patch_pos = p(vit.prefix), p(vit.patch_pos)
    names = ("qkv_w", "qkv_b", "proj_w", "proj_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b")
    blocks = nn.ModuleList()
    for b in vit.blocks:
        block = nn.Module()
        for name in names:
            setattr(block, name, p(getattr(b, name)))
        for norm in ("norm1", "norm2"):
            setattr(block, f"{norm}_w", p(getattr(b, norm).weight))
            setattr(block, f"{norm}_b", p(getattr(b, norm).bias))
        blocks.append(block)
    module.blocks = blocks
    module.norm_w, module.norm_b = p(vit.norm.weight), p(vit.norm.bias)
    module.head_w, module.head_b = p(vit.head_w), p(vit.head_b)
    if vit.head2_w is not None and vit.head2_b is not None:
        module.head2_w, module.head2_b = p(vit.head2_w), p(vit.head2_b)
    return module


class FakeQuantViT:
    """The trainable float weights of a `FloatViT`, run with the integer model's rounding (see the module note)."""

    def __init__(self, vit: FloatViT, scales: dict[str, float]) -> None:
        self.vit = vit
        self.scales = scales
        self.module = _module(vit)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        m: Any = self.module  # nn.Module attributes are dynamic
        vit, s = self.vit, self.scales
        int8 = arith.INT8

        def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.linear(x, fake_quant_weight(w), b)

        def norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, name: str) -> torch.Tensor:
            return fake_quant(F.layer_norm(x, (x.shape[-1],), w, b, eps), s[name], *int8)

        x = fake_quant(images, s["input"], -128, 127)
        x = F.conv2d(
            x, fake_quant_weight(m.patch_w.flatten(1)).view_as(m.patch_w), m.patch_b, stride=vit.patch
        )
        x = x.flatten(2).transpose(1, 2) + m.patch_pos
        x = torch.cat([m.prefix[None].expand(len(images), -1, -1), x], dim=1)
        x = fake_quant(x, s["embed"], *RESIDUAL)
        for i, (b, fb) in enumerate(zip(m.blocks, vit.blocks, strict=True)):
            batch, tokens, _ = x.shape
            h = norm(x, b.norm1_w, b.norm1_b, fb.norm1.eps, f"{i}.ln1")
            qkv = linear(h, b.qkv_w, b.qkv_b).reshape(batch, tokens, 3, fb.heads, fb.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            q, k, v = (fake_quant(t, s[f"{i}.{n}"], *int8) for t, n in ((q, "q"), (k, "k"), (v, "v")))
            probs = shiftmax_like((q @ k.transpose(-2, -1)) * fb.head_dim**-0.5)
            probs = fake_quant(probs, 2.0**-arith.SHIFTMAX_BITS, 0, 255)
            ctx = fake_quant((probs @ v).transpose(1, 2).reshape(batch, tokens, -1), s[f"{i}.ctx"], *int8)
            x = fake_quant(x + linear(ctx, b.proj_w, b.proj_b), s[f"{i}.res1"], *RESIDUAL)
            h = norm(x, b.norm2_w, b.norm2_b, fb.norm2.eps, f"{i}.ln2")
            h = fake_quant(linear(h, b.fc1_w, b.fc1_b), s[f"{i}.fc1"], *GELU_IN)
            h = fake_quant(shiftgelu_like(h), s[f"{i}.gelu"], *int8)
            x = fake_quant(x + linear(h, b.fc2_w, b.fc2_b), s[f"{i}.res2"], *RESIDUAL)
        heads = 1 if vit.head2_w is None else 2
        cls = norm(x[:, :heads], m.norm_w, m.norm_b, vit.norm.eps, "lnf")
        logits = linear(cls[:, 0], m.head_w, m.head_b)
        if heads == 2:
            logits = (logits + linear(cls[:, 1], m.head2_w, m.head2_b)) / 2
        return logits

    def trained(self) -> FloatViT:
        """The fine-tuned weights as a `FloatViT` (the integer plan is built from it)."""
        m: Any = self.module

        def a(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().copy()

        blocks = tuple(
            dataclasses.replace(
                fb,
                norm1=FloatNorm(a(b.norm1_w), a(b.norm1_b), fb.norm1.eps),
                norm2=FloatNorm(a(b.norm2_w), a(b.norm2_b), fb.norm2.eps),
                qkv_w=a(b.qkv_w),
                qkv_b=a(b.qkv_b),
                proj_w=a(b.proj_w),
                proj_b=a(b.proj_b),
                fc1_w=a(b.fc1_w),
                fc1_b=a(b.fc1_b),
                fc2_w=a(b.fc2_w),
                fc2_b=a(b.fc2_b),
            )
            for b, fb in zip(m.blocks, self.vit.blocks, strict=True)
        )
        two = self.vit.head2_w is not None
        return dataclasses.replace(
            self.vit,
            patch_w=a(m.patch_w),
            patch_b=a(m.patch_b),
            prefix=a(m.prefix),
            patch_pos=a(m.patch_pos),
            blocks=blocks,
            norm=FloatNorm(a(m.norm_w), a(m.norm_b), self.vit.norm.eps),
            head_w=a(m.head_w),
            head_b=a(m.head_b),
            head2_w=a(m.head2_w) if two else None,
            head2_b=a(m.head2_b) if two else None,
        )


def finetune(
    vit: FloatViT,
    scales: dict[str, float],
    data: Dataset,
    steps: int,
    lr: float,
    batch_size: int = 64,
    temperature: float = 2.0,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[FloatViT, list[float]]:
    """Integer-aware KD: the fake-quant student learns the float model's logits; returns the trained
    weights and the loss per step."""
    import torch
    import torch.nn.functional as F

    from vitcompress.passes.intonly.vit import float_forward

    torch.manual_seed(seed)
    student = FakeQuantViT(vit, scales)
    optimizer = torch.optim.AdamW(student.module.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    losses: list[float] = []
    while len(losses) < steps:
        for images, _ in data.batches(batch_size, shuffle=True, seed=seed + len(losses)):
            with torch.no_grad():
                target = F.log_softmax(float_forward(vit, images) / temperature, -1)
            output = F.log_softmax(student(images) / temperature, -1)
            loss = F.kl_div(output, target, log_target=True, reduction="batchmean") * temperature**2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if progress is not None:
                progress(len(losses), steps, losses[-1])
            if len(losses) >= steps:
                break
    return student.trained(), losses
