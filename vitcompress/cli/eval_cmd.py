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
    NumClassesOpt,
    TrustOpt,
    err_console,
    model_ref,
    out_console,
    print_json,
)
from vitcompress.evaluate import EVAL_BATCH_SIZE
from vitcompress.runtime import Provider


def evaluate(
    model: Annotated[
        str,
        typer.Argument(
            help="timm:NAME, hf:DIR, an artifact or run directory, or an .onnx file exported by vitcompress.",
            show_default=False,
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help=f"Labelled data: {DATA_FORMS}.",
        ),
    ],
    data_limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate this many samples (class-stratified).")
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Images per batch. The default is what compress's validate and quantize's gate score "
            "with, so the numbers compare (dynamic INT8 results depend on the batch).",
        ),
    ] = EVAL_BATCH_SIZE,
    provider: Annotated[
        Provider, typer.Option(help="ONNX Runtime provider (ONNX files only).")
    ] = Provider.cpu,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime threads (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the stratified subset.")] = 0,
    checkpoint: CheckpointOpt = None,
    num_classes: NumClassesOpt = None,
    img_size: ImgSizeOpt = None,
    in_chans: InChansOpt = None,
    trust_checkpoint: TrustOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Top-1, top-5 and mean cross-entropy of a model on labelled data, in PyTorch or ONNX Runtime.

    The data is preprocessed the way the model expects (its input size, channels, mean/std and
    interpolation; an .onnx file carries them in its metadata). The data's class count must match the
    model's.

    Examples:
      vitcompress eval timm:vit_tiny_patch16_224 --checkpoint ref.safetensors --in-chans 1 --data fashion-mnist:test
      vitcompress eval out/model.onnx --data fashion-mnist:test --json
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.evaluate import evaluate_onnx, evaluate_torch, onnx_input_spec

    spec = DataSpec.parse(data, limit=data_limit, seed=seed)
    is_onnx = model.endswith(".onnx")
    if is_onnx:
        path = Path(model)
        if not path.is_file():
            raise typer.BadParameter(f"{model} does not exist", param_hint="MODEL")
        input_spec, classes = onnx_input_spec(path)
        dataset = load_dataset(spec, input_spec, classes)
    else:
        from vitcompress.models import load_model

        loaded = load_model(model_ref(model, checkpoint, num_classes, img_size, in_chans, trust_checkpoint))
        dataset = load_dataset(spec, loaded.input, loaded.num_classes)
    with Progress(
        TextColumn("evaluating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=json_out,
    ) as progress:
        task = progress.add_task("", total=len(dataset))

        def advance(n: int) -> None:
            progress.advance(task, n)

        if is_onnx:
            result = evaluate_onnx(path, dataset, provider, threads, batch_size, advance)
        else:
            result = evaluate_torch(loaded, dataset, batch_size, advance)
    if json_out:
        print_json(result.to_dict())
        return
    out_console.print(
        f"{result.model} ({result.runtime}) on {result.data}: top-1 {result.top1:.2%}, top-5 {result.top5:.2%}, "
        f"loss {result.loss:.4f}, {result.samples} images in {result.wall_s:.1f} s ({result.images_per_s:.0f}/s)"
    )
