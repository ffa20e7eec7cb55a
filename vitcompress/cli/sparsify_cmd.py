from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitcompress.cli.common import (
    DATA_FORMS,
    JsonOpt,
    ModelArg,
    ModelFlags,
    OverwriteOpt,
    err_console,
    ledger_table,
    out_console,
    print_run_json,
    run_single_pass,
)
from vitcompress.cli.options import GENERATED, ConfigFlags, config_options, model_options
from vitcompress.errors import VitcompressError
from vitcompress.passes.sparsify.config import SparsifyConfig


@config_options(SparsifyConfig, flags={"layers": "--layer"})
@model_options
def sparsify(
    model: ModelArg,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Run directory: the sparse artifact (OUT/sparsify) and reports."),
    ],
    data: Annotated[
        str | None, typer.Option("--data", help=f"Calibration data for --method obs: {DATA_FORMS}.")
    ] = None,
    data_limit: Annotated[int | None, typer.Option(min=1, help="Use this many samples (stratified).")] = 512,
    bench: Annotated[
        bool, typer.Option("--bench", help="Also export to ONNX and measure latency against the original.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the calibration order and example inputs.")] = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    options: ConfigFlags[SparsifyConfig] = GENERATED,
    model_flags: ModelFlags = GENERATED,
) -> None:
    """Zero weights of the linear layers in a hardware pattern, post-training (no fine-tuning).

    --pattern 2:4 (the default) keeps 2 of every 4 weights along the input: NVIDIA sparse tensor
    cores run it (TensorRT, engine built with sparsity). --pattern block:RxC zeros whole R x C
    blocks, --sparsity of them (block:1x8 vectors, block:16x16 for block-sparse kernels, block:1x1
    unstructured); --allocation global lets robust layers give more. --method obs picks the zeros by
    their second-order (Hessian) error on --data and corrects the surviving weights (SparseGPT's
    OBS update), so accuracy holds without retraining; --method magnitude is the data-free baseline.
    Each layer keeps its mask: `vitcompress distill` on the result trains with the zeros fixed, and
    export and INT8 quantization keep them. Runs the same code as a one-pass recipe with
    `kind: sparsify`; OUT gets the artifact (OUT/sparsify) and the reports.

    Examples:
      vitcompress sparsify timm:deit_small_patch16_224 --out sp/ --method magnitude
      vitcompress sparsify timm:vit_tiny_patch16_224 --out sp/ --pattern 2:4 --data digits
      vitcompress sparsify pruned/ --out sp/ --pattern block:16x16 --sparsity 0.5 --allocation global --data fashion-mnist
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vitcompress.data import DataSection, DataSpec
    from vitcompress.report import fmt_bytes

    cfg = options.build()
    data_section = DataSection()
    if data is not None:
        data_section = DataSection(calibration=DataSpec.parse(data, limit=data_limit, seed=seed))
    elif cfg.needs_data():
        raise VitcompressError(
            "--method obs needs --data (calibration images)",
            hint="e.g. --data fashion-mnist or an image folder; or --method magnitude",
        )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=json_out,
    ) as bar:
        task = bar.add_task(f"sparsifying {model}", total=None)

        def progress(name: str, done: int, total: int, metrics: dict[str, float]) -> None:
            bar.update(task, completed=done, total=total, description=f"{name}: layers")

        result, record = run_single_pass(
            cfg,
            model,
            out,
            data=data_section,
            seed=seed,
            model_flags=model_flags,
            bench=bench,
            progress=progress,
            overwrite=overwrite,
        )
    if json_out:
        print_run_json(out, result, record)
        return
    from rich.table import Table

    details = record.details
    table = Table(title=f"{model} sparsified: {details['pattern']} ({details['method']})")
    for column in ("layer", "shape", "sparsity", "output error"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for item in details["layers"]:
        table.add_row(
            item["name"],
            "x".join(str(d) for d in item["shape"]),
            f"{item['sparsity']:.1%}" if item["sparsity"] is not None else item["note"],
            f"{item['output_error']:.2e}" if item["output_error"] is not None else "-",
        )
    out_console.print(table)
    out_console.print(ledger_table(result.ledger))
    out_console.print(
        f"{details['zeros']:,} of {details['weights']:,} weights zero ({details['sparsity']:.1%}); "
        f"those layers take {fmt_bytes(details['encoded_bytes'])} sparse-encoded vs "
        f"{fmt_bytes(details['dense_bytes'])} dense (fp32); artifact {record.artifact}"
    )
