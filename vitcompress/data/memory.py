"""Data the caller already holds in Python: a DataLoader, any iterable of (inputs, labels) batches,
or a pair of tensors. The inputs are taken as the model's input, already preprocessed (resized,
normalized) the way the caller's own training did: nothing is resized or normalized again here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitcompress.data.arrays import RawData, stratified
from vitcompress.data.spec import DataSource, DataSpec
from vitcompress.errors import DataError

if TYPE_CHECKING:
    import torch

    from vitcompress.models.loader import InputSpec

# How many samples are gathered from a DataLoader at most (a notebook's loader may be the whole
# training set; the passes that read data draw batches from what is held here).
MAX_SAMPLES = 100_000


@dataclass(frozen=True)
class InMemory:
    """Samples gathered from the caller's data: float inputs (N, C, H, W) and integer labels (N,)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    description: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def collect(data: Any, name: str, max_samples: int = MAX_SAMPLES) -> InMemory:
    """Gather `data` (a (inputs, labels) pair of tensors, or an iterable of such batches, a DataLoader
    for one) into one pair of tensors; `name` is the argument, for errors."""
    import torch

    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        batches: Iterable[Any] = [data]
    elif isinstance(data, Iterable):
        batches = data
    else:
        raise DataError(
            f"{name}: expected a DataLoader, an iterable of (inputs, labels) batches or a pair of tensors, "
            f"got {type(data).__name__}",
            hint="or give a data spec such as 'digits:test' or an image folder path",
        )
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    count = 0
    for index, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise DataError(f"{name}: batch {index} is not an (inputs, labels) pair ({type(batch).__name__})")
        x, y = torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
        if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"{name}: batch {index} has inputs {tuple(x.shape)} and labels {tuple(y.shape)}",
                hint="inputs must be (N, C, H, W) floats, labels (N,) class indices",
            )
        xs.append(x.detach().float().cpu())
        ys.append(y.detach().long().cpu())
        count += int(y.shape[0])
        if count >= max_samples:
            break
    if not xs or count == 0:
        raise DataError(f"{name} holds no samples")
    inputs, labels = torch.cat(xs)[:max_samples], torch.cat(ys)[:max_samples]
    if not torch.isfinite(inputs).all():
        raise DataError(f"{name} holds NaN or infinite inputs")
    return InMemory(inputs, labels, f"{name} (in memory, {len(labels)} samples)")


class TensorPreprocess:
    """Inputs the caller preprocessed already: checked against the model's input shape, passed as
    they are."""

    def __init__(self, input_spec: InputSpec, shape: tuple[int, ...]) -> None:
        self.spec = input_spec
        if tuple(shape) != input_spec.shape:
            raise DataError(
                f"in-memory inputs are {'x'.join(map(str, shape))}, the model takes "
                f"{'x'.join(map(str, input_spec.shape))}",
                hint="resize and normalize the inputs as the model was trained, before handing them over",
            )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def applied(self) -> dict[str, Any]:
        return {"preprocessing": "none: inputs given preprocessed, in memory", "input": list(self.spec.shape)}


def memory_raw(held: InMemory, spec: DataSpec, num_classes: int) -> RawData:
    """The held samples as the arrays a `Dataset` reads (float inputs instead of uint8 pixels)."""
    labels = held.labels.numpy()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"{held.description}: labels run from {labels.min()} to {labels.max()}, the model has "
            f"{num_classes} classes"
        )
    raw = RawData(held.inputs.numpy(), labels, tuple(str(c) for c in range(num_classes)), held.description)
    if spec.limit is not None and spec.limit < len(raw):
        raw = raw.select(stratified(raw.labels, spec.limit, spec.seed), raw.description)
    return raw


MEMORY_SPEC = DataSpec(source=DataSource.memory)
