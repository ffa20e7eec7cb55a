"""Factors of one linear layer: truncated SVD of the weight, or activation-whitened SVD that keeps
the layer's output on real inputs (second moments collected from calibration batches)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vitcompress.passes.lowrank.config import Method

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitcompress.models.layers import LowRankLinear

log = logging.getLogger(__name__)


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
