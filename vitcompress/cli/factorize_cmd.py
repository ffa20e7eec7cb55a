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
    ledger_table,
    out_console,
    print_run_json,
    run_single_pass,
)
from vitcompress.cli.options import GENERATED, ConfigFlags, config_options, model_options
from vitcompress.errors import VitcompressError
from vitcompress.passes.lowrank.config import LowRankConfig


@config_options(LowRankConfig, flags={"layers": "--layer"})
@model_options
def factorize(
    model: ModelArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run directory: the factorized artifact and reports.")
    ],
    data: Annotated[
        str | None, typer.Option("--data", help=f"Calibration data for --method whitened/auto: {DATA_FORMS}.")
    ] = None,
    data_limit: Annotated[int | None, typer.Option(min=1, help="Use this many samples (stratified).")] = 512,
    bench: Annotated[
        bool, typer.Option("--bench", help="Also export to ONNX and measure latency against the original.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the data order and example inputs.")] = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    options: ConfigFlags[LowRankConfig] = GENERATED,
    model_flags: ModelFlags = GENERATED,
) -> None:
    """Replace linear layers by two thin ones from a truncated SVD (W ~= B @ A, rank r).

    Choose the rank with exactly one of --rank, --rank-fraction, --energy, --target-params or
    --target-macs (the targets spread ranks across layers by their spectra). --attention comcat
    shrinks every head to --attention-rank through the best per-head factors of its query-key and
    value-output products (COMCAT); it can run alone or with a rank rule. --method whitened
    preserves the layer's output on real activations (--data) rather than the weight itself. A layer
    whose rank would not save anything stays dense. Runs the same code as a one-pass recipe with
    `kind: lowrank`; OUT gets the artifact (OUT/lowrank) and the reports.

    Examples:
      vitcompress factorize timm:deit_small_patch16_224 --out fact/ --target-params 0.7
      vitcompress factorize timm:vit_tiny_patch16_224 --out f/ --energy 0.9 --method auto --data digits
      vitcompress factorize timm:deit_small_patch16_224 --out c/ --attention comcat --attention-rank 0.5
    """
    from rich.table import Table

    from vitcompress.data import DataSection, DataSpec

    cfg = options.build()
    data_section = DataSection()
    if data is not None:
        data_section = DataSection(calibration=DataSpec.parse(data, limit=data_limit, seed=seed))
    elif cfg.needs_data():
        raise VitcompressError(
            f"--method {cfg.method.value} needs --data",
            hint="e.g. --data fashion-mnist or an image folder; or --method svd",
        )
    result, record = run_single_pass(
        cfg,
        model,
        out,
        data=data_section,
        seed=seed,
        model_flags=model_flags,
        bench=bench,
        status=f"factorizing {model}",
        overwrite=overwrite,
    )
    if json_out:
        print_run_json(out, result, record)
        return
    table = Table(title=f"{model} factorized")
    for column in ("layer", "shape", "rank", "method", "energy kept", "output error"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for item in record.details["layers"]:
        table.add_row(
            item["name"],
            "x".join(str(d) for d in item["shape"]),
            str(item["rank"]) if item["rank"] is not None else "dense",
            item["method"] or "-",
            f"{item['energy_kept']:.3f}" if item["energy_kept"] is not None else "-",
            f"{item['output_error']:.2e}" if item["output_error"] is not None else "-",
        )
    out_console.print(table)
    out_console.print(ledger_table(result.ledger))
    out_console.print(
        f"params {record.details['params_ratio']:.1%} and MACs {record.details['macs_ratio']:.1%} of the original; "
        f"artifact {record.artifact}"
    )
