"""Choosing the zeros of one linear layer: magnitude, and second-order OBS with weight update.

OBS (Optimal Brain Surgeon, Hassibi & Stork 1993) on a layer's reconstruction loss
||W X - W' X||^2 has the Hessian H = X^T X of the layer's calibration inputs (one per output row,
shared by all rows). Removing weight q of a row costs w_q^2 / [H^-1]_qq, and the best correction of
the row's other weights is -w_q / [H^-1]_qq * H^-1[:, q]. SparseGPT (Frantar & Alistarh, ICML 2023,
IST-DASLab/sparsegpt `fasterprune`) makes this exact and cheap for a whole matrix by pruning column by
column: with U the upper Cholesky factor of H^-1 (dampened), column i's error w_i / U_ii is pushed
into the columns to its right through row i of U, so every later decision sees the already-corrected
weights; masks are chosen for `block_columns` columns at a time (by w^2 / U_ii^2) and updates
to the columns beyond are applied lazily per block.

Patterns follow the same loop:
- n:m: at the first column of every group of m, the m-n weights of each row with the lowest
  w^2 / U_ii^2 in that group (on the corrected weights) are pruned (SparseGPT's prunen/prunem).
- block:RxC: at the start of each column block, a tile's saliency is the sum of the per-weight OBS
  errors w^2 / U_ii^2 over its R x C weights, and the lowest-saliency tiles of the column block are
  pruned (the block analogue of SparseGPT's per-block threshold; LPViT ranks blocks by the same
  second-order sum).
Magnitude is the data-free baseline: the smallest |w| per n:m group, or the tiles with the smallest
L2 norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitcompress.passes.sparsify.config import Pattern


def _tile_view(values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(out, in) -> per-tile sums, (out/rows, in/cols)."""
    out, inp = values.shape
    return values.reshape(out // rows, rows, inp // cols, cols).sum(dim=(1, 3))


def _expand_tiles(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return tiles.repeat_interleave(rows, 0).repeat_interleave(cols, 1)


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` lowest entries (ties broken by position: deterministic)."""
    flat = scores.flatten()
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        order = torch.sort(flat, stable=True).indices
        chosen[order[:count]] = True
    return chosen.reshape(scores.shape)


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: the m-n lowest scores of every group of m along the input."""
    out, inp = scores.shape
    groups = scores.reshape(out, inp // m, m)
    lowest = torch.topk(groups, m - n, dim=2, largest=False).indices
    pruned = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True)
    return pruned.reshape(out, inp)


def tile_count(total_tiles: int, sparsity: float) -> int:
    return min(total_tiles, max(0, round(sparsity * total_tiles)))


def magnitude_mask(weight: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """Keep-mask (True = kept) by magnitude."""
    w2 = weight.detach().float().pow(2)
    if pattern.is_nm:
        return ~nm_prune_mask(w2, pattern.n, pattern.m)
    tiles = _tile_view(w2, pattern.rows, pattern.cols)
    pruned = _lowest(tiles, tile_count(tiles.numel(), sparsity))
    return ~_expand_tiles(pruned, pattern.rows, pattern.cols)


def magnitude_tile_scores(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Squared L2 norm of every tile: the global magnitude ranking compares these across layers."""
    return _tile_view(weight.detach().float().pow(2), pattern.rows, pattern.cols)


def _damped_inverse_factor(hessian: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U upper Cholesky factor of (H + damping * mean(diag H) I)^-1; dead inputs (always 0)."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    lower_inv = torch.linalg.solve_triangular(
        torch.linalg.cholesky(h), torch.eye(h.shape[0], dtype=h.dtype), upper=False
    )
    inverse = lower_inv.T @ lower_inv  # H^-1 = L^-T L^-1
    return torch.linalg.cholesky(inverse, upper=True), dead


def obs_tile_scores(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, damping: float
) -> torch.Tensor:
    """Each tile's OBS error if it alone were removed (sum of w^2 / [H^-1]_qq), relative to the layer's
    output energy tr(W H W^T): comparable across layers for a global ranking."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    inverse_diag = torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(h)))
    w = weight.detach().double()
    errors = w.pow(2) / inverse_diag[None, :]
    energy = ((w @ hessian.double()) * w).sum().clamp_min(1e-30)
    return (_tile_view(errors, pattern.rows, pattern.cols) / energy).float()


@dataclass
class ObsResult:
    weight: torch.Tensor  # the pruned and corrected weight (float32)
    mask: torch.Tensor  # True = kept
    loss: float  # SparseGPT's summed OBS error estimate


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    sparsity: float,
    damping: float = 0.01,
    block_columns: int = 128,
) -> ObsResult:
    """SparseGPT's column-wise OBS pruning of one weight (out x in) to `pattern`, with weight update."""
    w = weight.detach().float().clone()
    columns = w.shape[1]
    u, dead = _damped_inverse_factor(hessian, damping)
    u = u.float()
    w[:, dead] = 0
    unit = pattern.group_cols
    width = max(unit, block_columns // unit * unit)  # column blocks hold whole pattern groups
    pruned = torch.zeros_like(w, dtype=torch.bool)
    loss = 0.0
    for i1 in range(0, columns, width):
        i2 = min(i1 + width, columns)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        if pattern.is_nm:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            saliency = w1.pow(2) / d1[None, :].pow(2)
            tiles = _tile_view(saliency, pattern.rows, pattern.cols)
            mask1 = _expand_tiles(
                _lowest(tiles, tile_count(tiles.numel(), sparsity)), pattern.rows, pattern.cols
            )
        keep1 = (~mask1).to(w1.dtype)
        for i in range(count):
            if pattern.is_nm and i % pattern.m == 0:
                group = w1[:, i : i + pattern.m].pow(2) / d1[i : i + pattern.m][None, :].pow(2)
                mask1[:, i : i + pattern.m] = nm_prune_mask(group, pattern.n, pattern.m)
                keep1[:, i : i + pattern.m] = (~mask1[:, i : i + pattern.m]).to(w1.dtype)
            column = w1[:, i]
            q = column * keep1[:, i]
            q1[:, i] = q
            err = (column - q) / u1[i, i]
            w1[:, i:].addr_(err, u1[i, i:], alpha=-1)  # OBS update of this block's later columns
            err1[:, i] = err
        loss += float(err1.pow(2).sum()) / 2
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # the lazy update of every column beyond the block
    keep = ~pruned
    return ObsResult(w * keep, keep, loss)


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 on the calibration inputs behind H = X^T X."""
    h = hessian.double()
    w = weight.detach().double()
    delta = w - new_weight.detach().double()
    return float(((delta @ h) * delta).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


def holds_pattern(weight: torch.Tensor, pattern: Pattern) -> bool:
    """Whether the weight's zeros make up the pattern (n:m: at most n non-zeros per group of m)."""
    out, inp = weight.shape
    if not pattern.fits(out, inp):
        return False
    nonzero = weight.detach() != 0
    if pattern.is_nm:
        return bool((nonzero.reshape(out, inp // pattern.m, pattern.m).sum(2) <= pattern.n).all())
    return True  # any block pattern holds trivially; its sparsity is what counts


def zero_tiles(weight: torch.Tensor, pattern: Pattern) -> float:
    """Fraction of the pattern's units (n:m: weights; blocks: whole tiles) that are entirely zero."""
    nonzero = (weight.detach() != 0).float()
    if pattern.is_nm:
        return float(1 - nonzero.mean())
    tiles = _tile_view(nonzero, pattern.rows, pattern.cols)
    return float((tiles == 0).float().mean())


@dataclass(frozen=True)
class SparseLayer:
    """What `inspect` shows for a sparsified linear."""

    name: str
    shape: tuple[int, int]
    pattern: str
    sparsity: float  # zero weights / weights
    mask_sparsity: float  # weights the mask drops / weights
    holds: bool  # every weight the mask drops is zero and the zeros make up the pattern


def sparse_layers(model: torch.nn.Module) -> list[SparseLayer]:
    """Every linear of `model` that carries a sparsity mask, with its measured sparsity."""
    from vitcompress.models.layers import MASK_BUFFER, masked_linears
    from vitcompress.passes.sparsify.config import parse_pattern

    rows = []
    for name, linear in masked_linears(model).items():
        weight = linear.weight.detach()
        mask = getattr(linear, MASK_BUFFER)
        text = str(getattr(linear, "sparsity_pattern", "unknown"))
        try:
            pattern_holds = holds_pattern(weight, parse_pattern(text))
        except ValueError:
            pattern_holds = False
        rows.append(
            SparseLayer(
                name,
                (linear.out_features, linear.in_features),
                text,
                float((weight == 0).float().mean()),
                float((~mask).float().mean()),
                pattern_holds and not bool(weight[~mask].any()),
            )
        )
    return rows
