"""The `sparsify` recipe entry and its sparsity patterns.

Patterns (all along a linear's weight W, out x in; x @ W^T runs along the input dimension):
- `n:m`: in every group of m consecutive weights along the input dimension at most n are non-zero.
  `2:4` is the pattern NVIDIA sparse tensor cores (Ampere and later) run at up to 2x GEMM speed;
  TensorRT picks sparse kernels for layers whose weights hold it.
- `block:RxC`: the weight is tiled into R (output rows) x C (input columns) blocks, and whole blocks
  are zero; `sparsity` says which fraction of blocks. `block:1x8` is a vector along the input,
  `block:16x16`/`32x32` are what block-sparse (BSR) kernels and LPViT's hardware model use,
  `block:1x1` is unstructured sparsity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from vitcompress.passes.base import PassConfig

_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^block:(\d+)x(\d+)$")
PATTERN_HELP = (
    "n:m (e.g. 2:4, 4:8; n kept of every m along the input) or block:RxC (e.g. block:16x16, block:1x8)"
)


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: n:m (`n`, `m` set) or blocks of `rows` x `cols` (`rows`, `cols` set)."""

    text: str
    n: int = 0
    m: int = 0
    rows: int = 0
    cols: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def nm_sparsity(self) -> float:
        return 1 - self.n / self.m

    @property
    def group_cols(self) -> int:
        """Input columns a pattern unit spans (m for n:m, C for blocks): in_features must be a multiple."""
        return self.m if self.is_nm else self.cols

    @property
    def group_rows(self) -> int:
        return 1 if self.is_nm else self.rows

    def fits(self, out_features: int, in_features: int) -> bool:
        return in_features % self.group_cols == 0 and out_features % self.group_rows == 0


def parse_pattern(text: str) -> Pattern:
    """`2:4` or `block:16x16` as a Pattern; ValueError with the grammar otherwise."""
    text = text.strip().lower()
    if match := _NM.match(text):
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m or m > 64:
            raise ValueError(f"pattern {text!r}: n:m needs 0 < n < m <= 64 (e.g. 2:4)")
        return Pattern(f"{n}:{m}", n=n, m=m)
    if match := _BLOCK.match(text):
        rows, cols = int(match[1]), int(match[2])
        if not (0 < rows <= 256 and 0 < cols <= 256):
            raise ValueError(f"pattern {text!r}: block sides must be in 1..256 (e.g. block:16x16)")
        return Pattern(f"block:{rows}x{cols}", rows=rows, cols=cols)
    raise ValueError(f"pattern {text!r} is not {PATTERN_HELP}")


class SelectMethod(str, Enum):
    obs = "obs"  # second-order saliency + weight update of the survivors (SparseGPT), needs data
    magnitude = "magnitude"  # |w| (block: L2 norm of the block); the cheap, data-free baseline


class Allocation(str, Enum):
    uniform = "uniform"  # every layer at the target sparsity
    global_ = "global"  # one ranking of the blocks of all layers


class SparsifyConfig(PassConfig):
    """Which linears to sparsify, to which pattern, and how the zeros are chosen."""

    summary: ClassVar[str] = "semi-structured (2:4, n:m) or block sparsity of linear layers, second-order (OBS) or magnitude"
    engine: ClassVar[str] = "vitcompress.passes.sparsify.engine"
    changes_model: ClassVar[bool] = True
    makes_sparse: ClassVar[bool] = True

    kind: Literal["sparsify"] = "sparsify"
    pattern: str = Field(
        "2:4",
        description=f"Sparsity pattern: {PATTERN_HELP}. 2:4 is what NVIDIA sparse tensor cores run.",
    )
    sparsity: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Block patterns: fraction of weights (whole blocks) to zero (default 0.5). "
        "n:m patterns fix it at 1 - n/m.",
    )
    allocation: Allocation = Field(
        Allocation.uniform,
        description="Block patterns: uniform (every layer at `sparsity`) or global (one ranking of all "
        "blocks of all layers by saliency per MAC saved; layers end up with different sparsities).",
    )
    max_layer_sparsity: float = Field(
        0.9, gt=0, lt=1, description="Global allocation: no layer gets sparser than this."
    )
    method: SelectMethod = Field(
        SelectMethod.obs,
        description="obs: second-order (OBS/SparseGPT) selection with weight update, needs calibration "
        "data; magnitude: smallest weights, no data.",
    )
    layers: list[str] | None = Field(
        None,
        description="Module-name globs of the linears to sparsify (default: every block's attention "
        "qkv/proj and MLP fc1/fc2).",
    )
    damping: float = Field(
        0.01, gt=0, lt=1, description="OBS: add damping * mean(diag H) to the Hessian's diagonal."
    )
    block_columns: int = Field(
        128, ge=1, description="OBS: input columns updated together (lazy batch of SparseGPT)."
    )
    sequential: bool = Field(
        True,
        description="OBS: calibrate each transformer block on the outputs of the blocks already "
        "sparsified (SparseGPT's order); false: all Hessians from the dense model.",
    )
    calibration_batches: int = Field(8, ge=1, description="OBS: batches of calibration data.")
    batch_size: int = Field(32, ge=1, description="OBS: batch size of the calibration batches.")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        return parse_pattern(value).text

    @model_validator(mode="after")
    def _sparsity_fits_pattern(self) -> SparsifyConfig:
        pattern = self.parsed_pattern
        if pattern.is_nm and self.sparsity is not None:
            raise ValueError(
                f"pattern {pattern.text} fixes the sparsity at {pattern.nm_sparsity:g}: drop sparsity, "
                "or use a block pattern (block:1x1 is unstructured)"
            )
        if pattern.is_nm and self.allocation is Allocation.global_:
            raise ValueError(
                f"pattern {pattern.text} is the same in every layer: allocation global needs a block pattern"
            )
        return self

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        pattern = self.parsed_pattern
        return pattern.nm_sparsity if pattern.is_nm else (self.sparsity if self.sparsity is not None else 0.5)

    def needs_data(self) -> bool:
        return self.method is SelectMethod.obs
