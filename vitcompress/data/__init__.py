"""Data: where images come from and how they become the model's input.

One `DataSpec` names a source (Fashion-MNIST IDX files, scikit-learn digits, an image folder, or
synthetic noise for smoke tests), a split and a class-stratified limit. Recipes declare their splits
once under `data:` (train / eval / val / calibration); every pass that needs data (Taylor pruning,
data-aware SVD, calibration, distillation, eval) reads from there.

The array sources are small and held as uint8; an image folder is listed, not read: its files are
chosen first (the limit applies before any decoding) and decoded batch by batch by decoding threads
(see folder.py). Either way the model's own preprocessing applies (preprocess.py): its
input size, interpolation, crop, pixel range and mean/std, each overridable per data source, and
the log says what the data really was (channel modes, sizes) and what was done to it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitcompress.data.arrays import (
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    RawData,
    digits,
    fashion_mnist,
    stratified,
    synthetic,
)
from vitcompress.data.folder import (
    IMAGE_SUFFIXES,
    FolderFiles,
    FolderItems,
    default_workers,
    folder_classes,
    list_folder,
    raise_decode_errors,
)
from vitcompress.data.memory import InMemory, TensorPreprocess, memory_raw
from vitcompress.data.preprocess import (
    FolderPreprocess,
    Preprocess,
    describe_input,
    normalize,
    resolve_input,
)
from vitcompress.data.spec import ARRAY_SOURCES, DataSection, DataSource, DataSpec
from vitcompress.errors import DataError, VitcompressError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from vitcompress.models.loader import InputSpec

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "IMAGE_SUFFIXES",
    "DataSection",
    "DataSource",
    "DataSpec",
    "Dataset",
    "FolderFiles",
    "FolderPreprocess",
    "InMemory",
    "Preprocess",
    "RawData",
    "class_names",
    "describe_input",
    "holdout",
    "load_dataset",
    "load_raw",
    "memory_dataset",
    "normalize",
    "recipe_preprocessing",
    "resolve_input",
]

log = logging.getLogger(__name__)


def load_raw(spec: DataSpec, input_spec: InputSpec, num_classes: int) -> RawData | FolderFiles:
    """The split's samples: arrays for the in-memory sources, a file list (nothing decoded) for a folder."""
    if spec.source is DataSource.memory:
        raise DataError(
            "data source 'memory' is data handed to the Python API, not a file or data set",
            hint="pass train=/val=/calibration= to vitcompress.compress, or name a data set or folder",
        )
    if spec.source is DataSource.folder:
        return list_folder(spec)  # the limit is applied inside, before any header is read
    if spec.source is DataSource.fashion_mnist:
        raw = fashion_mnist(spec)
    elif spec.source is DataSource.digits:
        raw = digits(spec)
    else:
        raw = synthetic(spec, input_spec, num_classes)
    if spec.limit is not None and spec.limit < len(raw):
        raw = raw.select(stratified(raw.labels, spec.limit, spec.seed), raw.description)
    return raw


def _collate(
    items: list[tuple[torch.Tensor, int, str]],
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    import torch

    return (
        torch.stack([item[0] for item in items]),
        torch.tensor([item[1] for item in items], dtype=torch.int64),
        [item[2] for item in items],
    )


@dataclass
class Dataset:
    """A loaded split, ready to iterate in model-ready batches or to read by index."""

    raw: RawData | FolderFiles
    preprocess: Preprocess | FolderPreprocess | TensorPreprocess
    spec: DataSpec
    indices: np.ndarray | None = None  # a subset: its samples' positions in the split `spec` loads

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.raw.classes

    @property
    def labels(self) -> np.ndarray:
        return self.raw.labels

    @property
    def num_classes(self) -> int:
        return len(self.raw.classes)

    @property
    def lazy(self) -> bool:
        """True for an image folder: pixels are decoded per batch, never held."""
        return isinstance(self.raw, FolderFiles)

    def subset(self, indices: np.ndarray, description: str) -> Dataset:
        """The samples at `indices` (positions in this dataset), same preprocessing."""
        import numpy as np

        indices = np.asarray(indices, dtype=np.int64)
        origin = indices if self.indices is None else self.indices[indices]
        return Dataset(self.raw.select(indices, description), self.preprocess, self.spec, origin)

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing as applied to this data, with the source's modes and sizes: for reports."""
        return {**self.preprocess.applied(), "data": self.spec.describe(), "classes": list(self.classes)}

    def _items(self) -> FolderItems:
        assert isinstance(self.raw, FolderFiles) and isinstance(self.preprocess, FolderPreprocess)
        spec = self.preprocess.spec
        return FolderItems(
            self.raw.files, self.raw.labels, spec.channels, self.preprocess.transform, spec.shape
        )

    def take(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at `indices`, preprocessed, with their labels (a folder decodes only those)."""
        import numpy as np
        import torch

        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if isinstance(self.raw, FolderFiles):
            items = self._items()
            return self._collated([items[int(i)] for i in indices])
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

        n = len(self.raw)
        order = (
            np.random.default_rng(self.spec.seed if seed is None else seed).permutation(n)
            if shuffle
            else np.arange(n)
        )
        if limit_batches is not None:
            order = order[: limit_batches * batch_size]
        if isinstance(self.raw, FolderFiles):
            yield from self._folder_batches(order, batch_size)
            return
        for start in range(0, len(order), batch_size):
            yield self.take(order[start : start + batch_size])

    def _folder_batches(
        self, order: np.ndarray, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decode in `num_workers` threads, one batch ahead of the consumer. Threads, not worker
        processes: PIL's decoders and resampling run without the GIL, and a forked DataLoader worker
        crashed the whole process (SIGSEGV) once OpenVINO had run in it (`eval model.xml --data
        DIR` does exactly that); a forkserver or spawn would instead re-run a user's unguarded
        script in every worker."""
        from concurrent.futures import ThreadPoolExecutor

        items = self._items()
        chunks = [order[start : start + batch_size].tolist() for start in range(0, len(order), batch_size)]
        workers = self.spec.num_workers if self.spec.num_workers is not None else default_workers()
        if workers == 0 or len(order) <= 1:
            for chunk in chunks:
                yield self._collated([items[i] for i in chunk])
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="vitcompress-decode") as pool:
            ahead = [pool.submit(items.__getitem__, i) for i in chunks[0]] if chunks else []
            for n in range(len(chunks)):
                current = ahead
                ahead = (
                    [pool.submit(items.__getitem__, i) for i in chunks[n + 1]] if n + 1 < len(chunks) else []
                )
                yield self._collated([f.result() for f in current])

    def _collated(self, decoded: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, errors = _collate(decoded)
        raise_decode_errors(errors)
        return self.preprocess(images), labels


def holdout(data: Dataset, count: int, seed: int) -> tuple[Dataset, Dataset]:
    """(rest, held_out): `count` samples held out of `data`, stratified over classes and chosen from
    `seed`, and every other sample; the two never share a sample."""
    import numpy as np

    if not 0 < count < len(data):
        raise DataError(f"cannot hold out {count} of {len(data)} samples of {data.raw.description}")
    held = stratified(data.raw.labels, count, seed)
    keep = np.ones(len(data), dtype=bool)
    keep[held] = False
    rest = np.flatnonzero(keep)
    desc = data.raw.description
    return (
        data.subset(rest, f"{desc} without {count} held out"),
        data.subset(held, f"{desc}, {count} held out"),
    )


def class_names(spec: DataSpec) -> tuple[str, ...] | None:
    """The class names a spec's data carries, without reading any image; None for synthetic data
    (numbered classes) or a folder that cannot be listed."""
    if spec.source is DataSource.digits:
        return DIGITS_CLASSES
    if spec.source is DataSource.fashion_mnist:
        return FASHION_MNIST_CLASSES
    if spec.source is DataSource.folder and spec.path is not None:
        try:
            return folder_classes(spec.path)
        except VitcompressError:
            return None
    return None


def recipe_preprocessing(
    section: DataSection | None, input_spec: InputSpec
) -> tuple[InputSpec, tuple[str, ...] | None, str | None]:
    """(input spec, class names, which split they came from) for a model the recipe's data feeds:
    the split evaluated (data.eval), else the one trained on, else calibration. An exported file
    records these, so `eval model.onnx` preprocesses the way the run did."""
    if section is None:
        return input_spec, None, None
    splits = [(n, getattr(section, n)) for n in ("eval", "train", "val", "calibration")]
    given = [(n, s) for n, s in splits if s is not None]
    if not given:
        return input_spec, None, None
    name, spec = given[0]
    resolved = resolve_input(input_spec, spec)
    for other, other_spec in given[1:]:
        if resolve_input(input_spec, other_spec) != resolved:
            log.warning(
                "data.%s and data.%s preprocess differently; the exported file records data.%s's (%s)",
                name,
                other,
                name,
                describe_input(resolved),
            )
    return resolved, class_names(spec), name


def load_dataset(spec: DataSpec, input_spec: InputSpec, num_classes: int) -> Dataset:
    """Load a split for a model: checks the label count, builds the preprocessing and says, in one
    line, what the data is (modes, sizes) and what is done to it."""
    import numpy as np

    raw = load_raw(spec, input_spec, num_classes)
    if len(raw) == 0:
        raise DataError(f"{spec.describe()} is empty")
    top = int(raw.labels.max()) + 1
    if len(raw.classes) != num_classes or top > num_classes:
        counts = np.bincount(raw.labels, minlength=len(raw.classes))
        empty = [name for name, count in zip(raw.classes, counts, strict=False) if count == 0]
        said = f" ({', '.join(empty)} hold(s) no images but count as classes)" if empty else ""
        if len(raw.classes) < num_classes:
            hint = (
                "labels follow the sorted folder names, so a missing class shifts every label after it: "
                "add an empty folder for each class the model has but the data lacks "
                f"(data classes: {', '.join(raw.classes)}); --num-classes would re-initialize a trained head"
            )
        else:
            hint = (
                "remove sub-directories that are not classes, or build the model with --num-classes "
                f"{len(raw.classes)} (that re-initializes a trained classifier head)"
            )
        raise DataError(
            f"{raw.description} has {len(raw.classes)} classes{said}, the model has {num_classes}", hint=hint
        )
    input_spec = resolve_input(input_spec, spec)
    preprocess: Preprocess | FolderPreprocess
    if isinstance(raw, FolderFiles):
        preprocess = FolderPreprocess(input_spec, raw.modes, raw.sizes, spec.resize)
        (h0, w0), (h1, w1) = preprocess.size_range
        sizes = f"{h0}x{w0}" if (h0, w0) == (h1, w1) else f"{h0}x{w0} to {h1}x{w1}"
        log.info(
            "data: %s, %d images in %d classes, %s; modes %s; %s",
            spec.describe(),
            len(raw),
            len(raw.classes),
            sizes,
            preprocess.conversions(),
            preprocess.resizing(),
        )
    else:
        preprocess = Preprocess(input_spec, raw.channels, raw.size, spec.resize, raw.modes)
        log.info(
            "data: %s, %d samples of %dx%d; modes %s",
            raw.description if spec.source in ARRAY_SOURCES else spec.describe(),
            len(raw),
            *raw.size,
            preprocess.conversions(),
        )
    log.info("model input: %s", describe_input(input_spec, whole=not isinstance(raw, FolderFiles)))
    return Dataset(raw, preprocess, spec)


def memory_dataset(held: InMemory, spec: DataSpec, input_spec: InputSpec, num_classes: int) -> Dataset:
    """Samples the caller handed over in Python, as a split (`spec` says its limit and seed)."""
    raw = memory_raw(held, spec, num_classes)
    preprocess = TensorPreprocess(input_spec, tuple(raw.images.shape[1:]))
    log.info("data: %s, %d samples, inputs as given", held.description, len(raw))
    return Dataset(raw, preprocess, spec)
