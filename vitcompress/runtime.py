"""ONNX Runtime sessions and ONNX file safety checks, shared by export, bench and the pipeline."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitcompress.choices import Provider
from vitcompress.errors import InputShapeError, OnnxModelError, ProviderUnavailableError

ORT_PROVIDERS: dict[Provider, tuple[str, ...]] = {
    Provider.cpu: ("CPUExecutionProvider",),
    Provider.cuda: ("CUDAExecutionProvider", "CPUExecutionProvider"),
    # TensorRT falls back to CUDA, then CPU, for any node it does not take.
    Provider.tensorrt: ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


# A declared input with more values per image than this cannot be run by anyone (4 GB in fp32).
MAX_INPUT_VALUES = 10**9


def _load_proto(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise OnnxModelError(f"{path} is not a readable ONNX model: {str(err).splitlines()[0]}") from err


def check_external_data(path: Path) -> set[Path]:
    """Reject external-data references that escape the model's folder (CVE-2024-27318).

    Returns the external data files the model uses, each checked to be a plain file beside it.
    """
    return _external_files(_load_proto(path), path)


def declared_inputs(model: Any) -> list[tuple[str, list[int | str | None]]]:
    """The graph inputs (initializers excluded) and their declared dims: int, symbolic name or None."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        dims: list[int | str | None] = []
        if value.type.tensor_type.HasField("shape"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_value"):
                    dims.append(int(dim.dim_value))
                else:
                    dims.append(dim.dim_param or None)
        inputs.append((value.name, dims))
    return inputs


def check_input_dims(path: Path, name: str, dims: list[int | str | None], what: str = "input") -> None:
    """Refuse a declared input no one can run: a dimension of 0 or less, or more than
    MAX_INPUT_VALUES values per image (the first dimension is the batch)."""
    shown = "x".join("?" if d is None else str(d) for d in dims)
    bad = [(i, d) for i, d in enumerate(dims) if isinstance(d, int) and d <= 0]
    if bad:
        axis, value = bad[0]
        raise OnnxModelError(
            f"{path} declares its {what} {name!r} as {shown}: dimension {axis} is {value}, not a positive "
            "size, so the model cannot be run",
            hint="the file's input shape is broken; re-export the model (vitcompress export) at its real "
            "resolution",
        )
    per_image = 1
    for d in dims[1:]:
        if isinstance(d, int):
            per_image *= d
    if per_image > MAX_INPUT_VALUES:
        raise OnnxModelError(
            f"{path} declares its {what} {name!r} as {shown}: {per_image:,} values per image (the limit "
            f"is {MAX_INPUT_VALUES:,}), so the model is not runnable",
            hint="the file's input shape is broken or absurd; re-export the model (vitcompress export) at "
            "its real resolution",
        )


def _external_files(model: Any, path: Path) -> set[Path]:
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    base = path.parent.resolve()
    files: set[Path] = set()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (base / location).resolve()
        if (
            os.path.isabs(location)
            or ".." in Path(location).parts
            or (base / location).is_symlink()
            or not target.is_relative_to(base)
        ):
            raise OnnxModelError(
                f"{path}: tensor {tensor.name!r} points its external data at {location!r}, outside the model folder",
                hint="external data must be a plain file name beside the .onnx file",
            )
        if not target.is_file():
            raise OnnxModelError(
                f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing"
            )
        files.add(target)
    return files


def onnx_size(path: Path) -> int:
    """Bytes of a model on disk: an .onnx file plus every external data file it references; an
    OpenVINO IR's .xml plus its .bin; an .ort file or a TensorRT engine itself."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        weights = path.with_suffix(".bin")
        return path.stat().st_size + (weights.stat().st_size if weights.is_file() else 0)
    if path.suffix.lower() in (".ort", ".engine", ".plan"):
        return path.stat().st_size
    return path.stat().st_size + sum(f.stat().st_size for f in check_external_data(path))


def check_onnx_file(path: Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(
            f"ONNX model {path} does not exist", hint="check the path; export one with `vitcompress export`"
        )
    model = _load_proto(path)
    _external_files(model, path)
    for name, dims in declared_inputs(model):
        check_input_dims(path, name, dims)


def holds_2_4_weights(path: Path, min_size: int = 4096) -> bool:
    """Whether some weight of the model holds NVIDIA's 2:4 pattern: a 2-D initializer (float, or int8
    with zero point 0, as TensorRT's symmetric QDQ has it) with at most 2 non-zeros in every group of 4
    along either axis."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if len(tensor.dims) != 2 or tensor.dims[0] * tensor.dims[1] < min_size or tensor.data_location == 1:
            continue
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8):
            continue
        nonzero = numpy_helper.to_array(tensor) != 0
        for grouped in (nonzero, nonzero.T):
            rows, cols = grouped.shape
            if cols % 4 == 0 and grouped.reshape(rows, cols // 4, 4).sum(axis=2).max() <= 2:
                return True
    return False


def require_provider(provider: Provider) -> list[str]:
    import onnxruntime as ort

    wanted = ORT_PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise ProviderUnavailableError(
            f"execution provider {provider.value!r} ({wanted[0]}) is not available in this onnxruntime",
            hint=f"available: {', '.join(available)}; for GPUs install onnxruntime-gpu on a machine with CUDA",
        )
    return [p for p in wanted if p in available]


@dataclass
class OnnxRunner:
    """One ONNX Runtime session with the input checks our users need before ORT's own errors."""

    path: Path
    provider: Provider = Provider.cpu
    threads: int | None = None

    def __post_init__(self) -> None:
        import onnxruntime as ort

        check_onnx_file(self.path)
        providers: list[Any] = list(require_provider(self.provider))
        if self.provider is Provider.tensorrt and holds_2_4_weights(self.path):
            # TensorRT considers its sparse tensor-core kernels only when the engine is built with
            # sparsity on; it then picks them per layer where the weights hold 2:4 and they are faster.
            providers[0] = (providers[0], {"trt_sparsity_enable": "True"})
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:
            raise OnnxModelError(f"ONNX Runtime cannot open {self.path}: {str(err).splitlines()[0]}") from err
        wanted = ORT_PROVIDERS[self.provider][0]
        if self.provider is not Provider.cpu and self.session.get_providers()[0] != wanted:
            raise ProviderUnavailableError(
                f"{wanted} failed to initialise for {self.path} (session fell back to "
                f"{self.session.get_providers()[0]})",
                hint="check the CUDA/TensorRT libraries on this machine",
            )
        meta = self.session.get_inputs()[0]
        self.input_name: str = meta.name
        self.input_shape: list[Any] = list(meta.shape)
        self.input_dtype = np.float16 if "float16" in meta.type else np.float32

    def expected(self) -> str:
        dims = [str(d) for d in self.input_shape[1:]]
        return "x".join(dims)

    def check_input(self, batch: np.ndarray) -> None:
        fixed = self.input_shape[1:]
        if batch.ndim != len(self.input_shape) or any(
            isinstance(d, int) and d != s for d, s in zip(fixed, batch.shape[1:], strict=False)
        ):
            got = "x".join(str(s) for s in batch.shape[1:])
            height, width = fixed[-2:] if len(fixed) >= 2 else [*fixed, "?", "?"][:2]
            raise InputShapeError(
                f"{self.path.name}: expected {height}x{width} input ({self.expected()} per image), got {got}",
                hint="resize the images to the model's resolution or export the model at yours",
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.check_input(batch)
        outputs = self.session.run(None, {self.input_name: batch.astype(self.input_dtype, copy=False)})
        return np.asarray(outputs[0], dtype=np.float32)
