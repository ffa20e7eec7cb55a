"""Integer-only ViT (I-ViT, Li & Gu 2023; I-Segmenter, Sassoon et al. 2025): every operation in integers.

Between the input quantizer (QuantizeLinear) and the output dequantizer (DequantizeLinear) the graph
holds integer tensors only: int8 x int8 matmuls into int32 (MatMulInteger; activations travel as
uint8 + 128), dyadic requantization (integer multiply, then a rounding shift), Shiftmax for the
attention softmax, ShiftGELU for GELU, LayerNorm with an integer square root (Newton's method,
unrolled), and residual adds whose two sides are requantized to one scale. Accelerators without an
FPU (NPUs, microcontrollers, TVM's integer targets) can run it; ONNX Runtime's CPU provider does too.

- `arith`: the integer kernels, written once against two backends: NumPy (the reference) and ONNX.
- `vit`: reading timm / Hugging Face weights, float calibration, the integer plan, the network.
- `build`: building, verifying (integer-only checker, bit-exact against the reference) and writing.

The quantize pass runs it for `mode: integer-only` (`preset: int-only`).
"""
