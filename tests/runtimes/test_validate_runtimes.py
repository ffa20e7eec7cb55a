"""validate checks budgets on the target runtime and names the fastest runtime for the file."""

from __future__ import annotations

import json

import pytest

RECIPE = """
version: 1
model: {source: timm:vit_tiny_patch16_224, num_classes: 10, img_size: 32, kwargs: {depth: 2, patch_size: 8}}
run: {threads: 1}
passes:
  - kind: export
  - kind: validate
    runtime: openvino
    precision: fp32
    compare_runtimes: true
    runs: 5
    warmup: 1
budgets:
  max_p50_ms: 0.0001
"""


def test_validate_times_the_file_on_every_runtime_and_gates_on_the_target(cli, tmp_path):
    recipe = tmp_path / "v.yaml"
    recipe.write_text(RECIPE)
    result = cli("compress", "--recipe", recipe, "--out", tmp_path / "run")
    # the latency budget fails (exit 3) and says which runtime it was checked on
    assert result.exit_code == 3, result.output
    assert "ms on openvino 20" in result.stderr and "(fp32) > max_p50_ms 0.0001" in result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    validate = next(r for r in report["ledger"] if r["kind"] == "validate")
    details = validate["details"]
    assert details["budget_runtime"] == "openvino"
    assert details["runner"] == {
        "runtime": "openvino",
        "version": details["runtimes"]["openvino"]["version"],
        "precision": "fp32",
        "threads": 1,
    }
    # the export is the baseline itself; it runs on ORT and on OpenVINO in the same run
    assert set(details["runtimes"]) == {"ort", "openvino"}
    p50 = {rt: v["p50_ms"] for rt, v in details["runtimes"].items()}
    assert details["fastest_runtime"] == min(p50, key=p50.__getitem__)
    assert validate["latency_p50_ms"] == p50["openvino"]  # the budget was checked on the target
    runs = [(r["runtime"], r["precision"], r["threads"]) for r in details["bench"]["results"]]
    assert runs == [("ort", "fp32", 1), ("openvino", "fp32", 1)]  # the baseline first, timed once
    assert details["speedup_vs_baseline"] == pytest.approx(p50["ort"] / p50["openvino"])
