"""compress: the pipeline runs the recipe, keeps the ledger, writes reports, enforces budgets."""

from __future__ import annotations

import json

import pytest
import yaml

RECIPE = """\
version: 1
name: tiny
model:
  source: timm:vit_tiny_patch16_224
  img_size: 32
  num_classes: 10
  kwargs: {depth: 2, patch_size: 8}
passes:
  - kind: export
  - kind: validate
    batch_sizes: [1, 2]
    warmup: 2
    runs: 10
"""


def test_compress_writes_ledger_reports_and_resolved_recipe(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    result = cli("compress", "--recipe", recipe, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        ".passes.json",
        ".vitcompress.lock",
        "model.onnx",
        "recipe.resolved.yaml",
        "report.json",
        "report.md",
        "run.json",
    ]
    report = json.loads((out / "report.json").read_text())
    ledger = {r["name"]: r for r in report["ledger"]}
    assert list(ledger) == ["load", "export", "validate"]
    assert ledger["load"]["params"] == ledger["export"]["params"] > 0
    assert ledger["export"]["macs"] == ledger["load"]["macs"] > 0
    assert ledger["export"]["parity"]["max_abs_diff"] < 1e-4
    assert ledger["export"]["size_bytes"] == (out / "model.onnx").stat().st_size
    assert ledger["validate"]["latency_p50_ms"] > 0
    assert ledger["validate"]["details"]["speedup_vs_baseline"] == 1.0  # nothing compressed yet
    assert all(r["wall_s"] > 0 for r in report["ledger"])
    assert report["measurement"]["settings"]["batch_sizes"] == [1, 2]
    assert report["budgets"] == {"failures": [], "passed": True}
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["passes"][0]["exporter"] == "torchscript" and resolved["passes"][0]["opset"] == 17
    markdown = (out / "report.md").read_text()
    assert "| export |" in markdown and "all budgets met" in markdown
    assert json.loads(result.stdout)["final_onnx"] == str(out / "model.onnx")


def test_failed_budget_exits_3_and_still_writes_reports(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE + "budgets:\n  max_p50_ms: 0.0001\n  max_size_mb: 0.001\n")
    out = tmp_path / "out"
    result = cli("compress", "--recipe", recipe, "--out", out)
    assert result.exit_code == 3
    assert "budget failed: p50" in result.stderr and "max_size_mb 0.001" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["budgets"]["passed"] is False
    assert len(report["budgets"]["failures"]) == 2
    assert "FAILED" in (out / "report.md").read_text()


def test_latency_budget_without_validate_fails(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.split("  - kind: validate")[0] + "budgets:\n  max_p50_ms: 100\n")
    result = cli("compress", "--recipe", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 3
    assert "no pass measured latency: add a validate pass" in result.stderr


def test_validate_exports_the_original_as_baseline_when_the_model_changed(tmp_path):
    """After a model-changing pass the first export is not the baseline: validate exports the teacher."""
    import copy
    from dataclasses import replace

    import torch

    from tests.conftest import tiny_ref
    from vitcompress.models import load_model
    from vitcompress.passes import export, validate
    from vitcompress.state import ModelState, RunSettings

    teacher = load_model(tiny_ref("timm:vit_tiny_patch16_224", kwargs={"depth": 6, "patch_size": 8}))
    student = copy.deepcopy(teacher)
    student.model.blocks = torch.nn.Sequential(*list(student.model.blocks)[:1])  # a drastic "compression"
    state = ModelState(model=student, settings=RunSettings(out_dir=tmp_path, threads=1), teacher=teacher)
    state = replace(state, model_changed=True)
    state = export.run(state, export.ExportConfig())
    assert state.baseline_onnx is None
    state = validate.run(state, validate.ValidateConfig(warmup=2, runs=15))
    assert state.baseline_onnx == tmp_path / "baseline.onnx"
    record = state.records[-1]
    assert record.details["baseline"] == str(tmp_path / "baseline.onnx")
    assert record.details["speedup_vs_baseline"] > 1.5  # 1 block against 6
    assert len(record.details["bench"]["results"]) == 2


def test_passes_read_data_splits_through_the_state(tmp_path):
    from tests.conftest import tiny_ref
    from vitcompress.data import DataSection, DataSpec
    from vitcompress.errors import DataError
    from vitcompress.models import load_model
    from vitcompress.state import ModelState, RunSettings

    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    bare = ModelState(model=loaded, settings=RunSettings(out_dir=tmp_path))
    with pytest.raises(
        DataError, match=r"prune \(importance taylor\) needs data.calibration \(or data.train\) in the recipe"
    ):
        bare.load_split("calibration", "prune (importance taylor)")
    section = DataSection(
        train=DataSpec(source="digits", limit=200), eval=DataSpec(source="digits", split="test")
    )
    state = ModelState(model=loaded, settings=RunSettings(out_dir=tmp_path, data=section))
    assert state.data_spec("calibration") == section.train  # calibration falls back to train
    assert len(state.load_split("calibration", "x", limit=50)) == 50
    assert len(state.load_split("train", "x", limit=1000)) == 200  # the recipe's own limit is smaller
    assert len(state.load_split("eval", "x")) == 359


@pytest.mark.parametrize(("tail", "keeps_copy"), [("", False), ("  - kind: validate\n    runs: 5\n", True)])
def test_the_model_as_loaded_is_copied_only_when_a_pass_reads_it(tmp_path, tail, keeps_copy):
    """A second copy of the model costs its whole size in memory (350 MB for DeiT-B): it is kept
    for distill (the default teacher) and validate (the fp32 baseline), not otherwise."""
    from vitcompress.pipeline import run_recipe
    from vitcompress.recipe import parse_recipe

    recipe = parse_recipe(
        "version: 1\nmodel:\n  source: timm:vit_tiny_patch16_224\n  num_classes: 10\n  img_size: 32\n"
        "  kwargs: {depth: 1, patch_size: 8}\npasses:\n  - kind: prune\n    mlp: 0.5\n  - kind: export\n"
        + tail
    )
    state = run_recipe(recipe, tmp_path / "out").state
    assert (state.teacher is not None) is keeps_copy
    if keeps_copy:  # and validate measured against the original, not the pruned model
        assert state.records[-1].details["baseline"].endswith("baseline.onnx")
