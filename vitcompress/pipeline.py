"""Run a recipe: load the model, run its passes in order, keep the ledger, write reports, check budgets."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vitcompress.budgets import check_budgets
from vitcompress.errors import BudgetExceededError
from vitcompress.fileio import write_text
from vitcompress.journal import Journal
from vitcompress.passes import PASSES, Needs
from vitcompress.recipe import Recipe, dump_recipe
from vitcompress.state import ModelState, PassRecord, RunResult, RunSettings, seed_everything

if TYPE_CHECKING:
    from vitcompress.data import InMemory
    from vitcompress.models import LoadedModel
    from vitcompress.passes.base import PassConfig
    from vitcompress.state import EvalFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInputs:
    """What a run takes from the Python API instead of the recipe: a model already in memory (the
    recipe's `model:` then only names it), data splits handed over (`source: memory` in the recipe's
    data section) and the caller's accuracy function."""

    model: LoadedModel | None = None
    memory: dict[str, InMemory] = field(default_factory=dict)
    eval_fn: EvalFn | None = None


def run_pass(state: ModelState, cfg: PassConfig) -> ModelState:
    """Run one pass inside the ledger envelope: the pass returns its measurements
    (`ModelState.passed`, which names the record after the step and marks a model-changing pass),
    and the wall time is taken here, so no pass times itself."""
    engine = PASSES[cfg.kind].runner()
    start = time.perf_counter()
    after = engine(state, cfg)
    wall_s = time.perf_counter() - start
    if len(after.records) == len(state.records) + 1:
        timed = replace(after.records[-1], wall_s=wall_s)
        after = replace(after, records=(*after.records[:-1], timed))
    return after


def release_memory() -> None:
    """Hand freed memory back to the OS between passes. A pass's peak (a backward pass for
    importance, the exporter's graph copies) otherwise stays in glibc's heap and adds to the next
    pass's peak: on DeiT-B, prune + export + INT8 peaked 0.4 GB lower with this (3.66 -> 3.25 GB)."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def leading_model_passes(recipe: Recipe) -> int:
    """How many passes at the start of `recipe` work on the PyTorch model only (before any export)."""
    count = 0
    for cfg in recipe.passes:
        if cfg.produces_onnx or cfg.needs is Needs.onnx:
            break
        count += 1
    return count


def prefix_key(recipe: Recipe, count: int) -> str:
    """What the model after the first `count` passes depends on: model, data, run settings and those
    passes, every default written out. Two recipes with the same key hold the same model there
    (each pass is seeded from run.seed and its position alone)."""
    import hashlib
    import json

    resolved = recipe.resolved()
    what = {key: resolved[key] for key in ("version", "model", "data", "run")}
    what["passes"] = resolved["passes"][:count]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@dataclass
class PrefixCache:
    """The model after leading PyTorch passes, kept for runs that share them: a sweep whose variants
    differ only from the third pass on runs the first two once. Only the `wanted` keys (prefixes
    that more than one planned run shares) are kept, each as one copy of the model (and teacher)."""

    wanted: set[str]
    entries: dict[str, tuple[ModelState, Path]] = field(default_factory=dict)

    @classmethod
    def for_runs(cls, recipes: list[Recipe]) -> PrefixCache:
        from collections import Counter

        counts = Counter(
            prefix_key(r, n) for r in recipes for n in range(1, leading_model_passes(r) + 1)
        )
        return cls({key for key, runs in counts.items() if runs > 1})

    def keep(self, key: str, state: ModelState) -> None:
        if key in self.wanted and key not in self.entries:
            snapshot = replace(
                state,
                model=copy.deepcopy(state.model),
                teacher=copy.deepcopy(state.teacher) if state.teacher is not None else None,
            )
            self.entries[key] = (snapshot, state.settings.out_dir)

    def longest(self, recipe: Recipe) -> tuple[int, ModelState, Path] | None:
        for count in range(leading_model_passes(recipe), 0, -1):
            hit = self.entries.get(prefix_key(recipe, count))
            # a run whose later passes read the model as loaded needs the copy the prefix kept
            if hit is not None and (hit[0].teacher is not None or not needs_teacher(recipe)):
                return count, *hit
        return None


def _reuse(hit: tuple[int, ModelState, Path], settings: RunSettings) -> ModelState:
    """This run's state from a kept prefix: a fresh copy of its models, its artifacts copied over."""
    import shutil

    count, snapshot, source_dir = hit
    records = []
    for record in snapshot.records:
        artifact = record.artifact
        if artifact is not None and Path(artifact).is_relative_to(source_dir):
            target = settings.out_dir / Path(artifact).relative_to(source_dir)
            if Path(artifact).is_dir():
                shutil.copytree(artifact, target, dirs_exist_ok=True)
            artifact = str(target)
        details = dict(record.details)
        if record.kind != "load":
            details["reused_from"] = str(source_dir)
        records.append(replace(record, artifact=artifact, details=details))
    log.info("passes 1-%d are those of %s: reusing its model instead of running them again", count, source_dir)
    return replace(
        snapshot,
        model=copy.deepcopy(snapshot.model),
        teacher=copy.deepcopy(snapshot.teacher) if snapshot.teacher is not None else None,
        settings=settings,
        records=tuple(records),
    )


def run_recipe(
    recipe: Recipe,
    out_dir: Path,
    on_pass: Callable[[int, str], None] | None = None,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
    overwrite: bool = False,
    prefixes: PrefixCache | None = None,
    *,
    inputs: RunInputs | None = None,
) -> RunResult:
    """Run every pass of `recipe`, writing artifacts and reports to `out_dir`.

    on_pass(index, name) is called before each step (index 0 is loading the model). Reports are
    written before budgets are checked, so a failed gate (BudgetExceededError) still leaves them.
    `out_dir` is held by this run alone (see rundir.py): a directory holding another recipe's run is
    refused unless `overwrite`; one holding this recipe's earlier run is resumed. With `prefixes`,
    leading PyTorch passes that an earlier run of the same cache already ran are reused. `inputs`
    holds what the Python API was handed in memory: the model, data splits, an eval function.
    """
    from vitcompress.rundir import claim_run_dir, recipe_fingerprint

    resolved = dump_recipe(recipe)
    # Under torchrun every rank runs the PyTorch passes (training is data-parallel; pruning is
    # deterministic), but only rank 0 writes: the others work in a private scratch directory and
    # skip export, ONNX passes and reports.
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        scratch = Path(tempfile.mkdtemp(prefix=f"vitcompress-rank{rank}-"))
        return _run(recipe, resolved, scratch, rank, on_pass, progress, None, inputs or RunInputs())
    with claim_run_dir(Path(out_dir), recipe_fingerprint(resolved), overwrite=overwrite) as claimed:
        return _run(recipe, resolved, claimed, rank, on_pass, progress, prefixes, inputs or RunInputs())


def _run(
    recipe: Recipe,
    resolved: str,
    out_dir: Path,
    rank: int,
    on_pass: Callable[[int, str], None] | None,
    progress: Callable[[str, int, int, dict[str, float]], None] | None,
    prefixes: PrefixCache | None,
    inputs: RunInputs,
) -> RunResult:
    from vitcompress.report import write_reports

    write_text(out_dir / "recipe.resolved.yaml", resolved)
    seed_everything(recipe.run.seed)

    settings = RunSettings(
        out_dir=out_dir,
        seed=recipe.run.seed,
        threads=recipe.run.threads,
        data=recipe.data,
        progress=progress,
        memory=dict(inputs.memory),
        eval_fn=inputs.eval_fn,
    )
    # a model held in memory is not in the recipe: a rerun cannot rebuild it, so no journal
    journal = Journal.for_dir(out_dir) if rank == 0 and inputs.model is None else None
    hit = prefixes.longest(recipe) if prefixes is not None else None
    restored = None
    if journal is not None and hit is None:
        from vitcompress.models import as_model_ref

        restored = journal.restore(as_model_ref(recipe.model), len(recipe.passes), settings)
    if restored is not None:
        state, done = restored
    elif hit is not None:
        # which artifact the reused teacher is cannot be told from here: this run keeps no journal
        state, done, journal = _reuse(hit, settings), hit[0], None
    else:
        state, done = _load(recipe, settings, on_pass, inputs.model), 0
        if journal is not None:
            journal.start(state)
    for index, cfg in enumerate(recipe.passes, start=1):
        if index <= done:
            continue
        name = cfg.step_name
        if on_pass:
            on_pass(index, name)
        log.info("pass %d/%d: %s", index, len(recipe.passes), name)
        if rank > 0 and (cfg.produces_onnx or cfg.needs is Needs.onnx):
            continue
        # each pass draws from its own seeded stream: what it does does not depend on how many
        # random numbers the passes before it happened to draw
        seed_everything(recipe.run.seed * 1_000 + index)
        teacher_before = state.teacher
        state = run_pass(state, cfg)
        if journal is not None:
            journal.passed(index, state, cfg.changes_model, state.teacher is not teacher_before)
        if prefixes is not None and index <= leading_model_passes(recipe):
            prefixes.keep(prefix_key(recipe, index), state)
        release_memory()
    if rank > 0:
        return RunResult(state=state, out_dir=out_dir, budget_failures=())
    failures = check_budgets(recipe.budgets, state.records, state.onnx_path)
    result = RunResult(state=state, out_dir=out_dir, budget_failures=failures)
    write_reports(recipe, result)
    if failures:
        raise BudgetExceededError("budget failed: " + "; ".join(failures), hint=f"reports in {out_dir}")
    return result


def _load(
    recipe: Recipe,
    settings: RunSettings,
    on_pass: Callable[[int, str], None] | None,
    given: LoadedModel | None = None,
) -> ModelState:
    """The state before the first pass: the model as loaded (or as `given`), and a copy of it when
    a pass reads it."""
    from vitcompress.models import as_model_ref, load_model
    from vitcompress.models.stats import count_macs

    if on_pass:
        on_pass(0, "load")
    start = time.perf_counter()
    loaded = given if given is not None else load_model(as_model_ref(recipe.model))
    macs, _ = count_macs(loaded)
    load_record = PassRecord(
        name="load",
        kind="load",
        params=sum(p.numel() for p in loaded.model.parameters()),
        macs=macs,
        wall_s=time.perf_counter() - start,
        details={"source": loaded.label, "family": loaded.adapter.family, "input": list(loaded.input.shape)},
    )
    return ModelState(
        model=loaded,
        settings=settings,
        records=(load_record,),
        teacher=copy.deepcopy(loaded) if needs_teacher(recipe) else None,
    )


def needs_teacher(recipe: Recipe) -> bool:
    """The model as loaded is kept (a copy: a whole second model in memory) only when a later pass
    reads it (each pass says so: distill without a teacher of its own, validate exporting the fp32
    baseline)."""
    return any(cfg.changes_model for cfg in recipe.passes) and any(
        cfg.wants_original_model() for cfg in recipe.passes
    )
