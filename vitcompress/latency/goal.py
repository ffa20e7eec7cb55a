"""The `goal:` section of a recipe (and the flags of `vitcompress tune`): what the user wants, in
their terms: a p50 on a runtime, and the top-1 they can afford to lose. Light module: pydantic only."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class GoalSection(BaseModel):
    """A latency goal for `vitcompress tune`: the search picks pruning, precision and runtime settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_p50_ms: float | None = Field(None, gt=0, description="Median latency to reach, in ms, at `batch`.")
    target_speedup: float | None = Field(
        None,
        gt=1,
        description="Instead: speedup over the original fp32 model on the first `runtime`, measured.",
    )
    max_top1_drop: float = Field(
        1.0, ge=0, le=100, description="Top-1 points the result may lose (data.eval)."
    )
    runtime: list[Literal["ort", "openvino"]] = Field(
        ["ort"],
        min_length=1,
        description="Runtimes the search may choose from (one name or a list; each needs its tables). "
        "The model is deployed on the one chosen.",
    )
    precisions: list[Literal["fp32", "bf16", "int8"]] = Field(
        ["fp32", "int8"],
        min_length=1,
        description="Precisions the search may choose from (each needs a table).",
    )
    lowrank: list[Literal["none"] | float] = Field(
        ["none", 0.5],
        min_length=1,
        description="Low-rank choices for the MLPs after pruning: none (dense) or a rank_fraction in (0, 1) "
        "of each fc1/fc2's full rank (plain SVD).",
    )
    threads: int = Field(2, ge=1, description="Runtime threads.")
    batch: int = Field(1, ge=1, description="Batch size of the p50.")
    structures: list[Literal["heads", "head_dim", "mlp"]] = Field(
        ["heads", "head_dim", "mlp"], min_length=1, description="What pruning may remove."
    )
    tolerance: float = Field(
        0.1, gt=0, lt=0.5, description="A measured p50 within this fraction of the goal meets it."
    )
    max_attempts: int = Field(3, ge=1, le=6, description="Measured attempts before giving up.")
    confirm_runs: int = Field(
        3,
        ge=0,
        le=10,
        description="A latency miss at validate is timed again before it costs another attempt: this many "
        "interleaved rounds of the model and its baseline, median (0: validate's reading decides).",
    )
    remeasure: int = Field(
        2,
        ge=0,
        le=5,
        description="Within an attempt, before distilling: time the pruned model against the original and "
        "re-plan at most this often when it misses (prune's remeasure; 0: trust the table until validate).",
    )
    distill_epochs: float = Field(1.0, gt=0, description="Distillation after pruning (epochs of data.train).")
    distill_steps: int | None = Field(None, gt=0, description="Instead of epochs: distillation steps.")
    proxy_samples: int = Field(
        256,
        ge=16,
        description="Images of data.eval for the accuracy proxy (PyTorch top-1 of each candidate, before KD).",
    )
    int8_allowance: float = Field(
        0.4,
        ge=0,
        description="Points of top-1 the proxy charges int8 (the reference lost 0.35 to static INT8; "
        "the real drop is measured after quantizing).",
    )

    @field_validator("runtime", mode="before")
    @classmethod
    def _runtime_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("runtime")
    @classmethod
    def _distinct_runtimes(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("lowrank")
    @classmethod
    def _rank_fractions(cls, value: list[str | float]) -> list[str | float]:
        bad = [f for f in value if f != "none" and not 0 < float(f) < 1]
        if bad:
            raise ValueError(f"{bad[0]!r} is not none or a rank fraction in (0, 1), e.g. [none, 0.5]")
        return value

    @model_validator(mode="after")
    def _one_goal(self) -> GoalSection:
        if (self.target_p50_ms is None) == (self.target_speedup is None):
            raise ValueError("give target_p50_ms or target_speedup (one of them)")
        if "bf16" in self.precisions and "openvino" not in self.runtime:
            raise ValueError(
                "precision bf16 is OpenVINO's hint: add runtime openvino, or precisions fp32/int8"
            )
        return self

    def targets(self) -> list[tuple[str, str]]:
        """The (runtime, precision) pairs the search chooses from: bf16 runs on OpenVINO only."""
        return [(r, p) for r in self.runtime for p in self.precisions if p != "bf16" or r == "openvino"]

    def lowrank_fractions(self) -> list[float | None]:
        """The low-rank choices, None for dense, without repeats."""
        return list(dict.fromkeys(None if f == "none" else float(f) for f in self.lowrank))
