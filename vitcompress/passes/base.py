"""What every pass config shares: a frozen pydantic model, unknown keys forbidden, an optional step name."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PassConfig(BaseModel):
    """Base of every pass config; subclasses add `kind: Literal[...]` and their own documented fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    name: str | None = Field(None, description="Ledger name of this step (default: the kind).")

    @property
    def step_name(self) -> str:
        return self.name or self.kind

    def needs_data(self) -> bool:
        """Whether this pass, as configured, reads the recipe's data (calibration or training split)."""
        return False
