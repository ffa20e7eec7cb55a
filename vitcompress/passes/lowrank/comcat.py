"""COMCAT attention: per head, the best low-rank factors of the query-key (W_q^T W_k) and
value-output (W_o W_v) products, shrinking every head to a smaller size."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from vitcompress.errors import LowRankError

if TYPE_CHECKING:
    import torch

    from vitcompress.models.loader import LoadedModel

log = logging.getLogger(__name__)


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
