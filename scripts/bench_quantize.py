"""Quantization benchmark: float32 ORT vs ORT's `quantize_dynamic` one-liner vs vitcompress INT8.

    python scripts/bench_quantize.py --threads 2 --runs 100          # speed (DeiT-S) + accuracy (reference)
    python scripts/bench_quantize.py --smoke                          # tiny, for the test suite

Speed track: timm deit_small_patch16_224, random init, 224, exported once (TorchScript, opset 17);
`quantize_dynamic(model, out)` with ORT's defaults, and vitcompress INT8 with the `cpu-x86-vnni`
preset (mode auto: static QDQ calibrated on 64 synthetic images, or dynamic, whichever is faster
here; ranges only matter for accuracy); all
interleaved in one run at batch 1. Accuracy track: the Fashion-MNIST reference ViT, the same three
variants, top-1 on the 10k test images (vitcompress calibrated on 256 stratified training images).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import benchlib

from vitcompress.accuracy import evaluate_onnx
from vitcompress.data import DataSpec, load_dataset
from vitcompress.models import load_model
from vitcompress.models.stats import count_macs
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.passes.quantize import QuantizeConfig, quantize_model


def _variants(loaded, workdir: Path, calibration, threads: int) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    from onnxruntime.quantization import quantize_dynamic

    fp32 = export_model(loaded, workdir / "fp32.onnx", ExportConfig()).path
    dynamic = workdir / "dynamic.onnx"
    quantize_dynamic(str(fp32), str(dynamic))
    ours = workdir / "vitcompress.int8.onnx"
    quantize_model(fp32, ours, QuantizeConfig(preset="cpu-x86-vnni"), calibration, threads=threads)
    return {
        "ORT fp32": fp32,
        "ORT quantize_dynamic (one-liner)": dynamic,
        "vitcompress int8 (cpu-x86-vnni)": ours,
    }


def speed_track(args: argparse.Namespace, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    loaded = load_model(benchlib.speed_model(args))
    macs, _ = count_macs(loaded)
    calibration = load_dataset(DataSpec(source="synthetic", num_samples=64), loaded.input, loaded.num_classes)
    paths = _variants(loaded, workdir, calibration, args.threads)
    timings = benchlib.time_variants(list(paths.values()), args)
    dynamic = timings[1]["p50_ms"]  # the one-liner
    return [
        {
            "variant": name,
            "p50_ms": t["p50_ms"],
            "p90_ms": t["p90_ms"],
            "speedup_vs_fp32": 1 / t["latency_ratio"],
            "speedup_vs_dynamic": dynamic / t["p50_ms"],
            "onnx_mb": path.stat().st_size / 1e6,
            "macs": macs,
        }
        for (name, path), t in zip(paths.items(), timings, strict=True)
    ]


def accuracy_track(args: argparse.Namespace, workdir: Path) -> list[dict]:
    ref, source = benchlib.reference(args)
    loaded = load_model(ref)
    calibration = load_dataset(
        DataSpec(source=source, split="train", limit=256), loaded.input, loaded.num_classes
    )
    test = load_dataset(
        DataSpec(source=source, split="test", limit=args.eval_limit), loaded.input, loaded.num_classes
    )
    paths = _variants(loaded, workdir, calibration, args.threads)
    rows = []
    for name, path in paths.items():
        result = evaluate_onnx(path, test, threads=args.threads)
        rows.append({"variant": name, "top1": result.top1, "samples": result.samples})
    base = rows[0]["top1"]
    for row in rows:
        row["drop_points"] = 100 * (base - row["top1"])
    return rows


def main() -> int:
    args = benchlib.parser(__doc__).parse_args()
    results = benchlib.start(args)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "speed").mkdir()
        (Path(tmp) / "acc").mkdir()
        results["speed"] = speed_track(args, Path(tmp) / "speed")
        results["accuracy"] = accuracy_track(args, Path(tmp) / "acc")
    benchlib.table(
        f"{args.model}: ORT CPU, batch 1, {args.threads} threads, interleaved",
        [
            ("variant", lambda r: r["variant"]),
            ("p50 ms", lambda r: f"{r['p50_ms']:.2f}"),
            ("p90 ms", lambda r: f"{r['p90_ms']:.2f}"),
            ("vs fp32", lambda r: f"{r['speedup_vs_fp32']:.2f}x"),
            ("vs quantize_dynamic", lambda r: f"{r['speedup_vs_dynamic']:.2f}x"),
            ("ONNX MB", lambda r: f"{r['onnx_mb']:.1f}"),
        ],
        results["speed"],
    )
    benchlib.table(
        "Accuracy (reference model, test split)",
        [
            ("variant", lambda r: r["variant"]),
            ("top-1", lambda r: f"{r['top1']:.2%}"),
            ("drop (points)", lambda r: f"{r['drop_points']:.2f}"),
        ],
        results["accuracy"],
    )
    return benchlib.finish(args, results)


if __name__ == "__main__":
    sys.exit(main())
