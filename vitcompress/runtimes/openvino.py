"""OpenVINO adapter: IR files (.xml + .bin) and .onnx files read by OpenVINO's ONNX frontend.

The precision is a hint OpenVINO applies when it compiles the model. Left unset, OpenVINO picks
the fastest the CPU has: on a CPU with AVX512_BF16 or AMX it runs an fp32 model in **bf16**, which
moves logits by about 1e-2, not 1e-5. So vitcompress always records the precision OpenVINO actually
applied (read back from the compiled model), and `--precision fp32` pins f32. An int8 model
(FakeQuantize nodes, as NNCF writes and as OpenVINO reads a QDQ ONNX file) computes its linear
layers in int8 and the rest in the hint's precision: recorded as e.g. "int8+bf16".

Threads: INFERENCE_NUM_THREADS, one stream, the LATENCY hint: the same setting ORT gets
(intra-op threads, one inter-op thread), so the two are compared like for like.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vitcompress.errors import PrecisionUnavailableError, ProviderUnavailableError, RuntimeModelError
from vitcompress.runtimes.base import (
    METADATA_KEY,
    RT_INFO_PATH,
    Device,
    Precision,
    Runner,
    RunnerInfo,
    parse_metadata,
    require_cpu_precision,
)

log = logging.getLogger(__name__)

SUFFIXES = (".xml", ".onnx")
# OpenVINO's names for the precisions a hint can ask for
HINTS = {Precision.fp32: "f32", Precision.bf16: "bf16", Precision.fp16: "f16"}


def version() -> str:
    import openvino

    return str(openvino.get_version()).split("-")[0]


def _core() -> Any:
    import openvino as ov

    return ov.Core()


def read_model(path: Path) -> Any:
    """An ov.Model from an IR or ONNX file, with one-line errors for the ways a file goes wrong."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeModelError(
            f"model {path} does not exist",
            hint="convert one with `vitcompress convert model.onnx --to openvino`",
        )
    if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
        raise RuntimeModelError(
            f"OpenVINO IR {path} has no weights file {path.with_suffix('.bin').name} beside it",
            hint="copy the .bin that was written with the .xml, or convert the model again "
            "(vitcompress convert model.onnx --to openvino)",
        )
    try:
        return _core().read_model(str(path))
    except Exception as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise RuntimeModelError(
            f"OpenVINO {version()} cannot read {path}: {first.strip()[:300]}",
            hint="the file is damaged or was written by an incompatible OpenVINO version: convert the "
            "ONNX export again with this one (vitcompress convert model.onnx --to openvino)",
        ) from err


def is_int8(model: Any) -> bool:
    return any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def model_metadata(model: Any, path: Path) -> dict[str, Any] | None:
    if model.has_rt_info(RT_INFO_PATH):
        return parse_metadata(model.get_rt_info(RT_INFO_PATH).astype(str))
    if path.suffix == ".onnx":
        import onnx

        props = onnx.load(str(path), load_external_data=False).metadata_props
        return parse_metadata(next((p.value for p in props if p.key == METADATA_KEY), None))
    return None


def recorded_hint(model: Any, path: Path) -> Precision | None:
    """The precision hint vitcompress recorded with the IR (`precision_hint` in its metadata), where
    this CPU has it; OpenVINO itself does not read a hint from the file."""
    from vitcompress.runtimes.base import CPU_PRECISION_FLAGS, cpu_flags

    recorded = (model_metadata(model, path) or {}).get("precision_hint")
    if recorded not in Precision.__members__:
        return None
    hint = Precision(recorded)
    needed = CPU_PRECISION_FLAGS.get(hint)
    if needed and not any(f in cpu_flags() for f in needed):
        log.warning(
            "%s records precision hint %s, which this CPU lacks: running it in fp32", path.name, hint.value
        )
        return Precision.fp32
    return hint


class OpenVINORunner(Runner):
    def __init__(
        self,
        path: Path,
        device: Device = Device.cpu,
        precision: Precision | None = None,
        threads: int | None = None,
    ) -> None:
        import openvino.properties as props
        import openvino.properties.hint as hints

        self.path = Path(path)
        if device is not Device.cpu:
            raise ProviderUnavailableError(
                "vitcompress runs OpenVINO on the CPU device only",
                hint="use --device cpu with --runtime openvino; for NVIDIA GPUs use --runtime tensorrt",
            )
        if precision is Precision.int8:
            raise PrecisionUnavailableError(
                "OpenVINO takes int8 from the model (NNCF's or a QDQ file's FakeQuantize nodes), not from a hint",
                hint="quantize first (vitcompress quantize --preset cpu-x86-openvino-int8) and run the "
                "result with the default or an fp32/bf16 precision",
            )
        if precision is not None:
            require_cpu_precision(precision)
        self.model = read_model(self.path)
        if precision is None:
            precision = recorded_hint(self.model, self.path)
        config: dict[str, Any] = {
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.num_streams: 1,
        }
        if threads:
            config[props.inference_num_threads] = threads
        if precision is not None:
            config[hints.inference_precision] = HINTS[precision]
        try:
            self.compiled = _core().compile_model(self.model, "CPU", config)
        except Exception as err:
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise RuntimeModelError(
                f"OpenVINO {version()} cannot compile {self.path} for the CPU: {first.strip()[:300]}"
            ) from err
        self.request = self.compiled.create_infer_request()
        port = self.model.inputs[0]
        self.input_name = port.get_any_name() if port.get_names() else "input"
        self.input_shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        self.input_dtype = np.float16 if port.get_element_type().get_type_name() == "f16" else np.float32
        hint = self.compiled.get_property(hints.inference_precision)
        name = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        applied = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(name, name)
        self.int8 = is_int8(self.model)
        self.info = RunnerInfo(
            "openvino", version(), "cpu", f"int8+{applied}" if self.int8 else applied, threads
        )

    def infer(self, batch: np.ndarray) -> Any:
        self.request.infer({0: batch})
        return self.request.get_output_tensor(0).data

    def run(self, batch: np.ndarray) -> np.ndarray:
        # OpenVINO reuses its output buffer on the next call: hand out a copy
        return np.array(super().run(batch), dtype=np.float32, copy=True)

    def metadata(self) -> dict[str, Any] | None:
        return model_metadata(self.model, self.path)


def save_ir(model: Any, xml: Path, metadata: dict[str, Any] | None, atomic: bool = True) -> Path:
    """Write `model` as IR (`xml` + its .bin, float weights kept in fp32, not OpenVINO's default fp16
    compression) carrying the vitcompress metadata in rt_info; with `atomic` both files appear
    together (callers already writing into a staging folder pass False)."""
    import openvino as ov

    from vitcompress.fileio import atomic_dir

    xml = Path(xml)
    if xml.suffix != ".xml":
        raise RuntimeModelError(
            f"an OpenVINO IR path must end in .xml, got {xml}", hint=f"use {xml.with_suffix('.xml')}"
        )
    if metadata is not None:
        model.set_rt_info(json.dumps(metadata), RT_INFO_PATH)
    if not atomic:
        ov.save_model(model, str(xml), compress_to_fp16=False)
        return xml
    with atomic_dir(xml.parent) as staging:
        ov.save_model(model, str(staging / xml.name), compress_to_fp16=False)
    return xml


def onnx_file_metadata(source: Path) -> dict[str, Any] | None:
    import onnx

    props = onnx.load(str(source), load_external_data=False).metadata_props
    return parse_metadata(next((p.value for p in props if p.key == METADATA_KEY), None))


def convert_onnx(source: Path) -> Any:
    """An ov.Model from an ONNX file (fp32, or QDQ int8: its Q/DQ pairs become FakeQuantize).

    Read with the Core's ONNX frontend: the same graph ov.convert_model gives (save_model applies
    the offline transformations to both), at a tenth of its time (0.04 s against 0.4-1.8 s)."""
    from vitcompress.runtime import check_onnx_file

    check_onnx_file(source)
    try:
        return _core().read_model(str(source))
    except Exception as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise RuntimeModelError(f"OpenVINO cannot convert {source}: {first.strip()[:300]}") from err


def onnx_to_ir(source: Path, xml: Path, atomic: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Convert an ONNX file to IR carrying the metadata (preprocessing, classes) the ONNX file
    carries, plus `extra` entries (the precision hint)."""
    meta = onnx_file_metadata(source)
    if meta is not None and extra:
        meta = {**meta, **extra}
    return save_ir(convert_onnx(source), xml, meta, atomic=atomic)
