"""Recovery benchmark: a pruned ViT fine-tuned with labels only vs distilled from its teacher, same steps.

    python scripts/bench_distill.py --epochs 1                  # accuracy track + DDP throughput
    python scripts/bench_distill.py --smoke                     # tiny, for the test suite

Accuracy track: the Fashion-MNIST reference ViT (scripts/train_reference.py) pruned to 50% MACs
(hessian importance, heads/head_dim/mlp), then N epochs of hard-label fine-tuning and, from the same
pruned start, N epochs of KD (0.3 labels + 0.7 soft KD at T=4) from the unpruned model; top-1 on the
10k test images after each, wall time per epoch (2 cores).
Throughput track: images/s of the same KD step in 1 process vs 2 processes (torchrun, gloo, 1 thread
each) on this machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_prune import _reference, top1

from vitcompress.bench import Environment
from vitcompress.data import DataSpec, load_dataset
from vitcompress.models.artifact import save_artifact
from vitcompress.models.stats import count_macs
from vitcompress.passes.distill import DistillConfig, distill_model
from vitcompress.passes.prune import PruneConfig, prune_model


def accuracy_track(args: argparse.Namespace, workdir: Path) -> tuple[list[dict], Path]:
    from vitcompress.models import load_model

    ref, source = _reference(args)
    teacher = load_model(ref)
    train = load_dataset(
        DataSpec(source=source, split="train", limit=args.train_limit), teacher.input, teacher.num_classes
    )
    test = load_dataset(
        DataSpec(source=source, split="test", limit=args.eval_limit), teacher.input, teacher.num_classes
    )
    calibration = load_dataset(
        DataSpec(source=source, split="train", limit=512), teacher.input, teacher.num_classes
    )
    macs0, _ = count_macs(teacher)
    pruned = copy.deepcopy(teacher)
    prune_model(pruned, PruneConfig(target_macs=0.5, structures=["heads", "head_dim", "mlp"], importance="hessian",
                                    batch_size=64, calibration_batches=8), calibration)  # fmt: skip
    macs, _ = count_macs(pruned)
    start_dir = save_artifact(pruned, workdir / "pruned")
    rows = [
        {"model": "teacher (reference)", "top1": top1(teacher, test), "macs_ratio": 1.0},
        {"model": "pruned, no recovery", "top1": top1(pruned, test), "macs_ratio": macs / macs0},
    ]
    for name, weights in (("hard labels", (1.0, 0.0)), ("KD", (0.3, 0.7))):
        student = copy.deepcopy(pruned)
        cfg = DistillConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, hard_label=weights[0],
                            soft_kd=weights[1], temperature=4.0, checkpoint_every=10_000, resume=False)  # fmt: skip
        result = distill_model(
            student, teacher if weights[1] else None, cfg, train, None, workdir / name, seed=0
        )
        rows.append(
            {
                "model": f"pruned + {args.epochs:g} epoch(s) {name}",
                "top1": top1(student, test),
                "macs_ratio": macs / macs0,
                "steps": result.steps,
                "wall_s": result.wall_s,
                "wall_per_epoch_s": result.wall_s / args.epochs,
                "images_per_s": result.images_per_s,
            }
        )
    return rows, start_dir


def throughput_track(args: argparse.Namespace, start_dir: Path, workdir: Path) -> list[dict]:
    """img/s of the KD step with 1 and 2 processes (1 thread each), on the same pruned start."""
    rows = []
    source = "digits" if args.smoke else "fashion-mnist"
    for procs in (1, 2):
        out = workdir / f"ddp{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m", "vitcompress",
               "distill", str(start_dir), "--data", source, "--data-limit", str(args.ddp_samples), "--steps",
               str(args.ddp_steps), "--batch-size", str(args.batch_size // procs), "--no-resume", "--out", str(out),
               "--json"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // procs))}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise SystemExit(f"torchrun with {procs} process(es) failed:\n{run.stderr[-3000:]}")
        record = next(r for r in json.loads(run.stdout)["ledger"] if r["kind"] == "distill")
        rows.append({"processes": procs, "threads_each": max(1, args.threads // procs),
                     "global_batch": args.batch_size, "images_per_s": record["details"]["images_per_s"]})  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", type=Path, default=None)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--ddp-steps", type=int, default=40)
    parser.add_argument("--ddp-samples", type=int, default=8192)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {
        "environment": Environment.detect().__dict__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        results["accuracy"], start_dir = accuracy_track(args, Path(tmp))
        results["throughput"] = throughput_track(args, start_dir, Path(tmp))
        results["wall_s"] = time.perf_counter() - started
    print("\n### Recovery after pruning to 50% MACs (top-1 on the test split)\n")
    print("| model | top-1 | MACs ratio | steps | wall per epoch s | train images/s |")
    print("|---|---|---|---|---|---|")
    for r in results["accuracy"]:
        print(f"| {r['model']} | {r['top1']:.2%} | {r['macs_ratio']:.3f} | {r.get('steps', '-')} | "
              f"{r.get('wall_per_epoch_s', 0):.0f} | {r.get('images_per_s', 0):.0f} |")  # fmt: skip
    print("\n### KD step throughput, torchrun (gloo)\n")
    print("| processes | threads each | global batch | images/s |")
    print("|---|---|---|---|")
    for r in results["throughput"]:
        print(f"| {r['processes']} | {r['threads_each']} | {r['global_batch']} | {r['images_per_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
