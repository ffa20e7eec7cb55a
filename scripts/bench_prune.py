"""Pruning benchmark: how latency follows MACs, and which importance criterion keeps accuracy.

    python scripts/bench_prune.py --threads 2 --runs 100                      # both tracks
    python scripts/bench_prune.py --track speed --model deit_small_patch16_224
    python scripts/bench_prune.py --track accuracy                            # needs the reference model

Speed track: random-init timm model (default deit_small_patch16_224 at 224), pruned with magnitude
importance to 50% and 25% of its MACs (heads, head size and MLP width, round_to 8), each exported to
ONNX; ONNX Runtime fp32 at batch 1, all models interleaved in one run (vitcompress.bench).
Accuracy track: the Fashion-MNIST reference ViT (scripts/train_reference.py; cached) pruned to 50%
MACs with l2, taylor and hessian importance (512 stratified training images for the data-driven
ones), top-1 on the 10k test images right after pruning, before any fine-tuning.
Prints Markdown tables for BENCHMARKS.md; --json FILE writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from vitcompress.bench import Environment, bench_models
from vitcompress.data import DataSpec, load_dataset
from vitcompress.models import ModelRef, load_model
from vitcompress.models.stats import count_macs
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.passes.prune import PruneConfig, prune_model

STRUCTURES = ["heads", "head_dim", "mlp"]


def speed_track(args: argparse.Namespace, workdir: Path) -> list[dict]:
    ref = ModelRef(f"timm:{args.model}", kwargs=json.loads(args.kwargs))
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
    report = bench_models(paths, threads=args.threads, batch_sizes=[1], warmup=args.warmup, runs=args.runs)
    base = report.find(str(paths[0]), 1).p50_ms
    for row, path in zip(rows, paths, strict=True):
        latency = report.find(str(path), 1)
        row.update(p50_ms=latency.p50_ms, p90_ms=latency.p90_ms, latency_ratio=latency.p50_ms / base)
    return rows


def _reference(args: argparse.Namespace) -> tuple[ModelRef, str]:
    if args.smoke:
        return ModelRef(
            "timm:vit_tiny_patch16_224", None, 10, 32, None, False, {"depth": 2, "patch_size": 8}
        ), "digits"
    from train_reference import ensure_reference, model_ref

    checkpoint, info = ensure_reference(args.reference)
    print(f"reference: {checkpoint} ({info['top1']:.2%} top-1 at training time)", file=sys.stderr)
    return model_ref(checkpoint), "fashion-mnist"


def top1(loaded, data) -> float:  # type: ignore[no-untyped-def]
    correct = 0
    loaded.model.eval()
    with torch.no_grad():
        for x, y in data.batches(500):
            correct += int((loaded.model(x).argmax(1) == y).sum())
    return correct / len(data)


def accuracy_track(args: argparse.Namespace) -> list[dict]:
    ref, source = _reference(args)
    base = load_model(ref)
    test = load_dataset(
        DataSpec(source=source, split="test", limit=args.eval_limit), base.input, base.num_classes
    )
    calibration = load_dataset(
        DataSpec(source=source, split="train", limit=args.calibration), base.input, base.num_classes
    )
    macs0, _ = count_macs(base)
    rows = [{"importance": "none (original)", "top1": top1(base, test), "macs_ratio": 1.0, "prune_s": 0.0}]
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
                "top1": top1(loaded, test),
                "macs_ratio": macs / macs0,
                "prune_s": time.perf_counter() - start,
                "blocks": loaded.adapter.structure(),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--track", choices=["speed", "accuracy", "both"], default="both")
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model for the speed track")
    parser.add_argument("--kwargs", default="{}", help="timm constructor kwargs as JSON (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument(
        "--reference", type=Path, default=None, help="reference model directory (default: cache)"
    )
    parser.add_argument(
        "--accuracy-target", type=float, default=0.5, help="MACs to keep in the accuracy track"
    )
    parser.add_argument("--steps", type=int, default=1, help="iterative pruning steps in the accuracy track")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--calibration", type=int, default=512, help="training images for taylor/hessian")
    parser.add_argument("--eval-limit", type=int, default=None, help="test images (default: all)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny random model on digits (for the test suite)"
    )
    parser.add_argument("--json", type=Path, help="write raw results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict = {
        "environment": Environment.detect().__dict__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if args.track in ("speed", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            results["speed"] = speed_track(args, Path(tmp))
        print(
            f"\n### Latency vs MACs ({args.model}, ORT fp32, batch 1, {args.threads} threads, interleaved)\n"
        )
        print("| model | MACs | MACs ratio | params | ONNX MB | p50 ms | p90 ms | latency ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results["speed"]:
            print(
                f"| {r['model']} | {r['macs'] / 1e9:.2f} G | {r['macs_ratio']:.3f} | {r['params'] / 1e6:.2f} M | "
                f"{r['onnx_mb']:.1f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['latency_ratio']:.3f} |"
            )
    if args.track in ("accuracy", "both"):
        results["accuracy"] = accuracy_track(args)
        print(f"\n### Top-1 right after pruning to {args.accuracy_target:.0%} MACs (no fine-tuning)\n")
        print("| importance | top-1 | MACs ratio | prune wall s |")
        print("|---|---|---|---|")
        for r in results["accuracy"]:
            print(f"| {r['importance']} | {r['top1']:.2%} | {r['macs_ratio']:.3f} | {r['prune_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
