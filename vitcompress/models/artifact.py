"""The compressed-model artifact: `model.safetensors` + `model.json`, no pickled modules anywhere.

A pruned or factorized ViT no longer matches its family's constructor, so the manifest records the
source (how to build the base model), the per-block structure, and any structural edits. Loading
rebuilds the base model without weights, applies the edits, resizes every module whose saved
tensors differ in shape, tells the adapter the new head layout, and loads the tensors strictly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcompress._version import __version__
from vitcompress.errors import CheckpointError
from vitcompress.fileio import atomic_dir, atomic_tree, recover_tree
from vitcompress.models.adapters import adapter_for
from vitcompress.models.checkpoint import check_finite
from vitcompress.models.layers import EDITS, derive_masks, model_edits
from vitcompress.models.loader import (
    ARTIFACT_MANIFEST,
    ARTIFACT_WEIGHTS,
    InputSpec,
    LoadedModel,
    build_hf,
    build_timm,
    load_strict,
)

FORMAT = "vitcompress.artifact"
FORMAT_VERSION = 1

# Structural edits recorded in the manifest: kind -> function(model, module_path, edit).
EDIT_APPLIERS: dict[str, Callable[[nn.Module, str, dict[str, Any]], None]] = dict(EDITS)


def save_artifact(
    loaded: LoadedModel,
    directory: Path,
    edits: list[dict[str, Any]] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """Write the model as an artifact directory atomically; returns the directory."""
    from safetensors.torch import save_file

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vitcompress_version": __version__,
        "family": loaded.adapter.family,
        "source": loaded.source,
        "input": loaded.input.to_dict(),
        "num_classes": loaded.num_classes,
        "embed_dim": loaded.adapter.embed_dim,
        "blocks": loaded.adapter.structure(),
        "edits": model_edits(loaded.model) + (edits or []),
        "history": history or [],
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}
    directory = Path(directory)
    # The directory is one unit (replaced whole: weights and manifest always match) unless it holds
    # something else too, which must survive: then the two files are replaced one by one.
    own = {ARTIFACT_WEIGHTS, ARTIFACT_MANIFEST}
    alone = not directory.is_dir() or {p.name for p in directory.iterdir()} <= own
    with (atomic_tree if alone else atomic_dir)(directory) as tmp:
        save_file(tensors, str(tmp / ARTIFACT_WEIGHTS), metadata={"format": FORMAT})
        (tmp / ARTIFACT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _build_base(source: dict[str, Any], path: Path) -> nn.Module:
    kind = source.get("kind")
    if kind == "timm":
        return build_timm(str(source["name"]), dict(source.get("kwargs", {})))
    if kind == "hf":
        return build_hf(dict(source["config"]))
    raise CheckpointError(f"{path}: unknown model source kind {kind!r}", hint="expected 'timm' or 'hf'")


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def resize_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace every Linear, LayerNorm, Conv2d or bare parameter whose saved shape differs."""
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        weight = state_dict.get(f"{prefix}weight")
        if isinstance(module, nn.Linear) and weight is not None and weight.shape != module.weight.shape:
            _set_module(
                model, name, nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
            )
        elif isinstance(module, nn.LayerNorm) and weight is not None and weight.shape != module.weight.shape:
            _set_module(model, name, nn.LayerNorm(weight.shape[0], eps=module.eps))
        elif isinstance(module, nn.Conv2d) and weight is not None and weight.shape != module.weight.shape:
            conv: Any = module
            new_conv = nn.Conv2d(
                weight.shape[1],
                weight.shape[0],
                conv.kernel_size,
                conv.stride,
                conv.padding,
                bias=conv.bias is not None,
            )
            _set_module(model, name, new_conv)
        else:
            for pname, param in list(module.named_parameters(recurse=False)):
                saved = state_dict.get(prefix + pname)
                if saved is not None and saved.shape != param.shape:
                    setattr(module, pname, nn.Parameter(torch.empty_like(saved)))


def load_artifact(directory: Path) -> LoadedModel:
    from safetensors.torch import load_file

    directory = Path(directory)
    recover_tree(directory)  # a kill between the two renames of a save left the complete old one aside
    manifest_path = directory / ARTIFACT_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"corrupt or incomplete artifact manifest {manifest_path}: {err}") from err
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{manifest_path} is not a vitcompress artifact (format={manifest.get('format')!r})"
        )
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path} has format_version {manifest['format_version']}, newer than this vitcompress reads",
            hint="upgrade vitcompress",
        )
    weights = directory / ARTIFACT_WEIGHTS
    try:
        state_dict = load_file(str(weights), device="cpu")
    except Exception as err:
        raise CheckpointError(
            f"corrupt or incomplete checkpoint {weights}: {str(err).splitlines()[0]}"
        ) from err
    check_finite(state_dict, weights)

    model = _build_base(manifest["source"], manifest_path)
    for edit in manifest.get("edits", []):
        applier = EDIT_APPLIERS.get(edit.get("kind"))
        if applier is None:
            raise CheckpointError(
                f"{manifest_path}: unknown structural edit {edit.get('kind')!r}",
                hint="the artifact was written by a newer vitcompress; upgrade",
            )
        applier(model, str(edit["module"]), edit)
    resize_to_state_dict(model, state_dict)
    adapter = adapter_for(model)
    blocks = manifest.get("blocks", [])
    if len(blocks) != len(adapter.blocks()):
        raise CheckpointError(
            f"{manifest_path} describes {len(blocks)} blocks but the model has {len(adapter.blocks())}"
        )
    if "embed_dim" in manifest:
        adapter.set_embed_dim(int(manifest["embed_dim"]))
    for index, block in enumerate(blocks):
        adapter.set_attention_shape(index, int(block["num_heads"]), int(block["head_dim"]))
    load_strict(model, state_dict, weights)
    derive_masks(model)  # sparse layers: their masks are their zeros
    model.eval()
    return LoadedModel(
        model=model,
        adapter=adapter,
        source=manifest["source"],
        input=InputSpec.from_dict(manifest["input"]),
        num_classes=int(manifest["num_classes"]),
        label=str(directory),
    )
