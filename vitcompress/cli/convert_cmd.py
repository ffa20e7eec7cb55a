from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitcompress.cli.common import JsonOpt, err_console, out_console, print_json
from vitcompress.runtimes.convert import Target


def convert(
    model: Annotated[
        Path, typer.Argument(help="An .onnx file exported (or quantized) by vitcompress.", show_default=False)
    ],
    to: Annotated[
        Target,
        typer.Option(
            "--to",
            help="openvino: IR (.xml + .bin); ort-mobile: ONNX Runtime's .ort format for phones, with ORT's "
            "mobile usability check; tensorrt: an engine for this machine's NVIDIA GPU.",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file (default: MODEL with .xml / .ort / .engine)."),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="openvino: the precision hint to record and check (fp32 or bf16; default bf16 on CPUs with "
            "AVX512_BF16/AMX). tensorrt: the engine's precision (fp32, fp16, int8 from a QDQ file; default "
            "fp16, or int8 for a QDQ file). ort-mobile keeps the file's own."
        ),
    ] = None,
    parity_batch: Annotated[int, typer.Option(min=2, help="Images in the parity batch.")] = 8,
    json_out: JsonOpt = False,
) -> None:
    """Convert an ONNX export to another runtime's format and check it against the ONNX file.

    The result runs here next to the ONNX file on ONNX Runtime at batch 1 and at the parity batch
    and is held to the tolerance of the precision it runs in (printed): fp32 1e-4 + 1e-4 x max|logit|,
    bf16 1e-2 + 5e-2 x, an int8 file on another runtime 5e-2 + 1e-1 x. Exit code 4 (and no file
    left) when it does not match; 2 when the target cannot run here (TensorRT without a GPU, bf16
    on a CPU without AVX512_BF16/AMX).

    Examples:
      vitcompress convert model.onnx --to openvino --precision fp32
      vitcompress convert model.int8.onnx --to ort-mobile       # the cpu-arm64 deployment file
      vitcompress convert model.onnx --to tensorrt --precision fp16   # on a GPU machine
    """
    from vitcompress.runtimes.convert import SUFFIX, convert_model

    if precision is not None and precision not in ("fp32", "bf16", "fp16", "int8"):
        raise typer.BadParameter(f"{precision!r} is not fp32, bf16, fp16 or int8", param_hint="--precision")
    if not model.is_file():
        raise typer.BadParameter(f"{model} does not exist", param_hint="MODEL")
    out = out or model.with_suffix(SUFFIX[to])
    with err_console.status(f"converting {model.name} to {to.value}"):
        result = convert_model(model, to, out, precision, parity_batch)
    if json_out:
        print_json(result)
        return
    ran, parity = result.runner, result.parity
    out_console.print(
        f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB) for {ran['runtime']} {ran['version']}, runs in "
        f"{ran['precision']}\nparity vs {parity['reference']} on {parity['batch']} images: max |Δlogit| "
        f"{parity['max_abs_diff']:.2e} (allowed {parity['allowed_max_abs_diff']:.2e}), top-1 agreement "
        f"{parity['top1_agreement']:.1%}"
    )
    usability = result.details.get("mobile_usability")
    if usability:
        verdicts = ", ".join(f"{ep} {verdict}" for ep, verdict in usability.items())
        out_console.print(f"ORT mobile usability (would the NPU providers take it as is): {verdicts}")
