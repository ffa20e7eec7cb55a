"""A model's latency as the sum of its parts, and how far that is from the measured whole.

The prediction reads the model's per-block widths (heads, head size, MLP width) and the ranks of
factorized MLP layers (the lowrank pass's `LowRankLinear`) and asks the table;
the table must be for the model's family (same source, input, embedding width and token count: a
pruned embedding or a token-reduction schedule is outside what it measured, and refused).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.latency.table import LatencyModelError, LatencyTable, MlpRanks, TargetSpec

if TYPE_CHECKING:
    from vitcompress.models.loader import LoadedModel


def block_shapes(loaded: LoadedModel) -> list[tuple[int, int, int]]:
    return [(b.attn.num_heads, b.attn.head_dim, b.mlp.hidden) for b in loaded.adapter.blocks()]


def mlp_ranks(loaded: LoadedModel) -> list[MlpRanks]:
    """Per block, the ranks of its factorized fc1 and fc2 (None: dense)."""
    from vitcompress.models.layers import LowRankLinear

    def rank(layer: object) -> int | None:
        return layer.rank if isinstance(layer, LowRankLinear) else None

    return [(rank(b.mlp.fc1), rank(b.mlp.fc2)) for b in loaded.adapter.blocks()]


def check_fits(table: LatencyTable, loaded: LoadedModel) -> None:
    family = table.key.family
    from vitcompress.models.tokens import token_schedule_of

    if token_schedule_of(loaded.model) is not None:
        raise LatencyModelError(
            f"{loaded.label} reduces its tokens: the latency table measured every block at {family['tokens']} tokens",
            hint="predict before the tokens pass",
        )
    from vitcompress.latency.profile import family_facts

    ours = {
        "source": family_facts(loaded)["source"],
        "embed": loaded.adapter.embed_dim,
        "tokens": loaded.adapter.num_tokens,
        "depth": len(loaded.adapter.blocks()),
    }
    for name, value in ours.items():
        if family.get(name) != value:
            raise LatencyModelError(
                f"the latency table is for another model: {name} {family.get(name)!r}, {loaded.label} has {value!r}",
                hint="profile this model: vitcompress target profile MODEL",
            )
    heads, head_dim, mlp = family["heads"], family["head_dim"], family["mlp"]
    for i, (h, d, m) in enumerate(block_shapes(loaded)):
        if h > heads or d > head_dim or m > mlp:
            raise LatencyModelError(
                f"block {i} ({h} heads x {d}, MLP {m}) is wider than the table's grid ({heads} x {head_dim}, MLP {mlp})",
                hint="profile the wider model",
            )


def predict_model(table: LatencyTable, loaded: LoadedModel) -> float:
    check_fits(table, loaded)
    return table.predict_ms(block_shapes(loaded), mlp_ranks(loaded))


@dataclass(frozen=True)
class Check:
    """Predicted against measured p50 for one model."""

    label: str
    blocks: list[tuple[int, int, int]]
    predicted_ms: float
    measured_ms: float

    @property
    def error(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "error": self.error,
            "blocks": [list(b) for b in self.blocks],
        }


def check_models(
    table: LatencyTable, models: list[LoadedModel], spec: TargetSpec, runs: int = 50
) -> list[Check]:
    """Export each model to the target, time them interleaved, and compare with the prediction."""
    from vitcompress.latency.profile import target_file, time_files

    predicted = [predict_model(table, m) for m in models]
    with tempfile.TemporaryDirectory(prefix="vitcompress-check-") as scratch:
        files = [target_file(m, spec, Path(scratch) / f"m{i}", f"m{i}") for i, m in enumerate(models)]
        measured = time_files(files, spec, runs)
    return [
        Check(m.label, block_shapes(m), p, ms) for m, p, ms in zip(models, predicted, measured, strict=True)
    ]
