"""Stand-ins for "your model and your data", so the README's "Compress your own model" runs as is.

Writes to OUT (default `my-example/`):
- `train/CLASS/*.png`, `test/CLASS/*.png`: scikit-learn's 1797 real 8x8 digits as grey PNG files
  of mixed sizes (24, 32 and 40 px), 75/25 stratified, class folders named zero..nine: what a user's
  labelled image folders look like;
- `vit.safetensors`: a plain state dict of a timm ViT that is NOT a timm default (patch 8, width
  96, depth 3, 3 heads, no qkv bias, 32 px input), trained here on `train/` through vitcompress's
  own data layer, so it expects exactly the preprocessing `vitcompress` gives that model;
- `vit_tiny.safetensors`: a random-init timm vit_tiny_patch16_224 with 10 classes, standing in for
  a downloaded timm checkpoint;
- `hf-vit/`: a small random-init Hugging Face ViT folder (config.json + model.safetensors), when
  transformers is installed.

    python scripts/make_example.py --out my-example      # about 20 s on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BASE = "timm:vit_base_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 3, "num_heads": 3, "qkv_bias": False}


def write_folders(out: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        cut = round(0.75 * len(indices))
        for split, chosen in (("train", indices[:cut]), ("test", indices[cut:])):
            folder = out / split / NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
                size = (24, 32, 40)[i % 3]
                Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).save(folder / f"{i}.png")


def train_model(out: Path, steps: int, seed: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from vitcompress.accuracy import evaluate_torch
    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.fileio import file_mode
    from vitcompress.models import ModelRef, load_model

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in KWARGS.items() if k != "img_size"}
    loaded = load_model(ModelRef(BASE, num_classes=10, img_size=KWARGS["img_size"], kwargs=kwargs))
    train = load_dataset(DataSpec.parse(str(out / "train")), loaded.input, 10)
    test = load_dataset(DataSpec.parse(str(out / "test")), loaded.input, 10)
    x_all, y_all = train.take(list(range(len(train))))  # 1347 small images: decoded once
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    loaded.model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(y_all), (64,), generator=generator)
        loss = F.cross_entropy(loaded.model(x_all[batch]), y_all[batch], label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    loaded.model.eval()
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(out / "vit.safetensors"))
    os.chmod(out / "vit.safetensors", file_mode())  # safetensors writes 0o600 files
    measured = evaluate_torch(loaded, test)
    return {"test_top1": measured.top1, "test_images": measured.samples}


def write_stand_ins(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from vitcompress.fileio import file_mode
    from vitcompress.models import ModelRef, load_model

    torch.manual_seed(0)
    tiny = load_model(ModelRef("timm:vit_tiny_patch16_224", num_classes=10))
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(out / "vit_tiny.safetensors"))
    os.chmod(out / "vit_tiny.safetensors", file_mode())
    try:
        import transformers
    except ImportError:
        return
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_labels=10, architectures=["ViTForImageClassification"],
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(out / "hf-vit", safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("my-example"))
    parser.add_argument("--steps", type=int, default=300, help="training steps of batch 64")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    write_folders(args.out, args.seed)
    result = train_model(args.out, args.steps, args.seed)
    write_stand_ins(args.out)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    (args.out / "example.json").write_text(json.dumps({"model": BASE, "kwargs": KWARGS, **result}, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
