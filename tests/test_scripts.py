"""Benchmark scripts run on tiny settings so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_bench_export_script_smoke(tmp_path):
    out = tmp_path / "r.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/bench_export.py"),
            "--model",
            "vit_tiny_patch16_224",
            "--kwargs",
            '{"depth": 1, "img_size": 32, "patch_size": 8}',
            "--runs",
            "5",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| PyTorch eager fp32 |" in run.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["runtime"].split(",")[0] for r in results] == ["PyTorch eager fp32", "ORT fp32", "ORT fp32"]
    assert all(r["p50_ms"] > 0 for r in results)
    assert all(r["max_abs_diff"] < 1e-4 for r in results[1:])
