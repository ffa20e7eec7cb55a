"""Convert a parity-checked ONNX file into another runtime's format, and check it against the ONNX file.

- openvino: IR (.xml + .bin) with the ONNX file's metadata in rt_info and the precision hint recorded;
- ort-mobile: ONNX Runtime's .ort format (`onnxruntime.tools.convert_onnx_models_to_ort`, fixed
  optimizations, for ARM: `session.qdqisint8allowed`), plus ORT's mobile usability check (how well
  NNAPI and CoreML would take the graph); the cpu-arm64 preset's deployment format;
- tensorrt: a serialized engine (fp32, fp16, or int8 from a QDQ file), on a machine with an NVIDIA GPU.

Every result is run on this machine next to the ONNX file on ONNX Runtime (the reference) at batch
1 and at the parity batch, and held to the tolerance of the precision it runs in (runtimes.parity);
an int8 file on another runtime is held to the int8 tolerance (other kernels round differently).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from vitcompress.errors import RuntimeModelError

log = logging.getLogger(__name__)


class Target(str, Enum):
    openvino = "openvino"
    ort_mobile = "ort-mobile"
    tensorrt = "tensorrt"


SUFFIX = {Target.openvino: ".xml", Target.ort_mobile: ".ort", Target.tensorrt: ".engine"}


@dataclass
class ConvertResult:
    source: Path
    path: Path
    target: str
    runner: dict[str, Any]
    parity: dict[str, Any]
    size_bytes: int
    details: dict[str, Any] = field(default_factory=dict)


def to_ort_format(source: Path, out: Path, arm: bool = True) -> Path:
    """ONNX Runtime's .ort file (fixed optimizations) beside `out`, written atomically."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from vitcompress.fileio import atomic_path

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "model.onnx"
        shutil.copyfile(source, work)
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                convert_onnx_models_to_ort(
                    work,
                    output_dir=Path(tmp) / "out",
                    optimization_styles=[OptimizationStyle.Fixed],
                    target_platform="arm" if arm else None,
                )
        except Exception as err:
            raise RuntimeModelError(
                f"ONNX Runtime cannot convert {source} to the .ort format: {err}"
            ) from err
        produced = sorted((Path(tmp) / "out").glob("*.ort"))
        if not produced:
            tail = chatter.getvalue().strip().splitlines()[-1:] or ["no output"]
            raise RuntimeModelError(f"ONNX Runtime wrote no .ort file for {source}: {tail[0]}")
        with atomic_path(out) as staged:
            shutil.copyfile(produced[0], staged)
    return out


def mobile_usability(source: Path) -> dict[str, str]:
    """ORT's mobile usability checker: per execution provider, YES / MAYBE / NO (as it logs them)."""
    from onnxruntime.tools.mobile_helpers.usability_checker import analyze_model

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    checker_log = logging.getLogger("vitcompress.usability_checker")
    checker_log.setLevel(logging.INFO)
    checker_log.propagate = False
    handler = Collect()
    checker_log.addHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            analyze_model(Path(source), skip_optimize=False, logger=checker_log)
    finally:
        checker_log.removeHandler(handler)
    verdicts: dict[str, str] = {}
    for line in records:
        if line.startswith("Model should perform well with ") and " as is: " in line:
            ep, verdict = line.removeprefix("Model should perform well with ").split(" as is: ")
            verdicts[ep] = verdict.strip()
    return verdicts


def convert_model(
    source: Path,
    target: Target,
    out: Path,
    precision: str | None = None,
    parity_batch: int = 8,
    seed: int = 0,
) -> ConvertResult:

    from vitcompress.runtime import check_onnx_file, onnx_size
    from vitcompress.runtimes import Device, Precision, open_runner
    from vitcompress.runtimes import parity as gate
    from vitcompress.runtimes.ort import file_precision

    source, out = Path(source), Path(out)
    if source.suffix != ".onnx":
        raise RuntimeModelError(
            f"convert reads an .onnx file, got {source}", hint="export one with vitcompress export"
        )
    if out.suffix != SUFFIX[target]:
        raise RuntimeModelError(
            f"--to {target.value} writes {SUFFIX[target]} files, got {out}",
            hint=f"use {out.with_suffix(SUFFIX[target])}",
        )
    check_onnx_file(source)
    own = file_precision(source)
    details: dict[str, Any] = {}
    hint = Precision(precision) if precision else None
    if target is Target.tensorrt:
        from vitcompress.runtimes.tensorrt import build_engine

        build_engine(source, out, hint or (Precision.int8 if own is Precision.int8 else Precision.fp16))
        runner = open_runner(out, device=Device.gpu)
    elif target is Target.openvino:
        from vitcompress.runtimes.base import default_ir_precision, require_cpu_precision
        from vitcompress.runtimes.openvino import onnx_to_ir

        if hint is not None:
            require_cpu_precision(hint)
        recorded = (hint.value if hint else None) or default_ir_precision()
        onnx_to_ir(source, out, extra={"precision_hint": recorded})
        runner = open_runner(out, precision=hint)
    else:
        if hint is not None and hint is not own:
            raise RuntimeModelError(
                f"the .ort format keeps the file's own precision ({own.value}); --precision {hint.value} was asked",
                hint="quantize first (vitcompress quantize --preset cpu-arm64) and convert that file",
            )
        to_ort_format(source, out)
        details["mobile_usability"] = mobile_usability(source)
        runner = open_runner(out)
    try:
        checked, tolerance = _check(source, runner, own, parity_batch, seed)
    except Exception:
        for written in (out, out.with_suffix(".bin"), Path(str(out) + ".json")):
            if written != source:
                written.unlink(missing_ok=True)
        raise
    return ConvertResult(
        source=source,
        path=out,
        target=target.value,
        runner=runner.info.to_dict(),
        parity=gate.report(checked, tolerance, runner.info.to_dict()),
        size_bytes=onnx_size(out),
        details=details,
    )


def _check(source: Path, runner: Any, own: Any, parity_batch: int, seed: int) -> tuple[Any, Any]:
    import numpy as np

    from vitcompress.runtimes import Precision
    from vitcompress.runtimes import parity as gate
    from vitcompress.runtimes.ort import OrtRunner

    reference = OrtRunner(source)
    tolerance = (
        gate.TOLERANCES[Precision.int8]
        if own is Precision.int8
        else gate.tolerance_for(runner.info.precision)
    )
    checked = None
    for batch in (1, parity_batch):
        shape = [batch] + [d if isinstance(d, int) else 1 for d in reference.input_shape[1:]]
        images = np.random.default_rng(seed + batch).standard_normal(shape).astype(np.float32)
        checked = gate.measure(reference.run, runner, images, f"{source.name} on ONNX Runtime")
        gate.check(
            checked,
            tolerance,
            f"{runner.path.name} ({runner.info.runtime} {runner.info.precision})",
            "the converted file was removed; run the ONNX file on ONNX Runtime, and report the model",
        )
    assert checked is not None
    return checked, tolerance
