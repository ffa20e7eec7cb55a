"""The lowrank pass, one folder: config.py (the recipe schema: LowRankConfig, Method), factors.py
(SVD and whitened SVD of one layer), ranks.py (rank rules and global targets), comcat.py (COMCAT
per-head attention factors), run.py (the pass: layers, ranks, module replacement, report).

Every name the pass module had before it became a folder is still importable from here (loaded
on first use, so importing the config alone stays light).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME: dict[str, str] = {
    "Choice": "vitcompress.passes.lowrank.ranks",
    "Factors": "vitcompress.passes.lowrank.factors",
    "LayerReport": "vitcompress.passes.lowrank.run",
    "LowRankConfig": "vitcompress.passes.lowrank.config",
    "LowRankError": "vitcompress.errors",
    "LowRankResult": "vitcompress.passes.lowrank.run",
    "Method": "vitcompress.passes.lowrank.config",
    "_layer_params": "vitcompress.passes.lowrank.ranks",
    "_low_rank_product": "vitcompress.passes.lowrank.comcat",
    "_round_down": "vitcompress.passes.lowrank.ranks",
    "_weight_budget": "vitcompress.passes.lowrank.run",
    "breakeven_rank": "vitcompress.passes.lowrank.config",
    "choose_ranks": "vitcompress.passes.lowrank.ranks",
    "collect_second_moments": "vitcompress.passes.lowrank.factors",
    "comcat_attention": "vitcompress.passes.lowrank.comcat",
    "factorize_linear": "vitcompress.passes.lowrank.factors",
    "factorize_model": "vitcompress.passes.lowrank.run",
    "max_useful_rank": "vitcompress.passes.lowrank.ranks",
    "output_error": "vitcompress.passes.lowrank.factors",
    "run": "vitcompress.passes.lowrank.run",
    "select_layers": "vitcompress.passes.lowrank.run",
    "svd_factors": "vitcompress.passes.lowrank.factors",
    "whitened_factors": "vitcompress.passes.lowrank.factors",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
