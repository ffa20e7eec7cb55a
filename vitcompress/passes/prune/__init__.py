"""The prune pass, one folder: config.py (the recipe schema: PruneConfig and its choices), cost.py
(shapes and the fitted MAC/parameter cost model), importance.py (magnitude, Taylor and Hessian
channel scores), plan.py (which heads and channels go, under the ViT rules and a target),
surgery.py (torch-pruning's dependency graph, adapters, checks), run.py (the pruning loop and the
pass).

Every name of the single module this pass once was is still importable from the package, looked
up in these modules in order and imported on first use (the config alone stays light).
"""

from vitcompress.passes.base import package_exports

__getattr__ = package_exports(
    __name__, ("config", "cost", "importance", "plan", "surgery", "run", "vitcompress.errors")
)
