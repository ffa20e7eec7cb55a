"""How images become the model's input: channels, size, pixel scale, mean/std.

The settings come from the model (`InputSpec`: timm's data config, a Hugging Face image processor, or
an exported file's metadata), and each data source may override mean, std, input range,
interpolation and crop. Image folders go through timm's own eval transform (resize to
size / crop_pct, centre crop, with the model's interpolation), image by image, so every size of
image is handled alike; in-memory arrays (Fashion-MNIST, digits, synthetic) are resized whole,
per batch. Both end in the same normalization: pixels scaled to the input range, then
(x - mean) / std.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from vitcompress.data.folder import describe_modes
from vitcompress.data.spec import DataSpec
from vitcompress.errors import DataError

if TYPE_CHECKING:
    import torch

    from vitcompress.models.loader import InputSpec

log = logging.getLogger("vitcompress.data")

INPUT_RANGES = ("0-1", "0-255")


def resolve_input(input_spec: InputSpec, spec: DataSpec | None) -> InputSpec:
    """The model's input spec with the data source's overrides applied, checked."""
    if spec is None:
        return input_spec
    for name in ("mean", "std"):
        values = getattr(spec, name)
        if values is not None and len(values) != input_spec.channels:
            raise DataError(
                f"data {name} has {len(values)} values, the model takes {input_spec.channels} channels"
            )
    if spec.std is not None and any(v <= 0 for v in spec.std):
        raise DataError(f"data std must be positive, got {spec.std}")
    resolved = replace(
        input_spec,
        mean=tuple(float(v) for v in spec.mean) if spec.mean is not None else input_spec.mean,
        std=tuple(float(v) for v in spec.std) if spec.std is not None else input_spec.std,
        interpolation=spec.interpolation or input_spec.interpolation,
        input_range=spec.input_range or input_spec.input_range,
        crop_pct=spec.crop_pct if spec.crop_pct is not None else input_spec.crop_pct,
        crop_mode=spec.crop_mode or input_spec.crop_mode,
    )
    if resolved.input_range not in INPUT_RANGES:
        raise DataError(f"input range {resolved.input_range!r} is not one of {', '.join(INPUT_RANGES)}")
    return resolved


def describe_input(spec: InputSpec, whole: bool = False) -> str:
    """One line: '3x32x32, bicubic, crop_pct 0.9 (center), pixels in [0, 1], mean (...) std (...)';
    `whole`: the data is resized whole (arrays), the crop is not applied."""

    def fmt(values: tuple[float, ...]) -> str:
        return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

    scale = "[0, 1]" if spec.input_range == "0-1" else "[0, 255]"
    return (
        f"{spec.channels}x{spec.height}x{spec.width}, {spec.interpolation}, "
        + ("whole image (no crop)" if whole else f"crop_pct {spec.crop_pct:g} ({spec.crop_mode})")
        + f", pixels in {scale}, mean {fmt(spec.mean)} std {fmt(spec.std)}"
    )


def normalize(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Pixels in [0, 1] (float, N x C x H x W) -> the model's input: scaled to its range, then (x - mean) / std."""
    import torch

    if spec.input_range == "0-255":
        x = x * 255.0
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _check_channels(data_channels: int, model_channels: int) -> None:
    if (data_channels not in (1, 3) or model_channels not in (1, 3)) and data_channels != model_channels:
        raise DataError(
            f"data has {data_channels} channels, the model takes {model_channels}",
            hint="only grey<->RGB are converted; give data with the model's channel count",
        )


class Preprocess:
    """In-memory uint8 images -> the model's normalized float input, one batch at a time."""

    def __init__(
        self,
        input_spec: InputSpec,
        data_channels: int,
        data_size: tuple[int, int],
        resize: bool,
        modes: dict[str, int] | None = None,
    ) -> None:
        self.spec = input_spec
        self.data_channels = data_channels
        self.data_size = data_size
        self.modes = modes or {("L" if data_channels == 1 else "RGB"): 0}
        want = (input_spec.height, input_spec.width)
        _check_channels(data_channels, input_spec.channels)
        self.resize_to: tuple[int, int] | None = None
        if data_size != want:
            if not resize:
                raise DataError(
                    f"data images are {data_size[0]}x{data_size[1]}, the model takes {want[0]}x{want[1]}",
                    hint="set resize: true in the data section, or build the model with --img-size",
                )
            log.warning(
                "data images resized from %dx%d to the model's %dx%d (%s, whole image)",
                *data_size,
                *want,
                input_spec.interpolation,
            )
            self.resize_to = want

    @property
    def mode(self) -> str:
        return "L" if self.data_channels == 1 else "RGB" if self.data_channels == 3 else "other"

    def conversions(self) -> str:
        return describe_modes(self.modes, self.spec.channels)

    def applied(self) -> dict[str, Any]:
        """The preprocessing as applied to this data (for reports): arrays are resized whole."""
        return {
            **self.spec.to_dict(),
            "crop_pct": 1.0,
            "crop_mode": "squash",
            "resize": "whole image" if self.resize_to else "none (already the model's size)",
            "source_size": list(self.data_size),
            "source_modes": dict(self.modes),
            "conversion": self.conversions(),
        }

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
        return normalize(x, self.spec)


def timm_transform(spec: InputSpec, resize: bool) -> Any:
    """timm's eval transform for `spec`, ending in a uint8 C x H x W tensor (normalization is ours).

    The data config goes through `timm.data.resolve_data_config` with every field given, so timm's
    defaults never replace the model's; `create_transform(use_prefetcher=True)` leaves the
    normalization out.
    """
    from timm.data import create_transform, resolve_data_config

    if not resize:
        from timm.data.transforms import MaybePILToTensor

        return MaybePILToTensor()
    config = resolve_data_config(
        {
            "input_size": spec.shape,
            "interpolation": spec.interpolation,
            "mean": spec.mean,
            "std": spec.std,
            "crop_pct": spec.crop_pct,
            "crop_mode": spec.crop_mode,
        }
    )
    return create_transform(**config, is_training=False, use_prefetcher=True)


class FolderPreprocess:
    """Image files -> the model's input: per image through timm's transform (in the decoding
    workers), then per batch through the normalization (here)."""

    def __init__(
        self, input_spec: InputSpec, modes: dict[str, int], sizes: torch.Tensor | Any, resize: bool
    ) -> None:
        import numpy as np

        self.spec = input_spec
        self.modes = modes
        self.resize = resize
        want = (input_spec.height, input_spec.width)
        sizes = np.asarray(sizes).reshape(-1, 2)
        self.size_range = (tuple(int(v) for v in sizes.min(0)), tuple(int(v) for v in sizes.max(0)))
        if not resize:
            wrong = sizes[(sizes != np.asarray(want)).any(1)]
            if len(wrong):
                raise DataError(
                    f"{len(wrong)} image(s) are not the model's {want[0]}x{want[1]}, e.g. "
                    f"{int(wrong[0][0])}x{int(wrong[0][1])}",
                    hint="set resize: true in the data section, or build the model with --img-size",
                )
        self.transform = timm_transform(input_spec, resize)

    def conversions(self) -> str:
        return describe_modes(self.modes, self.spec.channels)

    def resizing(self) -> str:
        if not self.resize:
            return "none (resize: false)"
        s = self.spec
        if s.crop_pct >= 1.0 and s.crop_mode == "squash":
            return f"per image, {s.interpolation}: stretched to {s.height}x{s.width}"
        return (
            f"per image, {s.interpolation}: resized to {s.height}x{s.width} / crop_pct {s.crop_pct:g} "
            f"({s.crop_mode}), then the centre {s.height}x{s.width} cropped"
        )

    def applied(self) -> dict[str, Any]:
        (h0, w0), (h1, w1) = self.size_range
        return {
            **self.spec.to_dict(),
            "resize": self.resizing(),
            "source_size": [h0, w0] if (h0, w0) == (h1, w1) else [[h0, w0], [h1, w1]],
            "source_modes": dict(self.modes),
            "conversion": self.conversions(),
        }

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x C x H x W (the decoded, resized, cropped images) -> normalized float."""
        return normalize(images.float().div_(255.0), self.spec)
