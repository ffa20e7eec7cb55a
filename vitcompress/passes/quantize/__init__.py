"""The quantize pass, one folder: config.py (the recipe schema: modes, presets, QuantizeConfig),
calibration.py (calibration data, checked), onnx.py (ONNX Runtime quantization and its accuracy
gate), openvino.py (NNCF and QDQ IR for OpenVINO), run.py (the pass: path choice, atomic result).

Every name the pass module had before it became a folder is still importable from here (loaded
on first use, so importing the config alone stays light).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME: dict[str, str] = {
    "AUTO_SCRATCH": "vitcompress.passes.quantize.onnx",
    "Calibration": "vitcompress.passes.quantize.config",
    "DatasetReader": "vitcompress.passes.quantize.calibration",
    "GateResult": "vitcompress.passes.quantize.onnx",
    "Mode": "vitcompress.passes.quantize.config",
    "PRESETS": "vitcompress.passes.quantize.config",
    "QuantizeConfig": "vitcompress.passes.quantize.config",
    "QuantizeError": "vitcompress.errors",
    "_already_quantized": "vitcompress.passes.quantize.onnx",
    "_attention_matmuls": "vitcompress.passes.quantize.onnx",
    "_integer_only": "vitcompress.passes.quantize.run",
    "_logit_error": "vitcompress.passes.quantize.onnx",
    "_nncf": "vitcompress.passes.quantize.openvino",
    "_quantize_one": "vitcompress.passes.quantize.onnx",
    "_quantize_staged": "vitcompress.passes.quantize.run",
    "_run_nncf": "vitcompress.passes.quantize.openvino",
    "_to_fp16": "vitcompress.passes.quantize.onnx",
    "agreement": "vitcompress.passes.quantize.onnx",
    "check_calibration": "vitcompress.passes.quantize.calibration",
    "check_target": "vitcompress.passes.quantize.onnx",
    "ir_op_counts": "vitcompress.passes.quantize.openvino",
    "nncf_quantize": "vitcompress.passes.quantize.openvino",
    "op_counts": "vitcompress.passes.quantize.onnx",
    "qdq_for_openvino": "vitcompress.passes.quantize.openvino",
    "quantizable_nodes": "vitcompress.passes.quantize.onnx",
    "quantize_file": "vitcompress.passes.quantize.onnx",
    "quantize_model": "vitcompress.passes.quantize.run",
    "quantize_openvino": "vitcompress.passes.quantize.openvino",
    "quantize_with_gate": "vitcompress.passes.quantize.onnx",
    "quantized_counts": "vitcompress.passes.quantize.onnx",
    "refuse_integer_only_file": "vitcompress.passes.quantize.onnx",
    "run": "vitcompress.passes.quantize.run",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
