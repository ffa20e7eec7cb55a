"""Adapters expose the same ViT structure for every family; the passes rely on it."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TIMM_FAMILY, tiny_ref
from vitcompress.models import ModelRef, load_model


@pytest.fixture(params=[*TIMM_FAMILY, "hf_vit", "hf_deit"])
def loaded(request, hf_vit_dir, hf_deit_dir):
    if request.param == "hf_vit":
        return load_model(ModelRef(f"hf:{hf_vit_dir}"))
    if request.param == "hf_deit":
        return load_model(ModelRef(f"hf:{hf_deit_dir}"))
    return load_model(tiny_ref(request.param))


def test_blocks_attention_and_mlp_shapes(loaded):
    adapter = loaded.adapter
    blocks = adapter.blocks()
    assert len(blocks) == 2
    for block in blocks:
        qkv_out = sum(linear.out_features for linear in block.attn.qkv)
        assert qkv_out == 3 * block.attn.num_heads * block.attn.head_dim
        assert block.attn.proj.in_features == block.attn.attn_dim
        assert block.attn.proj.out_features == adapter.embed_dim
        assert block.mlp.fc1.in_features == adapter.embed_dim == block.mlp.fc2.out_features
        assert block.mlp.hidden == block.mlp.fc2.in_features
        assert loaded.model.get_submodule(block.name) is block.module
    for name in adapter.head_names:
        assert loaded.model.get_submodule(name).out_features == 10
    assert isinstance(loaded.model.get_submodule(adapter.patch_embed_name), torch.nn.Module)


def test_distilled_families_have_two_heads_and_prefix_tokens(hf_deit_dir):
    timm_deit = load_model(tiny_ref("timm:deit_tiny_distilled_patch16_224"))
    hf_deit = load_model(ModelRef(f"hf:{hf_deit_dir}"))
    assert timm_deit.adapter.head_names == ("head", "head_dist")
    assert timm_deit.adapter.num_prefix_tokens == 2
    assert hf_deit.adapter.head_names == ("net.cls_classifier", "net.distillation_classifier")
    assert hf_deit.adapter.num_prefix_tokens == 2
    assert load_model(tiny_ref("timm:vit_tiny_patch16_224")).adapter.num_prefix_tokens == 1


def test_structure_reports_per_block_dims(loaded):
    structure = loaded.adapter.structure()
    assert len(structure) == 2
    for dims in structure:
        assert dims["num_heads"] * dims["head_dim"] == dims["attn_dim"]
        assert dims["mlp_hidden"] > 0
