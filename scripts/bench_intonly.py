"""Integer-only benchmark: accuracy, parity and speed of the int-only preset against fp32 and INT8.

    python scripts/bench_intonly.py --threads 2 --runs 100 --json intonly.json   # the full run
    python scripts/bench_intonly.py --smoke --runs 3 --warmup 1                     # tiny, for the test suite

Accuracy track (Fashion-MNIST reference): the calibration setting (minmax, or the percentile of |x|
on the int8 points) is chosen on a validation set (2,000 stratified training images, seed 1, not the
256 calibration images' seed 0; the reference trained on all of train, so this is a selection set,
not held-out data); the test split (10k) is scored once: fp32, integer-only calibrated on 256
images, integer-only calibrated on one image (I-Segmenter's one-shot setting), integer-only after
integer-aware KD (`--finetune-steps` of batch 64 on training images, seed 2, scales frozen at
calibration), and today's INT8 (`cpu-x86-vnni`, static QDQ, float LayerNorm/Softmax/GELU).

Parity track (`--model`, random init, 224): integer vs float logits on 32 synthetic images
(Pearson correlation, top-1 agreement), calibrated on 8 synthetic images, and the op list.

Speed track (the reference and `--model`): ORT fp32, vitcompress INT8 (`cpu-x86-vnni`, mode auto)
and integer-only, interleaved at batch 1; then ONNX Runtime's profile of the integer-only file
(time per op type).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import benchlib

from vitcompress.accuracy import evaluate_onnx, onnx_metadata
from vitcompress.data import DataSpec, load_dataset
from vitcompress.models import load_model
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.passes.intonly.build import Finetune, plan_model, write_integer_only
from vitcompress.passes.quantize import QuantizeConfig, quantize_model
from vitcompress.runtime import OnnxRunner
from vitcompress.timing import profile_ops

SETTINGS: dict[str, float | None] = {"minmax": None, "percentile 99.99": 99.99, "percentile 99.9": 99.9}


def _int_only(
    loaded, fp32: Path, out: Path, calibration, percentile: float | None, finetune=None
) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    plan = plan_model(loaded, calibration, percentile, finetune=finetune)
    images = next(iter(calibration.batches(2)))[0].numpy()
    details = write_integer_only(plan, out, onnx_metadata(fp32), images)
    details["finetune_losses"] = plan.finetune_losses
    return details


def _int8(fp32: Path, out: Path, calibration, threads: int) -> None:  # type: ignore[no-untyped-def]
    quantize_model(fp32, out, QuantizeConfig(preset="cpu-x86-vnni"), calibration, threads=threads)


def accuracy_track(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ref, source = benchlib.reference(args)
    loaded = load_model(ref)
    spec, classes = loaded.input, loaded.num_classes
    calibration = load_dataset(DataSpec(source=source, split="train", limit=256), spec, classes)
    one = load_dataset(DataSpec(source=source, split="train", limit=1), spec, classes)
    val = load_dataset(DataSpec(source=source, split="train", limit=args.val_limit, seed=1), spec, classes)
    test = load_dataset(DataSpec(source=source, split="test", limit=args.eval_limit), spec, classes)
    fp32 = export_model(loaded, workdir / "fp32.onnx", ExportConfig()).path
    selection = []
    for name, percentile in SETTINGS.items():
        path = workdir / f"int-{name.replace(' ', '-')}.onnx"
        _int_only(loaded, fp32, path, calibration, percentile)
        selection.append({"setting": name, "val_top1": evaluate_onnx(path, val, threads=args.threads).top1})
    best = max(selection, key=lambda r: r["val_top1"])
    print(f"chosen on validation: {best['setting']}", file=sys.stderr)
    one_path = workdir / "int-one-image.onnx"
    _int_only(loaded, fp32, one_path, one, SETTINGS[best["setting"]])
    int8 = workdir / "int8.onnx"
    _int8(fp32, int8, calibration, args.threads)
    train = load_dataset(
        DataSpec(source=source, split="train", limit=args.finetune_images, seed=2), spec, classes
    )
    tuned = workdir / "int-finetuned.onnx"
    steps, lr = args.finetune_steps, args.finetune_lr
    tuned_details = _int_only(
        loaded, fp32, tuned, calibration, SETTINGS[best["setting"]], Finetune(train, steps, lr)
    )
    variants = {
        "ORT fp32": fp32,
        f"integer-only, 256 calibration images ({best['setting']})": workdir
        / f"int-{best['setting'].replace(' ', '-')}.onnx",
        f"integer-only, 1 calibration image ({best['setting']})": one_path,
        f"integer-only + integer-aware KD ({steps} steps, lr {lr:g})": tuned,
        "vitcompress INT8 (cpu-x86-vnni, float LN/Softmax/GELU)": int8,
    }
    base = OnnxRunner(fp32, threads=args.threads)
    rows = []
    for name, path in variants.items():
        result = evaluate_onnx(path, test, threads=args.threads)
        runner = OnnxRunner(path, threads=args.threads)
        agree = total = 0
        for x, _ in test.batches(500):
            agree += int((base.run(x.numpy()).argmax(1) == runner.run(x.numpy()).argmax(1)).sum())
            total += len(x)
        rows.append(
            {"variant": name, "top1": result.top1, "agreement": agree / total, "samples": result.samples}
        )
    for row in rows:
        row["drop_points"] = 100 * (rows[0]["top1"] - row["top1"])
    return {
        "selection": selection,
        "chosen": best["setting"],
        "test": rows,
        "finetune_losses": tuned_details["finetune_losses"],
    }


def parity_track(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    loaded = load_model(benchlib.speed_model(args))
    fp32 = export_model(loaded, workdir / "fp32.onnx", ExportConfig()).path
    calibration = load_dataset(DataSpec(source="synthetic", num_samples=8), loaded.input, loaded.num_classes)
    path = workdir / "int-only.onnx"
    details = _int_only(loaded, fp32, path, calibration, None)
    images = load_dataset(
        DataSpec(source="synthetic", num_samples=32, seed=1), loaded.input, loaded.num_classes
    )
    x = np.concatenate([b.numpy() for b, _ in images.batches(32)])
    a, b = OnnxRunner(fp32, threads=args.threads).run(x), OnnxRunner(path, threads=args.threads).run(x)
    return {
        "model": args.model,
        "correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(a - b).max()),
        "max_abs_logit": float(np.abs(a).max()),
        "ops": details["integer_only"]["ops"],
        "tensor_types": details["integer_only"]["tensor_types"],
        "bit_exact_images": details["reference_match"]["images"],
        "fp32": fp32,
        "int_only": path,
    }


def speed_track(
    args: argparse.Namespace, name: str, loaded, fp32: Path, int_only: Path, workdir: Path
) -> list[dict]:  # type: ignore[no-untyped-def]
    calibration = load_dataset(DataSpec(source="synthetic", num_samples=64), loaded.input, loaded.num_classes)
    int8 = workdir / f"{name}-int8.onnx"
    _int8(fp32, int8, calibration, args.threads)
    paths = {"ORT fp32": fp32, "vitcompress INT8 (cpu-x86-vnni)": int8, "integer-only (int-only)": int_only}
    timings = benchlib.time_variants(list(paths.values()), args)
    rows = []
    for (variant, path), t in zip(paths.items(), timings, strict=True):
        rows.append({"model": name, "variant": variant, "p50_ms": t["p50_ms"], "p90_ms": t["p90_ms"],
                     "vs_fp32": 1 / t["latency_ratio"], "vs_int8": timings[1]["p50_ms"] / t["p50_ms"],
                     "nodes": len(__import__("onnx").load(str(path), load_external_data=False).graph.node)})  # fmt: skip
    profile = profile_ops(int_only, threads=args.threads, runs=max(3, args.runs // 5))
    rows[-1]["profile"] = [
        {"op": p.op_type, "nodes": p.nodes, "ms": p.ms_per_run, "share": p.share} for p in profile
    ]
    return rows


def main() -> int:
    p = benchlib.parser(__doc__)
    p.add_argument("--val-limit", type=int, default=2000, help="validation images (training split, seed 1)")
    p.add_argument("--finetune-steps", type=int, default=300, help="integer-aware KD steps (batch 64)")
    p.add_argument("--finetune-lr", type=float, default=2e-5)
    p.add_argument("--finetune-images", type=int, default=20000, help="training images for the KD (seed 2)")
    p.add_argument(
        "--tracks",
        nargs="+",
        choices=["accuracy", "parity", "speed"],
        default=["accuracy", "parity", "speed"],
    )
    p.add_argument(
        "--setting", choices=list(SETTINGS), default="minmax", help="calibration without the accuracy track"
    )
    args = p.parse_args()
    if args.smoke:
        args.model, args.kwargs = "vit_tiny_patch16_224", '{"depth": 2, "img_size": 32, "patch_size": 8}'
        args.val_limit, args.eval_limit = 64, args.eval_limit or 64
        args.finetune_steps, args.finetune_images = 2, 64
    results = benchlib.start(args)
    tracks = set(args.tracks)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ref, source = benchlib.reference(args)
        reference = load_model(ref)
        chosen = args.setting
        if "accuracy" in tracks:
            results["accuracy"] = accuracy_track(args, work)
            chosen = results["accuracy"]["chosen"]
        ref_fp32 = work / "fp32.onnx"
        ref_int = work / f"int-{chosen.replace(' ', '-')}.onnx"
        if not ref_int.exists():  # the speed track alone: build the reference's two files here
            calibration = load_dataset(
                DataSpec(source=source, split="train", limit=256), reference.input, reference.num_classes
            )
            export_model(reference, ref_fp32, ExportConfig())
            _int_only(reference, ref_fp32, ref_int, calibration, SETTINGS[chosen])
        if tracks & {"parity", "speed"}:
            (work / "parity").mkdir()
            parity = parity_track(args, work / "parity")
            results["parity"] = {k: v for k, v in parity.items() if k not in ("fp32", "int_only")}
        if "speed" in tracks:
            results["speed"] = speed_track(args, "reference", reference, ref_fp32, ref_int, work)
            results["speed"] += speed_track(args, args.model, load_model(benchlib.speed_model(args)), parity["fp32"],
                                            parity["int_only"], work)  # fmt: skip
    _print(args, results)
    results = json.loads(json.dumps(results, default=str))
    return benchlib.finish(args, results)


def _print(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if "accuracy" in results:
        _print_accuracy(results)
    if "parity" in results:
        par = results["parity"]
        print(
            f"\n{par['model']} (random init), integer-only vs fp32 on 32 synthetic images: correlation "
            f"{par['correlation']:.4f}, top-1 agreement {par['top1_agreement']:.0%}, max |Δlogit| "
            f"{par['max_abs_diff']:.3g} (max |logit| {par['max_abs_logit']:.3g})\nops: "
            + ", ".join(f"{op} {n}" for op, n in par["ops"].items())
        )
    if "speed" in results:
        _print_speed(args, results)


def _print_accuracy(results: dict[str, Any]) -> None:
    benchlib.table(
        "Calibration setting, chosen on validation (training images, seed 1)",
        [("setting", lambda r: r["setting"]), ("val top-1", lambda r: f"{r['val_top1']:.2%}")],
        results["accuracy"]["selection"],
    )
    benchlib.table(
        "Accuracy (reference model, test split, scored once)",
        [
            ("variant", lambda r: r["variant"]),
            ("top-1", lambda r: f"{r['top1']:.2%}"),
            ("drop (points)", lambda r: f"{r['drop_points']:.2f}"),
            ("top-1 agreement with fp32", lambda r: f"{r['agreement']:.2%}"),
        ],
        results["accuracy"]["test"],
    )


def _print_speed(args: argparse.Namespace, results: dict[str, Any]) -> None:
    benchlib.table(
        f"Speed: ORT CPU, batch 1, {args.threads} threads, interleaved",
        [
            ("model", lambda r: r["model"]),
            ("variant", lambda r: r["variant"]),
            ("p50 ms", lambda r: f"{r['p50_ms']:.2f}"),
            ("p90 ms", lambda r: f"{r['p90_ms']:.2f}"),
            ("vs fp32", lambda r: f"{r['vs_fp32']:.2f}x"),
            ("vs INT8", lambda r: f"{r['vs_int8']:.2f}x"),
            ("nodes", lambda r: str(r["nodes"])),
        ],
        results["speed"],
    )
    for row in results["speed"]:
        if "profile" in row:
            print(f"\nwhere the time goes, integer-only {row['model']} (ORT profiler, per run):\n")
            print("| op | nodes | ms | share |\n|---|---|---|---|")
            for op in row["profile"][:12]:
                print(f"| {op['op']} | {op['nodes']} | {op['ms']:.3f} | {op['share']:.1%} |")


if __name__ == "__main__":
    sys.exit(main())
