"""Knowledge distillation: recover the accuracy a compressed student lost, from its uncompressed teacher.

Losses, each with its own weight: cross-entropy on the labels; soft logit KD (Hinton et al. 2015:
KL between temperature-softened distributions, times T^2); DeiT's hard distillation (cross-entropy on
the teacher's top-1, Touvron et al. 2021), applied to the distillation head when the student has a
distillation token (timm `deit_*_distilled_*`: class head learns the labels, distillation head the
teacher); and feature KD (FitNets, Romero et al. 2015): MSE between student block outputs and the
teacher's at the same relative depth, through learned projections where the widths differ.

The loop: AdamW, linear warm-up then cosine decay, gradient clipping, autocast on GPU, evaluation
every N steps keeping the best weights. Checkpoints are written atomically every N steps and hold
everything a resumed run needs to continue exactly (weights, projections, optimizer, step, RNG state,
loss history); the data order is a function of (seed, epoch), so the position is the step. Under
`torchrun` the student is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU): each global
batch is split across ranks, so N processes at batch B follow the single-process run at batch N*B.
Only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from vitcompress.errors import VitcompressError
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

    kind: Literal["distill"] = "distill"
    teacher: TeacherSpec | None = Field(None, description="Default: the model as loaded, before compression.")
    epochs: float | None = Field(1.0, gt=0, description="Passes over data.train (or set steps).")
    steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(64, ge=1, description="Images per step (per process under torchrun).")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.05, ge=0)
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
        None, gt=0, description="Evaluate on data.eval every N steps (default: each epoch)."
    )
    eval_limit: int | None = Field(
        2000, gt=0, description="Images of data.eval used during training (stratified)."
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
    evals: list[dict[str, float]] = field(default_factory=list)  # step, top1, loss
    best_top1: float | None = None
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


def _fingerprint(cfg: DistillConfig, student: LoadedModel, data: Dataset) -> str:
    """Identifies a run: a checkpoint from another config, model or data set is not resumed."""
    parts = {
        "cfg": cfg.model_dump(mode="json", exclude={"resume", "checkpoint_every", "name"}),
        "structure": student.adapter.structure(),
        "data": data.spec.model_dump(mode="json"),
        "n": len(data),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_checkpoint(directory: Path, module: nn.Module, state: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    from vitcompress.fileio import atomic_dir

    with atomic_dir(directory) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
            str(tmp / "weights.safetensors"),
        )
        torch.save(state, tmp / "train_state.pt")


def _load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    import torch
    from safetensors.torch import load_file

    weights, state = directory / "weights.safetensors", directory / "train_state.pt"
    if not (weights.is_file() and state.is_file()):
        return None
    try:
        return load_file(str(weights)), torch.load(state, weights_only=True)
    except Exception as err:
        raise DistillError(
            f"checkpoint {directory} is unreadable: {str(err).splitlines()[0]}",
            hint="delete it or set resume: false",
        ) from err


def teacher_logits_cache(teacher: LoadedModel, data: Dataset, path: Path, batch_size: int) -> torch.Tensor:
    """Teacher logits for every training image, computed once and kept next to the checkpoint."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(
        json.dumps([data.spec.model_dump(mode="json"), len(data), teacher.label], default=str).encode()
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
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"logits_{key}": logits}, str(path))
    return logits


def distill_model(
    student: LoadedModel,
    teacher: LoadedModel | None,
    cfg: DistillConfig,
    train: Dataset,
    eval_data: Dataset | None,
    workdir: Path,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
    progress_metrics: dict[str, float] | None = None,
) -> DistillResult:
    """Train `student.model` in place; checkpoints in `workdir` (rank 0 only)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from vitcompress.evaluate import evaluate_torch

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

    global_batch = cfg.batch_size * world_size
    steps_per_epoch = max(
        1, len(train) // global_batch
    )  # full global batches only: every rank steps together
    total = cfg.steps or max(1, round((cfg.epochs or 1.0) * steps_per_epoch))
    warmup = int(cfg.warmup * total)

    module = _student_module(student, teacher, cfg.feature > 0).to(device)
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
    fingerprint = _fingerprint(cfg, student, train)
    result = DistillResult(steps=total, losses=[])
    start_step, best_state = 0, None
    checkpoint_dir = workdir / "checkpoint"
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
            result.resumed_from = start_step
            log.info("resuming %s at step %d/%d", checkpoint_dir, start_step, total)
    if rank == 0 and (workdir / "best").is_dir():
        best_state = _load_checkpoint(workdir / "best")

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
        if eval_data is None or rank != 0:
            return
        if distilled:
            student.model.set_distilled_training(False)  # type: ignore[operator]
        measured = evaluate_torch(student, eval_data, batch_size=256)
        if distilled:
            student.model.set_distilled_training(True)  # type: ignore[operator]
        result.evals.append({"step": step, "top1": measured.top1, "loss": measured.loss})
        log.info("step %d: eval top-1 %.2f%%, loss %.4f", step, 100 * measured.top1, measured.loss)
        if result.best_top1 is None or measured.top1 > result.best_top1:
            result.best_top1 = measured.top1
            _save_checkpoint(workdir / "best", student.model, {"step": step, "top1": measured.top1})

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
                    hint=f"lower lr (now {cfg.lr:g}) or raise clip_grad; the last good checkpoint is in {checkpoint_dir}",
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad)
            optimizer.step()
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
            if done % eval_every == 0 or done == total:
                evaluate(done)
            if rank == 0 and (done % cfg.checkpoint_every == 0 or done == total):
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
                    },
                )
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
    if rank == 0 and eval_data is not None:
        best_state = _load_checkpoint(workdir / "best")
        if best_state is not None:
            student.model.load_state_dict(best_state[0])
            log.info(
                "kept the best weights: top-1 %.2f%% at step %d",
                100 * best_state[1]["top1"],
                best_state[1]["step"],
            )
    return result


def run(state: ModelState, cfg: DistillConfig) -> ModelState:
    from vitcompress.models import ModelRef, load_model
    from vitcompress.models.artifact import save_artifact
    from vitcompress.state import PassRecord

    start = time.perf_counter()
    train = state.load_split("train", cfg.step_name)
    eval_data = state.load_split("eval", cfg.step_name, cfg.eval_limit) if state.data_spec("eval") else None
    student = state.model
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
        eval_data,
        workdir / "train",
        seed=state.settings.seed,
        on_step=on_step,
        progress_metrics=metrics,
    )
    if world()[0] == 0:
        save_artifact(
            student, workdir, history=[{"pass": cfg.step_name, "config": cfg.model_dump(mode="json")}]
        )
    record = PassRecord(
        name=cfg.step_name,
        kind=cfg.kind,
        params=sum(p.numel() for p in student.model.parameters()),
        macs=state.records[-1].macs if state.records else None,
        top1=result.best_top1,
        wall_s=time.perf_counter() - start,
        artifact=str(workdir),
        details={
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "evals": result.evals,
            "images_per_s": result.images_per_s,
            "train_wall_s": result.wall_s,
        },
    )
    if cfg.become_teacher:
        import copy

        return state.with_record(record, model_changed=True, teacher=copy.deepcopy(student))
    return state.with_record(record, model_changed=True)
