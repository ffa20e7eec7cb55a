"""The prune pass, one folder: config.py (the recipe schema: PruneConfig and its choices), cost.py
(shapes and the fitted MAC/parameter cost model), importance.py (magnitude, Taylor and Hessian
channel scores), plan.py (which heads and channels go, under the ViT rules and a target),
surgery.py (torch-pruning"s dependency graph, adapters, checks), run.py (the pruning loop and the
pass).

Every name the pass module had before it became a folder is still importable from here (loaded
on first use, so importing the config alone stays light).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME: dict[str, str] = {
    "BlockShape": "vitcompress.passes.prune.cost",
    "ChannelStats": "vitcompress.passes.prune.importance",
    "CostModel": "vitcompress.passes.prune.cost",
    "Importance": "vitcompress.passes.prune.config",
    "Plan": "vitcompress.passes.prune.plan",
    "Planner": "vitcompress.passes.prune.plan",
    "PruneConfig": "vitcompress.passes.prune.config",
    "PruneError": "vitcompress.errors",
    "PruneResult": "vitcompress.passes.prune.run",
    "Scope": "vitcompress.passes.prune.config",
    "Shape": "vitcompress.passes.prune.cost",
    "StepReport": "vitcompress.passes.prune.run",
    "Structure": "vitcompress.passes.prune.config",
    "Unit": "vitcompress.passes.prune.plan",
    "_add": "vitcompress.passes.prune.plan",
    "_batches": "vitcompress.passes.prune.run",
    "_block_stats": "vitcompress.passes.prune.importance",
    "_check_reachable": "vitcompress.passes.prune.plan",
    "_elementwise": "vitcompress.passes.prune.importance",
    "_embed_dependencies": "vitcompress.passes.prune.importance",
    "_fits": "vitcompress.passes.prune.plan",
    "_graph": "vitcompress.passes.prune.importance",
    "_heads_to_sets": "vitcompress.passes.prune.plan",
    "_is_protected": "vitcompress.passes.prune.plan",
    "_keep_attention_temperature": "vitcompress.passes.prune.surgery",
    "_keep_chunks": "vitcompress.passes.prune.plan",
    "_owners": "vitcompress.passes.prune.plan",
    "_protected_owners": "vitcompress.passes.prune.plan",
    "_reduce_to": "vitcompress.passes.prune.importance",
    "_removal_global": "vitcompress.passes.prune.plan",
    "_removal_target": "vitcompress.passes.prune.plan",
    "_removal_uniform": "vitcompress.passes.prune.plan",
    "apply_plan": "vitcompress.passes.prune.surgery",
    "check_model": "vitcompress.passes.prune.surgery",
    "compute_stats": "vitcompress.passes.prune.importance",
    "current_shape": "vitcompress.passes.prune.cost",
    "fit_cost_model": "vitcompress.passes.prune.cost",
    "planned_shape": "vitcompress.passes.prune.plan",
    "prune_model": "vitcompress.passes.prune.run",
    "run": "vitcompress.passes.prune.run",
    "smallest_shape": "vitcompress.passes.prune.plan",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
