"""Image folders (class/xxx.jpg), read lazily.

Loading a folder lists its files and reads the headers (mode, size) of the files it keeps; nothing is
decoded then. `limit` picks the files first (stratified over classes), so only those are ever
opened. Pixels are decoded when a batch is asked for: by decoding threads, one batch ahead, when a data
set is iterated (`Dataset.batches`), inline for random access (`Dataset.take`). Memory stays two
batches, whatever the folder's size.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.data.arrays import stratified
from vitcompress.data.spec import DataSpec
from vitcompress.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image as PILImage

log = logging.getLogger("vitcompress.data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = {"train", "test", "val", "valid", "validation"}
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")

MODE_NAMES = {
    "1": "1-bit",
    "L": "8-bit grey",
    "LA": "grey + alpha",
    "P": "palette",
    "PA": "palette + alpha",
    "RGB": "RGB",
    "RGBA": "RGB + alpha",
    "RGBX": "RGB + padding",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "Lab",
    "HSV": "HSV",
    "I;16": "16-bit grey",
    "I;16B": "16-bit grey",
    "I;16L": "16-bit grey",
    "I": "32-bit integer grey",
    "F": "float grey",
}


def conversion(mode: str, channels: int) -> str:
    """What happens to an image of PIL `mode` on its way to a model with `channels` channels."""
    steps = []
    if mode in SIXTEEN_BIT:
        steps.append("scaled from 16 to 8 bits")
    if mode in ("LA", "PA", "RGBA"):
        steps.append("alpha dropped")
    grey = mode in ("1", "L", "LA", "F", *SIXTEEN_BIT)
    if channels == 3:
        if grey:
            steps.append("grey replicated to RGB")
        elif mode in ("P", "PA"):
            steps.append("palette expanded to RGB")
        elif mode not in ("RGB", "RGBA"):
            steps.append(f"{mode} converted to RGB")
    elif channels == 1:
        if mode in ("P", "PA"):
            steps.append("palette converted to luminance")
        elif not grey:
            steps.append(f"{'RGB' if mode in ('RGB', 'RGBA') else mode} converted to luminance (ITU-R 601)")
        elif mode == "1":
            steps.append("1-bit expanded to 8-bit grey")
    return ", ".join(steps) or "as is"


def describe_modes(modes: dict[str, int], channels: int) -> str:
    """'L (8-bit grey) x800: grey replicated to RGB; RGB x3: as is'."""
    parts = []
    for mode, count in sorted(modes.items(), key=lambda kv: -kv[1]):
        name = MODE_NAMES.get(mode, mode)
        label = mode if name == mode else f"{mode} ({name})"
        parts.append(f"{label} x{count}: {conversion(mode, channels)}")
    return "; ".join(parts)


def to_model_mode(image: PILImage.Image, channels: int) -> PILImage.Image:
    """The image in the mode the model takes: RGB for 3 channels, L for 1."""
    import numpy as np
    from PIL import Image

    if image.mode in SIXTEEN_BIT:  # PIL's own conversion clips 16-bit values to 255 (a white image)
        wide = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    target = "RGB" if channels == 3 else "L"
    return image if image.mode == target else image.convert(target)


@dataclass(frozen=True)
class FolderFiles:
    """The files of an image folder that a spec keeps (headers read, pixels not), with their labels."""

    root: Path
    files: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    description: str
    file_modes: tuple[str, ...]  # PIL mode of every file, from its header
    sizes: np.ndarray  # (N, 2): height, width of every file, from its header

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def modes(self) -> dict[str, int]:
        return dict(Counter(self.file_modes))

    def select(self, indices: np.ndarray, description: str) -> FolderFiles:
        return FolderFiles(
            self.root,
            tuple(self.files[int(i)] for i in indices),
            self.labels[indices],
            self.classes,
            description,
            tuple(self.file_modes[int(i)] for i in indices),
            self.sizes[indices],
        )


def folder_classes(root: Path) -> tuple[str, ...]:
    """The class names of an image folder: its sub-directories, sorted (their order is the labels')."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise DataError(
            f"image folder {root} has no class sub-directories", hint="lay it out as class/xxx.jpg"
        )
    return classes


def _list(root: Path, classes: tuple[str, ...]) -> tuple[list[str], list[int]]:
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for directory, subdirs, names in os.walk(root / name, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for file in sorted(names):
                if os.path.splitext(file)[1].lower() in IMAGE_SUFFIXES and not file.startswith("."):
                    files.append(os.path.join(directory, file))
                    labels.append(label)
    return files, labels


def list_folder(spec: DataSpec) -> FolderFiles:
    """List the folder, keep `spec.limit` files (stratified) and read only their headers."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    root = spec.path
    assert root is not None  # guaranteed by DataSpec's validator
    classes = folder_classes(root)
    splits = [c for c in classes if c.lower() in SPLIT_NAMES]
    if splits:
        log.warning(
            "image folder %s: sub-directories %s are taken as classes; if they are splits, point the "
            "data path at one of them (e.g. %s)",
            root,
            ", ".join(splits),
            root / splits[0],
        )
    files, label_list = _list(root, classes)
    labels = np.asarray(label_list, dtype=np.int64)
    if spec.limit is not None and spec.limit < len(files):
        keep = stratified(labels, spec.limit, spec.seed)
        files, labels = [files[int(i)] for i in keep], labels[keep]
    modes: list[str] = []
    sizes: list[tuple[int, int]] = []
    readable: list[int] = []
    skipped: list[str] = []
    for index, file in enumerate(files):
        try:
            with Image.open(file) as image:  # reads the header; pixels are decoded later, per batch
                modes.append(image.mode)
                sizes.append((int(image.size[1]), int(image.size[0])))
            readable.append(index)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            skipped.append(os.path.basename(file))
    if skipped:
        log.warning(
            "image folder %s: skipped %d unreadable image(s), e.g. %s",
            root,
            len(skipped),
            ", ".join(skipped[:3]),
        )
    if not readable:
        raise DataError(
            f"image folder {root} holds no readable images",
            hint=f"looked for {', '.join(sorted(IMAGE_SUFFIXES))} under {len(classes)} class folder(s)",
        )
    return FolderFiles(
        root=root,
        files=tuple(files[i] for i in readable),
        labels=labels[readable],
        classes=classes,
        description=f"folder {root}",
        file_modes=tuple(modes),
        sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
    )


class FolderItems:
    """Random access over some files: item i is (uint8 C x H x W tensor, label, error).

    A file that fails to decode yields a zero image and the error text, and whoever collects the
    batch raises it with the file named (a decoding thread's own traceback would bury that).
    """

    def __init__(
        self,
        files: tuple[str, ...],
        labels: np.ndarray,
        channels: int,
        transform: Callable[[Any], torch.Tensor],
        shape: tuple[int, int, int],
    ) -> None:
        self.files, self.labels, self.channels = files, labels, channels
        self.transform, self.shape = transform, shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        import torch
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as image:
                pixels = self.transform(to_model_mode(image, self.channels))
        except Exception as err:  # reported when the batch is collected, file named
            return torch.zeros(self.shape, dtype=torch.uint8), int(self.labels[index]), f"{path}: {err}"
        if tuple(pixels.shape) != self.shape:
            return (
                torch.zeros(self.shape, dtype=torch.uint8),
                int(self.labels[index]),
                f"{path}: decoded to {tuple(pixels.shape)}, expected {self.shape}",
            )
        return pixels, int(self.labels[index]), ""


def raise_decode_errors(errors: list[str] | tuple[str, ...]) -> None:
    bad = [e for e in errors if e]
    if bad:
        raise DataError(
            f"{len(bad)} image(s) could not be decoded: {bad[0]}",
            hint="remove or replace the file(s); their headers were readable but the pixel data is not",
        )


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)
