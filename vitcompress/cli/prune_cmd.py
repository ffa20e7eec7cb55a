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
from vitcompress.errors import PruneError
from vitcompress.passes.prune.config import PruneConfig

# Config fields whose flag is not --field-name (kept as they were before the options were generated)
FLAGS = {"structures": "--structure"}

DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help=f"Data for taylor/hessian importance: {DATA_FORMS}.",
    ),
]


@config_options(PruneConfig, flags=FLAGS)
@model_options
def prune(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory: the pruned artifact and reports.")],
    data: DataOpt = None,
    data_limit: Annotated[int | None, typer.Option(min=1, help="Use this many samples (stratified).")] = 512,
    bench: Annotated[
        bool, typer.Option("--bench", help="Also export to ONNX and measure latency against the original.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of data order and example inputs.")] = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    options: ConfigFlags[PruneConfig] = GENERATED,
    model_flags: ModelFlags = GENERATED,
) -> None:
    """Prune attention heads, head size, MLP width or embedding width for real (tensors shrink).

    Give fractions per structure (--heads 0.25 --mlp 0.5), or a target (--target-macs 0.5) that picks
    the structures to remove by importance per MAC. Runs the same code as a one-pass recipe with
    `kind: prune`; OUT gets the artifact (OUT/prune), report.md/json and recipe.resolved.yaml, and
    `vitcompress inspect OUT` shows the new per-block widths.

    Examples:
      vitcompress prune timm:deit_small_patch16_224 --out pruned/ --heads 0.25 --mlp 0.5
      vitcompress prune timm:vit_tiny_patch16_224 --checkpoint w.safetensors --out p/ --target-macs 0.5 --importance taylor --data fashion-mnist
      vitcompress prune timm:deit_small_patch16_224 --out p/ --target-speedup 2 --structure heads --structure mlp

    A latency target (--target-latency-ms / --target-speedup) ranks heads, head-size and MLP chunks of
    every block by saliency per millisecond saved, from the target's measured latency table, cuts
    widths in the multiples the table found fast, then exports the result, measures it against the
    original and re-plans if it missed (--remeasure); the ledger shows predicted and measured p50.
    """
    from rich.table import Table

    from vitcompress.data import DataSection, DataSpec

    cfg = options.build()
    data_section = DataSection()
    if data is not None:
        data_section = DataSection(calibration=DataSpec.parse(data, limit=data_limit, seed=seed))
    elif cfg.importance.needs_data:
        raise PruneError(
            f"--importance {cfg.importance.value} needs --data",
            hint="e.g. --data fashion-mnist, --data digits or an image folder; or use --importance l2",
        )
    result, record = run_single_pass(
        cfg,
        model,
        out,
        data=data_section,
        seed=seed,
        model_flags=model_flags,
        bench=bench,
        status=f"pruning {model}",
        overwrite=overwrite,
    )
    if json_out:
        print_run_json(out, result, record)
        return
    blocks = Table(
        title=f"{model} pruned ({record.details['importance']}): embed {record.details['embed_dim']}"
    )
    for column in ("block", "heads", "head_dim", "mlp"):
        blocks.add_column(column, justify="right")
    for index, block in enumerate(record.details["blocks"]):
        blocks.add_row(str(index), str(block["num_heads"]), str(block["head_dim"]), str(block["mlp_hidden"]))
    out_console.print(blocks)
    out_console.print(ledger_table(result.ledger))
    out_console.print(
        f"MACs {record.details['macs_ratio']:.1%} and params {record.details['params_ratio']:.1%} of the original; "
        f"artifact {record.artifact}"
    )
    target = record.details.get("target") or {}
    for attempt in target.get("attempts", []):
        measured = f", measured {attempt['measured_ms']:.3f} ms" if "measured_ms" in attempt else ""
        kept = " (kept: the closest; the goal was missed)" if attempt.get("kept") else ""
        out_console.print(
            f"latency attempt {attempt['attempt']}: predicted {attempt['predicted_ms']:.3f} ms{measured} "
            f"(goal {attempt.get('goal_ms', target['goal_ms']):.3f} ms on {target['runtime']}){kept}"
        )
