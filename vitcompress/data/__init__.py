"""Data: where images come from and how they become the model's input.

One `DataSpec` names a source (Fashion-MNIST IDX files, scikit-learn digits, an image folder, or
synthetic noise for smoke tests), a split and a class-stratified limit. Recipes declare their splits
once under `data:` (train / eval / val / calibration); every pass that needs data (Taylor pruning,
data-aware SVD, calibration, distillation, eval) reads from there.

Images are kept raw (uint8) and turned into the model's input per batch: scaled to [0, 1], channels
adapted (grey replicated to RGB, RGB reduced to luminance), resized with the model's own
interpolation when the size differs (logged once), and normalized with the model's mean/std.
"""

from __future__ import annotations

import gzip
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vitcompress.errors import DataError, did_you_mean

if TYPE_CHECKING:
    import numpy as np
    import torch

    from vitcompress.models.loader import InputSpec

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataSource(str, Enum):
    fashion_mnist = "fashion-mnist"
    digits = "digits"
    folder = "folder"
    synthetic = "synthetic"


class DataSpec(BaseModel):
    """One split of one data set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: DataSource = Field(..., description="fashion-mnist, digits, folder or synthetic.")
    path: Path | None = Field(
        None, description="Image folder (class/xxx.jpg), or the Fashion-MNIST directory (default: Debian's)."
    )
    split: Literal["train", "test"] = Field(
        "train", description="Fashion-MNIST's own split; digits are split 80/20, stratified, seed 0."
    )
    limit: int | None = Field(None, gt=0, description="Keep this many samples, stratified over classes.")
    seed: int = Field(0, description="Seed of the stratified subset and of the shuffling order.")
    num_samples: int = Field(256, gt=0, description="Synthetic only: how many samples.")
    num_classes: int | None = Field(None, gt=1, description="Synthetic only (default: the model's).")
    resize: bool = Field(
        True, description="Resize images to the model's input size; off: a mismatch is an error."
    )
    mean: list[float] | None = Field(
        None, description="Override the model's normalization mean (per channel)."
    )
    std: list[float] | None = Field(None, description="Override the model's normalization std (per channel).")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(
        None, description="Override the model's resize interpolation."
    )

    @model_validator(mode="after")
    def _path_needed(self) -> DataSpec:
        if self.source is DataSource.folder and self.path is None:
            raise ValueError("source 'folder' needs path: the directory holding one sub-directory per class")
        return self

    @classmethod
    def parse(cls, text: str, limit: int | None = None, seed: int = 0) -> DataSpec:
        """The CLI form: `fashion-mnist[:train|test]`, `digits[:test]`, `synthetic`, or a folder path."""
        name, _, rest = text.partition(":")
        sources = {s.value for s in DataSource}
        if name in sources and name != "folder":
            split = rest or "train"
            if split not in ("train", "test"):
                raise DataError(f"--data {text!r}: unknown split {split!r}", hint="use :train or :test")
            return cls(source=DataSource(name), split=split, limit=limit, seed=seed)  # type: ignore[arg-type]
        path = Path(rest if name == "folder" else text)
        if not path.is_dir():
            raise DataError(
                f"--data {text!r} is neither a known data set nor a directory",
                hint=did_you_mean(name, sources) + " or give an image folder (class/xxx.jpg)",
            )
        return cls(source=DataSource.folder, path=path, limit=limit, seed=seed)

    def describe(self) -> str:
        where = f" {self.path}" if self.path else ""
        return f"{self.source.value}{where} ({self.split}{f', {self.limit} samples' if self.limit else ''})"


class DataSection(BaseModel):
    """The recipe's data, declared once and shared by every pass that needs it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: DataSpec | None = Field(None, description="Training data (distillation, fine-tuning).")
    eval: DataSpec | None = Field(None, description="Held-out data for accuracy (eval, budgets).")
    val: DataSpec | None = Field(
        None,
        description="Validation data on which training keeps its best weights (default: a part of "
        "train held out); data.eval is only scored once at the end.",
    )
    calibration: DataSpec | None = Field(
        None, description="A few batches for importance scores and calibration (default: train)."
    )

    def for_calibration(self) -> DataSpec | None:
        return self.calibration or self.train


# --------------------------------------------------------------------------- raw sources


@dataclass(frozen=True)
class RawData:
    """Images as uint8 (N, H, W) or (N, H, W, C), labels (N,), and the class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    description: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    import numpy as np

    if not path.is_file():
        raise DataError(
            f"Fashion-MNIST file {path} not found",
            hint="install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
            "or set data path to a directory with the IDX files",
        )
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable gzip IDX file: {err}") from err
    magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else -1
    if magic != expected_magic:
        raise DataError(
            f"{path} is not an IDX file of the expected kind (magic {magic:#x}, want {expected_magic:#x})"
        )
    dims = [struct.unpack(">I", raw[4 + 4 * i : 8 + 4 * i])[0] for i in range(expected_magic & 0xFF)]
    offset = 4 + 4 * len(dims)
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise DataError(
            f"{path} is truncated: header says {dims}, file holds {len(raw) - offset} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _fashion_mnist(spec: DataSpec) -> RawData:
    directory = spec.path or FASHION_MNIST_DIR
    images_file, labels_file = FASHION_MNIST_FILES[spec.split]
    images = _read_idx(directory / images_file, 0x803)
    labels = _read_idx(directory / labels_file, 0x801)
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST in {directory}: {len(images)} images but {len(labels)} labels")
    return RawData(images, labels.astype("int64"), FASHION_MNIST_CLASSES, f"Fashion-MNIST {spec.split}")


def _digits(spec: DataSpec) -> RawData:
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = bunch.target.astype("int64")
    # A fixed stratified 80/20 split, independent of the spec's seed, so train and test never overlap.
    test = _stratified(labels, len(labels) // 5, seed=0)
    mask = np.zeros(len(labels), dtype=bool)
    mask[test] = True
    keep = mask if spec.split == "test" else ~mask
    return RawData(images[keep], labels[keep], tuple(str(d) for d in range(10)), f"digits {spec.split}")


def _folder(spec: DataSpec) -> RawData:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    root = spec.path
    assert root is not None  # guaranteed by DataSpec's validator
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {root} has no class sub-directories", hint="lay it out as class/xxx.jpg"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[str] = []
    size: tuple[int, ...] | None = None
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as image:
                    array = np.asarray(image.convert("RGB"))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                skipped.append(file.name)
                continue
            if size is None:
                size = array.shape
            if array.shape != size:  # images of several sizes: bring them to the first one's
                array = np.asarray(
                    Image.fromarray(array).resize((size[1], size[0]), Image.Resampling.BICUBIC)
                )
            images.append(array)
            labels.append(label)
    if skipped:
        log.warning(
            "image folder %s: skipped %d unreadable image(s), e.g. %s",
            root,
            len(skipped),
            ", ".join(skipped[:3]),
        )
    if not images:
        raise DataError(
            f"image folder {root} holds no readable images",
            hint=f"looked for {', '.join(sorted(IMAGE_SUFFIXES))} under {len(classes)} class folder(s)",
        )
    return RawData(np.stack(images), np.asarray(labels, dtype="int64"), tuple(classes), f"folder {root}")


def _synthetic(spec: DataSpec, input_spec: InputSpec, num_classes: int) -> RawData:
    import numpy as np

    classes = spec.num_classes or num_classes
    rng = np.random.default_rng(spec.seed)
    shape: tuple[int, ...] = (spec.num_samples, input_spec.height, input_spec.width)
    if input_spec.channels != 1:
        shape = (*shape, input_spec.channels)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels = np.arange(spec.num_samples, dtype="int64") % classes
    return RawData(images, labels, tuple(str(c) for c in range(classes)), "synthetic")


def _stratified(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """`limit` indices spread as evenly as the classes allow, chosen at random within each class."""
    import numpy as np

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    rank = np.zeros(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        rank[members] = np.arange(len(members))
    # Round-robin over classes: every class's first pick, then every class's second, ...
    picked = order[np.lexsort((labels[order], rank[order]))][:limit]
    return np.sort(picked)


def load_raw(spec: DataSpec, input_spec: InputSpec, num_classes: int) -> RawData:
    if spec.source is DataSource.fashion_mnist:
        raw = _fashion_mnist(spec)
    elif spec.source is DataSource.digits:
        raw = _digits(spec)
    elif spec.source is DataSource.folder:
        raw = _folder(spec)
    else:
        raw = _synthetic(spec, input_spec, num_classes)
    if spec.limit is not None and spec.limit < len(raw):
        keep = _stratified(raw.labels, spec.limit, spec.seed)
        raw = RawData(raw.images[keep], raw.labels[keep], raw.classes, raw.description)
    return raw


# --------------------------------------------------------------------------- preprocessing


class Preprocess:
    """uint8 images -> the model's normalized float input, one batch at a time."""

    def __init__(
        self, input_spec: InputSpec, data_channels: int, data_size: tuple[int, int], resize: bool
    ) -> None:
        self.spec = input_spec
        self.data_channels = data_channels
        want = (input_spec.height, input_spec.width)
        if data_channels not in (1, 3) or input_spec.channels not in (1, 3):
            if data_channels != input_spec.channels:
                raise DataError(
                    f"data has {data_channels} channels, the model takes {input_spec.channels}",
                    hint="only grey<->RGB are converted; give data with the model's channel count",
                )
        elif data_channels != input_spec.channels:
            log.info(
                "data has %d channel(s), model takes %d: %s",
                data_channels,
                input_spec.channels,
                "grey replicated to RGB" if data_channels == 1 else "RGB converted to luminance",
            )
        self.resize_to: tuple[int, int] | None = None
        if data_size != want:
            if not resize:
                raise DataError(
                    f"data images are {data_size[0]}x{data_size[1]}, the model takes {want[0]}x{want[1]}",
                    hint="set resize: true in the data section, or build the model with --img-size",
                )
            log.warning(
                "data images resized from %dx%d to the model's %dx%d (%s)",
                *data_size,
                *want,
                input_spec.interpolation,
            )
            self.resize_to = want

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        x = images.float().div_(255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if x.shape[1] != self.spec.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.spec.channels, -1, -1)
            else:
                weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                x = (x * weights).sum(dim=1, keepdim=True)
        if self.resize_to is not None:
            mode = (
                self.spec.interpolation
                if self.spec.interpolation in ("bilinear", "bicubic", "nearest")
                else "bilinear"
            )
            x = F.interpolate(
                x,
                size=self.resize_to,
                mode=mode,
                antialias=mode != "nearest",
                align_corners=None if mode == "nearest" else False,
            )
        mean = torch.tensor(self.spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std, dtype=x.dtype).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()


@dataclass
class Dataset:
    """A loaded split, ready to iterate in model-ready batches."""

    raw: RawData
    preprocess: Preprocess
    spec: DataSpec
    indices: np.ndarray | None = None  # a subset: its samples' positions in the split `spec` loads

    def __len__(self) -> int:
        return len(self.raw)

    def subset(self, indices: np.ndarray, description: str) -> Dataset:
        """The samples at `indices` (positions in this dataset), same preprocessing."""
        import numpy as np

        indices = np.asarray(indices, dtype=np.int64)
        raw = RawData(self.raw.images[indices], self.raw.labels[indices], self.raw.classes, description)
        origin = indices if self.indices is None else self.indices[indices]
        return Dataset(raw, self.preprocess, self.spec, origin)

    @property
    def num_classes(self) -> int:
        return len(self.raw.classes)

    def take(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at `indices`, preprocessed, with their labels."""
        import numpy as np
        import torch

        images = torch.from_numpy(np.ascontiguousarray(self.raw.images[indices]))
        return self.preprocess(images), torch.from_numpy(self.raw.labels[indices])

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        limit_batches: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) batches; shuffled deterministically from `seed` (default: the spec's)."""
        import numpy as np
        import torch

        n = len(self.raw)
        order = (
            np.random.default_rng(self.spec.seed if seed is None else seed).permutation(n)
            if shuffle
            else np.arange(n)
        )
        for count, start in enumerate(range(0, n, batch_size)):
            if limit_batches is not None and count >= limit_batches:
                return
            idx = order[start : start + batch_size]
            images = torch.from_numpy(np.ascontiguousarray(self.raw.images[idx]))
            yield self.preprocess(images), torch.from_numpy(self.raw.labels[idx])


def holdout(data: Dataset, count: int, seed: int) -> tuple[Dataset, Dataset]:
    """(rest, held_out): `count` samples held out of `data`, stratified over classes and chosen from
    `seed`, and every other sample; the two never share a sample."""
    import numpy as np

    if not 0 < count < len(data):
        raise DataError(f"cannot hold out {count} of {len(data)} samples of {data.raw.description}")
    held = _stratified(data.raw.labels, count, seed)
    keep = np.ones(len(data), dtype=bool)
    keep[held] = False
    rest = np.flatnonzero(keep)
    desc = data.raw.description
    return (
        data.subset(rest, f"{desc} without {count} held out"),
        data.subset(held, f"{desc}, {count} held out"),
    )


def _overridden(input_spec: InputSpec, spec: DataSpec) -> InputSpec:
    from dataclasses import replace

    for name in ("mean", "std"):
        values = getattr(spec, name)
        if values is not None and len(values) != input_spec.channels:
            raise DataError(
                f"data {name} has {len(values)} values, the model takes {input_spec.channels} channels"
            )
    if name == "std" and spec.std is not None and any(v <= 0 for v in spec.std):
        raise DataError(f"data std must be positive, got {spec.std}")
    return replace(
        input_spec,
        mean=tuple(spec.mean) if spec.mean is not None else input_spec.mean,
        std=tuple(spec.std) if spec.std is not None else input_spec.std,
        interpolation=spec.interpolation or input_spec.interpolation,
    )


def load_dataset(spec: DataSpec, input_spec: InputSpec, num_classes: int) -> Dataset:
    """Load a split for a model: checks the label count and builds the preprocessing."""
    raw = load_raw(spec, input_spec, num_classes)
    if len(raw) == 0:
        raise DataError(f"{spec.describe()} is empty")
    top = int(raw.labels.max()) + 1
    if len(raw.classes) != num_classes or top > num_classes:
        raise DataError(
            f"{raw.description} has {len(raw.classes)} classes, the model has {num_classes}",
            hint="build the model with --num-classes to match the data, or use matching data",
        )
    size = (int(raw.images.shape[1]), int(raw.images.shape[2]))
    input_spec = _overridden(input_spec, spec)
    preprocess = Preprocess(input_spec, raw.channels, size, spec.resize)
    log.info("data: %s, %d samples", raw.description, len(raw))
    return Dataset(raw, preprocess, spec)
