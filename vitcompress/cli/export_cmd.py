from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitcompress.cli.common import (
    JsonOpt,
    ModelArg,
    ModelFlags,
    err_console,
    out_console,
    print_json,
)
from vitcompress.cli.options import GENERATED, ConfigFlags, config_options, model_options
from vitcompress.passes.export import ExportConfig


@config_options(ExportConfig, exclude={"filename"})  # the file name is --out's
@model_options
def export(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .onnx file (written atomically).")],
    seed: Annotated[int, typer.Option(help="Seed of the parity batch.")] = 0,
    json_out: JsonOpt = False,
    options: ConfigFlags[ExportConfig] = GENERATED,
    model_flags: ModelFlags = GENERATED,
) -> None:
    """Export to ONNX (fp32, dynamic batch axis) and verify the file against PyTorch.

    Checks: onnx.checker full check, an ONNX Runtime session at batch 1 and at the parity batch,
    max |Δlogit| and top-1 agreement against PyTorch. Exit code 4 if parity fails (no file is left).
    With --runtime openvino the IR is checked the same way, under fp32 and under its precision hint,
    each with the tolerance printed (bf16 is looser: it keeps 8 bits of mantissa).

    Examples:
      vitcompress export timm:deit_small_patch16_224 --out deit_s.onnx
      vitcompress export out/model --out pruned.onnx --opset 18
      vitcompress export timm:deit_small_patch16_224 --out deit_s.onnx --runtime openvino   # + deit_s.xml
    """
    from vitcompress.models import load_model
    from vitcompress.passes.export import export_model

    cfg = options.build(filename=out.name)
    loaded = load_model(model_flags.ref(model))
    with err_console.status(f"exporting {loaded.label} with {cfg.exporter.value}, opset {cfg.opset}"):
        result = export_model(loaded, out, cfg, seed=seed)
    if json_out:
        print_json(result)
        return
    out_console.print(
        f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {sum(result.op_counts.values())} nodes, "
        f"{result.exporter}, opset {result.opset}) in {result.wall_s:.1f} s\n"
        f"parity vs PyTorch on {result.parity.batch} images: max |Δlogit| {result.parity.max_abs_diff:.2e}, "
        f"top-1 agreement {result.parity.top1_agreement:.1%}; runs at batch {result.batch_sizes_checked}"
    )
    for hint, checked in (result.ir_parity or {}).items():
        runner = checked["runner"]
        out_console.print(
            f"wrote {result.ir_path} (OpenVINO {runner['version']}); parity under the {hint} hint "  # type: ignore[index]
            f"(ran {runner['precision']}): max |Δlogit| {checked['max_abs_diff']:.2e} "  # type: ignore[index]
            f"(allowed {checked['allowed_max_abs_diff']:.2e}), top-1 agreement {checked['top1_agreement']:.1%}"
        )
