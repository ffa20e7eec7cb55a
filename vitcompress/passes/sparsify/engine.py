"""The `sparsify` pass: post-training semi-structured (n:m) and block sparsity of ViT linears.

It follows LPViT (Xu et al., "LPViT: Low-Power Semi-structured Pruning for Vision Transformers",
ECCV 2024): linear layers are pruned in blocks after training, blocks are ranked by a second-order
(Hessian) estimate of the error their removal causes per unit of cost saved, on calibration data, and
NVIDIA's 2:4 pattern is one of the targets. The second-order part is OBS in SparseGPT's form (see
`select`): per layer, the Hessian of its reconstruction loss H = X^T X from calibration activations,
masks by w^2/[H^-1]_qq (summed over a block), and the surviving weights corrected so the layer's
output holds without retraining. Transformer blocks are handled in order, each calibrated on the
outputs of the blocks already sparsified (`sequential`).

Allocation: `uniform` gives every layer the same sparsity; `global` (block patterns) ranks every
block of every selected layer at once by its OBS error relative to the layer's output energy, divided
by the MACs its removal saves, and cuts at the target, so robust layers give more. (In a ViT every
linear sees the same tokens, so a tile saves the same MACs everywhere and the ranking is by error;
the division keeps the objective right for models where that is not so.)

Each sparsified linear keeps its mask as a buffer (`models.layers.attach_mask`): the artifact
reloads it, distillation re-applies it after every step, and exports carry the zeros in the weights.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from vitcompress.errors import SparsifyError, did_you_mean
from vitcompress.passes.sparsify.config import Allocation, Pattern, SelectMethod, SparsifyConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitcompress.data import Dataset
    from vitcompress.models.loader import LoadedModel
    from vitcompress.state import ModelState

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- layer selection


def default_layers(loaded: LoadedModel) -> list[str]:
    """Every block's attention (qkv or q/k/v, proj) and MLP (fc1, fc2) linears, in forward order.
    A factorized layer (two thin linears) contributes both of its linears."""
    from torch import nn

    adapter = loaded.adapter
    names: list[str] = []
    for block in adapter.blocks():
        for module in (*block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            name = adapter.module_name(module)
            if isinstance(module, nn.Linear):
                names.append(name)
            else:
                names.extend(
                    f"{name}.{child}"
                    for child, sub in module.named_modules()
                    if child and isinstance(sub, nn.Linear)
                )
    return names


def select_layers(loaded: LoadedModel, globs: list[str] | None) -> dict[str, nn.Linear]:
    from torch import nn

    linears = {n: m for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)}
    if globs is None:
        return {n: linears[n] for n in default_layers(loaded) if n in linears}
    selected: dict[str, nn.Linear] = {}
    for glob in globs:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, glob)]
        if not hits:
            raise SparsifyError(
                f"layers: {glob!r} matches no linear layer of the model",
                hint=did_you_mean(glob, list(linears)),
            )
        selected.update({n: linears[n] for n in hits})
    return selected


def _groups(loaded: LoadedModel, names: list[str]) -> list[tuple[nn.Module | None, list[str]]]:
    """Layers grouped by transformer block in forward order; layers outside every block come last
    (their group has no block: calibration runs the whole model)."""
    groups: list[tuple[nn.Module | None, list[str]]] = []
    left = list(names)
    for block in loaded.adapter.blocks():
        inside = [n for n in left if n.startswith(block.name + ".")]
        if inside:
            groups.append((block.module, inside))
            left = [n for n in left if n not in inside]
    if left:
        groups.append((None, left))
    return groups


# --------------------------------------------------------------------------- calibration


class _StopForward(Exception):
    """Raised by a hook after the last block a calibration step needs: the rest of the model is skipped."""


def collect_hessians(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    stop_after: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """H = X^T X (tokens x batch as rows, float64) of every layer's input over the calibration batches;
    with `stop_after`, each forward stops once that module has run."""
    import torch

    hessians = {
        n: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64) for n, lin in layers.items()
    }

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            hessians[name].add_(x.T @ x)

        return record

    def stop(*_args: object) -> None:
        raise _StopForward

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in layers.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs, _ in batches:
                with contextlib.suppress(_StopForward):
                    model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return hessians


# --------------------------------------------------------------------------- global allocation


def global_sparsities(
    scores: dict[str, torch.Tensor], tile_weights: int, target: float, cap: float
) -> dict[str, float]:
    """Per-layer sparsity from one ranking of all tiles: the lowest-score tiles go first until
    `target` of all weights are zero, no layer beyond `cap` (bisection on the score threshold)."""
    import torch

    ordered = {n: torch.sort(s.flatten().double()).values for n, s in scores.items()}
    caps = {n: int(cap * s.numel()) for n, s in ordered.items()}
    total = sum(s.numel() for s in ordered.values())
    wanted = round(target * total)
    if wanted > sum(caps.values()):
        raise SparsifyError(
            f"sparsity {target:g} is more than max_layer_sparsity {cap:g} allows in every layer",
            hint="raise max_layer_sparsity or lower sparsity",
        )

    def pruned_at(threshold: torch.Tensor, right: bool) -> dict[str, int]:
        """Tiles each layer loses at this score threshold (right: ties included), capped."""
        return {
            n: min(caps[n], int(torch.searchsorted(s, threshold, right=right))) for n, s in ordered.items()
        }

    # The smallest score at which the (capped) ranking reaches `wanted`: bisection over all scores.
    candidates = torch.unique(torch.cat(list(ordered.values())))
    low, high = 0, len(candidates) - 1
    while low < high:
        mid = (low + high) // 2
        if sum(pruned_at(candidates[mid], right=True).values()) >= wanted:
            high = mid
        else:
            low = mid + 1
    threshold = candidates[low]
    counts = pruned_at(threshold, right=False)  # strictly below: all go
    at = pruned_at(threshold, right=True)
    missing = wanted - sum(counts.values())
    for n in ordered:  # ties at the threshold fill the rest, in layer order (deterministic)
        take = min(missing, at[n] - counts[n])
        counts[n] += take
        missing -= take
    del tile_weights  # equal tile sizes: counts of tiles are counts of weights / tile size
    return {n: counts[n] / ordered[n].numel() for n in ordered}


# --------------------------------------------------------------------------- the pass


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    pattern: str
    sparsity: float | None  # fraction of the layer's weights that are zero after the pass
    output_error: float | None  # ||(W - W')X||^2 / ||WX||^2 on the calibration inputs (obs only)
    note: str


@dataclass
class SparsifyResult:
    pattern: str
    method: str
    layers: list[LayerReport]
    weights: int  # weights of the sparsified layers
    zeros: int  # of them, zero
    dense_bytes: int  # fp32 weights of the sparsified layers
    encoded_bytes: int  # the same as bitmask + fp32 non-zeros (n:m: values + index per kept weight)

    @property
    def sparsity(self) -> float:
        return self.zeros / max(1, self.weights)


def encoded_size(weight: torch.Tensor, pattern: Pattern) -> int:
    """Bytes of the weight in a compressed sparse encoding, fp32 values: n:m as NVIDIA stores it
    (the n kept values per group plus a log2(m)-bit index each); blocks as a bitmask over the tiles
    plus the kept tiles' values."""
    import math

    out, inp = weight.shape
    if pattern.is_nm:
        kept = out * inp // pattern.m * pattern.n
        return kept * 4 + math.ceil(kept * math.ceil(math.log2(pattern.m)) / 8)
    nonzero_tiles = (
        (weight.detach() != 0)
        .reshape(out // pattern.rows, pattern.rows, inp // pattern.cols, pattern.cols)
        .any(3)
        .any(1)
    )
    tiles = nonzero_tiles.numel()
    return math.ceil(tiles / 8) + int(nonzero_tiles.sum()) * pattern.rows * pattern.cols * 4


def sparsify_model(
    loaded: LoadedModel,
    cfg: SparsifyConfig,
    data: Dataset | None = None,
    seed: int = 0,
    on_layer: Callable[[str, int, int], None] | None = None,
) -> SparsifyResult:
    """Sparsify `loaded.model` in place as `cfg` asks; each sparsified linear gets its mask attached."""
    import torch

    from vitcompress.models.layers import MASK_BUFFER, attach_mask
    from vitcompress.passes.sparsify.select import (
        magnitude_mask,
        magnitude_tile_scores,
        obs_prune,
        obs_tile_scores,
        output_error,
    )

    pattern = cfg.parsed_pattern
    model = loaded.model
    selected = select_layers(loaded, cfg.layers)
    reports: dict[str, LayerReport] = {}
    layers: dict[str, nn.Linear] = {}
    for name, lin in selected.items():
        shape = (lin.out_features, lin.in_features)
        if hasattr(lin, MASK_BUFFER):
            raise SparsifyError(
                f"{name} is sparse already ({getattr(lin, 'sparsity_pattern', 'unknown pattern')})",
                hint="sparsify the dense model once, or select other layers with layers/--layer",
            )
        if not pattern.fits(*shape):
            why = f"{shape[0]}x{shape[1]} is not a multiple of {pattern.group_rows}x{pattern.group_cols}"
            log.info("sparsify: %s stays dense (%s)", name, why)
            reports[name] = LayerReport(name, shape, pattern.text, None, None, f"dense: {why}")
        else:
            layers[name] = lin
    if not layers:
        raise SparsifyError(
            f"no selected layer fits pattern {pattern.text} ({len(selected)} selected)",
            hint="pruned widths must be multiples of the pattern's group: prune with round_to set to it",
        )
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    if cfg.method is SelectMethod.obs:
        if data is None:
            raise SparsifyError(
                "method obs needs calibration data",
                hint="add data.calibration (or data.train) to the recipe, or --data; or use method magnitude",
            )
        batches = list(
            data.batches(cfg.batch_size, shuffle=True, seed=seed, limit_batches=cfg.calibration_batches)
        )
        if not batches:
            raise SparsifyError(
                "the calibration data is empty", hint="give more images with data.calibration"
            )

    target = cfg.target_sparsity
    sparsities = {name: target for name in layers}
    dense_hessians: dict[str, torch.Tensor] = {}
    if cfg.method is SelectMethod.obs and (not cfg.sequential or cfg.allocation is Allocation.global_):
        dense_hessians = collect_hessians(model, layers, batches)
    if cfg.allocation is Allocation.global_:
        tokens = loaded.adapter.num_tokens
        macs_per_tile = tokens * pattern.rows * pattern.cols  # what removing one tile saves, per image
        scores = {
            name: (
                obs_tile_scores(lin.weight, dense_hessians[name], pattern, cfg.damping)
                if cfg.method is SelectMethod.obs
                else magnitude_tile_scores(lin.weight, pattern)
            )
            / macs_per_tile
            for name, lin in layers.items()
        }
        sparsities = global_sparsities(scores, pattern.rows * pattern.cols, target, cfg.max_layer_sparsity)

    done = 0
    for block, names in _groups(loaded, list(layers)):
        group = {n: layers[n] for n in names}
        hessians: dict[str, torch.Tensor] = {}
        if cfg.method is SelectMethod.obs:
            hessians = (
                collect_hessians(model, group, batches, stop_after=block)
                if cfg.sequential
                else {n: dense_hessians[n] for n in names}
            )
        for name, lin in group.items():
            shape = (lin.out_features, lin.in_features)
            error: float | None = None
            if cfg.method is SelectMethod.obs:
                result = obs_prune(
                    lin.weight, hessians[name], pattern, sparsities[name], cfg.damping, cfg.block_columns
                )
                error = output_error(lin.weight, result.weight, hessians[name])
                with torch.no_grad():
                    lin.weight.copy_(result.weight.to(lin.weight.dtype))
                mask = result.mask
            else:
                mask = magnitude_mask(lin.weight, pattern, sparsities[name])
            attach_mask(lin, mask, pattern.text)
            zero_fraction = float((lin.weight == 0).float().mean())
            reports[name] = LayerReport(name, shape, pattern.text, zero_fraction, error, "")
            done += 1
            if on_layer is not None:
                on_layer(name, done, len(layers))

    weights = sum(lin.weight.numel() for lin in layers.values())
    zeros = sum(int((lin.weight == 0).sum()) for lin in layers.values())
    ordered = [reports[n] for n in selected]
    return SparsifyResult(
        pattern=pattern.text,
        method=cfg.method.value,
        layers=ordered,
        weights=weights,
        zeros=zeros,
        dense_bytes=weights * 4,
        encoded_bytes=sum(encoded_size(lin.weight, pattern) for lin in layers.values()),
    )


def run(state: ModelState, cfg: SparsifyConfig) -> ModelState:
    from vitcompress.models.artifact import save_artifact
    from vitcompress.models.stats import count_macs
    from vitcompress.state import Measured

    loaded = state.model
    data = (
        state.load_split("calibration", f"{cfg.step_name} (method {cfg.method.value})")
        if cfg.needs_data()
        else None
    )
    progress = state.settings.progress

    def on_layer(name: str, done: int, total: int) -> None:
        if progress is not None:
            progress(cfg.step_name, done, total, {})

    result = sparsify_model(loaded, cfg, data, seed=state.settings.seed, on_layer=on_layer)
    directory = state.settings.out_dir / cfg.step_name
    save_artifact(loaded, directory, history=[{"pass": cfg.step_name, "config": cfg.model_dump(mode="json")}])
    params = sum(p.numel() for p in loaded.model.parameters())
    outcome = Measured(
        params=params,
        macs=count_macs(loaded)[0],  # dense MACs: the zeros save time only where a sparse kernel runs
        artifact=str(directory),
        details={
            "pattern": result.pattern,
            "method": result.method,
            "allocation": cfg.allocation.value,
            "sparsity": result.sparsity,
            "weights": result.weights,
            "zeros": result.zeros,
            "nonzero_params": params - result.zeros,
            "dense_bytes": result.dense_bytes,
            "encoded_bytes": result.encoded_bytes,
            "layers": [asdict(r) for r in result.layers],
        },
    )
    return state.passed(cfg, outcome)
