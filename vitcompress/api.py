"""The Python API: compress a model you hold, with data you hold, from a notebook or a training script.

Every function takes a model as an `nn.Module` (a timm or Hugging Face ViT/DeiT) or as a reference
(`timm:NAME`, `hf:DIR`, an artifact or run directory, a path), and data as a `DataLoader` (any
iterable of `(inputs, labels)` batches, or one pair of tensors) or as a data spec (`digits:test`,
`fashion-mnist`, an image folder). In-memory inputs are taken as they are: already resized and
normalized the way the model was trained.

`compress` runs a whole recipe; `prune`, `factorize`, `distill` and `quantize` run one pass of it
through the same pipeline (so a function call, the CLI command and a one-pass recipe run the same
code); `export`, `bench` and `evaluate` wrap the ONNX export, the latency benchmark and the accuracy
measurement. `eval_fn(model) -> float` (top-1 as a fraction) replaces the recipe's eval data wherever
accuracy is judged: the `max_top1_drop` budget then compares your metric on the final model and on
the fp32 baseline, both exported files, each handed to you as a call from a batch to logits.

The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from pydantic import ValidationError

from vitcompress.errors import RecipeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitcompress.accuracy import EvalResult
    from vitcompress.data import DataSection, Dataset, DataSpec, InMemory
    from vitcompress.models import LoadedModel, ModelRef
    from vitcompress.passes.base import PassConfig
    from vitcompress.passes.export import ExportResult
    from vitcompress.recipe import Recipe
    from vitcompress.state import EvalFn, PassRecord, RunResult
    from vitcompress.timing import BenchReport

# What a model argument may be: a module you hold, a reference string or path, or a ModelRef.
ModelLike = Union["nn.Module", str, Path, "ModelRef"]
# What a data argument may be: a DataLoader or iterable of (inputs, labels), a pair of tensors, a
# data spec string (`digits:test`, an image folder), or a DataSpec.
DataLike = Union[Iterable[Any], tuple["torch.Tensor", "torch.Tensor"], str, Path, "DataSpec"]

__all__ = [
    "DataLike",
    "ModelLike",
    "Result",
    "bench",
    "compress",
    "distill",
    "evaluate",
    "export",
    "factorize",
    "prune",
    "quantize",
]


@dataclass(frozen=True)
class Result:
    """What a run leaves: the model, the files, and the ledger (one record per pass)."""

    model: nn.Module | None  # the PyTorch model after the last pass that changed it
    onnx: Path | None  # the final exported (or quantized) file, when a pass made one
    artifacts: dict[str, Path]  # step name -> the artifact it left (a model directory or a file)
    ledger: tuple[PassRecord, ...]
    out_dir: Path
    budget_failures: tuple[str, ...] = ()
    loaded: LoadedModel | None = field(default=None, repr=False)  # the model with its metadata

    @classmethod
    def from_run(cls, run: RunResult) -> Result:
        state = run.state
        return cls(
            model=state.model.model,
            onnx=state.onnx_path,
            artifacts={r.name: Path(r.artifact) for r in state.records if r.artifact},
            ledger=state.records,
            out_dir=run.out_dir,
            budget_failures=run.budget_failures,
            loaded=state.model,
        )

    def record(self, name: str) -> PassRecord:
        """The ledger record of step `name` (a kind names the step when it was not renamed)."""
        for record in self.ledger:
            if record.name == name:
                return record
        raise KeyError(f"no step {name!r} in the ledger ({', '.join(r.name for r in self.ledger)})")


# --------------------------------------------------------------------------- conversions


def _loaded(model: ModelLike, **options: Any) -> LoadedModel:
    from torch import nn

    from vitcompress.models import as_model_ref, from_module, load_model

    if isinstance(model, nn.Module):
        return from_module(model)
    return load_model(as_model_ref(model, **options))


def _in_memory(data: Any) -> bool:
    return data is not None and not isinstance(data, (str, Path)) and type(data).__name__ != "DataSpec"


def _spec(data: str | Path | DataSpec) -> DataSpec:
    from vitcompress.data import DataSpec

    return data if isinstance(data, DataSpec) else DataSpec.parse(str(data))


def _data(splits: Mapping[str, DataLike | None]) -> tuple[DataSection, dict[str, InMemory]]:
    """The recipe's data section for `splits` (name -> data), and the in-memory ones gathered."""
    from vitcompress.data import DataSection
    from vitcompress.data.memory import MEMORY_SPEC, collect

    specs: dict[str, DataSpec] = {}
    memory: dict[str, InMemory] = {}
    for name, data in splits.items():
        if data is None:
            continue
        if _in_memory(data):
            memory[name] = collect(data, f"{'val' if name == 'eval' else name}=")
            specs[name] = MEMORY_SPEC
        else:
            specs[name] = _spec(data)  # type: ignore[arg-type]
    return DataSection(**specs), memory


def _recipe_data(recipe: Recipe | str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str | None, str]:
    """(raw recipe data, its text, where it came from) for a Recipe, a file, a ready recipe's name or a
    mapping, so that what the call adds is validated with the rest, once."""
    import copy

    from vitcompress.recipe import Recipe, read_recipe_data, read_recipe_text, resolve_recipe

    if isinstance(recipe, Recipe):
        return recipe.resolved(), None, "<recipe>"
    if isinstance(recipe, Mapping):
        return copy.deepcopy(dict(recipe)), None, "<recipe>"
    path = resolve_recipe(Path(recipe))
    text = read_recipe_text(path)
    return read_recipe_data(text, str(path)), text, str(path)


def _out(out: str | Path | None) -> Path:
    return Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="vitcompress-"))


# --------------------------------------------------------------------------- whole recipes


def compress(
    model: ModelLike | None,
    recipe: Recipe | str | Path | Mapping[str, Any],
    *,
    train: DataLike | None = None,
    val: DataLike | None = None,
    calibration: DataLike | None = None,
    eval_fn: EvalFn | None = None,
    out: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    on_pass: Callable[[int, str], None] | None = None,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
) -> Result:
    """Run `recipe` (a Recipe, a file, a ready recipe's name, or a mapping) on `model`.

    model: an `nn.Module` (timm or Hugging Face ViT/DeiT; passes edit it in place, so hand over a
        copy to keep the original), a reference (`timm:NAME`, `hf:DIR`, an artifact or run
        directory), or None for the recipe's own `model:`.
    train / val / calibration: the recipe's data.train / data.eval / data.calibration; a DataLoader
        (or iterable of batches, or a pair of tensors) is used as it is, a spec string is loaded.
    eval_fn: your accuracy, `eval_fn(model) -> top-1 in [0, 1]`, where `model` maps a batch of inputs
        to logits; the validate pass scores the final and the fp32 baseline file with it, and the
        recipe's `budgets.max_top1_drop` gates on the difference (points).
    out: the run directory (default: a new temporary one); overrides: `{path: value}` as `--set`.

    Returns a Result; a failed budget raises BudgetExceededError after the reports are written.
    """
    from vitcompress.pipeline import RunInputs, run_recipe
    from vitcompress.recipe import apply_overrides, validate_recipe

    data, text, source = _recipe_data(recipe)
    data = apply_overrides(data, dict(overrides or {}))
    loaded = None
    if model is not None:
        from torch import nn

        if isinstance(model, nn.Module):
            loaded = _loaded(model)
            data["model"] = {"source": loaded.label.split(" ")[0]}  # names it; the module is used
        else:
            data["model"] = {**(data.get("model") or {}), "source": str(model)}
    section, memory = _data({"train": train, "eval": val, "calibration": calibration})
    given = section.model_dump(mode="json", exclude_none=True)
    data["data"] = {**(data.get("data") or {}), **given}
    parsed = validate_recipe(data, text, source)
    inputs = RunInputs(model=loaded, memory=memory, eval_fn=eval_fn)
    run = run_recipe(
        parsed, _out(out), on_pass=on_pass, progress=progress, overwrite=overwrite, inputs=inputs
    )
    return Result.from_run(run)


def run_pass(
    cfg: PassConfig,
    model: ModelLike,
    out: str | Path | None = None,
    *,
    data: Mapping[str, DataLike | None] | None = None,
    seed: int = 0,
    model_options: Mapping[str, Any] | None = None,
    bench: bool = False,
    eval_fn: EvalFn | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
) -> Result:
    """Run one pass as a one-pass recipe (plus export and validate with `bench`): what `prune`,
    `factorize`, `distill` and the CLI's pass commands do, so they run the same code as `compress`."""
    from vitcompress.passes.export import ExportConfig
    from vitcompress.passes.validate import ValidateConfig

    passes: list[Any] = [cfg, ExportConfig(), ValidateConfig(batch_sizes=[1])] if bench else [cfg]
    return run_passes(
        passes, model, out, data=data, seed=seed, model_options=model_options, eval_fn=eval_fn,
        overwrite=overwrite, progress=progress,
    )  # fmt: skip


def run_passes(
    passes: Sequence[PassConfig],
    model: ModelLike,
    out: str | Path | None = None,
    *,
    data: Mapping[str, DataLike | None] | None = None,
    seed: int = 0,
    model_options: Mapping[str, Any] | None = None,
    eval_fn: EvalFn | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
) -> Result:
    """Run `passes` as a recipe on `model` (with `model_options`, a recipe's `model:` settings, for a
    reference) and `data` (split name -> data)."""
    from torch import nn

    from vitcompress.pipeline import RunInputs, run_recipe
    from vitcompress.recipe import ModelSection, Recipe, RunSection

    loaded = _loaded(model) if isinstance(model, nn.Module) else None
    options = {k: v for k, v in (model_options or {}).items() if v is not None}
    source = loaded.label.split(" ")[0] if loaded is not None else str(model)
    data_section, memory = _data(data or {})
    try:
        recipe = Recipe(
            version=1,
            name=f"{passes[0].kind} {source}",
            model=ModelSection(source=source, **options),
            run=RunSection(seed=seed),
            data=data_section,
            passes=list(passes),
        )
    except ValidationError as err:
        from vitcompress.recipe import format_validation_error

        raise RecipeError("\n".join(format_validation_error(err, None, "<options>"))) from None
    inputs = RunInputs(model=loaded, memory=memory, eval_fn=eval_fn)
    run = run_recipe(recipe, _out(out), progress=progress, overwrite=overwrite, inputs=inputs)
    return Result.from_run(run)


def _config(cls: type[PassConfig], config: PassConfig | None, options: Mapping[str, Any]) -> Any:
    """The pass config: `config` as given, or built from keyword options (validated as in a recipe)."""
    if config is not None:
        if options:
            raise RecipeError(f"give either config= or options ({', '.join(options)}), not both")
        return config
    try:
        return cls(**options)
    except ValidationError as err:
        from vitcompress.recipe import format_validation_error

        raise RecipeError("\n".join(format_validation_error(err, None, cls.__name__))) from None


def prune(
    model: ModelLike,
    *,
    data: DataLike | None = None,
    out: str | Path | None = None,
    config: PassConfig | None = None,
    **options: Any,
) -> Result:
    """Structured pruning (heads, head size, MLP and embedding width): `options` are PruneConfig's
    fields (heads=0.25, mlp=0.5, target_macs=0.5, importance="taylor", ...); `data` feeds the
    importance scores that need it."""
    from vitcompress.passes.prune.config import PruneConfig

    return run_pass(_config(PruneConfig, config, options), model, out, data={"calibration": data})


def factorize(
    model: ModelLike,
    *,
    data: DataLike | None = None,
    out: str | Path | None = None,
    config: PassConfig | None = None,
    **options: Any,
) -> Result:
    """Low-rank factorization of linear layers: `options` are LowRankConfig's fields (target_params,
    energy, method, ...); `data` feeds the data-aware methods."""
    from vitcompress.passes.lowrank.config import LowRankConfig

    return run_pass(_config(LowRankConfig, config, options), model, out, data={"calibration": data})


def distill(
    model: ModelLike,
    *,
    train: DataLike,
    val: DataLike | None = None,
    teacher: ModelLike | None = None,
    out: str | Path | None = None,
    config: PassConfig | None = None,
    **options: Any,
) -> Result:
    """Knowledge distillation into `model` from `teacher` (a reference; default: the model as given,
    which only makes sense after it was compressed elsewhere): `options` are DistillConfig's fields
    (steps, epochs, lr, ...); `val` is scored at the end."""
    from torch import nn

    from vitcompress.passes.distill.config import DistillConfig

    if isinstance(teacher, nn.Module):
        raise RecipeError(
            "distill(teacher=...) takes a reference (timm:NAME with a checkpoint, an artifact directory)",
            hint="or run compress() with a recipe whose distill pass reads the model as loaded",
        )
    if teacher is not None:
        options = {**options, "teacher": {"source": str(teacher)}} if config is None else options
    return run_pass(_config(DistillConfig, config, options), model, out, data={"train": train, "eval": val})


def quantize(
    model: ModelLike,
    *,
    calibration: DataLike | None = None,
    val: DataLike | None = None,
    out: str | Path | None = None,
    config: PassConfig | None = None,
    eval_fn: EvalFn | None = None,
    **options: Any,
) -> Result:
    """INT8 (static QDQ, dynamic) or fp16 quantization: `options` are QuantizeConfig's fields (preset,
    mode, calibration_size, max_top1_drop, ...). A module or a reference is exported first; an
    `.onnx` path is quantized as it is (`val` then feeds its max_top1_drop gate)."""
    from vitcompress.passes.export import ExportConfig
    from vitcompress.passes.quantize.config import QuantizeConfig

    cfg = _config(QuantizeConfig, config, options)
    path = Path(model) if isinstance(model, (str, Path)) else None
    if path is not None and path.suffix.lower() == ".onnx":
        return _quantize_file(path, cfg, calibration, val, out)
    data = {"calibration": calibration, "eval": val}
    return run_passes([ExportConfig(), cfg], model, out, data=data, eval_fn=eval_fn)


def _quantize_file(
    path: Path, cfg: Any, calibration: DataLike | None, val: DataLike | None, out: str | Path | None
) -> Result:
    """An ONNX file quantized as the `quantize` command does it (no model to load, no recipe)."""
    import os

    from vitcompress.accuracy import onnx_input_spec
    from vitcompress.passes.quantize.run import quantize_model
    from vitcompress.state import PassRecord

    input_spec, classes = onnx_input_spec(path)
    target = Path(out) if out is not None and Path(out).suffix else _out(out) / cfg.filename
    calibration_data = None
    if calibration is not None:
        calibration_data = _dataset(calibration, input_spec, classes, cfg.calibration_size)
    held_out = _dataset(val, input_spec, classes, None) if val is not None else None
    details = quantize_model(path, target, cfg, calibration_data, held_out, os.cpu_count() or 1)
    record = PassRecord(name=cfg.step_name, kind=cfg.kind, artifact=str(target), details=details)
    return Result(
        model=None, onnx=target, artifacts={cfg.step_name: target}, ledger=(record,), out_dir=target.parent
    )


def _dataset(data: DataLike, input_spec: Any, num_classes: int, limit: int | None) -> Dataset:
    from vitcompress.data import load_dataset, memory_dataset
    from vitcompress.data.memory import MEMORY_SPEC, collect

    if _in_memory(data):
        spec = MEMORY_SPEC.model_copy(update={"limit": limit})
        return memory_dataset(collect(data, "data"), spec, input_spec, num_classes)
    spec = _spec(data)  # type: ignore[arg-type]
    if limit is not None:
        spec = spec.model_copy(update={"limit": min(spec.limit or limit, limit)})
    return load_dataset(spec, input_spec, num_classes)


# --------------------------------------------------------------------------- export, bench, evaluate


def export(model: ModelLike, out: str | Path, *, seed: int = 0, **options: Any) -> ExportResult:
    """Export to ONNX (fp32, dynamic batch) and check parity against PyTorch; `options` are
    ExportConfig's fields (exporter, opset, atol, runtime, ...). Raises ParityError, leaving no file,
    when the file does not reproduce the model."""
    from vitcompress.passes.export import ExportConfig, export_model

    out = Path(out)
    cfg = _config(ExportConfig, None, {"filename": out.name, **options})
    return export_model(_loaded(model), out, cfg, seed=seed)


def bench(
    models: Sequence[str | Path],
    *,
    batch_sizes: Sequence[int] = (1,),
    threads: int = 2,
    runs: int = 50,
    warmup: int = 10,
    block: int = 10,
    provider: str = "cpu",
) -> BenchReport:
    """Latency of model files, measured in one interleaved run (the first is the baseline of the
    ratios): p50/p90/p99 and throughput per model and batch size, with the machine recorded."""
    from vitcompress.choices import Provider
    from vitcompress.timing import bench_models

    return bench_models(
        [Path(m) for m in models], Provider(provider), threads, list(batch_sizes), warmup, runs, block=block
    )


def evaluate(
    model: ModelLike,
    data: DataLike | None = None,
    *,
    eval_fn: EvalFn | None = None,
    threads: int | None = None,
) -> EvalResult | float:
    """Accuracy of a module, a reference, or a model file (.onnx, OpenVINO .xml) on `data`: an
    EvalResult (top-1, top-5, loss, per class). With `eval_fn`, your metric instead, as a float."""
    from vitcompress.accuracy import evaluate_onnx, evaluate_torch, onnx_input_spec, score_file, score_torch

    path = Path(model) if isinstance(model, (str, Path)) else None
    is_file = path is not None and path.is_file()
    if eval_fn is not None:
        if is_file:
            return score_file(eval_fn, path, threads=threads)  # type: ignore[arg-type]
        from torch import nn

        if isinstance(model, nn.Module):
            return score_torch(eval_fn, model, type(model).__name__)
        loaded = _loaded(model)
        return score_torch(eval_fn, loaded.model, loaded.label)
    if data is None:
        raise RecipeError("evaluate needs data (a DataLoader, tensors or a data spec) or eval_fn")
    if is_file:
        input_spec, classes = onnx_input_spec(path)  # type: ignore[arg-type]
        return evaluate_onnx(path, _dataset(data, input_spec, classes, None), threads=threads)  # type: ignore[arg-type]
    loaded = _loaded(model)
    return evaluate_torch(loaded, _dataset(data, loaded.input, loaded.num_classes, None))
