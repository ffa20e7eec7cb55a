"""Token reduction benchmark: latency of merging/pruning tokens, alone and with structured pruning and
INT8, and top-1 against measured latency on a many-token model.

    python scripts/bench_tokens.py --track speed --threads 2 --runs 100     # DeiT-S at 224
    python scripts/bench_tokens.py --track accuracy                         # needs the p4 reference
    python scripts/bench_tokens.py --track kd --kd-final-tokens 14          # + KD with merging on

Speed track: random-init timm model (default deit_small_patch16_224 at 224, 197 tokens). Variants:
the original; ToMe merging to 50 tokens after the last block (constant and decreasing schedules);
EViT pruning to 50 tokens; structured pruning to 50% MACs (magnitude importance) + static INT8
(the speed of prune-kd-int8: distillation changes weights, not speed); the same plus merging to 50
tokens. Each exported to ONNX (and quantized with the cpu-x86-vnni preset, calibrated on 32
synthetic images: speed only); ONNX Runtime at batch 1, all interleaved in one run; the INT8 pair is
also timed with OpenVINO (its CPU plugin runs the QDQ model in INT8).
Accuracy track: the many-token Fashion-MNIST reference (train_reference.py --variant p4: 49 patch
tokens + class token). The 10k test images are split in two: settings are chosen on the even
positions ("val") and the chosen ones reported on the odd positions ("test"). Merge and prune at
several constant r, in one block only (--once: on a small model each block's matching costs
about as much as the tokens it removes, so fewer, larger steps are faster), and with decreasing
schedules to a few final token counts, and structured pruning
at several MAC targets, each exported and timed in one interleaved ONNX Runtime run at batch 1 and
at --batch (throughput, what ToMe reports), top-1 without any fine-tuning.
KD track: the chosen merge setting, then the KD budget of prune-kd-int8 (3 epochs, batch 128,
lr 1e-3, hard label 0.5 + soft KD 0.5 at T=2, shift-flip) with merging on, top-1 on "test".
Prints Markdown tables for BENCHMARKS.md; --json FILE writes the raw numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import benchlib

from vitcompress.data import DataSpec, load_dataset
from vitcompress.models import load_model
from vitcompress.models.stats import count_macs
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.passes.prune import PruneConfig, prune_model
from vitcompress.passes.quantize import QuantizeConfig, quantize_model
from vitcompress.passes.tokens import TokensConfig
from vitcompress.passes.tokens.run import reduce_tokens

STRUCTURES = ["heads", "head_dim", "mlp"]


def _openvino_p50(paths: list[Path], threads: int, runs: int, warmup: int) -> list[float]:
    """p50 ms at batch 1 of every file with OpenVINO's CPU plugin, interleaved in blocks of 10."""
    import openvino as ov

    core = ov.Core()
    compiled = [
        core.compile_model(
            core.read_model(str(p)), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        )
        for p in paths
    ]
    shape = [1, *[d.get_length() for d in list(compiled[0].inputs[0].partial_shape)[1:]]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for c in compiled:
        for _ in range(warmup):
            c(x)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(max(1, runs // 10)):
        for i, c in enumerate(compiled):
            for _ in range(10):
                start = time.perf_counter()
                c(x)
                times[i].append((time.perf_counter() - start) * 1e3)
    return [float(np.median(t)) for t in times]


def speed_track(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ref = benchlib.speed_model(args)
    variants: list[tuple[str, dict[str, Any] | None, bool, bool]] = [
        ("original", None, False, False),
        ("merge to 50 tokens", {"final_tokens": 50}, False, False),
        ("merge to 50 tokens, decreasing", {"final_tokens": 50, "schedule": "decreasing"}, False, False),
        ("prune (EViT) to 50 tokens", {"final_tokens": 50, "method": "prune"}, False, False),
        ("structured prune 50% + INT8", None, True, True),
        ("structured prune 50% + merge to 50 + INT8", {"final_tokens": 50}, True, True),
        (
            "structured prune 50% + merge to 50, decreasing + INT8",
            {"final_tokens": 50, "schedule": "decreasing"},
            True,
            True,
        ),
    ]
    rows, paths = [], []
    calibration = None
    for name, tokens, prune, int8 in variants:
        torch.manual_seed(0)
        loaded = load_model(ref)
        macs0, _ = count_macs(loaded)
        if prune:
            prune_model(loaded, PruneConfig(target_macs=0.5, structures=STRUCTURES))
        final = loaded.adapter.num_tokens
        if tokens is not None:
            final = reduce_tokens(loaded, TokensConfig(**tokens))["final_tokens"]
        macs, _ = count_macs(loaded)
        path = workdir / f"v{len(paths)}.onnx"
        export = export_model(loaded, path, ExportConfig())
        if int8:
            if calibration is None:
                calibration = load_dataset(
                    DataSpec(source="synthetic", limit=32), loaded.input, loaded.num_classes
                )
            quantized = workdir / f"v{len(paths)}.int8.onnx"
            quantize_model(
                path, quantized, QuantizeConfig(preset="cpu-x86-vnni", calibration_size=32), calibration
            )
            path = quantized
        paths.append(path)
        rows.append(
            {
                "variant": name,
                "final_tokens": final,
                "macs_ratio": macs / macs0,
                "parity_max_abs": export.parity.max_abs_diff,
                "runtime": "ORT",
            }
        )
    for row, timing in zip(rows, benchlib.time_variants(paths, args), strict=True):
        row.update(timing)
    base = rows[0]["p50_ms"]
    int8_paths = [p for p, (_, _, _, int8) in zip(paths, variants, strict=True) if int8]
    int8_names = [r["variant"] for r, (_, _, _, int8) in zip(rows, variants, strict=True) if int8]
    for name, p50 in zip(
        int8_names, _openvino_p50(int8_paths, args.threads, args.runs, args.warmup), strict=True
    ):
        rows.append({"variant": name, "runtime": "OpenVINO", "p50_ms": p50, "latency_ratio": p50 / base})
    for row in rows:
        row["speedup"] = base / row["p50_ms"]
    return {"rows": rows}


def _export(loaded, path: Path) -> str:  # type: ignore[no-untyped-def]
    """Export through the parity gate; a near-tie in the matching order that flips between PyTorch
    and ONNX Runtime on a random parity image is recorded, and the file kept, rather than ending the run."""
    from vitcompress.errors import ParityError

    try:
        result = export_model(loaded, path, ExportConfig())
        return f"{result.parity.max_abs_diff:.1e}"
    except ParityError as err:
        print(f"parity: {err}", file=sys.stderr, flush=True)
        result = export_model(loaded, path, ExportConfig(atol=10.0, min_top1_agreement=0.01))
        return f"FAILED strict gate: {result.parity.max_abs_diff:.1e}, top-1 agreement {result.parity.top1_agreement:.2f}"


def _split(loaded, source: str, limit: int | None):  # type: ignore[no-untyped-def]
    test = load_dataset(DataSpec(source=source, split="test", limit=limit), loaded.input, loaded.num_classes)
    idx = np.arange(len(test))
    return test.subset(idx[0::2], "val (even test positions)"), test.subset(idx[1::2], "test (odd positions)")


def accuracy_track(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ref, source = benchlib.reference(args, variant="p4")
    base = load_model(ref)
    val, test = _split(base, source, args.eval_limit)
    macs0, _ = count_macs(base)
    candidates: list[tuple[str, str, Any]] = [("original", "-", None)]
    for r in args.r:
        candidates.append(("merge", f"r={r}", TokensConfig(r=r)))
        candidates.append(("prune", f"r={r}", TokensConfig(r=r, method="prune")))
        candidates.append(("prune+fuse", f"r={r}", TokensConfig(r=r, method="prune", fuse=True)))
    depth = len(base.adapter.blocks())
    for block in args.once_blocks:
        for r in args.once:
            schedule = [r if i == block else 0 for i in range(depth)]
            candidates.append(("merge", f"once: r={r} in block {block}", TokensConfig(r=schedule)))
            candidates.append(
                ("prune", f"once: r={r} in block {block}", TokensConfig(r=schedule, method="prune"))
            )
    for final in args.final_tokens:
        decreasing = {"final_tokens": final, "schedule": "decreasing"}
        candidates.append(("merge", f"to {final}, decreasing", TokensConfig(**decreasing)))
        candidates.append(("prune", f"to {final}, decreasing", TokensConfig(method="prune", **decreasing)))
    for target in args.macs:
        candidates.append(
            ("structured prune", f"MACs {target:.2f}", PruneConfig(target_macs=target, structures=STRUCTURES))
        )
    rows, paths = [], []
    for method, setting, cfg in candidates:
        loaded = load_model(ref)
        final = loaded.adapter.num_tokens
        if isinstance(cfg, TokensConfig):
            final = reduce_tokens(loaded, cfg)["final_tokens"]
        elif isinstance(cfg, PruneConfig):
            prune_model(loaded, cfg)
        macs, _ = count_macs(loaded)
        path = workdir / f"a{len(paths)}.onnx"
        parity = _export(loaded, path)
        paths.append(path)
        rows.append(
            {
                "method": method,
                "setting": setting,
                "final_tokens": final,
                "macs_ratio": macs / macs0,
                "val_top1": benchlib.top1(loaded, val),
                "test_top1": benchlib.top1(loaded, test),
                "parity": parity,
            }
        )
        print(f"{method} {setting}: val {rows[-1]['val_top1']:.2%}", file=sys.stderr, flush=True)
    batches = (1, args.batch) if args.batch > 1 else (1,)
    for row, timing in zip(rows, benchlib.time_variants(paths, args, batches), strict=True):
        row.update(timing)
        row["speedup"] = 1 / row["latency_ratio"]
        if args.batch > 1:
            row["speedup_batch"] = 1 / row[f"latency_ratio_b{args.batch}"]
    int8 = int8_rows(args, workdir) if args.int8_r > 0 else []
    return {"rows": rows, "val_size": len(val), "test_size": len(test), "int8": int8}


def int8_rows(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """Static INT8 of the original and of the merged model at --int8-r: the matching (and attention)
    matmuls in float (the default) or quantized too; top-1 with ONNX Runtime on both halves."""
    from vitcompress.accuracy import evaluate_onnx

    ref, source = benchlib.reference(args, variant="p4")
    calibration = None
    rows = []
    for name, tokens in (("original", None), (f"merge r={args.int8_r}", TokensConfig(r=args.int8_r))):
        loaded = load_model(ref)
        if tokens is not None:
            reduce_tokens(loaded, tokens)
        val, test = _split(loaded, source, args.eval_limit)
        if calibration is None:
            calibration = load_dataset(
                DataSpec(source=source, split="train", limit=512), loaded.input, loaded.num_classes
            )
        fp32 = workdir / f"int8-{len(rows)}.onnx"
        _export(loaded, fp32)
        row: dict[str, Any] = {"model": name, "fp32_test_top1": evaluate_onnx(fp32, test).top1}
        for attention in (False, True):
            target = workdir / f"int8-{len(rows)}-{attention}.onnx"
            cfg = QuantizeConfig(calibration="percentile", calibration_size=512, quantize_attention=attention)
            quantize_model(fp32, target, cfg, calibration)
            key = "int8_all_matmuls" if attention else "int8_float_matching"
            row[f"{key}_val_top1"] = evaluate_onnx(target, val).top1
            row[f"{key}_test_top1"] = evaluate_onnx(target, test).top1
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    return rows


def kd_track(args: argparse.Namespace, workdir: Path, r: list[int]) -> dict[str, Any]:
    """Merge at r (or, with --kd-final-tokens, a decreasing schedule to that many tokens), then the
    distillation budget of prune-kd-int8 with merging on."""
    from vitcompress.passes.distill import DistillConfig, distill_model

    ref, source = benchlib.reference(args, variant="p4")
    teacher = load_model(ref)
    val, test = _split(teacher, source, args.eval_limit)
    student = load_model(ref)
    if args.kd_final_tokens:
        reduce_tokens(student, TokensConfig(final_tokens=args.kd_final_tokens, schedule="decreasing"))
    else:
        reduce_tokens(student, TokensConfig(r=r[0] if len(r) == 1 else r))
    before = benchlib.top1(student, test)
    train = load_dataset(DataSpec(source=source, split="train"), student.input, student.num_classes)
    cfg = DistillConfig(
        epochs=3,
        batch_size=128,
        lr=1e-3,
        hard_label=0.5,
        soft_kd=0.5,
        temperature=2.0,
        augment="shift-flip",
        eval_every=500,
    )
    start = time.perf_counter()
    distill_model(student, teacher, cfg, train, val, workdir / "kd")
    return {
        "r": r,
        "final_tokens": args.kd_final_tokens,
        "original_test_top1": benchlib.top1(teacher, test),
        "merged_test_top1": before,
        "after_kd_test_top1": benchlib.top1(student, test),
        "kd_wall_s": time.perf_counter() - start,
    }


def main() -> int:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--track", choices=["speed", "accuracy", "kd"], default="speed")
    parser.add_argument("--r", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--macs", type=float, nargs="*", default=[0.85, 0.75, 0.65])
    parser.add_argument(
        "--final-tokens",
        type=int,
        nargs="*",
        default=[26, 14, 8],
        help="accuracy track: also merge/prune with a decreasing schedule to these token counts",
    )
    parser.add_argument(
        "--once",
        type=int,
        nargs="*",
        default=[8, 16, 24],
        help="accuracy track: also reduce in one block only (--once-blocks) by these r",
    )
    parser.add_argument("--once-blocks", type=int, nargs="*", default=[0, 1])
    parser.add_argument(
        "--batch", type=int, default=32, help="accuracy track: also time at this batch size (throughput)"
    )
    parser.add_argument(
        "--kd-r",
        type=int,
        nargs="+",
        default=[2],
        help="kd track: merge r (one value: every block; or one per block)",
    )
    parser.add_argument(
        "--kd-final-tokens",
        type=int,
        default=None,
        help="kd track: merge decreasing to N tokens instead of --kd-r",
    )
    parser.add_argument(
        "--int8-r", type=int, default=2, help="accuracy track: merge r of the INT8 comparison"
    )
    args = parser.parse_args()
    results = benchlib.start(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.track == "speed":
            results["speed"] = speed_track(args, Path(tmp))
            benchlib.table(
                f"Token reduction on {args.model}: batch 1, {args.threads} threads, one interleaved run",
                [
                    ("variant", lambda r: r["variant"]),
                    ("runtime", lambda r: r["runtime"]),
                    ("tokens after last block", lambda r: str(r.get("final_tokens", "-"))),
                    ("MACs ratio", lambda r: f"{r['macs_ratio']:.3f}" if "macs_ratio" in r else "-"),
                    ("p50 ms", lambda r: f"{r['p50_ms']:.2f}"),
                    ("speed-up vs ORT fp32", lambda r: f"{r['speedup']:.2f}x"),
                ],
                results["speed"]["rows"],
            )
        elif args.track == "accuracy":
            results["accuracy"] = accuracy_track(args, Path(tmp))
            benchlib.table(
                "Many-token reference (p4): top-1 without fine-tuning vs measured latency (ORT fp32, batch 1)",
                [
                    ("method", lambda r: r["method"]),
                    ("setting", lambda r: r["setting"]),
                    ("tokens after last block", lambda r: str(r["final_tokens"])),
                    ("MACs ratio", lambda r: f"{r['macs_ratio']:.3f}"),
                    ("p50 ms", lambda r: f"{r['p50_ms']:.3f}"),
                    ("speed-up b1", lambda r: f"{r['speedup']:.2f}x"),
                    (
                        f"speed-up b{args.batch}",
                        lambda r: f"{r['speedup_batch']:.2f}x" if "speedup_batch" in r else "-",
                    ),
                    ("val top-1", lambda r: f"{r['val_top1']:.2%}"),
                    ("test top-1", lambda r: f"{r['test_top1']:.2%}"),
                    ("parity max abs", lambda r: r["parity"]),
                ],
                results["accuracy"]["rows"],
            )
            if results["accuracy"]["int8"]:
                benchlib.table(
                    "Static INT8 (percentile, 512 images) of the merged model: matching kept in float or quantized",
                    [
                        ("model", lambda r: r["model"]),
                        ("fp32 test top-1", lambda r: f"{r['fp32_test_top1']:.2%}"),
                        ("INT8, matching in float", lambda r: f"{r['int8_float_matching_test_top1']:.2%}"),
                        ("INT8, all matmuls", lambda r: f"{r['int8_all_matmuls_test_top1']:.2%}"),
                    ],
                    results["accuracy"]["int8"],
                )
        else:
            results["kd"] = kd_track(args, Path(tmp), args.kd_r)
            print(results["kd"])
    return benchlib.finish(args, results)


if __name__ == "__main__":
    sys.exit(main())
