from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitcompress.cli.common import (
    DATA_FORMS,
    CheckpointOpt,
    ImgSizeOpt,
    InChansOpt,
    JsonOpt,
    ModelArg,
    ModelKwargsOpt,
    NumClassesOpt,
    NumHeadsOpt,
    OverwriteOpt,
    TrustOpt,
    build_config,
    ledger_table,
    out_console,
    parse_model_kwargs,
    print_run_json,
    run_single_pass,
)
from vitcompress.errors import PruneError
from vitcompress.passes.prune import Importance, PruneConfig, Scope, Structure

DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help=f"Data for taylor/hessian importance: {DATA_FORMS}.",
    ),
]


def prune(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory: the pruned artifact and reports.")],
    heads: Annotated[float, typer.Option(help="Fraction of attention heads to remove, in [0, 1).")] = 0.0,
    head_dim: Annotated[float, typer.Option(help="Fraction of each head's size to remove.")] = 0.0,
    mlp: Annotated[float, typer.Option(help="Fraction of MLP hidden channels to remove.")] = 0.0,
    embed: Annotated[
        float,
        typer.Option(
            help="Fraction of the embedding width to remove (needs --protect without the patch embedding)."
        ),
    ] = 0.0,
    target_macs: Annotated[
        float | None, typer.Option(help="Instead of fractions: MACs to keep, a fraction (<1) or a count.")
    ] = None,
    target_params: Annotated[
        float | None,
        typer.Option(help="Instead of fractions: parameters to keep, a fraction (<1) or a count."),
    ] = None,
    structure: Annotated[
        list[Structure] | None,
        typer.Option("--structure", help="What a target may remove (repeat; default: heads and mlp)."),
    ] = None,
    scope: Annotated[
        Scope, typer.Option(help="uniform: same fraction per block; global: ranked across blocks.")
    ] = Scope.uniform,
    importance: Annotated[
        Importance, typer.Option(help="l1/l2 magnitude; taylor or hessian (NViT) need --data.")
    ] = Importance.l2,
    steps: Annotated[int, typer.Option(min=1, help="Iterative pruning in this many steps.")] = 1,
    round_to: Annotated[int, typer.Option(min=1, help="Keep widths multiples of this.")] = 8,
    min_heads: Annotated[int, typer.Option(min=1, help="Never fewer heads per block.")] = 1,
    tolerance: Annotated[
        float, typer.Option(help="How close to the target (fraction of the original).")
    ] = 0.02,
    protect: Annotated[
        list[str] | None,
        typer.Option(
            "--protect",
            help="Module-name glob to keep whole (repeat). Default: the head(s) and patch embedding.",
        ),
    ] = None,
    data: DataOpt = None,
    data_limit: Annotated[int | None, typer.Option(min=1, help="Use this many samples (stratified).")] = 512,
    calibration_batches: Annotated[
        int, typer.Option(min=1, help="Batches for taylor/hessian importance.")
    ] = 8,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size of the importance batches.")] = 32,
    bench: Annotated[
        bool, typer.Option("--bench", help="Also export to ONNX and measure latency against the original.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of data order and example inputs.")] = 0,
    checkpoint: CheckpointOpt = None,
    num_classes: NumClassesOpt = None,
    img_size: ImgSizeOpt = None,
    in_chans: InChansOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    num_heads: NumHeadsOpt = None,
    trust_checkpoint: TrustOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Prune attention heads, head size, MLP width or embedding width for real (tensors shrink).

    Give fractions per structure (--heads 0.25 --mlp 0.5), or a target (--target-macs 0.5) that picks
    the structures to remove by importance per MAC. Runs the same code as a one-pass recipe with
    `kind: prune`; OUT gets the artifact (OUT/prune), report.md/json and recipe.resolved.yaml, and
    `vitcompress inspect OUT` shows the new per-block widths.

    Examples:
      vitcompress prune timm:deit_small_patch16_224 --out pruned/ --heads 0.25 --mlp 0.5
      vitcompress prune timm:vit_tiny_patch16_224 --checkpoint w.safetensors --out p/ --target-macs 0.5 --importance taylor --data fashion-mnist
    """
    from rich.table import Table

    from vitcompress.data import DataSection, DataSpec

    cfg = build_config(
        PruneConfig,
        heads=heads,
        head_dim=head_dim,
        mlp=mlp,
        embed=embed,
        target_macs=target_macs,
        target_params=target_params,
        structures=structure,
        scope=scope,
        importance=importance,
        steps=steps,
        round_to=round_to,
        min_heads=min_heads,
        tolerance=tolerance,
        protect=protect,
        calibration_batches=calibration_batches,
        batch_size=batch_size,
    )
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
        checkpoint=checkpoint,
        num_classes=num_classes,
        img_size=img_size,
        in_chans=in_chans,
        trust_checkpoint=trust_checkpoint,
        model_kwargs=parse_model_kwargs(model_kwargs, num_heads),
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
