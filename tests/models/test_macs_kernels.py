"""MAC counts must not depend on the installed torch or on which attention kernel runs.

On torch 2.14.1 PyTorch's FLOP counter had no formula for the CPU flash-attention kernel, so the
attention matmuls vanished from the count (DeiT-Ti 1.07 G instead of 1.26 G).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitcompress.models import ModelRef, load_model
from vitcompress.models.stats import count_macs

# DeiT-Ti at 224: 197 tokens, width 192, MLP 768, 12 blocks, 1000 classes.
TOKENS, WIDTH, HIDDEN, DEPTH = 197, 192, 768, 12
PER_BLOCK = TOKENS * (4 * WIDTH * WIDTH + 2 * WIDTH * HIDDEN) + 2 * TOKENS * TOKENS * WIDTH
DEIT_TI_MACS = DEPTH * PER_BLOCK + 196 * 3 * 16 * 16 * WIDTH + WIDTH * 1000


def test_the_analytic_deit_tiny_count_is_the_published_one():
    assert pytest.approx(1.258e9, rel=0.005) == DEIT_TI_MACS


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return load_model(ModelRef("timm:deit_tiny_patch16_224"))


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, None])
@pytest.mark.parametrize("fused", [True, False])
def test_deit_tiny_macs_on_every_attention_kernel(deit_tiny, backend, fused):
    for block in deit_tiny.model.blocks:
        block.attn.fused_attn = fused
    if backend is None:
        macs, _ = count_macs(deit_tiny)
    else:
        with sdpa_kernel([backend]):
            macs, _ = count_macs(deit_tiny)
    assert macs == pytest.approx(1.258e9, rel=0.005)
    assert macs == DEIT_TI_MACS


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hf_vit_macs_on_eager_and_sdpa_attention(hf_vit_dir, implementation):
    loaded = load_model(ModelRef(f"hf:{hf_vit_dir}"))
    configs = {id(m.config): m.config for m in loaded.model.modules() if hasattr(m, "config")}
    assert configs, "the HF model exposes no config to switch its attention kernel"
    for config in configs.values():
        config._attn_implementation = implementation
    macs, _ = count_macs(loaded)
    tokens, width, hidden = 17, 64, 128  # the conftest HF ViT: 32x32 input, patch 8, 2 blocks
    per_block = tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width
    assert macs == 2 * per_block + 16 * 3 * 8 * 8 * width + width * 10
