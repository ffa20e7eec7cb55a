"""ONNX Runtime adapter: `.onnx` files (with vitcompress's safety checks) and ORT's mobile `.ort` format.

ORT computes in the file's own precision (an fp32 export in fp32, a QDQ file in int8, an fp16 file in
fp16), so a requested precision other than the file's is refused rather than silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vitcompress.errors import OnnxModelError, PrecisionUnavailableError
from vitcompress.runtime import OnnxRunner, Provider
from vitcompress.runtimes.base import METADATA_KEY, Device, Precision, Runner, RunnerInfo, parse_metadata

SUFFIXES = (".onnx", ".ort")

# Op types whose presence makes a file an int8 model (QDQ or integer ops), also as bytes: the .ort
# flatbuffer stores op types as plain strings.
_INT8_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "MatMulInteger",
    "QLinearMatMul",
    "DynamicQuantizeLinear",
    # ORT's fused int8 kernels, as an optimized (.ort) graph holds them
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
    "QAttention",
)


def version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def file_precision(path: Path) -> Precision:
    """int8 with integer/QDQ ops, fp16 with float16 weights, else fp32."""
    if path.suffix == ".ort":
        blob = path.read_bytes()
        return Precision.int8 if any(op.encode() in blob for op in _INT8_OPS) else Precision.fp32
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(n.op_type in _INT8_OPS for n in model.graph.node):
        return Precision.int8
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return Precision.fp16
    return Precision.fp32


class OrtRunner(Runner):
    def __init__(
        self,
        path: Path,
        device: Device = Device.cpu,
        precision: Precision | None = None,
        threads: int | None = None,
        provider: Provider | None = None,
    ) -> None:
        self.path = Path(path)
        provider = provider or (Provider.cpu if device is Device.cpu else Provider.cuda)
        if self.path.suffix == ".ort":
            self._open_ort_format(provider, threads)
        else:
            inner = OnnxRunner(self.path, provider=provider, threads=threads)
            self.session = inner.session
            self.input_name, self.input_shape, self.input_dtype = (
                inner.input_name,
                inner.input_shape,
                inner.input_dtype,
            )
        own = file_precision(self.path)
        if precision is not None and precision is not own:
            raise PrecisionUnavailableError(
                f"ONNX Runtime runs {self.path.name} in its own precision, {own.value}; {precision.value} was asked",
                hint="convert the file (quantize --mode fp16 / a static int8 preset), or use --runtime "
                "openvino for a bf16 precision hint",
            )
        self.info = RunnerInfo("ort", version(), provider.value, own.value, threads)

    def _open_ort_format(self, provider: Provider, threads: int | None) -> None:
        import onnxruntime as ort

        from vitcompress.runtime import require_provider

        if not self.path.is_file():
            raise OnnxModelError(f"ORT-format model {self.path} does not exist")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=require_provider(provider))
        except Exception as err:
            raise OnnxModelError(
                f"ONNX Runtime cannot open {self.path}: {str(err).splitlines()[0]}",
                hint="an .ort file must be written by a compatible onnxruntime (vitcompress convert --to ort-mobile)",
            ) from err
        meta = self.session.get_inputs()[0]
        self.input_name, self.input_shape = meta.name, list(meta.shape)
        self.input_dtype = np.float16 if "float16" in meta.type else np.float32

    def infer(self, batch: np.ndarray) -> Any:
        return self.session.run(None, {self.input_name: batch})[0]

    def metadata(self) -> dict[str, Any] | None:
        return parse_metadata(self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY))
