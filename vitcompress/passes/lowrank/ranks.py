"""Rank choice: one rule for every layer (rank, fraction, energy) or a global target (params, MACs)
met by spending rank where the spectra say it buys the most."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vitcompress.passes.lowrank.config import LowRankConfig, breakeven_rank
from vitcompress.passes.lowrank.factors import Factors

if TYPE_CHECKING:
    from torch import nn


log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- rank choice


def _round_down(value: float, r: int) -> int:
    return int(value // r) * r


def max_useful_rank(linear: nn.Linear, r: int) -> int:
    """The largest multiple of r that still saves parameters (0 if none does)."""
    be = breakeven_rank(linear.out_features, linear.in_features)
    rank = _round_down(be, r)
    if rank >= be:
        rank -= r
    return max(rank, 0)


def _layer_params(linear: nn.Linear, rank: int | None) -> int:
    """Weight parameters at a rank (None: dense)."""
    return (
        linear.in_features * linear.out_features
        if rank is None
        else rank * (linear.in_features + linear.out_features)
    )


def fraction_rank(out_features: int, in_features: int, fraction: float, round_to: int) -> int:
    """The rank `rank_fraction: fraction` gives a layer: a multiple of `round_to` (at least one),
    at most full rank. Whether it saves anything is `breakeven_rank`'s question."""
    full = min(in_features, out_features)
    return min(full, max(round_to, round(fraction * full / round_to) * round_to))


@dataclass(frozen=True)
class Choice:
    name: str
    rank: int | None  # None: stays dense (factorizing would not save anything)
    reason: str


def choose_ranks(
    cfg: LowRankConfig,
    layers: dict[str, nn.Linear],
    factors: dict[str, Factors],
    budget_weights: float | None,
) -> list[Choice]:
    """Ranks per layer by the configured rule; `budget_weights` is the weight-parameter budget of the layers."""
    import torch

    r = cfg.round_to
    choices: list[Choice] = []
    if budget_weights is None:
        for name, lin in layers.items():
            full = min(lin.in_features, lin.out_features)
            if cfg.rank is not None:
                rank = cfg.rank
            elif cfg.rank_fraction is not None:
                rank = fraction_rank(lin.out_features, lin.in_features, cfg.rank_fraction, r)
            else:
                assert cfg.energy is not None
                energy = factors[name].energy()
                needed = int(torch.searchsorted(energy, torch.tensor(cfg.energy - 1e-7)).item()) + 1
                rank = max(r, math.ceil(needed / r) * r)
            rank = min(rank, full)
            if rank >= breakeven_rank(lin.out_features, lin.in_features):
                choices.append(
                    Choice(
                        name,
                        None,
                        f"rank {rank} >= {breakeven_rank(lin.out_features, lin.in_features):.0f} saves nothing",
                    )
                )
            else:
                choices.append(Choice(name, rank, ""))
        return choices

    # Global budget: units are "factorize at the largest useful rank" and then each further chunk of r.
    units: list[tuple[float, str, int, int]] = []  # (loss per parameter freed, layer, step, params freed)
    for name, lin in layers.items():
        top = max_useful_rank(lin, r)
        if top < r:
            continue
        energy = factors[name].energy()
        kept = lambda rank, energy=energy: float(energy[rank - 1]) if rank > 0 else 0.0  # noqa: E731
        freed = _layer_params(lin, None) - _layer_params(lin, top)
        running = (1.0 - kept(top)) / freed
        units.append((running, name, 0, freed))
        for step, rank in enumerate(range(top - r, 0, -r), start=1):
            loss = kept(rank + r) - kept(rank)
            running = max(running, loss / (r * (lin.in_features + lin.out_features)))
            units.append((running, name, step, r * (lin.in_features + lin.out_features)))
    total = float(sum(_layer_params(lin, None) for lin in layers.values()))
    steps = {name: -1 for name in layers}  # -1: dense
    for _, name, step, freed in sorted(units, key=lambda u: (u[0], u[1], u[2])):
        if total <= budget_weights:
            break
        if step != steps[name] + 1:
            continue
        steps[name] = step
        total -= freed
    for name, lin in layers.items():
        if steps[name] < 0:
            choices.append(Choice(name, None, "left dense by the budget"))
        else:
            choices.append(Choice(name, max_useful_rank(lin, r) - steps[name] * r, ""))
    return choices
