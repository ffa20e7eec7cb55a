"""Model references and loading.

A model reference is one of
  `timm:NAME`   a timm model by name, random-init or with `--checkpoint FILE`;
  `hf:DIR`      a local Hugging Face ViT/DeiT folder (safetensors only, never remote code);
  `DIR`         a vitcompress artifact (`model.safetensors` + `model.json`).
Loading always returns the model in eval mode with a forward that maps images to logits.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcompress.errors import (
    CheckpointError,
    InputShapeError,
    MissingDependencyError,
    ModelNotFoundError,
    UnsupportedModelError,
    did_you_mean,
)
from vitcompress.models.adapters import ViTAdapter, adapter_for
from vitcompress.models.checkpoint import StateDict, load_checkpoint
from vitcompress.models.timm_layout import ModelSetting, resolve_timm_kwargs, timm_settings

log = logging.getLogger(__name__)

ARTIFACT_MANIFEST = "model.json"
ARTIFACT_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from and how to build it: what the CLI flags and the recipe's `model:` hold."""

    source: str
    checkpoint: Path | None = None
    num_classes: int | None = None
    img_size: int | None = None
    in_chans: int | None = None
    trust_checkpoint: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InputSpec:
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    # How an image of any size becomes height x width (image folders; array data sets are resized
    # whole): resize to size / crop_pct, then crop the centre (timm's crop_mode: center keeps the
    # aspect ratio, squash stretches). Pixels are scaled to input_range ("0-1": /255, "0-255": as
    # they are) before (x - mean) / std.
    crop_pct: float = 1.0
    crop_mode: str = "center"
    input_range: str = "0-1"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}  # newer files' extras
        return cls(**{**known, "mean": tuple(data["mean"]), "std": tuple(data["std"])})


@dataclass
class LoadedModel:
    model: nn.Module
    adapter: ViTAdapter
    source: dict[str, Any]  # JSON-able recipe to rebuild the architecture without weights
    input: InputSpec
    num_classes: int
    label: str  # how to name it to a person
    # The architecture settings and where each came from (checkpoint tensor, flag, timm default, ...)
    settings: tuple[ModelSetting, ...] = ()

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.input.shape), generator=generator)


# --------------------------------------------------------------------------- timm


def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def build_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if name not in set(_timm_names()):
        raise ModelNotFoundError(f"unknown timm model {name!r}", hint=did_you_mean(name, _timm_names()))
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, AssertionError, ValueError) as err:
        raise ModelNotFoundError(
            f"timm model {name!r} rejected its arguments {kwargs}: {str(err).strip() or type(err).__name__}",
            hint="check --model-kwargs / --num-heads (model.kwargs in a recipe)",
        ) from err


def _head_keys(state_dict: StateDict) -> list[str]:
    return [k for k in state_dict if k.split(".")[0] in ("head", "head_dist") and k.endswith("weight")]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _misfit(
    path: Path, tensor: str, found: torch.Tensor, expected: torch.Tensor, why: str, fix: str
) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} does not fit the model: {tensor} is {_shape(found)} in the checkpoint, "
        f"the model expects {_shape(expected)} ({why})",
        hint=fix,
    )


PREFIX_TOKENS = ("cls_token", "dist_token", "reg_token")


def _prefix_count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(int(tensors[k].shape[1]) for k in PREFIX_TOKENS if k in tensors and tensors[k].ndim == 3)


def _check_timm_geometry(model: nn.Module, state_dict: StateDict, path: Path) -> tuple[int, int] | None:
    """Refuse a checkpoint of another width, patch size or token layout, naming the tensor and the fix.

    Returns the checkpoint's patch grid when its position embedding needs resampling to the model's
    (a resolution change, the one mismatch with a well-defined fix), else None.
    """
    own = model.state_dict()
    vit: Any = model
    conv = "patch_embed.proj.weight"
    theirs_pos, own_pos = state_dict.get("pos_embed"), own.get("pos_embed")
    width = (
        int(own_pos.shape[-1]) if own_pos is not None else int(own[conv].shape[0]) if conv in own else None
    )
    for key in ("pos_embed", "cls_token", conv):
        if key in state_dict and key in own and width is not None:
            found = state_dict[key]
            their_width = int(found.shape[0] if key == conv else found.shape[-1])
            if their_width != width:
                raise _misfit(
                    path,
                    key,
                    found,
                    own[key],
                    f"embedding width {their_width} vs {width}: another model size",
                    f"use the timm model the checkpoint was trained as (one with embed_dim {their_width}), "
                    "or drop --model-kwargs embed_dim (model.kwargs in a recipe): the checkpoint sets it",
                )
    if conv in state_dict and conv in own and state_dict[conv].ndim == 4:
        their_patch, our_patch = _shape(state_dict[conv])[2:], _shape(own[conv])[2:]
        if their_patch != our_patch:
            raise _misfit(
                path,
                conv,
                state_dict[conv],
                own[conv],
                f"{their_patch[0]}x{their_patch[1]} patches vs {our_patch[0]}x{our_patch[1]}",
                f"build the model with patch_size={their_patch[0]}: a timm name with patch{their_patch[0]}, "
                f"or --model-kwargs patch_size={their_patch[0]} (model.kwargs in a recipe)",
            )
    if theirs_pos is None or own_pos is None or _shape(theirs_pos) == _shape(own_pos):
        return None
    if theirs_pos.ndim != 3 or own_pos.ndim != 3:
        raise _misfit(
            path,
            "pos_embed",
            theirs_pos,
            own_pos,
            "another position embedding layout",
            "use the timm model the checkpoint was trained as",
        )
    their_tokens, our_tokens = _prefix_count(state_dict), _prefix_count(own)
    if their_tokens != our_tokens:
        names = ", ".join(k for k in PREFIX_TOKENS if k in state_dict) or "none"
        ours = ", ".join(k for k in PREFIX_TOKENS if k in own) or "none"
        raise _misfit(
            path,
            "pos_embed",
            theirs_pos,
            own_pos,
            f"{their_tokens} prefix token(s) in the checkpoint ({names}) vs {our_tokens} in the model ({ours})",
            "a checkpoint with dist_token is a distilled DeiT: use timm:deit_*_distilled_* for it, "
            "and a plain ViT/DeiT name for one without",
        )
    prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
    positions = int(theirs_pos.shape[1]) - prefix
    side = math.isqrt(positions) if positions > 0 else 0
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    if side < 1 or side * side != positions:
        raise _misfit(
            path,
            "pos_embed",
            theirs_pos,
            own_pos,
            f"{positions} patch position(s), not a square grid to resample to the model's "
            f"{grid[0]}x{grid[1]}",
            "build the model at the checkpoint's resolution with --img-size (or img_size in the recipe's "
            "model kwargs), with the same model name it was trained as",
        )
    return side, side


def _check_grid(model: nn.Module, name: str) -> None:
    """An input smaller than one patch leaves no tokens: refuse it before anything runs the model."""
    embed: Any = getattr(model, "patch_embed", None)
    if embed is None or getattr(embed, "grid_size", None) is None:
        return
    grid = tuple(int(g) for g in embed.grid_size)
    if min(grid) < 1:
        size = "x".join(str(int(s)) for s in embed.img_size)
        patch = "x".join(str(int(p)) for p in embed.patch_size)
        raise InputShapeError(
            f"timm:{name} built for {size} input has an empty {grid[0]}x{grid[1]} patch grid: "
            f"its patches are {patch}",
            hint=f"pass --img-size of at least {int(embed.patch_size[0])} (a multiple of it), or a smaller "
            "--model-kwargs patch_size (model.kwargs in a recipe)",
        )


def _fit_timm_state_dict(
    model: nn.Module, state_dict: StateDict, path: Path, img_size_given: bool
) -> StateDict:
    """Handle the mismatches that have a well-defined fix, explicitly and with a log line each;
    refuse, naming the tensor and the fix, those that have none."""
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    own = model.state_dict()
    state_dict = dict(state_dict)
    old_grid = _check_timm_geometry(model, state_dict, path)
    heads = [k for k in _head_keys(state_dict) if k in own and own[k].shape != state_dict[k].shape]
    if heads:
        log.warning(
            "classifier head re-initialized: checkpoint has %d classes, model built with %d (--num-classes)",
            state_dict[heads[0]].shape[0],
            own[heads[0]].shape[0],
        )
        for key in heads:
            state_dict.pop(key)
            state_dict.pop(key[: -len("weight")] + "bias", None)
    if old_grid is not None:
        vit: Any = model
        prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
        grid = [int(g) for g in vit.patch_embed.grid_size]
        patch = int(vit.patch_embed.patch_size[0])
        log.warning(
            "position embedding resampled from (%s) to (%s), %dx%d to %dx%d patches%s",
            ", ".join(map(str, state_dict["pos_embed"].shape)),
            ", ".join(map(str, own["pos_embed"].shape)),
            *old_grid,
            *grid,
            " for --img-size"
            if img_size_given
            else f": the checkpoint is for {old_grid[0] * patch} px; --img-size {old_grid[0] * patch} keeps it",
        )
        state_dict["pos_embed"] = resample_abs_pos_embed(
            state_dict["pos_embed"],
            new_size=grid,
            old_size=list(old_grid),
            num_prefix_tokens=prefix,
            verbose=False,
        )
    conv = "patch_embed.proj.weight"
    if conv in state_dict and state_dict[conv].shape[1] != own[conv].shape[1]:
        log.warning(
            "patch embedding adapted from %d to %d input channels (--in-chans)",
            state_dict[conv].shape[1],
            own[conv].shape[1],
        )
        state_dict[conv] = adapt_input_conv(own[conv].shape[1], state_dict[conv])
    return state_dict


def load_strict(
    model: nn.Module, state_dict: StateDict, path: Path, allow_missing: tuple[str, ...] = ()
) -> None:
    """Load weights; any missing, unexpected or mis-shaped key fails the load with the keys listed."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(allow_missing)]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state_dict
        if k in own and state_dict[k].shape != own[k].shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            problems.append(
                f"{label} ({len(keys)}): " + ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
            )
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: " + "; ".join(problems),
            hint="was it saved from another architecture? for a compressed model pass its artifact directory",
        )
    model.load_state_dict(state_dict, strict=False)


_WARNED_RANDOM: set[str] = set()


def _warn_random_weights(name: str) -> None:
    """Once per model name and process: a timm model without --checkpoint has random weights."""
    if name in _WARNED_RANDOM:
        return
    _WARNED_RANDOM.add(name)
    log.warning(
        "timm:%s has RANDOM weights: no checkpoint was given and vitcompress downloads nothing. "
        "Its accuracy means nothing; pass --checkpoint FILE (.safetensors preferred; model.checkpoint "
        "in a recipe) for trained weights",
        name,
    )


def load_timm(name: str, ref: ModelRef) -> LoadedModel:
    if name not in set(_timm_names()):
        raise ModelNotFoundError(f"unknown timm model {name!r}", hint=did_you_mean(name, _timm_names()))
    checkpoint = load_checkpoint(ref.checkpoint, trust=ref.trust_checkpoint) if ref.checkpoint else None
    state_dict = checkpoint.state_dict if checkpoint is not None else None
    resolution = resolve_timm_kwargs(
        name,
        ref.kwargs,
        {"num_classes": ref.num_classes, "img_size": ref.img_size, "in_chans": ref.in_chans},
        state_dict,
        checkpoint.metadata if checkpoint is not None else None,
    )
    kwargs = resolution.kwargs
    if state_dict is not None:
        inferred = {k: v for k, v in kwargs.items() if k not in ref.kwargs}
        log.info("timm:%s built with %s (from the checkpoint and flags)", name, inferred or "its defaults")
    model = build_timm(name, kwargs)
    adapter = adapter_for(model)
    _check_grid(model, name)
    allow_missing: tuple[str, ...] = ()
    if state_dict is None:
        _warn_random_weights(name)
    else:
        assert ref.checkpoint is not None
        state_dict = _fit_timm_state_dict(model, state_dict, ref.checkpoint, resolution.img_size_given)
        if any(k not in state_dict for k in (f"{h}.weight" for h in adapter.head_names)):
            allow_missing = tuple(f"{h}." for h in adapter.head_names)
        load_strict(model, state_dict, ref.checkpoint, allow_missing)
    model.eval()
    return _timm_loaded(model, adapter, name, kwargs, resolution.sources, f"timm:{name}")


def _timm_loaded(
    model: nn.Module,
    adapter: ViTAdapter,
    name: str,
    kwargs: dict[str, Any],
    sources: dict[str, str],
    label: str,
) -> LoadedModel:
    """A built timm ViT with what the passes need to know: its input (timm's data config) and
    the recipe to rebuild it."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    vit: Any = model
    height, width = (int(s) for s in vit.patch_embed.img_size)
    channels = int(vit.patch_embed.proj.in_channels)
    mean, std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
    if len(mean) != channels:
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return LoadedModel(
        model=model,
        adapter=adapter,
        source={"kind": "timm", "name": name, "kwargs": kwargs},
        input=InputSpec(
            channels,
            height,
            width,
            mean,
            std,
            str(cfg.get("interpolation", "bicubic")),
            crop_pct=float(cfg.get("crop_pct") or 1.0),
            crop_mode=str(cfg.get("crop_mode") or "center"),
        ),
        num_classes=int(vit.num_classes),
        label=label,
        settings=timm_settings(model, name, sources, kwargs),
    )


# --------------------------------------------------------------------------- Hugging Face

HF_ARCHITECTURES = (
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
)


class HFClassifier(nn.Module):
    """Wraps a transformers image classifier so that forward(images) returns the logits tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=pixel_values).logits  # type: ignore[no-any-return]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise MissingDependencyError(
            "Hugging Face models need the 'transformers' package",
            hint="pip install 'vitcompress[hf]'",
        ) from err
    return transformers


def build_hf(config_dict: dict[str, Any]) -> nn.Module:
    transformers = _transformers()
    config_dict = dict(config_dict)
    model_type = config_dict.get("model_type")
    if model_type not in ("vit", "deit"):
        raise UnsupportedModelError(
            f"Hugging Face model_type {model_type!r} is not supported", hint="supported: vit, deit"
        )
    config_cls = transformers.ViTConfig if model_type == "vit" else transformers.DeiTConfig
    config = config_cls.from_dict(config_dict)
    architecture = (config.architectures or [None])[0] or (
        "ViTForImageClassification" if model_type == "vit" else "DeiTForImageClassification"
    )
    if architecture not in HF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"Hugging Face architecture {architecture!r} is not an image classifier vitcompress supports",
            hint="supported: " + ", ".join(HF_ARCHITECTURES),
        )
    return HFClassifier(getattr(transformers, architecture)(config))


def _hf_preprocessing(processor: dict[str, Any], channels: int) -> dict[str, Any]:
    """InputSpec fields from a Hugging Face image processor's settings (preprocessor_config.json):
    mean/std (none when do_normalize is off), resample, the resize then centre crop, rescaling."""
    mean = tuple(processor.get("image_mean", (0.5,) * channels))
    std = tuple(processor.get("image_std", (0.5,) * channels))
    if processor.get("do_normalize") is False:
        mean, std = (0.0,) * channels, (1.0,) * channels
    # the image processor's `resample` is a PIL code: 0 nearest, 2 bilinear, 3 bicubic
    resample = int(processor.get("resample", 2))
    interpolation = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(resample, "bilinear")
    size, crop = processor.get("size"), processor.get("crop_size")
    side = size if isinstance(size, int) else (size or {}).get("shortest_edge") or (size or {}).get("height")
    crop_side = crop if isinstance(crop, int) else (crop or {}).get("height")
    crop_pct = 1.0
    if processor.get("do_center_crop") and side and crop_side:
        crop_pct = float(crop_side) / float(side)
    # a {height, width} (or int) size resizes to exactly that (stretching); shortest_edge keeps the aspect
    squash = not (isinstance(size, dict) and "shortest_edge" in size)
    rescale = processor.get("rescale_factor", 1 / 255) if processor.get("do_rescale", True) else 1.0
    return {
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "crop_mode": "squash" if squash else "center",
        "input_range": "0-255" if abs(float(rescale) - 1.0) < 1e-9 else "0-1",
    }


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _hf_not_a_folder(directory: Path) -> ModelNotFoundError:
    text = str(directory)
    if HUB_ID.match(text) and not directory.exists():
        return ModelNotFoundError(
            f"hf:{text} is not a local folder: Hugging Face hub ids need a local copy (vitcompress "
            "never downloads; this machine may have no network)",
            hint=f"on a machine with network run `hf download {text} --local-dir DIR` (or "
            f"from_pretrained('{text}').save_pretrained(DIR)), copy DIR here and pass hf:DIR",
        )
    if directory.exists():
        return ModelNotFoundError(
            f"hf:{text} is a file, not a Hugging Face model folder",
            hint="pass the folder that holds config.json and model.safetensors",
        )
    return ModelNotFoundError(
        f"Hugging Face model folder {directory} does not exist",
        hint="check the path; a hub id (org/name) needs a local copy: hf download ORG/NAME "
        "--local-dir DIR on a machine with network",
    )


def _hf_settings(config: Any) -> tuple[ModelSetting, ...]:
    """What config.json says about the architecture, for `inspect`."""
    rows = [
        ("patch_size", "patch_size"),
        ("embed_dim", "hidden_size"),
        ("depth", "num_hidden_layers"),
        ("num_heads", "num_attention_heads"),
        ("mlp_hidden", "intermediate_size"),
        ("qkv_bias", "qkv_bias"),
        ("img_size", "image_size"),
        ("in_chans", "num_channels"),
        ("num_classes", "num_labels"),
    ]
    return tuple(
        ModelSetting(name, getattr(config, key), f"config.json {key}")
        for name, key in rows
        if getattr(config, key, None) is not None
    )


def load_hf(directory: Path, ref: ModelRef) -> LoadedModel:
    import json

    if not directory.is_dir():
        raise _hf_not_a_folder(directory)
    if ref.checkpoint or ref.img_size or ref.in_chans or ref.kwargs:
        raise CheckpointError(
            "--checkpoint, --img-size, --in-chans, --model-kwargs and --num-heads do not apply to hf: models",
            hint="the folder's config.json and model.safetensors define the model",
        )
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{directory} has no config.json", hint="give a folder written by save_pretrained"
        )
    if not sorted(directory.glob("*.safetensors")):
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        raise CheckpointError(
            f"{directory} has no .safetensors weights"
            + (f" (found {', '.join(pickled)})" if pickled else ""),
            hint="vitcompress loads Hugging Face models from safetensors only; re-save with "
            "save_pretrained(safe_serialization=True)",
        )
    try:
        config_dict = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err
    transformers = _transformers()
    probe = build_hf(config_dict)  # validates model_type and architecture with our own errors
    hf_net: Any = probe.net
    net_cls, config = type(hf_net), hf_net.config
    reinit_head = ref.num_classes is not None and ref.num_classes != config.num_labels
    if reinit_head:
        log.warning(
            "classifier head re-initialized: checkpoint has %d classes, model built with %d (--num-classes)",
            config.num_labels,
            ref.num_classes,
        )
        config.num_labels = ref.num_classes
    transformers.logging.set_verbosity_error()
    try:
        net, info = net_cls.from_pretrained(
            directory,
            config=config,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
            ignore_mismatched_sizes=reinit_head,
        )
    except Exception as err:
        raise CheckpointError(
            f"corrupt or incomplete checkpoint {directory}: {str(err).strip().splitlines()[0]}",
            hint="re-save the model with save_pretrained",
        ) from err
    problems = []
    is_head = ("classifier.",)
    for label, keys in (
        ("missing", info.get("missing_keys", [])),
        ("unexpected", info.get("unexpected_keys", [])),
        ("shape mismatch", [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]),
    ):
        keys = [k for k in keys if not (reinit_head and is_head[0] in k)]
        if keys:
            problems.append(
                f"{label} ({len(keys)}): " + ", ".join(sorted(keys)[:4]) + (" ..." if len(keys) > 4 else "")
            )
    if problems:
        raise CheckpointError(
            f"checkpoint {directory} does not fit its config: " + "; ".join(problems),
            hint="re-save the model with save_pretrained",
        )
    wrapper = HFClassifier(net).eval()
    size = int(config.image_size)
    processor = directory / "preprocessor_config.json"
    settings = _hf_preprocessing(
        json.loads(processor.read_text()) if processor.is_file() else {}, int(config.num_channels)
    )
    config_out = net.config.to_dict()
    return LoadedModel(
        model=wrapper,
        adapter=adapter_for(wrapper),
        source={"kind": "hf", "config": config_out},
        input=InputSpec(int(config.num_channels), size, size, **settings),
        num_classes=int(net.config.num_labels),
        label=f"hf:{directory}",
        settings=_hf_settings(net.config),
    )


# --------------------------------------------------------------------------- in memory


def _timm_from_module(model: nn.Module, label: str | None) -> LoadedModel:
    """A timm ViT the caller holds: its architecture is read back from its own tensors (as from a
    checkpoint), so its artifacts rebuild without the caller's code."""
    vit: Any = model
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = str(cfg.get("architecture") or "")
    if name not in set(_timm_names()):
        raise ModelNotFoundError(
            f"this timm model does not name its architecture (pretrained_cfg architecture {name!r})",
            hint="create it with timm.create_model(NAME, ...) or pass it as a reference, timm:NAME",
        )
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    heads = int(vit.blocks[0].attn.num_heads) if len(getattr(vit, "blocks", ())) else None
    no_flags: dict[str, int | None] = {"num_classes": None, "img_size": None, "in_chans": None}
    resolution = resolve_timm_kwargs(name, {"num_heads": heads} if heads else {}, no_flags, state_dict)
    height, width = (int(s) for s in vit.patch_embed.img_size)
    kwargs = {**resolution.kwargs, "img_size": height if height == width else [height, width]}
    label = label or f"timm:{name} (in memory)"
    return _timm_loaded(model, adapter_for(model), name, kwargs, resolution.sources, label)


def _hf_from_module(model: nn.Module, label: str | None) -> LoadedModel:
    """A Hugging Face ViT/DeiT classifier the caller holds, wrapped to return logits."""
    net: Any = model.net if isinstance(model, HFClassifier) else model
    if type(net).__name__ not in HF_ARCHITECTURES:
        raise ModelNotFoundError(
            f"{type(net).__name__} is not a supported Hugging Face classifier",
            hint=f"use one of {', '.join(HF_ARCHITECTURES)}",
        )
    config = net.config
    wrapper = model if isinstance(model, HFClassifier) else HFClassifier(net)
    size = int(config.image_size)
    settings = _hf_preprocessing({}, int(config.num_channels))
    return LoadedModel(
        model=wrapper,
        adapter=adapter_for(wrapper),
        source={"kind": "hf", "config": config.to_dict()},
        input=InputSpec(int(config.num_channels), size, size, **settings),
        num_classes=int(config.num_labels),
        label=label or f"hf:{type(net).__name__} (in memory)",
        settings=_hf_settings(config),
    )


def from_module(model: nn.Module, label: str | None = None) -> LoadedModel:
    """A model the caller already holds (a timm ViT/DeiT or a Hugging Face ViT/DeiT classifier), as
    the passes take it. The module itself is used (not copied): passes that change the model edit it."""
    if not isinstance(model, nn.Module):
        raise ModelNotFoundError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            hint="pass a timm or Hugging Face ViT, or a reference such as timm:NAME or a path",
        )
    loaded = _hf_from_module(model, label) if _is_hf(model) else _timm_from_module(model, label)
    loaded.model.eval()
    return loaded


def _is_hf(model: nn.Module) -> bool:
    return isinstance(model, HFClassifier) or hasattr(getattr(model, "config", None), "to_dict")
