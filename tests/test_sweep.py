"""Recipe overrides (--set), `vitcompress sweep` and the Pareto frontier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitcompress.errors import RecipeError
from vitcompress.plot import pareto_front
from vitcompress.recipe import apply_overrides, parse_assignment, set_path
from vitcompress.sweep import expand

# --------------------------------------------------------------------------- frontier


def test_pareto_front_on_a_synthetic_table():
    # (latency ms, top-1): A fast+bad, B dominated by C, C, D slow+best, E dominated by D, F tie of C
    table = {
        "A": (1.0, 0.70),
        "B": (3.0, 0.80),
        "C": (2.0, 0.85),
        "D": (5.0, 0.90),
        "E": (6.0, 0.90),
        "F": (2.0, 0.85),
        "G": (1.0, 0.60),
    }
    front = dict(zip(table, pareto_front(list(table.values())), strict=True))
    assert front == {"A": True, "B": False, "C": True, "D": True, "E": False, "F": True, "G": False}


def test_pareto_front_edge_cases():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5)]) == [True]
    # strictly better on both axes dominates
    assert pareto_front([(2.0, 0.5), (1.0, 0.6)]) == [False, True]


# --------------------------------------------------------------------------- overrides

RAW = {
    "version": 1,
    "model": {"source": "timm:x"},
    "passes": [{"kind": "prune", "mlp": 0.5}, {"kind": "distill", "name": "kd"}, {"kind": "export"}],
}


def test_set_path_by_index_name_and_kind():
    out = apply_overrides(
        RAW,
        {
            "passes.0.mlp": 0.25,
            "passes.kd.steps": 10,
            "passes.export.opset": 18,
            "data.eval.limit": 100,
            "passes.-1.dynamic_batch": False,
        },
    )
    assert out["passes"][0]["mlp"] == 0.25
    assert out["passes"][1]["steps"] == 10
    assert out["passes"][2] == {"kind": "export", "opset": 18, "dynamic_batch": False}
    assert out["data"] == {"eval": {"limit": 100}}
    assert RAW["passes"][0]["mlp"] == 0.5 and "data" not in RAW  # the original is untouched


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("passes.7.mlp", "passes.7: index 7 is out of range (the list has 3 items)"),
        ("passes.quantize.mode", "passes.quantize: no step 'quantize'; steps are 0: prune, 1: kd, 2: export"),
        ("model.source.x", "model.source.x: model.source is a value ('timm:x'), not a section"),
    ],
)
def test_set_path_errors_name_the_path(path, message):
    with pytest.raises(RecipeError) as err:
        set_path(json.loads(json.dumps(RAW)), path, 1)
    assert err.value.message == message


def test_set_path_ambiguous_kind_asks_for_a_name():
    raw = {"passes": [{"kind": "distill"}, {"kind": "distill"}]}
    with pytest.raises(RecipeError, match="2 steps are 'distill'; name them or use the index"):
        set_path(raw, "passes.distill.steps", 5)


@pytest.mark.parametrize(
    "path",
    [
        "passes.1.steps",
        "passes[1].steps",
        "passes[1] (distill).steps",  # as validation errors print a step
        "passes[1] (kd).steps",
        "passes.kd.steps",  # by name, as `steps are 0: prune, 1: kd, ...` and pass-order errors print it
        "passes.distill.steps",  # by kind, when one step has it
        "passes.-2.steps",
    ],
)
def test_set_path_takes_every_form_the_errors_print(path):
    out = apply_overrides(RAW, {path: 9})
    assert out["passes"][1] == {"kind": "distill", "name": "kd", "steps": 9}


def test_set_path_on_the_label_a_real_validation_error_prints():
    import re

    from vitcompress.recipe import validate_recipe

    raw = {
        "version": 1,
        "model": {"source": "timm:vit_tiny_patch16_224"},
        "passes": [{"kind": "export"}, {"kind": "validate", "batch_sizes": [1, 0]}],
    }
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw, None, "r.yaml")
    label = re.search(r"r\.yaml: (\S+ \(\w+\)\S*): ", err.value.message).group(1)
    assert label == "passes[1] (validate).batch_sizes[1]"
    fixed = validate_recipe(apply_overrides(raw, {label: 8}), None, "r.yaml")
    assert fixed.passes[1].batch_sizes == [1, 8]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("passes[1] (prune).steps", "passes[1] (prune): item 1 is 'kd' (distill), not 'prune'"),
        ("passes[0]x", "'passes[0]x' is not a recipe path"),
        ("passes..steps", "'passes..steps' is not a recipe path"),
        ("model (prune).source", "model (prune): (prune) names a step of a list, and 'model' is a key"),
    ],
)
def test_set_path_refuses_a_step_that_is_not_the_one_named(path, message):
    with pytest.raises(RecipeError) as err:
        apply_overrides(RAW, {path: 1})
    assert err.value.message == message


def test_plot_labels_every_point_with_its_settings_and_draws_the_frontier():
    import matplotlib.pyplot as plt

    from vitcompress.plot import ParetoPoint, pareto_figure
    from vitcompress.sweep import Variant, point_labels

    variants = [
        Variant(i, {"passes.prune.target_macs": macs}, None, None)  # type: ignore[arg-type]
        for i, macs in enumerate([0.25, 0.5, 0.75])
    ]
    labels = point_labels(variants)
    assert labels == {0: "target_macs=0.25", 1: "target_macs=0.5", 2: "target_macs=0.75"}
    two = [Variant(0, {"passes.prune.steps": 1, "passes.kd.steps": 5}, None, None)]  # type: ignore[arg-type]
    assert point_labels(two) == {0: "prune.steps=1, kd.steps=5"}

    points = [ParetoPoint("fp32 baseline", 10.0, 0.90, baseline=True)]
    points += [
        ParetoPoint(labels[i], ms, top1) for i, (ms, top1) in enumerate([(4, 0.80), (6, 0.85), (7, 0.84)])
    ]
    fig, front = pareto_figure(points, "t")
    try:
        (ax,) = fig.axes
        assert [t.get_text() for t in ax.texts] == [p.label for p in points]
        assert front == [True, True, True, False]
        (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto frontier"]
        xs = list(line.get_xdata())
        assert xs[0] == 4 and xs[-1] == 10 and 7 not in xs  # through the frontier, fastest first
    finally:
        plt.close(fig)


def test_parse_assignment_reads_yaml_values():
    assert parse_assignment("a.b=0.5") == ("a.b", 0.5)
    assert parse_assignment("a=[heads, mlp]") == ("a", ["heads", "mlp"])
    assert parse_assignment("a=null") == ("a", None)
    assert parse_assignment("a=0.25,0.5", many=True) == ("a", [0.25, 0.5])
    assert parse_assignment("a=[heads],[heads, mlp]", many=True) == ("a", [["heads"], ["heads", "mlp"]])
    with pytest.raises(RecipeError, match="is not PATH=VALUE"):
        parse_assignment("passes.0.mlp")


def test_expand_is_the_cartesian_product_in_order():
    grid = expand({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(grid) == 6
    assert grid[0] == {"a": 1, "b": "x"} and grid[1] == {"a": 1, "b": "y"} and grid[-1] == {"a": 2, "b": "z"}


# --------------------------------------------------------------------------- CLI

TINY_RECIPE = """\
version: 1
name: tiny-sweep
model:
  source: timm:vit_tiny_patch16_224
  num_classes: 10
  img_size: 16
  kwargs: {depth: 2, patch_size: 4, embed_dim: 64, num_heads: 2}
data:
  eval: {source: digits, split: test, limit: 100}
  calibration: {source: digits, split: train, limit: 64}
passes:
  - kind: prune
    mlp: 0.5
    importance: l2
  - kind: export
  - kind: validate
    runs: 5
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


def test_compress_set_overrides_the_recipe(cli, tmp_path, tiny_recipe):
    out = tmp_path / "out"
    result = cli(
        "compress", "--recipe", tiny_recipe, "--out", out, "--set", "passes.prune.mlp=0.75",
        "--set", "passes[2] (validate).runs=6", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    resolved = (out / "recipe.resolved.yaml").read_text()
    assert "mlp: 0.75" in resolved and "runs: 6" in resolved
    ledger = json.loads(result.stdout)["ledger"]
    prune = next(r for r in ledger if r["kind"] == "prune")
    assert [b["mlp_hidden"] for b in prune["details"]["blocks"]] == [64, 64]  # 256 -> 64 per block
    # the compress report embeds its accuracy-vs-latency plot
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](pareto.png)" in (out / "report.md").read_text()


def test_compress_set_with_a_bad_path_or_value_fails_fast(cli, tmp_path, tiny_recipe):
    bad_step = cli(
        "compress", "--recipe", tiny_recipe, "--out", tmp_path / "o", "--set", "passes.lowrank.rank=4"
    )
    assert bad_step.exit_code == 2
    assert "no step 'lowrank'; steps are 0: prune, 1: export, 2: validate" in bad_step.stderr
    bad_value = cli(
        "compress", "--recipe", tiny_recipe, "--out", tmp_path / "o", "--set", "passes.prune.mlp=2"
    )
    assert bad_value.exit_code == 2
    assert "passes[0] (prune).mlp: Input should be less than 1" in bad_value.stderr
    assert not (tmp_path / "o").exists()


def test_sweep_runs_variants_measures_them_together_and_marks_the_frontier(
    cli, tmp_path, tiny_recipe, monkeypatch
):
    import vitcompress.sweep as sweep_module

    plotted = []
    real_plot = sweep_module.plot_pareto

    def spy(points, path, title):
        plotted.append([p.label for p in points])
        return real_plot(points, path, title)

    monkeypatch.setattr(sweep_module, "plot_pareto", spy)
    out = tmp_path / "sweep"
    result = cli(
        "sweep", "--recipe", tiny_recipe, "--out", out, "--vary", "passes.prune.mlp=0.25,0.75",
        "--vary", "passes.prune.importance=l1,l2", "--runs", "5", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    variants = data["variants"]
    assert [v["overrides"] for v in variants] == [
        {"passes.prune.mlp": 0.25, "passes.prune.importance": "l1"},
        {"passes.prune.mlp": 0.25, "passes.prune.importance": "l2"},
        {"passes.prune.mlp": 0.75, "passes.prune.importance": "l1"},
        {"passes.prune.mlp": 0.75, "passes.prune.importance": "l2"},
    ]
    assert all(v["status"] == "ok" and v["p50_ms"] > 0 and 0 <= v["top1"] <= 1 for v in variants)
    # more pruning, fewer MACs; every variant is measured in the one interleaved run with the baseline
    assert variants[2]["macs"] < variants[0]["macs"]
    models = [r["model"] for r in data["bench"]["results"]]
    assert models[0] == data["baseline"]["onnx"] and len(models) == 5
    # the frontier flags are the Pareto front of the measured points
    points = [(data["baseline"]["p50_ms"], data["baseline"]["top1"])]
    points += [(v["p50_ms"], v["top1"]) for v in variants]
    assert [data["baseline"]["frontier"]] + [v["frontier"] for v in variants] == pareto_front(points)
    assert any(v["frontier"] for v in variants) or data["baseline"]["frontier"]
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "sweep.md").read_text()
    assert table.count("\n| v0") == 4 and "![accuracy vs latency](pareto.png)" in table
    # each point of the plot is labelled with its settings, by their shortest distinct keys
    assert plotted == [
        [
            "fp32 baseline",
            "mlp=0.25, importance=l1",
            "mlp=0.25, importance=l2",
            "mlp=0.75, importance=l1",
            "mlp=0.75, importance=l2",
        ]
    ]


def test_sweep_reports_a_failed_variant_and_goes_on(cli, tmp_path, tiny_recipe):
    out = tmp_path / "sweep"
    result = cli(
        "sweep", "--recipe", tiny_recipe, "--out", out, "-g", "passes.prune.target_macs=0.6,0.01",
        "--set", "passes.prune.mlp=0", "--runs", "5", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ok, failed = json.loads(result.stdout)["variants"]
    assert ok["status"] == "ok" and ok["p50_ms"] > 0
    assert failed["status"] == "error" and failed["p50_ms"] is None and "0.01" in failed["message"]


def test_sweep_uses_the_recipe_sweep_section(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE + "sweep:\n  vary:\n    passes.prune.mlp: [0.5]\n  runs: 5\n")
    result = cli("sweep", "--recipe", recipe, "--out", tmp_path / "s", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["variants"]) == 1 and data["bench"]["settings"]["runs"] == 5


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace("  - kind: export\n  - kind: validate\n    runs: 5\n", ""),
            "the recipe has no export pass",
        ),
        (
            lambda t: t.replace("  eval: {source: digits, split: test, limit: 100}\n", ""),
            "the recipe has no data.eval",
        ),
    ],
)
def test_sweep_refuses_a_recipe_it_cannot_measure(cli, tmp_path, edit, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(edit(TINY_RECIPE))
    result = cli("sweep", "--recipe", recipe, "--out", tmp_path / "s", "--vary", "passes.prune.mlp=0.5")
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "s").exists()


def test_sweep_without_a_grid_or_with_a_bad_value_fails_before_running(cli, tmp_path, tiny_recipe):
    nothing = cli("sweep", "--recipe", tiny_recipe, "--out", tmp_path / "s")
    assert nothing.exit_code == 2 and "nothing to sweep" in nothing.stderr
    bad = cli("sweep", "--recipe", tiny_recipe, "--out", tmp_path / "s", "--vary", "passes.prune.mlp=0.5,1.5")
    assert bad.exit_code == 2 and "variant passes.prune.mlp=1.5" in bad.stderr and "less than 1" in bad.stderr
    assert not (tmp_path / "s").exists()


def test_a_bad_sweep_section_is_named_with_its_line(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE + "sweep:\n  vary:\n    passes.prune.mlp: []\n  runs: 2\n")
    result = cli("sweep", "--recipe", recipe, "--out", tmp_path / "s")
    assert result.exit_code == 2
    assert "r.yaml:19: sweep.vary: passes.prune.mlp: give at least one value to try" in result.stderr
    assert "r.yaml:21: sweep.runs: Input should be greater than or equal to 5 (got 2)" in result.stderr
    assert not (tmp_path / "s").exists()


def test_sweep_without_a_validate_pass_measures_baseline_and_variants_itself(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.replace("  - kind: validate\n    runs: 5\n", ""))
    out = tmp_path / "s"
    result = cli(
        "sweep", "--recipe", recipe, "--out", out, "--vary", "passes.prune.mlp=0.5", "--runs", "5", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["baseline"]["onnx"] == str(out / "baseline.onnx")  # exported from the model as loaded
    (variant,) = data["variants"]
    # top-1 from an ONNX Runtime evaluation on data.eval (100 digits images): a whole number of hits
    assert 0.0 <= variant["top1"] <= 1.0 and round(variant["top1"] * 100, 6).is_integer()
    assert 0.0 <= data["baseline"]["top1"] <= 1.0 and variant["p50_ms"] > 0


SHARED_PRETRAIN = """\
version: 1
name: shared-pretrain
model:
  source: timm:vit_tiny_patch16_224
  num_classes: 10
  img_size: 16
  kwargs: {depth: 1, patch_size: 4, embed_dim: 48, num_heads: 3}
data:
  train: {source: digits, split: train, limit: 300}
  eval: {source: digits, split: test, limit: 100}
passes:
  - kind: distill
    name: pretrain
    become_teacher: true
    steps: 20
    batch_size: 32
    hard_label: 1.0
    soft_kd: 0.0
  - kind: prune
    mlp: 0.25
  - kind: export
"""


def test_sweep_runs_identical_leading_passes_once(cli, tmp_path, monkeypatch):
    import vitcompress.passes.distill.run as distill  # where the pass calls distill_model

    recipe = tmp_path / "r.yaml"
    recipe.write_text(SHARED_PRETRAIN)
    trained = []
    real_distill = distill.distill_model

    def counting(*args, **kwargs):
        trained.append(1)
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(distill, "distill_model", counting)
    out = tmp_path / "sweep"
    result = cli(
        "sweep",
        "--recipe",
        recipe,
        "--out",
        out,
        "--vary",
        "passes.prune.mlp=0.25,0.5",
        "--runs",
        "5",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert len(trained) == 1  # the pretrain step ran for the first variant only
    first, second = (Path(v["out_dir"]) for v in json.loads(result.stdout)["variants"])
    ledger = {r["name"]: r for r in json.loads((second / "report.json").read_text())["ledger"]}
    assert ledger["pretrain"]["details"]["reused_from"] == str(first)
    assert ledger["pretrain"]["artifact"] == str(second / "pretrain") and (second / "pretrain").is_dir()
    assert "reused_from" not in ledger["prune"]["details"]
    # reusing changes nothing: the second variant run on its own gives the same model, bit for bit
    alone = cli("compress", "--recipe", recipe, "--set", "passes.prune.mlp=0.5", "--out", tmp_path / "alone")
    assert alone.exit_code == 0, alone.output
    assert (second / "model.onnx").read_bytes() == (tmp_path / "alone" / "model.onnx").read_bytes()
