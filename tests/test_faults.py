"""Fault injection: kills at every kind of write point, SIGINT, concurrent runs, stale leftovers.

Each case was found against round 1 (two runs into one --out both exited 0 with their artifacts
mixed; an old run's files survived beside a new report; quantize showed an ungated model under its
final name; random-init tensors differed between two runs of one seeded recipe). Kills are real
(SIGKILL from inside a child process at its Nth rename, so no `finally` runs); resumes run in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

RECIPE = """\
version: 1
name: faults
model:
  source: timm:vit_tiny_patch16_224
  img_size: 32
  num_classes: 10
  kwargs: {depth: 2, patch_size: 8}
data:
  train: {source: digits, split: train, limit: 96}
passes:
  - kind: prune
    heads: 0.34
    mlp: 0.5
  - kind: distill
    steps: 2
    batch_size: 16
    feature: 1.0
  - kind: export
"""

# Runs the CLI in a child that dies (SIGKILL, or a KeyboardInterrupt like Ctrl-C) at its Nth rename.
INJECT = textwrap.dedent(
    """
    import os, signal, sys
    n, mode = int(sys.argv[1]), sys.argv[2]
    calls = [0]
    def wrap(fn):
        def inner(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise KeyboardInterrupt
            return fn(*args, **kwargs)
        return inner
    os.replace, os.rename = wrap(os.replace), wrap(os.rename)
    sys.argv = ["vitcompress", *sys.argv[3:]]
    from vitcompress.cli import main
    main()
    """
)

MODEL_FILES = (
    "model.onnx",
    "prune/model.safetensors",
    "prune/model.json",
    "distill/model.safetensors",
    "distill/model.json",
)


def _child(tmp_path: Path, n: int, mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    return subprocess.run(
        [sys.executable, str(script), str(n), mode, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )


def _leftovers(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.name.startswith((".tmp-", ".quantize-")) or p.name.endswith(".tmp")
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: what every interrupted-then-resumed run must reproduce bit for bit."""
    from typer.testing import CliRunner

    from vitcompress.cli import app

    base = tmp_path_factory.mktemp("reference")
    (base / "r.yaml").write_text(RECIPE)
    result = CliRunner().invoke(
        app, ["compress", "--recipe", str(base / "r.yaml"), "--out", str(base / "out")]
    )
    assert result.exit_code == 0, result.output
    return base / "out"


def test_a_seeded_recipe_is_reproducible_bit_for_bit(cli, tmp_path, reference):
    (tmp_path / "r.yaml").write_text(RECIPE)
    assert cli("compress", "--recipe", tmp_path / "r.yaml", "--out", tmp_path / "again").exit_code == 0
    for name in MODEL_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.slow
def test_kill_9_at_write_points_then_rerun_gives_the_uninterrupted_result(cli, tmp_path, reference):
    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    args = ("compress", "--recipe", tmp_path / "r.yaml", "--out", out)
    # the chain: each child resumes the directory the previous one was killed in, and dies one
    # rename further on (1: recipe.resolved.yaml; 3-5: the prune and distill artifacts and
    # checkpoints; 9: late in the run)
    for n in (1, 4, 9):
        child = _child(tmp_path, n, "kill", *args)
        assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    resumed = cli(*args)
    assert resumed.exit_code == 0, resumed.output
    assert _leftovers(out) == []
    for name in MODEL_FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_ctrl_c_exits_130_leaves_no_temp_files_and_frees_the_directory(cli, tmp_path, monkeypatch):
    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    real_replace, calls = os.replace, []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_replace(*args, **kwargs)

    monkeypatch.setattr(os, "replace", interrupted)
    result = cli("compress", "--recipe", tmp_path / "r.yaml", "--out", out)
    assert result.exit_code == 130 and "interrupted" in result.output
    assert _leftovers(out) == []
    monkeypatch.undo()
    assert cli("compress", "--recipe", tmp_path / "r.yaml", "--out", out).exit_code == 0


HOLD = textwrap.dedent(
    """
    import sys, time
    from vitcompress.rundir import claim_run_dir
    with claim_run_dir(sys.argv[1], "holder"):
        print("held", flush=True)
        time.sleep(120)
    """
)


def test_a_second_run_into_a_held_directory_exits_2_naming_the_holder(cli, tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = cli("compress", "--recipe", tmp_path / "r.yaml", "--out", out)
        assert result.exit_code == 2
        assert f"is in use by another run (pid {holder.pid} on " in result.output
        assert sorted(p.name for p in out.iterdir()) == [".vitcompress.lock", "run.json"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the dead holder's lock; its run.json names another recipe
    refused = cli("compress", "--recipe", tmp_path / "r.yaml", "--out", out)
    assert refused.exit_code == 2 and "is not empty: it holds a run of another recipe" in refused.output
    assert cli("compress", "--recipe", tmp_path / "r.yaml", "--out", out, "--overwrite").exit_code == 0


def test_another_recipe_into_an_old_run_directory_needs_overwrite(cli, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(RECIPE)
    second.write_text(
        RECIPE.replace("name: faults", "name: other").replace(
            "  - kind: distill\n    steps: 2\n    batch_size: 16\n    feature: 1.0\n", ""
        )
    )
    out = tmp_path / "out"
    assert cli("compress", "--recipe", first, "--out", out).exit_code == 0
    assert (out / "distill").is_dir()

    refused = cli("compress", "--recipe", second, "--out", out)
    assert refused.exit_code == 2
    assert "is not empty: it holds a run of another recipe" in refused.output
    assert "--overwrite" in refused.output

    (out / ".tmp-killed").mkdir()
    (out / ".model.onnx.abc.tmp").write_text("half")
    replaced = cli("compress", "--recipe", second, "--out", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "distill").exists() and not (out / "distill.train").exists()
    assert _leftovers(out) == []
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["ledger"]] == ["load", "prune", "export"]

    # the same recipe again resumes in place: no --overwrite needed
    (out / ".tmp-killed").mkdir()
    assert cli("compress", "--recipe", second, "--out", out).exit_code == 0
    assert _leftovers(out) == []


def test_out_that_is_a_file_or_holds_foreign_files(cli, tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    result = cli("compress", "--recipe", tmp_path / "r.yaml", "--out", a_file)
    assert result.exit_code == 2 and "is an existing file, not a directory" in result.output
    assert a_file.read_text() == "mine"

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"jpg")
    result = cli("compress", "--recipe", tmp_path / "r.yaml", "--out", foreign)
    assert result.exit_code == 2 and "holds files of no vitcompress run (cat.jpg)" in result.output
    assert (foreign / "cat.jpg").read_bytes() == b"jpg"


def test_quantize_shows_its_file_only_after_the_gate(tmp_path, monkeypatch):
    import vitcompress.passes.quantize as quantize
    import vitcompress.passes.quantize.onnx as quantize_onnx
    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.models import ModelRef, load_model
    from vitcompress.passes.export import ExportConfig, export_model

    loaded = load_model(
        ModelRef(
            "timm:vit_tiny_patch16_224", img_size=32, num_classes=10, kwargs={"depth": 2, "patch_size": 8}
        )
    )
    source = tmp_path / "model.onnx"
    export_model(loaded, source, ExportConfig())
    data = load_dataset(DataSpec(source="digits", limit=64), loaded.input, loaded.num_classes)
    target = tmp_path / "model.int8.onnx"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".quantize-auto-{dead.stdout.strip()}-x"
    stale.mkdir()
    (tmp_path / f".{target.name}.old.tmp").write_text("half")

    seen: list[bool] = []
    real_agreement = quantize.agreement

    def gate_measures(float_path, quant_path, *args, **kwargs):
        seen.append(target.exists())
        return real_agreement(float_path, quant_path, *args, **kwargs)

    monkeypatch.setattr(quantize_onnx, "agreement", gate_measures)  # where the gate calls it
    cfg = quantize.QuantizeConfig(mode="dynamic", max_top1_drop=100)
    details = quantize.quantize_model(source, target, cfg, None, data)
    assert seen == [False]  # the gate ran while no file stood under the final name
    assert target.is_file() and details["gate"]["met"]
    assert _leftovers(tmp_path) == []
    assert not stale.exists()


def test_rerunning_a_finished_recipe_skips_its_finished_passes(cli, tmp_path, reference, monkeypatch):
    import vitcompress.passes.distill.run as distill  # where the passes call them
    import vitcompress.passes.prune.run as prune

    out = tmp_path / "out"
    (tmp_path / "r.yaml").write_text(RECIPE)
    assert cli("compress", "--recipe", tmp_path / "r.yaml", "--out", out).exit_code == 0
    ran = []
    monkeypatch.setattr(prune, "prune_model", lambda *a, **k: ran.append("prune"))
    monkeypatch.setattr(distill, "distill_model", lambda *a, **k: ran.append("distill"))
    again = cli("compress", "--recipe", tmp_path / "r.yaml", "--out", out, "--json")
    assert again.exit_code == 0, again.output
    assert ran == []
    ledger = json.loads(again.stdout)["ledger"]
    first = json.loads((reference / "report.json").read_text())["ledger"]
    assert [(r["name"], r["macs"], r["params"]) for r in ledger] == [
        (r["name"], r["macs"], r["params"]) for r in first
    ]
    for name in MODEL_FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
