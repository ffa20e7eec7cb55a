"""Train the Fashion-MNIST reference ViT: the teacher and starting point of the accuracy benchmarks.

A timm VisionTransformer for 28x28 grey input (patch 7 -> 16 patch tokens + class token, width 128,
depth 6, 4 heads of 32, MLP 512; chosen for CPU training speed, see BENCHMARKS.md), trained with AdamW, warm-up + cosine, label smoothing and
random-shift/flip augmentation through vitcompress's own data layer (so the preprocessing matches
what `vitcompress` applies at eval time). The result is cached: a second call returns at once.

    python scripts/train_reference.py                  # train (about 25 min on 2 cores) or reuse the cache
    python scripts/train_reference.py --epochs 1 --limit 2000 --out /tmp/ref   # quick smoke run
    python scripts/train_reference.py --variant p4     # the many-token reference (token reduction)

Variant p4 is the many-token reference for token merging and pruning: patch 4 on the same 28x28
images gives 49 patch tokens + class token; width 64, depth 6, 2 heads of 32, MLP 256, 6 epochs,
sized to train in minutes on 2 cores (about the cost per epoch of the p7 reference).

Output directory (default ~/.cache/vitcompress/reference/fmnist-vit-VARIANT): model.safetensors (a
plain timm state dict) and reference.json (how to load it, top-1, wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

SOURCE = "timm:vit_tiny_patch16_224"
KWARGS = {"patch_size": 7, "embed_dim": 128, "depth": 6, "num_heads": 4, "mlp_ratio": 4.0}
EPOCHS, BATCH_SIZE, LR = 24, 256, 2e-3
VAL_SAMPLES = 5000  # held out of the 60k training images to watch the epochs (never the test split)
IMG_SIZE, IN_CHANS, NUM_CLASSES = 28, 1, 10
# variant -> (constructor kwargs, epochs); p7 is the default reference, p4 the many-token one
VARIANTS: dict[str, tuple[dict, int]] = {
    "p7": (KWARGS, EPOCHS),
    "p4": ({"patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 2, "mlp_ratio": 4.0}, 6),
}


def default_dir(variant: str = "p7") -> Path:
    root = Path(os.environ.get("VITCOMPRESS_CACHE", Path.home() / ".cache" / "vitcompress"))
    return root / "reference" / f"fmnist-vit-{variant}"


def model_ref(checkpoint: Path | None, variant: str = "p7"):  # type: ignore[no-untyped-def]
    from vitcompress.models import ModelRef

    kwargs = VARIANTS[variant][0]
    return ModelRef(SOURCE, checkpoint, NUM_CLASSES, IMG_SIZE, IN_CHANS, False, dict(kwargs))


def augment(x, generator):  # type: ignore[no-untyped-def]
    """Random shift by up to 2 pixels (zero padding in normalized space = background) and h-flip."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    background = float(x.amin())
    padded = F.pad(x, (2, 2, 2, 2), value=background)
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    x = padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def train(
    out: Path, epochs: int, batch_size: int, lr: float, limit: int | None, seed: int, variant: str = "p7"
) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from vitcompress.accuracy import evaluate_torch
    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.models import load_model

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 2)
    loaded = load_model(model_ref(None, variant))
    full_train = load_dataset(
        DataSpec(source="fashion-mnist", split="train", limit=limit, seed=seed), loaded.input, NUM_CLASSES
    )
    # The epoch curve is watched on a held-out part of the training images (the last VAL_SAMPLES of a
    # seeded shuffle); the test split is scored once, after the last epoch.
    order = np.random.default_rng(seed).permutation(len(full_train))
    n_val = min(VAL_SAMPLES, len(full_train) // 10)
    train_data = full_train.subset(order[:-n_val], "fashion-mnist train (less validation)")
    val_data = full_train.subset(order[-n_val:], "fashion-mnist validation (held out of train)")
    test_data = load_dataset(DataSpec(source="fashion-mnist", split="test"), loaded.input, NUM_CLASSES)
    model = loaded.model
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = math.ceil(len(train_data) / batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    generator = torch.Generator().manual_seed(seed)
    start, step = time.perf_counter(), 0
    curve: list[float] = []
    for epoch in range(epochs):
        model.train()
        seen, loss_sum = 0, 0.0
        for x, y in train_data.batches(batch_size, shuffle=True, seed=seed + epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(augment(x, generator)), y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
        val_top1 = evaluate_torch(loaded, val_data, batch_size=500).top1
        curve.append(round(val_top1, 4))
        print(
            f"epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f}, validation top-1 {val_top1:.2%}, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    top1 = evaluate_torch(loaded, test_data, batch_size=500).top1
    print(f"test top-1 (once, after the last epoch): {top1:.2%}", flush=True)
    wall = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors.tmp"))
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    info = {
        "source": SOURCE,
        "kwargs": VARIANTS[variant][0],
        "variant": variant,
        "img_size": IMG_SIZE,
        "in_chans": IN_CHANS,
        "num_classes": NUM_CLASSES,
        "checkpoint": "model.safetensors",
        "top1": top1,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "curve": curve,  # validation top-1 per epoch (held out of train)
        "validation_samples": n_val,
        "train_samples": len(train_data),
        "wall_s": round(wall, 1),
        "threads": torch.get_num_threads(),
    }
    (out / "reference.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_reference(out: Path | None = None, variant: str = "p7") -> tuple[Path, dict]:
    """The cached reference (training it first if missing): (checkpoint path, info)."""
    out = out or default_dir(variant)
    info_path = out / "reference.json"
    if not info_path.is_file():
        train(
            out,
            epochs=VARIANTS[variant][1],
            batch_size=BATCH_SIZE,
            lr=LR,
            limit=None,
            seed=0,
            variant=variant,
        )
    return out / "model.safetensors", json.loads(info_path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the cache)")
    parser.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        default="p7",
        help="p7: 16 patch tokens; p4: 49 (token reduction)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: the variant's (p7 24, p4 6)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--limit", type=int, default=None, help="train on this many samples (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even if the cache holds a model")
    args = parser.parse_args()
    out = args.out or default_dir(args.variant)
    epochs = args.epochs if args.epochs is not None else VARIANTS[args.variant][1]
    if (out / "reference.json").is_file() and not args.force:
        print(
            f"cached: {out} ({json.loads((out / 'reference.json').read_text())['top1']:.2%} top-1); --force retrains"
        )
        return 0
    info = train(out, epochs, args.batch_size, args.lr, args.limit, args.seed, args.variant)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
