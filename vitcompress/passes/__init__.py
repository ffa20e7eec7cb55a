"""The registry of passes: one explicit table, no import-time side effects.

Each entry names its config class (a frozen pydantic model with `kind: Literal[...]`) and its
function `(state, cfg) -> state`, plus what it consumes and produces so the recipe validator can
check the order of passes before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vitcompress.errors import RecipeError, did_you_mean
from vitcompress.passes.base import PassConfig
from vitcompress.passes.distill import DistillConfig
from vitcompress.passes.export import ExportConfig
from vitcompress.passes.lowrank import LowRankConfig
from vitcompress.passes.prune import PruneConfig
from vitcompress.passes.quantize import QuantizeConfig
from vitcompress.passes.sparsify.config import SparsifyConfig
from vitcompress.passes.tokens.config import TokensConfig
from vitcompress.passes.validate import ValidateConfig


class Needs(str, Enum):
    torch = "torch"  # works on the PyTorch model
    onnx = "onnx"  # works on the exported ONNX file


@dataclass(frozen=True)
class PassSpec:
    kind: str
    config: type[PassConfig]
    summary: str
    needs: Needs
    changes_model: bool  # edits the PyTorch model (the ONNX file must be exported after it)
    produces_onnx: bool
    module: str  # where `run` lives; imported only when the pass runs (keeps CLI start-up fast)
    makes_sparse: bool = False  # leaves sparsity masks on linears
    reshapes_linears: bool = False  # replaces or resizes linears (a sparsity mask would no longer fit)

    def runner(self) -> Callable[[Any, Any], Any]:
        import importlib

        return importlib.import_module(self.module).run  # type: ignore[no-any-return]


PASSES: dict[str, PassSpec] = {
    spec.kind: spec
    for spec in (
        PassSpec(
            "prune",
            PruneConfig,
            "structured pruning (torch-pruning): heads, head dims, MLP and embedding width",
            Needs.torch,
            changes_model=True,
            produces_onnx=False,
            module="vitcompress.passes.prune",
            reshapes_linears=True,
        ),
        PassSpec(
            "lowrank",
            LowRankConfig,
            "low-rank factorization of linear layers (truncated or activation-whitened SVD)",
            Needs.torch,
            changes_model=True,
            produces_onnx=False,
            module="vitcompress.passes.lowrank",
            reshapes_linears=True,
        ),
        PassSpec(
            "tokens",
            TokensConfig,
            "token reduction with a fixed schedule: merge (ToMe) or prune (EViT) tokens in every block",
            Needs.torch,
            changes_model=True,
            produces_onnx=False,
            module="vitcompress.passes.tokens.run",
        ),
        PassSpec(
            "distill",
            DistillConfig,
            "knowledge distillation from the uncompressed teacher (logit, DeiT, feature KD)",
            Needs.torch,
            changes_model=True,
            produces_onnx=False,
            module="vitcompress.passes.distill",
        ),
        PassSpec(
            "sparsify",
            SparsifyConfig,
            "semi-structured (2:4, n:m) or block sparsity of linear layers, second-order (OBS) or magnitude",
            Needs.torch,
            changes_model=True,
            produces_onnx=False,
            module="vitcompress.passes.sparsify.engine",
            makes_sparse=True,
        ),
        PassSpec(
            "export",
            ExportConfig,
            "export to ONNX (fp32) and check parity against PyTorch",
            Needs.torch,
            changes_model=False,
            produces_onnx=True,
            module="vitcompress.passes.export",
        ),
        PassSpec(
            "quantize",
            QuantizeConfig,
            "integer quantization with ONNX Runtime (static QDQ / dynamic int8, presets) or fp16",
            Needs.onnx,
            changes_model=False,
            produces_onnx=False,
            module="vitcompress.passes.quantize",
        ),
        PassSpec(
            "validate",
            ValidateConfig,
            "measure ONNX Runtime latency against the fp32 baseline",
            Needs.onnx,
            changes_model=False,
            produces_onnx=False,
            module="vitcompress.passes.validate",
        ),
    )
}

PASS_CONFIGS: tuple[type[PassConfig], ...] = tuple(spec.config for spec in PASSES.values())


def get_pass(kind: str) -> PassSpec:
    try:
        return PASSES[kind]
    except KeyError:
        raise RecipeError(f"unknown pass kind {kind!r}", hint=did_you_mean(kind, PASSES)) from None
