"""Command options generated from a pass config's fields: declared once, in pydantic.

`@config_options(PruneConfig)` adds one option per field of the config to a command: its name
(`--field-name`, or the flag in `flags` where it differs), its type, its help (the field's
`description`) and its default (shown in --help, and left to the config: an option not given is
not passed, so presets and validators that fill fields still work). The command receives a
`ConfigFlags` in its `options` parameter and builds the config with `options.build(...)`, adding what it
sets itself (an output file name). A field the command declares as a parameter of its own is not
generated (it has its own form on the command line, e.g. a nested teacher); a field whose type
has no command-line form (a mapping, a nested model) stays recipe-only.
"""

from __future__ import annotations

import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

C = TypeVar("C", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])

_SCALARS = (bool, int, float, str, Path)

# The default of a command's `cfg` parameter, filled by @config_options: `options: ConfigFlags[Config] = GENERATED`
GENERATED: Any = None


@dataclass(frozen=True)
class ConfigFlags(Generic[C]):
    """The config options a user gave (None: not given), and how each is spelled on the command line."""

    config: type[C]
    given: dict[str, Any]
    flags: Mapping[str, str] = field(default_factory=dict)  # field -> flag, where it is not --field-name

    def flag(self, name: str) -> str:
        return self.flags.get(name, "--" + name.replace("_", "-"))

    def build(self, **extra: Any) -> C:
        """The config from the options given plus `extra` (fields the command sets itself); a
        validation error names the flag."""
        from vitcompress.cli.common import build_config

        return build_config(self.config, flag_names=self.flags, **{**self.given, **extra})

    def __getitem__(self, name: str) -> Any:
        return self.given.get(name)


def _strip_optional(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    return annotation


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(getattr(v, "value", v)) for v in typing.get_args(annotation)]
    return None


class _Literal(str, enum.Enum):
    """The choices of a `Literal[...]` field, as the enum Typer shows and checks."""


def _literal_enum(name: str, choices: list[str]) -> type[enum.Enum]:
    return _Literal(name.title().replace("_", ""), {c: c for c in choices})  # type: ignore[call-overload,no-any-return]


def _cli_type(name: str, annotation: Any) -> Any | None:
    """The type Typer parses for a field, or None when the type has no flag form."""
    inner = _strip_optional(annotation)
    choices = _choices(inner)
    if choices is not None:
        return _literal_enum(name, choices)
    if isinstance(inner, type) and (issubclass(inner, enum.Enum) or issubclass(inner, _SCALARS)):
        return inner
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner)
        if isinstance(item, type) and (issubclass(item, enum.Enum) or issubclass(item, _SCALARS)):
            return list[item]  # type: ignore[valid-type]
        item_choices = _choices(item)
        if item_choices is not None:
            return list[_literal_enum(name, item_choices)]  # type: ignore[misc]
    return None


def _plain(value: Any) -> Any:
    """A generated choice back to the string the config's Literal takes."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.value if isinstance(value, _Literal) else value


def _shown_default(info: FieldInfo) -> str | bool:
    default = info.get_default(call_default_factory=True)
    if default is None or default == []:
        return False
    if isinstance(default, list):
        return " ".join(str(getattr(v, "value", v)) for v in default)
    return str(getattr(default, "value", default))


def config_parameters(
    config: type[BaseModel], flags: Mapping[str, str], skip: set[str]
) -> list[inspect.Parameter]:
    """One keyword parameter per field of `config` (but `skip` and those without a flag form),
    annotated with the typer.Option that parses it; every default is None (not given)."""
    parameters = []
    for name, info in config.model_fields.items():
        if name in skip or name in ("kind", "name"):
            continue
        cli_type = _cli_type(name, info.annotation)
        if cli_type is None:
            continue
        flag = flags.get(name, "--" + name.replace("_", "-"))
        decls = [flag]
        if cli_type is bool and "/" not in flag:
            decls = [f"{flag}/--no-{flag.removeprefix('--')}"]
        option = typer.Option(*decls, help=info.description or "", show_default=_shown_default(info))
        annotation = Annotated[cli_type | None, option]  # type: ignore[operator,valid-type]
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        )
    return parameters


def inject_options(
    command: F, parameters: list[inspect.Parameter], into: str, pack: Callable[[dict[str, Any]], Any]
) -> F:
    """`command` with `parameters` added to its command-line signature; their values reach it packed
    into one argument, `into` (`pack(values)`). Parameters the command declares itself win."""
    signature = inspect.signature(command, eval_str=True)  # in the command's own module
    own = [p for name, p in signature.parameters.items() if name != into]
    taken = {p.name for p in own}
    added = [p for p in parameters if p.name not in taken]
    names = {p.name for p in added}

    @functools.wraps(command)
    def run(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in names}
        return command(**kwargs, **{into: pack(values)})

    # --help order: the command's required parameters, the added options, then the rest
    required = [p for p in own if p.default is inspect.Parameter.empty]
    optional = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in required]
    new = signature.replace(
        parameters=[p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in required]
        + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in added]
        + optional
    )
    run.__signature__ = new  # type: ignore[attr-defined]
    del run.__wrapped__  # typer must read the new signature, not the command's
    run.__annotations__ = {p.name: p.annotation for p in new.parameters.values()}
    return run  # type: ignore[return-value]


def config_options(
    config: type[C], *, flags: Mapping[str, str] | None = None, exclude: set[str] | None = None
) -> Callable[[F], F]:
    """Give a command one option per field of `config` (see the module docstring). The command has
    an `options: ConfigFlags[Config]` parameter (`cfg = options.build()`); `flags` spells a field's flag where it differs from
    `--field-name` (kept for compatibility); `exclude` names fields the command sets itself."""
    aliases = dict(flags or {})

    def decorate(command: F) -> F:
        own = set(inspect.signature(command).parameters)
        generated = config_parameters(config, aliases, set(exclude or ()) | own)

        def pack(values: dict[str, Any]) -> ConfigFlags[C]:
            given = {k: _plain(v) for k, v in values.items() if v is not None}
            return ConfigFlags(config, given, aliases)

        return inject_options(command, generated, "options", pack)

    return decorate


def model_options(command: F) -> F:
    """Give a command the flags that build a model from a reference (--checkpoint, --num-classes,
    --img-size, --in-chans, --model-kwargs, --num-heads, --trust-checkpoint), declared once here;
    the command receives them as `model_flags: ModelFlags`."""
    from vitcompress.cli.common import (
        CheckpointOpt,
        ImgSizeOpt,
        InChansOpt,
        ModelFlags,
        ModelKwargsOpt,
        NumClassesOpt,
        NumHeadsOpt,
        TrustOpt,
    )

    flags = [
        ("checkpoint", CheckpointOpt, None),
        ("num_classes", NumClassesOpt, None),
        ("img_size", ImgSizeOpt, None),
        ("in_chans", InChansOpt, None),
        ("model_kwargs", ModelKwargsOpt, None),
        ("num_heads", NumHeadsOpt, None),
        ("trust_checkpoint", TrustOpt, False),
    ]
    parameters = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in flags
    ]
    return inject_options(command, parameters, "model_flags", lambda values: ModelFlags(**values))
