"""Every `$ vitcompress ...` example in the README runs, in order, and exits 0."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

ROOT = Path(__file__).parent.parent


def readme_examples() -> list[list[str]]:
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    return [shlex.split(line[len("$ vitcompress ") :]) for line in lines if line.startswith("$ vitcompress ")]


def test_readme_has_the_two_setup_commands():
    text = ROOT.joinpath("README.md").read_text()
    assert (
        'pip install -e ".[dev]" && vitcompress compress --recipe recipes/quickstart.yaml --out out/' in text
    )
    assert "\npython -m pytest -q\n" in text
    assert "python -m pytest -q" in ROOT.joinpath(".ci/run").read_text()


@pytest.mark.slow
def test_readme_examples_run_in_order(cli, tmp_path, monkeypatch, hf_vit_dir):
    from vitcompress.models import ModelRef, load_model

    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    shutil.copytree(hf_vit_dir, tmp_path / "hf_vit_folder")
    # The files the examples name, made the way a user would have them.
    user_model = load_model(ModelRef("timm:vit_tiny_patch16_224", num_classes=10))
    save_file(
        {k: v.contiguous() for k, v in user_model.model.state_dict().items()},
        str(tmp_path / "vit_tiny.safetensors"),
    )
    monkeypatch.chdir(tmp_path)
    examples = readme_examples()
    assert len(examples) >= 8
    for args in examples:
        result = cli(*args)
        assert result.exit_code == 0, (args, result.output)
    assert (tmp_path / "out" / "report.md").is_file()
    assert (tmp_path / "recipe.schema.json").is_file()


def test_readme_recipe_blocks_validate():
    import re

    from vitcompress.recipe import parse_recipe

    blocks = re.findall(r"```yaml\n(.*?)```", ROOT.joinpath("README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        recipe = parse_recipe(block, "README.md")
        assert recipe.passes
