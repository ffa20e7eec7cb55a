"""What a recipe or a `--data` flag says about one split: the source, the subset, the overrides."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vitcompress.errors import DataError, did_you_mean


class DataSource(str, Enum):
    fashion_mnist = "fashion-mnist"
    digits = "digits"
    folder = "folder"
    synthetic = "synthetic"
    memory = "memory"  # tensors or a DataLoader handed to the Python API; no recipe file can hold them


# Sources whose images live in memory as uint8 arrays; a folder is read lazily, image by image.
ARRAY_SOURCES = (DataSource.fashion_mnist, DataSource.digits, DataSource.synthetic)


class DataSpec(BaseModel):
    """One split of one data set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: DataSource = Field(
        ...,
        description="fashion-mnist, digits, folder or synthetic; memory: the DataLoader or tensors given "
        "to the Python API (vitcompress.compress(train=...)), recorded so the resolved recipe says so.",
    )
    path: Path | None = Field(
        None, description="Image folder (class/xxx.jpg), or the Fashion-MNIST directory (default: Debian's)."
    )
    split: Literal["train", "test"] = Field(
        "train",
        description="Fashion-MNIST's own split; digits are split 80/20, stratified, seed 0. An image "
        "folder is one split already (point path at its train/ or test/ directory).",
    )
    limit: int | None = Field(
        None, gt=0, description="Keep this many samples, stratified over classes (chosen before decoding)."
    )
    seed: int = Field(0, description="Seed of the stratified subset and of the shuffling order.")
    num_samples: int = Field(256, gt=0, description="Synthetic only: how many samples.")
    num_classes: int | None = Field(None, gt=1, description="Synthetic only (default: the model's).")
    resize: bool = Field(
        True, description="Resize images to the model's input size; off: a mismatch is an error."
    )
    mean: list[float] | None = Field(
        None, description="Override the model's normalization mean (per channel, in input_range units)."
    )
    std: list[float] | None = Field(None, description="Override the model's normalization std (per channel).")
    input_range: Literal["0-1", "0-255"] | None = Field(
        None,
        description="Override the pixel scale before mean/std: 0-1 (pixels / 255) or 0-255 (as stored). "
        "A model trained on [0, 1] inputs without normalization: input_range 0-1, mean 0, std 1.",
    )
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(
        None, description="Override the model's resize interpolation."
    )
    crop_pct: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Image folders: override the model's centre crop (resize to size / crop_pct, crop size).",
    )
    crop_mode: Literal["center", "squash", "border"] | None = Field(
        None, description="Image folders: override timm's crop mode (center keeps the aspect ratio)."
    )
    num_workers: int | None = Field(
        None, ge=0, description="Image folders: decoding threads (default: min(2, CPUs); 0: inline)."
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
        sources = {s.value for s in DataSource} - {DataSource.memory.value}
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
        """What a person reads: a split only where the source has splits (a folder or synthetic
        noise has none: calling an evaluation folder 'train' was wrong)."""
        limit = f"{self.limit} samples" if self.limit else None
        if self.source is DataSource.memory:
            return "in memory (given in Python)" + (f" ({limit})" if limit else "")
        if self.source is DataSource.folder:
            return f"folder {self.path}" + (f" ({limit})" if limit else "")
        if self.source is DataSource.synthetic:
            return f"synthetic ({self.limit or self.num_samples} samples)"
        where = f" {self.path}" if self.path else ""
        return f"{self.source.value}{where} ({self.split}{f', {limit}' if limit else ''})"


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
