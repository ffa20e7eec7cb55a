"""What the benchmark scripts share: common flags, the reference model, timing variants, output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vitcompress.accuracy import evaluate_torch
from vitcompress.models import ModelRef
from vitcompress.timing import Environment, bench_models


def parser(doc: str | None, speed: bool = True) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark takes (and, with `speed`, the timing ones)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    if speed:
        p.add_argument("--model", default="deit_small_patch16_224", help="timm model for the speed track")
        p.add_argument("--kwargs", default="{}", help="timm constructor kwargs as JSON (smoke runs)")
        p.add_argument("--warmup", type=int, default=10)
        p.add_argument("--runs", type=int, default=100)
    p.add_argument("--reference", type=Path, default=None, help="reference model directory (default: cache)")
    p.add_argument("--eval-limit", type=int, default=None, help="test images (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny random model on digits (for the test suite)")
    p.add_argument("--json", type=Path, help="write raw results here")
    return p


def start(args: argparse.Namespace) -> dict[str, Any]:
    """Fix the thread count; the results dict begins with the machine and the flags."""
    torch.set_num_threads(args.threads)
    return {"environment": Environment.detect().__dict__, "args": {k: str(v) for k, v in vars(args).items()}}


def finish(args: argparse.Namespace, results: dict[str, Any]) -> int:
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def speed_model(args: argparse.Namespace) -> ModelRef:
    return ModelRef(f"timm:{args.model}", kwargs=json.loads(args.kwargs))


def reference(args: argparse.Namespace, variant: str = "p7") -> tuple[ModelRef, str]:
    """The model of the accuracy tracks and its data set: the Fashion-MNIST reference (trained and
    cached by train_reference.py; `variant` p4 is the many-token one), or a tiny random model on
    digits with --smoke."""
    if args.smoke:
        return ModelRef(
            "timm:vit_tiny_patch16_224", None, 10, 32, None, False, {"depth": 2, "patch_size": 8}
        ), "digits"
    from train_reference import ensure_reference, model_ref

    checkpoint, info = ensure_reference(args.reference, variant)
    print(f"reference: {checkpoint} ({info['top1']:.2%} top-1 at training time)", file=sys.stderr)
    return model_ref(checkpoint, variant), "fashion-mnist"


def top1(loaded, data) -> float:  # type: ignore[no-untyped-def]
    return evaluate_torch(loaded, data, batch_size=500).top1


def time_variants(
    paths: Sequence[Path], args: argparse.Namespace, batch_sizes: Sequence[int] = (1,)
) -> list[dict[str, float]]:
    """p50/p90 of every file, all in one interleaved run; ratios against the first. Batch 1 gives
    `p50_ms`, `p90_ms`, `latency_ratio`; every other batch size B adds `p50_ms_bB` and `latency_ratio_bB`."""
    report = bench_models(
        list(paths), threads=args.threads, batch_sizes=list(batch_sizes), warmup=args.warmup, runs=args.runs
    )
    out: list[dict[str, float]] = [{} for _ in paths]
    for batch in batch_sizes:
        base = report.find(str(paths[0]), batch).p50_ms
        suffix = "" if batch == 1 else f"_b{batch}"
        for row, path in zip(out, paths, strict=True):
            latency = report.find(str(path), batch)
            row[f"p50_ms{suffix}"] = latency.p50_ms
            row[f"latency_ratio{suffix}"] = latency.p50_ms / base
            if batch == 1:
                row["p90_ms"] = latency.p90_ms
    return out


def table(
    title: str, columns: Sequence[tuple[str, Callable[[dict[str, Any]], str]]], rows: Sequence[dict]
) -> None:
    """Print a Markdown table for BENCHMARKS.md: (header, cell formatter) per column."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(h for h, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row) for _, cell in columns) + " |")
