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

sys.path.insert(0, str(Path(__file__).parent))

import benchlib

from vitcompress.data import DataSpec, load_dataset
from vitcompress.models.artifact import save_artifact
from vitcompress.models.stats import count_macs
from vitcompress.passes.distill import DistillConfig, distill_model
from vitcompress.passes.prune import PruneConfig, prune_model


def accuracy_track(args: argparse.Namespace, workdir: Path) -> tuple[list[dict], Path]:
    from vitcompress.models import load_model

    ref, source = benchlib.reference(args)
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
        {"model": "teacher (reference)", "top1": benchlib.top1(teacher, test), "macs_ratio": 1.0},
        {"model": "pruned, no recovery", "top1": benchlib.top1(pruned, test), "macs_ratio": macs / macs0},
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
                "top1": benchlib.top1(student, test),
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
    parser = benchlib.parser(__doc__, speed=False)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--ddp-steps", type=int, default=40)
    parser.add_argument("--ddp-samples", type=int, default=8192)
    args = parser.parse_args()
    results = benchlib.start(args)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        results["accuracy"], start_dir = accuracy_track(args, Path(tmp))
        results["throughput"] = throughput_track(args, start_dir, Path(tmp))
        results["wall_s"] = time.perf_counter() - started
    benchlib.table(
        "Recovery after pruning to 50% MACs (top-1 on the test split)",
        [
            ("model", lambda r: r["model"]),
            ("top-1", lambda r: f"{r['top1']:.2%}"),
            ("MACs ratio", lambda r: f"{r['macs_ratio']:.3f}"),
            ("steps", lambda r: str(r.get("steps", "-"))),
            ("wall per epoch s", lambda r: f"{r.get('wall_per_epoch_s', 0):.0f}"),
            ("train images/s", lambda r: f"{r.get('images_per_s', 0):.0f}"),
        ],
        results["accuracy"],
    )
    benchlib.table(
        "KD step throughput, torchrun (gloo)",
        [
            ("processes", lambda r: str(r["processes"])),
            ("threads each", lambda r: str(r["threads_each"])),
            ("global batch", lambda r: str(r["global_batch"])),
            ("images/s", lambda r: f"{r['images_per_s']:.0f}"),
        ],
        results["throughput"],
    )
    return benchlib.finish(args, results)


if __name__ == "__main__":
    sys.exit(main())
