"""Options shared by several commands, output consoles, and flag-to-config conversion."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console

from vitcompress.errors import VitcompressError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from rich.table import Table

    from vitcompress.api import Result
    from vitcompress.data import DataSection
    from vitcompress.models import ModelRef
    from vitcompress.passes.base import PassConfig
    from vitcompress.state import PassRecord

# What `--data` accepts, for every command's help
DATA_FORMS = "fashion-mnist[:train|test], digits[:train|test], synthetic, or an image folder (class/xxx.jpg)"

out_console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

ModelArg = Annotated[
    str,
    typer.Argument(
        help="timm:NAME (e.g. timm:deit_small_patch16_224), hf:DIR (Hugging Face ViT/DeiT folder), "
        "or a vitcompress artifact directory.",
        show_default=False,
    ),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        "-c",
        exists=True,
        dir_okay=False,
        help="Weights for a timm model (.safetensors preferred; .pth/.pt/.bin are loaded weights-only).",
    ),
]
NumClassesOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Classifier size; a checkpoint head of another "
        "size is re-initialized (logged). Default: from the checkpoint.",
    ),
]
ImgSizeOpt = Annotated[
    int | None, typer.Option(min=8, help="Input resolution; position embeddings are resampled.")
]
InChansOpt = Annotated[int | None, typer.Option(min=1, help="Input channels (1 for grey images).")]
ModelKwargsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model-kwargs",
        help="KEY=VALUE timm constructor argument (repeatable; VALUE is YAML: 8, false, avg). The "
        "architecture is read from --checkpoint's tensors; these override it, and one that contradicts "
        "the tensors is an error naming them.",
        show_default=False,
    ),
]
NumHeadsOpt = Annotated[
    int | None,
    typer.Option(
        "--num-heads",
        min=1,
        help="Attention heads of a timm model (no tensor shows them). Default: the named model's when the "
        "checkpoint's width matches it, else 64 channels per head (a warned guess).",
        show_default=False,
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow unsafe pickle loading (runs code "
        "in the file). Only for files you made; the file's hash is logged.",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")
]


OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Empty OUT first when it holds another run. Without it such a directory is refused; "
        "rerunning the same recipe into it resumes.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="PATH=VALUE overriding the recipe (repeatable): passes.0.steps=50, "
        "passes.prune.target_macs=0.4 (a step by name or kind, or as errors print it: "
        "'passes[0] (prune).target_macs=0.4'), data.eval.limit=500. VALUE is YAML.",
    ),
]


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set PATH=VALUE` options as {path: value}."""
    from vitcompress.recipe import parse_assignment

    return dict(parse_assignment(item) for item in items or [])


_KWARG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_model_kwargs(items: list[str] | None, num_heads: int | None = None) -> dict[str, Any]:
    """`--model-kwargs KEY=VALUE` (VALUE a YAML scalar or flat list) and `--num-heads N` as kwargs."""
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not _KWARG_KEY.match(key):
            raise VitcompressError(
                f"--model-kwargs: {item!r} is not KEY=VALUE", hint="e.g. --model-kwargs patch_size=8"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise VitcompressError(f"--model-kwargs {key}: {text!r} is not a YAML value ({err})") from None
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-5 as a string
        if isinstance(value, dict) or (
            isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)
        ):
            raise VitcompressError(
                f"--model-kwargs {key}: give a scalar or a flat list, not {text!r}",
                hint="nested settings belong in a recipe's model.kwargs",
            )
        if key in kwargs and kwargs[key] != value:
            raise VitcompressError(f"--model-kwargs {key} is given twice ({kwargs[key]!r} and {value!r})")
        kwargs[key] = value
    if num_heads is not None:
        if "num_heads" in kwargs and kwargs["num_heads"] != num_heads:
            raise VitcompressError(
                f"--num-heads {num_heads} and --model-kwargs num_heads={kwargs['num_heads']!r} disagree",
                hint="give --num-heads only",
            )
        kwargs["num_heads"] = num_heads
    return kwargs


@dataclass(frozen=True)
class ModelFlags:
    """The flags of every command that builds a model from a reference (`@model_options` adds them):
    what a recipe's `model:` section says besides the source."""

    checkpoint: Path | None = None
    num_classes: int | None = None
    img_size: int | None = None
    in_chans: int | None = None
    model_kwargs: list[str] | None = None
    num_heads: int | None = None
    trust_checkpoint: bool = False

    def section(self) -> dict[str, Any]:
        """The recipe `model:` settings these flags give (`--model-kwargs` and `--num-heads` parsed)."""
        return {
            "checkpoint": self.checkpoint,
            "num_classes": self.num_classes,
            "img_size": self.img_size,
            "in_chans": self.in_chans,
            "kwargs": parse_model_kwargs(self.model_kwargs, self.num_heads),
            "trust_checkpoint": self.trust_checkpoint,
        }

    def ref(self, source: str) -> ModelRef:
        """The model `source` names, built as these flags say."""
        from vitcompress.models import as_model_ref

        return as_model_ref(source, **self.section())


C = TypeVar("C", bound=BaseModel)


def build_config(cls: type[C], flag_names: Mapping[str, str] | None = None, **flags: Any) -> C:
    """Validate CLI flags through the same pydantic config a recipe uses; errors name the flag
    (`flag_names`: field -> flag where the flag is not --field-name)."""
    try:
        return cls(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a rule across several options: the message names them
            raise VitcompressError(message) from None
        field = str(first["loc"][0])
        flag = (flag_names or {}).get(field, "--" + field.replace("_", "-"))
        raise VitcompressError(f"{flag}: {message} (got {first.get('input')!r})") from None


def _default(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")
    sys.stdout.flush()


def run_single_pass(
    cfg: PassConfig,
    model: str,
    out: Path,
    *,
    data: DataSection | None = None,
    seed: int = 0,
    model_flags: ModelFlags | None = None,
    bench: bool = False,
    status: str | None = None,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
    overwrite: bool = False,
) -> tuple[Result, PassRecord]:
    """What a pass command does: `vitcompress.api.run_pass` (a one-pass recipe, plus export and
    validate with `bench`) with a status spinner. Returns the run and the pass's ledger record."""
    import contextlib

    from vitcompress.api import run_pass

    options = model_flags.section() if model_flags is not None else {}
    splits = {} if data is None else {name: getattr(data, name) for name in type(data).model_fields}
    with err_console.status(status) if status is not None else contextlib.nullcontext():
        result = run_pass(
            cfg,
            model,
            out,
            data=splits,
            seed=seed,
            model_options=options,
            bench=bench,
            overwrite=overwrite,
            progress=progress,
        )
    return result, next(r for r in result.ledger if r.kind == cfg.kind)


def print_run_json(out: Path, result: Result, record: PassRecord) -> None:
    print_json(
        {"out_dir": str(out), "artifact": record.artifact, "ledger": [r.to_dict() for r in result.ledger]}
    )


def ledger_table(ledger: tuple[PassRecord, ...], title: str | None = None) -> Table:
    """The per-pass ledger as a rich table (params, MACs, size, parity, latency, top-1, wall time)."""
    from rich.table import Table

    from vitcompress.report import LEDGER_COLUMNS, ledger_rows

    table = Table(title=title)
    for column in LEDGER_COLUMNS:
        table.add_column(column, justify="left" if column == "pass" else "right")
    for row in ledger_rows(ledger):
        table.add_row(*row)
    return table
