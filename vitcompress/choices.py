"""The named choices every layer shares: runtimes, ONNX Runtime providers, devices, precisions.

One type each, used by the pass configs, the recipe's target section, the CLI flags and the runtime
adapters alike; each prints as its value (`cuda`, not `Provider.cuda`).
"""

from __future__ import annotations

from enum import Enum
from typing import Literal


class Choice(str, Enum):
    """A named choice (a flag value, a recipe value) that prints as its value in messages."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __repr__(self) -> str:  # validation errors list the choices as a user types them
        return repr(self.value)


class Runtime(Choice):
    ort = "ort"  # ONNX Runtime: .onnx, and its mobile .ort format
    openvino = "openvino"  # OpenVINO: IR (.xml + .bin), or an .onnx read by its ONNX frontend
    tensorrt = "tensorrt"  # TensorRT: a serialized engine (.engine / .plan) for one GPU


class Provider(Choice):
    """ONNX Runtime's execution provider: the one provider type of vitcompress (configs, flags)."""

    cpu = "cpu"
    cuda = "cuda"
    tensorrt = "tensorrt"


# The runtimes a model file is written for by export and quantize (TensorRT engines are built from
# the final ONNX file by `vitcompress convert --to tensorrt`).
FileRuntime = Literal[Runtime.ort, Runtime.openvino]


class Device(Choice):
    cpu = "cpu"
    gpu = "gpu"


class Precision(Choice):
    """The precision a runtime computes in. For ORT and TensorRT engines this is the file's own
    (fp32, fp16, int8); OpenVINO takes it as a hint and can run an fp32 file in bf16."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    int8 = "int8"
