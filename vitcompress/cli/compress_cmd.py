from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitcompress.cli.common import (
    JsonOpt,
    OverwriteOpt,
    SetOpt,
    err_console,
    ledger_table,
    out_console,
    parse_sets,
    print_json,
)


def compress(
    recipe: Annotated[
        Path,
        typer.Option(
            "--recipe",
            "-r",
            help="Recipe YAML, or a ready recipe by name: quickstart, edge-cpu-int8, ... (`vitcompress recipe list`).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for artifacts and reports.")],
    sets: SetOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Run a recipe: load the model, run its passes in order, print the per-pass ledger.

    Writes the artifacts, report.json, report.md and recipe.resolved.yaml (every default spelled out)
    to OUT, each file atomically. Exit code 3 when a budget in the recipe fails (reports are still written).

    Examples:
      vitcompress compress --recipe quickstart --out out/                 # a ready recipe, by name
      vitcompress compress --recipe recipes/quickstart.yaml --out out/
      vitcompress compress --recipe recipes/prune-kd-digits.yaml --set passes.prune.target_macs=0.4 --out out/
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from vitcompress.pipeline import run_recipe
    from vitcompress.recipe import load_recipe, resolve_recipe

    recipe = resolve_recipe(recipe)
    parsed = load_recipe(recipe, parse_sets(sets))
    steps = ["load"] + [cfg.step_name for cfg in parsed.passes]
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("", total=len(steps))

        def on_pass(index: int, name: str) -> None:
            progress.update(task, completed=index, description=f"[{index + 1}/{len(steps)}] {name}")

        def on_progress(name: str, done: int, total: int, metrics: dict[str, float]) -> None:
            loss = f", loss {metrics['loss']:.4f}" if "loss" in metrics else ""  # training passes report one
            progress.update(task, description=f"{name}: step {done}/{total}{loss}")

        result = run_recipe(parsed, out, on_pass=on_pass, progress=on_progress, overwrite=overwrite)
    if json_out:
        print_json(
            {
                "out_dir": str(out),
                "ledger": [r.to_dict() for r in result.ledger],
                "final_onnx": result.state.onnx_path,
            }
        )
        return
    out_console.print(ledger_table(result.ledger, title=f"{parsed.name or parsed.model.source} -> {out}"))
    out_console.print(
        f"reports: {out / 'report.md'}, {out / 'report.json'}; recipe: {out / 'recipe.resolved.yaml'}"
    )
