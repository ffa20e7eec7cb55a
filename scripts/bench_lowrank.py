"""Low-rank benchmark: latency of factorized MLPs, and top-1 vs parameters for plain vs data-aware SVD.

    python scripts/bench_lowrank.py --threads 2 --runs 100                    # both tracks
    python scripts/bench_lowrank.py --track speed --model deit_small_patch16_224
    python scripts/bench_lowrank.py --track accuracy                          # needs the reference model

Speed track: random-init timm model (default deit_small_patch16_224 at 224); every MLP fc1/fc2
factorized to half its parameters (rank 152 for 384x1536), and COMCAT attention at half the head
size; each exported to ONNX; ONNX Runtime fp32 at batch 1, interleaved in one run.
Accuracy track: the Fashion-MNIST reference ViT (scripts/train_reference.py), MLPs factorized with
plain SVD and with activation-whitened SVD (512 stratified training images) at several parameter
budgets; top-1 on the 10k test images before any fine-tuning.
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

from bench_prune import _reference, top1

from vitcompress.bench import Environment, bench_models
from vitcompress.data import DataSpec, load_dataset
from vitcompress.models import ModelRef, load_model
from vitcompress.models.stats import count_macs
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.passes.lowrank import LowRankConfig, factorize_model


def _half_params_rank(loaded, round_to: int = 8) -> int:  # type: ignore[no-untyped-def]
    fc1 = loaded.adapter.blocks()[0].mlp.fc1
    rank = 0.5 * fc1.in_features * fc1.out_features / (fc1.in_features + fc1.out_features)
    return int(rank // round_to) * round_to


def speed_track(args: argparse.Namespace, workdir: Path) -> list[dict]:
    ref = ModelRef(f"timm:{args.model}", kwargs=json.loads(args.kwargs))
    rows, paths = [], []
    for variant in ("original", "mlp-half-params", "comcat-half-head"):
        torch.manual_seed(0)
        loaded = load_model(ref)
        params0 = sum(p.numel() for p in loaded.model.parameters())
        macs0, _ = count_macs(loaded)
        start = time.perf_counter()
        if variant == "mlp-half-params":
            factorize_model(loaded, LowRankConfig(rank=_half_params_rank(loaded)))
        elif variant == "comcat-half-head":
            factorize_model(loaded, LowRankConfig(attention="comcat", attention_rank=0.5))
        wall = time.perf_counter() - start
        macs, _ = count_macs(loaded)
        params = sum(p.numel() for p in loaded.model.parameters())
        path = workdir / f"{variant}.onnx"
        export_model(loaded, path, ExportConfig())
        paths.append(path)
        rows.append(
            {
                "model": f"{args.model} {variant}",
                "params_ratio": params / params0,
                "macs_ratio": macs / macs0,
                "onnx_mb": path.stat().st_size / 1e6,
                "factorize_s": wall,
            }
        )
    report = bench_models(paths, threads=args.threads, batch_sizes=[1], warmup=args.warmup, runs=args.runs)
    base = report.find(str(paths[0]), 1).p50_ms
    for row, path in zip(rows, paths, strict=True):
        latency = report.find(str(path), 1)
        row.update(p50_ms=latency.p50_ms, p90_ms=latency.p90_ms, latency_ratio=latency.p50_ms / base)
    return rows


def accuracy_track(args: argparse.Namespace) -> list[dict]:
    ref, source = _reference(args)
    base = load_model(ref)
    test = load_dataset(
        DataSpec(source=source, split="test", limit=args.eval_limit), base.input, base.num_classes
    )
    calibration = load_dataset(
        DataSpec(source=source, split="train", limit=args.calibration), base.input, base.num_classes
    )
    params0 = sum(p.numel() for p in base.model.parameters())
    rows = [{"method": "original", "target_params": 1.0, "params_ratio": 1.0, "top1": top1(base, test)}]
    for target in args.targets:
        for method in ("svd", "whitened"):
            torch.manual_seed(0)
            loaded = load_model(ref)
            cfg = LowRankConfig(
                target_params=target,
                method=method,
                batch_size=64,
                calibration_batches=max(1, args.calibration // 64),
            )
            start = time.perf_counter()
            factorize_model(loaded, cfg, calibration if method != "svd" else None)
            params = sum(p.numel() for p in loaded.model.parameters())
            rows.append(
                {
                    "method": method,
                    "target_params": target,
                    "params_ratio": params / params0,
                    "top1": top1(loaded, test),
                    "factorize_s": time.perf_counter() - start,
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
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6])
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny random model on digits (for the test suite)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {
        "environment": Environment.detect().__dict__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if args.track in ("speed", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            results["speed"] = speed_track(args, Path(tmp))
        print(f"\n### Factorized {args.model}: ORT fp32, batch 1, {args.threads} threads, interleaved\n")
        print("| variant | params ratio | MACs ratio | ONNX MB | p50 ms | p90 ms | latency ratio |")
        print("|---|---|---|---|---|---|---|")
        for r in results["speed"]:
            print(
                f"| {r['model']} | {r['params_ratio']:.3f} | {r['macs_ratio']:.3f} | {r['onnx_mb']:.1f} | "
                f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['latency_ratio']:.3f} |"
            )
    if args.track in ("accuracy", "both"):
        results["accuracy"] = accuracy_track(args)
        print("\n### Top-1 vs parameters, MLPs factorized, no fine-tuning\n")
        print("| method | target params | params ratio | top-1 |")
        print("|---|---|---|---|")
        for r in results["accuracy"]:
            print(f"| {r['method']} | {r['target_params']:.2f} | {r['params_ratio']:.3f} | {r['top1']:.2%} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
