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
from vitcompress.passes.lowrank import LowRankConfig, breakeven_rank, factorize_model


def _half_params_rank(loaded, round_to: int = 8) -> int:  # type: ignore[no-untyped-def]
    """The rank at which a factorized MLP linear has half the parameters of the dense one."""
    fc1 = loaded.adapter.blocks()[0].mlp.fc1
    return int(0.5 * breakeven_rank(fc1.out_features, fc1.in_features) // round_to) * round_to


def speed_track(args: argparse.Namespace, workdir: Path) -> list[dict]:
    ref = benchlib.speed_model(args)
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
    params0 = sum(p.numel() for p in base.model.parameters())
    rows = [
        {"method": "original", "target_params": 1.0, "params_ratio": 1.0, "top1": benchlib.top1(base, test)}
    ]
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
                    "top1": benchlib.top1(loaded, test),
                    "factorize_s": time.perf_counter() - start,
                }
            )
    return rows


def main() -> int:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--track", choices=["speed", "accuracy", "both"], default="both")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6])
    parser.add_argument("--calibration", type=int, default=512)
    args = parser.parse_args()
    results = benchlib.start(args)
    if args.track in ("speed", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            results["speed"] = speed_track(args, Path(tmp))
        benchlib.table(
            f"Factorized {args.model}: ORT fp32, batch 1, {args.threads} threads, interleaved",
            [
                ("variant", lambda r: r["model"]),
                ("params ratio", lambda r: f"{r['params_ratio']:.3f}"),
                ("MACs ratio", lambda r: f"{r['macs_ratio']:.3f}"),
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
            "Top-1 vs parameters, MLPs factorized, no fine-tuning",
            [
                ("method", lambda r: r["method"]),
                ("target params", lambda r: f"{r['target_params']:.2f}"),
                ("params ratio", lambda r: f"{r['params_ratio']:.3f}"),
                ("top-1", lambda r: f"{r['top1']:.2%}"),
            ],
            results["accuracy"],
        )
    return benchlib.finish(args, results)


if __name__ == "__main__":
    sys.exit(main())
