"""Run a recipe: load the model, run its passes in order, keep the ledger, write reports, check budgets."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vitcompress.errors import BudgetExceededError
from vitcompress.fileio import write_text
from vitcompress.passes import PASSES, Needs
from vitcompress.recipe import Recipe, dump_recipe
from vitcompress.state import ModelState, PassRecord, RunSettings

if TYPE_CHECKING:
    from vitcompress.models import ModelRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    state: ModelState
    out_dir: Path
    budget_failures: tuple[str, ...]

    @property
    def ledger(self) -> tuple[PassRecord, ...]:
        return self.state.records


def model_ref(recipe: Recipe) -> ModelRef:
    from vitcompress.models import ModelRef

    section = recipe.model
    return ModelRef(
        source=section.source,
        checkpoint=section.checkpoint,
        num_classes=section.num_classes,
        img_size=section.img_size,
        in_chans=section.in_chans,
        trust_checkpoint=section.trust_checkpoint,
        kwargs=dict(section.kwargs),
    )


def check_budgets(recipe: Recipe, state: ModelState) -> tuple[str, ...]:
    budgets, failures = recipe.budgets, []
    measured = next((r for r in reversed(state.records) if r.latency_p50_ms is not None), None)
    if (budgets.max_p50_ms or budgets.min_speedup) and measured is None:
        failures.append("latency budgets are set but no pass measured latency: add a validate pass")
    if (
        measured is not None
        and budgets.max_p50_ms is not None
        and measured.latency_p50_ms is not None
        and measured.latency_p50_ms > budgets.max_p50_ms
    ):
        failures.append(f"p50 {measured.latency_p50_ms:.2f} ms > max_p50_ms {budgets.max_p50_ms:g}")
    speedup = measured.details.get("speedup_vs_baseline") if measured else None
    if budgets.min_speedup is not None and speedup is not None and speedup < budgets.min_speedup:
        failures.append(f"speed-up {speedup:.2f}x < min_speedup {budgets.min_speedup:g}x")
    failures += [str(r.details["gate_failure"]) for r in state.records if "gate_failure" in r.details]
    if budgets.max_top1_drop is not None:
        accuracy = next((r for r in reversed(state.records) if "top1_drop_points" in r.details), None)
        if accuracy is None:
            failures.append(
                "max_top1_drop is set but no pass measured accuracy: add data.eval and a validate pass"
            )
        elif not accuracy.details.get("sanity", {}).get("ok", True):
            # a drop measured against a broken reference proves nothing, however small it is
            sanity = accuracy.details["sanity"]
            failures.append(
                f"max_top1_drop cannot be judged: the {sanity['model']} it is measured against fails the "
                f"sanity check ({'; '.join(sanity['problems'])}), so the measured drop of "
                f"{accuracy.details['top1_drop_points']:.2f} points means nothing: the model is untrained "
                "(a checkpoint missing?) or the data is not preprocessed as it was trained (data mean, "
                "std, input_range)"
            )
        elif accuracy.details["top1_drop_points"] > budgets.max_top1_drop:
            failures.append(
                f"top-1 drop {accuracy.details['top1_drop_points']:.2f} points > max_top1_drop {budgets.max_top1_drop:g}"
            )
    if budgets.max_size_mb is not None and state.onnx_path is not None:
        from vitcompress.runtime import onnx_size

        size_mb = onnx_size(state.onnx_path) / 1e6
        if size_mb > budgets.max_size_mb:
            failures.append(f"ONNX size {size_mb:.2f} MB > max_size_mb {budgets.max_size_mb:g}")
    return tuple(failures)


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


def seed_everything(seed: int) -> None:
    """Seed every generator a pass may draw from (random init of a hub-less timm model, a distill
    pass's feature projections, numpy shuffles), so a recipe with `run.seed` is reproducible."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_recipe(
    recipe: Recipe,
    out_dir: Path,
    on_pass: Callable[[int, str], None] | None = None,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Run every pass of `recipe`, writing artifacts and reports to `out_dir`.

    on_pass(index, name) is called before each step (index 0 is loading the model). Reports are
    written before budgets are checked, so a failed gate (BudgetExceededError) still leaves them.
    `out_dir` is held by this run alone (see rundir.py): a directory holding another recipe's run is
    refused unless `overwrite`; one holding this recipe's earlier run is resumed.
    """
    from vitcompress.rundir import claim_run_dir, recipe_fingerprint

    resolved = dump_recipe(recipe)
    # Under torchrun every rank runs the PyTorch passes (training is data-parallel; pruning is
    # deterministic), but only rank 0 writes: the others work in a private scratch directory and
    # skip export, ONNX passes and reports.
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        scratch = Path(tempfile.mkdtemp(prefix=f"vitcompress-rank{rank}-"))
        return _run(recipe, resolved, scratch, rank, on_pass, progress)
    with claim_run_dir(Path(out_dir), recipe_fingerprint(resolved), overwrite=overwrite) as claimed:
        return _run(recipe, resolved, claimed, rank, on_pass, progress)


def _run(
    recipe: Recipe,
    resolved: str,
    out_dir: Path,
    rank: int,
    on_pass: Callable[[int, str], None] | None,
    progress: Callable[[str, int, int, dict[str, float]], None] | None,
) -> RunResult:
    from vitcompress.models import load_model
    from vitcompress.models.stats import count_macs
    from vitcompress.report import write_reports

    write_text(out_dir / "recipe.resolved.yaml", resolved)
    seed_everything(recipe.run.seed)

    if on_pass:
        on_pass(0, "load")
    start = time.perf_counter()
    loaded = load_model(model_ref(recipe))
    macs, _ = count_macs(loaded)
    load_record = PassRecord(
        name="load",
        kind="load",
        params=sum(p.numel() for p in loaded.model.parameters()),
        macs=macs,
        wall_s=time.perf_counter() - start,
        details={"source": loaded.label, "family": loaded.adapter.family, "input": list(loaded.input.shape)},
    )
    # The model as loaded is kept (a copy: a whole second model in memory) only when a later pass
    # reads it: distill without a teacher of its own, or validate exporting the fp32 baseline.
    needs_teacher = any(PASSES[cfg.kind].changes_model for cfg in recipe.passes) and any(
        (cfg.kind == "distill" and getattr(cfg, "teacher", None) is None)
        or (cfg.kind == "validate" and getattr(cfg, "compare_baseline", False))
        for cfg in recipe.passes
    )
    state = ModelState(
        model=loaded,
        settings=RunSettings(
            out_dir=out_dir,
            seed=recipe.run.seed,
            threads=recipe.run.threads,
            data=recipe.data,
            progress=progress,
        ),
        records=(load_record,),
        teacher=copy.deepcopy(loaded) if needs_teacher else None,
    )
    for index, cfg in enumerate(recipe.passes, start=1):
        name = cfg.step_name
        if on_pass:
            on_pass(index, name)
        log.info("pass %d/%d: %s", index, len(recipe.passes), name)
        spec = PASSES[cfg.kind]
        if rank > 0 and (spec.produces_onnx or spec.needs is Needs.onnx):
            continue
        # each pass draws from its own seeded stream: what it does does not depend on how many
        # random numbers the passes before it happened to draw
        seed_everything(recipe.run.seed * 1_000 + index)
        state = spec.runner()(state, cfg)
        if spec.changes_model:
            state = replace(state, model_changed=True)
        release_memory()
    if rank > 0:
        return RunResult(state=state, out_dir=out_dir, budget_failures=())
    failures = check_budgets(recipe, state)
    result = RunResult(state=state, out_dir=out_dir, budget_failures=failures)
    write_reports(recipe, result)
    if failures:
        raise BudgetExceededError("budget failed: " + "; ".join(failures), hint=f"reports in {out_dir}")
    return result
