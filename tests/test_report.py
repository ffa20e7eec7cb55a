"""report.md is a valid Markdown table; reports and recipes get the user's umask, like model.onnx."""

from __future__ import annotations

import os
import re
import stat

import pytest

from vitcompress.report import md_cell, md_row

RECIPE = """\
version: 1
name: tiny | piped
model:
  source: timm:vit_tiny_patch16_224
  num_classes: 10
  img_size: 16
  kwargs: {depth: 2, patch_size: 4, embed_dim: 64, num_heads: 2}
passes:
  - kind: export
  - kind: validate
    runs: 5
"""

UNESCAPED_PIPE = re.compile(r"(?<!\\)(?:\\\\)*\|")  # a pipe after an even number of backslashes


def _table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def test_cells_escape_pipes_backslashes_and_newlines():
    assert md_cell("max |Δlogit|") == "max \\|Δlogit\\|"
    assert md_cell("a\\|b") == "a\\\\\\|b"  # a backslash before a pipe stays a backslash
    assert md_cell("two\nlines") == "two lines"
    row = md_row(["x|y", "z\\", "w"])
    assert len(UNESCAPED_PIPE.findall(row)) == 4  # 3 cells: 4 column borders


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run under umask 022 and under 077: {umask: out_dir}."""
    from typer.testing import CliRunner

    from vitcompress.cli import app

    root = tmp_path_factory.mktemp("report")
    recipe = root / "tiny.yaml"
    recipe.write_text(RECIPE)
    outs = {}
    for mask in (0o022, 0o077):
        out = root / f"out-{mask:03o}"
        old = os.umask(mask)
        try:
            result = CliRunner().invoke(
                app, ["compress", "--recipe", str(recipe), "--out", str(out)], catch_exceptions=False
            )
        finally:
            os.umask(old)
        assert result.exit_code == 0, result.output
        outs[mask] = out
    return outs


def test_every_row_of_a_real_report_has_the_same_number_of_columns(runs):
    text = (runs[0o022] / "report.md").read_text()
    rows = _table_rows(text)
    assert len(rows) >= 5  # header, separator, load, export, validate
    counts = {len(UNESCAPED_PIPE.findall(row)) for row in rows}
    assert counts == {9}, rows  # 8 columns: 9 borders in every row
    assert "max \\|Δlogit\\|" in rows[0]
    assert text.startswith("# vitcompress report: tiny | piped")  # a heading, not a table: as written


def test_reports_and_recipes_get_the_mode_of_the_onnx_file(runs):
    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    for mask, expected in ((0o022, 0o644), (0o077, 0o600)):
        out = runs[mask]
        assert mode(out / "model.onnx") == expected
        for name in ("report.json", "report.md", "recipe.resolved.yaml"):
            assert mode(out / name) == mode(out / "model.onnx"), (mask, name)


def test_compute_floor_sentence_in_the_report_reads_the_right_way_round(runs):
    text = (runs[0o022] / "report.md").read_text()
    floor = next(line for line in text.splitlines() if line.startswith("Compute floor:"))
    assert re.search(r"p50 [\d.]+ ms runs at \d+% of its compute floor \(floor [\d.]+ ms: ", floor), floor
    assert "p50 is" not in floor


def test_atomic_writes_follow_the_umask_at_write_time(tmp_path):
    from vitcompress.fileio import write_text

    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


def test_a_noisy_measurement_is_said_in_both_reports(cli, tmp_path, monkeypatch):
    import json

    import vitcompress.timing as bench

    def jittery(calls, warmup, runs, on_step=None, block=1):
        return [[1.0] * (runs - 1) + [9.0] for _ in calls]

    monkeypatch.setattr(bench, "time_interleaved", jittery)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    result = cli("compress", "--recipe", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "noisy measurement" in result.stderr
    measurement = json.loads((tmp_path / "out" / "report.json").read_text())["measurement"]
    assert measurement["noisy"] is True and "p99 8.68 ms is 8.7x its p50" in measurement["noise_reasons"][0]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**Warning, noisy measurement:** model.onnx at batch 1: p99 8.68 ms" in text
