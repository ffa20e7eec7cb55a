"""Image-folder streaming: peak memory stays flat as the folder grows.

    python scripts/bench_data.py                         # folders of 200, 800, 3200 PNGs
    python scripts/bench_data.py --sizes 1000,10000 --workers 2 --json data.json
    python scripts/bench_data.py --smoke                 # tiny, for the test suite

For each size a folder of small PNGs (10 classes, mixed sizes 40-96 px, mixed RGB and grey) is
written to a temporary directory; then a fresh subprocess loads it through the data layer
(`load_dataset`, a 3x32x32 model input with timm's crop) and iterates every batch, as an eval
would. Each subprocess reports its peak RSS (VmHWM from /proc/self/status; the decoding threads
run in it) and images/s. `--eager` adds the old way for contrast: every image decoded into one array
first, so its peak grows with the folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def vm_hwm_mb() -> float:
    """This process's peak resident set size, from /proc/self/status (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        directory = root / f"class{i % 10}"
        directory.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(40, 97, size=2))
        if i % 4 == 3:
            pixels = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(directory / f"{i:06d}.png")
        else:
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(directory / f"{i:06d}.png")
    return root


def child(folder: Path, batch_size: int, workers: int, eager: bool) -> dict:
    """Runs in its own process: iterate the whole folder, report time and peak memory."""
    import numpy as np
    import timm.data  # noqa: F401  # imported before the baseline: what it costs is not the data's

    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.models.loader import InputSpec

    spec = InputSpec(3, 32, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.9, "center")
    before = vm_hwm_mb()
    start = time.perf_counter()
    if eager:
        from PIL import Image

        from vitcompress.data.folder import _list, folder_classes

        files, _ = _list(folder, folder_classes(folder))
        arrays = []
        for file in files:
            with Image.open(file) as image:  # the old loader: decode all, bring to the first one's size
                arrays.append(np.asarray(image.convert("RGB").resize((96, 96))))
        images = np.stack(arrays)
        seen = len(images)
    else:
        data = load_dataset(DataSpec(source="folder", path=folder, num_workers=workers), spec, 10)
        seen = 0
        for x, _ in data.batches(batch_size):
            seen += len(x)
    wall = time.perf_counter() - start
    return {
        "mode": "eager (decode all first)" if eager else f"streaming ({workers} decoding threads)",
        "images": seen,
        "seconds": wall,
        "images_per_s": seen / wall if wall > 0 else 0.0,
        "peak_rss_mb": vm_hwm_mb(),
        "peak_rss_after_imports_mb": before,
        "peak_rss_above_imports_mb": vm_hwm_mb() - before,
    }


def run_size(folder: Path, args: argparse.Namespace, eager: bool) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(folder),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
    ]
    if eager:
        command.append("--eager")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"child failed for {folder}:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="200,800,3200", help="Folder sizes (images), comma-separated.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="Decoding threads (0: inline).")
    parser.add_argument("--eager", action="store_true", help="Also measure decoding everything first.")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes, for the test suite.")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch_size, args.workers, args.eager)))
        return
    sizes = [40] if args.smoke else [int(s) for s in args.sizes.split(",")]
    if args.smoke:
        args.batch_size = min(args.batch_size, 16)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for size in sizes:
            folder = make_folder(Path(tmp) / f"n{size}", size)
            for eager in (False, True) if args.eager else (False,):
                row = {"folder_images": size, **run_size(folder, args, eager)}
                rows.append(row)
                print(
                    f"{size} images, {row['mode']}: peak RSS {row['peak_rss_mb']:.0f} MB, "
                    f"{row['images_per_s']:.0f} images/s",
                    file=sys.stderr,
                )
    print("| folder images | mode | peak RSS (MB) | above imports (MB) | images/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['folder_images']} | {r['mode']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_above_imports_mb']:.1f} | "
            f"{r['images_per_s']:.0f} |"
        )
    streaming = [r for r in rows if r["mode"].startswith("streaming")]
    growth = streaming[-1]["peak_rss_mb"] / streaming[0]["peak_rss_mb"] if streaming else float("nan")
    print(
        f"\nStreaming peak RSS, largest folder / smallest: {growth:.2f}x "
        f"({streaming[-1]['folder_images']} vs {streaming[0]['folder_images']} images)."
    )
    if args.json:
        args.json.write_text(json.dumps({"results": rows, "streaming_peak_growth": growth}, indent=2) + "\n")


if __name__ == "__main__":
    main()
