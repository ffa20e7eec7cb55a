from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vitcompress.cli.common import (
    JsonOpt,
    OverwriteOpt,
    SetOpt,
    err_console,
    out_console,
    parse_sets,
    print_json,
)

VaryOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--vary",
        "-g",
        help="PATH=V1,V2,... to try (repeatable; every combination runs, the grid). PATH is a recipe "
        "path: passes.0.heads, passes.prune.target_macs (a step by name, kind or index, or as errors "
        "name it: passes[0]), passes.quantize.calibration, data.calibration.limit. Values are YAML: 0.5, true, "
        "[heads, mlp]. (-v is the root's --verbose.)",
    ),
]


def sweep(
    recipe: Annotated[
        Path,
        typer.Option(
            "--recipe",
            "-r",
            help="Recipe YAML, or a ready recipe by name: quickstart, edge-cpu-int8, ... (`vitcompress recipe list`).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory: one folder per variant.")],
    vary: VaryOpt = None,
    sets: SetOpt = None,
    runs: Annotated[
        int | None,
        typer.Option(min=5, help="Timed runs per model in the final benchmark (default: sweep.runs or 50)."),
    ] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Run a recipe over a grid of settings; plot accuracy against latency, the Pareto frontier marked.

    Measures accuracy, latency, size and MACs of every variant and writes them as a table. The variants come from --vary options, or from the recipe's `sweep.vary` section when none is
    given. Each variant runs like `compress` into OUT/vNN-.../. Then the fp32 baseline and every
    variant's final ONNX are benchmarked together, interleaved, so the latency ratios come from one
    run. A variant that fails is listed with its error and the sweep goes on. Writes OUT/sweep.md,
    OUT/sweep.json and OUT/pareto.png. The recipe needs an export pass and data.eval.

    Example:
      vitcompress sweep --recipe recipes/prune-kd-digits.yaml --vary passes.prune.target_macs=0.35,0.6 --out sweep/
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
    from rich.text import Text

    from vitcompress.recipe import (
        apply_overrides,
        parse_assignment,
        read_recipe_data,
        read_recipe_text,
        resolve_recipe,
        validate_recipe,
    )
    from vitcompress.sweep import SWEEP_COLUMNS, Variant, plan_variants, run_sweep, sweep_rows

    recipe = resolve_recipe(recipe)
    text = read_recipe_text(recipe)
    data = apply_overrides(read_recipe_data(text, str(recipe)), parse_sets(sets))
    section = data.get("sweep")
    grid: dict[str, Any] = dict(parse_assignment(item, many=True) for item in vary or [])
    if not grid and isinstance(section, dict) and isinstance(section.get("vary"), dict):
        grid = dict(section["vary"])
    if not grid and section is not None:
        validate_recipe(data, text, str(recipe))  # says what is wrong with the sweep section
    # each variant is validated whole (its sweep section too) before any runs
    variants = plan_variants(data, grid, out, text, str(recipe))
    checked = variants[0].recipe.sweep
    total_runs = runs or (checked.runs if checked is not None else 50)
    err_console.print(f"sweep: {len(variants)} variants of {recipe} -> {out}")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("variants", total=len(variants))

        def on_variant(number: int, count: int, variant: Variant) -> None:
            label = f"variant {number + 1}/{count}: {variant.label}"
            progress.update(task, completed=number, description=label)

        def on_bench(done: int) -> None:
            progress.update(task, completed=len(variants), description="benchmark, all variants interleaved")

        result = run_sweep(variants, out, total_runs, on_variant, on_bench, overwrite=overwrite)
    if json_out:
        print_json(result.to_dict())
        return
    table = Table(title=f"sweep of {recipe}: accuracy vs latency")
    for column in SWEEP_COLUMNS:
        table.add_column(column, justify="left" if column in ("variant", "settings", "status") else "right")
    for row in sweep_rows(result):
        table.add_row(*(Text(cell) for cell in row))  # settings hold brackets: not rich markup
    out_console.print(table)
    out_console.print(f"plot: {out / 'pareto.png'}; table: {out / 'sweep.md'}, {out / 'sweep.json'}")
