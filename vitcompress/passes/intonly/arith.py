"""Integer kernels written once, run two ways: eagerly in NumPy (the reference) or as ONNX nodes.

Every kernel below (dyadic requantization, Shiftmax, ShiftGELU, integer LayerNorm) is a function of
an `IntOps` backend. `NumpyOps` computes with NumPy integer arrays and is the reference
implementation; `OnnxOps` emits one ONNX node per call. Each primitive is given exactly the
semantics ONNX Runtime's CPU kernels have, measured on onnxruntime 1.32:

- integer `Div` truncates toward zero, so the kernels only ever divide a non-negative numerator by
  a positive divisor (where truncation and floor agree). A rounding shift of a signed value first
  adds 2**62 (`_OFFSET`), shifts the now positive value, then subtracts the shifted offset;
- `BitShift` exists for unsigned types only: Shiftmax and ShiftGELU shift uint64 values;
- `Cast` to a narrower integer wraps, so every narrowing is preceded by a `Clip`;
- `QuantizeLinear` rounds half to even and saturates (NumPy: `np.rint` then clip).

Tests compare the two backends with `np.array_equal`, kernel by kernel and for whole models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

_OFFSET_BITS = 62  # a signed int64 plus 2**62 is non-negative as long as |x| < 2**62
INT8 = (-127, 127)  # symmetric int8: -128 is never produced, so negation cannot overflow


class IntOps(Protocol):
    """The integer primitives the kernels are written in (values are backend-specific)."""

    def const(self, value: np.ndarray, name: str = "c") -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def sub(self, a: Any, b: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def div(self, a: Any, b: Any) -> Any: ...
    def minimum(self, a: Any, b: Any) -> Any: ...
    def maximum(self, a: Any, b: Any) -> Any: ...
    def clip(self, x: Any, lo: int, hi: int) -> Any: ...
    def cast(self, x: Any, dtype: type[np.generic]) -> Any: ...
    def shift_right(self, x: Any, bits: Any) -> Any: ...
    def shift_left(self, x: Any, bits: Any) -> Any: ...
    def reduce_max(self, x: Any) -> Any: ...
    def reduce_sum(self, x: Any) -> Any: ...
    def matmul_integer(self, a: Any, b: Any, a_zero: int = 0) -> Any: ...
    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any: ...
    def transpose(self, x: Any, perm: tuple[int, ...]) -> Any: ...
    def take(self, x: Any, index: int, axis: int) -> Any: ...
    def concat(self, parts: list[Any], axis: int) -> Any: ...
    def batch_broadcast(self, value: Any, like: Any) -> Any: ...


# --------------------------------------------------------------------------- NumPy backend


def _trunc_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division truncating toward zero, as ONNX Runtime's integer Div does."""
    quotient = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -quotient, quotient).astype(np.result_type(a, b))


class NumpyOps:
    """The reference: each primitive computed with NumPy integer arrays, ONNX Runtime's semantics."""

    @staticmethod
    def _same(a: np.ndarray, b: np.ndarray) -> None:
        if a.dtype != b.dtype:
            raise TypeError(f"integer op on {a.dtype} and {b.dtype}: ONNX needs one type")

    def const(self, value: np.ndarray, name: str = "c") -> np.ndarray:
        return np.asarray(value)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self._same(a, b)
        return a + b

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self._same(a, b)
        return a - b

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self._same(a, b)
        return a * b

    def div(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self._same(a, b)
        return _trunc_div(a, b)

    def minimum(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self._same(a, b)
        return np.minimum(a, b)

    def maximum(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self._same(a, b)
        return np.maximum(a, b)

    def clip(self, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return np.clip(x, x.dtype.type(lo), x.dtype.type(hi))

    def cast(self, x: np.ndarray, dtype: type[np.generic]) -> np.ndarray:
        return x.astype(dtype)

    def shift_right(self, x: np.ndarray, bits: np.ndarray) -> np.ndarray:
        self._same(x, bits)
        return np.right_shift(x, bits)

    def shift_left(self, x: np.ndarray, bits: np.ndarray) -> np.ndarray:
        self._same(x, bits)
        return np.left_shift(x, bits)

    def reduce_max(self, x: np.ndarray) -> np.ndarray:
        return x.max(axis=-1, keepdims=True)

    def reduce_sum(self, x: np.ndarray) -> np.ndarray:
        return x.sum(axis=-1, keepdims=True, dtype=x.dtype)

    def matmul_integer(self, a: np.ndarray, b: np.ndarray, a_zero: int = 0) -> np.ndarray:
        return np.matmul(a.astype(np.int32) - np.int32(a_zero), b.astype(np.int32))

    def reshape(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]  # ONNX: 0 copies the input dim
        return x.reshape(dims)

    def transpose(self, x: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
        return np.transpose(x, perm)

    def take(self, x: np.ndarray, index: int, axis: int) -> np.ndarray:
        return np.take(x, index, axis=axis)

    def concat(self, parts: list[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(parts, axis=axis)

    def batch_broadcast(self, value: np.ndarray, like: np.ndarray) -> np.ndarray:
        return np.broadcast_to(value, (like.shape[0], *value.shape[1:])).copy()


# --------------------------------------------------------------------------- ONNX backend


_ONNX_TYPES = {
    np.int8: 3,  # TensorProto.INT8
    np.uint8: 2,
    np.int32: 6,
    np.int64: 7,
    np.uint64: 13,
    np.float32: 1,
}


@dataclass(frozen=True)
class Sym:
    """A tensor of the graph being built: its name and element type."""

    name: str
    dtype: type[np.generic]


@dataclass
class OnnxOps:
    """Emits one ONNX node per primitive into `nodes`, constants into `initializers`."""

    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    scope: str = ""
    _count: int = 0
    _consts: dict[tuple[bytes, str, tuple[int, ...]], Sym] = field(default_factory=dict)

    def fresh(self, base: str) -> str:
        self._count += 1
        prefix = f"{self.scope}/" if self.scope else ""
        return f"{prefix}{base}_{self._count}"

    def node(self, op: str, inputs: list[str], dtype: type[np.generic], **attrs: Any) -> Sym:
        from onnx import helper

        out = self.fresh(op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return Sym(out, dtype)

    def const(self, value: np.ndarray, name: str = "c") -> Sym:
        from onnx import numpy_helper

        value = np.asarray(value)
        key = (value.tobytes(), str(value.dtype), value.shape)
        if key in self._consts and value.size <= 64:  # small constants are shared, weights never
            return self._consts[key]
        tensor = numpy_helper.from_array(value, self.fresh(name))
        self.initializers.append(tensor)
        sym = Sym(tensor.name, value.dtype.type)
        self._consts[key] = sym
        return sym

    def _binary(self, op: str, a: Sym, b: Sym) -> Sym:
        if a.dtype != b.dtype:
            raise TypeError(f"{op} on {a.dtype.__name__} and {b.dtype.__name__}: ONNX needs one type")
        return self.node(op, [a.name, b.name], a.dtype)

    def add(self, a: Sym, b: Sym) -> Sym:
        return self._binary("Add", a, b)

    def sub(self, a: Sym, b: Sym) -> Sym:
        return self._binary("Sub", a, b)

    def mul(self, a: Sym, b: Sym) -> Sym:
        return self._binary("Mul", a, b)

    def div(self, a: Sym, b: Sym) -> Sym:
        return self._binary("Div", a, b)

    def minimum(self, a: Sym, b: Sym) -> Sym:
        return self._binary("Min", a, b)

    def maximum(self, a: Sym, b: Sym) -> Sym:
        return self._binary("Max", a, b)

    def clip(self, x: Sym, lo: int, hi: int) -> Sym:
        low = self.const(np.array(lo, dtype=x.dtype), "lo")
        high = self.const(np.array(hi, dtype=x.dtype), "hi")
        return self.node("Clip", [x.name, low.name, high.name], x.dtype)

    def cast(self, x: Sym, dtype: type[np.generic]) -> Sym:
        if x.dtype == dtype:
            return x
        return self.node("Cast", [x.name], dtype, to=_ONNX_TYPES[dtype])

    def shift_right(self, x: Sym, bits: Sym) -> Sym:
        if x.dtype != bits.dtype:
            raise TypeError("BitShift needs one unsigned type")
        return self.node("BitShift", [x.name, bits.name], x.dtype, direction="RIGHT")

    def shift_left(self, x: Sym, bits: Sym) -> Sym:
        if x.dtype != bits.dtype:
            raise TypeError("BitShift needs one unsigned type")
        return self.node("BitShift", [x.name, bits.name], x.dtype, direction="LEFT")

    def reduce_max(self, x: Sym) -> Sym:
        return self.node("ReduceMax", [x.name], x.dtype, axes=[-1], keepdims=1)

    def reduce_sum(self, x: Sym) -> Sym:
        axes = self.const(np.array([-1], dtype=np.int64), "axes")
        return self.node("ReduceSum", [x.name, axes.name], x.dtype, keepdims=1)

    def matmul_integer(self, a: Sym, b: Sym, a_zero: int = 0) -> Sym:
        if not a_zero:
            return self.node("MatMulInteger", [a.name, b.name], np.int32)
        zero = self.const(np.array(a_zero, a.dtype), "a_zero_point")
        return self.node("MatMulInteger", [a.name, b.name, zero.name], np.int32)

    def reshape(self, x: Sym, shape: tuple[int, ...]) -> Sym:
        dims = self.const(np.array(shape, dtype=np.int64), "shape")
        return self.node("Reshape", [x.name, dims.name], x.dtype)

    def transpose(self, x: Sym, perm: tuple[int, ...]) -> Sym:
        return self.node("Transpose", [x.name], x.dtype, perm=list(perm))

    def take(self, x: Sym, index: int, axis: int) -> Sym:
        where = self.const(np.array(index, dtype=np.int64), "index")
        return self.node("Gather", [x.name, where.name], x.dtype, axis=axis)

    def concat(self, parts: list[Sym], axis: int) -> Sym:
        return self.node("Concat", [p.name for p in parts], parts[0].dtype, axis=axis)

    def batch_broadcast(self, value: Sym, like: Sym) -> Sym:
        """`value` (leading dim 1) repeated along the batch dim of `like`: Shape, Concat, Expand."""
        batch = self.node("Shape", [like.name], np.int64, start=0, end=1)
        rest = self.node("Shape", [value.name], np.int64, start=1)
        shape = self.node("Concat", [batch.name, rest.name], np.int64, axis=0)
        return self.node("Expand", [value.name, shape.name], value.dtype)


# --------------------------------------------------------------------------- dyadic numbers


@dataclass(frozen=True)
class Dyadic:
    """A positive (or, for LayerNorm's gamma, signed) real factor as integer multiplier(s) over one
    power of two: r ≈ m / 2**k.

    The largest |m| keeps `bits` significant bits (default 22); per-channel vectors share k, so a
    requantization shifts by one constant and clips with scalar bounds. An int32 accumulator
    times m stays inside 2**53, far from int64's limit.
    """

    m: np.ndarray  # int64
    k: int  # >= 0

    @classmethod
    def of(cls, ratio: float | np.ndarray, bits: int = 22) -> Dyadic:
        r = np.asarray(ratio, dtype=np.float64)
        if not np.all(np.isfinite(r)) or not np.any(r):
            raise ValueError(f"a dyadic factor must be finite and not all zero, got {r.min()}..{r.max()}")
        k = int(np.clip(bits - 1 - np.floor(np.log2(np.abs(r).max())), 0, _OFFSET_BITS - 2))
        return cls(np.rint(r * 2.0**k).astype(np.int64), k)

    def value(self) -> np.ndarray:
        return self.m.astype(np.float64) / 2.0**self.k


def requantize(
    ops: IntOps,
    x: Any,
    factor: Dyadic,
    lo: int | None,
    hi: int | None,
    out: type[np.generic],
    bias: np.ndarray | None = None,
    zero: int = 0,
    acc_bias: np.ndarray | None = None,
) -> Any:
    """Dyadic requantization: clip(round((x + acc_bias) * m / 2**k) + bias, lo, hi) + zero as `out`
    (x: int32 or int64; half rounds up).

    An arithmetic shift from ONNX's unsigned BitShift: x * m plus 2**62 is non-negative; it is
    shifted as uint64 and 2**62 >> k is taken off again. Both biases and the rounding half are
    folded into the one constant added before the shift. The clip happens in the shifted uint64
    domain (scalar bounds, as k is shared); the final Cast wraps modulo 2**bits, which turns the
    uint64 difference back into the signed value. Without bounds (int64 intermediates bounded by
    construction), no clip. `zero` 128 with `out` uint8 gives the uint8 + zero point 128 form of an
    int8 value at no extra op: what ONNX Runtime's fast u8 x s8 MatMulInteger reads.
    """
    k = factor.k
    offset = 1 << (_OFFSET_BITS - k)  # 2**62 >> k
    added: np.ndarray = np.asarray((1 << _OFFSET_BITS) + ((1 << k) >> 1), dtype=np.int64)
    if acc_bias is not None:
        added = added + acc_bias.astype(np.int64) * factor.m
    if bias is not None:
        added = added + (bias.astype(np.int64) << k)
    y = ops.mul(ops.cast(x, np.int64), ops.const(factor.m.astype(np.int64), "m"))
    unsigned = ops.cast(ops.add(y, ops.const(np.asarray(added, np.int64), "round")), np.uint64)
    shifted = ops.shift_right(unsigned, ops.const(np.array(k, np.uint64), "shift"))
    if lo is None or hi is None:
        return ops.cast(
            ops.sub(ops.cast(shifted, np.int64), ops.const(np.array(offset - zero, np.int64))), out
        )
    shifted = ops.maximum(shifted, ops.const(np.array(offset + lo, np.uint64), "lo"))
    shifted = ops.minimum(shifted, ops.const(np.array(offset + hi, np.uint64), "hi"))
    return ops.cast(ops.sub(shifted, ops.const(np.array(offset - zero, np.uint64), "offset")), out)


ACT_ZERO = 128  # int8 activations travel as uint8 with zero point 128 (ORT's fast u8 x s8 GEMM path)


def to_act8(
    ops: IntOps, x: Any, factor: Dyadic, bias: np.ndarray | None = None, acc_bias: np.ndarray | None = None
) -> Any:
    """Requantize to an int8 activation in [-127, 127], stored as uint8 = value + 128: the A input
    of MatMulInteger with a_zero_point 128. (ONNX Runtime's int8 x int8 MatMulInteger measured
    14x slower than uint8 x int8 on AVX-512 VNNI, 197x384 @ 384x1536.)"""
    return requantize(ops, x, factor, *INT8, np.uint8, bias=bias, zero=ACT_ZERO, acc_bias=acc_bias)


def add_bias(ops: IntOps, acc: Any, bias: np.ndarray) -> Any:
    return ops.add(acc, ops.const(bias.astype(np.int32), "bias"))


# --------------------------------------------------------------------------- Shiftmax / ShiftGELU


def exp_shift(ops: IntOps, u: Any, unit: int, n: int) -> Any:
    """The shift-based exponential of I-ViT's Shiftmax: ≈ unit · 2**n · 2**(-u / unit), uint64 u >= 0.

    The exponent's integer part q becomes a shift and its fraction f in [0, 1) the linear piece
    2**-f ≈ 1 - f/2. `unit` is the integer standing for one halving (ln 2 / scale for e**-x, see
    `exp_unit`): I-ViT approximates x·log2 e with shifts (x + x/2 - x/16) instead; folding log2 e
    into the unit is exact and saves five ops per element. q is capped below n (2**-n: zero).
    """

    def c(value: int) -> Any:
        return ops.const(np.array(value, np.uint64))

    v = ops.minimum(u, c(n * unit - 1))
    q = ops.div(v, c(unit))
    rem = ops.sub(v, ops.mul(q, c(unit)))
    return ops.shift_left(ops.sub(c(2 * unit), rem), ops.sub(c(n - 1), q))


def exp_unit(scale: float) -> int:
    """The integer standing for ln 2 at `scale`: exp(-x) = 2**(-x / exp_unit) for integer x."""
    return max(1, round(math.log(2) / scale))


SHIFTMAX_BITS = 8  # probabilities as uint8 in units of 2**-8
SHIFTMAX_N = 15  # I-ViT's n for Shiftmax
SHIFTGELU_N = 23  # I-ViT's n for ShiftGELU
SIGMOID_BITS = 8


_NORMALIZE_BITS = 62  # Shiftmax divides once per row (2**62 / sum), then multiplies and shifts


def shiftmax(ops: IntOps, scores: Any, scale: float) -> Any:
    """Shiftmax (I-ViT): softmax of int32 `scores` (real value scores * scale) over the last axis,
    as uint8 probabilities in units of 2**-8 (1.0 saturates at 255)."""
    u = ops.cast(ops.sub(ops.reduce_max(scores), scores), np.uint64)  # max - x >= 0
    e = exp_shift(ops, u, exp_unit(scale), SHIFTMAX_N)
    # ONNX Runtime has no uint64 ReduceSum; the sum of the row fits int64 by far
    total = ops.cast(ops.reduce_sum(ops.cast(e, np.int64)), np.uint64)
    factor = ops.div(ops.const(np.array(1 << _NORMALIZE_BITS, np.uint64)), total)  # e <= total
    drop = _NORMALIZE_BITS - SHIFTMAX_BITS
    p = ops.add(ops.mul(e, factor), ops.const(np.array(1 << (drop - 1), np.uint64)))
    p = ops.shift_right(p, ops.const(np.array(drop, np.uint64)))
    p = ops.minimum(p, ops.const(np.array((1 << SHIFTMAX_BITS) - 1, np.uint64)))
    return ops.cast(p, np.uint8)


GELU_SIGMOID_SLOPE = 1.702  # GELU(x) ≈ x · sigmoid(1.702 x)


def shiftgelu(ops: IntOps, x: Any, scale: float) -> Any:
    """ShiftGELU (I-ViT): x · sigmoid(1.702 x) for int32 x with |x| < 2**23 (real value x * scale);
    returns int32 in units of scale / 2**8. The sigmoid is e**(t-m) / (e**(t-m) + e**-m),
    m = max(max t, 0), so both exponents are <= 0."""
    top = ops.maximum(ops.reduce_max(x), ops.const(np.array(0, np.int32)))
    unit = exp_unit(scale * GELU_SIGMOID_SLOPE)
    e_x = exp_shift(ops, ops.cast(ops.sub(top, x), np.uint64), unit, SHIFTGELU_N)
    e_0 = exp_shift(ops, ops.cast(top, np.uint64), unit, SHIFTGELU_N)
    total = ops.add(e_x, e_0)
    half = ops.shift_right(total, ops.const(np.array(1, np.uint64)))
    scaled = ops.mul(e_x, ops.const(np.array(1 << SIGMOID_BITS, np.uint64)))
    sigmoid = ops.div(ops.add(scaled, half), total)
    return ops.mul(x, ops.cast(sigmoid, np.int32))


# --------------------------------------------------------------------------- integer LayerNorm


LAYERNORM_SQRT_STEPS = 6  # Newton steps from a calibrated start: enough for a 16x spread of std
LAYERNORM_FACTOR_BITS = 31  # 2**31 / std keeps >= 12 significant bits for std up to 2**19


@dataclass(frozen=True)
class IntLayerNormParams:
    """Integer LayerNorm: input int32 (scale s_in), output int8 (scale s_out).

    out_j = gamma_j · (x_j - mean) / sigma + beta_j, with sigma = sqrt(sum (x - mean)**2) / sqrt(D)
    computed by an integer square root (Newton's method). The per-channel factor
    gamma_j · sqrt(D) / s_out / 2**31 is dyadic; beta_j / s_out is an integer bias.
    """

    width: int
    factor: Dyadic
    bias: np.ndarray  # int64, round(beta / s_out)
    sqrt_start: int  # Newton's starting point: a calibrated typical sqrt(sum (x - mean)**2)

    @classmethod
    def make(cls, gamma: np.ndarray, beta: np.ndarray, s_out: float, sqrt_start: int) -> IntLayerNormParams:
        width = gamma.shape[0]
        ratio = gamma.astype(np.float64) * math.sqrt(width) / s_out / 2.0**LAYERNORM_FACTOR_BITS
        return cls(width, Dyadic.of(ratio), np.rint(beta / s_out).astype(np.int64), max(1, int(sqrt_start)))


def integer_sqrt(ops: IntOps, n: Any, start: int, steps: int = LAYERNORM_SQRT_STEPS) -> Any:
    """Newton's method for sqrt(n), int64 n >= 0, a fixed number of unrolled steps:
    k <- (k + n / k + 1) / 2, which never drops below 1 (no division by zero when n = 0)."""
    one, two = ops.const(np.array(1, np.int64)), ops.const(np.array(2, np.int64))
    k = ops.const(np.array(start, np.int64), "sqrt_start")
    for _ in range(steps):
        k = ops.div(ops.add(ops.add(k, ops.div(n, k)), one), two)
    return k


def layernorm(ops: IntOps, x: Any, params: IntLayerNormParams) -> Any:
    """Integer LayerNorm over the last axis of int32 `x`: an int8 value as uint8 + 128 (`to_act8`)."""
    x = ops.cast(x, np.int64)
    width = params.width
    total = ops.reduce_sum(x)
    mean = rounding_div(ops, total, width)
    centered = ops.sub(x, mean)
    sum_sq = ops.reduce_sum(ops.mul(centered, centered))
    root = integer_sqrt(ops, sum_sq, params.sqrt_start)
    inverse = ops.div(ops.const(np.array(1 << LAYERNORM_FACTOR_BITS, np.int64)), root)
    normalized = ops.mul(centered, inverse)  # (x - mean) / root in units of 2**-31
    return to_act8(ops, normalized, params.factor, bias=params.bias)


def rounding_div(ops: IntOps, x: Any, divisor: int) -> Any:
    """round(x / divisor) for signed int64 x and a positive constant divisor (half rounds up)."""
    offset = (1 << _OFFSET_BITS) // divisor
    shifted_in = ops.const(np.array(offset * divisor + divisor // 2, np.int64), "round")
    quotient = ops.div(ops.add(x, shifted_in), ops.const(np.array(divisor, np.int64), "divisor"))
    return ops.sub(quotient, ops.const(np.array(offset, np.int64), "offset"))
