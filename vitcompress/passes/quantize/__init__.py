"""The quantize pass, one folder: config.py (the recipe schema: modes, presets, QuantizeConfig),
calibration.py (calibration data, checked), onnx.py (ONNX Runtime quantization and its accuracy
gate), openvino.py (NNCF and QDQ IR for OpenVINO), run.py (the pass: path choice, atomic result).

Every name of the single module this pass once was is still importable from the package, looked
up in these modules in order and imported on first use (the config alone stays light).
"""

from vitcompress.passes.base import package_exports

__getattr__ = package_exports(
    __name__, ("config", "calibration", "onnx", "openvino", "run", "vitcompress.errors")
)
