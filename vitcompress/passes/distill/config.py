"""Knowledge distillation: recover the accuracy a compressed student lost, from its uncompressed teacher.

Losses, each with its own weight: cross-entropy on the labels; soft logit KD (Hinton et al. 2015:
KL between temperature-softened distributions, times T^2); DeiT's hard distillation (cross-entropy on
the teacher's top-1, Touvron et al. 2021), applied to the distillation head when the student has a
distillation token (timm `deit_*_distilled_*`: class head learns the labels, distillation head the
teacher); and feature KD (FitNets, Romero et al. 2015): MSE between student block outputs and the
teacher's at the same relative depth, through learned projections where the widths differ.

The loop: AdamW, linear warm-up then cosine decay, gradient clipping, autocast on GPU, evaluation
every N steps on a validation split keeping the best weights. The validation split is data.val, or by
default a stratified part of data.train held out (and not trained on); data.eval, the split the
result is reported on, is scored once, at the end, so it never chooses the weights it grades.
Checkpoints are written every N steps, each a directory replaced as one unit, and hold everything a
resumed run needs to continue exactly (weights, projections, optimizer, step, RNG state, loss
history, and the digest of the weights they go with); the data order is a function of (seed, epoch),
so the position is the step. No checkpoint is written from weights that hold a NaN or Inf. Under
`torchrun` the student is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU): each global
batch is split across ranks, so N processes at batch B follow the single-process run at batch N*B.
Only rank 0 writes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from vitcompress.passes.base import PassConfig

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class TeacherSpec(BaseModel):
    """Another model as the teacher (default: the model as loaded, before compression)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(..., description="timm:NAME, hf:DIR or an artifact directory.")
    checkpoint: Path | None = None
    num_classes: int | None = Field(None, gt=0)
    img_size: int | None = Field(None, gt=0)
    in_chans: int | None = Field(None, gt=0)
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("checkpoint")
    @classmethod
    def _home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class DistillConfig(PassConfig):
    """Train the student against the teacher on data.train."""

    summary: ClassVar[str] = "knowledge distillation from the uncompressed teacher (logit, DeiT, feature KD)"
    engine: ClassVar[str] = "vitcompress.passes.distill.run"
    changes_model: ClassVar[bool] = True

    kind: Literal["distill"] = "distill"
    teacher: TeacherSpec | None = Field(None, description="Default: the model as loaded, before compression.")
    epochs: float | None = Field(1.0, gt=0, description="Passes over data.train (or set steps).")
    steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(64, ge=1, description="Images per step (per process under torchrun).")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(
        0.05, ge=0, description="AdamW weight decay (not on biases, norms, position embeddings and tokens)."
    )
    warmup: float = Field(0.05, ge=0, lt=1, description="Warm-up as a fraction of the steps.")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="Cosine decays to lr * this.")
    clip_grad: float | None = Field(1.0, gt=0, description="Max gradient norm (null: no clipping).")
    hard_label: float = Field(0.5, ge=0, description="Weight of cross-entropy on the labels.")
    soft_kd: float = Field(0.5, ge=0, description="Weight of soft logit KD (KL at temperature, x T^2).")
    temperature: float = Field(2.0, gt=0, description="KD temperature.")
    deit_hard: float = Field(
        0.0, ge=0, description="Weight of DeiT hard distillation (CE on the teacher's top-1)."
    )
    feature: float = Field(
        0.0, ge=0, description="Weight of feature KD (MSE of block outputs, learned projections)."
    )
    augment: Literal["none", "shift", "shift-flip"] = Field(
        "none", description="Random shift by up to 1/14 of the size; shift-flip adds horizontal flips."
    )
    eval_every: int | None = Field(
        None, gt=0, description="Evaluate on the validation split every N steps (default: each epoch)."
    )
    eval_limit: int | None = Field(
        2000,
        gt=0,
        description="At most this many images (stratified) of the validation split, and of data.eval "
        "(scored once at the end).",
    )
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Without data.val, hold this fraction of data.train out (at most eval_limit images, "
        "stratified, from the run's seed) to choose the best weights on; 0: keep the last weights.",
    )
    checkpoint_every: int = Field(100, gt=0, description="Steps between resumable checkpoints.")
    cache_teacher: bool = Field(
        False, description="Compute teacher logits once and reuse them (no augment, no feature KD)."
    )
    amp: bool = Field(True, description="Mixed precision on GPU (ignored on CPU).")
    resume: bool = Field(True, description="Continue from this step's checkpoint if one exists.")
    become_teacher: bool = Field(
        False,
        description="After training, this model becomes the teacher (and fp32 baseline) of later passes: "
        "fine-tune or pretrain first, then compress and distill from the result.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.hard_label + self.soft_kd + self.deit_hard + self.feature == 0:
            raise ValueError("every loss weight is 0: set hard_label, soft_kd, deit_hard or feature")
        if self.cache_teacher and (self.augment != "none" or self.feature > 0):
            raise ValueError("cache_teacher needs augment: none and feature: 0 (cached logits are per image)")
        return self

    def needs_data(self) -> bool:
        return True

    def needs_train(self) -> bool:
        return True

    def wants_original_model(self) -> bool:
        return self.teacher is None  # the default teacher is the model as loaded

    @property
    def uses_teacher(self) -> bool:
        return self.soft_kd > 0 or self.deit_hard > 0 or self.feature > 0
