"""Quantization benchmark: float32 ORT vs ORT's `quantize_dynamic` one-liner vs vitcompress INT8.

    python scripts/bench_quantize.py --threads 2 --runs 100          # speed (DeiT-S) + accuracy (reference)
    python scripts/bench_quantize.py --smoke                          # tiny, for the test suite

Speed track: timm deit_small_patch16_224, random init, 224, exported once (TorchScript, opset 17);
`quantize_dynamic(model, out)` with ORT's defaults, and vitcompress static INT8 with the
`cpu-x86-vnni` preset (calibrated on 64 synthetic images: ranges only matter for accuracy); all
interleaved in one run at batch 1. Accuracy track: the Fashion-MNIST reference ViT, the same three
variants, top-1 on the 10k test images (vitcompress calibrated on 256 stratified training images).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_prune import _reference

from vitcompress.bench import Environment, bench_models
from vitcompress.data import DataSpec, load_dataset
from vitcompress.evaluate import evaluate_onnx
from vitcompress.models import ModelRef, load_model
from vitcompress.models.stats import count_macs
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.passes.quantize import QuantizeConfig, quantize_file


def _variants(loaded, workdir: Path, calibration) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    from onnxruntime.quantization import quantize_dynamic

    fp32 = export_model(loaded, workdir / "fp32.onnx", ExportConfig()).path
    dynamic = workdir / "dynamic.onnx"
    quantize_dynamic(str(fp32), str(dynamic))
    ours = workdir / "vitcompress.int8.onnx"
    quantize_file(fp32, ours, QuantizeConfig(preset="cpu-x86-vnni"), calibration)
    return {
        "ORT fp32": fp32,
        "ORT quantize_dynamic (one-liner)": dynamic,
        "vitcompress int8 (cpu-x86-vnni)": ours,
    }


def speed_track(args: argparse.Namespace, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    loaded = load_model(ModelRef(f"timm:{args.model}", kwargs=json.loads(args.kwargs)))
    macs, _ = count_macs(loaded)
    calibration = load_dataset(DataSpec(source="synthetic", num_samples=64), loaded.input, loaded.num_classes)
    paths = _variants(loaded, workdir, calibration)
    report = bench_models(
        list(paths.values()), threads=args.threads, batch_sizes=[1], warmup=args.warmup, runs=args.runs
    )
    base = report.find(str(paths["ORT fp32"]), 1).p50_ms
    dyn = report.find(str(paths["ORT quantize_dynamic (one-liner)"]), 1).p50_ms
    rows = []
    for name, path in paths.items():
        latency = report.find(str(path), 1)
        rows.append(
            {
                "variant": name,
                "p50_ms": latency.p50_ms,
                "p90_ms": latency.p90_ms,
                "speedup_vs_fp32": base / latency.p50_ms,
                "speedup_vs_dynamic": dyn / latency.p50_ms,
                "onnx_mb": path.stat().st_size / 1e6,
                "macs": macs,
            }
        )
    return rows


def accuracy_track(args: argparse.Namespace, workdir: Path) -> list[dict]:
    ref, source = _reference(args)
    loaded = load_model(ref)
    calibration = load_dataset(
        DataSpec(source=source, split="train", limit=256), loaded.input, loaded.num_classes
    )
    test = load_dataset(
        DataSpec(source=source, split="test", limit=args.eval_limit), loaded.input, loaded.num_classes
    )
    paths = _variants(loaded, workdir, calibration)
    rows = []
    for name, path in paths.items():
        result = evaluate_onnx(path, test, threads=args.threads)
        rows.append({"variant": name, "top1": result.top1, "samples": result.samples})
    base = rows[0]["top1"]
    for row in rows:
        row["drop_points"] = 100 * (base - row["top1"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--kwargs", default="{}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--reference", type=Path, default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {
        "environment": Environment.detect().__dict__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "speed").mkdir()
        (Path(tmp) / "acc").mkdir()
        results["speed"] = speed_track(args, Path(tmp) / "speed")
        results["accuracy"] = accuracy_track(args, Path(tmp) / "acc")
    print(f"\n### {args.model}: ORT CPU, batch 1, {args.threads} threads, interleaved\n")
    print("| variant | p50 ms | p90 ms | vs fp32 | vs quantize_dynamic | ONNX MB |")
    print("|---|---|---|---|---|---|")
    for r in results["speed"]:
        print(f"| {r['variant']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['speedup_vs_fp32']:.2f}x | "
              f"{r['speedup_vs_dynamic']:.2f}x | {r['onnx_mb']:.1f} |")  # fmt: skip
    print("\n### Accuracy (reference model, test split)\n")
    print("| variant | top-1 | drop (points) |")
    print("|---|---|---|")
    for r in results["accuracy"]:
        print(f"| {r['variant']} | {r['top1']:.2%} | {r['drop_points']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
