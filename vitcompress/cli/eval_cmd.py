from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitcompress.accuracy import EVAL_BATCH_SIZE
from vitcompress.choices import Precision, Provider, Runtime
from vitcompress.cli.common import (
    DATA_FORMS,
    JsonOpt,
    ModelFlags,
    err_console,
    out_console,
    print_json,
)
from vitcompress.cli.options import GENERATED, model_options

if TYPE_CHECKING:
    from vitcompress.data import DataSpec


@model_options
def evaluate(
    model: Annotated[
        str,
        typer.Argument(
            help="timm:NAME, hf:DIR, an artifact or run directory, or a model file vitcompress wrote: "
            ".onnx/.ort (ONNX Runtime), .xml (OpenVINO IR), .engine (TensorRT).",
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
    runtime: Annotated[
        Runtime | None,
        typer.Option(
            help="Runtime for a model file (default: its suffix's; an .onnx file can also run on openvino)."
        ),
    ] = None,
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="OpenVINO's precision hint: fp32 or bf16 (default: OpenVINO's choice, bf16 on CPUs that "
            "have it). ORT runs a file in its own precision.",
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime threads (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the stratified subset.")] = 0,
    mean: Annotated[
        str | None,
        typer.Option(
            help="Override the normalization mean: one value per channel, comma-separated, or one for "
            "all (in --input-range units). A model trained on [0, 1] inputs: --mean 0 --std 1.",
            show_default=False,
        ),
    ] = None,
    std: Annotated[
        str | None,
        typer.Option(help="Override the normalization std (as --mean).", show_default=False),
    ] = None,
    input_range: Annotated[
        str | None,
        typer.Option(
            "--input-range",
            help="Override the pixel scale before mean/std: 0-1 (pixels / 255) or 0-255.",
            show_default=False,
        ),
    ] = None,
    crop_pct: Annotated[
        float | None,
        typer.Option(
            min=0.01, max=1.0, help="Image folders: override the centre crop fraction.", show_default=False
        ),
    ] = None,
    num_workers: Annotated[
        int | None,
        typer.Option(min=0, help="Image folders: decoding threads (default: min(2, CPUs); 0: inline)."),
    ] = None,
    per_class: Annotated[
        bool, typer.Option("--per-class", help="Also report top-1 per class (table, or per_class in JSON).")
    ] = False,
    sanity: Annotated[
        bool,
        typer.Option(
            help="Check the score is trustworthy: not near chance, inputs on the model's scale, no other "
            "common preprocessing scoring far better on a few images (warns; JSON: sanity).",
        ),
    ] = True,
    json_out: JsonOpt = False,
    model_flags: ModelFlags = GENERATED,
) -> None:
    """Top-1, top-5 and mean cross-entropy of a model on labelled data, in PyTorch or ONNX Runtime.

    The data is preprocessed the way the model expects (its input size, channels, interpolation,
    crop, pixel range and mean/std; an .onnx file carries them in its metadata); --mean, --std,
    --input-range and --crop-pct override them. The data's class count must match the model's.

    Examples:
      vitcompress eval timm:vit_tiny_patch16_224 --checkpoint ref.safetensors --in-chans 1 --data fashion-mnist:test
      vitcompress eval out/model.onnx --data fashion-mnist:test --json
      vitcompress eval out/model.onnx --data photos/test --per-class --mean 0 --std 1
      vitcompress eval out/model.xml --data fashion-mnist:test --precision fp32   # OpenVINO IR
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vitcompress.accuracy import (
        evaluate_onnx,
        evaluate_torch,
        onnx_classes,
        onnx_input_spec,
        sanity_onnx,
        sanity_torch,
        warn_if_insane,
    )
    from vitcompress.data import DataSpec, load_dataset

    if input_range is not None and input_range not in ("0-1", "0-255"):
        raise typer.BadParameter(f"{input_range!r} is not 0-1 or 0-255", param_hint="--input-range")
    spec = DataSpec.parse(data, limit=data_limit, seed=seed)
    is_onnx = Path(model).suffix.lower() in (".onnx", ".ort", ".xml", ".engine", ".plan")
    model_classes: tuple[str, ...] | None = None
    if is_onnx:
        path = Path(model)
        if not path.is_file():
            raise typer.BadParameter(f"{model} does not exist", param_hint="MODEL")
        input_spec, classes = onnx_input_spec(path)
        model_classes = onnx_classes(path)
        spec = _with_overrides(spec, input_spec.channels, mean, std, input_range, crop_pct, num_workers)
        dataset = load_dataset(spec, input_spec, classes)
    else:
        if runtime is not None or precision is not None:
            raise typer.BadParameter(
                "--runtime and --precision apply to model files (.onnx, .xml, .engine); export the model first",
                param_hint="--runtime",
            )
        from vitcompress.models import load_model

        loaded = load_model(model_flags.ref(model))
        spec = _with_overrides(spec, loaded.input.channels, mean, std, input_range, crop_pct, num_workers)
        dataset = load_dataset(spec, loaded.input, loaded.num_classes)
    if model_classes is not None and model_classes != dataset.classes:
        err_console.print(
            f"[yellow]warning:[/] the model's classes ({_names(model_classes)}) are not the data's "
            f"({_names(dataset.classes)}); labels are matched by position"
        )
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
            result = evaluate_onnx(
                path, dataset, provider, threads, batch_size, advance, runtime=runtime, precision=precision
            )
        else:
            result = evaluate_torch(loaded, dataset, batch_size, advance)
    checked = None
    if sanity:
        checked = (
            sanity_onnx(path, dataset, result, provider, threads, runtime=runtime, precision=precision)
            if is_onnx
            else sanity_torch(loaded, dataset, result)
        )
        warn_if_insane(checked)
    if json_out:
        out = {**result.to_dict(per_class=per_class), "preprocessing": dataset.preprocessing()}
        if checked is not None:
            out["sanity"] = checked.to_dict()
        print_json(out)
        return
    out_console.print(
        f"{result.model} ({result.runtime} {result.runtime_version}, {result.precision}) on {result.data}: top-1 {result.top1:.2%}, top-5 {result.top5:.2%}, "
        f"loss {result.loss:.4f}, {result.samples} images in {result.wall_s:.1f} s ({result.images_per_s:.0f}/s)"
    )
    if per_class:
        from rich.table import Table

        table = Table(title="top-1 per class")
        for column in ("class", "name", "images", "correct", "top-1"):
            table.add_column(column, justify="left" if column == "name" else "right")
        for score in result.per_class:
            table.add_row(
                str(score.index), score.name, str(score.samples), str(score.correct), f"{score.top1:.2%}"
            )
        table.add_row(
            "",
            "all",
            str(result.samples),
            str(sum(c.correct for c in result.per_class)),
            f"{result.top1:.2%}",
        )
        out_console.print(table)
    if checked is not None and not checked.ok:
        err_console.print(
            f"[bold red]The score above is not trustworthy:[/] {checked.summary()}", soft_wrap=True
        )


def _floats(text: str | None, channels: int, flag: str) -> list[float] | None:
    """'0.485,0.456,0.406' -> floats; one value stands for every channel."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as err:
        raise typer.BadParameter(f"{text!r} is not comma-separated numbers", param_hint=flag) from err
    if len(values) == 1:
        values *= channels
    if len(values) != channels:
        raise typer.BadParameter(
            f"{len(values)} values for a model with {channels} channels", param_hint=flag
        )
    return values


def _with_overrides(
    spec: DataSpec,
    channels: int,
    mean: str | None,
    std: str | None,
    input_range: str | None,
    crop_pct: float | None,
    num_workers: int | None,
) -> DataSpec:
    stds = _floats(std, channels, "--std")
    if stds is not None and any(v <= 0 for v in stds):
        raise typer.BadParameter(f"{std!r}: std must be positive", param_hint="--std")
    update: dict[str, object] = {
        "mean": _floats(mean, channels, "--mean"),
        "std": stds,
        "input_range": input_range,
        "crop_pct": crop_pct,
        "num_workers": num_workers,
    }
    return type(spec).model_validate(
        {**spec.model_dump(), **{k: v for k, v in update.items() if v is not None}}
    )


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)})" if len(names) > 5 else "")
