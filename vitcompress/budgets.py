"""Budgets: the recipe's `budgets:` section and the one place that judges measured values against
the limits a user set, after a run (`check_budgets`) and for `bench --max-p50-ms/--min-speedup`
(`timing.check_gate`, through `latency_failures`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from vitcompress.state import PassRecord


class Budgets(BaseModel):
    """Gates on the final model; a failed gate exits with code 3 after the reports are written."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_p50_ms: float | None = Field(None, gt=0, description="Median latency at the first batch size.")
    min_speedup: float | None = Field(None, gt=0, description="Speed-up over the fp32 baseline, same run.")
    max_size_mb: float | None = Field(
        None, gt=0, description="Size of the final ONNX file in MB (1e6 bytes)."
    )
    max_top1_drop: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Top-1 drop against the fp32 baseline on data.eval, in points (needs validate).",
    )


def latency_failures(
    p50_ms: float | None,
    speedup: float | None,
    max_p50_ms: float | None,
    min_speedup: float | None,
    on: str = "",
) -> list[str]:
    """The latency budgets a measurement fails, one phrase each; `on` says where it was measured."""
    failures = []
    if max_p50_ms is not None and p50_ms is not None and p50_ms > max_p50_ms:
        failures.append(f"p50 {p50_ms:.2f} ms{on} > max_p50_ms {max_p50_ms:g}")
    if min_speedup is not None and speedup is not None and speedup < min_speedup:
        failures.append(f"speed-up {speedup:.2f}x{on} < min_speedup {min_speedup:g}x")
    return failures


def check_budgets(budgets: Budgets, records: Sequence[PassRecord], onnx_path: Path | None) -> tuple[str, ...]:
    """Every budget of a recipe the ledger `records` fail, one sentence each (empty: all met)."""
    failures: list[str] = []
    measured = next((r for r in reversed(records) if r.latency_p50_ms is not None), None)
    if (budgets.max_p50_ms or budgets.min_speedup) and measured is None:
        failures.append("latency budgets are set but no pass measured latency: add a validate pass")
    if measured is not None:
        runner = measured.details.get("runner")  # the runtime the budget was checked on
        on = f" on {runner['runtime']} {runner['version']} ({runner['precision']})" if runner else ""
        failures += latency_failures(
            measured.latency_p50_ms,
            measured.details.get("speedup_vs_baseline"),
            budgets.max_p50_ms,
            budgets.min_speedup,
            on=on,
        )
    failures += [str(r.details["gate_failure"]) for r in records if "gate_failure" in r.details]
    if budgets.max_top1_drop is not None:
        accuracy = next((r for r in reversed(records) if "top1_drop_points" in r.details), None)
        if accuracy is None:
            failures.append(
                "max_top1_drop is set but no pass measured accuracy: add data.eval and a validate pass"
            )
        elif not accuracy.details.get("sanity", {}).get("ok", True):
            # a drop measured against a broken reference proves nothing, however small it is
            sanity = accuracy.details["sanity"]
            failures.append(
                f"max_top1_drop cannot be judged: the {sanity['model']} it is measured against fails the "
                f"sanity check ({'; '.join(sanity['problems'])}), so the measured drop of "
                f"{accuracy.details['top1_drop_points']:.2f} points means nothing: the model is untrained "
                "(a checkpoint missing?) or the data is not preprocessed as it was trained (data mean, "
                "std, input_range)"
            )
        elif accuracy.details["top1_drop_points"] > budgets.max_top1_drop:
            failures.append(
                f"top-1 drop {accuracy.details['top1_drop_points']:.2f} points > max_top1_drop {budgets.max_top1_drop:g}"
            )
    if budgets.max_size_mb is not None and onnx_path is not None:
        from vitcompress.runtime import onnx_size

        size_mb = onnx_size(onnx_path) / 1e6
        if size_mb > budgets.max_size_mb:
            failures.append(f"ONNX size {size_mb:.2f} MB > max_size_mb {budgets.max_size_mb:g}")
    return tuple(failures)
