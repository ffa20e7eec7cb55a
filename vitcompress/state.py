"""The state that flows through a recipe's passes, and the ledger record each pass leaves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from vitcompress.data import DataSection, Dataset, DataSpec
    from vitcompress.models.loader import LoadedModel


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
    """One row of the ledger."""

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


@dataclass(frozen=True)
class RunSettings:
    """Settings every pass may read: where to write, how to measure."""

    out_dir: Path
    seed: int = 0
    threads: int = 2
    data: DataSection | None = None  # the recipe's data splits, for passes that need data
    # progress(step name, done, total, metrics) for long passes (training); the CLI draws it
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None


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
        return load_dataset(spec, self.model.input, self.model.num_classes)

    def with_record(self, record: PassRecord, **changes: Any) -> ModelState:
        from dataclasses import replace

        return replace(self, records=(*self.records, record), **changes)
