"""Token reduction (ToMe merging, EViT pruning): schedules, the merge arithmetic, exactness of
proportional attention, MAC accounting per block, static-shape export with ORT/OpenVINO parity,
quantization, artifact reload, distillation with merging on, CLI and bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import tiny_ref
from vitcompress.errors import UnsupportedModelError
from vitcompress.models import ModelRef, load_model
from vitcompress.models.artifact import save_artifact
from vitcompress.models.stats import count_macs, model_stats
from vitcompress.models.tokens import (
    TokenSchedule,
    apply_token_schedule,
    merge_tokens,
    prune_tokens,
    token_schedule_of,
)
from vitcompress.passes.tokens import TokensConfig, TokensError, plan_schedule
from vitcompress.passes.tokens.run import reduce_tokens

# 32x32 input, patch 4: 64 patch tokens, enough for several merges per block
MANY = {"depth": 2, "patch_size": 4}


def _tiny(source: str = "timm:vit_tiny_patch16_224", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return load_model(tiny_ref(source, kwargs={**MANY, **kwargs}))


# --------------------------------------------------------------------------- schedules


def test_schedules_deit_s_shapes():
    plan = plan_schedule(TokensConfig(r=13), 196, 1, 12)
    assert plan == [13] * 12 and 197 - sum(plan) == 41
    plan = plan_schedule(TokensConfig(final_tokens=50), 196, 1, 12)
    assert sum(plan) == 147 and max(plan) - min(plan) == 1 and plan[0] == 13  # remainder to early blocks
    plan = plan_schedule(TokensConfig(final_tokens=50, schedule="decreasing"), 196, 1, 12)
    assert sum(plan) == 147 and plan == sorted(plan, reverse=True) and plan[0] == 18 and plan[-1] == 6
    # ToMe's decreasing r: 1.5r down to 0.5r, truncated
    assert plan_schedule(TokensConfig(r=8, schedule="decreasing"), 196, 1, 12)[::11] == [12, 4]
    assert plan_schedule(TokensConfig(r=10, start_block=3), 196, 1, 6) == [0, 0, 0, 10, 10, 10]
    # constant r is capped where a block has fewer than 2r patch tokens left (merging halves at most)
    assert plan_schedule(TokensConfig(r=20), 49, 1, 4) == [20, 14, 7, 4]
    # prune may remove all but one patch token (two with fuse)
    assert plan_schedule(TokensConfig(final_tokens=2, method="prune"), 49, 1, 2) == [24, 24]
    assert plan_schedule(TokensConfig(final_tokens=3, method="prune", fuse=True), 49, 1, 1) == [47]
    # final_tokens past what an even spread can merge: removals move to earlier blocks
    assert plan_schedule(TokensConfig(final_tokens=18), 64, 2, 2) == [32, 16]
    assert plan_schedule(TokensConfig(final_tokens=20), 64, 2, 2) == [28, 18]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"final_tokens": 20, "start_block": 10},
            "final_tokens 20 cannot be reached: merge stops at 50 tokens",
        ),
        ({"final_tokens": 1}, "final_tokens 1 is out of range"),
        ({"final_tokens": 197}, "final_tokens 197 is out of range"),
        ({"r": [1, 2]}, "r has 2 entries but the model has 12 blocks"),
        ({"r": [99] + [0] * 11}, r"block 0: r=99 but only 98 of its 196 patch tokens can be merged"),
        ({"r": 4, "start_block": 12}, "start_block 12 is past the last block"),
    ],
)
def test_impossible_schedules_name_the_fix(settings, message):
    with pytest.raises(TokensError, match=message):
        plan_schedule(TokensConfig(**settings), 196, 1, 12)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "exactly one of r and final_tokens"),
        ({"r": 4, "final_tokens": 50}, "exactly one of r and final_tokens"),
        ({"r": 0}, "r: 0 removes nothing"),
        ({"r": [1, -1]}, "token counts must be >= 0"),
        ({"r": 4, "fuse": True}, "fuse applies to method: prune"),
        ({"r": [4, 4], "schedule": "decreasing"}, "a list of r is the schedule itself"),
        ({"r": 4, "method": "drop"}, "Input should be 'merge' or 'prune'"),
    ],
)
def test_config_rejects_bad_settings(settings, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        TokensConfig(**settings)


# --------------------------------------------------------------------------- arithmetic


def test_merge_keeps_prefix_and_size_weighted_sums():
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 20, 8)
    size = torch.randint(1, 4, (3, 21, 1)).float()
    metric = torch.randn(3, 21, 5)
    merged, merged_size = merge_tokens(x, size, metric, r=6, prefix=1)
    assert merged.shape == (3, 15, 8) and merged_size.shape == (3, 15, 1)
    torch.testing.assert_close(merged[:, 0], x[:, 0])  # the class token is never merged
    # merging moves mass, never creates or loses it: sum(size) and sum(size * x) are unchanged
    torch.testing.assert_close(merged_size.sum(1), size.sum(1))
    torch.testing.assert_close((merged * merged_size).sum(1), (x * size).sum(1), atol=1e-5, rtol=1e-5)
    assert int((merged_size[:, 1:] > size[:, 1:].amax()).sum()) <= 3 * 6


def test_matching_metric_is_the_head_mean_of_the_keys():
    """The metric comes from the flat keys through one constant matmul; it must equal ToMe's k.mean
    over heads (and fall back to that mean when a k_norm makes the flat keys differ)."""
    from vitcompress.models.tokens import _timm_attention

    attn = _tiny().model.blocks[0].attn
    x = torch.randn(2, 17, attn.qkv.in_features)
    qkv = attn.qkv(x).reshape(2, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    _, metric, _ = _timm_attention(attn, x, None, True, False, 1)
    torch.testing.assert_close(metric, qkv[1].mean(dim=1), atol=1e-6, rtol=1e-5)
    attn.k_norm = torch.nn.LayerNorm(attn.head_dim)
    _, normed, _ = _timm_attention(attn, x, None, True, False, 1)
    torch.testing.assert_close(normed, attn.k_norm(qkv[1]).mean(dim=1))


def test_merge_pairs_the_most_similar_tokens():
    # patch tokens 0/1 and 2/3 are identical pairs (A = even, B = odd positions): r=2 merges exactly them
    x = torch.tensor([[[9.0], [1.0], [1.0], [5.0], [5.0], [3.0], [-4.0]]])
    metric = torch.tensor([[[0.0, 1.0], [1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [-1, 1]]])
    merged, size = merge_tokens(x, torch.ones(1, 7, 1), metric, r=2, prefix=1)
    assert sorted(merged[0, 1:, 0].tolist()) == [-4.0, 1.0, 3.0, 5.0]
    assert sorted(size[0, :, 0].tolist()) == [1, 1, 1, 2, 2]


def test_prune_keeps_the_most_attended_and_fuses_the_rest():
    x = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    score = torch.tensor([[0.1, 0.5, 0.2, 0.15, 0.05], [0.3, 0.12, 0.4, 0.1, 0.08]])
    kept, _ = prune_tokens(x, torch.ones(2, 6, 1), score, r=2, prefix=1, fuse=False)
    assert kept.shape == (2, 4, 2)
    torch.testing.assert_close(kept[0, 1:], x[0, 1:][[1, 2, 3]])
    torch.testing.assert_close(kept[1, 1:], x[1, 1:][[2, 0, 1]])
    fused, fsize = prune_tokens(x, torch.ones(2, 6, 1), score, r=2, prefix=1, fuse=True)
    assert fused.shape == (2, 4, 2) and fsize[0, :, 0].tolist() == [1, 1, 1, 3]
    dropped = x[0, 1:][[3, 0, 4]]
    weights = torch.tensor([0.15, 0.1, 0.05])[:, None]
    torch.testing.assert_close(fused[0, -1], (dropped * weights).sum(0) / weights.sum())


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_merging_identical_tokens_changes_nothing(pool):
    """Proportional attention and size-weighted averages make a merge of identical tokens exact."""
    loaded = _tiny(global_pool=pool, class_token=pool == "token")
    with torch.no_grad():
        loaded.model.pos_embed.zero_()  # a flat image then gives 64 identical patch tokens
    x = torch.full((2, 3, 32, 32), 0.3)
    x[1] = -0.7
    expected = loaded.model(x)
    without = copy.deepcopy(loaded.model)
    apply_token_schedule(loaded.model, TokenSchedule("merge", (20, 20)))
    torch.testing.assert_close(loaded.model(x), expected, atol=1e-5, rtol=1e-5)
    apply_token_schedule(without, TokenSchedule("merge", (20, 20), proportional_attention=False))
    if pool == "token":  # the class token sees the merged tokens: without it, they weigh as one
        assert (without(x) - expected).abs().max() > 1e-3


def test_zero_schedule_is_the_original_and_prefix_tokens_survive():
    loaded = _tiny("timm:deit_tiny_distilled_patch16_224")
    x = loaded.example_input(3)
    expected = loaded.model(x)
    model = copy.deepcopy(loaded.model)
    apply_token_schedule(model, TokenSchedule("merge", (0, 0)))
    assert torch.equal(model(x), expected)
    for method in ("merge", "prune"):
        model = copy.deepcopy(loaded.model)
        apply_token_schedule(model, TokenSchedule(method, (16, 16)))  # type: ignore[arg-type]
        features = model.forward_features(x)
        assert features.shape == (3, 2 + 64 - 32, 192)
        assert model(x).shape == (3, 10)


# --------------------------------------------------------------------------- MACs


def test_macs_follow_the_tokens_of_every_block():
    loaded = _tiny()
    d, hidden = 192, 768
    cfg = TokensConfig(r=[24, 16])
    details = reduce_tokens(loaded, cfg)
    assert details["tokens"] == [
        {"block": 0, "attention": 65, "mlp": 41},
        {"block": 1, "attention": 41, "mlp": 25},
    ]
    _, per_module = count_macs(loaded)
    for block, (n_attn, n_mlp) in enumerate([(65, 41), (41, 25)]):
        assert per_module[f"blocks.{block}.attn.qkv"] == n_attn * d * 3 * d
        assert per_module[f"blocks.{block}.attn.proj"] == n_attn * d * d
        assert per_module[f"blocks.{block}.mlp.fc1"] == n_mlp * d * hidden
        assert per_module[f"blocks.{block}.mlp.fc2"] == n_mlp * hidden * d
    stats = model_stats(loaded)
    assert [(b.tokens, b.mlp_tokens) for b in stats.blocks] == [(65, 41), (41, 25)]
    assert stats.macs == details["macs_after"] and 0.5 < details["macs_ratio"] < 0.7
    with pytest.raises(TokensError, match="already reduces tokens"):
        reduce_tokens(loaded, cfg)


@pytest.mark.parametrize("fixture", ["hf_vit_dir", "hf_deit_dir"])
def test_hugging_face_vit_and_deit_merge_and_export(request, tmp_path, fixture):
    from vitcompress.passes.export import ExportConfig, export_model

    loaded = load_model(ModelRef(f"hf:{request.getfixturevalue(fixture)}"))
    prefix = loaded.adapter.num_prefix_tokens
    x = loaded.example_input(2)
    expected = loaded.model(x)
    zero = copy.deepcopy(loaded.model)
    apply_token_schedule(zero, TokenSchedule("merge", (0, 0)))
    torch.testing.assert_close(zero(x), expected, atol=1e-5, rtol=1e-5)  # same arithmetic, no merge
    details = reduce_tokens(loaded, TokensConfig(r=[6, 4]))
    assert details["tokens"][1] == {"block": 1, "attention": 16 + prefix - 6, "mlp": 16 + prefix - 10}
    _, per_module = count_macs(loaded)
    fc1 = next(name for name in per_module if name.endswith("layers.1.mlp.fc1"))
    assert per_module[fc1] == (16 + prefix - 10) * 64 * 128
    result = export_model(loaded, tmp_path / "m.onnx", ExportConfig())
    assert result.parity.max_abs_diff < 1e-4 and result.op_counts["TopK"] == 2
    # the merge is a selection matmul: no scatter, one small index gather per block (the B partners)
    assert "ScatterElements" not in result.op_counts and result.op_counts["GatherElements"] == 2
    directory = save_artifact(loaded, tmp_path / "a")
    torch.testing.assert_close(load_model(ModelRef(str(directory))).model(x), loaded.model(x), atol=0, rtol=0)


def test_unsupported_blocks_are_refused_clearly():
    loaded = _tiny()
    loaded.model.global_pool = "avgmax"  # an unweighted max would not see merged sizes
    with pytest.raises(UnsupportedModelError, match="pooling 'avgmax' is not supported"):
        apply_token_schedule(loaded.model, TokenSchedule("merge", (1, 1)))
    assert token_schedule_of(loaded.model) is None


# --------------------------------------------------------------------------- export, runtimes, quantize


def _token_axes(path, width: int) -> tuple[set[int | str], bool]:
    """Token dims of every (batch, tokens, width) tensor the blocks compute (shape inference), and
    whether every TopK's k is a constant of the graph (not computed from the input's shape)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), data_prop=True)
    producer = {o: n for n in model.graph.node for o in n.output}
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    tokens: set[int | str] = set()
    for value in model.graph.value_info:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        if producer[value.name].name.startswith("/blocks.") and len(dims) == 3 and dims[2] == width:
            tokens.add(dims[1])
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    return tokens, bool(topk) and all(n.input[1] in constants for n in topk)


@pytest.mark.parametrize(("method", "fuse"), [("merge", False), ("prune", True)])
def test_export_has_static_token_counts_and_matches_ort_and_openvino(tmp_path, method, fuse):
    from vitcompress.passes.export import ExportConfig, export_model
    from vitcompress.runtime import OnnxRunner

    loaded = _tiny("timm:deit_tiny_distilled_patch16_224")
    reduce_tokens(loaded, TokensConfig(method=method, r=[28, 18], fuse=fuse))
    result = export_model(loaded, tmp_path / "m.onnx", ExportConfig())
    assert result.parity.max_abs_diff < 1e-4 and result.parity.top1_agreement == 1.0
    assert result.op_counts["TopK"] == 2  # one ordering per block
    assert "ScatterElements" not in result.op_counts  # selection matmuls, not gather/scatter
    assert result.op_counts.get("GatherElements", 0) == (2 if method == "merge" else 0)
    assert len(onnx.load(result.path).graph.node) < 600  # ~50 nodes of matching per block, not ~200
    tokens, constant_k = _token_axes(result.path, 192)
    assert {66, 20} <= tokens and all(isinstance(t, int) for t in tokens)  # known token counts only
    assert constant_k
    # OpenVINO reads and runs the same file
    import openvino as ov

    x = loaded.example_input(2, seed=5).numpy()
    compiled = ov.Core().compile_model(
        ov.Core().read_model(str(result.path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    got = compiled(x)[0]
    ort = OnnxRunner(result.path).run(x)
    np.testing.assert_allclose(got, ort, atol=1e-3, rtol=1e-3)


def test_static_int8_quantizes_the_linears_and_keeps_matching_in_float(tmp_path):
    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.passes.export import ExportConfig, export_model
    from vitcompress.passes.quantize import QuantizeConfig, op_counts, quantize_model
    from vitcompress.runtime import OnnxRunner

    loaded = _tiny()
    reduce_tokens(loaded, TokensConfig(r=[32, 16]))
    exported = export_model(loaded, tmp_path / "m.onnx", ExportConfig()).path
    data = load_dataset(DataSpec(source="digits", limit=64), loaded.input, loaded.num_classes)
    info = quantize_model(exported, tmp_path / "m.int8.onnx", QuantizeConfig(calibration_size=32), data)
    counts = op_counts(tmp_path / "m.int8.onnx")
    assert counts["QuantizeLinear"] > 0 and counts["TopK"] == 2
    graph = onnx.load(tmp_path / "m.int8.onnx").graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    float_matmuls = [
        n
        for n in graph.node
        if n.op_type == "MatMul" and all(producer.get(i) != "DequantizeLinear" for i in n.input)
    ]
    # matching scores and the merge's selection matmuls (plus attention) stay in float
    assert len(float_matmuls) >= 2 * 3
    assert info  # the pass reports what it did
    x = loaded.example_input(4, seed=1).numpy()
    float_logits = OnnxRunner(exported).run(x)
    int8_logits = OnnxRunner(tmp_path / "m.int8.onnx").run(x)
    assert np.abs(int8_logits - float_logits).max() < 0.25 * np.abs(float_logits).max()


# --------------------------------------------------------------------------- artifact, pipeline, CLI


def test_artifact_rebuilds_the_schedule(tmp_path):
    loaded = _tiny("timm:deit_tiny_distilled_patch16_224")
    reduce_tokens(loaded, TokensConfig(method="prune", r=[10, 20], fuse=True))
    x = loaded.example_input(2)
    expected = loaded.model(x)
    directory = save_artifact(loaded, tmp_path / "a")
    edits = json.loads((directory / "model.json").read_text())["edits"]
    assert edits == [
        {
            "kind": "tokens",
            "module": "",
            "method": "prune",
            "proportional_attention": True,
            "fuse": True,
            "r": [10, 20],
        }
    ]
    reloaded = load_model(ModelRef(str(directory)))  # rebuilt from the manifest: base model + edits
    assert token_schedule_of(reloaded.model) == TokenSchedule("prune", (10, 20), True, True)
    assert torch.equal(reloaded.model(x), expected)


def test_recipe_prune_then_tokens_then_distill_then_export(tmp_path):
    """The chain the pass is meant for: structured pruning, merging, a KD step with merging on, export."""
    from vitcompress.pipeline import run_recipe
    from vitcompress.recipe import Recipe

    recipe = Recipe.model_validate(
        {
            "version": 1,
            "model": {
                "source": "timm:vit_tiny_patch16_224",
                "img_size": 32,
                "num_classes": 10,
                "kwargs": MANY,
            },
            "data": {
                "train": {"source": "digits", "split": "train", "limit": 64},
            },
            "passes": [
                {"kind": "prune", "target_macs": 0.7, "structures": ["mlp"]},
                {"kind": "tokens", "final_tokens": 25},
                {"kind": "distill", "steps": 2, "batch_size": 16, "eval_every": 2, "eval_limit": 16},
                {"kind": "export"},
            ],
        }
    )
    result = run_recipe(recipe, tmp_path / "run")
    records = {r.kind: r for r in result.ledger}
    assert records["tokens"].details["final_tokens"] == 25
    assert records["distill"].macs == records["tokens"].macs  # trained with the schedule on
    reloaded = load_model(ModelRef(records["distill"].artifact))
    assert sum(token_schedule_of(reloaded.model).r) == 65 - 25
    assert records["export"].parity.max_abs_diff < 1e-4


def test_tokens_after_export_is_refused():
    from pydantic import ValidationError

    from vitcompress.recipe import Recipe

    with pytest.raises(ValidationError, match="changes the PyTorch model after passes\\[0\\] \\(export\\)"):
        Recipe.model_validate(
            {
                "version": 1,
                "model": {"source": "timm:vit_tiny_patch16_224"},
                "passes": [{"kind": "export"}, {"kind": "tokens", "r": 4}],
            }
        )


def test_cli_tokens_json_and_inspect(cli, tmp_path):
    args = [
        "--img-size",
        "32",
        "--num-classes",
        "10",
        "--model-kwargs",
        "depth=2",
        "--model-kwargs",
        "patch_size=4",
    ]
    result = cli(
        "tokens", "timm:vit_tiny_patch16_224", "--out", tmp_path / "t", "--r", "16,8", *args, "--json"
    )
    assert result.exit_code == 0, result.output
    ledger = json.loads(result.stdout)["ledger"]
    details = next(r for r in ledger if r["kind"] == "tokens")["details"]
    assert details["r"] == [16, 8] and details["final_tokens"] == 41
    shown = cli("inspect", tmp_path / "t" / "tokens")
    assert shown.exit_code == 0 and "65->49" in shown.stdout and "49->41" in shown.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--r", "4", "--final-tokens", "9"], "set exactly one of r and final_tokens"),
        (["--r", "40,0"], "block 0: r=40 but only 32 of its 64 patch tokens can be merged"),
        (["--r", "x"], "--r: 'x' is not a count"),
        (["--r", "4", "--fuse"], "fuse applies to method: prune"),
        (["--r", "4", "--data", "digits"], "--data scores the exported model: give --bench too"),
    ],
)
def test_cli_bad_input_exits_2(cli, tmp_path, flags, message):
    args = ["--img-size", "32", "--model-kwargs", "depth=2", "--model-kwargs", "patch_size=4"]
    result = cli("tokens", "timm:vit_tiny_patch16_224", "--out", tmp_path / "t", *args, *flags)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())


def test_feature_kd_with_merged_tokens_is_refused_clearly(tmp_path):
    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.passes.distill import DistillConfig, DistillError, distill_model

    teacher = _tiny()
    student = copy.deepcopy(teacher)
    reduce_tokens(student, TokensConfig(r=8))
    data = load_dataset(DataSpec(source="digits", limit=32), student.input, student.num_classes)
    with pytest.raises(DistillError, match="feature KD compares block outputs token by token"):
        distill_model(
            student, teacher, DistillConfig(steps=1, feature=1.0, soft_kd=0.5), data, None, tmp_path
        )


def test_pruning_or_mac_budgets_after_tokens_are_refused_clearly():
    from vitcompress.passes.lowrank import LowRankConfig, LowRankError, factorize_model
    from vitcompress.passes.prune import PruneConfig, PruneError, prune_model

    loaded = _tiny()
    reduce_tokens(loaded, TokensConfig(r=8))
    with pytest.raises(
        PruneError, match="reduces its tokens \\(a tokens pass\\): prune before the tokens pass"
    ):
        prune_model(loaded, PruneConfig(target_macs=0.5))
    with pytest.raises(LowRankError, match="factorize before the tokens pass"):
        factorize_model(loaded, LowRankConfig(target_macs=0.8))
