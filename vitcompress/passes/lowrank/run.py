"""The lowrank pass: pick the layers, choose ranks, factorize, replace the modules, and report what
each layer kept."""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vitcompress.errors import LowRankError
from vitcompress.passes.lowrank.comcat import comcat_attention
from vitcompress.passes.lowrank.config import LowRankConfig, Method
from vitcompress.passes.lowrank.factors import (
    Factors,
    collect_second_moments,
    factorize_linear,
    output_error,
    svd_factors,
    whitened_factors,
)
from vitcompress.passes.lowrank.ranks import _layer_params, choose_ranks

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitcompress.data import Dataset
    from vitcompress.models.layers import LowRankLinear
    from vitcompress.models.loader import LoadedModel
    from vitcompress.state import ModelState

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the pass


def select_layers(loaded: LoadedModel, globs: list[str] | None) -> dict[str, nn.Linear]:
    from torch import nn

    linears = {n: m for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)}
    if globs is None:
        adapter = loaded.adapter
        names = [adapter.module_name(m) for b in adapter.blocks() for m in (b.mlp.fc1, b.mlp.fc2)]
        return {n: linears[n] for n in names if n in linears}
    selected: dict[str, nn.Linear] = {}
    for glob in globs:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, glob)]
        if not hits:
            from vitcompress.errors import did_you_mean

            raise LowRankError(
                f"layers: {glob!r} matches no linear layer of the model",
                hint=did_you_mean(glob, list(linears)),
            )
        selected.update({n: linears[n] for n in hits})
    return selected


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    rank: int | None
    method: str | None
    energy_kept: float | None
    output_error: float | None  # relative, on the calibration activations (None without data)
    note: str


@dataclass
class LowRankResult:
    layers: list[LayerReport]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    attention: list[dict[str, int]] = field(default_factory=list)


def factorize_model(
    loaded: LoadedModel, cfg: LowRankConfig, data: Dataset | None = None, seed: int = 0
) -> LowRankResult:
    """Factorize `loaded.model` in place as `cfg` asks."""
    from vitcompress.models.layers import set_module
    from vitcompress.models.stats import count_macs

    model = loaded.model
    params0 = sum(p.numel() for p in model.parameters())
    macs0, _ = count_macs(loaded)
    attention_report: list[dict[str, int]] = []
    if cfg.attention == "comcat":
        for b in loaded.adapter.blocks():
            hd = b.attn.head_dim
            rank = round(cfg.attention_rank * hd) if cfg.attention_rank <= 1 else int(cfg.attention_rank)
            rank = min(hd, max(1, rank))
            if rank > cfg.round_to:
                rank = rank // cfg.round_to * cfg.round_to
            comcat_attention(loaded, b.index, rank)
            attention_report.append({"block": b.index, "head_dim_before": hd, "head_dim_after": rank})
    if not cfg.has_linear_rule:
        params = sum(p.numel() for p in model.parameters())
        macs, _ = count_macs(loaded)
        return LowRankResult([], params0, params, macs0, macs, attention_report)
    layers = select_layers(loaded, cfg.layers)
    moments: dict[str, torch.Tensor] = {}
    if cfg.needs_data():
        if data is None:
            raise LowRankError(
                f"method {cfg.method.value!r} needs data",
                hint="add data.calibration to the recipe, or --data; or use method svd",
            )
        batches = list(
            data.batches(cfg.batch_size, shuffle=True, seed=seed, limit_batches=cfg.calibration_batches)
        )
        moments = collect_second_moments(model, layers, batches)

    factors: dict[str, dict[Method, Factors]] = {}
    for name, lin in layers.items():
        options: dict[Method, Factors] = {}
        if cfg.method in (Method.svd, Method.auto):
            options[Method.svd] = svd_factors(lin.weight)
        if cfg.method in (Method.whitened, Method.auto):
            options[Method.whitened] = whitened_factors(lin.weight, moments[name], cfg.damping)
        factors[name] = options
    # Rank choice reads one spectrum per layer: the whitened one when there is data (it measures output error).
    primary = {n: f[Method.whitened] if Method.whitened in f else f[Method.svd] for n, f in factors.items()}
    budget: float | None = None
    if cfg.target_macs is not None:
        from vitcompress.models.tokens import token_schedule_of

        if token_schedule_of(model) is not None:  # the MAC budget assumes every token in every block
            raise LowRankError(
                f"target_macs on {loaded.label}, which reduces its tokens: factorize before the tokens pass",
                hint="put the lowrank step before the tokens step, or use target_params or a rank rule",
            )
    if cfg.target_params is not None or cfg.target_macs is not None:
        budget = _weight_budget(cfg, layers, params0, macs0, loaded.adapter.num_tokens)
    choices = choose_ranks(cfg, layers, primary, budget)

    reports: list[LayerReport] = []
    for choice in choices:
        lin = layers[choice.name]
        shape = (lin.out_features, lin.in_features)
        if choice.rank is None:
            log.info("lowrank: %s stays dense (%s)", choice.name, choice.reason)
            reports.append(LayerReport(choice.name, shape, None, None, None, None, choice.reason))
            continue
        best: tuple[float, Method, LowRankLinear] | None = None
        for method, f in factors[choice.name].items():
            layer = factorize_linear(lin, f, choice.rank)
            error = output_error(lin.weight, layer.weight, moments[choice.name]) if moments else math.nan
            if best is None or error < best[0]:
                best = (error, method, layer)
        assert best is not None
        error, method, layer = best
        set_module(model, choice.name, layer)
        energy = float(primary[choice.name].energy()[choice.rank - 1])
        reports.append(
            LayerReport(
                choice.name,
                shape,
                choice.rank,
                method.value,
                energy,
                None if math.isnan(error) else error,
                "",
            )
        )
    params = sum(p.numel() for p in model.parameters())
    macs, _ = count_macs(loaded)
    result = LowRankResult(reports, params0, params, macs0, macs, attention_report)
    if budget is not None:
        name, value = (
            ("target_params", cfg.target_params)
            if cfg.target_params is not None
            else ("target_macs", cfg.target_macs)
        )
        assert value is not None
        total0, reached = (params0, params) if name == "target_params" else (macs0, macs)
        goal = value * total0 if value < 1 else value
        if abs(reached - goal) > cfg.tolerance * total0:
            raise LowRankError(
                f"{name}={value:g}: reached {reached / total0:.1%} of the original, goal {goal / total0:.1%} "
                f"(tolerance {cfg.tolerance:.0%}); the selected layers cannot give that much",
                hint="select more layers, lower round_to, or raise the target",
            )
    return result


def _weight_budget(
    cfg: LowRankConfig, layers: dict[str, nn.Linear], params0: int, macs0: int, tokens: int
) -> float:
    """The weight parameters the selected layers may keep so that the model meets its target."""
    dense = sum(_layer_params(lin, None) for lin in layers.values())
    if cfg.target_params is not None:
        goal = cfg.target_params * params0 if cfg.target_params < 1 else cfg.target_params
        return dense - (params0 - goal)
    assert cfg.target_macs is not None
    goal = cfg.target_macs * macs0 if cfg.target_macs < 1 else cfg.target_macs
    return dense - (macs0 - goal) / tokens  # a linear's MACs per image = tokens x its weight parameters


def run(state: ModelState, cfg: LowRankConfig) -> ModelState:
    from vitcompress.models.artifact import save_artifact
    from vitcompress.state import Measured

    loaded = state.model
    needed_by = f"{cfg.step_name} (method {cfg.method.value})"
    data = state.load_split("calibration", needed_by) if cfg.needs_data() else None
    result = factorize_model(loaded, cfg, data, seed=state.settings.seed)
    directory = state.settings.out_dir / cfg.step_name
    save_artifact(loaded, directory, history=[{"pass": cfg.step_name, "config": cfg.model_dump(mode="json")}])
    outcome = Measured(
        params=result.params_after,
        macs=result.macs_after,
        artifact=str(directory),
        details={
            "params_ratio": result.params_after / result.params_before,
            "macs_ratio": result.macs_after / result.macs_before,
            "layers": [r.__dict__ for r in result.layers],
            "attention": result.attention,
            "blocks": loaded.adapter.structure(),
        },
    )
    return state.passed(cfg, outcome)
