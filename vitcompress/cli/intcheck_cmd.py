from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitcompress.cli.common import JsonOpt, out_console, print_json


def integer_check(
    model: Annotated[Path, typer.Argument(help="An .onnx file, e.g. one built with --preset int-only.")],
    json_out: JsonOpt = False,
) -> None:
    """Prove an ONNX graph integer-only: list every op type and tensor element type between the
    input quantizer and the output dequantizer; exit code 4 when a float tensor sits inside.

    The op list is what an integer-only target (NPU, microcontroller, TVM integer target) must
    support to run the file. Build such a file with a quantize pass `preset: int-only`
    (`vitcompress compress --recipe int-only`).

    Examples:
      vitcompress integer-check out/model.intonly.onnx
      vitcompress integer-check out/model.onnx --json      # a float export: exit code 4
    """
    from vitcompress.passes.intonly.build import IntegerOnlyVerificationError, check_integer_only
    from vitcompress.runtime import check_onnx_file

    check_onnx_file(model)
    report = check_integer_only(model)
    if json_out:
        print_json({"model": str(model), **report.to_dict()})
    else:
        out_console.print(f"{model}\n{report.summary()}")
        for line in report.violations:
            out_console.print(f"  float inside: {line}")
    if not report.integer_only:
        raise IntegerOnlyVerificationError(
            f"{model} is not integer-only: {report.violations[0]}",
            hint="build it with a quantize pass, preset: int-only",
        )
