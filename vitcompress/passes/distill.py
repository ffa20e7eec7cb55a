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

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from vitcompress.accuracy import EVAL_BATCH_SIZE
from vitcompress.errors import VitcompressError
from vitcompress.fileio import file_sha256
from vitcompress.passes.base import PassConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitcompress.data import Dataset
    from vitcompress.models.loader import LoadedModel
    from vitcompress.state import ModelState

log = logging.getLogger(__name__)


class DistillError(VitcompressError):
    """Training cannot go on: NaN loss, mismatched teacher and student, a checkpoint from another run."""


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
    engine: ClassVar[str] = "vitcompress.passes.distill"
    changes_model: ClassVar[bool] = True

    kind: Literal["distill"] = "distill"
    teacher: TeacherSpec | None = Field(None, description="Default: the model as loaded, before compression.")
    epochs: float | None = Field(1.0, gt=0, description="Passes over data.train (or set steps).")
    steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(64, ge=1, description="Images per step (per process under torchrun).")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on biases, norms, position embeddings and tokens).")
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


# --------------------------------------------------------------------------- distributed


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); no-op in a single process."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


# --------------------------------------------------------------------------- losses


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    import torch.nn.functional as F

    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student / t, dim=1),
            F.log_softmax(teacher / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


class FeatureTaps:
    """Forward hooks collecting every block's output of one model, for feature KD."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handles = [b.module.register_forward_hook(self._hook) for b in loaded.adapter.blocks()]

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def block_pairs(student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """Student block i learns from the teacher block at the same relative depth."""
    return [(i, round((i + 1) * teacher_blocks / student_blocks) - 1) for i in range(student_blocks)]


def _student_module(loaded: LoadedModel, teacher: LoadedModel | None, feature: bool) -> nn.Module:
    """The trained module: the student plus the feature projections (discarded after training)."""
    from torch import nn

    class StudentWithProjections(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = loaded.model
            self.projections = nn.ModuleList()
            if feature and teacher is not None:
                d_s, d_t = loaded.adapter.embed_dim, teacher.adapter.embed_dim
                for _ in loaded.adapter.blocks():
                    self.projections.append(nn.Identity() if d_s == d_t else nn.Linear(d_s, d_t, bias=False))

        def forward(self, x: torch.Tensor) -> Any:
            return self.student(x)

    return StudentWithProjections()


# --------------------------------------------------------------------------- training


@dataclass
class DistillResult:
    steps: int
    losses: list[float]  # per step, as logged (mean over processes under torchrun)
    evals: list[dict[str, float]] = field(default_factory=list)  # on the validation split: step, top1, loss
    best_top1: float | None = None  # best top-1 on the validation split: the weights kept
    best_step: int | None = None
    test_top1: float | None = None  # on the test data, scored once with the weights kept
    test_loss: float | None = None
    wall_s: float = 0.0
    images_per_s: float = 0.0
    resumed_from: int = 0


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _augment(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    if kind == "none":
        return x
    generator = torch.Generator().manual_seed(seed)
    pad = max(1, x.shape[-1] // 14)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    x = padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    if kind == "shift-flip":
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x


def _data_id(data: Dataset | None) -> dict[str, Any] | None:
    if data is None:
        return None
    indices = data.indices
    return {
        "spec": data.spec.model_dump(mode="json"),
        "n": len(data),
        "indices": None if indices is None else hashlib.sha256(indices.tobytes()).hexdigest()[:16],
    }


def _fingerprint(cfg: DistillConfig, student: LoadedModel, data: Dataset, val: Dataset | None = None) -> str:
    """Identifies a run: a checkpoint from another config, model, data set or validation split is
    not resumed."""
    parts = {
        "cfg": cfg.model_dump(mode="json", exclude={"resume", "checkpoint_every", "name"}),
        "structure": student.adapter.structure(),
        "data": _data_id(data),
        "val": _data_id(val),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


WEIGHTS_FILE, STATE_FILE = "weights.safetensors", "train_state.pt"


def non_finite(module: nn.Module) -> list[str]:
    """Names of the floating tensors of `module` (parameters, buffers) that hold a NaN or Inf."""
    import torch

    tensors = [(k, v) for k, v in module.state_dict().items() if v.is_floating_point()]
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in tensors]).cpu()  # one sync on GPU
    return [k for (k, _), ok in zip(tensors, finite.tolist(), strict=True) if not ok]


def _save_checkpoint(directory: Path, module: nn.Module, state: dict[str, Any]) -> None:
    """Write weights and state as one directory, replaced whole (never half old, half new)."""
    import torch
    from safetensors.torch import save_file

    from vitcompress.fileio import atomic_tree

    bad = non_finite(module)
    if bad:  # callers check first; this is the last line of defence of what resume reads
        raise DistillError(f"refusing to write checkpoint {directory}: NaN/Inf in {', '.join(bad[:3])}")
    with atomic_tree(directory) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
            str(tmp / WEIGHTS_FILE),
        )
        torch.save({**state, "weights_sha256": file_sha256(tmp / WEIGHTS_FILE)}, tmp / STATE_FILE)


def _load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Weights and state of a checkpoint, checked: complete, matching each other, finite."""
    import torch
    from safetensors.torch import load_file

    from vitcompress.fileio import recover_tree

    recover_tree(directory)  # a write killed between its renames: bring the complete old one back
    weights, state_file = directory / WEIGHTS_FILE, directory / STATE_FILE
    if not (weights.is_file() and state_file.is_file()):
        return None
    fix = f"delete {directory} to start over"
    try:
        tensors, state = load_file(str(weights)), torch.load(state_file, weights_only=True)
    except Exception as err:
        raise DistillError(
            f"checkpoint {directory} is unreadable: {str(err).splitlines()[0]}", hint=fix
        ) from err
    step = state.get("step", "?")
    if "weights_sha256" not in state:
        raise DistillError(
            f"checkpoint {directory} (step {step}) was written by an earlier vitcompress, without the "
            "digest that ties its weights to its state",
            hint=fix,
        )
    if state["weights_sha256"] != file_sha256(weights):
        raise DistillError(
            f"checkpoint {directory} is inconsistent: {WEIGHTS_FILE} is not the file its {STATE_FILE} "
            f"(step {step}) was written with",
            hint=fix,
        )
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise DistillError(
            f"checkpoint {directory} (step {step}) has NaN/Inf weights in {len(bad)} of {len(tensors)} "
            f"tensors, e.g. {bad[0]}: resuming would only diverge again",
            hint=fix + "; then lower lr or clip_grad (--clip-grad)",
        )
    return tensors, state


def teacher_logits_cache(teacher: LoadedModel, data: Dataset, path: Path, batch_size: int) -> torch.Tensor:
    """Teacher logits for every training image, computed once and kept next to the checkpoint."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(
        json.dumps([_data_id(data), teacher.label], default=str).encode()
        + b"".join(p.detach().float().numpy().tobytes()[:4096] for p in teacher.model.parameters())
    ).hexdigest()[:16]
    if path.is_file():
        cached = load_file(str(path))
        if f"logits_{key}" in cached:
            log.info("teacher logits from cache %s", path)
            return cached[f"logits_{key}"]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x, _ = data.take(np.arange(start, min(len(data), start + batch_size)))
            chunks.append(teacher.model(x).float())
    logits = torch.cat(chunks)
    from vitcompress.fileio import atomic_path

    with atomic_path(path) as tmp:
        save_file({f"logits_{key}": logits}, str(tmp))
    return logits


def score(
    model: nn.Module, data: Dataset, device: torch.device, batch_size: int = EVAL_BATCH_SIZE
) -> tuple[float, float]:
    """(top-1, mean cross-entropy) of `model` on `data`, run on `device`."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    hits, loss, n = 0, 0.0, 0
    try:
        with torch.no_grad():
            for x, y in data.batches(batch_size):
                logits = model(x.to(device)).double().cpu()
                hits += int((logits.argmax(1) == y).sum())
                loss += float(F.cross_entropy(logits, y, reduction="sum"))
                n += len(y)
    finally:
        model.train(was_training)
    return hits / max(1, n), loss / max(1, n)


def split_validation(
    train: Dataset, cfg: DistillConfig, seed: int, val: Dataset | None = None
) -> tuple[Dataset, Dataset | None, str]:
    """(train, validation split, what chose the weights): `val` when given, else a stratified
    `cfg.val_fraction` of `train` (at most `cfg.eval_limit` images) held out of what is trained on."""
    from vitcompress.data import holdout

    if val is not None:
        return train, val, f"val (data.val: {val.spec.describe()}, {len(val)} images)"
    count = round(cfg.val_fraction * len(train))
    if cfg.eval_limit is not None:
        count = min(count, cfg.eval_limit)
    if count < 1 or count >= len(train):
        if cfg.val_fraction > 0:
            log.warning(
                "%d training images: too few to hold out %g%% for validation; keeping the last weights",
                len(train),
                100 * cfg.val_fraction,
            )
        return train, None, "last step (no validation split)"
    rest, held = holdout(train, count, seed)
    return rest, held, f"val ({100 * count / len(train):.0f}% of train, {count} images)"


def distill_model(
    student: LoadedModel,
    teacher: LoadedModel | None,
    cfg: DistillConfig,
    train: Dataset,
    val_data: Dataset | None,
    workdir: Path,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
    progress_metrics: dict[str, float] | None = None,
    test_data: Dataset | None = None,
) -> DistillResult:
    """Train `student.model` in place; checkpoints in `workdir` (rank 0 only).

    `val_data` (if any) is evaluated every `cfg.eval_every` steps and the best weights on it are kept;
    it must not overlap `train` (see `split_validation`). `test_data` is scored once, at the end, with
    the weights kept: it chooses nothing.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from vitcompress.models.layers import apply_masks, mask_gradients, masked_linears

    rank, world_size = world()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    if cfg.uses_teacher and teacher is None:
        raise DistillError(
            "soft_kd, deit_hard and feature need a teacher", hint="set teacher, or use hard_label only"
        )
    if teacher is not None and teacher.input.shape != student.input.shape:
        raise DistillError(
            f"teacher takes {'x'.join(map(str, teacher.input.shape))} input, the student "
            f"{'x'.join(map(str, student.input.shape))}",
            hint="give the teacher the student's --img-size/--in-chans",
        )
    if teacher is not None and teacher.num_classes != student.num_classes:
        raise DistillError(f"teacher has {teacher.num_classes} classes, the student {student.num_classes}")
    if cfg.feature > 0 and teacher is not None:
        from vitcompress.models.tokens import token_schedule_of

        if token_schedule_of(student.model) != token_schedule_of(teacher.model):
            raise DistillError(
                "feature KD compares block outputs token by token, but the student merges or prunes "
                "tokens (a tokens pass) and the teacher does not",
                hint="use soft_kd / deit_hard (logit KD) with token reduction, or distill before the tokens pass",
            )

    global_batch = cfg.batch_size * world_size
    steps_per_epoch = max(
        1, len(train) // global_batch
    )  # full global batches only: every rank steps together
    total = cfg.steps or max(1, round((cfg.epochs or 1.0) * steps_per_epoch))
    warmup = int(cfg.warmup * total)

    module = _student_module(student, teacher, cfg.feature > 0).to(device)
    sparse = bool(masked_linears(student.model))
    distilled = hasattr(student.model, "set_distilled_training") and cfg.uses_teacher
    if distilled:
        student.model.set_distilled_training(True)  # type: ignore[operator]
    decay = [
        p for n, p in module.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "token" not in n
    ]
    no_decay = [
        p
        for n, p in module.named_parameters()
        if not (p.ndim > 1 and "pos_embed" not in n and "token" not in n)
    ]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    fingerprint = _fingerprint(cfg, student, train, val_data)
    result = DistillResult(steps=total, losses=[])
    start_step = 0
    checkpoint_dir, best_dir = workdir / "checkpoint", workdir / "best"
    good: int | None = None  # step of the newest checkpoint this run wrote or resumed from
    if cfg.resume:
        loaded_ckpt = _load_checkpoint(checkpoint_dir)
        if loaded_ckpt is not None:
            weights, state = loaded_ckpt
            if state.get("fingerprint") != fingerprint:
                raise DistillError(
                    f"checkpoint {checkpoint_dir} belongs to another run (config, model or data differ)",
                    hint="use another --out, delete the checkpoint, or set resume: false",
                )
            module.load_state_dict(weights)
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start_step = int(state["step"])
            result.losses = list(state["losses"])
            result.evals = list(state["evals"])
            result.best_top1 = state["best_top1"]
            result.best_step = state.get("best_step")
            result.resumed_from = good = start_step
            log.info("resuming %s at step %d/%d", checkpoint_dir, start_step, total)

    def last_good() -> str:
        if good is None:
            return "no good checkpoint was written: there is none to resume from"
        return f"the last good checkpoint is step {good} in {checkpoint_dir}"

    train_module: nn.Module = module
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )

    teacher_model = teacher.model.to(device).eval() if teacher is not None and cfg.uses_teacher else None
    cached = None
    if cfg.cache_teacher and teacher is not None and cfg.uses_teacher:
        cached = teacher_logits_cache(teacher, train, workdir / "teacher_logits.safetensors", 256).to(device)
    taps_s = FeatureTaps(student) if cfg.feature > 0 else None
    taps_t = FeatureTaps(teacher) if cfg.feature > 0 and teacher is not None else None
    pairs = (
        block_pairs(len(student.adapter.blocks()), len(teacher.adapter.blocks()))
        if taps_t and teacher
        else []
    )
    amp = cfg.amp and device.type == "cuda"

    def evaluate(step: int) -> None:
        if val_data is None or rank != 0:
            return
        if distilled:
            student.model.set_distilled_training(False)  # type: ignore[operator]
        top1, val_loss = score(student.model, val_data, device)
        if distilled:
            student.model.set_distilled_training(True)  # type: ignore[operator]
        result.evals.append({"step": step, "top1": top1, "loss": val_loss})
        log.info("step %d: val top-1 %.2f%%, loss %.4f", step, 100 * top1, val_loss)
        if result.best_top1 is None or top1 > result.best_top1:
            result.best_top1, result.best_step = top1, step
            _save_checkpoint(
                best_dir, student.model, {"step": step, "top1": top1, "fingerprint": fingerprint}
            )

    eval_every = cfg.eval_every or steps_per_epoch
    started, images = time.perf_counter(), 0
    module.train()
    try:
        for step in range(start_step, total):
            epoch, position = divmod(step, steps_per_epoch)
            order = np.random.default_rng(seed + epoch).permutation(len(train))
            global_idx = order[position * global_batch : (position + 1) * global_batch]
            local_idx = global_idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            x, y = train.take(local_idx)
            x = _augment(x, cfg.augment, seed * 1_000_003 + step).to(device)
            y = y.to(device)
            factor = _lr_factor(step, total, warmup, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * factor
            for taps in (taps_s, taps_t):
                if taps is not None:
                    taps.take()  # drop outputs an evaluation left behind
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = train_module(x)
                cls, dist_logits = out if isinstance(out, tuple) else (out, out)
                loss = cls.new_zeros(())
                if cfg.hard_label:
                    loss = loss + cfg.hard_label * F.cross_entropy(cls.float(), y)
                if teacher_model is not None:
                    with torch.no_grad():
                        if cached is not None:
                            t_logits = cached[torch.as_tensor(local_idx, device=device)]
                        else:
                            t_logits = teacher_model(x).float()
                    if cfg.soft_kd:
                        loss = loss + cfg.soft_kd * kd_loss(dist_logits.float(), t_logits, cfg.temperature)
                    if cfg.deit_hard:
                        loss = loss + cfg.deit_hard * F.cross_entropy(dist_logits.float(), t_logits.argmax(1))
                    if taps_s is not None and taps_t is not None:
                        s_feats, t_feats = taps_s.take(), taps_t.take()
                        projections = cast("nn.ModuleList", module.projections)
                        feature_loss = torch.stack(
                            [
                                F.mse_loss(projections[i](s_feats[i]).float(), t_feats[j].float())
                                for i, j in pairs
                            ]
                        ).sum()
                        loss = loss + cfg.feature * feature_loss / max(1, len(pairs))
            if not torch.isfinite(loss):
                raise DistillError(
                    f"loss is {loss.item()} at step {step}",
                    hint=f"lower lr (now {cfg.lr:g}) or clip_grad (now {cfg.clip_grad}; --clip-grad); {last_good()}",
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if sparse:  # a sparsified student keeps its zeros: no gradient, and re-zeroed after the step
                mask_gradients(student.model)
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad)
            optimizer.step()
            if sparse:
                apply_masks(student.model)
            value = loss.detach()
            if world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(value)
                value /= world_size
            result.losses.append(float(value))
            images += len(global_idx)
            done = step + 1
            if on_step:
                on_step(done, total, result.losses[-1])
            if progress_metrics is not None:
                progress_metrics["images_per_s"] = images / max(1e-9, time.perf_counter() - started)
                if result.evals:
                    progress_metrics["top1"] = result.evals[-1]["top1"]
            evaluating = done % eval_every == 0 or done == total
            checkpointing = done % cfg.checkpoint_every == 0 or done == total
            if evaluating or checkpointing:
                # The loss was computed before this step's update: the weights can blow up while it
                # is finite. Every rank checks (their weights are equal) so that all stop together.
                bad = non_finite(module)
                if bad:
                    raise DistillError(
                        f"weights hold NaN/Inf after step {done} ({len(bad)} tensors, e.g. {bad[0]}) "
                        f"although the loss was finite ({result.losses[-1]:.4g})",
                        hint=f"lower lr (now {cfg.lr:g}) or clip_grad (now {cfg.clip_grad}; --clip-grad); {last_good()}",
                    )
            if evaluating:
                evaluate(done)
            if checkpointing:
                if rank == 0:
                    _save_checkpoint(
                        checkpoint_dir,
                        module,
                        {
                            "fingerprint": fingerprint,
                            "step": done,
                            "optimizer": optimizer.state_dict(),
                            "rng": torch.get_rng_state(),
                            "losses": result.losses,
                            "evals": result.evals,
                            "best_top1": result.best_top1,
                            "best_step": result.best_step,
                        },
                    )
                good = done
    finally:
        for taps in (taps_s, taps_t):
            if taps is not None:
                taps.close()
        if distilled:
            student.model.set_distilled_training(False)  # type: ignore[operator]
        module.eval()
        student.model.cpu()
        if teacher is not None:
            teacher.model.cpu()
    result.wall_s = time.perf_counter() - started
    result.images_per_s = images / result.wall_s if result.wall_s > 0 else 0.0
    if rank == 0 and val_data is not None:
        best_state = _load_checkpoint(best_dir)
        if best_state is not None and best_state[1].get("fingerprint") == fingerprint:
            student.model.load_state_dict(best_state[0])
            result.best_top1, result.best_step = best_state[1]["top1"], best_state[1]["step"]
            log.info(
                "kept the best weights on the validation split: top-1 %.2f%% at step %d",
                100 * result.best_top1,
                result.best_step,
            )
        elif best_state is not None:
            log.warning("%s is from another run: kept the last weights", best_dir)
    if rank == 0 and test_data is not None:  # once, with the weights kept: the test data chose nothing
        result.test_top1, result.test_loss = score(student.model, test_data, torch.device("cpu"))
        log.info("test top-1 %.2f%%, loss %.4f", 100 * result.test_top1, result.test_loss)
    return result


def run(state: ModelState, cfg: DistillConfig) -> ModelState:
    from vitcompress.data import load_dataset
    from vitcompress.models import ModelRef, load_model
    from vitcompress.models.artifact import save_artifact
    from vitcompress.models.layers import masked_linears
    from vitcompress.state import Measured

    train = state.load_split("train", cfg.step_name)
    test_data = state.load_split("eval", cfg.step_name, cfg.eval_limit) if state.data_spec("eval") else None
    student = state.model
    val_spec = state.settings.data.val if state.settings.data is not None else None
    val_data = None
    if val_spec is not None:
        if cfg.eval_limit is not None:
            val_spec = val_spec.model_copy(
                update={"limit": min(val_spec.limit or cfg.eval_limit, cfg.eval_limit)}
            )
        val_data = load_dataset(val_spec, student.input, student.num_classes)
        test_spec = state.data_spec("eval")
        if test_spec is not None and val_spec.model_copy(update={"limit": None}) == test_spec.model_copy(
            update={"limit": None}
        ):
            log.warning(
                "data.val is data.eval: the weights are chosen on the test data, its top-1 is optimistic"
            )
    train, val_data, selected_on = split_validation(train, cfg, state.settings.seed, val_data)
    log.info("%s: best weights chosen on %s", cfg.step_name, selected_on)
    teacher = state.teacher
    if cfg.teacher is not None:
        t = cfg.teacher
        inherit = t.source.startswith(
            "timm:"
        )  # unless told otherwise, a timm teacher sees what the student sees
        teacher = load_model(
            ModelRef(
                t.source,
                t.checkpoint,
                t.num_classes or (student.num_classes if inherit else None),
                t.img_size or (student.input.height if inherit else None),
                t.in_chans or (student.input.channels if inherit else None),
                False,
                dict(t.kwargs),
            )
        )
    if teacher is None and cfg.uses_teacher:  # nothing changed the model before: it teaches a copy of itself
        import copy

        teacher = copy.deepcopy(student)
    workdir = state.settings.out_dir / cfg.step_name
    # Training state lives beside the artifact, not in it: the artifact directory is replaced whole.
    train_dir = state.settings.out_dir / f"{cfg.step_name}.train"
    if not train_dir.exists() and (workdir / "train").is_dir():  # a run directory of an earlier version
        with contextlib.suppress(OSError):  # under torchrun another rank may have moved it first
            os.rename(workdir / "train", train_dir)
    progress = state.settings.progress

    metrics: dict[str, float] = {}

    def on_step(done: int, total: int, loss: float) -> None:
        if progress is not None:
            progress(cfg.step_name, done, total, {**metrics, "loss": loss})

    init_distributed()
    result = distill_model(
        student,
        teacher,
        cfg,
        train,
        val_data,
        train_dir,
        seed=state.settings.seed,
        on_step=on_step,
        progress_metrics=metrics,
        test_data=test_data,
    )
    if world()[0] == 0:
        save_artifact(
            student, workdir, history=[{"pass": cfg.step_name, "config": cfg.model_dump(mode="json")}]
        )
    outcome = Measured(
        params=sum(p.numel() for p in student.model.parameters()),
        macs=state.records[-1].macs if state.records else None,
        top1=result.test_top1,
        artifact=str(workdir),
        details={
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "selected_on": selected_on,
            "train_images": len(train),
            "best_step": result.best_step,
            "val_top1": result.best_top1,
            "test_top1": result.test_top1,
            "test_loss": result.test_loss,
            "evals": result.evals,
            "images_per_s": result.images_per_s,
            "train_wall_s": result.wall_s,
            "sparse_layers_kept": len(masked_linears(student.model)),  # trained with their masks fixed
        },
    )
    if cfg.become_teacher:
        import copy

        return state.passed(cfg, outcome, teacher=copy.deepcopy(student))
    return state.passed(cfg, outcome)
