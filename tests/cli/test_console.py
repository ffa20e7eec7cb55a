"""One clean console: no third-party INFO floods, loading bars or raw warnings unless -v; help text
printed as written (no rich markup); -v/-q at the root; shell completion."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

TINY = ["timm:vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10"]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from tests.conftest import tiny_ref
    from vitcompress.models import load_model
    from vitcompress.passes.export import ExportConfig, export_model

    path = tmp_path_factory.mktemp("console") / "m.onnx"
    return export_model(load_model(tiny_ref("timm:vit_tiny_patch16_224")), path, ExportConfig()).path


def test_quantize_prints_no_onnx_runtime_info_flood(cli, tmp_path, tiny_onnx):
    result = cli("quantize", tiny_onnx, "--out", tmp_path / "q.onnx", "--mode", "dynamic")
    assert result.exit_code == 0, result.output
    assert "Quantization parameters for tensor" not in result.output
    assert "symbolic shape inference" not in result.output
    assert "quantized nodes" in result.stdout
    # the same messages are there with --verbose: the quiet run above did hide them
    verbose = cli("-v", "quantize", tiny_onnx, "--out", tmp_path / "v.onnx", "--mode", "dynamic")
    assert verbose.exit_code == 0, verbose.output
    assert "Quantization parameters for" in verbose.stderr


def test_loading_a_hugging_face_model_draws_no_progress_bar(cli, hf_vit_dir):
    result = cli("inspect", f"hf:{hf_vit_dir}")
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.output
    verbose = cli("-v", "inspect", f"hf:{hf_vit_dir}")
    assert verbose.exit_code == 0, verbose.output
    assert "Loading weights" in verbose.stderr  # the bar is there to hide
    again = cli("inspect", f"hf:{hf_vit_dir}")  # and hidden again after a verbose run
    assert "Loading weights" not in again.output


def test_third_party_warnings_and_info_only_with_verbose(cli, monkeypatch):
    import vitcompress.models.stats as stats

    real = stats.model_stats
    said = iter(range(100))

    def chatty(loaded):
        n = next(said)  # a new text each time: Python shows a warning once per text and place
        warnings.warn(f"some library deprecates something ({n})", UserWarning, stacklevel=1)
        logging.getLogger("somelib.core").info("somelib detail %d", n)
        logging.info("root-logger detail %d", n)  # what ONNX Runtime's quantizer does
        logging.getLogger("vitcompress.test").info("own message %d", n)
        return real(loaded)

    monkeypatch.setattr(stats, "model_stats", chatty)
    quiet = cli("inspect", *TINY)
    assert quiet.exit_code == 0, quiet.output
    assert "own message" in quiet.stderr
    for noise in ("deprecates something", "somelib detail", "root-logger detail", "UserWarning"):
        assert noise not in quiet.output, noise
    verbose = cli("--verbose", "inspect", *TINY)
    assert verbose.exit_code == 0, verbose.output
    for shown in ("deprecates something", "somelib detail", "root-logger detail", "own message"):
        assert shown in verbose.stderr, shown
    silent = cli("-q", "inspect", *TINY)
    assert silent.exit_code == 0 and "own message" not in silent.stderr
    both = cli("-v", "-q", "inspect", *TINY)
    assert both.exit_code == 2 and "not both" in both.output


def test_help_text_keeps_its_square_brackets():
    from typer.testing import CliRunner

    from vitcompress.cli import app

    runner = CliRunner()

    def help_words(*command: str) -> str:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())  # rich pads the panel: compare the words

    text = help_words("sweep")
    assert "Values are YAML: 0.5, true, [heads, mlp]." in text
    assert "-g" in text and "--vary" in text
    # every command: help renders, and a bracketed part of any help text survives
    assert "fashion-mnist[:train|test], digits[:train|test]" in help_words("prune")
    for command in ("compress", "inspect", "export", "eval", "distill", "quantize", "bench", "factorize"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0, command
    assert runner.invoke(app, ["recipe", "list", "--help"]).exit_code == 0


def test_verbose_is_v_at_the_root_and_completion_is_on():
    from typer.testing import CliRunner

    from vitcompress.cli import app

    help_text = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    for option in ("--verbose", "-v", "--quiet", "-q", "--install-completion", "--show-completion"):
        assert option in help_text, option
    script = subprocess.run(
        [sys.executable, "-m", "vitcompress", "--show-completion", "bash"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert script.returncode == 0 and "_vitcompress_completion" in script.stdout


def test_help_stays_fast_and_light():
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from typer.testing import CliRunner\n"
        "from vitcompress.cli import app\n"
        "r = CliRunner().invoke(app, ['--help']); r2 = CliRunner().invoke(app, ['sweep', '--help'])\n"
        "assert r.exit_code == 0 and r2.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'timm', 'onnxruntime', 'onnx', 'transformers', 'matplotlib') "
        "if m in sys.modules]\n"
        "print(heavy, time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    heavy, seconds = out.stdout.rsplit(" ", 1)
    assert heavy == "[]"
    assert float(seconds) < 10  # about 0.5 s; generous for a loaded CI machine
