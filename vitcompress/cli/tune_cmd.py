"""`vitcompress tune`: compress to a latency goal on this machine's target runtime."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vitcompress.cli.common import (
    DATA_FORMS,
    JsonOpt,
    ModelFlags,
    build_config,
    err_console,
    out_console,
    print_json,
)
from vitcompress.cli.options import GENERATED, model_options
from vitcompress.cli.target_cmd import PrecisionChoice, RuntimeChoice, profile_progress
from vitcompress.errors import VitcompressError

if TYPE_CHECKING:
    from vitcompress.latency.goal import GoalSection
    from vitcompress.recipe import Recipe


@model_options
def tune(
    model: Annotated[
        str | None,
        typer.Argument(
            help="timm:NAME, hf:DIR or an artifact directory (or give --recipe).", show_default=False
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output directory: tune.md/json/png, one folder per attempt.")
    ] = Path("tune-out"),
    target_p50_ms: Annotated[float | None, typer.Option(help="Median latency to reach, in ms.")] = None,
    target_speedup: Annotated[
        float | None,
        typer.Option(help="Instead: speedup over the original fp32 model on the first --runtime (> 1)."),
    ] = None,
    max_top1_drop: Annotated[float, typer.Option(help="Top-1 points the result may lose.")] = 1.0,
    runtime: Annotated[
        list[RuntimeChoice] | None,
        typer.Option(
            "--runtime",
            help="Runtimes to choose from (repeat: --runtime ort --runtime openvino; default ort). "
            "The result runs on the one chosen; each needs its latency tables.",
        ),
    ] = None,
    precision: Annotated[
        list[PrecisionChoice] | None,
        typer.Option("--precision", help="Precisions to choose from (repeat; default fp32 and int8)."),
    ] = None,
    lowrank: Annotated[
        list[str] | None,
        typer.Option(
            "--lowrank",
            metavar="none|FRACTION",
            help="Low-rank choices for the MLPs after pruning (repeat): none, or a rank fraction of each "
            "fc1/fc2 (e.g. --lowrank none --lowrank 0.5, the default; --lowrank 0.5 alone forces it).",
        ),
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="Runtime threads.")] = 2,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size of the p50.")] = 1,
    data: Annotated[str | None, typer.Option(help=f"Training/calibration data: {DATA_FORMS}.")] = None,
    eval_data: Annotated[
        str | None, typer.Option(help="Eval data (default: the test split of --data's data set).")
    ] = None,
    data_limit: Annotated[
        int | None, typer.Option(min=1, help="Training samples to use (stratified).")
    ] = None,
    eval_limit: Annotated[
        int | None, typer.Option(min=1, help="Eval images for the measured top-1 (stratified).")
    ] = 2000,
    distill_epochs: Annotated[
        float, typer.Option(help="Distillation after pruning, epochs of --data.")
    ] = 1.0,
    distill_steps: Annotated[int | None, typer.Option(min=1, help="Instead: distillation steps.")] = None,
    max_attempts: Annotated[int, typer.Option(min=1, max=6, help="Measured attempts before giving up.")] = 3,
    remeasure: Annotated[
        int,
        typer.Option(
            min=0,
            max=5,
            help="Per attempt, before distilling: time the pruned model against the original and re-plan "
            "up to this often when it misses (0: trust the table until validate).",
        ),
    ] = 2,
    confirm_runs: Annotated[
        int,
        typer.Option(
            min=0,
            max=10,
            help="A latency miss at validate is timed again (this many interleaved rounds, median) "
            "before it costs another attempt (0: validate's reading decides). A reading that meets the goal "
            "stands as it is.",
        ),
    ] = 3,
    tolerance: Annotated[
        float, typer.Option(help="A measured p50 up to this fraction above the goal meets it.")
    ] = 0.1,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            "-r",
            exists=True,
            dir_okay=False,
            help="A recipe with a goal: section instead of flags.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    model_flags: ModelFlags = GENERATED,
    json_out: JsonOpt = False,
) -> None:
    """Compress MODEL until it runs in --target-p50-ms on a --runtime, losing at most --max-top1-drop.

    Uses the target's latency tables (profiled once per CPU, runtime version, precision, threads and
    batch; see `vitcompress target profile`). Refuses a goal no configuration can reach, with the
    fastest reachable p50. Otherwise plans latency-aware pruning for each allowed runtime, precision
    and low-rank choice (MLPs factorized after pruning, --lowrank), scores the candidates with a cheap
    proxy (PyTorch top-1 before distillation), runs the best for real (prune, lowrank, distil, export,
    quantize, validate) and measures it. The prune step times the pruned model against the original
    and re-plans before distilling (--remeasure); a latency miss at validate is timed again
    (--confirm-runs), then corrected and retried.
    OUT/tune.md shows every candidate and attempt, predicted against measured; tune.png the frontier.

    Examples:
      vitcompress tune timm:vit_tiny_patch16_224 --checkpoint ref.safetensors --img-size 28 --in-chans 1 \\
          --num-classes 10 --target-speedup 2 --max-top1-drop 1 --data fashion-mnist --out t/
      vitcompress tune timm:deit_small_patch16_224 --target-p50-ms 15 --runtime ort --runtime openvino \\
          --data my-images/ --eval-data my-images-val/ --out t/
      vitcompress tune --recipe my-goal.yaml --out t/
    """
    from vitcompress.latency.goal import GoalSection
    from vitcompress.latency.tune import tune as run_tune

    if recipe is not None:
        from vitcompress.recipe import load_recipe

        loaded_recipe = load_recipe(recipe)
        if loaded_recipe.goal is None:
            raise VitcompressError(
                f"{recipe} has no goal: section", hint="add goal: {target_p50_ms: 20, max_top1_drop: 1}"
            )
    else:
        if model is None:
            raise VitcompressError(
                "give MODEL (or --recipe)", hint="e.g. vitcompress tune timm:deit_small_patch16_224 ..."
            )
        if data is None:
            raise VitcompressError(
                "tune needs --data (accuracy proxy, importance and distillation)",
                hint="e.g. --data fashion-mnist",
            )
        goal = build_config(
            GoalSection,
            target_p50_ms=target_p50_ms,
            target_speedup=target_speedup,
            max_top1_drop=max_top1_drop,
            runtime=[r.value for r in runtime] if runtime else None,
            precisions=[p.value for p in precision] if precision else None,
            lowrank=lowrank or None,
            threads=threads,
            batch=batch,
            max_attempts=max_attempts,
            remeasure=remeasure,
            confirm_runs=confirm_runs,
            tolerance=tolerance,
            distill_epochs=distill_epochs,
            distill_steps=distill_steps,
        )
        loaded_recipe = _recipe_from_flags(
            model, goal, data, eval_data, data_limit, eval_limit, seed, model_flags
        )
    with profile_progress("the target") as update, err_console.status("tuning") as spinner:
        report = run_tune(
            loaded_recipe, out, on_status=lambda msg: spinner.update(f"tune: {msg}"), on_profile=update
        )
    if json_out:
        print_json(report.to_dict())
        return
    out_console.print((out / "tune.md").read_text(), markup=False, soft_wrap=True)


def _recipe_from_flags(
    model: str, goal: GoalSection, data: str, eval_data: str | None, data_limit: int | None,
    eval_limit: int | None, seed: int, model_flags: ModelFlags,
) -> Recipe:  # fmt: skip
    from vitcompress.data import DataSection, DataSpec
    from vitcompress.passes.distill import DistillConfig
    from vitcompress.recipe import ModelSection, Recipe, RunSection

    train = DataSpec.parse(data, limit=data_limit, seed=seed)
    if eval_data is not None:
        evaluation = DataSpec.parse(eval_data, limit=eval_limit)
    elif train.source.value in ("fashion-mnist", "digits"):
        evaluation = train.model_copy(update={"split": "test", "limit": eval_limit})
    elif train.source.value == "synthetic":  # noise: other samples of it
        evaluation = train.model_copy(update={"seed": seed + 1})
    else:
        raise VitcompressError(
            "an image folder has no test split: give --eval-data", hint="--eval-data path/to/val"
        )
    distill = DistillConfig(epochs=goal.distill_epochs, steps=goal.distill_steps)
    return Recipe(
        version=1,
        name=f"tune {model}",
        model=ModelSection(source=model, **model_flags.section()),
        run=RunSection(seed=seed, threads=goal.threads),
        data=DataSection(train=train, eval=evaluation, calibration=train.model_copy(update={"limit": 512})),
        passes=[distill],
        goal=goal,
    )
