from __future__ import annotations

import json
import os
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
    out_console,
    print_run_json,
    run_single_pass,
)
from vitcompress.cli.options import GENERATED, ConfigFlags, config_options, model_options
from vitcompress.errors import VitcompressError
from vitcompress.passes.distill.config import DistillConfig


@config_options(DistillConfig)
@model_options
def distill(
    model: ModelArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run directory: the trained artifact, checkpoints, reports.")
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help=f"Training data: {DATA_FORMS}.",
        ),
    ],
    eval_data: Annotated[
        str | None,
        typer.Option(help="Test data (same forms), scored once at the end with the weights kept."),
    ] = None,
    val_data: Annotated[
        str | None,
        typer.Option(
            help="Validation data (same forms) the best weights are chosen on. Default: --val-fraction "
            "of --data held out (not trained on)."
        ),
    ] = None,
    data_limit: Annotated[
        int | None, typer.Option(min=1, help="Train on this many samples (stratified).")
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Teacher model (timm:NAME, hf:DIR, artifact). Default: the student as loaded. A timm "
            "teacher gets the student's class count, input size and channels unless its kwargs say otherwise."
        ),
    ] = None,
    teacher_checkpoint: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Weights for a timm teacher.")
    ] = None,
    teacher_kwargs: Annotated[
        str, typer.Option(help="timm constructor kwargs of the teacher, as JSON.")
    ] = "{}",
    clip_grad: Annotated[
        float,
        typer.Option(min=0.0, help="Max gradient norm; lower it if training diverges (0: no clipping)."),
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of data order, augmentation and initialization.")] = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    options: ConfigFlags[DistillConfig] = GENERATED,
    model_flags: ModelFlags = GENERATED,
) -> None:
    """Train a compressed model (the student) against its teacher: labels, soft KD, DeiT, feature KD.

    The best weights are chosen on validation data: --val-data, or by default a held-out part of
    --data that is not trained on; --eval-data is the test data, scored once at the end.
    Rerunning the same command after an interruption resumes from the last checkpoint in OUT exactly.
    Runs the same code as a one-pass recipe with `kind: distill`. Scale out with PyTorch's own engine:
    `torchrun --nproc-per-node 2 -m vitcompress distill ...` (gloo on CPU, nccl on GPU; rank 0 writes).

    Examples:
      vitcompress distill pruned/ --teacher timm:vit_tiny_patch16_224 --teacher-checkpoint ref.safetensors --data fashion-mnist --eval-data fashion-mnist:test --epochs 2 --out kd/
      torchrun --nproc-per-node 2 -m vitcompress distill pruned/ --data digits --steps 200 --out kd2/
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vitcompress.data import DataSection, DataSpec
    from vitcompress.passes.distill.config import TeacherSpec

    try:
        kwargs = json.loads(teacher_kwargs)
    except json.JSONDecodeError as err:
        raise VitcompressError(f"--teacher-kwargs is not JSON: {err}") from None
    teacher_spec = (
        TeacherSpec(source=teacher, checkpoint=teacher_checkpoint, kwargs=kwargs) if teacher else None
    )
    cfg = options.build(teacher=teacher_spec, clip_grad=clip_grad or None)
    section = DataSection(
        train=DataSpec.parse(data, limit=data_limit, seed=seed),
        eval=DataSpec.parse(eval_data) if eval_data else None,
        val=DataSpec.parse(val_data) if val_data else None,
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[speed]}  {task.fields[top1]}"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=json_out,
    ) as bar:
        task = bar.add_task("distill", total=None, loss="-", speed="", top1="")

        def progress(name: str, done: int, total: int, metrics: dict[str, float]) -> None:
            bar.update(
                task,
                completed=done,
                total=total,
                description=name,
                loss=f"{metrics['loss']:.4f}",
                speed=f"{metrics['images_per_s']:.0f} img/s" if "images_per_s" in metrics else "",
                top1=f"val top-1 {metrics['top1']:.2%}" if "top1" in metrics else "",
            )

        result, record = run_single_pass(
            cfg,
            model,
            out,
            data=section,
            seed=seed,
            model_flags=model_flags,
            progress=progress,
            overwrite=overwrite,
        )
    if int(os.environ.get("RANK", "0")) > 0:
        return  # under torchrun only rank 0 reports
    if json_out:
        print_run_json(out, result, record)
        return
    details = record.details
    evals = details["evals"]
    best = (
        f", best val top-1 {details['val_top1']:.2%} at step {details['best_step']}"
        if details.get("val_top1") is not None
        else ""
    )
    test = f", test top-1 {record.top1:.2%}" if record.top1 is not None else ""
    out_console.print(
        f"{details['steps']} steps (resumed from {details['resumed_from']}): loss {details['first_loss']:.4f} -> "
        f"{details['last_loss']:.4f}{best}{test}; weights chosen on {details['selected_on']}; "
        f"{details['images_per_s']:.0f} images/s; {len(evals)} evaluations; artifact {record.artifact}"
    )
