"""Accuracy of a model on a data split: top-1, top-5 and mean cross-entropy, in PyTorch or ONNX Runtime.

The same `Dataset` batches feed both runtimes, so a torch model and its ONNX export are compared on
exactly the same preprocessed inputs. An ONNX file exported by vitcompress carries its input spec
(size, mean/std, interpolation) and class count in its metadata; that is what makes `eval model.onnx`
preprocess the data the way the model expects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.errors import OnnxModelError

if TYPE_CHECKING:
    import numpy as np

    from vitcompress.data import Dataset
    from vitcompress.models.loader import InputSpec, LoadedModel
    from vitcompress.runtime import Provider


@dataclass(frozen=True)
class EvalResult:
    model: str
    runtime: str
    data: str
    samples: int
    top1: float
    top5: float
    loss: float
    wall_s: float

    @property
    def images_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


class _Tally:
    def __init__(self) -> None:
        self.n = self.top1 = self.top5 = 0
        self.loss = 0.0

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        import numpy as np

        logits = logits.astype(np.float64)
        shifted = logits - logits.max(1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        self.loss += float(-log_probs[np.arange(len(labels)), labels].sum())
        k = min(5, logits.shape[1])
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        self.top1 += int((top[:, 0] == labels).sum())
        self.top5 += int((top == labels[:, None]).any(1).sum())
        self.n += len(labels)


# One evaluation protocol for every accuracy in a run (validate, the quantize gate, distillation's
# selection, `eval`): batches of this many images. Dynamic INT8 computes activation scales per
# batch, so the same file scored at batch 1 and at batch 256 gave two top-1s in one report
# (91.36% vs 91.64%) before everything used this one figure.
EVAL_BATCH_SIZE = 64


def _check_finite(logits: np.ndarray, label: str) -> None:
    import numpy as np

    if not np.isfinite(logits).all():
        raise OnnxModelError(f"{label} produced NaN/Inf logits on the evaluation data")


def evaluate_torch(
    loaded: LoadedModel,
    data: Dataset,
    batch_size: int = EVAL_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    import torch

    tally = _Tally()
    model = loaded.model
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for inputs, labels in data.batches(batch_size):
                logits = model(inputs).float().numpy()
                _check_finite(logits, loaded.label)
                tally.add(logits, labels.numpy())
                if on_batch:
                    on_batch(len(labels))
    finally:
        model.train(was_training)
    return _result(loaded.label, "pytorch", data, tally, time.perf_counter() - start)


def onnx_metadata(path: Path) -> dict[str, Any] | None:
    import onnx

    from vitcompress.passes.export import METADATA_KEY

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return dict(json.loads(prop.value))
    return None


def onnx_input_spec(path: Path) -> tuple[InputSpec, int]:
    from vitcompress.models.loader import InputSpec
    from vitcompress.runtime import check_input_dims, check_onnx_file

    check_onnx_file(path)  # a broken declared input shape is refused before any data is prepared for it
    meta = onnx_metadata(path)
    if meta is None:
        raise OnnxModelError(
            f"{path} has no vitcompress input metadata (mean/std, size, classes)",
            hint="export it with vitcompress export, or evaluate the PyTorch model it came from",
        )
    try:
        spec, classes = InputSpec.from_dict(meta["input"]), int(meta["num_classes"])
        dims: list[int | str | None] = [1, int(spec.channels), int(spec.height), int(spec.width)]
    except (KeyError, TypeError, ValueError) as err:
        raise OnnxModelError(
            f"{path} has unreadable vitcompress input metadata: {type(err).__name__}: {err}",
            hint="re-export it with vitcompress export",
        ) from err
    check_input_dims(path, "metadata input", dims, what="vitcompress metadata input")
    return spec, classes


def evaluate_onnx(
    path: Path,
    data: Dataset,
    provider: Provider | None = None,
    threads: int | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    from vitcompress.runtime import OnnxRunner, Provider

    runner = OnnxRunner(Path(path), provider=provider or Provider.cpu, threads=threads)
    tally = _Tally()
    start = time.perf_counter()
    for inputs, labels in data.batches(batch_size):
        logits = runner.run(inputs.numpy())
        _check_finite(logits, str(path))
        tally.add(logits, labels.numpy())
        if on_batch:
            on_batch(len(labels))
    return _result(
        str(path), f"onnxruntime-{runner.provider.value}", data, tally, time.perf_counter() - start
    )


def _result(model: str, runtime: str, data: Dataset, tally: _Tally, wall: float) -> EvalResult:
    return EvalResult(
        model=model,
        runtime=runtime,
        data=data.spec.describe(),
        samples=tally.n,
        top1=tally.top1 / max(1, tally.n),
        top5=tally.top5 / max(1, tally.n),
        loss=tally.loss / max(1, tally.n),
        wall_s=wall,
    )
