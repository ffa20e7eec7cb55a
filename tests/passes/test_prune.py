"""Structured pruning: shapes, MAC targets, surgery correctness, reload, export, determinism, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TIMM_FAMILY, tiny_ref
from tests.models.test_artifact import _fresh_process_logits
from vitcompress.data import DataSpec, load_dataset
from vitcompress.errors import PruneError
from vitcompress.models import ModelRef, load_model
from vitcompress.models.artifact import save_artifact
from vitcompress.models.stats import count_macs
from vitcompress.passes.prune import (
    ChannelStats,
    Importance,
    PruneConfig,
    _graph,
    compute_stats,
    current_shape,
    fit_cost_model,
    prune_model,
)

FAMILIES = [*TIMM_FAMILY, "hf-vit", "hf-deit"]


def _load(source, hf_vit_dir, hf_deit_dir):
    if source == "hf-vit":
        return load_model(ModelRef(f"hf:{hf_vit_dir}"))
    if source == "hf-deit":
        return load_model(ModelRef(f"hf:{hf_deit_dir}"))
    return load_model(tiny_ref(source))


def _attention_consistent(loaded) -> None:
    for b in loaded.adapter.blocks():
        width = sum(m.out_features for m in b.attn.qkv) // 3
        assert b.attn.num_heads * b.attn.head_dim == width == b.attn.proj.in_features, b.name
        assert b.mlp.fc1.out_features == b.mlp.fc2.in_features


def _digits(loaded, limit=96):
    return load_dataset(DataSpec(source="digits", limit=limit), loaded.input, loaded.num_classes)


@pytest.mark.parametrize("source", FAMILIES)
def test_ratios_shrink_every_block_and_the_model_still_exports(source, hf_vit_dir, hf_deit_dir, tmp_path):
    from vitcompress.passes.export import ExportConfig, export_model

    loaded = _load(source, hf_vit_dir, hf_deit_dir)
    before = current_shape(loaded)
    macs0, _ = count_macs(loaded)
    predicted_model = fit_cost_model(loaded)
    result = prune_model(loaded, PruneConfig(heads=0.5, head_dim=0.5, mlp=0.5))

    _attention_consistent(loaded)
    for b0, b in zip(before.blocks, loaded.adapter.blocks(), strict=True):
        assert b.attn.num_heads == b0.heads - round(0.5 * b0.heads)
        assert b.attn.head_dim == max(8, round(b0.head_dim * 0.5 / 8) * 8)
        assert b.mlp.hidden == round(b0.mlp * 0.5 / 8) * 8
    macs, _ = count_macs(loaded)
    assert result.macs_after == macs < 0.5 * macs0
    # the cost model fitted on the original predicts the pruned model's MACs exactly
    assert predicted_model.macs(current_shape(loaded)) == pytest.approx(macs, rel=1e-9)
    assert result.params_after == sum(p.numel() for p in loaded.model.parameters())

    export = export_model(loaded, tmp_path / "pruned.onnx", ExportConfig())
    assert export.parity.top1_agreement == 1.0
    assert export.parity.max_abs_diff <= 1e-4 + 1e-4 * export.parity.max_abs_reference


@pytest.mark.parametrize("source", ["timm:vit_tiny_patch16_224", "hf-vit"])
def test_pruned_artifact_reloads_identically_in_a_fresh_process(source, hf_vit_dir, hf_deit_dir, tmp_path):
    loaded = _load(source, hf_vit_dir, hf_deit_dir)
    prune_model(loaded, PruneConfig(heads=0.3, mlp=0.25))
    x = loaded.example_input(3, seed=5)
    expected = loaded.model(x).detach()
    directory = save_artifact(loaded, tmp_path / "pruned")
    manifest = json.loads((directory / "model.json").read_text())
    assert manifest["blocks"] == loaded.adapter.structure()
    assert torch.equal(_fresh_process_logits(directory, x, tmp_path), expected)


def test_embedding_width_pruning_shrinks_the_residual_stream_and_reloads(tmp_path):
    loaded = load_model(tiny_ref("timm:deit_tiny_distilled_patch16_224"))
    prune_model(loaded, PruneConfig(embed=0.25, protect=["head", "head_dist"]))
    model = loaded.model
    assert loaded.adapter.embed_dim == 144
    assert model.cls_token.shape[-1] == model.dist_token.shape[-1] == model.pos_embed.shape[-1] == 144
    assert model.head.in_features == model.head_dist.in_features == 144
    assert model.patch_embed.proj.out_channels == 144
    x = loaded.example_input(2)
    reloaded = load_model(ModelRef(str(save_artifact(loaded, tmp_path / "a"))))
    assert reloaded.adapter.embed_dim == 144
    assert torch.equal(reloaded.model(x), model(x))


def _zero_head_and_dims(loaded, block: int, head: int, dims: list[int]) -> None:
    """Make one head, and some dims of every head, contribute exactly nothing."""
    b = loaded.adapter.blocks()[block]
    a, hd = b.attn.attn_dim, b.attn.head_dim
    channels = list(range(head * hd, (head + 1) * hd)) + [
        h * hd + d for h in range(b.attn.num_heads) for d in dims
    ]
    with torch.no_grad():
        for lin_index, lin in enumerate(b.attn.qkv):
            rows = [part * a + c for part in range(3) for c in channels] if len(b.attn.qkv) == 1 else channels
            lin.weight[rows] = 0
            if lin.bias is not None:
                lin.bias[rows] = 0
            del lin_index
        b.attn.proj.weight[:, channels] = 0


@pytest.mark.parametrize("source", ["timm:vit_tiny_patch16_224", "hf-vit"])
def test_surgery_removes_exactly_the_dead_structures(source, hf_vit_dir, hf_deit_dir):
    """Heads, head dims and MLP channels whose weights are zero contribute nothing: magnitude pruning
    must pick exactly those, and removing them must leave the logits unchanged."""
    loaded = _load(source, hf_vit_dir, hf_deit_dir)
    b = loaded.adapter.blocks()[1]
    heads, hd, hidden = b.attn.num_heads, b.attn.head_dim, b.mlp.hidden
    _zero_head_and_dims(loaded, 1, head=heads - 1, dims=list(range(hd // 2)))
    dead_mlp = list(range(0, hidden, 2))
    with torch.no_grad():
        b.mlp.fc1.weight[dead_mlp] = 0
        b.mlp.fc1.bias[dead_mlp] = 0
        b.mlp.fc2.weight[:, dead_mlp] = 0
    x = loaded.example_input(4, seed=1)
    expected = loaded.model(x).detach()

    protect = [*loaded.adapter.head_names, loaded.adapter.patch_embed_name, loaded.adapter.blocks()[0].name]
    cfg = PruneConfig(heads=1 / heads, head_dim=0.5, mlp=0.5, round_to=1, importance="l1", protect=protect)
    result = prune_model(loaded, cfg)
    kept = result.kept[f"{b.name}.attn"]
    assert len(kept) == (heads - 1) * (hd // 2)
    assert all(c // hd != heads - 1 and c % hd >= hd // 2 for c in kept)
    assert result.kept[f"{b.name}.mlp"] == list(range(1, hidden, 2))
    assert loaded.adapter.blocks()[0].attn.num_heads == heads  # protected
    torch.testing.assert_close(loaded.model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["target_macs", "target_params"])
def test_targets_are_met_within_tolerance_in_five_steps(target):
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    macs0, _ = count_macs(loaded)
    params0 = sum(p.numel() for p in loaded.model.parameters())
    cfg = PruneConfig(**{target: 0.5}, steps=5, structures=["heads", "head_dim", "mlp"])
    result = prune_model(loaded, cfg)
    assert len(result.steps) == 5
    series = [s.macs if target == "target_macs" else s.params for s in result.steps]
    assert series == sorted(series, reverse=True) and len(set(series)) == 5
    reached = (result.macs_after / macs0) if target == "target_macs" else (result.params_after / params0)
    assert abs(reached - 0.5) <= cfg.tolerance
    _attention_consistent(loaded)


def test_absolute_target_and_hf_deit_target(hf_deit_dir):
    loaded = load_model(ModelRef(f"hf:{hf_deit_dir}"))
    macs0, _ = count_macs(loaded)
    result = prune_model(loaded, PruneConfig(target_macs=int(macs0 * 0.6), structures=["heads", "mlp"]))
    assert abs(result.macs_after / macs0 - 0.6) <= 0.02
    assert all(b.attn.num_heads >= 1 for b in loaded.adapter.blocks())


def test_unreachable_target_names_the_field():
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    with pytest.raises(PruneError, match=r"target_macs=0.05 cannot be reached: .* goal 5.0%"):
        prune_model(loaded, PruneConfig(target_macs=0.05, structures=["heads"]))


def test_global_scope_keeps_min_heads_and_removes_the_global_fraction():
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224", kwargs={"depth": 3, "patch_size": 8}))
    prune_model(loaded, PruneConfig(heads=0.6, scope="global", min_heads=1))
    heads = [b.attn.num_heads for b in loaded.adapter.blocks()]
    assert sum(heads) == 9 - round(0.6 * 9)
    assert min(heads) >= 1


@pytest.mark.parametrize("importance", ["taylor", "hessian"])
def test_same_seed_and_data_keep_the_same_channels(importance):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the same random-init weights both times
        loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
        cfg = PruneConfig(
            target_macs=0.6, structures=["heads", "head_dim", "mlp"], importance=importance, steps=2
        )
        runs.append(prune_model(loaded, cfg, _digits(loaded), seed=3).kept)
    assert runs[0] == runs[1]
    torch.manual_seed(0)
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    magnitude = prune_model(
        loaded, PruneConfig(target_macs=0.6, structures=["heads", "head_dim", "mlp"], steps=2)
    ).kept
    assert magnitude != runs[0]  # data-driven scores choose differently from weight magnitude


def test_data_scores_are_gradient_times_weight_sums():
    """Taylor/Hessian rows hold sum(g*w) per channel per batch; check one MLP channel by autograd."""
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    data = _digits(loaded, limit=40)
    batches = list(data.batches(20))
    stats = compute_stats(loaded, Importance.hessian, _graph(loaded), batches)
    fc1, fc2 = loaded.adapter.blocks()[0].mlp.fc1, loaded.adapter.blocks()[0].mlp.fc2
    expected = []
    for x, y in batches:
        loaded.model.zero_grad()
        torch.nn.functional.cross_entropy(loaded.model(x), y).backward()
        c = 7
        expected.append(
            float(
                (
                    (fc1.weight[c] * fc1.weight.grad[c]).sum()
                    + fc1.bias[c] * fc1.bias.grad[c]
                    + (fc2.weight[:, c] * fc2.weight.grad[:, c]).sum()
                ).detach()
            )
        )
    assert stats.mlp[0][:, 7].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-9)
    rows = torch.tensor([[1.0, -2.0], [3.0, 2.0]])
    assert ChannelStats(Importance.hessian, [], [], rows).score(rows).tolist() == [5.0, 4.0]
    assert ChannelStats(Importance.taylor, [], [], rows).score(rows).tolist() == [2.0, 0.0]


def test_bad_configs_name_the_field():
    from pydantic import ValidationError

    for kwargs, message in [
        ({"heads": 1.0}, "heads"),
        ({"mlp": -0.1}, "mlp"),
        ({}, "nothing to prune"),
        ({"heads": 0.5, "target_macs": 0.5}, "a target and fractions"),
        ({"target_macs": 0.5, "target_params": 0.5}, "not both"),
    ]:
        with pytest.raises(ValidationError, match=message):
            PruneConfig(**kwargs)
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    with pytest.raises(PruneError, match=r"heads=0.9 would leave 0 of 3 heads in block 0"):
        prune_model(loaded, PruneConfig(heads=0.9))
    with pytest.raises(PruneError, match=r"protect: 'blocks.9\*' matches no module"):
        prune_model(loaded, PruneConfig(mlp=0.5, protect=["blocks.9*"]))
    with pytest.raises(PruneError, match=r"importance 'taylor' needs data"):
        prune_model(loaded, PruneConfig(mlp=0.5, importance="taylor"))
    with pytest.raises(
        PruneError, match=r"embed: pruning the embedding width shrinks the protected patch embedding"
    ):
        prune_model(loaded, PruneConfig(embed=0.5))


def test_protected_block_keeps_its_widths():
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    before = loaded.adapter.structure()
    prune_model(loaded, PruneConfig(heads=0.34, mlp=0.5, protect=["head", "patch_embed", "blocks.0.*"]))
    after = loaded.adapter.structure()
    assert after[0] == before[0]
    assert after[1]["num_heads"] == 2 and after[1]["mlp_hidden"] == 384


def test_a_broken_block_is_named():
    from torch import nn

    from vitcompress.passes.prune import check_model

    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    loaded.adapter.set_attention_shape(1, 2, 64)
    with pytest.raises(PruneError, match=r"blocks.1: 2 heads x 64 != attention width 192"):
        check_model(loaded)
    loaded.adapter.set_attention_shape(1, 3, 64)
    loaded.model.blocks[1].mlp.fc2 = nn.Linear(700, 192)
    with pytest.raises(PruneError, match=r"pruned model fails in blocks.1: "):
        check_model(loaded)
