"""Data sets small enough to hold as uint8 arrays: Fashion-MNIST, scikit-learn's digits, synthetic noise."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vitcompress.data.spec import DataSpec
from vitcompress.errors import DataError

if TYPE_CHECKING:
    import numpy as np

    from vitcompress.models.loader import InputSpec

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGITS_CLASSES = tuple(str(d) for d in range(10))


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

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def modes(self) -> dict[str, int]:
        """The PIL mode these arrays correspond to, with its count (what a folder reports per file)."""
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(self.channels, f"{self.channels}-channel")
        return {mode: len(self)}

    def select(self, indices: np.ndarray, description: str) -> RawData:
        return RawData(self.images[indices], self.labels[indices], self.classes, description)


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


def fashion_mnist(spec: DataSpec) -> RawData:
    directory = spec.path or FASHION_MNIST_DIR
    images_file, labels_file = FASHION_MNIST_FILES[spec.split]
    images = _read_idx(directory / images_file, 0x803)
    labels = _read_idx(directory / labels_file, 0x801)
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST in {directory}: {len(images)} images but {len(labels)} labels")
    return RawData(images, labels.astype("int64"), FASHION_MNIST_CLASSES, f"Fashion-MNIST {spec.split}")


def digits(spec: DataSpec) -> RawData:
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = bunch.target.astype("int64")
    # A fixed stratified 80/20 split, independent of the spec's seed, so train and test never overlap.
    test = stratified(labels, len(labels) // 5, seed=0)
    mask = np.zeros(len(labels), dtype=bool)
    mask[test] = True
    keep = mask if spec.split == "test" else ~mask
    return RawData(images[keep], labels[keep], DIGITS_CLASSES, f"digits {spec.split}")


def synthetic(spec: DataSpec, input_spec: InputSpec, num_classes: int) -> RawData:
    import numpy as np

    classes = spec.num_classes or num_classes
    rng = np.random.default_rng(spec.seed)
    shape: tuple[int, ...] = (spec.num_samples, input_spec.height, input_spec.width)
    if input_spec.channels != 1:
        shape = (*shape, input_spec.channels)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels = np.arange(spec.num_samples, dtype="int64") % classes
    return RawData(images, labels, tuple(str(c) for c in range(classes)), "synthetic")


def stratified(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
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
