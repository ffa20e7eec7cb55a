"""Low-rank factorization: exact parameter/MAC accounting, error vs rank, rank rules, data-aware SVD on
real data, determinism, export parity, artifact reload, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tests.conftest import tiny_ref
from tests.models.test_artifact import _fresh_process_logits
from vitcompress.data import DataSpec, load_dataset
from vitcompress.models import ModelRef, load_model
from vitcompress.models.artifact import save_artifact
from vitcompress.models.layers import LowRankLinear
from vitcompress.models.stats import count_macs
from vitcompress.passes.lowrank import (
    LowRankConfig,
    LowRankError,
    collect_second_moments,
    factorize_linear,
    factorize_model,
    output_error,
    svd_factors,
    whitened_factors,
)
from vitcompress.passes.prune import PruneConfig, PruneError, prune_model


def _tiny(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return load_model(tiny_ref("timm:vit_tiny_patch16_224", **overrides))


def _digits(loaded, limit=128):
    return load_dataset(DataSpec(source="digits", limit=limit), loaded.input, loaded.num_classes)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_full_rank_reproduces_the_layer_and_error_falls_with_rank():
    torch.manual_seed(0)
    linear = nn.Linear(48, 32)
    x = torch.randn(64, 48) @ torch.randn(48, 48)  # correlated inputs, like real activations
    moment = x.double().T @ x.double()
    for factors in (svd_factors(linear.weight), whitened_factors(linear.weight, moment, damping=1e-6)):
        full = factorize_linear(linear, factors, 32)
        torch.testing.assert_close(full(x), linear(x), atol=1e-5, rtol=1e-5)
        errors = [
            output_error(linear.weight, factorize_linear(linear, factors, r).weight, moment)
            for r in (4, 8, 16, 24, 32)
        ]
        assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-9
    # at equal rank, whitening gives the lower output error on the activations it was fitted to
    for rank in (4, 8, 16):
        plain = output_error(
            linear.weight, factorize_linear(linear, svd_factors(linear.weight), rank).weight, moment
        )
        white = output_error(
            linear.weight,
            factorize_linear(linear, whitened_factors(linear.weight, moment, 1e-6), rank).weight,
            moment,
        )
        assert white < plain


def test_params_and_macs_fall_exactly_as_the_ranks_predict():
    loaded = _tiny()
    params0, (macs0, _) = _params(loaded.model), count_macs(loaded)
    result = factorize_model(loaded, LowRankConfig(rank=32))
    saved = sum(
        lin_in * lin_out - 32 * (lin_in + lin_out) for lin_in, lin_out in [(192, 768), (768, 192)] * 2
    )
    assert result.params_before - result.params_after == saved == params0 - _params(loaded.model)
    tokens = loaded.adapter.num_tokens
    assert result.macs_before - result.macs_after == tokens * saved
    assert macs0 - count_macs(loaded)[0] == tokens * saved
    assert all(isinstance(b.mlp.fc1, LowRankLinear) and b.mlp.fc1.rank == 32 for b in loaded.adapter.blocks())


def test_a_rank_that_saves_nothing_leaves_the_layer_dense():
    loaded = _tiny()
    before = _params(loaded.model)
    result = factorize_model(loaded, LowRankConfig(rank=160, layers=["blocks.0.mlp.fc1"]))  # breakeven 153.6
    assert result.layers[0].rank is None and "saves nothing" in result.layers[0].note
    assert _params(loaded.model) == before and isinstance(loaded.model.blocks[0].mlp.fc1, nn.Linear)


def test_energy_rule_keeps_the_smallest_rank_reaching_the_energy():
    loaded = _tiny()
    spectra = {
        n: svd_factors(m.weight).energy()
        for n, m in loaded.model.named_modules()
        if n.endswith(("fc1", "fc2"))
    }
    result = factorize_model(loaded, LowRankConfig(energy=0.5))
    for layer in result.layers:
        energy = spectra[layer.name]
        assert layer.rank is not None and layer.rank % 8 == 0
        assert energy[layer.rank - 1] >= 0.5 - 1e-6 > energy[layer.rank - 9]


@pytest.mark.parametrize("target", ["target_params", "target_macs"])
def test_budget_hits_the_target_and_gives_more_to_compressible_layers(target):
    loaded = _tiny()
    with torch.no_grad():  # make block 1's MLP low-rank in truth: the budget should cut it first
        for lin in (loaded.model.blocks[1].mlp.fc1, loaded.model.blocks[1].mlp.fc2):
            u, s, vt = torch.linalg.svd(lin.weight, full_matrices=False)
            s[16:] *= 0.01
            lin.weight.copy_(u @ torch.diag(s) @ vt)
    params0, (macs0, _) = _params(loaded.model), count_macs(loaded)
    result = factorize_model(loaded, LowRankConfig(**{target: 0.7}))
    reached = result.params_after / params0 if target == "target_params" else result.macs_after / macs0
    assert abs(reached - 0.7) <= 0.02
    ranks = {layer.name: layer.rank for layer in result.layers}
    assert ranks["blocks.1.mlp.fc1"] is not None and ranks["blocks.1.mlp.fc2"] is not None
    dense0 = [r for n, r in ranks.items() if n.startswith("blocks.0")]
    assert all(r is None or r > ranks["blocks.1.mlp.fc1"] for r in dense0)


def test_whitened_svd_beats_plain_svd_on_real_digits():
    loaded = _tiny()
    data = _digits(loaded)
    fc1 = loaded.model.blocks[1].mlp.fc1
    moment = collect_second_moments(loaded.model, {"fc1": fc1}, list(data.batches(32)))["fc1"]
    for rank in (8, 16, 32):
        plain = output_error(fc1.weight, factorize_linear(fc1, svd_factors(fc1.weight), rank).weight, moment)
        white = output_error(
            fc1.weight, factorize_linear(fc1, whitened_factors(fc1.weight, moment, 1e-2), rank).weight, moment
        )
        assert white < 0.8 * plain, (rank, white, plain)
    result = factorize_model(loaded, LowRankConfig(rank=16, method="auto"), data)
    assert {layer.method for layer in result.layers} == {"whitened"}
    assert all(layer.output_error is not None and layer.output_error < 0.1 for layer in result.layers)


def test_deterministic_export_parity_and_reload(tmp_path):
    from vitcompress.passes.export import ExportConfig, export_model

    runs = []
    for _ in range(2):
        loaded = _tiny(seed=1)
        factorize_model(loaded, LowRankConfig(target_params=0.6, method="auto"), _digits(loaded, 64), seed=2)
        runs.append(loaded)
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    loaded = runs[0]
    export = export_model(loaded, tmp_path / "f.onnx", ExportConfig())
    assert export.parity.top1_agreement == 1.0
    x = loaded.example_input(3, seed=4)
    expected = loaded.model(x).detach()
    directory = save_artifact(loaded, tmp_path / "art")
    edits = json.loads((directory / "model.json").read_text())["edits"]
    assert edits and {e["kind"] for e in edits} == {"lowrank"}
    assert {e["module"]: e["rank"] for e in edits} == {
        n: m.rank for n, m in loaded.model.named_modules() if isinstance(m, LowRankLinear)
    }
    assert torch.equal(_fresh_process_logits(directory, x, tmp_path), expected)


def test_prune_then_factorize_chains_and_reloads(tmp_path, hf_vit_dir):
    loaded = load_model(ModelRef(f"hf:{hf_vit_dir}"))
    prune_model(loaded, PruneConfig(heads=0.5, mlp=0.5))
    factorize_model(loaded, LowRankConfig(rank=8, layers=["*.mlp.fc1", "*.attention.o_proj"]))
    x = loaded.example_input(2)
    reloaded = load_model(ModelRef(str(save_artifact(loaded, tmp_path / "a"))))
    assert reloaded.adapter.structure() == loaded.adapter.structure()
    assert torch.equal(reloaded.model(x), loaded.model(x))
    with pytest.raises(PruneError, match="prune before lowrank"):
        prune_model(loaded, PruneConfig(mlp=0.25))


def test_bad_input_names_the_field():
    for kwargs, message in [
        ({"rank": 0}, "rank"),
        ({"energy": 1.5}, "energy"),
        ({"energy": 0.0}, "energy"),
        ({}, "set exactly one of rank"),
        ({"rank": 8, "energy": 0.9}, r"got rank, energy"),
    ]:
        with pytest.raises(ValidationError, match=message):
            LowRankConfig(**kwargs)
    loaded = _tiny()
    with pytest.raises(LowRankError, match=r"layers: 'blocks.\*.mlp.fc3' matches no linear layer"):
        factorize_model(loaded, LowRankConfig(rank=8, layers=["blocks.*.mlp.fc3"]))
    with pytest.raises(
        LowRankError, match=r"target_params=0.1: reached .* the selected layers cannot give that much"
    ):
        factorize_model(loaded, LowRankConfig(target_params=0.1))
    with pytest.raises(LowRankError, match="method 'whitened' needs data"):
        factorize_model(_tiny(), LowRankConfig(rank=8, method="whitened"))


def test_factorize_command(cli, tmp_path):
    out = tmp_path / "f"
    args = ["factorize", "timm:vit_tiny_patch16_224", "--num-classes", "10", "--img-size", "32"]
    result = cli(*args, "--energy", "0.8", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    record = next(r for r in json.loads(result.stdout)["ledger"] if r["kind"] == "lowrank")
    assert len(record["details"]["layers"]) == 24 and record["details"]["params_ratio"] < 1
    assert cli("inspect", out).exit_code == 0
    bad = cli(*args, "--rank", "8", "--method", "whitened", "--out", tmp_path / "g")
    assert bad.exit_code == 2 and "--method whitened needs --data" in bad.stderr
    bad = cli(*args, "--rank", "-1", "--out", tmp_path / "g")
    assert bad.exit_code == 2 and "--rank: Input should be greater than 0" in bad.stderr


@pytest.mark.parametrize("source", ["timm", "hf"])
def test_comcat_is_exact_at_full_rank_and_degrades_gracefully(source, hf_vit_dir):
    errors = []
    for fraction in (1.0, 0.5, 0.25):
        loaded = _tiny() if source == "timm" else load_model(ModelRef(f"hf:{hf_vit_dir}"))
        with (
            torch.no_grad()
        ):  # non-zero biases exercise the bias folding (query column, key drop, value to output)
            generator = torch.Generator().manual_seed(0)
            for name, p in loaded.model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        x = loaded.example_input(4, seed=2)
        expected = loaded.model(x).detach()
        head_dim = loaded.adapter.blocks()[0].attn.head_dim
        result = factorize_model(
            loaded, LowRankConfig(attention="comcat", attention_rank=fraction, round_to=4)
        )
        assert [a["head_dim_after"] for a in result.attention] == [round(head_dim * fraction)] * 2
        for b in loaded.adapter.blocks():
            assert b.attn.head_dim * b.attn.num_heads == b.attn.proj.in_features
        errors.append(float((loaded.model(x) - expected).abs().max().detach()))
    assert errors[0] < 1e-5
    assert errors[0] < errors[1] < errors[2]


def test_comcat_beats_head_dim_pruning_at_the_same_head_size(tmp_path):
    """Both leave heads of half the size; COMCAT's optimal per-head factors lose less than dropping dims."""
    x = _tiny().example_input(16, seed=3)
    reference = _tiny().model(x).detach()
    comcat = _tiny()
    factorize_model(comcat, LowRankConfig(attention="comcat", attention_rank=0.5))
    pruned = _tiny()
    prune_model(pruned, PruneConfig(head_dim=0.5))
    assert comcat.adapter.structure() == pruned.adapter.structure()
    comcat_error = float((comcat.model(x) - reference).pow(2).mean().detach())
    pruned_error = float((pruned.model(x) - reference).pow(2).mean().detach())
    assert comcat_error < 0.5 * pruned_error
    reloaded = load_model(ModelRef(str(save_artifact(comcat, tmp_path / "c"))))
    assert torch.equal(reloaded.model(x), comcat.model(x))
