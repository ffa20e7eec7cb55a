from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vitcompress.choices import Precision, Provider, Runtime
from vitcompress.cli.common import JsonOpt, err_console, out_console, print_json


def bench(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="Model files of any runtime: .onnx/.ort (ONNX Runtime), .xml (OpenVINO IR), .engine "
            "(TensorRT). The first is the baseline for the ratios.",
            show_default=False,
        ),
    ],
    runtime: Annotated[
        list[Runtime] | None,
        typer.Option(
            "--runtime",
            "-r",
            help="Run each file on this runtime; repeat to time one file on several (an .onnx file "
            "on ort and openvino). Default: the runtime of each file's suffix.",
        ),
    ] = None,
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="OpenVINO's inference precision hint: fp32 or bf16 (bf16 needs AVX512_BF16 or AMX). "
            "Default: OpenVINO's own choice, which is bf16 on CPUs that have it. ORT and TensorRT run "
            "each file in its own precision. Every result records the precision it ran in.",
        ),
    ] = None,
    provider: Annotated[Provider, typer.Option(help="ONNX Runtime execution provider.")] = Provider.cpu,
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads (default: all cores).")] = None,
    batch_size: Annotated[
        list[int] | None,
        typer.Option(
            "--batch-size", "-b", min=1, help="Batch size; repeat for several. Gates apply to the first."
        ),
    ] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs per model first.")] = 10,
    runs: Annotated[int, typer.Option(min=5, help="Timed runs per model and batch size.")] = 100,
    block: Annotated[
        int,
        typer.Option(
            min=1,
            help="Timed runs in a row per model before the next takes its turn (caches warm, as in "
            "deployment); 1 is strict round-robin.",
        ),
    ] = 10,
    max_p50_ms: Annotated[
        float | None,
        typer.Option(min=0, help="Gate: fail (exit 3) if the last model's median latency is above this."),
    ] = None,
    min_speedup: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Gate: fail (exit 3) if the last model is less than this many times faster than the first.",
        ),
    ] = None,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile",
            help="Also show where the time goes: ONNX Runtime's profiler, time per kernel type "
            "(after ORT's fusions) at the first batch size, for each model.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Measure latency on this machine, several models and runtimes interleaved in one run.

    Files of different runtimes are timed in the same run (ONNX Runtime, OpenVINO, TensorRT), and
    --runtime runs one file on several. Reports p50/p90/p99 and throughput per model, runtime and
    batch size, ratios against the first (the baseline), and records the runtime, its version, the
    precision it ran in, the threads, the CPU model, ISA flags (AVX-512 VNNI, AMX) and versions.
    A measurement that looks disturbed (p99 over 2x p50) is flagged: a warning on stderr, and
    `noisy: true` with its reasons in --json; a gate that fails on it says so.

    Examples:
      vitcompress bench baseline.onnx compressed.onnx --threads 2 -b 1 -b 8
      vitcompress bench compressed.onnx --max-p50-ms 25        # CI gate: exit code 3 when slower
      vitcompress bench model.int8.onnx --profile               # time per op type
      vitcompress bench model.onnx model.xml model.int8.xml     # ORT vs OpenVINO files, one run
      vitcompress bench model.onnx -r ort -r openvino --precision fp32   # one file, two runtimes
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vitcompress.timing import bench_entries, bench_models, check_gate

    batch_sizes = batch_size or [1]
    threads = threads or os.cpu_count() or 1
    entries = bench_entries(models, runtime)
    total = len(batch_sizes) * len(entries) * (warmup + runs)
    with Progress(
        TextColumn("bench"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("bench", total=total)
        report = bench_models(
            models,
            provider,
            threads,
            batch_sizes,
            warmup,
            runs,
            on_step=lambda n: progress.advance(task, n),
            block=block,
            runtimes=runtime,
            precision=precision,
        )
    last_path, last_runtime = entries[-1]
    gated = report.find(str(last_path), batch_sizes[0], last_runtime.value)
    profiles = {}
    if profile:
        from vitcompress.timing import profile_ops

        with err_console.status("profiling"):
            profiles = {
                str(m): profile_ops(m, provider, threads, batch_sizes[0], runs=min(runs, 50)) for m in models
            }
    if json_out:
        print_json(
            {
                **report.to_dict(),
                "gate": {
                    "model": gated.model,
                    "runtime": gated.runtime,
                    "max_p50_ms": max_p50_ms,
                    "min_speedup": min_speedup,
                },
                **({"profile": profiles} if profile else {}),
            }
        )
    else:
        env = report.environment
        table = Table(title=f"{threads} threads, {runs} runs; {env.cpu_model}; ISA: {env.isa_summary()}")
        for column in (
            "model",
            "runtime",
            "precision",
            "batch",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "images/s",
            "vs first",
        ):
            table.add_column(
                column, justify="left" if column in ("model", "runtime", "precision") else "right"
            )
        for r in report.results:
            table.add_row(
                Path(r.model).name,
                f"{r.runtime} {r.runtime_version}" + (f" {provider.value}" if r.runtime == "ort" else ""),
                r.precision,
                str(r.batch_size),
                f"{r.p50_ms:.2f}",
                f"{r.p90_ms:.2f}",
                f"{r.p99_ms:.2f}",
                f"{r.throughput_ips:.1f}",
                f"{r.speedup_vs_first:.2f}x",
            )
        out_console.print(table)
        for model, ops in profiles.items():
            breakdown = Table(title=f"{Path(model).name}: time per kernel type, batch {batch_sizes[0]}")
            for column in ("op type", "nodes", "ms per run", "share"):
                breakdown.add_column(column, justify="left" if column == "op type" else "right")
            for op in ops:
                breakdown.add_row(op.op_type, str(op.nodes), f"{op.ms_per_run:.3f}", f"{op.share:.1%}")
            out_console.print(breakdown)
    check_gate(gated, max_p50_ms, min_speedup, report.noise_reasons)
