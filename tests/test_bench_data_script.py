"""scripts/bench_data.py runs on tiny folders so it cannot rot (not a timed test: the numbers are
machine-dependent; only their presence and the image counts are checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_bench_data_script_smoke(tmp_path):
    out = tmp_path / "data.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_data.py"), "--smoke", "--eager", "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| folder images | mode | peak RSS (MB) |" in run.stdout and "Streaming peak RSS" in run.stdout
    results = json.loads(out.read_text())["results"]
    assert [(r["folder_images"], r["mode"].split(" ")[0]) for r in results] == [
        (40, "streaming"),
        (40, "eager"),
    ]
    assert all(r["images"] == r["folder_images"] for r in results)
    assert all(r["peak_rss_mb"] > 0 and r["images_per_s"] > 0 for r in results)
