"""Every `$ vitcompress ...` example in the README runs, in order, and exits 0."""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

import pytest

from tests.inprocess import run_script

ROOT = Path(__file__).parent.parent


def readme_examples() -> list[list[str]]:
    """Every `$ vitcompress ...` and `$ python scripts/...` line of the README, in order."""
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    return [shlex.split(line[2:]) for line in lines if line.startswith(("$ vitcompress ", "$ python scripts/"))]


def test_readme_has_the_two_setup_commands():
    text = ROOT.joinpath("README.md").read_text()
    assert (
        'pip install -e ".[dev]" && vitcompress compress --recipe recipes/quickstart.yaml --out out/' in text
    )
    assert "\npython -m pytest -q\n" in text
    assert "python -m pytest -q" in ROOT.joinpath(".ci/run").read_text()


@pytest.mark.slow
def test_readme_examples_run_in_order(cli, tmp_path, monkeypatch):
    """Self-contained: every file an example needs is made by an earlier example."""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VITCOMPRESS_CACHE", str(tmp_path / "cache"))  # latency tables: not the user's
    examples = readme_examples()
    assert len(examples) >= 8 and examples[0][:2] == ["python", "scripts/make_example.py"]
    took: list[tuple[float, str]] = []  # printed at the end (pytest -s): where the suite's time goes
    for args in examples:
        started = time.perf_counter()
        if args[0] == "python":  # scripts/NAME.py, run as __main__ in this process (tests/inprocess.py)
            run = run_script(Path(args[1]).relative_to("scripts").as_posix(), *args[2:])
            assert run.returncode == 0, (args, run.stderr[-3000:])
        else:
            result = cli(*args[1:])
            assert result.exit_code == 0, (args, result.output)
        took.append((time.perf_counter() - started, " ".join(args)[:110]))
    for seconds, line in sorted(took, reverse=True)[:12]:
        print(f"{seconds:6.1f} s  {line}")
    assert (tmp_path / "out" / "report.md").is_file()
    assert (tmp_path / "recipe.schema.json").is_file()
    # "Compress your own model": the stand-in model is a trained one and the run kept it so
    example = json.loads((tmp_path / "my-example" / "example.json").read_text())
    assert example["test_top1"] > 0.85
    report = json.loads((tmp_path / "my-run" / "report.json").read_text())
    validate = next(r for r in report["ledger"] if r["kind"] == "validate")
    assert report["budgets"]["passed"] is True
    assert validate["details"]["baseline_top1"] == pytest.approx(example["test_top1"], abs=0.01)
    assert validate["top1"] > 0.85


def test_readme_recipe_blocks_validate():
    import re

    from vitcompress.recipe import parse_recipe

    blocks = re.findall(r"```yaml\n(.*?)```", ROOT.joinpath("README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        recipe = parse_recipe(block, "README.md")
        assert recipe.passes
