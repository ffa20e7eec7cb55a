"""The distillation losses: soft logit KD at a temperature, DeiT's hard distillation token, and
feature KD on paired blocks (with projections where the student is narrower)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitcompress.models.loader import LoadedModel

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- losses


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    import torch.nn.functional as F

    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student / t, dim=1),
            F.log_softmax(teacher / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


class FeatureTaps:
    """Forward hooks collecting every block's output of one model, for feature KD."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handles = [b.module.register_forward_hook(self._hook) for b in loaded.adapter.blocks()]

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def block_pairs(student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """Student block i learns from the teacher block at the same relative depth."""
    return [(i, round((i + 1) * teacher_blocks / student_blocks) - 1) for i in range(student_blocks)]


def _student_module(loaded: LoadedModel, teacher: LoadedModel | None, feature: bool) -> nn.Module:
    """The trained module: the student plus the feature projections (discarded after training)."""
    from torch import nn

    class StudentWithProjections(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = loaded.model
            self.projections = nn.ModuleList()
            if feature and teacher is not None:
                d_s, d_t = loaded.adapter.embed_dim, teacher.adapter.embed_dim
                for _ in loaded.adapter.blocks():
                    self.projections.append(nn.Identity() if d_s == d_t else nn.Linear(d_s, d_t, bias=False))

        def forward(self, x: torch.Tensor) -> Any:
            return self.student(x)

    return StudentWithProjections()
