"""report.json for machines and report.md for people, written atomically next to the artifacts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress._version import __version__
from vitcompress.fileio import write_json, write_text
from vitcompress.state import PassRecord

if TYPE_CHECKING:
    from vitcompress.recipe import Recipe
    from vitcompress.state import RunResult


def fmt_count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def fmt_bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f} MB"


def ledger_rows(records: tuple[PassRecord, ...] | list[PassRecord]) -> list[list[str]]:
    rows = []
    for r in records:
        parity = "-" if r.parity is None else f"{r.parity.max_abs_diff:.1e} / {r.parity.top1_agreement:.0%}"
        speedup = r.details.get("speedup_vs_baseline")
        latency = (
            "-"
            if r.latency_p50_ms is None
            else f"{r.latency_p50_ms:.2f} ms" + (f" ({speedup:.2f}x)" if speedup else "")
        )
        rows.append(
            [
                r.name,
                fmt_count(r.params),
                fmt_count(r.macs),
                fmt_bytes(r.size_bytes),
                parity,
                latency,
                _top1(r),
                f"{r.wall_s:.1f} s",
            ]
        )
    return rows


LEDGER_COLUMNS = [
    "pass",
    "params",
    "MACs",
    "size",
    "max |Δlogit| / top-1 agree",
    "p50 latency",
    "top-1",
    "wall",
]


def md_cell(text: str) -> str:
    """One Markdown table cell: a `|` in the text would end the cell, a newline the row."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def md_row(cells: list[str]) -> str:
    """One Markdown table row, every cell escaped (the ledger header holds `max |Δlogit|`)."""
    return "| " + " | ".join(md_cell(cell) for cell in cells) + " |"


def _top1(r: PassRecord) -> str:
    if r.top1 is None:
        return "-"
    drop = r.details.get("top1_drop_points")
    return f"{r.top1:.2%}" + (f" ({-drop:+.2f})" if isinstance(drop, float) else "")


def _environment(result: RunResult) -> dict[str, Any] | None:
    for record in reversed(result.ledger):
        bench = record.details.get("bench")
        if bench:
            return {
                "environment": bench["environment"],
                "settings": bench["settings"],
                "noisy": bool(bench.get("noisy")),
                "noise_reasons": list(bench.get("noise_reasons") or []),
            }
    return None


def _plot_points(result: RunResult) -> list[Any]:
    """The fp32 baseline and the final model, both measured by the last validate pass (same run)."""
    from vitcompress.passes import measuring_kinds
    from vitcompress.plot import ParetoPoint

    measuring = measuring_kinds()
    record = next((r for r in reversed(result.ledger) if r.kind in measuring), None)
    if record is None or record.top1 is None or "baseline_top1" not in record.details:
        return []
    bench = record.details["bench"]
    batch = bench["settings"]["batch_sizes"][0]
    base = next(
        r for r in bench["results"] if r["model"] == record.details["baseline"] and r["batch_size"] == batch
    )
    return [
        ParetoPoint("fp32 baseline", base["p50_ms"], record.details["baseline_top1"], baseline=True),
        ParetoPoint(Path(record.artifact or "final").name, record.latency_p50_ms or 0.0, record.top1),
    ]


def write_reports(recipe: Recipe, result: RunResult) -> None:
    out = result.out_dir
    env = _environment(result)
    data = {
        "vitcompress_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.resolved(),
        "ledger": [r.to_dict() for r in result.ledger],
        "final_onnx": str(result.state.onnx_path) if result.state.onnx_path else None,
        "budgets": {"failures": list(result.budget_failures), "passed": not result.budget_failures},
        "measurement": env,
    }
    write_json(out / "report.json", data)

    lines = [f"# vitcompress report: {recipe.name or result.ledger[0].details.get('source', '')}", ""]
    lines += [md_row(LEDGER_COLUMNS), "|" + "---|" * len(LEDGER_COLUMNS)]
    lines += [md_row(row) for row in ledger_rows(result.ledger)]
    lines.append("")
    if any(r.top1 is not None or "agreement" in r.details for r in result.ledger):
        from vitcompress.accuracy import EVAL_BATCH_SIZE

        lines += [
            f"Accuracy: top-1 on data.eval, every pass scored the same way (ONNX Runtime or PyTorch, "
            f"batches of {EVAL_BATCH_SIZE} images).",
            "",
        ]
    if env:
        e, s = env["environment"], env["settings"]
        isa = " ".join(k for k, v in e["isa"].items() if v) or "none detected"
        lines += [
            f"Measured with ONNX Runtime {e['versions']['onnxruntime']} ({s['provider']}), {s['threads']} threads, "
            f"batch {s['batch_sizes']}, {s['warmup']} warm-up + {s['runs']} runs per model, interleaved.",
            f"CPU: {e['cpu_model']} ({e['cpu_count']} cores; ISA: {isa}).",
            "",
        ]
    floor = next(
        (r.details["compute_floor"] for r in reversed(result.ledger) if "compute_floor" in r.details), None
    )
    if floor:
        from vitcompress.timing import ComputeFloor

        known = set(ComputeFloor.__dataclass_fields__)
        described = ComputeFloor(**{k: v for k, v in floor.items() if k in known}).describe()
        lines += [
            f"Compute floor: the final model's {described}. The floor is the time with every MAC at "
            "that peak; the rest is memory traffic, non-GEMM ops (LayerNorm, Softmax, GELU, "
            "quantize/dequantize) and per-op overhead.",
            "",
        ]
    integer = next((r.details["integer_only"] for r in result.ledger if "integer_only" in r.details), None)
    if integer:
        verdict_int = "yes" if integer["integer_only"] else "NO: " + "; ".join(integer["violations"][:3])
        ops = ", ".join(f"{op} ({n})" for op, n in integer["ops"].items())
        types = ", ".join(f"{t} ({n})" for t, n in integer["tensor_types"].items())
        lines += [
            f"integer-only: {verdict_int}. Ops a target must support: {ops}. Tensor types inside: {types}.",
            "",
        ]
    noise = [*((env or {}).get("noise_reasons") or []), *((floor or {}).get("noise_reasons") or [])]
    if noise:
        lines += [
            f"**Warning, noisy measurement:** {'; '.join(noise)}. The numbers above may be off; rerun on a "
            "quiet machine before trusting them.",
            "",
        ]
    verdict = (
        "all budgets met" if not result.budget_failures else "FAILED: " + "; ".join(result.budget_failures)
    )
    lines += [f"Budgets: {verdict}.", ""]
    points = _plot_points(result)
    if points:
        from vitcompress.plot import plot_pareto

        plot_pareto(points, out / "pareto.png", f"{recipe.name or 'compress'}: accuracy vs latency, one run")
        lines += ["![accuracy vs latency: fp32 baseline and the final model](pareto.png)", ""]
    lines += ["Resolved recipe: `recipe.resolved.yaml`.", ""]
    write_text(out / "report.md", "\n".join(lines))
