"""Export benchmark: PyTorch eager vs ONNX Runtime fp32 from both exporters, and export wall time, one run.

    python scripts/bench_export.py --model deit_small_patch16_224 --threads 2 --runs 100

Random-init timm model at its default resolution, batch 1. All three are timed interleaved in one
loop (vitcompress.timing.time_interleaved) so machine noise falls on each alike. Prints a Markdown
table for BENCHMARKS.md and, with --json FILE, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vitcompress.models import ModelRef, load_model
from vitcompress.passes.export import ExportConfig, Exporter, export_model
from vitcompress.runtime import OnnxRunner
from vitcompress.timing import Environment, time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--kwargs", default="{}", help="timm constructor kwargs as JSON (for --smoke runs)")
    parser.add_argument("--json", type=Path, help="write raw results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    loaded = load_model(ModelRef(f"timm:{args.model}", kwargs=json.loads(args.kwargs)))
    image = loaded.example_input(1, seed=0)
    rows: dict[str, dict[str, float | str]] = {}
    calls = {"PyTorch eager fp32": lambda: loaded.model(image)}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for exporter, opset in ((Exporter.torchscript, 17), (Exporter.dynamo, 18)):
            result = export_model(
                loaded, Path(tmp) / f"{exporter.value}.onnx", ExportConfig(exporter=exporter, opset=opset)
            )
            runner = OnnxRunner(result.path, threads=args.threads)
            feed = {runner.input_name: image.numpy()}
            label = f"ORT fp32, {exporter.value} export (opset {opset})"
            calls[label] = lambda r=runner, f=feed: r.session.run(None, f)
            rows[label] = {
                "export_s": round(result.wall_s, 2),
                "max_abs_diff": result.parity.max_abs_diff,
                "nodes": sum(result.op_counts.values()),
            }
        start = time.perf_counter()
        times = time_interleaved(list(calls.values()), args.warmup, args.runs)
        wall = time.perf_counter() - start
    env = Environment.detect()
    baseline = float(np.percentile(times[0], 50))
    print(
        f"{args.model}, batch 1, {args.threads} threads, {args.runs} runs interleaved ({wall:.0f} s); "
        f"{env.cpu_model}; ISA: {env.isa_summary()}; torch {torch.__version__}, "
        f"onnxruntime {env.versions['onnxruntime']}\n"
    )
    print("| runtime | p50 ms | p90 ms | vs eager | export wall | nodes | max abs dlogit |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for (label, _), samples in zip(calls.items(), times, strict=True):
        p50, p90 = float(np.percentile(samples, 50)), float(np.percentile(samples, 90))
        extra = rows.get(label, {})
        results.append({"runtime": label, "p50_ms": p50, "p90_ms": p90, **extra})
        print(
            f"| {label} | {p50:.1f} | {p90:.1f} | {baseline / p50:.2f}x | "
            f"{extra.get('export_s', '-')} s | {extra.get('nodes', '-')} | {extra.get('max_abs_diff', '-')} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env.__dict__,
                    "args": vars(args) | {"json": str(args.json)},
                    "results": results,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
