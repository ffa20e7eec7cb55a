"""Module types that compression passes put into a model, and how the artifact rebuilds them.

The artifact stores no pickled modules: `model_edits` describes every replaced module as a small
JSON edit, and `EDITS` says how to put an empty module of the right shape back before the tensors load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vitcompress.errors import CheckpointError


class LowRankLinear(nn.Module):
    """y = second(first(x)): first is r x in (no bias), second is out x r (with the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    # Read from the two linears, so they stay true when an artifact load resizes them.
    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    @property
    def rank(self) -> int:
        return self.first.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent (second @ first), for code that reads `linear.weight`."""
        return self.second.weight @ self.first.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _apply_lowrank(model: nn.Module, path: str, edit: dict[str, Any]) -> None:
    try:
        old = model.get_submodule(path)
    except AttributeError as err:
        raise CheckpointError(f"artifact edit lowrank: the model has no module {path}") from err
    if not isinstance(old, nn.Linear):
        raise CheckpointError(f"artifact edit lowrank: {path} is a {type(old).__name__}, not a Linear")
    set_module(
        model, path, LowRankLinear(old.in_features, old.out_features, int(edit["rank"]), old.bias is not None)
    )


def _apply_tokens(model: nn.Module, _path: str, edit: dict[str, Any]) -> None:
    from vitcompress.models.tokens import apply_token_edit

    apply_token_edit(model, edit)


# kind -> function(model, module_path, edit) that puts the module back (empty, right shapes)
EDITS: dict[str, Callable[[nn.Module, str, dict[str, Any]], None]] = {
    "lowrank": _apply_lowrank,
    "tokens": _apply_tokens,
}


def model_edits(model: nn.Module) -> list[dict[str, Any]]:
    """The edits that rebuild this model's replaced modules from its family's constructor."""
    from vitcompress.models.tokens import token_edits

    return [
        {"kind": "lowrank", "module": name, "rank": module.rank}
        for name, module in model.named_modules()
        if isinstance(module, LowRankLinear)
    ] + token_edits(model)
