"""The training loop: AdamW with warm-up and cosine decay, held-out best weights, resumable
checkpoints (model, optimizer, scheduler, step, RNG, data position) written atomically, and a stop
on non-finite weights."""

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
from typing import TYPE_CHECKING, Any, cast

from vitcompress.accuracy import EVAL_BATCH_SIZE
from vitcompress.errors import DistillError
from vitcompress.fileio import file_sha256
from vitcompress.passes.distill.config import DistillConfig
from vitcompress.passes.distill.distributed import world
from vitcompress.passes.distill.losses import FeatureTaps, _student_module, block_pairs, kd_loss

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitcompress.data import Dataset
    from vitcompress.models.loader import LoadedModel

log = logging.getLogger(__name__)


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
