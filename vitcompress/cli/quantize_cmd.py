from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from vitcompress.cli.common import DATA_FORMS, JsonOpt, err_console, out_console, print_json
from vitcompress.cli.options import GENERATED, ConfigFlags, config_options
from vitcompress.passes.quantize.config import QuantizeConfig
from vitcompress.passes.quantize.onnx import refuse_integer_only_file


@config_options(QuantizeConfig, exclude={"filename"})  # the file name is --out's
def quantize(
    model: Annotated[
        Path, typer.Argument(help="A float32 .onnx file exported by vitcompress.", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output .onnx file, or .xml (OpenVINO IR + .bin) with --runtime openvino; written atomically.",
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option(help=f"Calibration data (static mode): {DATA_FORMS}."),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option(help="Held-out data: top-1 agreement, accuracy and the --max-top1-drop gate."),
    ] = None,
    eval_limit: Annotated[int | None, typer.Option(min=1, help="Images of --eval-data to use.")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Threads for --mode auto's timing (default: all cores).")
    ] = None,
    json_out: JsonOpt = False,
    options: ConfigFlags[QuantizeConfig] = GENERATED,
) -> None:
    """Quantize an exported model with ONNX Runtime (static INT8 QDQ, dynamic INT8, fp16) or for
    OpenVINO (NNCF INT8 IR, --runtime openvino).

    Static INT8 calibrates activation ranges on --data and quantizes the linear layers, keeping
    LayerNorm, Softmax, GELU and residual adds in float (ViT-aware placement). Presets expand into
    explicit settings. Prints the quantized node count by op type (it must be > 0), the size, and,
    with --eval-data, top-1 agreement and accuracy against the float model. Exit code 3 when
    --max-top1-drop cannot be met; the best model found is still written.

    Examples:
      vitcompress quantize model.onnx --out model.int8.onnx --preset cpu-x86-vnni --data fashion-mnist
      vitcompress quantize model.onnx --out model.dyn.onnx --mode dynamic
      vitcompress quantize model.onnx --out model.fp16.onnx --preset gpu-fp16 --no-verify-provider
      vitcompress quantize model.onnx --out model.int8.xml --preset cpu-x86-openvino-int8 --data fashion-mnist
    """
    from vitcompress.accuracy import onnx_input_spec
    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.errors import BudgetExceededError
    from vitcompress.passes.quantize.run import quantize_model
    from vitcompress.runtime import onnx_size

    cfg = options.build(filename=out.name)
    wanted = ".xml" if cfg.runtime == "openvino" else ".onnx"
    if out.suffix != wanted:
        raise typer.BadParameter(f"{out} must end in {wanted} (runtime {cfg.runtime})", param_hint="--out")
    refuse_integer_only_file(cfg)
    input_spec, classes = onnx_input_spec(model)
    calibration_data = None
    if cfg.needs_data():
        if data is None:
            from vitcompress.errors import QuantizeError

            raise QuantizeError(
                f"{cfg.mode.value} quantization needs --data for calibration", hint="or --mode dynamic"
            )
        spec = DataSpec.parse(data, limit=cfg.calibration_size)
        calibration_data = load_dataset(spec, input_spec, classes)
    held_out = (
        load_dataset(DataSpec.parse(eval_data, limit=eval_limit), input_spec, classes) if eval_data else None
    )
    if cfg.max_top1_drop is not None and held_out is None:
        raise typer.BadParameter("--max-top1-drop needs --eval-data", param_hint="--eval-data")
    with err_console.status(f"quantizing {model.name} ({cfg.mode.value})"):
        details = quantize_model(model, out, cfg, calibration_data, held_out, threads or os.cpu_count() or 1)
    details["size_bytes"] = onnx_size(out)
    details["float_size_bytes"] = onnx_size(model)
    details["settings"] = cfg.model_dump(mode="json")
    if json_out:
        print_json(details)
    else:
        counts = (
            ", ".join(f"{op} {n}" for op, n in sorted(details["quantized_counts"].items())) or "none (fp16)"
        )
        out_console.print(
            f"wrote {out} ({details['size_bytes'] / 1e6:.2f} MB, float {details['float_size_bytes'] / 1e6:.2f} MB); "
            f"quantized nodes: {counts}"
        )
        auto = details.get("auto")
        if auto:
            times = ", ".join(f"{mode} {ms:.2f} ms" for mode, ms in auto["p50_ms"].items())
            where = " on OpenVINO" if cfg.runtime == "openvino" else ""
            out_console.print(
                f"auto: {times} at batch 1{where} ({auto['threads']} threads): kept {auto['chosen']}"
            )
        mobile = details.get("ort_mobile")
        if mobile:
            verdicts = ", ".join(
                f"{ep} {v}" for ep, v in mobile["details"].get("mobile_usability", {}).items()
            )
            out_console.print(
                f"wrote {mobile['path']} (ORT mobile format, {mobile['size_bytes'] / 1e6:.2f} MB): max |Δlogit| "
                f"{mobile['parity']['max_abs_diff']:.2e} vs the .onnx; mobile usability: {verdicts}"
            )
        measured = details.get("agreement")
        if measured:
            out_console.print(
                f"on {measured['samples']} images: top-1 agreement {measured['top1_agreement']:.2%}, top-1 "
                f"{measured['quantized_top1']:.2%} vs float {measured['float_top1']:.2%}, max |Δlogit| {measured['max_abs_diff']:.3g}"
            )
    gate_info = details.get("gate")
    if gate_info is not None and not gate_info["met"]:
        raise BudgetExceededError(
            f"top-1 drop {gate_info['drop_points']:.2f} points > --max-top1-drop {cfg.max_top1_drop:g} "
            f"with {len(gate_info['kept_float'])} layer(s) back in float",
            hint=f"the best model found was written to {out}",
        )
