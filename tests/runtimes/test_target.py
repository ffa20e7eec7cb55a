"""The recipe's target section expands into explicit pass settings; contradictions fail validation."""

from __future__ import annotations

import pytest

from vitcompress.errors import RecipeError
from vitcompress.recipe import parse_recipe

BASE = """
version: 1
model: {source: timm:vit_tiny_patch16_224}
data: {calibration: {source: digits}}
passes:
  - kind: export
  - kind: quantize
    preset: cpu-x86-vnni
  - kind: validate
"""


def test_openvino_target_reaches_every_pass():
    recipe = parse_recipe(BASE + "target: {runtime: openvino, threads: 4, precision: int8}\n")
    export, quantize, validate = recipe.passes
    assert (export.runtime, quantize.runtime, quantize.mode.value) == ("openvino", "openvino", "auto")
    assert quantize.filename == "model.int8.xml"
    assert (validate.runtime, validate.threads, validate.compare_runtimes) == ("openvino", 4, True)
    assert recipe.run.threads == 4
    resolved = recipe.resolved()
    assert resolved["target"] == {"runtime": "openvino", "device": None, "threads": 4, "precision": "int8"}
    # explicit settings win over the target's
    recipe = parse_recipe(
        BASE.replace("  - kind: validate", "  - kind: validate\n    runtime: ort")
        + "target: {runtime: openvino}\n"
    )
    assert recipe.passes[2].runtime == "ort"


def test_gpu_target_sets_providers():
    recipe = parse_recipe(BASE.replace("cpu-x86-vnni", "gpu-tensorrt-int8") + "target: {runtime: tensorrt}\n")
    assert recipe.passes[1].provider == "tensorrt" and recipe.passes[2].provider.value == "tensorrt"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{runtime: openvino, device: gpu}", "runtime openvino runs on device cpu"),
        ("{runtime: tensorrt, device: cpu}", "runtime tensorrt runs on device gpu"),
        ("{runtime: ort, precision: bf16}", "precision bf16 is an OpenVINO hint"),
        ("{runtime: openvino, threads: 3}\nrun: {threads: 2}", "target.threads 3 and run.threads 2 disagree"),
        ("{runtime: openvino, precison: int8}", "precison"),
    ],
)
def test_contradictory_targets_fail_validation(target, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(BASE + f"target: {target}\n")
    assert message in str(info.value) + " ".join(getattr(info.value, "lines", []) or [])


def test_int8_target_needs_a_quantize_pass():
    text = BASE.replace("  - kind: quantize\n    preset: cpu-x86-vnni\n", "")
    with pytest.raises(RecipeError) as info:
        parse_recipe(text + "target: {precision: int8}\n")
    assert "needs a quantize pass" in str(info.value)
