"""Pass command options come from the pass configs' fields: every field with a command-line form is
an option, with the field's description as its help, and the flags of earlier releases still parse."""

from __future__ import annotations

import pytest
import typer

from vitcompress.cli import app
from vitcompress.cli.options import _cli_type
from vitcompress.passes import PASSES

# command -> (pass kind, field -> flag where they differ, fields the command declares or sets itself)
COMMANDS = {
    "prune": ("prune", {"structures": "--structure"}, set()),
    "factorize": ("lowrank", {"layers": "--layer"}, set()),
    "sparsify": ("sparsify", {"layers": "--layer"}, set()),
    "tokens": ("tokens", {}, {"r"}),
    "distill": ("distill", {}, {"teacher", "clip_grad"}),
    "quantize": ("quantize", {}, {"filename"}),
    "export": ("export", {}, {"filename"}),
}


def _command(name: str):
    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_config_field_is_an_option_with_its_description(name):
    kind, flags, own = COMMANDS[name]
    options = {o: p for p in _command(name).params for o in p.opts}
    config = PASSES[kind].config
    fields = [f for f in config.model_fields if f not in ("kind", "name") and f not in own]
    checked = 0
    for field in fields:
        info = config.model_fields[field]
        assert _cli_type(field, info.annotation) is not None, f"{field} has no command-line form"
        flag = flags.get(field, "--" + field.replace("_", "-"))
        assert flag in options, f"{name}: {field} has no {flag}"
        assert options[flag].help == info.description
        checked += 1
    assert checked == len(fields) > 3


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("prune", ["m", "-o", "x", "--structure", "heads", "--structure", "mlp", "-c", "README.md"]),
        ("factorize", ["m", "--out", "x", "--layer", "*.fc1", "--method", "auto", "--attention", "comcat"]),
        (
            "distill",
            ["m", "-o", "x", "--data", "digits", "--no-resume", "--cache-teacher", "--clip-grad", "0"],
        ),
        ("quantize", ["m.onnx", "--out", "y.onnx", "--preset", "cpu-x86-vnni", "--no-per-channel"]),
        ("tokens", ["m", "--out", "x", "--r", "4", "--fuse"]),
    ],
)
def test_flags_of_earlier_releases_still_parse(name, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    (tmp_path.parent / "README.md").write_text("a checkpoint stand-in")
    (tmp_path.parent / "m.onnx").write_text("")
    context = _command(name).make_context(name, list(args))
    assert context.params  # parsed, not run


def test_a_bad_value_names_the_flag_as_spelled(cli):
    result = cli("prune", "timm:vit_tiny_patch16_224", "--out", "never", "--heads", "1.5")
    assert result.exit_code == 2
    assert "--heads:" in result.output
