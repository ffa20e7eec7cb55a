"""The distill pass, one folder: config.py (the recipe schema: DistillConfig, TeacherSpec),
distributed.py (torchrun process group), losses.py (logit, DeiT and feature KD), train.py (the
resumable training loop), run.py (the pass: teacher, data splits, ledger).

Every name the pass module had before it became a folder is still importable from here (loaded
on first use, so importing the config alone stays light).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME: dict[str, str] = {
    "DistillConfig": "vitcompress.passes.distill.config",
    "DistillError": "vitcompress.errors",
    "DistillResult": "vitcompress.passes.distill.train",
    "FeatureTaps": "vitcompress.passes.distill.losses",
    "STATE_FILE": "vitcompress.passes.distill.train",
    "TeacherSpec": "vitcompress.passes.distill.config",
    "WEIGHTS_FILE": "vitcompress.passes.distill.train",
    "_augment": "vitcompress.passes.distill.train",
    "_data_id": "vitcompress.passes.distill.train",
    "_fingerprint": "vitcompress.passes.distill.train",
    "_load_checkpoint": "vitcompress.passes.distill.train",
    "_lr_factor": "vitcompress.passes.distill.train",
    "_save_checkpoint": "vitcompress.passes.distill.train",
    "_student_module": "vitcompress.passes.distill.losses",
    "block_pairs": "vitcompress.passes.distill.losses",
    "distill_model": "vitcompress.passes.distill.train",
    "init_distributed": "vitcompress.passes.distill.distributed",
    "kd_loss": "vitcompress.passes.distill.losses",
    "non_finite": "vitcompress.passes.distill.train",
    "run": "vitcompress.passes.distill.run",
    "score": "vitcompress.passes.distill.train",
    "split_validation": "vitcompress.passes.distill.train",
    "teacher_logits_cache": "vitcompress.passes.distill.train",
    "world": "vitcompress.passes.distill.distributed",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
