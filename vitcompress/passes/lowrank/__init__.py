"""The lowrank pass, one folder: config.py (the recipe schema: LowRankConfig, Method), factors.py
(SVD and whitened SVD of one layer), ranks.py (rank rules and global targets), comcat.py (COMCAT
per-head attention factors), run.py (the pass: layers, ranks, module replacement, report).

Every name of the single module this pass once was is still importable from the package, looked
up in these modules in order and imported on first use (the config alone stays light).
"""

from vitcompress.passes.base import package_exports

__getattr__ = package_exports(__name__, ("config", "factors", "ranks", "comcat", "run", "vitcompress.errors"))
