"""Recipes: every ready recipe validates; bad recipes fail with one line naming the field (RELIABILITY 10-13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vitcompress.errors import RecipeError
from vitcompress.recipe import load_recipe, parse_recipe

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
HEAD = "version: 1\nmodel:\n  source: timm:deit_tiny_patch16_224\n"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_ready_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.version == 1
    assert path.read_text().startswith("#"), "every ready recipe opens with a comment saying what it is for"


BAD = [
    (
        "unknown nested key",
        HEAD + "passes:\n  - kind: export\n    opsett: 17\n",
        "<r>:6: unknown key 'opsett' in passes[0] (export); did you mean 'opset'?",
    ),
    (
        "unknown model key",
        "version: 1\nmodel:\n  sourc: timm:x\npasses:\n  - kind: export\n",
        "<r>:3: unknown key 'sourc' in model; did you mean 'source'?",
    ),
    (
        "unknown top key",
        HEAD + "passes:\n  - kind: export\nbudget:\n  max_p50_ms: 3\n",
        "<r>:6: unknown key 'budget' in top level; did you mean 'budgets'",
    ),
    (
        "unknown budget key",
        HEAD + "passes:\n  - kind: export\nbudgets:\n  max_p50: 3\n",
        "<r>:7: unknown key 'max_p50' in budgets; did you mean 'max_p50_ms'",
    ),
    (
        "unknown pass kind",
        HEAD + "passes:\n  - kind: exprt\n",
        "<r>:5: passes[0]: unknown pass kind 'exprt'; did you mean 'export'?",
    ),
    ("pass without kind", HEAD + "passes:\n  - opset: 17\n", "<r>:5: passes[0]: a pass needs a 'kind'"),
    (
        "opset too old",
        HEAD + "passes:\n  - kind: export\n    opset: 13\n",
        "<r>:6: passes[0] (export).opset: opset 13 is too old for ViT attention",
    ),
    (
        "negative budget",
        HEAD + "passes:\n  - kind: export\nbudgets:\n  max_p50_ms: -1\n",
        "<r>:7: budgets.max_p50_ms: Input should be greater than 0 (got -1)",
    ),
    (
        "bad batch size",
        HEAD + "passes:\n  - kind: export\n  - kind: validate\n    batch_sizes: [1, 0]\n",
        "passes[1] (validate).batch_sizes[1]: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "validate before export",
        HEAD + "passes:\n  - kind: validate\n",
        "passes[0] (validate) needs an ONNX model: put an export pass before it",
    ),
    (
        "duplicate step names",
        HEAD + "passes:\n  - kind: export\n  - kind: export\n",
        "step name 'export' is used twice",
    ),
    (
        "wrong version",
        "version: 2\nmodel:\n  source: timm:x\npasses:\n  - kind: export\n",
        "<r>:1: version: Input should be 1 (got 2)",
    ),
    ("missing passes", HEAD, "passes: Field required"),
    ("empty passes", HEAD + "passes: []\n", "passes: List should have at least 1 item"),
    ("empty source", "version: 1\nmodel:\n  source: 'timm:'\npasses:\n  - kind: export\n", "names no model"),
    ("malformed yaml", "version: 1\nmodel: [\n", "<r>:3:1: malformed YAML"),
    ("bad indentation", "version: 1\nmodel:\n  source: a\n bad: 2\n", "<r>:4:2: malformed YAML"),
    (
        "python tag",
        "version: 1\nmodel: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
        "<r>:2:8: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'",
    ),
    ("not a mapping", "- 1\n- 2\n", "a recipe is a mapping with version, model and passes, got list"),
    (
        "prune ratio of one",
        HEAD + "passes:\n  - kind: prune\n    heads: 1.0\n",
        "<r>:6: passes[0] (prune).heads: Input should be less than 1 (got 1.0)",
    ),
    (
        "taylor without data",
        HEAD + "passes:\n  - kind: prune\n    mlp: 0.5\n    importance: taylor\n",
        "passes[0] (prune) needs data (importance/calibration): add data.calibration or data.train",
    ),
    (
        "prune target and ratios",
        HEAD + "passes:\n  - kind: prune\n    mlp: 0.5\n    target_macs: 0.5\n",
        "a target and fractions (mlp) both given",
    ),
    (
        "unknown data source",
        HEAD + "data:\n  calibration: {source: fashion}\npasses:\n  - kind: prune\n    mlp: 0.5\n",
        "data.calibration.source: Input should be 'fashion-mnist', 'digits', 'folder', 'synthetic' or 'memory'",
    ),
    (
        "folder without path",
        HEAD + "data:\n  train: {source: folder}\npasses:\n  - kind: prune\n    mlp: 0.5\n",
        "source 'folder' needs path",
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_recipes_fail_with_a_precise_line(case, text, expected):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "<r>")
    assert expected in str(info.value)
    assert len(info.value.message.splitlines()) == 1


def test_resolved_recipe_spells_out_every_default():
    recipe = parse_recipe(HEAD + "passes:\n  - kind: export\n  - kind: validate\n")
    resolved = recipe.resolved()
    assert resolved["passes"][0] == {
        "kind": "export",
        "name": None,
        "exporter": "torchscript",
        "opset": 17,
        "filename": "model.onnx",
        "parity_batch": 8,
        "atol": 1e-4,
        "rtol": 1e-4,
        "min_top1_agreement": 1.0,
        "runtime": "ort",
        "precision": None,
    }
    assert resolved["passes"][1]["provider"] == "cpu"
    assert resolved["run"] == {"seed": 0, "threads": 2}
    assert parse_recipe(yaml.safe_dump(resolved)) == recipe  # the resolved recipe is itself a valid recipe


def test_schema_and_validate_commands(cli, tmp_path):
    result = cli("recipe", "schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert set(schema["properties"]) == {
        "version",
        "name",
        "description",
        "model",
        "run",
        "data",
        "passes",
        "budgets",
        "sweep",
        "target",
        "goal",
    }
    assert "discriminator" in json.dumps(schema["properties"]["passes"])

    ok = cli("recipe", "validate", "recipes/quickstart.yaml")
    assert ok.exit_code == 0
    assert "valid recipe" in ok.stdout and "export -> validate" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(HEAD + "passes:\n  - kind: export\n    opsett: 17\n")
    result = cli("recipe", "validate", bad)
    assert result.exit_code == 2
    assert f"{bad}:6: unknown key 'opsett' in passes[0] (export); did you mean 'opset'?" in result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- ready recipes by name

ROOT = Path(__file__).parent.parent


def test_ready_recipes_are_package_data_and_recipes_is_a_link_to_them():
    from vitcompress.recipe import BUNDLED_RECIPES, bundled_recipes

    assert BUNDLED_RECIPES == ROOT / "vitcompress" / "recipes"
    assert (ROOT / "recipes").is_symlink() and (ROOT / "recipes").resolve() == BUNDLED_RECIPES.resolve()
    assert {p.name for p in RECIPES} == {p.name for p in bundled_recipes().values()}
    assert {"quickstart", "edge-cpu-int8"} <= set(bundled_recipes())
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-data"]["vitcompress"] == ["recipes/*.yaml"]


def test_recipe_list_names_each_ready_recipe_and_what_it_is_for(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from any directory
    result = cli("recipe", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(RECIPES)
    edge = next(line for line in lines if line.startswith("edge-cpu-int8 "))
    assert edge.split(None, 1)[1] == "Edge CPU, INT8 only: the lowest-risk win."
    assert any(line.startswith("quickstart ") and "Quickstart" in line for line in lines)
    listed = json.loads(cli("recipe", "list", "--json").stdout)
    assert {item["name"] for item in listed} == {p.stem for p in RECIPES}
    assert all(Path(item["path"]).is_file() and item["summary"] for item in listed)


def test_a_bare_name_is_a_ready_recipe_from_any_directory(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok = cli("recipe", "validate", "edge-cpu-int8")
    assert ok.exit_code == 0, ok.output
    assert "valid recipe" in ok.stdout and "export -> quantize -> validate" in ok.stdout
    assert load_recipe(Path("quickstart")) == load_recipe(ROOT / "recipes" / "quickstart.yaml")
    # a file of that name here wins over the ready recipe
    (tmp_path / "quickstart").write_text(HEAD + "passes:\n  - kind: export\n")
    assert [p.kind for p in load_recipe(Path("quickstart")).passes] == ["export"]


def test_an_unknown_recipe_name_lists_the_ready_ones_and_the_closest(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("compress", "--recipe", "edge-cpu-int9", "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert "no recipe 'edge-cpu-int9': not a file here, nor a ready recipe" in result.stderr
    assert "ready: edge-cpu-int8, gpu-fp16" in result.stderr
    assert "did you mean 'edge-cpu-int8'?" in result.stderr
    sweep = cli("sweep", "--recipe", "qickstart", "--out", tmp_path / "s", "--vary", "run.seed=1,2")
    assert sweep.exit_code == 2 and "did you mean 'quickstart'?" in sweep.stderr
    missing = cli("recipe", "validate", "nowhere/r.yaml")  # a path, not a name: the file is missing
    assert missing.exit_code == 2 and "recipe nowhere/r.yaml does not exist" in missing.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ready_recipes_are_found_in_a_non_editable_install(tmp_path):
    """Build a wheel from a copy of the sources, install it into a folder and use a recipe by name."""
    import os
    import shutil
    import subprocess
    import sys

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "vitcompress", source / "vitcompress", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr[-300:]}")
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    code = (
        "import vitcompress, sys; from vitcompress.recipe import resolve_recipe, bundled_recipes; "
        "print(vitcompress.__file__); print(resolve_recipe('edge-cpu-int8')); print(len(bundled_recipes()))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        timeout=120,
        check=True,
    )
    module, recipe, count = run.stdout.split()
    assert module.startswith(str(site))  # the installed copy, not this checkout
    assert recipe == str(site / "vitcompress" / "recipes" / "edge-cpu-int8.yaml") and Path(recipe).is_file()
    assert int(count) == len(RECIPES)
