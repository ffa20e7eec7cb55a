"""Sparsify: the patterns hold exactly, OBS with weight update beats magnitude on the layer output,
global allocation meets its target, masks survive the artifact, distillation, export and INT8, and the
command's errors are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests.conftest import tiny_ref
from tests.models.test_artifact import shrink_block
from vitcompress.data import DataSpec, load_dataset
from vitcompress.models import load_model
from vitcompress.models.artifact import load_artifact, save_artifact
from vitcompress.models.layers import MASK_BUFFER, masked_linears
from vitcompress.passes.distill import DistillConfig, distill_model
from vitcompress.passes.sparsify.config import SparsifyConfig, parse_pattern
from vitcompress.passes.sparsify.engine import SparsifyError, global_sparsities, sparsify_model
from vitcompress.passes.sparsify.select import (
    holds_pattern,
    magnitude_mask,
    obs_prune,
    output_error,
    sparse_layers,
    zero_tiles,
)

SMALL = {"depth": 2, "patch_size": 8, "embed_dim": 64, "num_heads": 2}


def _small(seed: int = 0, source: str = "timm:vit_tiny_patch16_224"):
    torch.manual_seed(seed)
    return load_model(tiny_ref(source, kwargs=SMALL))


def _digits(loaded, limit=64, split="train"):
    return load_dataset(DataSpec(source="digits", split=split, limit=limit), loaded.input, loaded.num_classes)


def _layer_problem(seed: int = 0):
    """A 48x64 layer and the Hessian of correlated inputs (like real activations)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 64, generator=gen)
    x = torch.randn(1024, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    return weight, x.double().T @ x.double()


@pytest.mark.parametrize(
    ("text", "sparsity", "zeros"),
    [
        ("2:4", 0.5, 0.5),
        ("1:4", 0.75, 0.75),
        ("4:8", 0.5, 0.5),
        ("block:4x4", 0.5, 0.5),
        ("block:1x8", 0.25, 0.25),
    ],
)
def test_patterns_hold_exactly_and_obs_beats_magnitude_on_the_output(text, sparsity, zeros):
    weight, hessian = _layer_problem()
    pattern = parse_pattern(text)
    obs = obs_prune(weight, hessian, pattern, sparsity, damping=0.01, block_columns=32)
    magnitude = weight * magnitude_mask(weight, pattern, sparsity)
    for pruned, keep in ((obs.weight, obs.mask), (magnitude, magnitude != 0)):
        assert holds_pattern(pruned, pattern)
        assert float((~keep).float().mean()) == pytest.approx(zeros)
        assert zero_tiles(pruned, pattern) == pytest.approx(zeros)
        assert not pruned[~keep].any()
    # the OBS update makes the surviving weights compensate: clearly lower output error
    assert output_error(weight, obs.weight, hessian) < 0.85 * output_error(weight, magnitude, hessian)


def test_obs_on_isotropic_inputs_is_magnitude_pruning():
    """H = I: every weight's OBS error is w^2 and no update crosses columns: exactly magnitude."""
    weight, _ = _layer_problem(1)
    for text in ("2:4", "block:4x8"):
        pattern = parse_pattern(text)
        obs = obs_prune(
            weight, torch.eye(64, dtype=torch.float64), pattern, 0.5, damping=1e-9, block_columns=64
        )
        expected = weight * magnitude_mask(weight, pattern, 0.5)
        torch.testing.assert_close(obs.weight, expected, atol=1e-5, rtol=1e-5)


def test_pattern_grammar_and_config_rules():
    assert parse_pattern(" 2:4 ").text == "2:4" and parse_pattern("block:16x16").rows == 16
    for bad in ("4:2", "0:4", "2:128", "block:0x4", "block:16", "half"):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)
    assert SparsifyConfig(pattern="block:8x8").target_sparsity == 0.5
    assert SparsifyConfig(pattern="1:4").target_sparsity == 0.75
    assert not SparsifyConfig(method="magnitude").needs_data() and SparsifyConfig().needs_data()
    with pytest.raises(ValidationError, match="fixes the sparsity at 0.5"):
        SparsifyConfig(pattern="2:4", sparsity=0.3)
    with pytest.raises(ValidationError, match="allocation global needs a block pattern"):
        SparsifyConfig(allocation="global")
    with pytest.raises(ValidationError, match="n:m"):
        SparsifyConfig(pattern="2/4")


def test_global_allocation_meets_the_target_and_the_cap():
    scores = {
        "cheap": torch.full((10, 10), 0.1),
        "dear": torch.full((10, 10), 500.0),
        "mid": torch.arange(100.0).reshape(10, 10),
    }
    got = global_sparsities(scores, 16, target=0.5, cap=0.9)
    # cheap goes first up to the cap, then mid's lowest 60 (scores 0..59); dear keeps everything
    assert got == {"cheap": pytest.approx(0.9), "mid": pytest.approx(0.6), "dear": 0.0}
    ties = global_sparsities({"a": torch.ones(4, 5), "b": torch.ones(4, 5)}, 16, target=0.25, cap=0.9)
    assert ties == {"a": 0.5, "b": 0.0}  # ties at the threshold: filled in layer order, exactly the target
    with pytest.raises(SparsifyError, match="max_layer_sparsity"):
        global_sparsities(scores, 16, target=0.95, cap=0.9)


def test_obs_sparsify_holds_2_4_everywhere_and_keeps_the_logits_closer_than_magnitude():
    dense = _small()
    data = _digits(dense)
    x = torch.cat([b for b, _ in data.batches(32, limit_batches=2)])
    with torch.no_grad():
        reference = dense.model(x)
    errors = {}
    for method in ("magnitude", "obs"):
        loaded = _small()
        result = sparsify_model(
            loaded, SparsifyConfig(method=method, calibration_batches=2, batch_size=16), data
        )
        assert result.sparsity == 0.5 and len(result.layers) == 8  # qkv, proj, fc1, fc2 of 2 blocks
        assert result.encoded_bytes < 0.6 * result.dense_bytes
        layers = sparse_layers(loaded.model)
        assert [r.name for r in layers] == [r.name for r in result.layers]
        assert all(r.holds and r.pattern == "2:4" and r.sparsity == 0.5 for r in layers)
        with torch.no_grad():
            errors[method] = float((loaded.model(x) - reference).pow(2).mean() / reference.pow(2).mean())
    assert errors["obs"] < 0.7 * errors["magnitude"]


def test_global_block_sparsity_on_a_model_and_layers_that_do_not_fit():
    loaded = _small()
    cfg = SparsifyConfig(pattern="block:16x16", sparsity=0.5, allocation="global", method="magnitude")
    result = sparsify_model(loaded, cfg)
    assert result.sparsity == pytest.approx(0.5, abs=0.01)
    per_layer = [r.sparsity for r in result.layers]
    assert max(per_layer) <= 0.9 + 1e-6 and max(per_layer) - min(per_layer) > 0.05
    with pytest.raises(SparsifyError, match="no selected layer fits pattern block:5x5"):
        sparsify_model(_small(), SparsifyConfig(pattern="block:5x5", method="magnitude"))
    with pytest.raises(SparsifyError, match="sparse already"):
        sparsify_model(loaded, SparsifyConfig(method="magnitude"))
    with pytest.raises(SparsifyError, match="needs calibration data"):
        sparsify_model(_small(), SparsifyConfig())


def test_hf_family_sparsifies_q_k_v_and_masks_reload_after_pruning(hf_vit_dir, tmp_path):
    from vitcompress.models import ModelRef

    hf = load_model(ModelRef(f"hf:{hf_vit_dir}"))
    result = sparsify_model(hf, SparsifyConfig(method="magnitude"))
    assert len(result.layers) == 12 and {r.name.rsplit(".", 1)[-1] for r in result.layers} >= {
        "q_proj",
        "k_proj",
        "v_proj",
    }

    pruned = _small()
    shrink_block(pruned, 0, keep_heads=1, keep_hidden=128)  # a pruned model: the artifact resizes on load
    sparsify_model(pruned, SparsifyConfig(pattern="block:8x8", sparsity=0.5, method="magnitude"))
    save_artifact(pruned, tmp_path / "art")
    edits = json.loads((tmp_path / "art" / "model.json").read_text())["edits"]
    assert {e["kind"] for e in edits} == {"sparse"} and len(edits) == 8
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "art" / "model.safetensors"))
    assert not [k for k in stored if MASK_BUFFER in k]  # the mask is the weight's zeros
    back = load_artifact(tmp_path / "art")
    x = pruned.example_input(3)
    torch.testing.assert_close(back.model(x), pruned.model(x), atol=0, rtol=0)
    before, after = masked_linears(pruned.model), masked_linears(back.model)
    assert list(before) == list(after)
    assert all(torch.equal(getattr(before[n], MASK_BUFFER), getattr(after[n], MASK_BUFFER)) for n in before)
    assert all(r.pattern == "block:8x8" and r.holds for r in sparse_layers(back.model))


def test_distillation_keeps_the_mask_fixed(tmp_path):
    student = _small()
    sparsify_model(student, SparsifyConfig(method="magnitude"))
    masks = {n: getattr(lin, MASK_BUFFER).clone() for n, lin in masked_linears(student.model).items()}
    before = {n: lin.weight.detach().clone() for n, lin in masked_linears(student.model).items()}
    cfg = DistillConfig(steps=4, batch_size=16, lr=1e-3, hard_label=1.0, soft_kd=0.0, checkpoint_every=100)
    distill_model(student, None, cfg, _digits(student, limit=128), None, tmp_path, seed=0)
    for name, lin in masked_linears(student.model).items():
        weight = lin.weight.detach()
        assert torch.equal(getattr(lin, MASK_BUFFER), masks[name])
        assert not weight[~masks[name]].any()  # the zeros stayed zeros
        assert not torch.equal(weight[masks[name]], before[name][masks[name]])  # the rest trained
    assert all(r.holds for r in sparse_layers(student.model))


RECIPE = """\
version: 1
name: tiny-sparse
model:
  source: timm:vit_tiny_patch16_224
  img_size: 32
  num_classes: 10
  kwargs: {depth: 2, patch_size: 8, embed_dim: 64, num_heads: 2}
data:
  calibration: {source: digits, limit: 64}
passes:
  - kind: sparsify
    calibration_batches: 2
    batch_size: 16
  - kind: export
  - kind: quantize
    preset: gpu-tensorrt-int8
    verify_provider: false
    calibration_size: 16
"""


def test_export_keeps_the_zeros_exactly_and_int8_keeps_the_pattern(cli, tmp_path):
    import onnx
    from onnx import numpy_helper

    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    result = cli("compress", "--recipe", tmp_path / "r.yaml", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    sparse = load_artifact(out / "sparsify")
    weights = {n: lin.weight.detach().numpy().T for n, lin in masked_linears(sparse.model).items()}  # x @ W^T
    fp32 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    int8 = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.int8.onnx")).graph.initializer
    }
    assert not any("sparsity_mask" in name for name in fp32)  # the mask stays out of the graph
    matched = 0
    for weight in weights.values():
        name = next(n for n, a in fp32.items() if a.shape == weight.shape and np.array_equal(a, weight))
        matched += 1
        assert (fp32[name] == 0).sum() == weight.size // 2  # 2:4: exactly half, bit for bit
        q, zero_point = int8[f"{name}_quantized"], int8[f"{name}_zero_point"]
        assert zero_point.ndim == 0 or zero_point.shape == (q.shape[1],)  # per output channel
        zero = np.broadcast_to(zero_point.reshape(1, -1) if zero_point.ndim else zero_point, q.shape)
        assert np.array_equal(q[weight == 0], zero[weight == 0])  # a zero weight is the zero point
        groups = (q != zero).T.reshape(-1, 4)
        assert groups.sum(1).max() <= 2  # still 2:4 along the input, in int8
    assert matched == 8
    report = json.loads((out / "report.json").read_text())
    record = next(r for r in report["ledger"] if r["kind"] == "sparsify")
    assert (
        record["details"]["sparsity"] == 0.5
        and record["details"]["zeros"] == sum(w.size for w in weights.values()) // 2
    )


def test_sparsify_and_inspect_commands(cli, tmp_path):
    model = ["timm:vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10"]
    small = ["--model-kwargs", "depth=2", "--model-kwargs", "patch_size=8", "--model-kwargs", "embed_dim=64"]
    args = [*model, *small, "--num-heads", "2"]
    result = cli(
        "sparsify",
        *args,
        "--pattern",
        "block:1x8",
        "--sparsity",
        "0.75",
        "--method",
        "magnitude",
        "--out",
        tmp_path / "sp",
        "--json",
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)["ledger"][-1]
    assert record["kind"] == "sparsify" and record["details"]["sparsity"] == 0.75
    shown = cli("inspect", tmp_path / "sp", "--json")
    assert shown.exit_code == 0, shown.output
    rows = json.loads(shown.stdout)["sparse_layers"]
    assert len(rows) == 8 and all(
        r["pattern"] == "block:1x8" and r["sparsity"] == 0.75 and r["holds"] for r in rows
    )
    kd = cli(
        "distill",
        tmp_path / "sp",
        "--data",
        "digits",
        "--data-limit",
        "96",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--out",
        tmp_path / "kd",
        "--json",
    )
    assert kd.exit_code == 0, kd.output
    assert json.loads(kd.stdout)["ledger"][-1]["details"]["sparse_layers_kept"] == 8
    kept = json.loads(cli("inspect", tmp_path / "kd", "--json").stdout)["sparse_layers"]
    assert [r["sparsity"] for r in kept] == [0.75] * 8 and all(r["holds"] for r in kept)
    table = cli("inspect", tmp_path / "sp")
    assert "sparse layers: 8, 75.0% of their weights zero" in table.stdout
    for flags, message in [
        (["--pattern", "2:4"], "--method obs needs --data"),
        (["--pattern", "3:2", "--method", "magnitude"], "--pattern: pattern '3:2': n:m needs 0 < n < m"),
        (["--pattern", "2:4", "--sparsity", "0.3", "--method", "magnitude"], "fixes the sparsity at 0.5"),
        (["--method", "magnitude", "--layer", "blocks.*.mlp.fc9"], "matches no linear layer"),
    ]:
        failed = cli("sparsify", *args, *flags, "--out", tmp_path / "bad", "--overwrite")
        assert failed.exit_code == 2, (flags, failed.output)
        assert message in failed.output, (flags, failed.output)


def test_tensorrt_sparsity_is_asked_for_only_where_weights_hold_2_4(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vitcompress.runtime import holds_2_4_weights

    weight = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    sparse = weight * magnitude_mask(torch.from_numpy(weight), parse_pattern("2:4"), 0.5).numpy()
    for name, array, expected in [
        ("dense", weight, False),
        ("sparse", sparse, True),
        ("sparse_t", sparse.T.copy(), True),
    ]:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, array.shape[0]])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, array.shape[1]])],
            [numpy_helper.from_array(array, "w")],
        )
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(graph), str(path))
        assert holds_2_4_weights(path) is expected, name


def test_recipe_order_sparsify_before_export_and_after_structural_passes():
    from vitcompress.errors import RecipeError
    from vitcompress.recipe import parse_recipe

    head = "version: 1\nname: t\nmodel: {source: timm:vit_tiny_patch16_224}\npasses:\n"
    ok = parse_recipe(
        head
        + "  - {kind: prune, heads: 0.25}\n  - {kind: sparsify, method: magnitude}\n  - {kind: export}\n",
        "r.yaml",
    )
    assert [p.kind for p in ok.passes] == ["prune", "sparsify", "export"]
    with pytest.raises(
        Exception,
        match=r"passes\[1\] \(lowrank\) reshapes linear layers that passes\[0\] \(sparsify\) made sparse",
    ):
        parse_recipe(
            head + "  - {kind: sparsify, method: magnitude}\n  - {kind: lowrank, rank: 8}\n", "r.yaml"
        )
    with pytest.raises(RecipeError, match="changes the PyTorch model after"):
        parse_recipe(head + "  - {kind: export}\n  - {kind: sparsify, method: magnitude}\n", "r.yaml")
    with pytest.raises(RecipeError, match="needs data"):
        parse_recipe(head + "  - {kind: sparsify}\n  - {kind: export}\n", "r.yaml")


def test_a_factorized_model_sparsifies_both_thin_linears_and_reloads(tmp_path):
    from vitcompress.passes.lowrank import LowRankConfig, factorize_model

    loaded = _small()
    factorize_model(loaded, LowRankConfig(rank=16))  # every MLP fc1/fc2 -> first (16 x in), second (out x 16)
    result = sparsify_model(loaded, SparsifyConfig(method="magnitude"))
    names = [r.name for r in result.layers]
    assert "blocks.0.mlp.fc1.first" in names and "blocks.1.mlp.fc2.second" in names and len(names) == 12
    save_artifact(loaded, tmp_path / "art")
    kinds = [e["kind"] for e in json.loads((tmp_path / "art" / "model.json").read_text())["edits"]]
    assert kinds == ["lowrank"] * 4 + ["sparse"] * 12  # the factorized modules exist before their masks
    back = load_artifact(tmp_path / "art")
    x = loaded.example_input(2)
    torch.testing.assert_close(back.model(x), loaded.model(x), atol=0, rtol=0)
    assert [r.name for r in sparse_layers(back.model)] == names
