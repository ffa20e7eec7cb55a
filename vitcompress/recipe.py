"""Recipes: versioned YAML, validated by pydantic with `extra="forbid"` at every depth.

A recipe names the model, run settings, the passes in order (a discriminated union on `kind`) and
the budgets that gate the result. Errors come back one line each with file:line, the section, the
bad value and the fix; an unknown key names the closest valid key of its section.

Recipes are bounded before they are trusted: the file size (MAX_RECIPE_BYTES) is checked before it is
read, and YAML is composed by a loader that refuses deep nesting (MAX_RECIPE_DEPTH) and documents
that expand, aliases counted in full, to more than MAX_RECIPE_NODES nodes ("billion laughs").
"""

from __future__ import annotations

import copy
import re
import reprlib
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
from pydantic.fields import FieldInfo

from vitcompress.budgets import Budgets
from vitcompress.data import DataSection
from vitcompress.errors import RecipeError, closest, did_you_mean
from vitcompress.latency.goal import GoalSection
from vitcompress.passes import PASSES, Needs
from vitcompress.passes.base import PassConfig
from vitcompress.runtimes.target import TargetSection, apply_target

RECIPE_VERSION = 1
MAX_RECIPE_BYTES = 1 << 20  # 1 MiB; the ready recipes are about 1 KB
MAX_RECIPE_DEPTH = 64  # nesting of mappings and lists; a recipe needs about 6
MAX_RECIPE_NODES = 10_000  # YAML nodes after expanding every alias; a recipe needs a few hundred

if TYPE_CHECKING:
    AnyPass = PassConfig
else:  # the discriminated union of every registered pass config
    # (PASSES, not the built-in PASS_CONFIGS: a pass registered before this module loads counts)
    AnyPass = Annotated[Union[tuple(spec.config for spec in PASSES.values())], Field(discriminator="kind")]  # noqa: UP007


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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
    target: TargetSection | None = Field(
        None,
        description="Where the model will run: runtime (ort, openvino, tensorrt), device, threads, precision; "
        "expanded into the passes' settings.",
    )
    goal: GoalSection | None = Field(
        None,
        description="A latency goal for `vitcompress tune` (p50 on a runtime, max top-1 drop); compress ignores it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_target(cls, data: Any) -> Any:
        return apply_target(data, {kind: spec.config for kind, spec in PASSES.items()})

    @model_validator(mode="after")
    def _pass_order(self) -> Recipe:
        # The first pass that produces the ONNX model (label, step name): from there on, the passes
        # work on that file, and a pass that changes the PyTorch model would not reach it.
        exported: tuple[str, str] | None = None
        sparsified: tuple[str, str] | None = None  # the first pass that leaves sparsity masks
        names: set[str] = set()
        for index, cfg in enumerate(self.passes):
            spec = type(cfg)  # each pass declares what the order depends on (see PassConfig)
            label = f"passes[{index}] ({cfg.kind})"
            step_name = cfg.step_name
            if step_name in names:
                raise ValueError(f"{label}: step name {step_name!r} is used twice; give each a distinct name")
            names.add(step_name)
            if cfg.needs_train() and self.data.train is None:
                raise ValueError(f"{label} trains on data: add data.train to the recipe")
            if cfg.needs_data() and self.data.for_calibration() is None:
                raise ValueError(
                    f"{label} needs data (importance/calibration): add data.calibration or data.train"
                )
            if spec.needs is Needs.onnx and exported is None:
                raise ValueError(f"{label} needs an ONNX model: put an export pass before it")
            if spec.changes_model and exported is not None:
                export_label, export_step = exported
                raise ValueError(
                    f"{label} changes the PyTorch model after {export_label} exported it, so the ONNX "
                    f"model would ship without that change: move step {step_name!r} before {export_step!r}"
                )
            if spec.produces_onnx and exported is None:
                exported = label, step_name
            if spec.reshapes_linears and sparsified is not None:
                raise ValueError(
                    f"{label} reshapes linear layers that {sparsified[0]} made sparse (their masks would no "
                    f"longer fit): move step {step_name!r} before {sparsified[1]!r}"
                )
            if spec.makes_sparse and sparsified is None:
                sparsified = label, step_name
        return self

    def resolved(self) -> dict[str, Any]:
        """Every setting written out, defaults included (library defaults change between versions)."""
        return self.model_dump(mode="json")


def rebuild_schema() -> None:
    """Make `Recipe` accept every registered pass (after `vitcompress.passes.register`)."""
    configs = tuple(spec.config for spec in PASSES.values())
    union = Annotated[Union[configs], Field(discriminator="kind")]  # type: ignore[valid-type]  # noqa: UP007
    field = Recipe.__pydantic_fields__["passes"]
    Recipe.__pydantic_fields__["passes"] = FieldInfo.merge_field_infos(field, annotation=list[union])  # type: ignore[valid-type]
    Recipe.model_rebuild(force=True)


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


def _compose(text: str | None) -> yaml.Node | None:
    """The document's node tree (not constructed), or None when it cannot be read within the limits."""
    if not text:
        return None
    try:
        _check_brackets(text)
        return yaml.compose(text, Loader=_BoundedLoader)
    except (yaml.YAMLError, _LimitExceeded, RecursionError):
        return None


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at `loc` in a composed document (see _compose)."""
    node = root
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


_STEP = re.compile(r"passes\[(\d+)\] ")

# A bad value is echoed in the error, but never at length: a shared (aliased) structure or a long
# string would otherwise fill the terminal.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 60, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def format_validation_error(err: ValidationError, text: str | None, source: str) -> list[str]:
    lines = []
    root = _compose(text)
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
        line = _line_of(root, loc)
        where = f"{source}:{line}" if line else source
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
            step = _STEP.match(message) if not loc else None
            if step:  # a pass-order error of the whole recipe: point at the pass it names
                line = _line_of(root, ("passes", int(step.group(1))))
                lines.append(f"{source}:{line}: {message}" if line else f"{source}: {message}")
                continue
            shown = "" if item["type"] == "missing" or not loc else f" (got {_SHORT.repr(item.get('input'))})"
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
        parsed = _load_yaml(f"[{value}]" if many else value)
    except (_LimitExceeded, RecursionError) as err:
        problem = err.message if isinstance(err, _LimitExceeded) else "is nested too deeply to read"
        raise RecipeError(
            f"{_SHORT.repr(text)}: the value {problem.removeprefix('recipe ')}",
            hint=err.hint if isinstance(err, _LimitExceeded) else _DEPTH_HINT,
        ) from None
    except yaml.YAMLError:
        raise RecipeError(
            f"{_SHORT.repr(text)}: cannot read {_SHORT.repr(value)} as YAML", hint="quote strings with commas"
        ) from None
    return path.strip(), parsed


def _step_index(steps: list[Any], part: str, path: str, tag: str | None = None) -> int:
    """A list position by number, or a pass by its name or (when unique) its kind. `tag` is the
    `(kind)` errors print after an index, `passes[2] (prune)`: the step there must be that one."""
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(steps) <= index < len(steps):
            raise RecipeError(f"{path}: index {index} is out of range (the list has {len(steps)} items)")
    else:
        named = [i for i, s in enumerate(steps) if isinstance(s, dict) and s.get("name") == part]
        kinds = [i for i, s in enumerate(steps) if isinstance(s, dict) and s.get("kind") == part]
        matches = named or kinds
        known = [f"{i}: {s.get('name') or s.get('kind')}" for i, s in enumerate(steps) if isinstance(s, dict)]
        if not matches:
            raise RecipeError(f"{path}: no step {part!r}; steps are {', '.join(known)}")
        if len(matches) > 1:
            raise RecipeError(
                f"{path}: {len(matches)} steps are {part!r}; name them or use the index ({', '.join(known)})"
            )
        index = matches[0]
    step = steps[index]
    if tag and not (isinstance(step, dict) and tag in (step.get("kind"), step.get("name"))):
        what = (
            f"{step.get('name') or step.get('kind')!r}"
            + (f" ({step['kind']})" if step.get("name") and step.get("kind") else "")
            if isinstance(step, dict)
            else repr(step)
        )
        raise RecipeError(f"{path}: item {index % len(steps)} is {what}, not {tag!r}")
    return index


# One step of a recipe path. Dotted keys (`data.eval.limit`) and list positions in every form the
# error messages print: `passes.2`, `passes[2]`, `passes[2] (prune)`, `passes.prune`, `passes.kd`.
_PATH_TOKEN = re.compile(
    r"\[\s*(?P<index>-?\d+)\s*\]|\s*\((?P<tag>[^()]*)\)|(?P<dot>\.)|(?P<key>[^.\[\]()]+)"
)


def _path_parts(path: str) -> list[tuple[str, str | None, str]]:
    """(key or index, the `(kind)` after it or None, the path up to here) for each step of `path`."""
    parts: list[tuple[str, str | None, str]] = []
    pos, after_dot = 0, True
    for match in _PATH_TOKEN.finditer(path):
        if match.start() != pos:
            break
        end = match.end()
        if match.group("dot"):
            if after_dot:
                break  # an empty key: `a..b`, `.a`
            after_dot = True
        elif match.group("tag") is not None:
            if not parts or parts[-1][1] is not None or after_dot or not match.group("tag").strip():
                break
            parts[-1] = (parts[-1][0], match.group("tag").strip(), path[:end])
        elif match.group("index") is not None:
            if not parts and after_dot:
                break  # a path starts with a key
            parts.append((match.group("index"), None, path[:end]))
            after_dot = False
        else:
            key = match.group("key").strip()
            if not key or not after_dot:
                break
            parts.append((key, None, path[:end].rstrip()))
            after_dot = False
        pos = end
    if pos != len(path) or after_dot or not parts:
        raise RecipeError(
            f"{path!r} is not a recipe path",
            hint="e.g. passes.prune.target_macs, passes.0.steps, passes[2] (prune).target_macs, data.eval.limit",
        )
    return parts


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at a recipe path in raw recipe data: `passes.0.heads`, `passes.prune.mlp` (a step
    by name, or by kind when one step has it), `passes[0] (prune).mlp` (as errors print it),
    `data.eval.limit`. Missing sections are made."""
    parts = _path_parts(path)
    node: Any = data
    for depth, (part, tag, where) in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = _step_index(node, part, where, tag)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if tag is not None:
                raise RecipeError(f"{where}: ({tag}) names a step of a list, and {part!r} is a key")
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            above = parts[depth - 1][2] if depth else "the recipe"
            raise RecipeError(f"{path}: {above} is a value ({node!r}), not a section")


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of raw recipe data with every `path: value` set."""
    out = copy.deepcopy(data)
    for path, value in overrides.items():
        set_path(out, path, value)
    return out


# --------------------------------------------------------------------------- loading


_ALIAS_HINT = "anchors and aliases are for repeating a few settings"
_DEPTH_HINT = "check the brackets and indentation: a recipe needs a few levels"


class _LimitExceeded(Exception):
    """A recipe over one of the limits; read_recipe_data turns it into a RecipeError naming the file."""

    def __init__(self, message: str, mark: Any, hint: str) -> None:  # mark: a yaml Mark or None
        super().__init__(message)
        self.message = message
        self.mark = mark
        self.hint = hint


def _check_brackets(text: str) -> None:
    """Refuse flow nesting ([ and {) deeper than MAX_RECIPE_DEPTH from the raw text, before the YAML
    scanner sees it (it slows down quadratically on long runs of open brackets). Brackets in quoted
    strings and comments count too: only text no recipe has can reach the limit that way."""
    depth = 0
    for match in _BRACKETS.finditer(text):
        if match.group() in "[{":
            depth += 1
            if depth > MAX_RECIPE_DEPTH:
                start = match.start()
                line = text.count("\n", 0, start)
                column = start - (text.rfind("\n", 0, start) + 1)
                raise _LimitExceeded(
                    f"recipe is nested deeper than {MAX_RECIPE_DEPTH} levels, the limit for a recipe",
                    yaml.Mark("<recipe>", start, line, column, None, 0),
                    _DEPTH_HINT,
                )
        elif depth:
            depth -= 1


_BRACKETS = re.compile(r"[\[\]{}]")


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than MAX_RECIPE_DEPTH and documents that expand,
    aliases counted in full, to more than MAX_RECIPE_NODES nodes.

    A node's expanded size (1 + its children's; an alias counts as the whole node it names) is known as
    soon as the node is composed, so an alias bomb is refused at the first level that crosses the cap,
    before anything is constructed: time and memory stay proportional to the text.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> expanded size; nodes live as long as the loader

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            named = self.anchors.get(event.anchor)
            if named is not None and id(named) not in self._sizes:  # the alias is inside its own anchor
                raise _LimitExceeded(
                    f"recipe has alias *{event.anchor} inside the node it names: an endless expansion",
                    event.start_mark,
                    _ALIAS_HINT,
                )
            named = super().compose_node(parent, index)  # the anchored node (or the undefined-alias error)
            assert named is not None
            return named
        self._depth += 1
        try:
            if self._depth > MAX_RECIPE_DEPTH:
                raise _LimitExceeded(
                    f"recipe is nested deeper than {MAX_RECIPE_DEPTH} levels, the limit for a recipe",
                    event.start_mark,
                    _DEPTH_HINT,
                )
            composed = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        assert composed is not None
        node: yaml.Node = composed
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes[id(child)] for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes[id(key)] + self._sizes[id(value)] for key, value in node.value)
        if size > MAX_RECIPE_NODES:
            raise _LimitExceeded(
                f"recipe expands to more than {MAX_RECIPE_NODES:,} YAML nodes with its aliases expanded, "
                "the limit for a recipe",
                event.start_mark,
                _ALIAS_HINT,
            )
        self._sizes[id(node)] = size
        return node


def _load_yaml(text: str) -> Any:
    """yaml.safe_load within the limits (raises _LimitExceeded, yaml.YAMLError or RecursionError)."""
    _check_brackets(text)
    return yaml.load(text, Loader=_BoundedLoader)


def _at(source: str, mark: Any) -> str:
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source


def _check_size(size: int, source: str) -> None:
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{source}: recipe is {size:,} bytes, over the limit of {MAX_RECIPE_BYTES:,} bytes (1 MiB)",
            hint="a recipe is a page of settings; keep data and weights in their own files",
        )


def read_recipe_data(text: str, source: str = "<recipe>") -> dict[str, Any]:
    """Parse recipe YAML into raw data (a mapping), with file:line:column errors, within the limits."""
    _check_size(len(text.encode("utf-8", "surrogatepass")), source)
    try:
        data = _load_yaml(text)
    except _LimitExceeded as err:
        raise RecipeError(f"{_at(source, err.mark)}: {err.message}", hint=err.hint) from None
    except RecursionError:
        raise RecipeError(
            f"{source}: recipe nested too deeply to read (the limit is {MAX_RECIPE_DEPTH} levels)"
        ) from None
    except yaml.constructor.ConstructorError as err:
        raise RecipeError(
            f"{_at(source, err.problem_mark)}: {err.problem}",
            hint="recipes are plain data: YAML tags such as !!python/object are not allowed",
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(
            f"{_at(source, mark)}: malformed YAML: {problem}", hint="check the indentation and quoting"
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


# --------------------------------------------------------------------------- ready recipes

BUNDLED_RECIPES = Path(__file__).parent / "recipes"  # package data; recipes/ in the repository


def bundled_recipes() -> dict[str, Path]:
    """The ready recipes shipped with vitcompress, by name (file name without .yaml)."""
    if not BUNDLED_RECIPES.is_dir():
        return {}
    return {p.stem: p for p in sorted(BUNDLED_RECIPES.glob("*.yaml"))}


def recipe_summary(path: Path) -> str:
    """What a ready recipe is for: its opening comment's first line (each opens with one)."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        text = stripped.lstrip("#").strip()
        if text:
            cut = text.find(". ")
            if cut >= 0:
                return text[: cut + 1]
            return text if text.endswith(".") else text + " ..."
    return ""


def resolve_recipe(path: Path | str) -> Path:
    """The recipe file `path` names: an existing file as given, or a ready recipe by its bare name
    (`edge-cpu-int8`: no .yaml, no folder, no such file here). A name that is neither is refused
    with the ready recipes listed and the closest one named."""
    path = Path(path)
    if path.exists():
        return path
    text = str(path)
    ready = bundled_recipes()
    bare = path.suffix == "" and path.name == text and text not in (".", "..")
    if bare and text in ready:
        return ready[text]
    if bare:
        names = ", ".join(ready) or "none installed"
        near = closest(text, ready)
        raise RecipeError(
            f"no recipe {text!r}: not a file here, nor a ready recipe (ready: {names})",
            hint=(f"did you mean {near[0]!r}? " if near else "")
            + "`vitcompress recipe list` says what each is for",
        )
    return path


def read_recipe_text(path: Path) -> str:
    """A recipe file's text (a ready recipe by name too, see resolve_recipe); a file over
    MAX_RECIPE_BYTES is refused before it is read."""
    path = resolve_recipe(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe {path} does not exist",
            hint="ready recipes go by name: --recipe quickstart (`vitcompress recipe list`)",
        )
    try:
        _check_size(path.stat().st_size, str(path))
        with path.open("rb") as stream:
            raw = stream.read(MAX_RECIPE_BYTES + 1)  # the file may have grown since stat
        _check_size(len(raw), str(path))
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text


def load_recipe(path: Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, override (`path: value`, see set_path) and validate a recipe file (or a ready recipe
    by name, see resolve_recipe)."""
    path = resolve_recipe(path)
    return parse_recipe(read_recipe_text(path), str(path), overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.resolved(), sort_keys=False)


def recipe_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
