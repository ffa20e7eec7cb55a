"""TensorRT adapter: engines built from the parity-checked ONNX file with TensorRT's Python API.

An engine is compiled for one GPU model and one TensorRT version; loading it anywhere else fails,
and says so. fp16 engines are built with the FP16 flag; int8 engines from a QDQ file (quantize
--preset gpu-tensorrt-int8), whose scales TensorRT takes as they are (explicit quantization).
The batch axis of the engine's optimization profile spans 1..max_batch, optimal at 1.

Needs an NVIDIA GPU, the `tensorrt` package (`pip install 'vitcompress[tensorrt]'`) and a CUDA
build of torch (device buffers are torch tensors). Without them every entry point is a clear
error (exit 2), checked before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vitcompress.errors import (
    MissingDependencyError,
    PrecisionUnavailableError,
    ProviderUnavailableError,
    RuntimeModelError,
)
from vitcompress.runtimes.base import Device, Precision, Runner, RunnerInfo, parse_metadata

SUFFIXES = (".engine", ".plan")
INSTALL_HINT = "pip install 'vitcompress[tensorrt]' on a machine with an NVIDIA GPU and its driver"


def _tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as err:
        raise MissingDependencyError(
            "TensorRT is not installed: the tensorrt runtime needs the 'tensorrt' package and an NVIDIA GPU",
            hint=INSTALL_HINT + "; on this machine use --runtime ort or openvino",
        ) from err
    return tensorrt


def version() -> str:
    return str(_tensorrt().__version__)


def require_gpu() -> Any:
    """TensorRT and a CUDA GPU, or a clear error naming what is missing; returns the tensorrt module."""
    trt = _tensorrt()
    try:
        import torch

        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if not available:
        raise ProviderUnavailableError(
            "no NVIDIA GPU is usable here (torch.cuda.is_available() is false): TensorRT engines run on GPUs only",
            hint="run on a GPU machine with the NVIDIA driver and a CUDA build of torch; here use --runtime "
            "ort or openvino",
        )
    return trt


def build_engine(
    source: Path,
    engine: Path,
    precision: Precision = Precision.fp16,
    max_batch: int = 32,
    workspace_gb: float = 4,
) -> Path:
    """Build a serialized engine from an ONNX file (atomic write)."""
    from vitcompress.fileio import atomic_path
    from vitcompress.runtime import check_onnx_file, declared_inputs

    trt = require_gpu()
    check_onnx_file(source)
    import onnx

    proto = onnx.load(str(source), load_external_data=False)
    name, dims = declared_inputs(proto)[0]
    fixed = [int(d) if isinstance(d, int) else 1 for d in dims[1:]]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeModelError(f"TensorRT {trt.__version__} cannot parse {source}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision is Precision.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision is Precision.int8:
        if not any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
            raise PrecisionUnavailableError(
                f"an int8 engine is built from a QDQ file; {source.name} has no QuantizeLinear nodes",
                hint="quantize it first: vitcompress quantize model.onnx --preset gpu-tensorrt-int8 --no-verify-provider",
            )
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # float parts in fp16, as TensorRT's int8 guide advises
    elif precision is not Precision.fp32:
        raise PrecisionUnavailableError(
            f"TensorRT engines are built in fp32, fp16 or int8, not {precision.value}"
        )
    profile = builder.create_optimization_profile()
    profile.set_shape(name, [1, *fixed], [1, *fixed], [max_batch, *fixed])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeModelError(f"TensorRT {trt.__version__} could not build an engine from {source}")
    with atomic_path(engine) as staged:
        staged.write_bytes(bytes(serialized))
    # engines carry no metadata of their own: the preprocessing and precision go beside it
    meta = next((p.value for p in proto.metadata_props if p.key == "vitcompress.input"), None)
    sidecar = {"precision": precision.value, "input": json.loads(meta) if meta else None}
    Path(str(engine) + ".json").write_text(json.dumps(sidecar))
    return engine


class TensorRTRunner(Runner):
    def __init__(
        self,
        path: Path,
        device: Device = Device.gpu,
        precision: Precision | None = None,
        threads: int | None = None,
    ) -> None:
        import torch

        self.path = Path(path)
        if device is not Device.gpu:
            raise ProviderUnavailableError("TensorRT runs on the GPU device", hint="use --device gpu")
        if not self.path.is_file():
            raise RuntimeModelError(f"TensorRT engine {self.path} does not exist")
        trt = require_gpu()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeModelError(
                f"TensorRT {trt.__version__} cannot load {self.path} on {torch.cuda.get_device_name()}: an engine "
                "only loads on the GPU model and TensorRT version it was built with",
                hint="build it again here: vitcompress convert model.onnx --to tensorrt",
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input_name, self.output_name = inputs[0], next(n for n in names if n not in inputs)
        self.input_shape = [d if d >= 0 else None for d in self.engine.get_tensor_shape(self.input_name)]
        self.input_dtype = np.float32
        self.stream = torch.cuda.Stream()
        sidecar = self._sidecar()
        built = str(sidecar.get("precision", "fp32"))
        if precision is not None and precision.value != built:
            raise PrecisionUnavailableError(
                f"{self.path.name} was built in {built}; an engine runs in the precision it was built with",
                hint=f"build a {precision.value} engine: vitcompress convert model.onnx --to tensorrt --precision {precision.value}",
            )
        self.info = RunnerInfo("tensorrt", trt.__version__, "gpu", built, threads)

    def infer(self, batch: np.ndarray) -> Any:
        import torch

        shape = tuple(batch.shape)
        x = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
        self.context.set_input_shape(self.input_name, shape)
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        y = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return y.cpu().numpy()

    def _sidecar(self) -> dict[str, Any]:
        sidecar = Path(str(self.path) + ".json")
        return parse_metadata(sidecar.read_text()) or {} if sidecar.is_file() else {}

    def metadata(self) -> dict[str, Any] | None:
        meta = self._sidecar().get("input")
        return dict(meta) if isinstance(meta, dict) else None
