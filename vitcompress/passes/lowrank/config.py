"""Low-rank factorization of ViT linear layers: W (out x in) -> B (out x r) @ A (r x in).

Plain truncated SVD keeps the r largest singular directions of the weight (Eckart-Young: the best
rank-r approximation of W itself). The data-aware variant keeps the best rank-r approximation of the
layer's *output on real activations*: with the input second moment C = X^T X = L L^T (Cholesky, a
little damping), SVD of W L gives W' = U_r S_r V_r^T L^-1, which minimizes ||(W - W') X||_F
(activation-whitened SVD, as in SVD-LLM, Wang et al. 2024, and ASVD). `method: auto` computes both
on the calibration batches and keeps, per layer, whichever has the lower output error.

Ranks come from a fixed rank, a fraction of full rank, retained spectral energy, or a global
parameter/MAC budget: every chunk of `round_to` singular directions is a unit whose loss is its
share of the layer's (normalized) energy and whose gain is the parameters it frees; the cheapest
units go first, so layers with fast-decaying spectra give more. A layer factorizes only when
r < out*in/(out+in); otherwise it stays dense and the report says so.

The factorized layer is `LowRankLinear` (two nn.Linear, so ONNX export, quantization and the
artifact need nothing special); the artifact records each replaced layer and its rank as an edit.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from vitcompress.passes.base import PassConfig, fraction_or_count

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class Method(str, Enum):
    svd = "svd"  # weights only
    whitened = "whitened"  # activation-whitened SVD, needs data
    auto = "auto"  # both, per layer the one with lower output error on the calibration data


class LowRankConfig(PassConfig):
    """Which linears to factorize and how to choose their ranks (exactly one of the rank rules)."""

    summary: ClassVar[str] = "low-rank factorization of linear layers (truncated or activation-whitened SVD)"
    engine: ClassVar[str] = "vitcompress.passes.lowrank.run"
    changes_model: ClassVar[bool] = True
    reshapes_linears: ClassVar[bool] = True

    kind: Literal["lowrank"] = "lowrank"
    layers: list[str] | None = Field(
        None, description="Module-name globs (default: every block's MLP fc1 and fc2)."
    )
    rank: int | None = Field(None, gt=0, description="The same rank for every layer.")
    rank_fraction: float | None = Field(None, gt=0, le=1, description="Rank as a fraction of min(out, in).")
    energy: float | None = Field(
        None, gt=0, le=1, description="Keep this fraction of each layer's spectral energy."
    )
    target_params: float | None = Field(
        None,
        description="Parameters of the whole model to keep: a fraction in (0, 1) or a count (integer > 1).",
    )
    target_macs: float | None = Field(
        None, description="MACs of the whole model to keep: a fraction in (0, 1) or a count (integer > 1)."
    )
    tolerance: float = Field(
        0.02, gt=0, lt=0.5, description="How close to a target, as a fraction of the original."
    )
    method: Method = Field(
        Method.svd, description="svd, whitened (needs data) or auto (both, keep the better)."
    )
    round_to: int = Field(8, ge=1, description="Ranks are multiples of this (fast kernels).")
    damping: float = Field(1e-2, gt=0, description="Whitening: add damping * mean(diag C) to C's diagonal.")
    attention: Literal["none", "comcat"] = Field(
        "none", description="comcat: per-head low rank of the query-key and value-output products (COMCAT)."
    )
    attention_rank: float = Field(
        0.5,
        description="COMCAT head size: a fraction of the head size in (0, 1] or an absolute size (integer > 1).",
    )
    calibration_batches: int = Field(8, ge=1, description="Batches of data for whitened/auto.")
    batch_size: int = Field(32, ge=1, description="Batch size of the calibration batches.")

    @field_validator("target_params", "target_macs")
    @classmethod
    def _target_range(cls, value: float | None) -> float | None:
        return fraction_or_count(value)

    @field_validator("attention_rank")
    @classmethod
    def _attention_rank_range(cls, value: float) -> float:
        return fraction_or_count(value, whole=True) or value

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankConfig:
        rules = [
            n
            for n in ("rank", "rank_fraction", "energy", "target_params", "target_macs")
            if getattr(self, n) is not None
        ]
        if len(rules) > 1 or (not rules and self.attention == "none"):
            raise ValueError(
                "set exactly one of rank, rank_fraction, energy, target_params, target_macs "
                "(or only attention: comcat)" + (f" (got {', '.join(rules)})" if rules else "")
            )
        return self

    def needs_data(self) -> bool:
        return self.method is not Method.svd and self.has_linear_rule

    @property
    def has_linear_rule(self) -> bool:
        return any(
            getattr(self, n) is not None
            for n in ("rank", "rank_fraction", "energy", "target_params", "target_macs")
        )


def breakeven_rank(out_features: int, in_features: int) -> float:
    """Factorizing saves parameters and MACs only below this rank."""
    return out_features * in_features / (out_features + in_features)
