"""The distill pass, one folder: config.py (the recipe schema: DistillConfig, TeacherSpec),
distributed.py (torchrun process group), losses.py (logit, DeiT and feature KD), train.py (the
resumable training loop), run.py (the pass: teacher, data splits, ledger).

Every name of the single module this pass once was is still importable from the package, looked
up in these modules in order and imported on first use (the config alone stays light).
"""

from vitcompress.passes.base import package_exports

__getattr__ = package_exports(
    __name__, ("config", "distributed", "losses", "train", "run", "vitcompress.errors")
)
