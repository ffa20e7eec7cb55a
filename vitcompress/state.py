"""The state that flows through a recipe's passes, and the ledger record each pass leaves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

if TYPE_CHECKING:
    import torch

    from vitcompress.data import DataSection, Dataset, DataSpec, InMemory
    from vitcompress.models.loader import LoadedModel

# A caller's accuracy function: takes a model (a batch of inputs -> logits: the torch module, or an
# exported file behind the same call) and returns its top-1 accuracy as a fraction in [0, 1].
EvalFn = Callable[[Callable[["torch.Tensor"], "torch.Tensor"]], float]


@dataclass(frozen=True)
class Parity:
    """How closely one model reproduces another on the same batch."""

    max_abs_diff: float
    max_abs_reference: float  # largest |logit| of the reference, the scale for relative tolerances
    top1_agreement: float
    batch: int
    reference: str  # what it was compared against


@dataclass(frozen=True)
class PassRecord:
    """One row of the ledger: the step's name and kind, its wall time (the pipeline's envelope) and
    what the pass measured."""

    name: str
    kind: str
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    parity: Parity | None = None
    latency_p50_ms: float | None = None
    top1: float | None = None  # accuracy on the recipe's eval split, when measured
    wall_s: float = 0.0
    artifact: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Step(Protocol):
    """What the state needs to know of the pass config that ran (every PassConfig is one)."""

    changes_model: ClassVar[bool]

    @property
    def kind(self) -> str: ...

    @property
    def step_name(self) -> str: ...


@dataclass(frozen=True)
class Measured:
    """What a pass measured, for its ledger record (the envelope, name, kind and time, is the
    pipeline's)."""

    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    parity: Parity | None = None
    latency_p50_ms: float | None = None
    top1: float | None = None
    artifact: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def asdict_shallow(value: Any) -> dict[str, Any]:
    """A dataclass's fields as they are (no deep copy: parity stays a Parity)."""
    from dataclasses import fields

    return {f.name: getattr(value, f.name) for f in fields(value)}


@dataclass(frozen=True)
class RunSettings:
    """Settings every pass may read: where to write, how to measure."""

    out_dir: Path
    seed: int = 0
    threads: int = 2
    data: DataSection | None = None  # the recipe's data splits, for passes that need data
    # progress(step name, done, total, metrics) for long passes (training); the CLI draws it
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None
    # data the Python API was handed, by split (train, eval, val, calibration): the recipe's data
    # section names them `source: memory`
    memory: dict[str, InMemory] = field(default_factory=dict)
    eval_fn: EvalFn | None = None  # the caller's accuracy function, used wherever top-1 is measured


__all__ = [
    "EvalFn",
    "Measured",
    "ModelState",
    "Parity",
    "PassRecord",
    "RunResult",
    "RunSettings",
    "seed_everything",
]


def seed_everything(seed: int) -> None:
    """Seed every generator a pass may draw from (random init of a hub-less timm model, a distill
    pass's feature projections, numpy shuffles), so a recipe with `run.seed` is reproducible."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class ModelState:
    """The model as it stands after the passes so far.

    `model` is the current PyTorch model; `onnx_path` is set once a pass exported it (later passes such
    as quantization work on that file). `baseline_onnx` is the fp32 export of the model as loaded,
    the reference every latency ratio is taken against.
    """

    model: LoadedModel
    settings: RunSettings
    records: tuple[PassRecord, ...] = ()
    onnx_path: Path | None = None
    baseline_onnx: Path | None = None
    teacher: LoadedModel | None = None
    model_changed: bool = False  # set by passes that edit the PyTorch model (prune, lowrank, distill)

    def data_spec(self, split: Literal["train", "eval", "calibration"]) -> DataSpec | None:
        """The recipe's spec for a split (calibration falls back to train); None when it has none."""
        section = self.settings.data
        if section is None:
            return None
        return section.for_calibration() if split == "calibration" else getattr(section, split)

    def load_split(
        self, split: Literal["train", "eval", "calibration"], needed_by: str, limit: int | None = None
    ) -> Dataset:
        """A split of the recipe's data, preprocessed for the current model; at most `limit` samples."""
        from vitcompress.data import load_dataset
        from vitcompress.errors import DataError

        spec = self.data_spec(split)
        if spec is None:
            fallback = " (or data.train)" if split == "calibration" else ""
            raise DataError(f"{needed_by} needs data.{split}{fallback} in the recipe")
        if limit is not None:
            spec = spec.model_copy(update={"limit": min(spec.limit or limit, limit)})
        if spec.source.value == "memory":
            from vitcompress.data import memory_dataset

            key = split
            if split == "calibration" and self.settings.data is not None and self.settings.data.calibration is None:
                key = "train"
            if key not in self.settings.memory:
                raise DataError(f"{needed_by}: data.{key} is 'memory' but no data was handed over for it")
            return memory_dataset(self.settings.memory[key], spec, self.model.input, self.model.num_classes)
        return load_dataset(spec, self.model.input, self.model.num_classes)

    def passed(self, cfg: Step, measured: Measured | None = None, **changes: Any) -> ModelState:
        """What a pass returns: the state with its measurements appended to the ledger, under the
        step's name and kind, and the `changes` it made (onnx_path, teacher, ...); a pass that
        declares `changes_model` marks the model changed. The pipeline adds the wall time."""
        record = PassRecord(name=cfg.step_name, kind=cfg.kind, **asdict_shallow(measured or Measured()))
        if cfg.changes_model:
            changes.setdefault("model_changed", True)
        return self.with_record(record, **changes)

    def with_record(self, record: PassRecord, **changes: Any) -> ModelState:
        from dataclasses import replace

        return replace(self, records=(*self.records, record), **changes)


@dataclass(frozen=True)
class RunResult:
    state: ModelState
    out_dir: Path
    budget_failures: tuple[str, ...]

    @property
    def ledger(self) -> tuple[PassRecord, ...]:
        return self.state.records
