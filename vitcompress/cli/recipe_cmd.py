from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vitcompress.cli.common import JsonOpt, out_console, print_json

app = typer.Typer(
    help="List the ready recipes, validate recipes and show their schema.", no_args_is_help=True
)


@app.command("list")
def list_recipes(json_out: JsonOpt = False) -> None:
    """List the ready recipes that ship with vitcompress: name and what each is for.

    Use one by name from any directory (vitcompress compress --recipe edge-cpu-int8 --out out/), or
    copy its file (shown with --json) to change it.
    """
    from vitcompress.recipe import bundled_recipes, recipe_summary

    ready = bundled_recipes()
    if json_out:
        print_json([{"name": n, "path": str(p), "summary": recipe_summary(p)} for n, p in ready.items()])
        return
    width = max((len(n) for n in ready), default=0)
    for name, path in ready.items():
        out_console.print(f"{name:{width}}  {recipe_summary(path)}", markup=False, soft_wrap=True)


@app.command("validate")
def validate(
    recipe: Annotated[
        Path,
        typer.Argument(
            help="Recipe YAML file, or a ready recipe by name (see `recipe list`).", show_default=False
        ),
    ],
    resolved: Annotated[
        bool, typer.Option("--resolved", help="Print the recipe with every default filled in.")
    ] = False,
) -> None:
    """Check a recipe without running it: limits (1 MiB, 64 levels of nesting, 10,000 YAML nodes with
    aliases expanded), YAML syntax (line and column), every key and value, pass order. Writes nothing."""
    from vitcompress.recipe import dump_recipe, load_recipe, resolve_recipe

    recipe = resolve_recipe(recipe)
    parsed = load_recipe(recipe)
    if resolved:
        out_console.print(dump_recipe(parsed), markup=False, end="")
        return
    steps = " -> ".join(cfg.step_name for cfg in parsed.passes)
    out_console.print(
        f"{recipe}: valid recipe (version {parsed.version}, model {parsed.model.source}): {steps}",
        markup=False,
        soft_wrap=True,
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
