"""vitcompress across runtimes: ONNX Runtime and OpenVINO (NNCF INT8) on the same exports, one run.

    python scripts/bench_runtimes.py                                  # DeiT-S speed rows
    python scripts/bench_runtimes.py --models deit_small_patch16_224 deit_base_patch16_224 --pruned
    python scripts/bench_runtimes.py --accuracy --models              # Fashion-MNIST reference only
    python scripts/bench_runtimes.py --smoke                          # tiny model, seconds (tests)

Speed rows (random-init timm model at 224; calibration on 64 synthetic images, the same for every
INT8 row): the fp32 export on ORT; the same file converted to IR on OpenVINO with the f32 hint and
with OpenVINO's default (bf16 on CPUs with AVX512_BF16/AMX); ORT's quantize_dynamic; vitcompress's
static QDQ file (preset cpu-x86-vnni, static) on ORT and read by OpenVINO; nncf.quantize's default
INT8 (model_type=TRANSFORMER) on OpenVINO. With --pruned, the prune-kd-int8 recipe (no distillation
on random weights: speed only) and NNCF / OpenVINO on the same pruned model. Every file of a model is
timed in one interleaved run (blocks of warm runs, rotating order) at batch 1 and at batch 32.
The compute floor of a row is its MACs at this CPU's measured GEMM peak for the precision it
computes in: fp32 and int8 from ONNX Runtime (MatMul, MatMulInteger), bf16 from OpenVINO (MatMul
with the bf16 hint), 1024^3 each, best of three.

The accuracy track (--accuracy) quantizes the Fashion-MNIST reference with vitcompress's static QDQ
(edge-cpu-int8's settings: cpu-x86-vnni, percentile, 512 calibration images of the train split) and
with nncf.quantize's default on the same 512 images, and reports top-1 on the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


def ov_gemm_peak(precision: str, threads: int, size: int = 1024, runs: int = 30) -> float:
    """MACs per second of a large MatMul on OpenVINO's CPU plugin with a precision hint."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops
    import openvino.properties as props
    import openvino.properties.hint as hints

    rng = np.random.default_rng(0)
    a = ops.parameter([size, size], np.float32, name="a")
    b = ops.constant(rng.standard_normal((size, size)).astype(np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a])
    hint = {"fp32": "f32", "bf16": "bf16"}[precision]
    compiled = ov.Core().compile_model(
        model,
        "CPU",
        {props.inference_num_threads: threads, hints.inference_precision: hint, props.num_streams: 1},
    )
    request = compiled.create_infer_request()
    feed = rng.standard_normal((size, size)).astype(np.float32)
    for _ in range(3):
        request.infer({0: feed})
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        request.infer({0: feed})
        best = min(best, time.perf_counter() - start)
    return size**3 / best


def peaks(threads: int) -> dict[str, float]:
    from vitcompress.timing import gemm_peak

    out = {p: max(gemm_peak(p, threads) for _ in range(3)) for p in ("fp32", "int8")}
    out["bf16"] = max(ov_gemm_peak("bf16", threads) for _ in range(3))
    out["fp32_openvino"] = max(ov_gemm_peak("fp32", threads) for _ in range(3))
    return out


def torch_ir(loaded: Any, xml: Path) -> Path:
    """OpenVINO's own PyTorch frontend (ov.convert_model on the module), dynamic batch: the
    alternative to converting the parity-checked ONNX file."""
    import openvino as ov
    import torch

    from vitcompress.runtimes.openvino import save_ir

    model = loaded.model.eval()
    with torch.no_grad():
        converted = ov.convert_model(
            model, example_input=loaded.example_input(1), input=[(-1, *loaded.example_input(1).shape[1:])]
        )
    return save_ir(converted, xml, None)


def build_int8(fp32: Path, workdir: Path, calibration: Any, prefix: str = "") -> dict[str, Path]:
    """vitcompress static QDQ (ORT), the same read by OpenVINO, and NNCF's default INT8 (OpenVINO)."""
    from vitcompress.passes.quantize import QuantizeConfig, quantize_model
    from vitcompress.passes.quantize_openvino import nncf_quantize
    from vitcompress.runtimes.openvino import onnx_to_ir

    qdq = workdir / f"{prefix}qdq.onnx"
    cfg = QuantizeConfig(preset="cpu-x86-vnni", mode="static", calibration_size=len(calibration))
    quantize_model(fp32, qdq, cfg, calibration)
    onnx_to_ir(qdq, workdir / f"{prefix}qdq.xml")
    nncf_cfg = QuantizeConfig(runtime="openvino", mode="static", calibration_size=len(calibration))
    nncf_quantize(fp32, workdir / f"{prefix}nncf.xml", nncf_cfg, calibration, None)
    return {"qdq": qdq, "qdq_xml": workdir / f"{prefix}qdq.xml", "nncf": workdir / f"{prefix}nncf.xml"}


def time_rows(rows: list[dict[str, Any]], threads: int, batch: int, runs: int, block: int) -> None:
    """Time every row's file on its runtime in one interleaved run; fills p50/p90/throughput."""
    import numpy as np

    from vitcompress.runtime import Provider
    from vitcompress.timing import open_bench_runner, time_interleaved

    runners = [
        open_bench_runner(Path(r["path"]), r["runtime"], Provider.cpu, r.get("hint"), threads) for r in rows
    ]
    feeds = []
    for runner in runners:
        shape = [batch] + [d if isinstance(d, int) else 1 for d in runner.input_shape[1:]]
        feeds.append(np.random.default_rng(0).standard_normal(shape).astype(runner.input_dtype))
    calls = [(lambda r=r, x=x: r.infer(x)) for r, x in zip(runners, feeds, strict=True)]
    times = time_interleaved(calls, warmup=3 if batch > 1 else 10, runs=runs, block=block)
    base = float(np.percentile(times[0], 50))
    for row, runner, samples in zip(rows, runners, times, strict=True):
        p50 = float(np.percentile(samples, 50))
        row[f"b{batch}"] = {
            "p50_ms": p50,
            "p90_ms": float(np.percentile(samples, 90)),
            "images_per_s": batch * 1e3 / p50,
            "vs_first": base / p50,
        }
        row["ran"] = runner.info.to_dict()


def speed_model(
    name: str, args: argparse.Namespace, workdir: Path, peak: dict[str, float]
) -> list[dict[str, Any]]:
    import torch

    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.models import ModelRef, load_model
    from vitcompress.models.stats import count_macs
    from vitcompress.passes.export import ExportConfig, export_model
    from vitcompress.passes.quantize import Mode, QuantizeConfig, quantize_model
    from vitcompress.runtimes import Precision, Runtime
    from vitcompress.runtimes.openvino import onnx_to_ir

    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ref = (
        ModelRef(f"timm:{name}", None, 10, 32, None, False, {"depth": 2, "patch_size": 8})
        if args.smoke
        else ModelRef(f"timm:{name}")
    )
    loaded = load_model(ref)
    macs = count_macs(loaded)[0]
    print(f"{name}: export, quantize ...", file=sys.stderr, flush=True)
    fp32 = export_model(loaded, workdir / "fp32.onnx", ExportConfig()).path
    onnx_to_ir(fp32, workdir / "fp32.xml")
    torch_ir(loaded, workdir / "torch.xml")
    calib_spec = DataSpec(
        source="synthetic", num_samples=64 if not args.smoke else 8, num_classes=loaded.num_classes
    )
    calibration = load_dataset(calib_spec, loaded.input, loaded.num_classes)
    quantize_model(fp32, workdir / "dynamic.onnx", QuantizeConfig(mode=Mode.dynamic), None)
    built = build_int8(fp32, workdir, calibration)
    ort, ov = Runtime.ort, Runtime.openvino
    rows: list[dict[str, Any]] = [
        {"variant": "ORT fp32", "path": fp32, "runtime": ort, "compute": "fp32", "macs": macs},
        {
            "variant": "OpenVINO fp32 (f32 hint)",
            "path": workdir / "fp32.xml",
            "runtime": ov,
            "hint": Precision.fp32,
            "compute": "fp32_openvino",
            "macs": macs,
        },
        {
            "variant": "OpenVINO default hint",
            "path": workdir / "fp32.xml",
            "runtime": ov,
            "compute": "bf16",
            "macs": macs,
        },
        {
            "variant": "OpenVINO IR converted from torch (f32 hint)",
            "path": workdir / "torch.xml",
            "runtime": ov,
            "hint": Precision.fp32,
            "compute": "fp32_openvino",
            "macs": macs,
        },
        {
            "variant": "OpenVINO IR converted from torch (default hint)",
            "path": workdir / "torch.xml",
            "runtime": ov,
            "compute": "bf16",
            "macs": macs,
        },
        {
            "variant": "ORT quantize_dynamic",
            "path": workdir / "dynamic.onnx",
            "runtime": ort,
            "compute": "int8",
            "macs": macs,
        },
        {
            "variant": "vitcompress static QDQ on ORT",
            "path": built["qdq"],
            "runtime": ort,
            "compute": "int8",
            "macs": macs,
        },
        {
            "variant": "OpenVINO + nncf.quantize INT8",
            "path": built["nncf"],
            "runtime": ov,
            "compute": "int8",
            "macs": macs,
        },
        {
            "variant": "OpenVINO running vitcompress's QDQ file",
            "path": built["qdq_xml"],
            "runtime": ov,
            "compute": "int8",
            "macs": macs,
        },
    ]
    if args.pruned:
        import benchmark

        spec = benchmark._model_spec(ref)
        recipe = benchmark.speed_recipe("prune-kd-int8", spec, args.smoke)
        outcome = benchmark.run_job(
            {
                "threads": args.threads,
                "model": spec,
                "kind": "recipe",
                "name": "prune-kd-int8",
                "recipe": recipe,
                "out": str(workdir / "pruned"),
            },
            workdir,
            "pruned",
        )
        pruned_fp32 = workdir / "pruned" / "model.onnx"
        pruned = build_int8(pruned_fp32, workdir, calibration, prefix="pruned_")
        pmacs = outcome["macs"]
        rows += [
            {
                "variant": f"vitcompress prune-kd-int8 ({pmacs / macs:.0%} MACs) on ORT",
                "path": Path(outcome["onnx"]),
                "runtime": ort,
                "compute": "int8",
                "macs": pmacs,
            },
            {
                "variant": "OpenVINO + nncf.quantize on the same pruned model",
                "path": pruned["nncf"],
                "runtime": ov,
                "compute": "int8",
                "macs": pmacs,
            },
            {
                "variant": "OpenVINO running the pruned QDQ file",
                "path": pruned["qdq_xml"],
                "runtime": ov,
                "compute": "int8",
                "macs": pmacs,
            },
        ]
    print(f"{name}: timing {len(rows)} files interleaved ...", file=sys.stderr, flush=True)
    import os

    rows[0]["load_before"] = os.getloadavg()
    time_rows(rows, args.threads, 1, args.runs, block=10)
    time_rows(rows, args.threads, 32 if not args.smoke else 4, args.runs_b32, block=2)
    rows[0]["load_after"] = os.getloadavg()
    for row in rows:
        floor_ms = row["macs"] / peak[row["compute"]] * 1e3
        row["floor_ms"] = floor_ms
        row["of_floor"] = floor_ms / row["b1"]["p50_ms"]
    return rows


def accuracy_track(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    import benchlib

    from vitcompress.accuracy import evaluate_onnx
    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.models import load_model
    from vitcompress.passes.export import ExportConfig, export_model
    from vitcompress.passes.quantize import Calibration, Mode, QuantizeConfig, quantize_model
    from vitcompress.passes.quantize_openvino import nncf_quantize
    from vitcompress.runtimes import Runtime
    from vitcompress.runtimes.openvino import onnx_to_ir

    workdir.mkdir(parents=True, exist_ok=True)
    ref, source = benchlib.reference(args)
    loaded = load_model(ref)
    fp32 = export_model(loaded, workdir / "fp32.onnx", ExportConfig()).path
    size = 512 if not args.smoke else 32
    calibration = load_dataset(
        DataSpec(source=source, split="train", limit=size), loaded.input, loaded.num_classes
    )
    test = load_dataset(
        DataSpec(source=source, split="test", limit=args.eval_limit if not args.smoke else 100),
        loaded.input,
        loaded.num_classes,
    )
    qdq = workdir / "qdq.onnx"
    cfg = QuantizeConfig(
        preset="cpu-x86-vnni", mode=Mode.static, calibration=Calibration.percentile, calibration_size=size
    )
    quantize_model(fp32, qdq, cfg, calibration)
    onnx_to_ir(qdq, workdir / "qdq.xml")
    nncf_quantize(
        fp32,
        workdir / "nncf.xml",
        QuantizeConfig(runtime="openvino", mode="static", calibration_size=size),
        calibration,
        None,
    )
    ort, ov = Runtime.ort, Runtime.openvino
    rows: list[dict[str, Any]] = [
        {"variant": "ORT fp32", "path": fp32, "runtime": ort},
        {"variant": "vitcompress static QDQ (edge-cpu-int8 settings) on ORT", "path": qdq, "runtime": ort},
        {"variant": "the same QDQ file on OpenVINO", "path": workdir / "qdq.xml", "runtime": ov},
        {
            "variant": "OpenVINO + nncf.quantize INT8 (same 512 images)",
            "path": workdir / "nncf.xml",
            "runtime": ov,
        },
    ]
    for row in rows:
        result = evaluate_onnx(Path(row["path"]), test, threads=args.threads, runtime=row["runtime"])
        row.update(
            top1=result.top1, evaluated_on=f"{result.runtime} {result.runtime_version} {result.precision}"
        )
    time_rows(rows, args.threads, 1, args.runs, block=10)
    print(f"accuracy track: {len(test)} test images", file=sys.stderr)
    return rows


def print_speed(name: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import benchlib

    big = 32 if not args.smoke else 4
    benchlib.table(
        f"{name} at 224, {args.threads} threads, one interleaved run",
        [
            ("variant", lambda r: r["variant"]),
            ("ran on", lambda r: f"{r['ran']['runtime']} {r['ran']['version']} {r['ran']['precision']}"),
            ("p50 ms (b1)", lambda r: f"{r['b1']['p50_ms']:.2f}"),
            ("p90 ms (b1)", lambda r: f"{r['b1']['p90_ms']:.2f}"),
            ("vs ORT fp32", lambda r: f"{r['b1']['vs_first']:.2f}x"),
            (f"img/s (b{big})", lambda r, b=big: f"{r[f'b{b}']['images_per_s']:.1f}"),
            (f"p90 ms (b{big})", lambda r, b=big: f"{r[f'b{b}']['p90_ms']:.1f}"),
            ("floor ms", lambda r: f"{r['floor_ms']:.2f} ({r['compute'].split('_')[0]})"),
            ("of floor", lambda r: f"{r['of_floor']:.0%}"),
        ],
        rows,
    )


def retime(args: argparse.Namespace) -> int:
    """Time the files an earlier run built (its --json) again, with fresh GEMM peaks: for a quieter
    machine than the one the models were built on."""
    import os

    import benchlib

    from vitcompress.runtimes import Precision, Runtime

    previous = json.loads(args.retime.read_text())
    results = benchlib.start(args)
    peak = peaks(args.threads)
    results["peak_macs_per_s"] = peak
    print("measured GEMM peaks, " + ", ".join(f"{k} {v / 1e9:.0f} GMAC/s" for k, v in peak.items()))
    for name in args.models or [k for k, v in previous.items() if isinstance(v, list) and k != "accuracy"]:
        rows = previous[name]
        for row in rows:
            row["runtime"] = Runtime(row["runtime"])
            row["hint"] = Precision(row["hint"]) if row.get("hint") else None
        results[f"{name}_load_before"] = os.getloadavg()
        time_rows(rows, args.threads, 1, args.runs, block=10)
        time_rows(rows, args.threads, 32, args.runs_b32, block=2)
        results[f"{name}_load_after"] = os.getloadavg()
        for row in rows:
            row["floor_ms"] = row["macs"] / peak[row["compute"]] * 1e3
            row["of_floor"] = row["floor_ms"] / row["b1"]["p50_ms"]
        results[name] = rows
        print_speed(name, rows, args)
        print(
            f"load average before/after: {results[f'{name}_load_before']} / {results[f'{name}_load_after']}"
        )
    return benchlib.finish(args, json.loads(json.dumps(results, default=str)))


def main() -> int:
    import benchlib

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="*", default=["deit_small_patch16_224"])
    p.add_argument("--pruned", action="store_true", help="also the prune-kd-int8 rows (minutes per model)")
    p.add_argument("--accuracy", action="store_true", help="also the Fashion-MNIST reference track")
    p.add_argument("--runs", type=int, default=50, help="timed runs per file at batch 1")
    p.add_argument("--runs-b32", type=int, default=8, help="timed runs per file at batch 32")
    p.add_argument("--reference", type=Path, default=None)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path)
    p.add_argument("--retime", type=Path, help="time the files of an earlier run's --json again")
    args = p.parse_args()
    if args.retime:
        return retime(args)
    if args.smoke:
        args.runs, args.runs_b32 = min(args.runs, 10), min(args.runs_b32, 3)
        args.models = args.models and ["vit_tiny_patch16_224"]
    results = benchlib.start(args)
    peak = (
        peaks(args.threads)
        if not args.smoke
        else {k: 1e11 for k in ("fp32", "int8", "bf16", "fp32_openvino")}
    )
    results["peak_macs_per_s"] = peak
    print(
        "measured GEMM peaks, "
        + ", ".join(f"{k} {v / 1e9:.0f} GMAC/s" for k, v in peak.items())
        + f" ({args.threads} threads)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for name in args.models:
            rows = speed_model(name, args, workdir / name, peak)
            results[name] = rows
            big = 32 if not args.smoke else 4
            benchlib.table(
                f"{name} at 224, {args.threads} threads, one interleaved run",
                [
                    ("variant", lambda r: r["variant"]),
                    (
                        "ran on",
                        lambda r: f"{r['ran']['runtime']} {r['ran']['version']} {r['ran']['precision']}",
                    ),
                    ("p50 ms (b1)", lambda r: f"{r['b1']['p50_ms']:.2f}"),
                    ("p90 ms (b1)", lambda r: f"{r['b1']['p90_ms']:.2f}"),
                    ("vs ORT fp32", lambda r: f"{r['b1']['vs_first']:.2f}x"),
                    (f"img/s (b{big})", lambda r, b=big: f"{r[f'b{b}']['images_per_s']:.1f}"),
                    (f"p90 ms (b{big})", lambda r, b=big: f"{r[f'b{b}']['p90_ms']:.1f}"),
                    ("floor ms", lambda r: f"{r['floor_ms']:.2f} ({r['compute'].split('_')[0]})"),
                    ("of floor", lambda r: f"{r['of_floor']:.0%}"),
                ],
                rows,
            )
        if args.accuracy:
            rows = accuracy_track(args, workdir / "accuracy")
            results["accuracy"] = rows
            benchlib.table(
                "Fashion-MNIST reference, test split",
                [
                    ("variant", lambda r: r["variant"]),
                    ("ran on", lambda r: r["evaluated_on"]),
                    ("top-1", lambda r: f"{r['top1']:.2%}"),
                    ("Δ vs fp32", lambda r, b=rows[0]: f"{100 * (r['top1'] - b['top1']):+.2f}"),
                    ("p50 ms (b1)", lambda r: f"{r['b1']['p50_ms']:.3f}"),
                    ("vs ORT fp32", lambda r: f"{r['b1']['vs_first']:.2f}x"),
                ],
                rows,
            )
    return benchlib.finish(args, json.loads(json.dumps(results, default=str)))


if __name__ == "__main__":
    sys.exit(main())
