"""What every pass config shares: a frozen pydantic model, unknown keys forbidden, an optional step name."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PassConfig(BaseModel):
    """Base of every pass config; subclasses add `kind: Literal[...]` and their own documented fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: str
    name: str | None = Field(None, description="Ledger name of this step (default: the kind).")

    @property
    def step_name(self) -> str:
        return self.name or self.kind

    def needs_data(self) -> bool:
        """Whether this pass, as configured, reads the recipe's data (calibration or training split)."""
        return False


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
