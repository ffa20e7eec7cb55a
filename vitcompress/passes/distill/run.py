"""The distill pass: the teacher (the model as loaded, or its own), the data splits, training, and
the ledger record; `become_teacher` hands the result on as the next teacher."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING

from vitcompress.passes.distill.config import DistillConfig
from vitcompress.passes.distill.distributed import init_distributed, world
from vitcompress.passes.distill.train import distill_model, split_validation

if TYPE_CHECKING:
    from vitcompress.state import ModelState

log = logging.getLogger(__name__)


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
