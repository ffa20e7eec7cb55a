from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vitcompress.cli.common import out_console

app = typer.Typer(help="Validate recipes and show their schema.", no_args_is_help=True)


@app.command("validate")
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    resolved: Annotated[
        bool, typer.Option("--resolved", help="Print the recipe with every default filled in.")
    ] = False,
) -> None:
    """Check a recipe without running it: limits (1 MiB, 64 levels of nesting, 10,000 YAML nodes with
    aliases expanded), YAML syntax (line and column), every key and value, pass order. Writes nothing."""
    from vitcompress.recipe import dump_recipe, load_recipe

    parsed = load_recipe(recipe)
    if resolved:
        out_console.print(dump_recipe(parsed), markup=False, end="")
        return
    steps = " -> ".join(cfg.step_name for cfg in parsed.passes)
    out_console.print(
        f"{recipe}: valid recipe (version {parsed.version}, model {parsed.model.source}): {steps}",
        markup=False,
    )


@app.command("schema")
def schema(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to a file instead of stdout.")
    ] = None,
) -> None:
    """Print the recipe JSON schema (for editors and CI validation)."""
    from vitcompress.fileio import write_text
    from vitcompress.recipe import recipe_schema

    text = json.dumps(recipe_schema(), indent=2) + "\n"
    if out:
        write_text(out, text)
    else:
        typer.echo(text, nl=False)


@app.command("passes")
def passes() -> None:
    """List the registered pass kinds."""
    from vitcompress.passes import PASSES

    for spec in PASSES.values():
        out_console.print(f"{spec.kind:10} {spec.summary}", markup=False)
