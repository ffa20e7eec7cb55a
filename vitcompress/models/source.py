"""Where a model comes from: a reference (`timm:NAME`, `hf:DIR`, an artifact or run directory, with
the options of a recipe's `model:` section) becomes a `ModelRef`, and a `ModelRef` a loaded model.

This is the entry point above the builders (loader.py) and the artifact format (artifact.py), so
neither of those imports the other back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vitcompress.errors import CheckpointError, ModelNotFoundError
from vitcompress.models.artifact import load_artifact
from vitcompress.models.loader import (
    ARTIFACT_MANIFEST,
    LoadedModel,
    ModelRef,
    load_hf,
    load_timm,
)

log = logging.getLogger(__name__)


def as_model_ref(model: Any, **options: Any) -> ModelRef:
    """The one converter to a `ModelRef`: a ModelRef as it is; a recipe's `model:` section (or
    anything with its fields: source, checkpoint, num_classes, img_size, in_chans, kwargs,
    trust_checkpoint); or a reference string or path with those fields as `options` (None: unset)."""
    if isinstance(model, ModelRef):
        return model
    if hasattr(model, "source"):  # a recipe's ModelSection
        fields = ("checkpoint", "num_classes", "img_size", "in_chans", "trust_checkpoint", "kwargs")
        options = {name: getattr(model, name) for name in fields}
        model = model.source
    given = {k: v for k, v in options.items() if v is not None}
    given["kwargs"] = dict(given.get("kwargs") or {})
    return ModelRef(str(model), **given)


def _final_artifact(run_dir: Path) -> Path:
    """A run directory (from `compress`, `prune`, ...) stands for the last model artifact it holds."""
    import json

    try:
        ledger = json.loads((run_dir / "report.json").read_text())["ledger"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{run_dir / 'report.json'} is not a readable vitcompress report: {err}"
        ) from err
    artifacts = [r["artifact"] for r in ledger if r.get("artifact") and Path(r["artifact"]).name != ""]
    for artifact in reversed(artifacts):
        candidate = run_dir / Path(artifact).name
        if (candidate / ARTIFACT_MANIFEST).is_file():
            log.info("%s is a run directory; loading its final model %s", run_dir, candidate)
            return candidate
    raise ModelNotFoundError(
        f"run directory {run_dir} holds no model artifact", hint="its passes left only ONNX files; use those"
    )


def load_model(ref: ModelRef) -> LoadedModel:
    """Build and load the model a reference names; every failure is a VitcompressError with a fix."""
    source = ref.source
    if source.startswith("timm:"):
        return load_timm(source[len("timm:") :], ref)
    if source.startswith("hf:"):
        return load_hf(Path(source[len("hf:") :]).expanduser(), ref)
    path = Path(source).expanduser()
    if path.is_dir() and not (path / ARTIFACT_MANIFEST).is_file() and (path / "report.json").is_file():
        path = _final_artifact(path)
    if path.is_dir() and (path / ARTIFACT_MANIFEST).is_file():
        if ref.checkpoint or ref.num_classes or ref.img_size or ref.in_chans or ref.kwargs:
            raise CheckpointError(
                f"{path} is a vitcompress artifact; --checkpoint/--num-classes/--img-size/--in-chans/"
                "--model-kwargs/--num-heads do not apply",
                hint="drop those options",
            )
        return load_artifact(path)
    if path.exists():
        raise ModelNotFoundError(
            f"{source!r} is not a model reference",
            hint=f"use timm:NAME --checkpoint {source}, hf:DIR, or a vitcompress artifact directory",
        )
    raise ModelNotFoundError(
        f"model {source!r} not found",
        hint="use timm:NAME (e.g. timm:deit_tiny_patch16_224), hf:DIR, or a vitcompress artifact directory",
    )
