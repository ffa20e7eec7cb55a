"""Pruning benchmark: how latency follows MACs, and which importance criterion keeps accuracy.

    python scripts/bench_prune.py --threads 2 --runs 100                      # both tracks
    python scripts/bench_prune.py --track speed --model deit_small_patch16_224
    python scripts/bench_prune.py --track accuracy                            # needs the reference model

Speed track: random-init timm model (default deit_small_patch16_224 at 224), pruned with magnitude
importance to 50% and 25% of its MACs (heads, head size and MLP width, round_to 8), each exported to
ONNX; ONNX Runtime fp32 at batch 1, all models interleaved in one run (vitcompress.timing).
Accuracy track: the Fashion-MNIST reference ViT (scripts/train_reference.py; cached) pruned to 50%
MACs with l2, taylor and hessian importance (512 stratified training images for the data-driven
ones), top-1 on the 10k test images right after pruning, before any fine-tuning.
Prints Markdown tables for BENCHMARKS.md; --json FILE writes the raw numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import benchlib

from vitcompress.data import DataSpec, load_dataset
from vitcompress.models import load_model
from vitcompress.models.stats import count_macs
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.passes.prune import PruneConfig, prune_model

STRUCTURES = ["heads", "head_dim", "mlp"]


def speed_track(args: argparse.Namespace, workdir: Path) -> list[dict]:
    ref = benchlib.speed_model(args)
    rows, paths = [], []
    for target in (None, 0.5, 0.25):
        torch.manual_seed(0)
        loaded = load_model(ref)
        macs0, _ = count_macs(loaded)
        start = time.perf_counter()
        if target is not None:
            prune_model(loaded, PruneConfig(target_macs=target, structures=STRUCTURES))
        prune_s = time.perf_counter() - start
        macs, _ = count_macs(loaded)
        path = workdir / f"speed_{target or 1.0}.onnx"
        export_model(loaded, path, ExportConfig())
        paths.append(path)
        rows.append(
            {
                "model": args.model if target is None else f"{args.model} pruned to {target:.0%} MACs",
                "macs": macs,
                "macs_ratio": macs / macs0,
                "params": sum(p.numel() for p in loaded.model.parameters()),
                "onnx_mb": path.stat().st_size / 1e6,
                "prune_s": prune_s,
                "blocks": loaded.adapter.structure(),
            }
        )
    for row, timing in zip(rows, benchlib.time_variants(paths, args), strict=True):
        row.update(timing)
    return rows


def accuracy_track(args: argparse.Namespace) -> list[dict]:
    ref, source = benchlib.reference(args)
    base = load_model(ref)
    test = load_dataset(
        DataSpec(source=source, split="test", limit=args.eval_limit), base.input, base.num_classes
    )
    calibration = load_dataset(
        DataSpec(source=source, split="train", limit=args.calibration), base.input, base.num_classes
    )
    macs0, _ = count_macs(base)
    rows = [
        {
            "importance": "none (original)",
            "top1": benchlib.top1(base, test),
            "macs_ratio": 1.0,
            "prune_s": 0.0,
        }
    ]
    for importance in ("l2", "taylor", "hessian"):
        torch.manual_seed(0)
        loaded = load_model(ref)
        cfg = PruneConfig(
            target_macs=args.accuracy_target,
            structures=STRUCTURES,
            importance=importance,
            steps=args.steps,
            round_to=args.round_to,
            batch_size=64,
            calibration_batches=max(1, args.calibration // 64),
        )
        start = time.perf_counter()
        prune_model(loaded, cfg, calibration, seed=0)
        macs, _ = count_macs(loaded)
        rows.append(
            {
                "importance": importance,
                "top1": benchlib.top1(loaded, test),
                "macs_ratio": macs / macs0,
                "prune_s": time.perf_counter() - start,
                "blocks": loaded.adapter.structure(),
            }
        )
    return rows


def main() -> int:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--track", choices=["speed", "accuracy", "both"], default="both")
    parser.add_argument(
        "--accuracy-target", type=float, default=0.5, help="MACs to keep in the accuracy track"
    )
    parser.add_argument("--steps", type=int, default=1, help="iterative pruning steps in the accuracy track")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--calibration", type=int, default=512, help="training images for taylor/hessian")
    args = parser.parse_args()
    results = benchlib.start(args)
    if args.track in ("speed", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            results["speed"] = speed_track(args, Path(tmp))
        benchlib.table(
            f"Latency vs MACs ({args.model}, ORT fp32, batch 1, {args.threads} threads, interleaved)",
            [
                ("model", lambda r: r["model"]),
                ("MACs", lambda r: f"{r['macs'] / 1e9:.2f} G"),
                ("MACs ratio", lambda r: f"{r['macs_ratio']:.3f}"),
                ("params", lambda r: f"{r['params'] / 1e6:.2f} M"),
                ("ONNX MB", lambda r: f"{r['onnx_mb']:.1f}"),
                ("p50 ms", lambda r: f"{r['p50_ms']:.2f}"),
                ("p90 ms", lambda r: f"{r['p90_ms']:.2f}"),
                ("latency ratio", lambda r: f"{r['latency_ratio']:.3f}"),
            ],
            results["speed"],
        )
    if args.track in ("accuracy", "both"):
        results["accuracy"] = accuracy_track(args)
        benchlib.table(
            f"Top-1 right after pruning to {args.accuracy_target:.0%} MACs (no fine-tuning)",
            [
                ("importance", lambda r: r["importance"]),
                ("top-1", lambda r: f"{r['top1']:.2%}"),
                ("MACs ratio", lambda r: f"{r['macs_ratio']:.3f}"),
                ("prune wall s", lambda r: f"{r['prune_s']:.1f}"),
            ],
            results["accuracy"],
        )
    return benchlib.finish(args, results)


if __name__ == "__main__":
    sys.exit(main())
