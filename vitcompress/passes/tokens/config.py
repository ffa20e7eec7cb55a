"""The `tokens` recipe entry and its schedule: how many tokens each block removes.

A schedule is fixed when the pass runs (the same for every image), so the exported graph has known
token counts per block. It comes from exactly one of:
- `r: 8`: every block removes 8 tokens (ToMe's r), capped where a block has too few left;
- `r: [0, 0, 12, 12, ...]`: one count per block, exactly as given;
- `final_tokens: 50`: the tokens leaving the last block (class tokens included); the removals are
  spread over the blocks.
`schedule: decreasing` (ToMe's decreasing schedule) removes more early and fewer late: block counts
fall linearly from 1.5x to 0.5x the mean, the same total as `constant`. Early removals save more
(every later block runs on fewer tokens); late ones cost less accuracy.
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from vitcompress.errors import TokensError
from vitcompress.passes.base import PassConfig


class Method(str, Enum):
    merge = "merge"  # ToMe: bipartite soft matching on the attention keys, size-weighted averages
    prune = "prune"  # EViT: keep the tokens the class token attends to most


class Schedule(str, Enum):
    constant = "constant"
    decreasing = "decreasing"


class TokensConfig(PassConfig):
    """Reduce the tokens between attention and MLP in every block, with a fixed schedule."""

    summary: ClassVar[str] = "token reduction with a fixed schedule: merge (ToMe) or prune (EViT) tokens in every block"
    engine: ClassVar[str] = "vitcompress.passes.tokens.run"
    changes_model: ClassVar[bool] = True

    kind: Literal["tokens"] = "tokens"
    method: Method = Field(
        Method.merge, description="merge (ToMe, bipartite matching on keys) or prune (EViT, class attention)."
    )
    r: int | list[int] | None = Field(
        None,
        description="Tokens each block removes: one number for every block, or a list with one per block.",
    )
    final_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens leaving the last block, class tokens included; the removals are spread over the blocks.",
    )
    schedule: Schedule = Field(
        Schedule.constant,
        description="constant, or decreasing (1.5x the mean in the first block down to 0.5x in the last).",
    )
    start_block: int = Field(0, ge=0, description="Blocks before this one keep all their tokens.")
    proportional_attention: bool = Field(
        True,
        description="Add log(token size) to the attention logits, so a merged token weighs as its patches.",
    )
    fuse: bool = Field(
        False, description="prune: fuse the dropped tokens into one token (attention-weighted average, EViT)."
    )

    @field_validator("r")
    @classmethod
    def _r_range(cls, value: int | list[int] | None) -> int | list[int] | None:
        values = value if isinstance(value, list) else [value] if value is not None else []
        if isinstance(value, list) and not value:
            raise ValueError("give one count per block, not an empty list")
        if any(v < 0 for v in values):
            raise ValueError("token counts must be >= 0")
        if isinstance(value, int) and value == 0:
            raise ValueError("r: 0 removes nothing; give r >= 1")
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> TokensConfig:
        if (self.r is None) == (self.final_tokens is None):
            raise ValueError("set exactly one of r and final_tokens")
        if isinstance(self.r, list) and self.schedule is Schedule.decreasing:
            raise ValueError(
                "schedule: decreasing shapes r or final_tokens; a list of r is the schedule itself"
            )
        if self.fuse and self.method is Method.merge:
            raise ValueError("fuse applies to method: prune (merging keeps every token's content already)")
        return self


def _max_reduction(patches: int, method: Method, fuse: bool) -> int:
    """The most tokens one block can remove when `patches` patch tokens enter it."""
    if method is Method.merge:
        return patches // 2  # each merged token of set A needs a partner in set B
    return max(0, patches - (2 if fuse else 1))  # keep a patch token (and a slot for the fused one)


def _weights(blocks: int, schedule: Schedule) -> list[float]:
    if schedule is Schedule.constant or blocks == 1:
        return [1.0] * blocks
    return [1.5 - i / (blocks - 1) for i in range(blocks)]  # 1.5 down to 0.5, mean 1


def _spread(total: int, weights: list[float]) -> list[int]:
    """Integers in proportion to `weights` summing to `total` (largest remainder; ties to early blocks)."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def plan_schedule(cfg: TokensConfig, num_patches: int, num_prefix: int, depth: int) -> list[int]:
    """Tokens removed in each of `depth` blocks for a model with `num_patches` patch tokens.

    Raises TokensError for a schedule the model cannot run, naming the block and what fits."""
    active = list(range(cfg.start_block, depth))
    if not active:
        raise TokensError(
            f"start_block {cfg.start_block} is past the last block (the model has {depth})",
            hint=f"use start_block < {depth}",
        )
    if isinstance(cfg.r, list):
        if len(cfg.r) != depth:
            raise TokensError(
                f"r has {len(cfg.r)} entries but the model has {depth} blocks",
                hint="give one count per block",
            )
        wanted = list(cfg.r)
        explicit = True
    elif cfg.r is not None:
        if cfg.schedule is Schedule.constant:
            per_block = [cfg.r] * len(active)
        else:
            per_block = [int(cfg.r * w) for w in _weights(len(active), cfg.schedule)]  # ToMe's rounding
        wanted = [0] * cfg.start_block + per_block
        explicit = False
    else:
        assert cfg.final_tokens is not None
        start = num_patches + num_prefix
        floor = num_prefix + 1 + (1 if cfg.fuse else 0)
        if not floor <= cfg.final_tokens < start:
            raise TokensError(
                f"final_tokens {cfg.final_tokens} is out of range for a model with {start} tokens "
                f"({num_prefix} class token(s))",
                hint=f"give {floor} <= final_tokens < {start}",
            )
        wanted = [0] * cfg.start_block + _spread(
            start - cfg.final_tokens, _weights(len(active), cfg.schedule)
        )
        explicit = False
    if explicit or cfg.final_tokens is None:
        plan = []
        patches = num_patches
        for index, want in enumerate(wanted):
            cap = _max_reduction(patches, cfg.method, cfg.fuse)
            if want > cap and explicit:
                raise TokensError(
                    f"block {index}: r={want} but only {cap} of its {patches} patch tokens can be "
                    f"{'merged' if cfg.method is Method.merge else 'pruned'}",
                    hint=f"use r <= {cap} there",
                )
            plan.append(min(want, cap))  # a constant r is capped where too few tokens are left (as ToMe)
            patches -= plan[-1]
    else:
        plan = _fit_final(wanted, cfg, num_patches, num_prefix)
    if not any(plan):
        raise TokensError("the schedule removes no token", hint="raise r or lower final_tokens")
    return plan


def _caps(plan: list[int], cfg: TokensConfig, num_patches: int) -> list[int]:
    caps, patches = [], num_patches
    for r in plan:
        caps.append(_max_reduction(patches, cfg.method, cfg.fuse))
        patches -= r
    return caps


def _fit_final(wanted: list[int], cfg: TokensConfig, num_patches: int, num_prefix: int) -> list[int]:
    """The spread of `final_tokens`, with removals a block cannot take moved to the nearest earlier
    block that can (merging at most halves a block's patch tokens)."""
    greedy, patches = [], num_patches
    for index in range(len(wanted)):
        greedy.append(_max_reduction(patches, cfg.method, cfg.fuse) if index >= cfg.start_block else 0)
        patches -= greedy[-1]
    if patches + num_prefix > (cfg.final_tokens or 0):
        raise TokensError(
            f"final_tokens {cfg.final_tokens} cannot be reached: {cfg.method.value} stops at "
            f"{patches + num_prefix} tokens "
            f"(each block {'merges at most half its patch tokens' if cfg.method is Method.merge else 'keeps one'})",
            hint=f"give final_tokens >= {patches + num_prefix}, or lower start_block",
        )
    plan = list(wanted)
    for _ in range(sum(plan) * len(plan) + 1):  # each move shifts one removal earlier: this ends
        caps = _caps(plan, cfg, num_patches)
        over = next((i for i, (r, c) in enumerate(zip(plan, caps, strict=True)) if r > c), None)
        if over is None:
            return plan
        room = next((j for j in range(over - 1, cfg.start_block - 1, -1) if plan[j] < caps[j]), None)
        if room is None:
            break
        plan[over] -= 1
        plan[room] += 1
    raise TokensError(
        f"final_tokens {cfg.final_tokens}: no schedule of this shape reaches it",
        hint="use schedule: decreasing, or give r per block",
    )
