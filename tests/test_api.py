"""The Python API: the README's notebook example runs as printed, and the one-step functions take
modules and in-memory data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def readme_python_example() -> str:
    text = ROOT.joinpath("README.md").read_text()
    section = text.split("## Use it from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_readme_python_example_eval_fn_drives_the_gate(tmp_path, monkeypatch, capsys):
    """In-memory module and DataLoaders, a user eval_fn: the budget passes on the lenient gate and
    fails on the strict one, with the drop the eval_fn measured."""
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(readme_python_example(), "README.md", "exec"), scope)
    result, check = scope["result"], scope["check"]
    assert check.details["accuracy"]["by"] == "eval_fn"
    assert check.details["baseline_top1"] == 1.0  # labels are the model's own predictions
    assert 0.0 <= check.top1 < 1.0
    assert check.details["top1_drop_points"] == pytest.approx(100 * (1.0 - check.top1))
    assert result.budget_failures == ()
    assert result.onnx == Path("api-run/model.onnx") and result.onnx.is_file()
    # the compressed module is the one handed over, pruned in place: 3 heads -> 2
    assert [b.attn.num_heads for b in result.model.blocks] == [2, 2]
    assert scope["model"].blocks[0].attn.num_heads == 3  # the caller's original (a copy was passed)
    assert result.record("distill").details  # the in-memory train loader fed distillation
    strict = json.loads(Path("api-run-strict/report.json").read_text())
    assert strict["budgets"]["passed"] is False
    drop = next(r for r in strict["ledger"] if r["kind"] == "validate")["details"]["top1_drop_points"]
    assert drop > 0.5
    assert f"top-1 drop {drop:.2f} points > max_top1_drop 0.5" in capsys.readouterr().out


def test_prune_and_evaluate_a_module_in_memory(tmp_path):
    import timm
    import torch

    import vitcompress

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    result = vitcompress.prune(model, mlp=0.5, out=tmp_path / "p")
    assert result.model is model and model.blocks[0].mlp.fc1.out_features == 384
    assert (tmp_path / "p" / "prune" / "model.json").is_file()
    images = torch.randn(40, 3, 32, 32)
    labels = model(images).argmax(1).detach()
    score = vitcompress.evaluate(model, (images, labels))
    assert score.top1 == 1.0 and score.samples == 40
    assert (
        vitcompress.evaluate(
            model, eval_fn=lambda net: float((net(images).argmax(1) == labels).float().mean())
        )
        == 1.0
    )


def test_api_errors_name_the_argument(tmp_path):
    import torch

    import vitcompress
    from vitcompress.errors import DataError, RecipeError

    with pytest.raises(RecipeError, match="mlp"):
        vitcompress.prune("timm:vit_tiny_patch16_224", mlp=1.5, out=tmp_path / "x")
    with pytest.raises(DataError, match="eval_fn returned 87.5"):
        vitcompress.evaluate(torch.nn.Linear(2, 2), eval_fn=lambda net: 87.5)


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, vitcompress; vitcompress.__all__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
