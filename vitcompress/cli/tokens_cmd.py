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
from vitcompress.passes.tokens.config import TokensConfig


def _parse_r(values: list[str] | None) -> int | list[int] | None:
    """--r 8 (every block) or --r 0,0,12,12,... (one per block)."""
    if not values:
        return None
    text = ",".join(values)
    try:
        numbers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VitcompressError(
            f"--r: {text!r} is not a count or a comma-separated list of counts",
            hint="e.g. --r 8 or --r 0,0,16,16",
        ) from None
    return numbers[0] if len(numbers) == 1 and "," not in text else numbers


@config_options(TokensConfig)
@model_options
def tokens(
    model: ModelArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run directory: the artifact with the schedule, and reports.")
    ],
    r: Annotated[
        list[str] | None,
        typer.Option(
            "--r",
            metavar="N[,N...]",
            help="Tokens each block removes: one count (every block) or one per block, comma-separated.",
        ),
    ] = None,
    bench: Annotated[
        bool,
        typer.Option(
            "--bench",
            help="Also export to ONNX and measure latency (and top-1 with --data) against the original.",
        ),
    ] = False,
    data: Annotated[
        str | None, typer.Option("--data", help=f"With --bench: score top-1 of both on {DATA_FORMS}.")
    ] = None,
    data_limit: Annotated[
        int | None, typer.Option(min=1, help="Score this many samples (stratified).")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the example inputs.")] = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    options: ConfigFlags[TokensConfig] = GENERATED,
    model_flags: ModelFlags = GENERATED,
) -> None:
    """Shrink the token count block by block: merge similar tokens (ToMe) or prune unattended ones (EViT).

    Every block removes a fixed number of tokens between its attention and its MLP, so later blocks
    run on fewer tokens (attention cost falls with their square) and the ONNX graph keeps static
    shapes. Give exactly one of --r (per block) or --final-tokens (tokens after the last block).
    Class and distillation tokens are never touched. No weights change: accuracy drops a little
    without training, and `distill` can fine-tune with the reduction on. timm and Hugging Face ViT/DeiT.
    Runs the same code as a one-pass recipe with `kind: tokens`; OUT gets the artifact (OUT/tokens).

    Examples:
      vitcompress tokens timm:deit_small_patch16_224 --out tome/ --final-tokens 50 --bench
      vitcompress tokens timm:deit_small_patch16_224 --out tome/ --r 13 --schedule decreasing
      vitcompress tokens timm:vit_tiny_patch16_224 --out evit/ --method prune --r 0,0,0,20,0,0,20,0,0,20,0,0 --fuse
    """
    from rich.table import Table

    from vitcompress.data import DataSection, DataSpec

    cfg = options.build(r=_parse_r(r))
    if data is not None and not bench:
        raise VitcompressError("--data scores the exported model: give --bench too")
    data_section = (
        DataSection(eval=DataSpec.parse(data, limit=data_limit, seed=seed)) if data else DataSection()
    )
    result, record = run_single_pass(
        cfg,
        model,
        out,
        data=data_section,
        seed=seed,
        model_flags=model_flags,
        bench=bench,
        status=f"reducing the tokens of {model}",
        overwrite=overwrite,
    )
    if json_out:
        print_run_json(out, result, record)
        return
    details = record.details
    table = Table(title=f"{model}: {details['method']}, tokens per block")
    for column in ("block", "removes", "attention tokens", "MLP tokens"):
        table.add_column(column, justify="right")
    for item, removed in zip(details["tokens"], details["r"], strict=True):
        table.add_row(str(item["block"]), str(removed), str(item["attention"]), str(item["mlp"]))
    out_console.print(table)
    out_console.print(ledger_table(result.ledger))
    out_console.print(
        f"tokens {details['tokens'][0]['attention']} -> {details['final_tokens']}, "
        f"MACs {details['macs_ratio']:.1%} of the original; artifact {record.artifact}"
    )
