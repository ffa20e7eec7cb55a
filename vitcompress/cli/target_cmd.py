"""`vitcompress target`: measure a target's latency table once, and predict models' latency from it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vitcompress.cli.common import (
    JsonOpt,
    ModelArg,
    ModelFlags,
    err_console,
    out_console,
    print_json,
)
from vitcompress.cli.options import GENERATED, model_options

if TYPE_CHECKING:
    from vitcompress.latency.profile import Progress
    from vitcompress.latency.table import LatencyTable, TargetSpec
    from vitcompress.models import ModelRef

app = typer.Typer(
    help="Latency tables of a deployment target: measure once (profile), then predict any pruned shape.",
    no_args_is_help=True,
)


class RuntimeChoice(str, Enum):
    ort = "ort"
    openvino = "openvino"


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    int8 = "int8"


RuntimeOpt = Annotated[RuntimeChoice, typer.Option(help="Runtime the model will run on.")]
PrecisionOpt = Annotated[
    PrecisionChoice,
    typer.Option(help="fp32; int8 (ORT: static QDQ, OpenVINO: NNCF); bf16 (OpenVINO's hint only)."),
]
ThreadsOpt = Annotated[int, typer.Option(min=1, help="Threads the runtime uses (recorded in the key).")]
BatchOpt = Annotated[int, typer.Option("--batch", min=1, help="Batch size the latency is for.")]


def target_spec(runtime: RuntimeChoice, precision: PrecisionChoice, threads: int, batch: int) -> TargetSpec:
    from vitcompress.latency.table import TargetSpec

    return TargetSpec(runtime.value, precision.value, threads, batch)


@contextlib.contextmanager
def profile_progress(label: str) -> Iterator[Progress]:
    """A rich progress bar for profile_target's callback, on stderr (stdout belongs to --json)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"profiling {label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=1)

        def update(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        yield update


def table_summary(table: LatencyTable) -> dict[str, object]:
    return {
        "path": str(table.key.path()),
        "target": table.key.target,
        "family": {k: v for k, v in table.key.family.items() if k != "source"},
        "grid": {"heads": table.heads, "head_dims": table.head_dims, "mlp": table.mlp},
        "fixed_ms": table.fixed_ms,
        "calibration": [list(point) for point in table.calibration],
        "anchors": table.anchors,
        "fast_multiple": table.fast_multiple,
        "lowrank": {
            "ranks": table.lowrank_ranks,
            "overhead_ms": [table.factorization_ms(r) for r in table.lowrank_ranks],
        },
        "profile_s": table.profile_s,
    }


@app.command("profile")
@model_options
def profile(
    model: ModelArg,
    runtime: RuntimeOpt = RuntimeChoice.ort,
    precision: PrecisionOpt = PrecisionChoice.fp32,
    threads: ThreadsOpt = 2,
    batch: BatchOpt = 1,
    runs: Annotated[int, typer.Option(min=10, help="Timed runs per probe graph (medians are kept).")] = 100,
    force: Annotated[bool, typer.Option("--force", help="Measure again even if a table is cached.")] = False,
    model_flags: ModelFlags = GENERATED,
    json_out: JsonOpt = False,
) -> None:
    """Measure the latency table of MODEL's family on this machine, and cache it.

    Times small exported graphs on the target runtime, interleaved: the model with no block (patch
    embedding, norm, head), one block over a grid of (heads, head size) and of MLP widths at the
    model's token count, a few MLP widths around a multiple of 64 (which widths the kernels favour),
    and four whole models that calibrate the sum of parts. Takes about 100 s for DeiT-S on ORT fp32
    on 2 cores (more for int8: every probe is quantized). The table is keyed by model family, CPU,
    runtime and version, precision, threads and batch, and stored under $VITCOMPRESS_CACHE (default
    ~/.cache/vitcompress)/latency; `prune --target-latency-ms` and `tune` read it.

    Examples:
      vitcompress target profile timm:deit_small_patch16_224
      vitcompress target profile timm:deit_small_patch16_224 --precision int8 --threads 2
      vitcompress target profile timm:deit_small_patch16_224 --runtime openvino --precision int8
    """
    from vitcompress.latency.profile import profile_target, table_key
    from vitcompress.latency.table import find_table
    from vitcompress.models import load_model

    spec = target_spec(runtime, precision, threads, batch)  # bad settings fail before the model loads
    loaded = load_model(model_flags.ref(model))
    cached = None if force else find_table(table_key(loaded, spec))
    if cached is not None:
        table, measured = cached, False
    else:
        with profile_progress(f"{model} on {spec.label()}") as update:
            table = profile_target(loaded, spec, runs=runs, on_progress=update)
        table.save()
        measured = True
    summary = {**table_summary(table), "measured_now": measured}
    if json_out:
        print_json(summary)
        return
    verb = (
        f"measured in {table.profile_s:.0f} s"
        if measured
        else f"cached (measured in {table.profile_s:.0f} s; --force to redo)"
    )
    out_console.print(f"latency table of {model} on {spec.label()}: {verb}")
    out_console.print(f"  {table.key.path()}")
    out_console.print(
        f"  grid: heads {table.heads}, head sizes {table.head_dims}, MLP {table.mlp}; fixed parts "
        f"{table.fixed_ms:.3f} ms; widths run best in multiples of {table.fast_multiple}"
    )
    if table.lowrank_ranks:
        overheads = ", ".join(f"{table.factorization_ms(r):+.3f}" for r in table.lowrank_ranks)
        out_console.print(
            f"  factorized MLP (fc1, fc2 at ranks {table.lowrank_ranks}): the plain MLP of equal MACs "
            f"{overheads} ms per factorized layer"
        )
    for anchor in table.anchors:
        error = (anchor["raw_ms"] - anchor["measured_ms"]) / anchor["measured_ms"]
        out_console.print(
            f"  whole model {anchor['name']} (every block {tuple(anchor['shape'])}): measured "
            f"{anchor['measured_ms']:.3f} ms, sum of parts {anchor['raw_ms']:.3f} ms ({error:+.1%} before calibration)"
        )


def machine_drift(table: LatencyTable, rows: list[dict[str, Any]]) -> float | None:
    """The original's measured p50 now over its p50 when the table was profiled, if it was measured."""
    full = [list(b) for b in table.full_blocks()]
    whole = next((a for a in table.anchors if a["name"] == "whole"), None)
    original = next((r for r in rows if r.get("blocks") == full), None)
    if whole is None or original is None:
        return None
    return float(original["measured_ms"]) / float(whole["measured_ms"])


@app.command("predict")
@model_options
def predict(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Models of one family: the original (timm:NAME ...) and/or pruned artifact directories."
        ),
    ],
    runtime: RuntimeOpt = RuntimeChoice.ort,
    precision: PrecisionOpt = PrecisionChoice.fp32,
    threads: ThreadsOpt = 2,
    batch: BatchOpt = 1,
    measure: Annotated[
        bool, typer.Option("--measure", help="Also export, time them interleaved and report the error.")
    ] = False,
    runs: Annotated[int, typer.Option(min=10, help="Timed runs per model with --measure.")] = 50,
    table_path: Annotated[
        Path | None,
        typer.Option("--table", exists=True, dir_okay=False, help="A table file instead of the cache."),
    ] = None,
    model_flags: ModelFlags = GENERATED,
    json_out: JsonOpt = False,
) -> None:
    """Predict the p50 of each model from the target's latency table (sum of its parts).

    The table must exist (`vitcompress target profile`) for this family on this CPU, runtime version,
    precision, threads and batch; one measured elsewhere is refused with the field that differs. With
    --measure the models are exported, timed interleaved, and the prediction error is reported.

    Examples:
      vitcompress target predict runs/pruned/prune --measure
      vitcompress target predict timm:deit_small_patch16_224 runs/a/prune runs/b/prune --precision int8
    """
    from vitcompress.latency.predict import check_models, predict_model
    from vitcompress.latency.profile import get_table
    from vitcompress.models import load_model

    spec = target_spec(runtime, precision, threads, batch)

    def ref(source: str) -> ModelRef:
        if Path(source).is_dir():  # an artifact knows its architecture: the model options are for the others
            return ModelFlags(trust_checkpoint=model_flags.trust_checkpoint).ref(source)
        return model_flags.ref(source)

    loaded = [load_model(ref(m)) for m in models]
    table = get_table(loaded[0], spec, profile_if_missing=False, path=table_path)
    if measure:
        with err_console.status(f"measuring {len(loaded)} model(s) on {spec.label()}"):
            checks = check_models(table, loaded, spec, runs=runs)
        rows = [c.to_dict() for c in checks]
    else:
        rows = [{"label": m.label, "predicted_ms": predict_model(table, m)} for m in loaded]
    drift = machine_drift(table, rows) if measure else None
    if json_out:
        print_json({"target": table.key.target, "models": rows, "machine_drift": drift})
        return
    from rich.table import Table

    out = Table(title=f"p50 on {spec.label()} ({table.key.target['cpu']})")
    out.add_column("model")
    out.add_column("predicted ms", justify="right")
    if measure:
        out.add_column("measured ms", justify="right")
        out.add_column("error", justify="right")
    for row in rows:
        cells = [str(row["label"]), f"{row['predicted_ms']:.3f}"]
        if measure:
            cells += [f"{row['measured_ms']:.3f}", f"{row['error']:+.1%}"]
        out.add_row(*cells)
    out_console.print(out)
    if drift is not None:
        out_console.print(
            f"The original runs {drift:.2f}x as long now as when the table was profiled (shared or "
            "throttled machine): errors of that size are the machine's, not the model's."
        )
