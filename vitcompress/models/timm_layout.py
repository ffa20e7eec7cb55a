"""What a timm ViT checkpoint says about its architecture, read from its tensors before the model is built.

A state dict fixes most constructor arguments of timm's `VisionTransformer`: the patch size, width
and input channels (the patch convolution), the depth (`blocks.N`), the MLP ratio (`fc1`), biases
and norms by their presence (`qkv.bias`, `q_norm`, `ls1.gamma`, `norm_pre`, `fc_norm`), the prefix
tokens (`cls_token`, `reg_token`, `dist_token`), the position grid and so the input size
(`pos_embed`), and the class count (`head.weight`). The head count does not change any shape: it
comes from `--num-heads`, the checkpoint's own training arguments, or the named model's default when
the width matches; failing those it is a guess of 64 channels per head, said loudly.

`resolve_timm_kwargs` turns that into the constructor kwargs (only those that differ from the named
model's defaults) and records for every setting where its value came from. Explicit kwargs win, but
one that contradicts the checkpoint's tensors is refused, naming the tensor, both shapes and the flag.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitcompress.errors import CheckpointError, ModelNotFoundError

log = logging.getLogger(__name__)

CONV = "patch_embed.proj.weight"
AVG_POOLS = ("avg", "avgmax", "max")
# Options with their own flag; in kwargs they mean the same and follow the same rules.
FLAGS = {"num_classes": "--num-classes", "img_size": "--img-size", "in_chans": "--in-chans"}
# The value used to switch LayerScale on when the named model has none: any non-zero value builds
# the same modules, and the checkpoint's gammas replace it on load.
LAYER_SCALE_INIT = 1e-5

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelSetting:
    """One architecture setting of a loaded model, its value, and where that value came from."""

    name: str
    value: Any
    source: str

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"setting": self.name, "value": value, "source": self.source}


@dataclass(frozen=True)
class Finding:
    """A setting a state dict determines, with the tensor that shows it (absent: `shape` is None)."""

    value: Any
    tensor: str
    shape: Shape | None

    def describe(self, note: str = "") -> str:
        where = (
            f"checkpoint {self.tensor} {self.shape}"
            if self.shape is not None
            else f"checkpoint: no {self.tensor}"
        )
        return f"{where}{f', {note}' if note else ''}"


@dataclass
class Resolution:
    kwargs: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    img_size_given: bool = False


def _shape(t: torch.Tensor) -> Shape:
    return tuple(int(d) for d in t.shape)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio that timm's `int(width * ratio)` turns back into exactly `hidden`."""
    ratio = hidden / width
    if int(width * ratio) == hidden:
        return round(ratio, 6) if int(width * round(ratio, 6)) == hidden else ratio
    return (hidden + 0.5) / width


def _block_ids(state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    ids = set()
    for key in state_dict:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
            ids.add(int(parts[1]))
    return sorted(ids)


def _uniform(state_dict: Mapping[str, torch.Tensor], ids: list[int], suffix: str, what: str) -> str | None:
    """The first block's tensor `suffix`; every block must have its shape (timm builds uniform blocks)."""
    keys = [f"blocks.{i}.{suffix}" for i in ids if f"blocks.{i}.{suffix}" in state_dict]
    if not keys:
        return None
    first = _shape(state_dict[keys[0]])
    other = next((k for k in keys if _shape(state_dict[k]) != first), None)
    if other is not None:
        raise CheckpointError(
            f"the checkpoint's blocks differ in {what}: {keys[0]} is {first}, {other} is "
            f"{_shape(state_dict[other])}; a timm constructor builds every block alike",
            hint="a model pruned by vitcompress loads from its artifact directory (pass it as MODEL), "
            "not as a timm checkpoint",
        )
    return keys[0]


def read_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Finding]:
    """Every constructor setting the tensors of a timm ViT state dict determine.

    Keys are `VisionTransformer` arguments, plus `dist_token` (DeiT's distilled class) and
    `pos_tokens` (the position embedding's length, which the resolver turns into a grid).
    """
    found: dict[str, Finding] = {}

    def presence(name: str, key: str) -> None:
        tensor = state_dict.get(key)
        found[name] = Finding(tensor is not None, key, _shape(tensor) if tensor is not None else None)

    width: int | None = None
    conv = state_dict.get(CONV)
    if conv is not None and conv.ndim == 4:
        shape = _shape(conv)
        kh, kw = shape[2], shape[3]
        found["patch_size"] = Finding(kh if kh == kw else (kh, kw), CONV, shape)
        found["embed_dim"] = Finding(shape[0], CONV, shape)
        found["in_chans"] = Finding(shape[1], CONV, shape)
        width = shape[0]
    else:
        for key in ("pos_embed", "cls_token"):
            tensor = state_dict.get(key)
            if tensor is not None and tensor.ndim == 3:
                width = int(tensor.shape[-1])
                found["embed_dim"] = Finding(width, key, _shape(tensor))
                break
    ids = _block_ids(state_dict)
    if ids:
        last = f"blocks.{ids[-1]}.norm1.weight"
        if last not in state_dict:
            last = next(k for k in state_dict if k.startswith(f"blocks.{ids[-1]}."))
        found["depth"] = Finding(ids[-1] + 1, last, _shape(state_dict[last]))
        fc1 = _uniform(state_dict, ids, "mlp.fc1.weight", "MLP width") or _uniform(
            state_dict, ids, "mlp.fc1_g.weight", "MLP width"
        )
        if fc1 is not None and width:
            hidden = int(state_dict[fc1].shape[0])
            found["mlp_ratio"] = Finding(_mlp_ratio(hidden, width), fc1, _shape(state_dict[fc1]))
        b0 = f"blocks.{ids[0]}."
        if _uniform(state_dict, ids, "attn.qkv.weight", "attention width") is not None:
            presence("qkv_bias", b0 + "attn.qkv.bias")
            presence("qk_norm", b0 + "attn.q_norm.weight")
            presence("scale_attn_norm", b0 + "attn.norm.weight")
            presence("proj_bias", b0 + "attn.proj.bias")
        if fc1 is not None:
            presence("scale_mlp_norm", b0 + "mlp.norm.weight")
        presence("init_values", b0 + "ls1.gamma")
    presence("class_token", "cls_token")
    presence("dist_token", "dist_token")
    reg = state_dict.get("reg_token")
    found["reg_tokens"] = Finding(
        int(reg.shape[1]) if reg is not None and reg.ndim == 3 else 0,
        "reg_token",
        _shape(reg) if reg is not None else None,
    )
    presence("pre_norm", "norm_pre.weight")
    presence("fc_norm", "fc_norm.weight")
    presence("norm", "norm.weight")
    pool = next((k for k in state_dict if k.startswith("attn_pool.")), None)
    if pool is not None:
        found["global_pool"] = Finding("map", pool, _shape(state_dict[pool]))
    head = state_dict.get("head.weight")
    if head is not None and head.ndim == 2:
        found["num_classes"] = Finding(int(head.shape[0]), "head.weight", _shape(head))
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        found["pos_tokens"] = Finding(int(pos.shape[1]), "pos_embed", _shape(pos))
    elif conv is not None:
        found["pos_embed"] = Finding("none", "pos_embed", None)
    return found


# --------------------------------------------------------------------------- building


def meta_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The timm model built without memory (on the meta device): its structure and shapes, no weights."""
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def _try_meta(name: str, kwargs: dict[str, Any]) -> nn.Module | None:
    try:
        return meta_model(name, kwargs)
    except Exception:  # a constructor that cannot run on the meta device: decide without it
        log.debug("timm:%s does not build on the meta device", name, exc_info=True)
        return None


def _is_vit(model: nn.Module | None) -> bool:
    if model is None:
        return False
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _accepted(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for cls in type(model).__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None and cls is not nn.Module:
            with contextlib.suppress(TypeError, ValueError):
                names |= set(inspect.signature(init).parameters)
    return names


def _model_values(model: nn.Module) -> dict[str, Any]:
    """The settings of a built (or meta-built) timm ViT, under the same names as `read_layout`."""
    vit: Any = model
    layout = read_layout(model.state_dict())
    values = {k: f.value for k, f in layout.items()}
    values["num_heads"] = int(vit.blocks[0].attn.num_heads) if len(vit.blocks) else None
    values["global_pool"] = str(vit.global_pool)
    values["no_embed_class"] = bool(getattr(vit, "no_embed_class", False))
    size = tuple(int(s) for s in vit.patch_embed.img_size)
    values["img_size"] = size[0] if size[0] == size[1] else size
    values["num_classes"] = int(vit.num_classes)
    values.setdefault("pos_embed", "learn")
    values["final_norm"] = bool(values.get("fc_norm") or values.get("norm"))
    return values


# --------------------------------------------------------------------------- comparing kwargs with tensors


def _norm(name: str, value: Any, width: int) -> Any:
    """A kwarg's value in the form the tensors show it, to compare an explicit kwarg with them."""
    if name == "patch_size":
        return _pair(value)
    if name == "mlp_ratio":
        return int(width * float(value))
    if name in ("init_values",):
        return bool(value)
    if name == "pos_embed":
        return value not in ("", "none", None, False)
    if isinstance(value, bool) or name in (
        "qkv_bias",
        "qk_norm",
        "proj_bias",
        "scale_attn_norm",
        "scale_mlp_norm",
        "class_token",
        "pre_norm",
        "no_embed_class",
    ):
        return bool(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _block_of(key: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", key)
    return int(match.group(1)) if match else None


Diff = tuple[str, Shape | None, Shape | None]  # tensor, its shape in the checkpoint, in the model


def _diff(model_sd: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> list[Diff]:
    out = []
    for key in dict.fromkeys([*model_sd, *state_dict]):
        theirs = _shape(state_dict[key]) if key in state_dict else None
        ours = _shape(model_sd[key]) if key in model_sd else None
        if theirs != ours:
            out.append((key, theirs, ours))
    return out


def _caused_by(name: str, diff: Diff) -> bool:
    """Whether an explicit kwarg `name` can cause this difference between model and checkpoint."""
    tensor, theirs, ours = diff
    both = theirs is not None and ours is not None
    one_sided = (theirs is None) != (ours is None)

    def named(*parts: str) -> bool:
        return any(part in tensor for part in parts)

    if name == "patch_size":
        return tensor == CONV and both and theirs[2:] != ours[2:]  # type: ignore[index]
    if name == "embed_dim":
        if tensor == CONV:
            return both and theirs[0] != ours[0]  # type: ignore[index]
        return tensor in ("cls_token", "pos_embed") and both and theirs[-1] != ours[-1]  # type: ignore[index]
    if name == "depth":
        return _block_of(tensor) is not None and one_sided
    if name == "mlp_ratio":
        return named(".mlp.fc1.", ".mlp.fc2.weight") and both
    presence = {
        "qkv_bias": (".attn.qkv.bias",),
        "proj_bias": (".attn.proj.bias", ".mlp.fc1.bias", ".mlp.fc2.bias"),
        "qk_norm": (".attn.q_norm.", ".attn.k_norm."),
        "scale_attn_norm": (".attn.norm.",),
        "scale_mlp_norm": (".mlp.norm.",),
        "init_values": (".ls1.", ".ls2."),
    }
    if name in presence:
        return named(*presence[name]) and one_sided
    if name in ("class_token", "reg_tokens"):
        return tensor == {"class_token": "cls_token", "reg_tokens": "reg_token"}[name] or (
            tensor == "pos_embed" and both
        )
    if name == "pos_embed":
        return tensor == "pos_embed" and one_sided
    if name == "pre_norm":
        return tensor.startswith("norm_pre.") or tensor == "patch_embed.proj.bias"
    if name in ("global_pool", "fc_norm", "final_norm"):
        return tensor.startswith(("norm.", "fc_norm.", "attn_pool."))
    return False


def _flag(name: str, origin: dict[str, str]) -> str:
    return origin.get(name, "--model-kwargs")


def _fix(name: str, origin: dict[str, str], value: Any, should: Any | None) -> str:
    flag = _flag(name, origin)
    given = (
        f"{flag} {value}" if flag.startswith("--") and flag != "--model-kwargs" else f"{flag} {name}={value}"
    )
    recipe = f"model.{name}" if flag in FLAGS.values() else f"model.kwargs.{name}"
    if should is None:
        return f"drop {given} ({recipe} in a recipe): the checkpoint was built without it"
    return f"drop {given} ({recipe} in a recipe), or set it to {should}: what the checkpoint was built with"


def _show(value: Any) -> str:
    return "absent" if value is None else str(value)


def _conflict(
    name: str, value: Any, origin: dict[str, str], diff: Diff, should: Any | None
) -> CheckpointError:
    tensor, theirs, ours = diff
    found = (
        f"{tensor} is {theirs} in the checkpoint"
        if theirs is not None
        else f"{tensor} is absent from the checkpoint"
    )
    built = f"the model built with {name}={value!r}"
    expected = f"{built} expects {ours}" if ours is not None else f"{built} has no such tensor"
    return CheckpointError(
        f"checkpoint does not fit {name}={value!r} from {_flag(name, origin)}: {found}, {expected}",
        hint=_fix(name, origin, value, should),
    )


# --------------------------------------------------------------------------- resolving


def _guess_heads(width: int) -> int:
    """Heads of 64 channels, or the divisor of the width whose head size is nearest 64."""
    if width % 64 == 0:
        return width // 64
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    return min(divisors, key=lambda d: (abs(width / d - 64), d))


def _args_heads(metadata: Mapping[str, Any], width: int, name: str) -> tuple[int, str] | None:
    """num_heads from a timm training checkpoint's `args`: its model_kwargs, else its model's default."""
    args = metadata.get("args") or {}
    model_kwargs = args.get("model_kwargs") or {}
    if isinstance(model_kwargs, Mapping) and isinstance(model_kwargs.get("num_heads"), int):
        return int(model_kwargs["num_heads"]), "checkpoint args (model_kwargs num_heads)"
    trained_as = args.get("model") or metadata.get("arch")
    if isinstance(trained_as, str) and trained_as != name:
        import timm

        if trained_as in timm.list_models():
            other = _try_meta(trained_as, {})
            if _is_vit(other):
                assert other is not None
                values = _model_values(other)
                if values.get("embed_dim") == width and values.get("num_heads"):
                    return int(values["num_heads"]), f"timm default of {trained_as} (checkpoint args model)"
    return None


def resolve_timm_kwargs(
    name: str,
    kwargs: Mapping[str, Any],
    flags: Mapping[str, int | None],
    state_dict: Mapping[str, torch.Tensor] | None,
    metadata: Mapping[str, Any] | None = None,
) -> Resolution:
    """The constructor kwargs for timm model `name` and where each setting comes from.

    `kwargs` are the explicit model kwargs (`--model-kwargs`, `--num-heads`, a recipe's
    `model.kwargs`), `flags` the values of --num-classes, --img-size and --in-chans.
    """
    explicit = dict(kwargs)
    origin = {k: ("--num-heads" if k == "num_heads" else "--model-kwargs") for k in explicit}
    for key, value in flags.items():
        if value is not None:  # the option wins over a kwarg of the same name
            explicit[key] = value
            origin[key] = FLAGS[key]
    given_size = "img_size" in explicit
    sources = {k: origin[k] for k in explicit}
    if state_dict is None:
        return Resolution(explicit, sources, given_size)
    default = _try_meta(name, {})
    if default is None or not _is_vit(default):
        return Resolution(explicit, sources, given_size)  # not a ViT: the adapter check says so
    base = _model_values(default)
    found = read_layout(state_dict)
    out: dict[str, Any] = {}
    accepted = _accepted(default)

    def decide(key: str, value: Any, source: str, always: bool = False) -> None:
        if key in explicit:
            return
        if always or value != base.get(key):
            if key not in accepted:
                raise CheckpointError(
                    f"the checkpoint needs {key}={value!r} ({source}), which timm's {type(default).__name__} "
                    "of this installation does not accept",
                    hint="upgrade timm (pip install -U timm)",
                )
            out[key] = value
        sources[key] = source

    width = int(found["embed_dim"].value) if "embed_dim" in found else int(base.get("embed_dim") or 0)
    for key in (
        "patch_size",
        "embed_dim",
        "depth",
        "mlp_ratio",
        "qkv_bias",
        "proj_bias",
        "qk_norm",
        "scale_attn_norm",
        "scale_mlp_norm",
        "class_token",
        "reg_tokens",
        "pre_norm",
        "pos_embed",
    ):
        if key not in found:
            continue
        finding = found[key]
        if (
            key in ("mlp_ratio",)
            and key in base
            and _norm(key, base[key], width) == _norm(key, finding.value, width)
        ):
            sources[key] = finding.describe()  # the same width; keep the named model's ratio
            continue
        decide(key, finding.value, finding.describe())
    if "init_values" in found:
        has_ls = bool(found["init_values"].value)
        if has_ls != bool(base.get("init_values")):
            decide(
                "init_values",
                LAYER_SCALE_INIT if has_ls else 0.0,  # timm drops None kwargs; 0 builds no LayerScale
                found["init_values"].describe(),
            )
        else:
            sources["init_values"] = found["init_values"].describe()
    if "dist_token" in found:
        sources["dist_token"] = found["dist_token"].describe()
    _decide_pooling(found, base, explicit, decide, sources)
    for key in ("in_chans", "num_classes"):
        if key in found and key not in explicit:
            decide(key, found[key].value, found[key].describe(), always=True)
    if "head.weight" not in state_dict and "num_classes" not in explicit:
        sources["num_classes"] = f"timm default of {name} (the checkpoint has no head.weight)"
    patch = _pair(explicit.get("patch_size", out.get("patch_size", base.get("patch_size", 16))))
    _decide_grid(found, base, explicit, out, sources, decide, patch, name)
    final_width = int(explicit.get("embed_dim", width))
    warning = _decide_heads(
        name, base, explicit, origin, out, sources, final_width, metadata or {}, state_dict
    )
    resolved = {**out, **explicit}
    _check_explicit(name, resolved, explicit, origin, found, state_dict, final_width)
    if warning is not None:
        log.warning("%s", warning)
    return Resolution(resolved, sources, given_size)


def _decide_pooling(
    found: dict[str, Finding],
    base: dict[str, Any],
    explicit: dict[str, Any],
    decide: Callable[..., None],
    sources: dict[str, str],
) -> None:
    """Final norm vs fc_norm and the pooling they imply, where the tensors say. The pooling itself
    (token or average) changes no tensor: an explicit global_pool is kept, with the norms it needs."""
    pool, pool_source = str(base["global_pool"]), None
    has_fc, has_norm = bool(found["fc_norm"].value), bool(found["norm"].value)
    if "global_pool" in explicit:
        pool = str(explicit["global_pool"])
    elif "global_pool" in found:
        pool, pool_source = "map", found["global_pool"].describe("attention pooling")
    elif has_fc and pool not in AVG_POOLS:
        pool, pool_source = "avg", found["fc_norm"].describe("average pooling, the layout fc_norm belongs to")
    elif not found["class_token"].value and pool in ("token", "map"):
        pool, pool_source = "avg", found["class_token"].describe("no class token to pool")
    elif pool == "map":
        pool, pool_source = "token", "checkpoint: no attn_pool"
    if pool_source is not None:
        decide("global_pool", pool, pool_source)
    base_fc = bool(base.get("fc_norm"))
    if has_fc != base_fc or pool != base["global_pool"]:
        decide("fc_norm", has_fc, found["fc_norm"].describe(), always=True)
    else:
        sources["fc_norm"] = found["fc_norm"].describe()
    final = has_fc or has_norm
    if final != (base_fc or bool(base.get("norm"))):
        decide("final_norm", final, found["norm"].describe())


def _decide_grid(
    found: dict[str, Finding],
    base: dict[str, Any],
    explicit: dict[str, Any],
    out: dict[str, Any],
    sources: dict[str, str],
    decide: Callable[..., None],
    patch: tuple[int, int],
    name: str,
) -> None:
    """no_embed_class and the input size from the position embedding's length."""
    if "pos_tokens" not in found:
        return
    pos = found["pos_tokens"]
    tokens = int(pos.value)

    def flag(key: str, fallback: Any) -> Any:
        return explicit.get(key, out.get(key, fallback))

    prefix = int(bool(flag("class_token", base.get("class_token")))) + int(
        flag("reg_tokens", base.get("reg_tokens") or 0)
    )
    prefix += int(bool(found["dist_token"].value)) if "dist_token" in found else 0
    options: list[tuple[bool, int]] = []
    for no_embed, positions in ((False, tokens - prefix), (True, tokens)):
        side = math.isqrt(positions) if positions > 0 else 0
        if side >= 1 and side * side == positions and (not no_embed or prefix > 0):
            options.append((no_embed, side))
    if not options:
        return  # not a square grid: the load names pos_embed and the fix
    if "no_embed_class" in explicit:
        wanted = bool(explicit["no_embed_class"])
        if all(o[0] != wanted for o in options):
            layout = f"{options[0][1]}x{options[0][1]} positions" + (
                "" if options[0][0] else f" + {prefix} prefix"
            )
            raise CheckpointError(
                f"checkpoint does not fit no_embed_class={explicit['no_embed_class']!r} from "
                f"--model-kwargs: pos_embed is {pos.shape} in the checkpoint ({layout}), which "
                f"no_embed_class={wanted} cannot lay out",
                hint=_fix("no_embed_class", {}, explicit["no_embed_class"], not wanted),
            )
        options = [o for o in options if o[0] == wanted]
    options.sort(key=lambda o: o[0] != bool(base.get("no_embed_class")))
    no_embed, side = options[0]
    note = "no_embed_class" if no_embed else f"{prefix} prefix token(s)"
    decide("no_embed_class", no_embed, pos.describe(f"{side}x{side} positions after {note}"))
    if "img_size" in explicit or patch[0] != patch[1]:
        return
    size = side * patch[0]
    decide("img_size", size, pos.describe(f"{side}x{side} patches of {patch[0]} px"))


def _decide_heads(
    name: str,
    base: dict[str, Any],
    explicit: dict[str, Any],
    origin: dict[str, str],
    out: dict[str, Any],
    sources: dict[str, str],
    width: int,
    metadata: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
) -> str | None:
    """Decide num_heads; returns the warning to give once the rest of the load has been checked."""
    warning = None
    if "num_heads" in explicit:
        heads = explicit["num_heads"]
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or width % heads:
            qkv = next((k for k in state_dict if k.endswith("attn.qkv.weight")), CONV)
            shape = _shape(state_dict[qkv]) if qkv in state_dict else None
            raise CheckpointError(
                f"{_flag('num_heads', origin)} {heads!r} does not divide the width {width} "
                f"({qkv} is {_show(shape)} in the checkpoint)",
                hint=f"pass --num-heads with a divisor of {width}, e.g. {_guess_heads(width)} "
                f"({width // _guess_heads(width)} channels per head)",
            )
        return None
    base_width, base_heads = base.get("embed_dim"), base.get("num_heads")
    from_args = _args_heads(metadata, width, name)
    if from_args is not None:
        heads, source = from_args
    elif base_width == width and base_heads:
        heads, source = int(base_heads), f"timm default of {name} (same width {width})"
    else:
        heads = _guess_heads(width)
        source = (
            f"GUESS: {width // heads} channels per head (width {width} is not {name}'s {base_width}, "
            "nothing records the head count)"
        )
        warning = (
            f"num_heads={heads} is a GUESS ({width // heads} channels per head): the checkpoint's width "
            f"{width} differs from timm:{name}'s {base_width} and the head count does not show in any "
            "tensor. A wrong guess loads without error but computes wrong outputs: pass --num-heads N "
            "(model.kwargs.num_heads in a recipe)"
        )
    if heads != base_heads:
        out["num_heads"] = heads
    sources["num_heads"] = source
    return warning


def _check_explicit(
    name: str,
    resolved: dict[str, Any],
    explicit: dict[str, Any],
    origin: dict[str, str],
    found: dict[str, Finding],
    state_dict: Mapping[str, torch.Tensor],
    width: int,
) -> None:
    """Refuse an explicit kwarg that contradicts the checkpoint, naming the tensor, shapes and flag."""
    keys = [k for k in explicit if k not in FLAGS and k != "num_heads"]
    if not keys:
        return
    # an explicit value the tensors contradict (they show another value)
    contradicted = [
        k for k in keys if k in found and _norm(k, explicit[k], width) != _norm(k, found[k].value, width)
    ]
    try:
        own: Mapping[str, torch.Tensor] = meta_model(name, resolved).state_dict()
    except Exception as err:  # the constructor's own complaint about the combination
        if not contradicted:
            raise ModelNotFoundError(
                f"timm model {name!r} rejected its arguments {resolved}: "
                f"{str(err).strip() or type(err).__name__}",
                hint="check --model-kwargs / --num-heads (model.kwargs in a recipe)",
            ) from err
        own = {}
    diffs = _diff(own, state_dict) if own else []
    for key in [*contradicted, *(k for k in keys if k not in found)]:
        finding = found.get(key)
        should = finding.value if finding is not None else None
        if key == "init_values" and finding is not None:
            should = LAYER_SCALE_INIT if finding.value else None
        mine = [d for d in diffs if _caused_by(key, d)]
        caused = next((d for d in mine if finding is not None and d[0] == finding.tensor), None)
        caused = caused or (mine[0] if mine else None)
        if caused is None and finding is not None and not own:  # no model to compare with
            shown = f"is {finding.shape}" if finding.shape is not None else "is absent from"
            raise CheckpointError(
                f"checkpoint does not fit {key}={explicit[key]!r} from {_flag(key, origin)}: "
                f"{finding.tensor} {shown} in the checkpoint, which means {key}={should!r}",
                hint=_fix(key, origin, explicit[key], should),
            )
        if caused is None and finding is not None:
            ours = _shape(own[finding.tensor]) if finding.tensor in own else None
            caused = (finding.tensor, finding.shape, ours)
        if caused is not None:
            raise _conflict(key, explicit[key], origin, caused, should)


def timm_settings(
    model: nn.Module, name: str, sources: Mapping[str, str], kwargs: Mapping[str, Any]
) -> tuple[ModelSetting, ...]:
    """The built model's architecture settings, each with the source recorded when it was resolved;
    the rarer ones only when they were set."""
    values = _model_values(model)
    default = f"timm default of {name}"
    rows: list[ModelSetting] = []
    for key in (
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "qk_norm",
        "init_values",
        "class_token",
        "dist_token",
        "reg_tokens",
        "no_embed_class",
        "global_pool",
        "fc_norm",
        "pre_norm",
        "img_size",
        "in_chans",
        "num_classes",
    ):
        if key not in values:
            continue
        value = values[key]
        if key == "init_values":
            key, value = "layer_scale", bool(value)
            source = sources.get("init_values", default)
        else:
            source = sources.get(key, default)
        if key == "mlp_ratio" and isinstance(value, float):
            value = round(value, 4)
        rows.append(ModelSetting(key, value, source))
    for key in ("proj_bias", "scale_attn_norm", "scale_mlp_norm", "final_norm", "pos_embed"):
        if key in kwargs and key in values:
            rows.append(ModelSetting(key, values[key], sources[key]))
    return tuple(rows)
