"""Low-rank factorization of ViT linear layers: W (out x in) -> B (out x r) @ A (r x in).

Plain truncated SVD keeps the r largest singular directions of the weight (Eckart-Young: the best
rank-r approximation of W itself). The data-aware variant keeps the best rank-r approximation of the
layer's *output on real activations*: with the input second moment C = X^T X = L L^T (Cholesky, a
little damping), SVD of W L gives W' = U_r S_r V_r^T L^-1, which minimizes ||(W - W') X||_F
(activation-whitened SVD, as in SVD-LLM, Wang et al. 2024, and ASVD). `method: auto` computes both
on the calibration batches and keeps, per layer, whichever has the lower output error.

Ranks come from a fixed rank, a fraction of full rank, retained spectral energy, or a global
parameter/MAC budget: every chunk of `round_to` singular directions is a unit whose loss is its
share of the layer's (normalized) energy and whose gain is the parameters it frees; the cheapest
units go first, so layers with fast-decaying spectra give more. A layer factorizes only when
r < out*in/(out+in); otherwise it stays dense and the report says so.

The factorized layer is `LowRankLinear` (two nn.Linear, so ONNX export, quantization and the
artifact need nothing special); the artifact records each replaced layer and its rank as an edit.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from vitcompress.errors import VitcompressError
from vitcompress.passes.base import PassConfig, fraction_or_count

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitcompress.data import Dataset
    from vitcompress.models.layers import LowRankLinear
    from vitcompress.models.loader import LoadedModel
    from vitcompress.state import ModelState

log = logging.getLogger(__name__)


class LowRankError(VitcompressError):
    """A factorization request that cannot be met (no layer matched, unreachable budget)."""


class Method(str, Enum):
    svd = "svd"  # weights only
    whitened = "whitened"  # activation-whitened SVD, needs data
    auto = "auto"  # both, per layer the one with lower output error on the calibration data


class LowRankConfig(PassConfig):
    """Which linears to factorize and how to choose their ranks (exactly one of the rank rules)."""

    summary: ClassVar[str] = "low-rank factorization of linear layers (truncated or activation-whitened SVD)"
    engine: ClassVar[str] = "vitcompress.passes.lowrank"
    changes_model: ClassVar[bool] = True
    reshapes_linears: ClassVar[bool] = True

    kind: Literal["lowrank"] = "lowrank"
    layers: list[str] | None = Field(
        None, description="Module-name globs (default: every block's MLP fc1 and fc2)."
    )
    rank: int | None = Field(None, gt=0, description="The same rank for every layer.")
    rank_fraction: float | None = Field(None, gt=0, le=1, description="Rank as a fraction of min(out, in).")
    energy: float | None = Field(
        None, gt=0, le=1, description="Keep this fraction of each layer's spectral energy."
    )
    target_params: float | None = Field(
        None,
        description="Parameters of the whole model to keep: a fraction in (0, 1) or a count (integer > 1).",
    )
    target_macs: float | None = Field(
        None, description="MACs of the whole model to keep: a fraction in (0, 1) or a count (integer > 1)."
    )
    tolerance: float = Field(
        0.02, gt=0, lt=0.5, description="How close to a target, as a fraction of the original."
    )
    method: Method = Field(
        Method.svd, description="svd, whitened (needs data) or auto (both, keep the better)."
    )
    round_to: int = Field(8, ge=1, description="Ranks are multiples of this (fast kernels).")
    damping: float = Field(1e-2, gt=0, description="Whitening: add damping * mean(diag C) to C's diagonal.")
    attention: Literal["none", "comcat"] = Field(
        "none", description="comcat: per-head low rank of the query-key and value-output products (COMCAT)."
    )
    attention_rank: float = Field(
        0.5,
        description="COMCAT head size: a fraction of the head size in (0, 1] or an absolute size (integer > 1).",
    )
    calibration_batches: int = Field(8, ge=1, description="Batches of data for whitened/auto.")
    batch_size: int = Field(32, ge=1, description="Batch size of the calibration batches.")

    @field_validator("target_params", "target_macs")
    @classmethod
    def _target_range(cls, value: float | None) -> float | None:
        return fraction_or_count(value)

    @field_validator("attention_rank")
    @classmethod
    def _attention_rank_range(cls, value: float) -> float:
        return fraction_or_count(value, whole=True) or value

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankConfig:
        rules = [
            n
            for n in ("rank", "rank_fraction", "energy", "target_params", "target_macs")
            if getattr(self, n) is not None
        ]
        if len(rules) > 1 or (not rules and self.attention == "none"):
            raise ValueError(
                "set exactly one of rank, rank_fraction, energy, target_params, target_macs "
                "(or only attention: comcat)" + (f" (got {', '.join(rules)})" if rules else "")
            )
        return self

    def needs_data(self) -> bool:
        return self.method is not Method.svd and self.has_linear_rule

    @property
    def has_linear_rule(self) -> bool:
        return any(
            getattr(self, n) is not None
            for n in ("rank", "rank_fraction", "energy", "target_params", "target_macs")
        )


def breakeven_rank(out_features: int, in_features: int) -> float:
    """Factorizing saves parameters and MACs only below this rank."""
    return out_features * in_features / (out_features + in_features)


# --------------------------------------------------------------------------- factorization


@dataclass
class Factors:
    """A layer's decomposition: W ~= U[:, :r] diag(S[:r]) Vt[:r] @ Linv (Linv = I for plain SVD)."""

    u: torch.Tensor
    s: torch.Tensor
    vt: torch.Tensor
    linv: torch.Tensor | None
    method: Method

    def energy(self) -> torch.Tensor:
        """Cumulative fraction of the spectral energy kept at rank 1, 2, ..."""

        e = self.s.double().pow(2)
        return (e.cumsum(0) / e.sum().clamp_min(1e-30)).float()

    def matrices(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(second, first) weights: out x r and r x in; the singular values are split evenly."""
        root = self.s[:rank].sqrt()
        second = self.u[:, :rank] * root
        first = root[:, None] * self.vt[:rank]
        if self.linv is not None:
            first = first @ self.linv
        return second, first


def svd_factors(weight: torch.Tensor) -> Factors:
    import torch

    u, s, vt = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return Factors(u.float(), s.float(), vt.float(), None, Method.svd)


def whitened_factors(weight: torch.Tensor, second_moment: torch.Tensor, damping: float) -> Factors:
    """SVD of W L with C = L L^T: truncating it minimizes the output error on the activations behind C."""
    import torch

    c = second_moment.double()
    c = c + damping * c.diagonal().mean().clamp_min(1e-12) * torch.eye(c.shape[0], dtype=c.dtype)
    lower = torch.linalg.cholesky(c)
    u, s, vt = torch.linalg.svd(weight.detach().double() @ lower, full_matrices=False)
    linv = torch.linalg.solve_triangular(lower, torch.eye(c.shape[0], dtype=c.dtype), upper=False)
    return Factors(u.float(), s.float(), vt.float(), linv.float(), Method.whitened)


def factorize_linear(linear: nn.Linear, factors: Factors, rank: int) -> LowRankLinear:
    import torch

    from vitcompress.models.layers import LowRankLinear

    second, first = factors.matrices(rank)
    layer = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None)
    with torch.no_grad():
        layer.first.weight.copy_(first)
        layer.second.weight.copy_(second)
        if linear.bias is not None:
            layer.second.bias.copy_(linear.bias)
    return layer.to(linear.weight.dtype)


def output_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """||(W - W') X||_F^2 / ||W X||_F^2 from the input second moment C = X^T X (no activations kept)."""

    delta = (weight - approx).detach().double()
    c = second_moment.double()
    w = weight.detach().double()
    num = ((delta @ c) * delta).sum()
    den = ((w @ c) * w).sum()
    return float(num / den.clamp_min(1e-30))


def collect_second_moments(
    model: nn.Module, layers: dict[str, nn.Linear], batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """X^T X of every selected layer's input over the calibration batches (tokens x batch as rows)."""
    import torch

    moments = {
        name: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64)
        for name, lin in layers.items()
    }

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            moments[name] += x.T @ x

        return record

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs, _ in batches:
                model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return moments


# --------------------------------------------------------------------------- rank choice


def _round_down(value: float, r: int) -> int:
    return int(value // r) * r


def max_useful_rank(linear: nn.Linear, r: int) -> int:
    """The largest multiple of r that still saves parameters (0 if none does)."""
    be = breakeven_rank(linear.out_features, linear.in_features)
    rank = _round_down(be, r)
    if rank >= be:
        rank -= r
    return max(rank, 0)


def _layer_params(linear: nn.Linear, rank: int | None) -> int:
    """Weight parameters at a rank (None: dense)."""
    return (
        linear.in_features * linear.out_features
        if rank is None
        else rank * (linear.in_features + linear.out_features)
    )


@dataclass(frozen=True)
class Choice:
    name: str
    rank: int | None  # None: stays dense (factorizing would not save anything)
    reason: str


def choose_ranks(
    cfg: LowRankConfig,
    layers: dict[str, nn.Linear],
    factors: dict[str, Factors],
    budget_weights: float | None,
) -> list[Choice]:
    """Ranks per layer by the configured rule; `budget_weights` is the weight-parameter budget of the layers."""
    import torch

    r = cfg.round_to
    choices: list[Choice] = []
    if budget_weights is None:
        for name, lin in layers.items():
            full = min(lin.in_features, lin.out_features)
            if cfg.rank is not None:
                rank = cfg.rank
            elif cfg.rank_fraction is not None:
                rank = max(r, round(cfg.rank_fraction * full / r) * r)
            else:
                assert cfg.energy is not None
                energy = factors[name].energy()
                needed = int(torch.searchsorted(energy, torch.tensor(cfg.energy - 1e-7)).item()) + 1
                rank = max(r, math.ceil(needed / r) * r)
            rank = min(rank, full)
            if rank >= breakeven_rank(lin.out_features, lin.in_features):
                choices.append(
                    Choice(
                        name,
                        None,
                        f"rank {rank} >= {breakeven_rank(lin.out_features, lin.in_features):.0f} saves nothing",
                    )
                )
            else:
                choices.append(Choice(name, rank, ""))
        return choices

    # Global budget: units are "factorize at the largest useful rank" and then each further chunk of r.
    units: list[tuple[float, str, int, int]] = []  # (loss per parameter freed, layer, step, params freed)
    for name, lin in layers.items():
        top = max_useful_rank(lin, r)
        if top < r:
            continue
        energy = factors[name].energy()
        kept = lambda rank, energy=energy: float(energy[rank - 1]) if rank > 0 else 0.0  # noqa: E731
        freed = _layer_params(lin, None) - _layer_params(lin, top)
        running = (1.0 - kept(top)) / freed
        units.append((running, name, 0, freed))
        for step, rank in enumerate(range(top - r, 0, -r), start=1):
            loss = kept(rank + r) - kept(rank)
            running = max(running, loss / (r * (lin.in_features + lin.out_features)))
            units.append((running, name, step, r * (lin.in_features + lin.out_features)))
    total = float(sum(_layer_params(lin, None) for lin in layers.values()))
    steps = {name: -1 for name in layers}  # -1: dense
    for _, name, step, freed in sorted(units, key=lambda u: (u[0], u[1], u[2])):
        if total <= budget_weights:
            break
        if step != steps[name] + 1:
            continue
        steps[name] = step
        total -= freed
    for name, lin in layers.items():
        if steps[name] < 0:
            choices.append(Choice(name, None, "left dense by the budget"))
        else:
            choices.append(Choice(name, max_useful_rank(lin, r) - steps[name] * r, ""))
    return choices


# --------------------------------------------------------------------------- COMCAT attention


def _low_rank_product(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of left^T @ right (both h x n), as (a, b) with a^T @ b ~= left^T @ right.

    The product has rank <= h, so it is decomposed through thin QRs and an h x h SVD, never formed.
    """
    import torch

    q1, r1 = torch.linalg.qr(left.double().T)
    q2, r2 = torch.linalg.qr(right.double().T)
    u, s, vt = torch.linalg.svd(r1 @ r2.T)
    root = s[:rank].sqrt()
    a = (q1 @ u[:, :rank] * root).T
    b = (q2 @ vt[:rank].T * root).T
    return a.float(), b.float()


def comcat_attention(loaded: LoadedModel, block_index: int, rank: int) -> None:
    """Replace a block's attention weights by per-head rank-r factors of W_q^T W_k and W_o W_v (COMCAT).

    COMCAT (Xiao et al., ICML 2023) observes that attention only uses each head's products
    W_q^T W_k (scores) and W_o W_v (output), each of rank <= head size; their best rank-r factors
    give a head of size r. Biases: the query bias rides along as an extra input column; the key bias
    only shifts every score of a query by the same amount, which softmax ignores, so it is dropped;
    the value bias reaches the output as W_o b_v (attention rows sum to one) and moves into the
    output bias. The old 1/sqrt(head size) temperature is folded into the queries. At r = head size
    the block computes exactly what it did.
    """
    import torch
    from torch import nn

    from vitcompress.models.layers import set_module

    adapter = loaded.adapter
    info = adapter.blocks()[block_index].attn
    heads, hd = info.num_heads, info.head_dim
    a = heads * hd
    if len(info.qkv) == 1:
        w = info.qkv[0].weight.detach()
        wq, wk, wv = w[:a], w[a : 2 * a], w[2 * a :]
        b = info.qkv[0].bias.detach() if info.qkv[0].bias is not None else torch.zeros(3 * a)
        bq, bv = b[:a], b[2 * a :]
        has_bias = info.qkv[0].bias is not None
    else:
        wq, wk, wv = (lin.weight.detach() for lin in info.qkv)
        zeros = torch.zeros(a)
        bq = info.qkv[0].bias.detach() if info.qkv[0].bias is not None else zeros
        bv = info.qkv[2].bias.detach() if info.qkv[2].bias is not None else zeros
        has_bias = info.qkv[0].bias is not None
    wo = info.proj.weight.detach()
    bo = info.proj.bias.detach().clone() if info.proj.bias is not None else torch.zeros(wo.shape[0])
    d_in = wq.shape[1]
    temperature = math.sqrt(rank / hd)
    q_w, q_b, k_w, v_w, o_w = [], [], [], [], []
    for h in range(heads):
        rows = slice(h * hd, (h + 1) * hd)
        query = torch.cat([wq[rows], bq[rows, None]], dim=1)  # the bias as an extra input column
        key = torch.cat([wk[rows], torch.zeros(hd, 1)], dim=1)
        qa, ka = _low_rank_product(query, key, rank)
        q_w.append(qa[:, :d_in] * temperature)
        q_b.append(qa[:, d_in] * temperature)
        k_w.append(ka[:, :d_in])
        # W_o,h W_v,h = (W_o,h^T)^T W_v,h
        oa, va = _low_rank_product(wo[:, rows].T, wv[rows], rank)
        v_w.append(va)
        o_w.append(oa.T)
        bo += wo[:, rows] @ bv[rows]
    new_a = heads * rank
    q_weight, k_weight, v_weight = torch.cat(q_w), torch.cat(k_w), torch.cat(v_w)
    q_bias = torch.cat(q_b)
    if not has_bias and q_bias.abs().max() > 0:
        raise LowRankError(
            f"{adapter.blocks()[block_index].name}: COMCAT produced a query bias for a layer without one"
        )
    proj = nn.Linear(new_a, wo.shape[0], bias=True)
    with torch.no_grad():
        proj.weight.copy_(torch.cat(o_w, dim=1))
        proj.bias.copy_(bo)
    if len(info.qkv) == 1:
        qkv = nn.Linear(d_in, 3 * new_a, bias=has_bias)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([q_weight, k_weight, v_weight]))
            if has_bias:
                qkv.bias.copy_(torch.cat([q_bias, torch.zeros(2 * new_a)]))
        set_module(loaded.model, adapter.module_name(info.qkv[0]), qkv)
    else:
        for old, weight, bias in zip(
            info.qkv, (q_weight, k_weight, v_weight), (q_bias, None, None), strict=True
        ):
            new = nn.Linear(d_in, new_a, bias=old.bias is not None)
            with torch.no_grad():
                new.weight.copy_(weight)
                if new.bias is not None:
                    new.bias.copy_(bias if bias is not None else torch.zeros(new_a))
            set_module(loaded.model, adapter.module_name(old), new)
    if info.proj.bias is None:
        raise LowRankError(
            f"{adapter.blocks()[block_index].name}: COMCAT needs an output bias to carry the value bias"
        )
    set_module(loaded.model, adapter.module_name(info.proj), proj)
    adapter.set_attention_shape(block_index, heads, rank)


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
