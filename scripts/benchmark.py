"""vitcompress against what a user would pick instead: one command, one run, interleaved timings.

    python scripts/benchmark.py                     # both tracks (about 21 min on 2 cores)
    python scripts/benchmark.py --track accuracy    # Fashion-MNIST reference only
    python scripts/benchmark.py --smoke             # tiny models, a minute (the test suite runs it)

Rows of each track:
  - ORT fp32: the float32 export, as the baseline;
  - ORT quantize_dynamic: onnxruntime's one-liner on that export;
  - torch-pruning magnitude: torch-pruning's own ViT recipe (MetaPruner, group L1 magnitude, head
    dims and channels, uniform) searched to 50% MACs, no recovery training;
  - each vitcompress CPU recipe (recipes/edge-cpu-int8, prune-kd-int8, lowrank-kd) run as is on the
    reference. On the speed track (random-init timm DeiTs at 224) the recipes run without their
    distillation step and calibrate on synthetic images: only speed is measured there.
Every compression runs in its own process so its peak memory (RSS) and wall time are its own (forked
from one process that has imported torch, timm and onnxruntime once: see `forker`).
All final ONNX files of a track are timed together (blocks of warm runs, rotating order) at batch 1
and at batch 32. The compute floor of a row is its MACs divided by this CPU's measured peak for the
row's precision (a large ONNX Runtime GEMM: MatMul in fp32, MatMulInteger in int8) with the same
threads; the achieved fraction is floor / p50.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["edge-cpu-int8", "prune-kd-int8", "lowrank-kd"]
INT8_RECIPES = {"edge-cpu-int8", "prune-kd-int8"}


# --------------------------------------------------------------------------- worker (one compression)


def _ref(spec: dict[str, Any]):  # type: ignore[no-untyped-def]
    from vitcompress.models import ModelRef

    return ModelRef(
        spec["source"],
        Path(spec["checkpoint"]) if spec.get("checkpoint") else None,
        spec.get("num_classes"),
        spec.get("img_size"),
        spec.get("in_chans"),
        False,
        dict(spec.get("kwargs") or {}),
    )


def _tp_magnitude(job: dict[str, Any]) -> dict[str, Any]:
    """torch-pruning's timm ViT example, searched (bisection on its pruning_ratio) to the MAC target."""
    import torch
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    from vitcompress.models import load_model
    from vitcompress.models.stats import count_macs
    from vitcompress.passes.export import ExportConfig, export_model

    torch.manual_seed(0)
    original = load_model(_ref(job["model"]))
    base_macs, _ = count_macs(original)
    target = job["target_macs"]

    def pruned(ratio: float):  # type: ignore[no-untyped-def]
        loaded = copy.deepcopy(original)
        model = loaded.model.eval()
        heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)}
        pruner = tp.pruner.MetaPruner(
            model,
            loaded.example_input(1),
            global_pruning=False,
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=[model.head],
            num_heads=heads,
            prune_head_dims=True,
            prune_num_heads=False,
            round_to=8,
        )
        pruner.step()
        for m in model.modules():
            if isinstance(m, Attention):
                m.num_heads = pruner.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                m.attn_dim = m.num_heads * m.head_dim
        return loaded, count_macs(loaded)[0] / base_macs

    lo, hi, best = 0.0, 0.8, None
    for _ in range(8):
        mid = (lo + hi) / 2
        loaded, ratio = pruned(mid)
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (loaded, ratio)
        if abs(ratio - target) <= 0.01:
            break
        lo, hi = (mid, hi) if ratio > target else (lo, mid)
    assert best is not None
    loaded, ratio = best
    out = Path(job["out"])
    export_model(loaded, out, ExportConfig())
    return {"onnx": str(out), "macs": int(ratio * base_macs), "macs_ratio": ratio}


def _recipe(job: dict[str, Any]) -> dict[str, Any]:
    from vitcompress.errors import BudgetExceededError
    from vitcompress.pipeline import run_recipe
    from vitcompress.recipe import validate_recipe

    recipe = validate_recipe(job["recipe"], None, job["name"])
    out = Path(job["out"])
    try:
        result = run_recipe(recipe, out)
        failures: list[str] = []
        ledger, onnx = result.ledger, result.state.onnx_path
        macs = next(r.macs for r in reversed(ledger) if r.macs is not None)
    except BudgetExceededError as err:  # the reports are written: read the outcome from them
        failures = [err.message]
        report = json.loads((out / "report.json").read_text())
        onnx = report["final_onnx"]
        macs = next(r["macs"] for r in reversed(report["ledger"]) if r["macs"] is not None)
    return {"onnx": str(onnx), "macs": macs, "budget_failures": failures}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process's own address space;
    getrusage's ru_maxrss is not used because Linux carries the parent's peak into a forked child."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    os.environ.setdefault("OMP_NUM_THREADS", str(job["threads"]))
    import torch

    torch.set_num_threads(job["threads"])
    start = time.perf_counter()
    if job["kind"] == "export":
        from vitcompress.models import load_model
        from vitcompress.models.stats import count_macs
        from vitcompress.passes.export import ExportConfig, export_model

        torch.manual_seed(0)
        loaded = load_model(_ref(job["model"]))
        export_model(loaded, Path(job["out"]), ExportConfig())
        result = {"onnx": job["out"], "macs": count_macs(loaded)[0]}
    elif job["kind"] == "dynamic":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(job["source"], job["out"])
        result = {"onnx": job["out"]}
    elif job["kind"] == "tp-magnitude":
        result = _tp_magnitude(job)
    else:
        result = _recipe(job)
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    Path(job["result"]).write_text(json.dumps(result))
    return 0


# The modules every job imports. A fresh interpreter spends about 4 s importing them on 2 cores
# (torch 1.9 s, timm with torchvision 2 s more): 6 jobs a track paid that 6 times.
PRELOAD = (
    "torch",
    "timm",
    "onnx",
    "onnxruntime",
    "onnxruntime.quantization",
    "torch_pruning",
    "vitcompress.pipeline",
)


def forker(threads: int) -> None:
    """The job starter: imports PRELOAD once, then for every job path read from stdin forks a child
    that runs `worker` on it (stderr into JOB.log beside the job file) and answers its exit status.
    Each job thus still runs in a process of its own that starts with just these imports, as a fresh
    one would: its peak RSS (VmHWM starts at the imports' RSS, copied at fork) and wall time are its
    own. Nothing here runs a torch op or opens an ONNX Runtime session, so no thread pool exists yet
    when a child is forked."""
    import importlib
    import traceback

    os.environ["OMP_NUM_THREADS"] = str(threads)
    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        job_path = Path(line.strip())
        pid = os.fork()
        if pid == 0:  # the job's process
            code = 1
            try:
                log = os.open(job_path.with_suffix(".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)  # stdout too: it is the pipe that answers the parent
                os.dup2(log, 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                code = worker(job_path)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


class Jobs:
    """Runs jobs through one `forker` process, started on first use."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.process: subprocess.Popen[str] | None = None

    def run(self, job_path: Path) -> int:
        if self.process is None:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--forker", "--threads", str(self.threads)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{job_path}\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise SystemExit(f"the job starter died (exit {self.process.wait()}) running {job_path}")
        return int(answer)

    def close(self) -> None:
        if self.process is not None:
            self.process.communicate()  # EOF on its stdin: it exits
            self.process = None


def run_job(job: dict[str, Any], workdir: Path, name: str, jobs: Jobs) -> dict[str, Any]:
    job = {**job, "result": str(workdir / f"{name}.result.json")}
    job_path = workdir / f"{name}.job.json"
    job_path.write_text(json.dumps(job, default=str))
    print(f"  {name} ...", file=sys.stderr, flush=True)
    code = jobs.run(job_path)
    if code != 0:
        log = job_path.with_suffix(".log")
        raise SystemExit(f"{name} failed (exit {code}):\n{log.read_text()[-4000:] if log.is_file() else ''}")
    return json.loads(Path(job["result"]).read_text())


# --------------------------------------------------------------------------- the tracks


def _model_spec(ref) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {
        "source": ref.source,
        "checkpoint": str(ref.checkpoint) if ref.checkpoint else None,
        "num_classes": ref.num_classes,
        "img_size": ref.img_size,
        "in_chans": ref.in_chans,
        "kwargs": dict(ref.kwargs or {}),
    }


def _load_raw(name: str) -> dict[str, Any]:
    from vitcompress.recipe import read_recipe_data

    path = ROOT / "recipes" / f"{name}.yaml"
    return read_recipe_data(path.read_text(), str(path))


def accuracy_recipe(name: str, spec: dict[str, Any], source: str, smoke: bool) -> dict[str, Any]:
    """The ready recipe on the reference model; with --smoke, cut to seconds."""
    raw = _load_raw(name)
    raw["model"] = {k: v for k, v in spec.items() if v is not None}
    if smoke:
        for split in ("train", "eval", "calibration"):
            if split in raw.get("data", {}):
                raw["data"][split]["source"] = source
                raw["data"][split]["limit"] = {"train": 256, "eval": 100, "calibration": 64}[split]
        for cfg in raw["passes"]:
            if cfg["kind"] == "distill":
                cfg.update(steps=3, batch_size=16, eval_every=None)
            if cfg["kind"] in ("prune", "lowrank"):
                cfg["calibration_batches"] = 2
            if cfg["kind"] == "quantize":
                cfg.update(calibration_size=32, max_top1_drop=None)
            if cfg["kind"] == "validate":
                cfg.update(runs=5, batch_sizes=[1])
        raw.pop("budgets", None)
    return raw


def speed_recipe(name: str, spec: dict[str, Any], smoke: bool) -> dict[str, Any]:
    """The ready recipe on a random-init model: no distillation, synthetic calibration, no gates."""
    raw = _load_raw(name)
    raw["model"] = {k: v for k, v in spec.items() if v is not None}
    classes = spec.get("num_classes") or 1000
    raw["data"] = {"calibration": {"source": "synthetic", "num_samples": 64, "num_classes": classes}}
    passes = []
    for cfg in raw["passes"]:
        if cfg["kind"] in ("distill", "validate"):
            continue
        if cfg["kind"] in ("prune", "lowrank"):
            cfg.update(calibration_batches=2, batch_size=8)
        if cfg["kind"] == "quantize":
            cfg.update(calibration_size=32 if smoke else 64, max_top1_drop=None)
        passes.append(cfg)
    raw["passes"] = passes
    raw.pop("budgets", None)
    return raw


def track(
    label: str,
    spec: dict[str, Any],
    recipes: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    workdir: Path,
    test: Any = None,  # a vitcompress Dataset: top-1 per row (the accuracy track)
) -> list[dict[str, Any]]:
    from vitcompress.accuracy import evaluate_onnx
    from vitcompress.runtime import onnx_size
    from vitcompress.timing import bench_models

    workdir.mkdir(parents=True, exist_ok=True)
    common = {"threads": args.threads, "model": spec}
    print(f"{label}:", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    fp32 = run_job(
        {**common, "kind": "export", "out": str(workdir / "fp32.onnx")}, workdir, "fp32", args.jobs
    )
    base_macs = fp32["macs"]
    rows.append({"variant": "ORT fp32", "precision": "fp32", **fp32})
    dynamic = run_job(
        {**common, "kind": "dynamic", "source": fp32["onnx"], "out": str(workdir / "dynamic.onnx")},
        workdir,
        "dynamic",
        args.jobs,
    )
    rows.append({"variant": "ORT quantize_dynamic", "precision": "int8", "macs": base_macs, **dynamic})
    magnitude = run_job(
        {**common, "kind": "tp-magnitude", "target_macs": 0.5, "out": str(workdir / "tp.onnx")},
        workdir,
        "tp-magnitude",
        args.jobs,
    )
    rows.append({"variant": "torch-pruning magnitude 50% MACs", "precision": "fp32", **magnitude})
    for name, raw in recipes.items():
        outcome = run_job(
            {**common, "kind": "recipe", "name": name, "recipe": raw, "out": str(workdir / name)},
            workdir,
            name,
            args.jobs,
        )
        precision = "int8" if name in INT8_RECIPES else "fp32"
        rows.append({"variant": f"vitcompress {name}", "precision": precision, **outcome})
    rows[0]["wall_s"] = 0.0  # the baseline export is not a compression

    paths = [Path(r["onnx"]) for r in rows]
    print("  timing (interleaved) ...", file=sys.stderr, flush=True)
    b1 = bench_models(paths, threads=args.threads, batch_sizes=[1], warmup=5, runs=args.runs)
    b32 = bench_models(paths, threads=args.threads, batch_sizes=[32], warmup=2, runs=args.runs_b32, block=2)
    peaks = args.peaks
    dynamic_p50 = b1.find(str(paths[1]), 1).p50_ms
    for row, path in zip(rows, paths, strict=True):
        one, many = b1.find(str(path), 1), b32.find(str(path), 32)
        floor_ms = row["macs"] / peaks[row["precision"]] * 1e3
        row.update(
            p50_ms=one.p50_ms,
            p90_ms=one.p90_ms,
            speedup_vs_fp32=one.speedup_vs_first,
            speedup_vs_dynamic=dynamic_p50 / one.p50_ms,
            ips_b32=many.throughput_ips,
            size_mb=onnx_size(path) / 1e6,
            floor_ms=floor_ms,
            floor_fraction=floor_ms / one.p50_ms,
        )
        if test is not None:
            row["top1"] = evaluate_onnx(path, test, threads=args.threads).top1
    if test is not None:
        for row in rows:
            row["drop_points"] = 100 * (rows[0]["top1"] - row["top1"])
    return rows


def print_table(title: str, rows: list[dict[str, Any]], accuracy: bool) -> None:
    import benchlib

    columns = [("variant", lambda r: r["variant"])]
    if accuracy:
        columns += [
            ("top-1", lambda r: f"{r['top1']:.2%}"),
            ("Δ top-1", lambda r: f"{-r['drop_points']:+.2f}"),
        ]
    columns += [
        ("p50 ms (b1)", lambda r: f"{r['p50_ms']:.3f}"),
        ("p90 ms (b1)", lambda r: f"{r['p90_ms']:.3f}"),
        ("vs fp32", lambda r: f"{r['speedup_vs_fp32']:.2f}x"),
        ("vs dynamic", lambda r: f"{r['speedup_vs_dynamic']:.2f}x"),
        ("img/s (b32)", lambda r: f"{r['ips_b32']:.0f}"),
        ("ONNX MB", lambda r: f"{r['size_mb']:.2f}"),
        ("MMACs", lambda r: f"{r['macs'] / 1e6:.1f}"),
        ("floor ms", lambda r: f"{r['floor_ms']:.3f} ({r['precision']})"),
        ("of floor", lambda r: f"{r['floor_fraction']:.0%}"),
        ("compress s", lambda r: f"{r['wall_s']:.0f}"),
        ("peak RSS MB", lambda r: f"{r['peak_rss_mb']:.0f}"),
    ]
    benchlib.table(title, columns, rows)


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals: best recipe within 1 point, INT8-only drop."""
    ours = [r for r in rows if r["variant"].startswith("vitcompress") and r["drop_points"] <= 1.0]
    best = max(ours, key=lambda r: r["speedup_vs_fp32"]) if ours else None
    int8 = next(r for r in rows if r["variant"] == "vitcompress edge-cpu-int8")
    return {
        "best_within_1_point": best["variant"] if best else None,
        "best_speedup_vs_fp32": best["speedup_vs_fp32"] if best else None,
        "best_speedup_vs_dynamic": best["speedup_vs_dynamic"] if best else None,
        "int8_only_drop_points": int8["drop_points"],
    }


def main() -> int:
    import benchlib

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--forker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--track", choices=["accuracy", "speed", "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model at batch 1")
    parser.add_argument("--runs-b32", type=int, default=10, help="timed runs per model at batch 32")
    parser.add_argument(
        "--speed-models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"]
    )
    parser.add_argument(
        "--reference", type=Path, default=None, help="reference model directory (default: cache)"
    )
    parser.add_argument("--eval-limit", type=int, default=None, help="test images (default: all 10k)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, seconds (for the test suite)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the models here (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, help="write raw results here")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.forker:
        forker(args.threads)
        return 0
    if args.smoke:
        args.runs, args.runs_b32 = min(args.runs, 10), min(args.runs_b32, 5)

    from vitcompress.timing import gemm_peak

    results = benchlib.start(args)
    # the best of three measurements, before any model is built (one alone has come out 25% low)
    args.peaks = {p: max(gemm_peak(p, args.threads) for _ in range(3)) for p in ("fp32", "int8")}
    results["peak_macs_per_s"] = args.peaks
    print(
        f"measured GEMM peak, {args.threads} threads: fp32 {args.peaks['fp32'] / 1e9:.1f} GMAC/s, "
        f"int8 {args.peaks['int8'] / 1e9:.1f} GMAC/s",
    )
    args.jobs = Jobs(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _tracks(args, results, args.workdir or Path(tmp))
        finally:
            args.jobs.close()
    return benchlib.finish(args, results)


def _tracks(args: argparse.Namespace, results: dict[str, Any], workdir: Path) -> None:
    import benchlib

    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.models import ModelRef, load_model

    if args.track in ("accuracy", "all"):
        ref, source = benchlib.reference(args)
        spec = _model_spec(ref)
        loaded = load_model(ref)
        test = load_dataset(
            DataSpec(source=source, split="test", limit=args.eval_limit if not args.smoke else 100),
            loaded.input,
            loaded.num_classes,
        )
        recipes = {name: accuracy_recipe(name, spec, source, args.smoke) for name in RECIPES}
        rows = track("accuracy track", spec, recipes, args, workdir / "accuracy", test)
        results["accuracy"] = {"rows": rows, "goals": goals(rows), "test_images": len(test)}
        print_table(
            f"Accuracy track: {ref.source} reference, {source} test ({len(test)} images), "
            f"ORT CPU, {args.threads} threads",
            rows,
            accuracy=True,
        )
        print(f"\ngoals: {json.dumps(results['accuracy']['goals'])}")
    if args.track in ("speed", "all"):
        results["speed"] = {}
        models = ["vit_tiny_patch16_224"] if args.smoke else args.speed_models
        for name in models:
            ref = (
                ModelRef(f"timm:{name}", None, 10, 32, None, False, {"depth": 2, "patch_size": 8})
                if args.smoke
                else ModelRef(f"timm:{name}")
            )
            spec = _model_spec(ref)
            recipes = {r: speed_recipe(r, spec, args.smoke) for r in RECIPES}
            rows = track(f"speed track {name}", spec, recipes, args, workdir / name)
            results["speed"][name] = rows
            print_table(
                f"Speed track: {name} (random init, 224), ORT CPU, {args.threads} threads", rows, False
            )


if __name__ == "__main__":
    sys.exit(main())
