"""The registry of passes: one explicit table, no import-time side effects.

Each pass is a config class (a frozen pydantic model with `kind: Literal[...]` and documented
fields) that declares what the core needs to know as class attributes (`engine`, `needs`,
`changes_model`, `produces_onnx`, ...; see `PassConfig`), and an engine module with
`run(state, cfg) -> state`. Registering a pass is one line in `PASS_CONFIGS`; only the config
modules are imported here, so the recipe schema loads without the engines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vitcompress.errors import RecipeError, did_you_mean
from vitcompress.passes.base import Needs, PassConfig
from vitcompress.passes.distill.config import DistillConfig
from vitcompress.passes.export import ExportConfig
from vitcompress.passes.lowrank.config import LowRankConfig
from vitcompress.passes.prune.config import PruneConfig
from vitcompress.passes.quantize.config import QuantizeConfig
from vitcompress.passes.sparsify.config import SparsifyConfig
from vitcompress.passes.tokens.config import TokensConfig
from vitcompress.passes.validate import ValidateConfig

__all__ = ["PASSES", "PASS_CONFIGS", "Needs", "PassConfig", "PassSpec", "get_pass", "measuring_kinds", "register", "unregister"]

# The passes, in the order `recipe list` and the schema show them: one line per pass.
PASS_CONFIGS: tuple[type[PassConfig], ...] = (
    PruneConfig,
    LowRankConfig,
    TokensConfig,
    DistillConfig,
    SparsifyConfig,
    ExportConfig,
    QuantizeConfig,
    ValidateConfig,
)


@dataclass(frozen=True)
class PassSpec:
    """A registered pass as the core sees it: its config class and what that class declares."""

    config: type[PassConfig]

    @property
    def kind(self) -> str:
        return self.config.kind_name()

    @property
    def summary(self) -> str:
        return self.config.summary

    @property
    def needs(self) -> Needs:
        return self.config.needs

    @property
    def changes_model(self) -> bool:
        return self.config.changes_model

    @property
    def produces_onnx(self) -> bool:
        return self.config.produces_onnx

    @property
    def makes_sparse(self) -> bool:
        return self.config.makes_sparse

    @property
    def reshapes_linears(self) -> bool:
        return self.config.reshapes_linears

    @property
    def module(self) -> str:
        return self.config.engine

    def runner(self) -> Callable[[Any, Any], Any]:
        import importlib

        return importlib.import_module(self.config.engine).run  # type: ignore[no-any-return]


PASSES: dict[str, PassSpec] = {cls.kind_name(): PassSpec(cls) for cls in PASS_CONFIGS}


def register(config: type[PassConfig]) -> None:
    """Add a pass at run time (a plug-in, a test's example pass): recipes validated afterwards
    accept its kind, and the pipeline runs its engine. The built-in passes are the table above."""
    kind = config.kind_name()
    if not config.engine:
        raise RecipeError(f"pass {kind!r} declares no engine module (class attribute `engine`)")
    if kind in PASSES and PASSES[kind].config is not config:
        raise RecipeError(f"a pass of kind {kind!r} is registered already ({PASSES[kind].config.__name__})")
    PASSES[kind] = PassSpec(config)
    _schema_changed()


def unregister(kind: str) -> None:
    """Remove a pass added by `register` (built-in passes stay)."""
    if kind in {cls.kind_name() for cls in PASS_CONFIGS}:
        raise RecipeError(f"{kind!r} is a built-in pass")
    if PASSES.pop(kind, None) is not None:
        _schema_changed()


def _schema_changed() -> None:
    import sys

    recipe = sys.modules.get("vitcompress.recipe")  # not loaded yet: it reads PASSES when it is
    if recipe is not None:
        recipe.rebuild_schema()


def measuring_kinds() -> frozenset[str]:
    """The kinds whose ledger record measures the final model against the fp32 baseline (latency,
    top-1): what reports, budgets and sweeps read."""
    return frozenset(kind for kind, spec in PASSES.items() if spec.config.measures)


def get_pass(kind: str) -> PassSpec:
    try:
        return PASSES[kind]
    except KeyError:
        raise RecipeError(f"unknown pass kind {kind!r}", hint=did_you_mean(kind, PASSES)) from None
