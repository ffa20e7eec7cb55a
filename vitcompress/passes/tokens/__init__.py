"""Token reduction: merge (ToMe) or prune (EViT) tokens with a fixed schedule (see `models/tokens.py`).

`config` holds the recipe entry and the schedule arithmetic (light: no torch); `run` the pass.
"""

from vitcompress.passes.tokens.config import Schedule, TokensConfig, TokensError, plan_schedule

__all__ = ["Schedule", "TokensConfig", "TokensError", "plan_schedule"]
