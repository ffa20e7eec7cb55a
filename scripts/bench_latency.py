"""Benchmarks of the latency model and of compressing to a latency (results in BENCHMARKS.md).

  python scripts/bench_latency.py error --model timm:deit_small_patch16_224 --runtime ort --precision fp32
      profile the target afresh (timed), build N pruned configurations (seeded, per-block shapes
      differ), export/convert each, time them interleaved, and report predicted vs measured p50.
      --lowrank 0.5: every configuration's MLPs then factorized as `lowrank --rank-fraction 0.5` does.
      --kind uneven: tune-like plans at 3-8x and uniform ones down to 1/8 instead (default: even).
      --diagnose: also small block shapes, timed alone and as whole models (where the error comes from).
  python scripts/bench_latency.py tune --model reference --speedups 2 4 6 [--lowrank none 0.5]
      run `vitcompress tune` for each target speedup and report the first measured attempt.
  python scripts/bench_latency.py frontier --macs 0.35 0.5 0.7 --uniform 0.25 0.5
      on the Fashion-MNIST reference: MAC-target, latency-aware (aimed at the MAC plans' p50s) and
      uniform plans, every architecture timed in one joint run; top-1 after the same KD (MAC and
      latency-aware) and before KD (latency-aware and uniform), each frontier interpolated at the
      other's latencies.
  python scripts/bench_latency.py versus
      on the Fashion-MNIST reference: MAC-target pruning + KD against latency-aware pruning + KD at
      the latency the MAC plan measured (same KD budget), and latency-aware plans against uniform
      pruning per millisecond (before KD).

Run each under the shared lock (flock /tmp/heavy.lock ...); JSON goes to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def load(model: str):  # type: ignore[no-untyped-def]
    from vitcompress.models import ModelRef, load_model

    if model == "reference":
        from train_reference import default_dir, model_ref

        return load_model(model_ref(default_dir() / "model.safetensors"))
    return load_model(ModelRef(model))


def configurations(loaded, count: int, seed: int) -> list[list[tuple[int, int, int]]]:  # type: ignore[no-untyped-def]
    """Seeded per-block shapes, the `even` kind: a keep level per configuration (0.25-0.95),
    jittered +-30% per block, head size the full one or 8-16 below it."""
    from vitcompress.latency.profile import widest

    heads, head_dim, mlp = widest(loaded)
    depth = len(loaded.adapter.blocks())
    rng = random.Random(seed)
    out = []
    for n in range(count):
        keep = 0.25 + 0.7 * n / max(1, count - 1)
        blocks = []
        for _ in range(depth):
            k = min(1.0, max(0.1, keep * rng.uniform(0.7, 1.3)))
            h = max(1, round(heads * k))
            d = head_dim - 8 * rng.choice([0, 0, 1, 2]) if head_dim > 24 else head_dim
            m = max(16, round(mlp * k / 16) * 16)
            blocks.append((h, d, m))
        out.append(blocks)
    return out


def _macs(blocks: list[tuple[int, int, int]], embed: int, tokens: int) -> float:
    """Multiply-accumulates per image of the blocks (qkv, projection, attention matmuls, MLP)."""
    return sum(tokens * (4 * embed * h * d + 2 * tokens * h * d + 2 * embed * m) for h, d, m in blocks)


def uneven_configurations(loaded, count: int, seed: int) -> list[list[tuple[int, int, int]]]:  # type: ignore[no-untyped-def]
    """Seeded per-block shapes, the `uneven` kind: what `tune` plans at 3-8x. About 7 in 10 are
    uneven (1-3 blocks kept large, 3-6 heads, the rest at 1-2 heads of size 8-48 and MLP 2-50% of the
    full width, all multiples of 8), each drawn until its blocks' MACs are within 15% of a target
    MAC speedup (3x to 8x, spread evenly);
    the others uniform at 1/4 down to 1/8 of the attention width and MLP (a minimum of one head)."""
    from vitcompress.latency.profile import widest

    heads, head_dim, mlp = widest(loaded)
    embed, tokens = loaded.adapter.embed_dim, loaded.adapter.num_tokens
    depth = len(loaded.adapter.blocks())
    full = _macs([(heads, head_dim, mlp)] * depth, embed, tokens)
    rng = random.Random(seed)

    def eights(lo: float, hi: float, cap: int) -> int:
        return min(cap, max(8, round(rng.uniform(lo, hi) / 8) * 8))

    uniform_count = max(1, round(count * 0.3)) if count > 1 else 0
    keeps = [1 / 4 + (1 / 8 - 1 / 4) * k / max(1, uniform_count - 1) for k in range(uniform_count)]
    out = []
    for k in keeps:
        h = max(1, round(heads * k))
        d = min(head_dim, max(8, round(heads * head_dim * k / h / 8) * 8))
        out.append([(h, d, max(8, round(mlp * k / 8) * 8))] * depth)
    uneven = count - len(out)
    targets = [3 + 5 * n / max(1, uneven - 1) for n in range(uneven)]  # MAC speedups 3x..8x, evenly
    for target in targets:
        # the draw whose blocks' MACs come closest to the target (within 15% stops; a small model,
        # where one large block alone is more than 1/target, gets its closest of 2000 draws)
        best: tuple[float, list[tuple[int, int, int]]] = (float("inf"), [])
        for _ in range(2000):
            large = set(rng.sample(range(depth), min(depth - 1, rng.choice([1, 1, 2, 3]))))
            small_dim, small_mlp = rng.uniform(16, 0.75 * head_dim), rng.uniform(0.05, 0.5) * mlp
            blocks = [
                (rng.randint(max(1, heads // 2), heads), eights(head_dim / 2, head_dim, head_dim),
                 eights(0.6 * mlp, mlp, mlp))
                if i in large
                else (rng.choice([1, 1, 2]), eights(8, small_dim, head_dim), eights(0.02 * mlp, small_mlp, mlp))
                for i in range(depth)
            ]  # fmt: skip
            miss = abs(full / _macs(blocks, embed, tokens) / target - 1)
            best = min(best, (miss, blocks))
            if miss <= 0.15:
                break
        out.append(best[1])
    return out


def diagnostic_shapes(loaded) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    """Block shapes `--diagnose` times alone and as whole uniform models: tune's small blocks (one
    or two heads of size 8-48, narrow MLPs, some below the table's grid) and one large block."""
    from vitcompress.latency.profile import widest

    heads, head_dim, mlp = widest(loaded)
    small = [(1, 8, mlp // 48), (1, 16, mlp // 16), (2, 16, mlp // 8), (1, 32, mlp // 4), (1, 48, mlp // 2)]
    shapes = [(h, min(d, head_dim), max(8, m // 8 * 8)) for h, d, m in small]
    return [*shapes, (heads, min(32, head_dim), max(8, round(0.9 * mlp / 8) * 8))]


def cmd_error(args: argparse.Namespace) -> dict:
    from vitcompress.latency.plan import factorized_copy
    from vitcompress.latency.predict import mlp_ranks
    from vitcompress.latency.profile import (
        cut,
        profile_target,
        reshaped,
        shaped,
        target_file,
        time_files,
        uniform,
    )
    from vitcompress.latency.table import TargetSpec, load_table
    from vitcompress.timing import Environment

    loaded = load(args.model)
    spec = TargetSpec(args.runtime, args.precision, args.threads, 1)
    start = time.perf_counter()
    if args.table is not None:  # a table profiled earlier: no profile cost, drift since then
        table = load_table(args.table)
    else:
        table = profile_target(loaded, spec, runs=args.profile_runs)
        table.save()
    profile_s = time.perf_counter() - start
    draw = {"even": configurations, "uneven": uneven_configurations}[args.kind]
    configs = draw(loaded, args.configs, args.seed)
    shapes = diagnostic_shapes(loaded) if args.diagnose else []
    ranks = []
    with tempfile.TemporaryDirectory() as scratch:
        # the original first: how far the machine drifted since the profile (same model, same file kind)
        files = [target_file(loaded, spec, Path(scratch) / "original", "original")]
        for i, blocks in enumerate(configs):
            model = reshaped(loaded, blocks)
            if args.lowrank is not None:
                model = factorized_copy(model, args.lowrank)
            ranks.append(mlp_ranks(model))
            files.append(target_file(model, spec, Path(scratch) / f"c{i}", f"c{i}"))
            del model
        if shapes:  # the zero-block graph, then each shape as a one-block graph and as a whole model
            one_block = cut(loaded, 1)
            files.append(target_file(cut(loaded, 0), spec, Path(scratch) / "fixed", "fixed"))
            for s in shapes:
                name = "x".join(map(str, s))
                files.append(target_file(shaped(one_block, *s), spec, Path(scratch) / f"b{name}", f"b{name}"))
                files.append(target_file(uniform(loaded, *s), spec, Path(scratch) / f"u{name}", f"u{name}"))
        original_now, *measured = time_files(files, spec, args.runs)
    measured, extra = measured[: len(configs)], measured[len(configs) :]
    profiled = table.anchors[0]["measured_ms"]
    drift = original_now / profiled
    rows = []
    for blocks, mlp, ms in zip(configs, ranks, measured, strict=True):
        predicted = table.predict_ms(blocks, mlp)
        rows.append({
            "blocks": blocks, "mlp_ranks": mlp, "raw_ms": table.raw_ms(blocks, mlp), "predicted_ms": predicted,
            "measured_ms": ms, "speedup": original_now / ms,
            "error": (predicted - ms) / ms, "error_drift_corrected": (predicted * drift - ms) / ms,
        })  # fmt: skip
    diagnosis = []
    if shapes:
        depth = len(loaded.adapter.blocks())
        fixed_now, pairs = extra[0], extra[1:]
        for n, s in enumerate(shapes):
            probe_ms, whole_ms = pairs[2 * n], pairs[2 * n + 1]
            predicted = table.predict_ms([s] * depth)
            diagnosis.append({
                "shape": s,
                "table_block_ms": table.block_ms(*s),  # the one-block graph's block, interpolated
                "probe_block_ms": probe_ms - fixed_now,  # the same, timed now at this very shape
                "in_model_block_ms": (whole_ms - fixed_now) / depth,  # a block inside the whole model
                "predicted_block_ms": (predicted - table.fixed_ms) / depth,  # what the calibration makes of it
                "whole_predicted_ms": predicted, "whole_measured_ms": whole_ms,
                "whole_error_drift_corrected": (predicted * drift - whole_ms) / whole_ms,
            })  # fmt: skip
        diagnosis.insert(0, {"fixed_ms_table": table.fixed_ms, "fixed_ms_now": fixed_now})

    env = Environment.detect()
    return {
        "model": args.model,
        "kind": args.kind,
        "lowrank": args.lowrank,
        "lowrank_probes": {
            "ranks": table.lowrank_ranks,
            "ms": table.lowrank_ms,
            "overhead_ms": [table.factorization_ms(r) for r in table.lowrank_ranks],
        },
        "target": spec.label(),
        "runtime_version": table.key.target["runtime_version"],
        "cpu": env.cpu_model,
        "profile_s": profile_s,
        "original_ms_at_profile": profiled,
        "original_ms_now": original_now,
        "calibration": {"points": [list(p) for p in table.calibration], "anchors": table.anchors},
        "median_abs_error": statistics.median([abs(r["error"]) for r in rows]),
        "median_abs_error_drift_corrected": statistics.median(
            [abs(r["error_drift_corrected"]) for r in rows]
        ),
        "max_abs_error": max(abs(r["error"]) for r in rows),
        "max_abs_error_drift_corrected": max(abs(r["error_drift_corrected"]) for r in rows),
        "drift": drift,
        "diagnosis": diagnosis,
        "configs": rows,
    }


def cmd_tune(args: argparse.Namespace) -> dict:
    from typer.testing import CliRunner

    from vitcompress.cli import app

    if args.model == "reference":
        from train_reference import IMG_SIZE, IN_CHANS, KWARGS, NUM_CLASSES, SOURCE, default_dir

        model_args = [SOURCE, "--checkpoint", str(default_dir() / "model.safetensors"), "--num-classes",
                      str(NUM_CLASSES), "--img-size", str(IMG_SIZE), "--in-chans", str(IN_CHANS)]  # fmt: skip
        model_args += [a for k, v in KWARGS.items() for a in ("--model-kwargs", f"{k}={v}")]
    else:  # random-init timm model: latency only; synthetic data feeds importance, KD and the proxy
        model_args = [args.model, "--num-classes", "10"]
    results = []
    for speedup in args.speedups:
        out = Path(args.work) / f"tune-{speedup:g}x"
        cmd = ["tune", *model_args, "--out", str(out), "--target-speedup", str(speedup), "--max-top1-drop",
               str(args.max_drop), "--data", args.data, "--eval-limit", str(args.eval_limit),
               "--data-limit", str(args.data_limit), "--distill-steps", str(args.distill_steps), "--json"]  # fmt: skip
        cmd += [a for choice in args.lowrank or [] for a in ("--lowrank", choice)]
        cmd += [a for rt in args.runtime or [] for a in ("--runtime", rt)]
        cmd += [a for p in args.precision or [] for a in ("--precision", p)]
        cmd += ["--remeasure", str(args.remeasure)]
        start = time.perf_counter()
        result = CliRunner().invoke(app, cmd, catch_exceptions=False)
        report = json.loads((out / "tune.json").read_text())
        first = report["attempts"][0] if report["attempts"] else {}
        goal = first.get("goal_ms") or report["goal_ms"]  # speedup goals: the same-run original
        results.append({
            "speedup": speedup, "goal_ms": goal, "exit_code": result.exit_code,
            "first_attempt": first,
            "first_within_10pct": bool(first) and abs(first["measured_ms"] - goal) <= 0.1 * goal,
            "first_meets": bool(first) and first["measured_ms"] <= goal * 1.1,
            "first_lowrank": first.get("lowrank"), "first_runtime": first.get("runtime"),
            "first_pruned_ms": first.get("pruned_ms"), "first_prune_tries": first.get("prune_tries"),
            "candidates": report["candidates"],
            "attempts": len(report["attempts"]), "met": report["met"], "wall_s": time.perf_counter() - start,
        })  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    return {"model": args.model, "results": results}


class Reference:
    """Recipes on the Fashion-MNIST reference, run with `compress`, and joint timings of their ONNX files."""

    def __init__(self, args: argparse.Namespace) -> None:
        from train_reference import IMG_SIZE, IN_CHANS, KWARGS, NUM_CLASSES, SOURCE, default_dir

        from vitcompress.latency.table import TargetSpec

        ckpt = default_dir() / "model.safetensors"
        self.model = {"source": SOURCE, "checkpoint": str(ckpt), "num_classes": NUM_CLASSES,
                      "img_size": IMG_SIZE, "in_chans": IN_CHANS, "kwargs": KWARGS}  # fmt: skip
        self.args, self.work = args, Path(args.work)
        self.spec = TargetSpec(batch=args.batch)
        self.data = {"train": {"source": "fashion-mnist"}, "eval": {"source": "fashion-mnist", "split": "test"},
                     "calibration": {"source": "fashion-mnist", "limit": 2000}}  # fmt: skip
        self.validate = {"kind": "validate", "runs": 30, "batch_sizes": [args.batch]}
        self.common = {"kind": "prune", "importance": "hessian", "structures": ["heads", "head_dim", "mlp"],
                       "calibration_batches": 16}  # fmt: skip
        self.distill = {"kind": "distill", "steps": args.distill_steps, "batch_size": 128, "lr": 0.001,
                        "augment": "shift-flip", "eval_limit": 2000, "teacher": dict(self.model)}  # fmt: skip

    def run(self, name: str, model: dict, passes: list[dict]) -> Path:
        import yaml
        from typer.testing import CliRunner

        from vitcompress.cli import app

        recipe = {"version": 1, "name": name, "model": model, "data": self.data, "passes": passes}
        path = self.work / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe))
        result = CliRunner().invoke(
            app, ["compress", "--recipe", str(path), "--out", str(self.work / name), "--overwrite"]
        )
        assert result.exit_code == 0, result.output[-2000:]
        return self.work / name

    def prune(self, name: str, prune: dict) -> Path:
        return self.run(name, self.model, [prune, {"kind": "export"}, self.validate])

    def kd(self, pruned: Path) -> Path:
        return self.run(
            f"{pruned.name}-kd", {"source": str(pruned)}, [self.distill, {"kind": "export"}, self.validate]
        )

    @staticmethod
    def ledger(d: Path) -> list[dict]:
        return json.loads((d / "report.json").read_text())["ledger"]

    def top1(self, d: Path) -> float:
        return float(next(r for r in self.ledger(d) if r["kind"] == "validate")["top1"])

    def plan(self, d: Path) -> dict:
        prune = next(r for r in self.ledger(d) if r["kind"] == "prune")["details"]
        return {"macs_ratio": prune["macs_ratio"], "blocks": prune["blocks"]}

    def joint(self, files: list[Path]) -> list[float]:
        """p50 of each file timed together, median over --rounds interleaved runs."""
        from vitcompress.latency.profile import time_files

        rounds = [time_files(files, self.spec, self.args.runs) for _ in range(self.args.rounds)]
        return [statistics.median(r[i] for r in rounds) for i in range(len(files))]


def cmd_versus(args: argparse.Namespace) -> dict:
    """Latency-aware plans against MAC-target plans (+ the same KD) and uniform plans (no KD), each
    pair brought to equal measured latency first: the latency-aware plan is re-aimed at the other
    plan's p50 until the two, timed together, differ by at most --match."""
    ref = Reference(args)
    run, ledger, common, model_section, validate = ref.run, ref.ledger, ref.common, ref.model, ref.validate

    def joint(dirs: list[Path]) -> list[float]:
        return ref.joint([d / "model.onnx" for d in dirs])

    def pair(name: str, first: dict, kd: bool) -> dict:
        first_dir = run(name, model_section, [first, {"kind": "export"}, validate])
        (goal,) = joint([first_dir])
        tries = []
        for k in range(args.match_tries):
            # the table alone plans; the joint timing below re-aims (a prune re-measure would add noise)
            lat = {**common, "target_latency_ms": goal, "latency_batch": args.batch, "remeasure": 0}
            lat_dir = run(f"{name}-latency-{k}", model_section, [lat, {"kind": "export"}, validate])
            other_ms, lat_ms = joint([first_dir, lat_dir])
            tries.append({"aimed_ms": goal, "plan_ms": other_ms, "latency_plan_ms": lat_ms})
            print(json.dumps({name: tries[-1]}), flush=True)
            if abs(lat_ms / other_ms - 1) <= args.match:
                break
            goal *= other_ms / lat_ms
        pruned = {"plan": first_dir, "latency_plan": lat_dir}
        dirs = dict(pruned)
        if kd:
            dirs = {label: ref.kd(d) for label, d in dirs.items()}
        final = joint(list(dirs.values()))
        out: dict = {"match_tries": tries}
        for (label, d), ms in zip(dirs.items(), final, strict=True):
            records = ledger(d)
            prune = next(r for r in ledger(pruned[label]) if r["kind"] == "prune")
            out[label] = {"p50_ms": ms, "top1": next(r for r in records if r["kind"] == "validate")["top1"],
                          "macs_ratio": prune["details"]["macs_ratio"], "blocks": prune["details"]["blocks"]}  # fmt: skip
        print(json.dumps({name: out}), flush=True)
        return out

    rows = {}
    for macs in args.macs:
        rows[f"macs-{macs:g}+kd"] = pair(f"macs-{macs:g}", {**common, "target_macs": macs}, kd=True)
    for fraction in args.uniform:
        uniform = {"kind": "prune", "importance": "hessian", "heads": fraction, "mlp": fraction}
        rows[f"uniform-{fraction:g}"] = pair(f"uniform-{fraction:g}", uniform, kd=False)
    return {"kd_steps": args.distill_steps, "batch": args.batch, "rows": rows}


def interpolate(points: list[tuple[float, float]], at: float) -> float | None:
    """Top-1 of a frontier (p50, top-1) at latency `at`, linear between its two nearest points in
    latency; None outside the frontier's latency range (no extrapolation)."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return None


def cmd_frontier(args: argparse.Namespace) -> dict:
    """Equal latency by frontiers, not by matching: MAC-target plans at --macs (+ KD), latency-aware
    plans aimed at the p50 each MAC plan measured (+ the same KD), and uniform plans at --uniform (no
    KD). Every architecture is then timed in ONE joint run (--rounds interleaved runs, median), and
    each frontier's top-1 is interpolated at the other's latencies: "at equal latency" is read off the
    measured curves, where a single pair could not be brought to equal latency on this machine."""
    ref = Reference(args)
    mac_dirs = [ref.prune(f"f-macs-{m:g}", {**ref.common, "target_macs": m}) for m in args.macs]
    uniform_dirs = [
        ref.prune(f"f-uniform-{u:g}", {"kind": "prune", "importance": "hessian", "heads": u, "mlp": u})
        for u in args.uniform
    ]
    aims = ref.joint([d / "model.onnx" for d in mac_dirs])  # what the latency-aware plans aim at
    aimed = {"latency_batch": args.batch, "remeasure": 0}  # the table alone: the joint timing judges
    lat_dirs = [
        ref.prune(f"f-latency-{i}", {**ref.common, "target_latency_ms": ms, **aimed})
        for i, ms in enumerate(aims)
    ]
    print(json.dumps({"aims_ms": aims}), flush=True)
    kd = {d: ref.kd(d) for d in [*mac_dirs, *lat_dirs]}
    timed = [*mac_dirs, *lat_dirs, *uniform_dirs]  # KD keeps the architecture: the pruned files are timed
    ms = dict(zip(timed, ref.joint([d / "model.onnx" for d in timed]), strict=True))

    def point(d: Path, label: str, after_kd: bool) -> dict:
        return {"label": label, "p50_ms": ms[d], "top1": ref.top1(kd[d] if after_kd else d), **ref.plan(d)}

    frontiers = {
        "macs+kd": [point(d, f"MACs {m:g}", True) for d, m in zip(mac_dirs, args.macs, strict=True)],
        "latency+kd": [point(d, f"aimed {a:.2f} ms", True) for d, a in zip(lat_dirs, aims, strict=True)],
        "latency": [point(d, f"aimed {a:.2f} ms", False) for d, a in zip(lat_dirs, aims, strict=True)],
        "uniform": [
            point(d, f"uniform {u:g}", False) for d, u in zip(uniform_dirs, args.uniform, strict=True)
        ],
    }

    def versus(mine: str, other: str) -> list[dict]:
        curve = [(p["p50_ms"], p["top1"]) for p in frontiers[mine]]
        rows = []
        for p in frontiers[other]:
            at = interpolate(curve, p["p50_ms"])
            rows.append({"at": p["label"], "p50_ms": p["p50_ms"], other: p["top1"], mine: at,
                         "points": None if at is None else 100 * (at - p["top1"])})  # fmt: skip
        return rows

    result = {
        "kd_steps": args.distill_steps, "batch": args.batch, "frontiers": frontiers,
        "latency+kd vs macs+kd": versus("latency+kd", "macs+kd"),
        "latency vs uniform": versus("latency", "uniform"),
    }  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "frontiers"}, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("error")
    e.add_argument("--model", default="timm:deit_small_patch16_224")
    e.add_argument("--runtime", default="ort")
    e.add_argument("--precision", default="fp32")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--configs", type=int, default=10)
    e.add_argument("--runs", type=int, default=50)
    e.add_argument("--profile-runs", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--kind", choices=["even", "uneven"], default="even",
        help="even: keep 0.25-0.95 of each structure, jittered per block; uneven: tune-like plans at 3-8x "
        "(a few large blocks, the rest at 1-2 small heads and narrow MLPs) and uniform plans down to 1/8",
    )  # fmt: skip
    e.add_argument(
        "--diagnose", action="store_true",
        help="also time small block shapes alone and as whole uniform models: table vs probe vs in-model",
    )  # fmt: skip
    e.add_argument("--table", type=Path, default=None, help="use this table instead of profiling afresh")
    e.add_argument(
        "--lowrank", type=float, default=None, help="factorize each configuration's MLPs (rank fraction)"
    )
    t = sub.add_parser("tune")
    t.add_argument("--model", default="reference")
    t.add_argument("--speedups", type=float, nargs="+", default=[2.0, 4.0, 6.0])
    t.add_argument("--max-drop", type=float, default=100.0)
    t.add_argument("--data", default="fashion-mnist")
    t.add_argument("--eval-limit", type=int, default=2000)
    t.add_argument("--data-limit", type=int, default=20000)
    t.add_argument("--distill-steps", type=int, default=300)
    t.add_argument("--work", default="/tmp/bench-latency")
    t.add_argument("--lowrank", nargs="+", default=None, help="tune's low-rank choices (default: tune's)")
    t.add_argument("--runtime", nargs="+", default=None, help="tune's runtimes (default: tune's, ort)")
    t.add_argument("--precision", nargs="+", default=None, help="tune's precisions (default: tune's)")
    t.add_argument("--remeasure", type=int, default=2, help="tune's re-plans after pruning (0: table only)")
    v = sub.add_parser("versus")
    v.add_argument("--macs", type=float, nargs="+", default=[0.5])
    v.add_argument("--uniform", type=float, nargs="+", default=[0.25, 0.5])
    v.add_argument("--distill-steps", type=int, default=500)
    v.add_argument("--batch", type=int, default=32, help="batch of the latency both plans are matched at")
    v.add_argument("--runs", type=int, default=100)
    v.add_argument("--rounds", type=int, default=3, help="interleaved runs per joint timing (median)")
    v.add_argument("--match", type=float, default=0.03, help="equal latency: joint p50s within this fraction")
    v.add_argument("--match-tries", type=int, default=3)
    v.add_argument("--work", default="/tmp/bench-latency-versus")
    f = sub.add_parser("frontier")
    f.add_argument("--macs", type=float, nargs="+", default=[0.35, 0.5, 0.7])
    f.add_argument("--uniform", type=float, nargs="+", default=[0.25, 0.5])
    f.add_argument("--distill-steps", type=int, default=300)
    f.add_argument("--batch", type=int, default=32, help="batch of the latency the frontiers are drawn at")
    f.add_argument("--runs", type=int, default=100)
    f.add_argument("--rounds", type=int, default=5, help="interleaved runs of the joint timing (median)")
    f.add_argument("--work", default="/tmp/bench-latency-frontier")
    for p in (e, t, v, f):
        p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    commands = {"error": cmd_error, "tune": cmd_tune, "versus": cmd_versus, "frontier": cmd_frontier}
    result = commands[args.cmd](args)
    result["command"] = " ".join(sys.argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("configs",)}, indent=1)[:4000])


if __name__ == "__main__":
    main()
