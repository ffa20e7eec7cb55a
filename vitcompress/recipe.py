"""Recipes: versioned YAML, validated by pydantic with `extra="forbid"` at every depth.

A recipe names the model, run settings, the passes in order (a discriminated union on `kind`) and
the budgets that gate the result. Errors come back one line each with file:line, the section, the
bad value and the fix; an unknown key names the closest valid key of its section.
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from vitcompress.data import DataSection
from vitcompress.errors import RecipeError, closest, did_you_mean
from vitcompress.passes import PASS_CONFIGS, PASSES, Needs
from vitcompress.passes.base import PassConfig

RECIPE_VERSION = 1

if TYPE_CHECKING:
    AnyPass = PassConfig
else:  # the discriminated union of every registered pass config
    AnyPass = Annotated[Union[PASS_CONFIGS], Field(discriminator="kind")]  # noqa: UP007


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """The model to compress."""

    source: str = Field(..., description="timm:NAME, hf:DIR, or a vitcompress artifact directory.")
    checkpoint: Path | None = Field(None, description="Weights for a timm model (.safetensors preferred).")
    num_classes: int | None = Field(None, gt=0, description="Classifier size (default: from the checkpoint).")
    img_size: int | None = Field(
        None, gt=0, description="Input resolution (position embeddings are resampled)."
    )
    in_chans: int | None = Field(None, gt=0, description="Input channels (default: from the checkpoint).")
    kwargs: dict[str, JsonValue] = Field(
        default_factory=dict, description="Extra timm constructor arguments, e.g. depth: 6."
    )
    trust_checkpoint: bool = Field(False, description="Allow unsafe pickle loading. Only for files you made.")

    @field_validator("checkpoint")
    @classmethod
    def _home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None  # recipes may say ~/.cache/...

    @field_validator("source")
    @classmethod
    def _source_form(cls, value: str) -> str:
        if value.startswith(("timm:", "hf:")) and len(value.split(":", 1)[1]) == 0:
            raise ValueError(f"{value!r} names no model; e.g. timm:deit_tiny_patch16_224")
        return value


class RunSection(_Section):
    """Settings shared by every pass."""

    seed: int = Field(0, description="Seed for every random choice (inputs, data order, calibration).")
    threads: int = Field(2, ge=1, description="Threads for ONNX Runtime measurements.")


class Budgets(_Section):
    """Gates on the final model; a failed gate exits with code 3 after the reports are written."""

    max_p50_ms: float | None = Field(None, gt=0, description="Median latency at the first batch size.")
    min_speedup: float | None = Field(None, gt=0, description="Speed-up over the fp32 baseline, same run.")
    max_size_mb: float | None = Field(
        None, gt=0, description="Size of the final ONNX file in MB (1e6 bytes)."
    )
    max_top1_drop: float | None = Field(
        None,
        ge=0,
        description="Top-1 drop against the fp32 baseline on data.eval, in points (needs validate).",
    )


class SweepSection(_Section):
    """Variants for `vitcompress sweep`: each key is a recipe path, each value the values to try."""

    vary: dict[str, list[JsonValue]] = Field(
        ...,
        min_length=1,
        description="PATH: [values]; e.g. passes.prune.target_macs: [0.25, 0.5]. Every combination runs.",
    )
    runs: int = Field(50, ge=5, description="Timed runs per variant in the sweep's interleaved benchmark.")

    @field_validator("vary")
    @classmethod
    def _non_empty(cls, value: dict[str, list[JsonValue]]) -> dict[str, list[JsonValue]]:
        for path, values in value.items():
            if not values:
                raise ValueError(f"{path}: give at least one value to try")
        return value


class Recipe(_Section):
    """A vitcompress recipe."""

    version: Literal[1] = Field(..., description="Recipe format version.")
    name: str | None = Field(None, description="A name for reports.")
    description: str | None = None
    model: ModelSection
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    passes: list[AnyPass] = Field(..., min_length=1, description="Passes, run in order.")
    budgets: Budgets = Budgets()
    sweep: SweepSection | None = Field(
        None, description="Variants for `vitcompress sweep` (compress ignores it)."
    )

    @model_validator(mode="after")
    def _pass_order(self) -> Recipe:
        has_onnx, stale = False, False
        names: set[str] = set()
        for index, cfg in enumerate(self.passes):
            spec = PASSES[cfg.kind]
            label = f"passes[{index}] ({cfg.kind})"
            step_name = cfg.step_name
            if step_name in names:
                raise ValueError(f"{label}: step name {step_name!r} is used twice; give each a distinct name")
            names.add(step_name)
            if cfg.kind == "distill" and self.data.train is None:
                raise ValueError(f"{label} trains on data: add data.train to the recipe")
            if cfg.needs_data() and self.data.for_calibration() is None:
                raise ValueError(
                    f"{label} needs data (importance/calibration): add data.calibration or data.train"
                )
            if spec.needs is Needs.onnx and not has_onnx:
                raise ValueError(f"{label} needs an ONNX model: put an export pass before it")
            if spec.needs is Needs.onnx and stale:
                raise ValueError(
                    f"{label} would see an ONNX file that misses earlier model changes: "
                    "put an export pass after the last pass that changes the model"
                )
            if spec.changes_model and has_onnx:
                stale = True
            if spec.produces_onnx:
                has_onnx, stale = True, False
        return self

    def resolved(self) -> dict[str, Any]:
        """Every setting written out, defaults included (library defaults change between versions)."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- errors


def _unwrap(annotation: Any) -> list[Any]:
    """The model classes an annotation can hold (through Optional, list, dict, Annotated, Union)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, dict, tuple):
        return [m for arg in typing.get_args(annotation) for m in _unwrap(arg)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _is_tag(loc: tuple[Any, ...], i: int) -> bool:
    """pydantic puts the discriminator value (the pass kind) into the location after the list index."""
    return i > 0 and isinstance(loc[i - 1], int) and loc[i] in PASSES


def _label(loc: tuple[Any, ...]) -> str:
    label = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            label += f"[{part}]"
        elif _is_tag(loc, i):
            label += f" ({part})"
        else:
            label += f".{part}" if label else str(part)
    return label or "top level"


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk a pydantic error location from the root to the model class that holds its last key."""
    current: type[BaseModel] | None = Recipe
    for i, part in enumerate(loc[:-1]):
        if isinstance(part, int):
            continue
        if _is_tag(loc, i):
            current = PASSES[part].config
            continue
        field = current.model_fields.get(part) if current else None
        if field is None:
            return None
        candidates = _unwrap(field.annotation)
        current = candidates[0] if len(candidates) == 1 else None
    return current


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at `loc`, found by composing (not constructing) the document."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                continue  # discriminator tags in the loc have no node of their own
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
    return line


def format_validation_error(err: ValidationError, text: str | None, source: str) -> list[str]:
    lines = []
    # A misspelt required key also reports the real key as missing; the "did you mean" line says both.
    meant: set[tuple[tuple[Any, ...], str]] = set()
    for item in err.errors():
        if item["type"] == "extra_forbidden":
            section = _section_at(tuple(item["loc"]))
            if section:
                meant.update(
                    (tuple(item["loc"][:-1]), m) for m in closest(str(item["loc"][-1]), section.model_fields)
                )
    for item in err.errors():
        loc = tuple(item["loc"])
        if item["type"] == "missing" and (loc[:-1], loc[-1]) in meant:
            continue
        where = f"{source}:{_line_of(text, loc)}" if text and _line_of(text, loc) else source
        path = _label(loc)
        if item["type"] == "extra_forbidden":
            section, key = _section_at(loc), str(loc[-1])
            hint = did_you_mean(key, section.model_fields) if section else ""
            lines.append(
                f"{where}: unknown key {key!r} in {_label(loc[:-1])}" + (f"; {hint}" if hint else "")
            )
        elif item["type"] == "union_tag_invalid":
            tag = item.get("input", {}).get("kind") if isinstance(item.get("input"), dict) else None
            lines.append(f"{where}: {path}: unknown pass kind {tag!r}; {did_you_mean(str(tag), PASSES)}")
        elif item["type"] == "union_tag_not_found":
            lines.append(f"{where}: {path}: a pass needs a 'kind'; valid: {', '.join(PASSES)}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            shown = "" if item["type"] == "missing" or not loc else f" (got {item.get('input')!r})"
            lines.append(f"{where}: {path}: {message}{shown}")
    return lines


# --------------------------------------------------------------------------- overrides


def parse_assignment(text: str, many: bool = False) -> tuple[str, Any]:
    """`PATH=VALUE` (VALUE as YAML: 0.5, true, [heads, mlp]); with many, `PATH=V1,V2,...` as a list."""
    path, sep, value = text.partition("=")
    if not sep or not path.strip() or not value.strip():
        example = "passes.prune.target_macs=0.25,0.5" if many else "passes.prune.target_macs=0.5"
        raise RecipeError(f"{text!r} is not PATH=VALUE", hint=f"e.g. {example}")
    try:
        parsed = yaml.safe_load(f"[{value}]" if many else value)
    except yaml.YAMLError:
        raise RecipeError(
            f"{text!r}: cannot read {value!r} as YAML", hint="quote strings with commas"
        ) from None
    return path.strip(), parsed


def _step_index(steps: list[Any], part: str, path: str) -> int:
    """A list position by number, or a pass by its name or (when unique) its kind."""
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(steps) <= index < len(steps):
            raise RecipeError(f"{path}: index {index} is out of range (the list has {len(steps)} items)")
        return index
    named = [i for i, s in enumerate(steps) if isinstance(s, dict) and s.get("name") == part]
    kinds = [i for i, s in enumerate(steps) if isinstance(s, dict) and s.get("kind") == part]
    matches = named or kinds
    if len(matches) == 1:
        return matches[0]
    known = [f"{i}: {s.get('name') or s.get('kind')}" for i, s in enumerate(steps) if isinstance(s, dict)]
    if not matches:
        raise RecipeError(f"{path}: no step {part!r}; steps are {', '.join(known)}")
    raise RecipeError(
        f"{path}: {len(matches)} steps are {part!r}; name them or use the index ({', '.join(known)})"
    )


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at a dotted recipe path in raw recipe data: `passes.0.heads`, `passes.prune.mlp`
    (a step by name, or by kind when one step has it), `data.eval.limit`. Missing sections are made."""
    parts = path.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            index = _step_index(node, part, where)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError(f"{path}: {'.'.join(parts[:depth])} is a value ({node!r}), not a section")


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of raw recipe data with every `path: value` set."""
    out = copy.deepcopy(data)
    for path, value in overrides.items():
        set_path(out, path, value)
    return out


# --------------------------------------------------------------------------- loading


def read_recipe_data(text: str, source: str = "<recipe>") -> dict[str, Any]:
    """Parse recipe YAML into raw data (a mapping), with file:line:column errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        mark = err.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise RecipeError(
            f"{where}: {err.problem}",
            hint="recipes are plain data: YAML tags such as !!python/object are not allowed",
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(
            f"{where}: malformed YAML: {problem}", hint="check the indentation and quoting"
        ) from None
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe is a mapping with version, model and passes, got {type(data).__name__}",
            hint="see `vitcompress recipe schema` or recipes/quickstart.yaml",
        )
    return data


def validate_recipe(data: dict[str, Any], text: str | None, source: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError("\n".join(format_validation_error(err, text, source))) from None


def parse_recipe(text: str, source: str = "<recipe>", overrides: dict[str, Any] | None = None) -> Recipe:
    data = read_recipe_data(text, source)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} (with --set {', '.join(overrides)})"
    return validate_recipe(data, text, source)


def read_recipe_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist", hint="ready recipes are in recipes/")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from None
    return text


def load_recipe(path: Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, override (`path: value`, see set_path) and validate a recipe file."""
    return parse_recipe(read_recipe_text(path), str(path), overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.resolved(), sort_keys=False)


def recipe_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
