"""Adding a pass is one folder plus one registration: an example pass written to a temporary
folder runs in a recipe, with the ledger envelope (name, kind, wall time) filled by the pipeline."""

from __future__ import annotations

import sys
import textwrap

import pytest

CONFIG = '''
from typing import ClassVar, Literal

from pydantic import Field

from vitcompress.passes.base import PassConfig


class ScaleHeadConfig(PassConfig):
    """Multiply the classifier's weights by a factor (an example pass)."""

    summary: ClassVar[str] = "scale the classifier head"
    engine: ClassVar[str] = "scalehead.run"
    changes_model: ClassVar[bool] = True

    kind: Literal["scale-head"] = "scale-head"
    factor: float = Field(2.0, gt=0, description="What the head's weights are multiplied by.")
'''

RUN = """
import torch

from vitcompress.state import Measured


def run(state, cfg):
    head = state.model.model.get_classifier()
    with torch.no_grad():
        head.weight.mul_(cfg.factor)
    return state.passed(cfg, Measured(details={"scaled": head.weight.shape[0]}))
"""


@pytest.fixture
def example_pass(tmp_path, monkeypatch):
    package = tmp_path / "scalehead"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text(textwrap.dedent(CONFIG))
    (package / "run.py").write_text(textwrap.dedent(RUN))
    monkeypatch.syspath_prepend(str(tmp_path))
    from scalehead.config import ScaleHeadConfig

    from vitcompress.passes import register, unregister

    register(ScaleHeadConfig)
    yield ScaleHeadConfig
    unregister("scale-head")
    for name in [m for m in sys.modules if m.startswith("scalehead")]:
        del sys.modules[name]


def test_a_registered_pass_runs_in_a_recipe(example_pass, tmp_path):
    import timm
    import torch

    import vitcompress
    from vitcompress.recipe import recipe_schema

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10)
    before = model.head.weight.detach().clone()
    recipe = {"version": 1, "passes": [{"kind": "scale-head", "factor": 3.0}]}
    result = vitcompress.compress(model, recipe, out=tmp_path / "run")
    assert torch.allclose(model.head.weight, 3 * before)
    record = result.record("scale-head")
    assert (record.kind, record.details) == ("scale-head", {"scaled": 10})
    assert record.wall_s > 0  # the pipeline timed it; the pass did not
    assert "scale-head" in str(recipe_schema())
    assert (tmp_path / "run" / "report.json").is_file()


def test_unregistered_kinds_are_refused_again(example_pass):
    from vitcompress.errors import RecipeError
    from vitcompress.passes import unregister
    from vitcompress.recipe import parse_recipe

    text = "version: 1\nmodel: {source: timm:vit_tiny_patch16_224}\npasses: [{kind: scale-head}]\n"
    assert parse_recipe(text).passes[0].kind == "scale-head"
    unregister("scale-head")
    with pytest.raises(RecipeError, match="unknown pass kind 'scale-head'"):
        parse_recipe(text)
    with pytest.raises(RecipeError, match="built-in"):
        unregister("prune")
