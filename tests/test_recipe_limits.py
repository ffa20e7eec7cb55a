"""Recipes are bounded and validated before anything runs: oversize files, alias bombs, deep nesting,
out-of-range targets and pass orders that make no sense fail through the real CLI with exit 2, one short
message naming the file and the limit, no traceback, and nothing written."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest

from vitcompress.recipe import MAX_RECIPE_BYTES, MAX_RECIPE_DEPTH, MAX_RECIPE_NODES

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
HEAD = "version: 1\nmodel:\n  source: timm:deit_tiny_patch16_224\n"


def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def _refused(cli, tmp_path: Path, text: str, name: str = "r.yaml"):
    """`recipe validate` on `text`: exit 2, no traceback, one error line (and a hint), nothing written."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    before = _tree(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = cli("recipe", "validate", path)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "RecursionError" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"error: {path}"), lines
    assert len(lines) <= 2 and all(line.startswith(("error: ", "hint: ")) for line in lines), lines
    assert _tree(tmp_path) == before  # nothing written next to the recipe or in the working directory
    return result.stderr


def test_oversize_recipe_is_refused_before_parsing(cli, tmp_path, monkeypatch):
    import vitcompress.recipe

    def parsed(*args, **kwargs):
        raise AssertionError("an oversize recipe reached the YAML parser")

    monkeypatch.setattr(vitcompress.recipe, "_load_yaml", parsed)
    size = MAX_RECIPE_BYTES + 1000
    text = HEAD + "passes:\n  - kind: export\n"
    text += "#" * (size - len(text) - 1) + "\n"
    stderr = _refused(cli, tmp_path, text)
    assert f"recipe is {size:,} bytes, over the limit of {MAX_RECIPE_BYTES:,} bytes (1 MiB)" in stderr


def test_recipe_at_the_size_limit_still_validates(cli, tmp_path):
    text = HEAD + "passes:\n  - kind: export\n"
    text += "#" * (MAX_RECIPE_BYTES - len(text) - 1) + "\n"
    path = tmp_path / "big-comment.yaml"
    path.write_text(text)
    assert path.stat().st_size == MAX_RECIPE_BYTES
    result = cli("recipe", "validate", path)
    assert result.exit_code == 0, result.output


def _alias_bomb(levels: int = 9, width: int = 10) -> str:
    """A "billion laughs": each anchor is a list of `width` aliases of the previous one (width**levels)."""
    lines = ["  kwargs:", "    l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    lines.append(f"    bomb: *l{levels - 1}")
    return HEAD + "\n".join(lines) + "\npasses:\n  - kind: export\n"


def test_alias_bomb_is_refused_quickly_with_bounded_memory(cli, tmp_path):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        stderr = _refused(cli, tmp_path, _alias_bomb())
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 10, elapsed  # milliseconds in practice; the expansion has 10**9 nodes
    assert peak < 50e6, peak
    assert f"recipe expands to more than {MAX_RECIPE_NODES:,} YAML nodes with its aliases expanded" in stderr
    assert "lol" not in stderr and len(stderr) < 400  # the expansion is never echoed


def test_alias_inside_its_own_anchor_is_refused(cli, tmp_path):
    stderr = _refused(cli, tmp_path, HEAD + "  kwargs: &k {self: *k}\npasses:\n  - kind: export\n")
    assert "alias *k inside the node it names" in stderr


def test_a_few_aliases_still_work(cli, tmp_path):
    text = HEAD + (
        "data:\n  calibration: &digits {source: digits, limit: 64}\n  train: *digits\n"
        "passes:\n  - kind: prune\n    mlp: 0.5\n    importance: taylor\n  - kind: export\n"
    )
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    result = cli("recipe", "validate", path)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "nested",
    [
        "[" * 100_000 + "]" * 100_000,
        "{a: " * 100_000 + "}" * 100_000,
        "- " * 100_000 + "x",
        "".join("  " * i + f"k{i}:\n" for i in range(MAX_RECIPE_DEPTH + 2)),
    ],
    ids=["brackets", "braces", "block-sequence", "block-mapping"],
)
def test_deep_nesting_is_refused_not_a_recursion_error(cli, tmp_path, nested):
    start = time.perf_counter()
    stderr = _refused(cli, tmp_path, nested + "\n")
    assert time.perf_counter() - start < 10
    assert f"recipe is nested deeper than {MAX_RECIPE_DEPTH} levels, the limit for a recipe" in stderr


def test_deep_nesting_in_a_set_override_is_refused(cli, tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(HEAD + "passes:\n  - kind: export\n")
    result = cli(
        "compress", "--recipe", path, "--set", "model.kwargs.x=" + "[" * 100_000, "--out", tmp_path / "o"
    )
    assert result.exit_code == 2, result.output
    assert f"nested deeper than {MAX_RECIPE_DEPTH} levels" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("kind", "setting", "expected"),
    [
        (
            "prune",
            "target_macs: 1.5",
            "passes[0] (prune).target_macs: a value above 1 is a count, and counts must be integers "
            "larger than 1 (fractions must be in (0, 1)) (got 1.5)",
        ),
        (
            "prune",
            "target_macs: 2.5",
            "passes[0] (prune).target_macs: a value above 1 is a count, and counts must be integers "
            "larger than 1 (fractions must be in (0, 1)) (got 2.5)",
        ),
        (
            "prune",
            "target_macs: 0",
            "passes[0] (prune).target_macs: neither a fraction nor a count: fractions must be in (0, 1), "
            "counts must be integers larger than 1 (got 0)",
        ),
        ("prune", "target_params: -0.5", "passes[0] (prune).target_params: neither a fraction nor a count"),
        ("prune", "target_params: 1", "passes[0] (prune).target_params: neither a fraction nor a count"),
        ("prune", "target_macs: .nan", "passes[0] (prune).target_macs: Input should be a finite number"),
        ("prune", "heads: 1.0", "passes[0] (prune).heads: Input should be less than 1 (got 1.0)"),
        ("lowrank", "target_params: 1.5", "passes[0] (lowrank).target_params: a value above 1 is a count"),
        ("lowrank", "target_macs: 0", "passes[0] (lowrank).target_macs: neither a fraction nor a count"),
        (
            "lowrank",
            "attention: comcat\n    attention_rank: 1.5",
            "passes[0] (lowrank).attention_rank: a value above 1 is a count, and counts must be integers "
            "larger than 1 (fractions must be in (0, 1]) (got 1.5)",
        ),
        ("lowrank", "energy: 1.5", "passes[0] (lowrank).energy: Input should be less than or equal to 1"),
        ("distill", "lr: .inf", "passes[0] (distill).lr: Input should be a finite number (got inf)"),
    ],
    ids=lambda v: v if "\n" not in v else v.split("\n")[-1].strip(),
)
def test_out_of_range_settings_are_refused(cli, tmp_path, kind, setting, expected):
    text = (
        HEAD
        + f"data:\n  train: {{source: digits}}\npasses:\n  - kind: {kind}\n    {setting}\n  - kind: export\n"
    )
    stderr = _refused(cli, tmp_path, text)
    assert expected in stderr


@pytest.mark.parametrize(
    ("kind", "setting"),
    [
        ("prune", "target_macs: 0.5"),
        ("prune", "target_macs: 600000"),
        ("prune", "target_params: 4.0e6"),
        ("lowrank", "target_params: 0.7"),
        ("lowrank", "attention: comcat\n    attention_rank: 1.0"),
        ("lowrank", "attention: comcat\n    attention_rank: 32"),
    ],
    ids=lambda v: v if "\n" not in v else v.split("\n")[-1].strip(),
)
def test_fractions_and_integer_counts_validate(cli, tmp_path, kind, setting):
    path = tmp_path / "ok.yaml"
    path.write_text(HEAD + f"passes:\n  - kind: {kind}\n    {setting}\n  - kind: export\n")
    result = cli("recipe", "validate", path)
    assert result.exit_code == 0, result.output


def test_model_pass_after_export_is_refused(cli, tmp_path):
    text = HEAD + (
        "passes:\n  - kind: export\n  - kind: quantize\n    mode: dynamic\n  - kind: prune\n    mlp: 0.5\n"
    )
    stderr = _refused(cli, tmp_path, text)
    assert (
        "r.yaml:8: passes[2] (prune) changes the PyTorch model after passes[0] (export) exported it, so the ONNX model "
        "would ship without that change: move step 'prune' before 'export'"
    ) in stderr


@pytest.mark.parametrize(
    "passes",
    [
        "  - kind: export\n    name: fp32\n  - kind: lowrank\n    rank: 8\n  - kind: export\n",
        "  - kind: export\n  - kind: distill\n    steps: 1\n  - kind: validate\n",
    ],
    ids=["export-lowrank-export", "export-distill-validate"],
)
def test_any_model_pass_after_any_export_is_refused(cli, tmp_path, passes):
    stderr = _refused(cli, tmp_path, HEAD + "data:\n  train: {source: digits}\npasses:\n" + passes)
    assert "changes the PyTorch model after passes[0] (export) exported it" in stderr
    assert "move step" in stderr


@pytest.mark.parametrize("kind", ["quantize", "validate"])
def test_onnx_pass_before_export_is_refused(cli, tmp_path, kind):
    first = "quantize\n    mode: dynamic" if kind == "quantize" else kind
    stderr = _refused(cli, tmp_path, HEAD + f"passes:\n  - kind: {first}\n  - kind: export\n")
    assert f"passes[0] ({kind}) needs an ONNX model: put an export pass before it" in stderr


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_ready_recipes_validate_through_the_cli(cli, path):
    result = cli("recipe", "validate", path)
    assert result.exit_code == 0, result.output
    assert "valid recipe" in result.stdout
