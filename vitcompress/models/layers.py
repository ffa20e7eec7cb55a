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


# --------------------------------------------------------------------------- sparsity masks
# A sparsified linear keeps its mask (True = weight kept) as a bool buffer beside its weight, so
# training can re-apply it after every optimizer step. The buffer is not part of the state dict: the
# mask is the weight's zeros (the artifact's weights stay loadable anywhere, and a mask stored as
# bytes would add a quarter to an fp32 file); the artifact's `sparse` edit names the layer and its
# pattern, and loading derives the mask from the loaded weight. The buffer is unused in forward:
# exports never see it, the zeros are in the weight.
MASK_BUFFER = "sparsity_mask"


def attach_mask(linear: nn.Linear, mask: torch.Tensor, pattern: str) -> None:
    """Record `mask` (same shape as the weight, True = kept) on `linear` and zero the weights it drops."""
    if mask.shape != linear.weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(linear.weight.shape)}")
    mask = mask.to(device=linear.weight.device, dtype=torch.bool)
    linear.register_buffer(MASK_BUFFER, mask, persistent=False)
    linear.sparsity_pattern = pattern  # type: ignore[assignment]
    with torch.no_grad():
        linear.weight.mul_(mask)


def masked_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear of `model` that carries a sparsity mask, by module path."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and isinstance(getattr(module, MASK_BUFFER, None), torch.Tensor)
    }


def mask_gradients(model: nn.Module) -> None:
    """Zero the gradients of masked weights (before clipping, so the norm counts live weights only)."""
    for linear in masked_linears(model).values():
        if linear.weight.grad is not None:
            linear.weight.grad.mul_(getattr(linear, MASK_BUFFER))


def apply_masks(model: nn.Module) -> int:
    """Zero every masked weight again (after an optimizer step); returns how many layers were masked."""
    layers = masked_linears(model)
    with torch.no_grad():
        for linear in layers.values():
            linear.weight.mul_(getattr(linear, MASK_BUFFER))
    return len(layers)


def _apply_sparse(model: nn.Module, path: str, edit: dict[str, Any]) -> None:
    try:
        old = model.get_submodule(path)
    except AttributeError as err:
        raise CheckpointError(f"artifact edit sparse: the model has no module {path}") from err
    if not isinstance(old, nn.Linear):
        raise CheckpointError(f"artifact edit sparse: {path} is a {type(old).__name__}, not a Linear")
    out_features, in_features = (int(d) for d in edit["shape"])
    linear = old
    if (old.out_features, old.in_features) != (out_features, in_features):  # pruned: resize it here
        linear = nn.Linear(in_features, out_features, bias=old.bias is not None)
        set_module(model, path, linear)
    # a placeholder until the weights are loaded: `derive_masks` then sets it from their zeros
    linear.register_buffer(
        MASK_BUFFER, torch.ones(out_features, in_features, dtype=torch.bool), persistent=False
    )
    linear.sparsity_pattern = str(edit["pattern"])  # type: ignore[assignment]
def _apply_tokens(model: nn.Module, _path: str, edit: dict[str, Any]) -> None:
    from vitcompress.models.tokens import apply_token_edit

    apply_token_edit(model, edit)


def derive_masks(model: nn.Module) -> None:
    """Set every sparse linear's mask from its loaded weight: the zeros are what the mask dropped."""
    for linear in masked_linears(model).values():
        setattr(linear, MASK_BUFFER, linear.weight.detach() != 0)


# kind -> function(model, module_path, edit) that puts the module back (empty, right shapes)
EDITS: dict[str, Callable[[nn.Module, str, dict[str, Any]], None]] = {
    "lowrank": _apply_lowrank,
    "sparse": _apply_sparse,
    "tokens": _apply_tokens,
}


def model_edits(model: nn.Module) -> list[dict[str, Any]]:
    """The edits that rebuild this model's replaced modules from its family's constructor (module
    replacements first: a sparse edit may name a linear inside a factorized layer; token schedules
    last)."""
    from vitcompress.models.tokens import token_edits

    return [
        {"kind": "lowrank", "module": name, "rank": module.rank}
        for name, module in model.named_modules()
        if isinstance(module, LowRankLinear)
    ] + [
        {
            "kind": "sparse",
            "module": name,
            "shape": [linear.out_features, linear.in_features],
            "pattern": str(getattr(linear, "sparsity_pattern", "unknown")),
        }
        for name, linear in masked_linears(model).items()
    ] + token_edits(model)
