"""The `tokens` pass: put a fixed token-reduction schedule into the model (see `models/tokens.py`).

No weights change, so the pass is instant and needs no data; accuracy is what `validate` (or a
following `distill`, which trains with the reduction on) measures. The MAC count is taken from the
patched model itself, so it includes the smaller attention and MLP of every later block and the
matching arithmetic.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vitcompress.passes.tokens.config import TokensConfig, TokensError, plan_schedule

if TYPE_CHECKING:
    from vitcompress.models.loader import LoadedModel
    from vitcompress.state import ModelState

log = logging.getLogger(__name__)


def reduce_tokens(loaded: LoadedModel, cfg: TokensConfig) -> dict[str, Any]:
    """Apply `cfg`'s schedule to `loaded.model` in place; returns the pass's details for the ledger."""
    from vitcompress.models.stats import count_macs
    from vitcompress.models.tokens import (
        TokenSchedule,
        apply_token_schedule,
        token_schedule_of,
        tokens_per_block,
    )

    adapter = loaded.adapter
    previous = token_schedule_of(loaded.model)
    if previous is not None:
        raise TokensError(
            f"{loaded.label} already reduces tokens ({previous.method}, r={list(previous.r)})",
            hint="give one tokens pass per recipe, on a model without a schedule",
        )
    prefix = adapter.num_prefix_tokens
    patches = adapter.num_tokens - prefix
    depth = len(adapter.blocks())
    macs_before, _ = count_macs(loaded)
    plan = plan_schedule(cfg, patches, prefix, depth)
    schedule = TokenSchedule(
        method=cfg.method.value,  # type: ignore[arg-type]
        r=tuple(plan),
        proportional_attention=cfg.proportional_attention,
        fuse=cfg.fuse,
    )
    apply_token_schedule(loaded.model, schedule)
    macs_after, _ = count_macs(loaded)
    counts = tokens_per_block(adapter.num_tokens, schedule)
    log.info(
        "tokens: %s, r per block %s, tokens %d -> %d, MACs %.1f%% of before",
        cfg.method.value,
        plan,
        adapter.num_tokens,
        counts[-1][1],
        100 * macs_after / macs_before,
    )
    return {
        "method": cfg.method.value,
        "r": plan,
        "tokens": [{"block": i, "attention": a, "mlp": m} for i, (a, m) in enumerate(counts)],
        "final_tokens": counts[-1][1],
        "macs_before": macs_before,
        "macs_ratio": macs_after / macs_before,
        "macs_after": macs_after,
    }


def run(state: ModelState, cfg: TokensConfig) -> ModelState:
    from vitcompress.models.artifact import save_artifact
    from vitcompress.state import Measured

    loaded = state.model
    details = reduce_tokens(loaded, cfg)
    directory = state.settings.out_dir / cfg.step_name
    save_artifact(loaded, directory, history=[{"pass": cfg.step_name, "config": cfg.model_dump(mode="json")}])
    outcome = Measured(
        params=sum(p.numel() for p in loaded.model.parameters()),
        macs=details["macs_after"],
        artifact=str(directory),
        details=details,
    )
    return state.passed(cfg, outcome)
