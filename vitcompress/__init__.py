"""vitcompress: compress vision transformers for a deployment target and prove it on that target.

The public Python API (see `vitcompress.api` for the details)::

    import vitcompress
    result = vitcompress.compress(model, "prune-kd-int8", train=train_loader, val=val_loader, eval_fn=my_eval)
    result.model, result.onnx, result.ledger

`compress` runs a recipe; `prune`, `factorize`, `distill`, `quantize`, `export`, `bench` and
`evaluate` run one step. Each takes an `nn.Module` (timm or Hugging Face ViT/DeiT) or a reference
(`timm:NAME`, `hf:DIR`, a path), and a DataLoader (or tensors) or a data spec. Names are imported on
first use, so `import vitcompress` (and the CLI's start-up) loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitcompress._version import __version__

__all__ = [
    "Result",
    "__version__",
    "bench",
    "compress",
    "distill",
    "evaluate",
    "export",
    "factorize",
    "prune",
    "quantize",
]

if TYPE_CHECKING:
    from vitcompress.api import (
        Result,
        bench,
        compress,
        distill,
        evaluate,
        export,
        factorize,
        prune,
        quantize,
    )


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        from vitcompress import api

        return getattr(api, name)
    raise AttributeError(f"module 'vitcompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
