"""What every pass config shares: a frozen pydantic model, unknown keys forbidden, an optional step
name, and what the core needs to know about the pass, declared by the pass itself.

The core (recipe validation, the pipeline, sweep, reports) asks these attributes and methods and
never tests a pass's kind: a new pass declares them on its config class and is registered with one
line in `vitcompress.passes`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from vitcompress.runtimes.target import TargetSection


class Needs(str, Enum):
    """What a pass works on."""

    torch = "torch"  # the PyTorch model
    onnx = "onnx"  # the exported ONNX file


class PassConfig(BaseModel):
    """Base of every pass config; subclasses add `kind: Literal[...]` and their own documented fields,
    and set the class attributes below."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # --- what the core needs to know (class attributes, not recipe fields)
    summary: ClassVar[str] = ""  # one line for `recipe list`/help
    engine: ClassVar[str] = ""  # the module holding run(state, cfg); imported only when the pass runs
    needs: ClassVar[Needs] = Needs.torch
    changes_model: ClassVar[bool] = False  # edits the PyTorch model (export must come after it)
    produces_onnx: ClassVar[bool] = False  # writes the ONNX file later passes work on
    makes_sparse: ClassVar[bool] = False  # leaves sparsity masks on linears
    reshapes_linears: ClassVar[bool] = False  # replaces or resizes linears (a mask would no longer fit)
    measures: ClassVar[bool] = False  # measures the final model against the fp32 baseline (latency, top-1)
    lowers_precision: ClassVar[bool] = False  # makes the int8/fp16 model a recipe's target may ask for

    kind: str
    name: str | None = Field(None, description="Ledger name of this step (default: the kind).")

    @classmethod
    def kind_name(cls) -> str:
        """The `kind:` value that selects this config in a recipe."""
        return str(cls.model_fields["kind"].default)

    @property
    def step_name(self) -> str:
        return self.name or self.kind

    @classmethod
    def target_defaults(cls, target: TargetSection) -> dict[str, Any]:
        """The settings a recipe's `target:` implies for this pass (explicit settings win)."""
        return {}

    def needs_data(self) -> bool:
        """Whether this pass, as configured, reads the recipe's data (calibration or training split)."""
        return False

    def needs_train(self) -> bool:
        """Whether this pass, as configured, trains on data.train (calibration data is not enough)."""
        return False

    def wants_original_model(self) -> bool:
        """Whether this pass, as configured, reads the model as loaded (a teacher, a baseline), so the
        pipeline keeps a copy of it when an earlier pass changes the model."""
        return False


def package_exports(package: str, modules: tuple[str, ...]) -> Callable[[str], Any]:
    """A pass package's module `__getattr__`: a name is looked up in its `modules` in order (the
    config first), each imported on first use, so that importing the config alone stays light and
    every name of the pass module it once was is still importable from the package."""

    def find(name: str) -> Any:
        import importlib

        if name in modules:  # a submodule (`from vitcompress.passes.quantize import onnx`)
            return importlib.import_module(f"{package}.{name}")
        for module in modules:
            found = importlib.import_module(f"{package}.{module}" if "." not in module else module)
            if name in vars(found):
                return vars(found)[name]
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return find


def fraction_or_count(value: float | None, *, whole: bool = False) -> float | None:
    """Validate a setting that is a fraction of the original or an absolute count (targets, ranks).

    Values up to 1 are fractions, larger ones counts; `whole` says whether 1 itself is a fraction (the
    whole). Where it is not (targets: below 1 is a fraction, anything else a count), 1 is refused, as it
    would keep everything as a fraction and next to nothing as a count.
    """
    if value is None:
        return value
    fractions = "fractions must be in (0, 1]" if whole else "fractions must be in (0, 1)"
    counts = "counts must be integers larger than 1"
    if value <= 0 or (value == 1 and not whole):
        raise ValueError(f"neither a fraction nor a count: {fractions}, {counts}")
    if value > 1 and not float(value).is_integer():
        raise ValueError(f"a value above 1 is a count, and {counts} ({fractions})")
    return value
