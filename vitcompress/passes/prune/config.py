"""Structured pruning of ViTs: attention heads, head dimensions, MLP width and embedding width.

Importance of each structure comes from the weights (L1/L2 magnitude), the first-order Taylor
estimate of the loss change |sum(g * w)| over the structure (Molchanov et al., CVPR 2019), or the
Hessian-aware saliency of NViT (Yang et al., "Global Vision Transformer Pruning with Hessian-Aware
Saliency", CVPR 2023): the second-order loss change of removing the whole structure with the Fisher
approximation of the Hessian, E_batch[(sum_S g * w)^2]. Taylor and Hessian scores are loss changes, so
they compare across blocks and structure kinds; that is what global pruning and MAC/parameter targets
rank by (saliency per MAC or parameter removed, NViT's latency-aware redistribution).

The ViT knowledge lives here: heads are removed whole, a block's head size stays uniform, at least
`min_heads` heads remain, widths stay multiples of `round_to`. The surgery itself is torch-pruning's
dependency graph, so every coupled tensor shrinks together (fused qkv rows and proj columns, fc1 rows
and fc2 columns, the residual stream through tokens, norms and heads). The adapters then record the
new shapes in the attributes each family reads (timm `num_heads`/`head_dim`/`scale`, HF head counts).
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from vitcompress.passes.base import PassConfig, fraction_or_count

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class Importance(str, Enum):
    l1 = "l1"
    l2 = "l2"
    taylor = "taylor"
    hessian = "hessian"

    @property
    def needs_data(self) -> bool:
        return self in (Importance.taylor, Importance.hessian)


class Structure(str, Enum):
    heads = "heads"
    head_dim = "head_dim"
    mlp = "mlp"
    embed = "embed"


class Scope(str, Enum):
    uniform = "uniform"  # the same fraction in every block
    global_ = "global"  # ranked across blocks: blocks that matter less give more


class PruneConfig(PassConfig):
    """Structured pruning: fractions per structure, or a MAC/parameter target."""

    summary: ClassVar[str] = "structured pruning (torch-pruning): heads, head dims, MLP and embedding width"
    engine: ClassVar[str] = "vitcompress.passes.prune.run"
    changes_model: ClassVar[bool] = True
    reshapes_linears: ClassVar[bool] = True

    kind: Literal["prune"] = "prune"
    heads: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of attention heads to remove.")
    head_dim: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of each head's q/k/v size to remove.")
    mlp: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of MLP hidden channels to remove.")
    embed: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of the embedding (residual) width to remove."
    )
    scope: Scope = Field(
        Scope.uniform, description="uniform: same fraction per block; global: ranked across blocks."
    )
    target_macs: float | None = Field(
        None,
        description="Instead of fractions: MACs to keep, a fraction in (0, 1) or an absolute count (integer > 1).",
    )
    target_params: float | None = Field(
        None,
        description="Instead of fractions: parameters to keep, a fraction in (0, 1) or a count (integer > 1).",
    )
    structures: list[Structure] = Field(
        default_factory=lambda: [Structure.heads, Structure.mlp],
        description="What a target may remove (fractions say it themselves).",
    )
    tolerance: float = Field(
        0.02, gt=0, lt=0.5, description="How close to the target, as a fraction of the original."
    )
    importance: Importance = Field(
        Importance.l2, description="l1, l2 (magnitude), taylor or hessian (need data)."
    )
    steps: int = Field(1, ge=1, le=100, description="Iterative pruning: reach the goal in this many steps.")
    round_to: int = Field(8, ge=1, description="Keep widths (head size, MLP, embedding) multiples of this.")
    min_heads: int = Field(1, ge=1, description="Never fewer heads than this in a block.")
    protect: list[str] | None = Field(
        None,
        description="Module-name globs to leave whole (default: the classifier head(s) and patch embedding).",
    )
    calibration_batches: int = Field(8, ge=1, description="Batches of data for taylor/hessian importance.")
    batch_size: int = Field(32, ge=1, description="Batch size for the importance batches.")
    # --- latency targets (vitcompress.latency): a p50 on a runtime instead of MACs or parameters
    target_latency_ms: float | None = Field(
        None, gt=0, description="Instead of fractions: p50 in ms to reach on the latency target below."
    )
    target_speedup: float | None = Field(
        None,
        gt=1,
        description="Instead of fractions: measured speedup over the original on the latency target.",
    )
    latency_runtime: Literal["ort", "openvino"] = Field("ort", description="Latency target: the runtime.")
    latency_precision: Literal["fp32", "bf16", "int8"] = Field(
        "fp32", description="Latency target: precision the model will run in (int8: as `quantize` makes it)."
    )
    latency_threads: int = Field(2, ge=1, description="Latency target: runtime threads.")
    latency_batch: int = Field(1, ge=1, description="Latency target: batch size.")
    latency_tolerance: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Latency target: how close the measured p50 must land, a fraction of the goal.",
    )
    remeasure: int = Field(
        2,
        ge=0,
        le=5,
        description="Latency target: export and measure the result, re-plan at most this often if it misses "
        "(0: trust the table's prediction, measure nothing).",
    )
    measure_runs: int = Field(50, ge=10, description="Latency target: timed runs per measurement.")
    latency_miss: Literal["fail", "keep"] = Field(
        "fail",
        description="Latency target: when the last re-measured attempt still misses, fail (an error), or "
        "keep the attempt that landed closest and record the miss (what `tune` does; it measures again "
        "after distilling).",
    )
    latency_lowrank: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Latency target: plan for MLPs that a later lowrank pass factorizes at this rank_fraction "
        "(svd, round_to 8); the remeasure step times them factorized.",
    )
    latency_table: Path | None = Field(
        None, description="Latency target: a table file instead of the cache (must match model and target)."
    )

    @field_validator("target_macs", "target_params")
    @classmethod
    def _target_range(cls, value: float | None) -> float | None:
        return fraction_or_count(value)

    @model_validator(mode="after")
    def _one_goal(self) -> PruneConfig:
        ratios = {s: getattr(self, s.value) for s in Structure if getattr(self, s.value) > 0}
        goals = [
            g
            for g in ("target_macs", "target_params", "target_latency_ms", "target_speedup")
            if getattr(self, g) is not None
        ]
        if len(goals) > 1:
            raise ValueError(f"set one target, not {'both ' if len(goals) == 2 else ''}{' and '.join(goals)}")
        target = getattr(self, goals[0]) if goals else None
        if target is not None and ratios:
            raise ValueError(
                f"a target and fractions ({', '.join(s.value for s in ratios)}) both given: "
                "a target chooses the fractions itself; list what it may remove in structures"
            )
        if target is None and not ratios:
            raise ValueError(
                "nothing to prune: set heads, head_dim, mlp or embed, or target_macs/target_params/"
                "target_latency_ms/target_speedup"
            )
        if self.latency_goal is not None and self.steps != 1:
            raise ValueError(
                "a latency target prunes in one step (steps: 1); the measurement loop adjusts it"
            )
        if target is not None and not self.structures:
            raise ValueError("structures is empty: a target needs at least one structure to remove")
        return self

    @property
    def target(self) -> tuple[str, float] | None:
        if self.target_macs is not None:
            return "target_macs", self.target_macs
        if self.target_params is not None:
            return "target_params", self.target_params
        return None

    @property
    def latency_goal(self) -> float | None:
        return self.target_latency_ms if self.target_latency_ms is not None else self.target_speedup

    def enabled(self) -> list[Structure]:
        if self.target is not None or self.latency_goal is not None:
            return list(dict.fromkeys(self.structures))
        return [s for s in Structure if getattr(self, s.value) > 0]

    def needs_data(self) -> bool:
        return self.importance.needs_data
