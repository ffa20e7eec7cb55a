"""Moved to `vitcompress.passes.quantize.openvino`; this module keeps the old import path working."""

from vitcompress.passes.quantize.openvino import (
    ir_op_counts,
    nncf_quantize,
    qdq_for_openvino,
    quantize_openvino,
)

__all__ = ["ir_op_counts", "nncf_quantize", "qdq_for_openvino", "quantize_openvino"]
