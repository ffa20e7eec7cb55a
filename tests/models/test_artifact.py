"""The artifact (safetensors + manifest) reloads with identical logits in a fresh process (RELIABILITY 16)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.conftest import tiny_ref
from vitcompress.errors import CheckpointError
from vitcompress.models import ModelRef, load_model
from vitcompress.models.artifact import save_artifact

RELOAD = """
import sys, torch
from vitcompress.models import ModelRef, load_model
loaded = load_model(ModelRef(sys.argv[1]))
x = torch.load(sys.argv[2])
torch.save(loaded.model(x).detach(), sys.argv[3])
"""


def _fresh_process_logits(directory, x, tmp_path):
    torch.save(x, tmp_path / "x.pt")
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(directory), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        capture_output=True,
    )
    return torch.load(tmp_path / "y.pt")


def shrink_block(loaded, index: int, keep_heads: int, keep_hidden: int) -> None:
    """Cut heads and MLP width of one block by hand, the way a pruning pass leaves a model."""
    adapter = loaded.adapter
    block = adapter.blocks()[index]
    head_dim = block.attn.head_dim
    keep = keep_heads * head_dim
    with torch.no_grad():
        if len(block.attn.qkv) == 1:
            qkv = block.attn.qkv[0]
            rows = torch.cat([torch.arange(keep) + part * block.attn.attn_dim for part in range(3)])
            new = nn.Linear(qkv.in_features, 3 * keep, bias=qkv.bias is not None)
            new.weight.copy_(qkv.weight[rows])
            if qkv.bias is not None:
                new.bias.copy_(qkv.bias[rows])
            block.attn.module.qkv = new
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(block.attn.module, name)
                new = nn.Linear(old.in_features, keep, bias=old.bias is not None)
                new.weight.copy_(old.weight[:keep])
                if old.bias is not None:
                    new.bias.copy_(old.bias[:keep])
                setattr(block.attn.module, name, new)
        proj = block.attn.proj
        new_proj = nn.Linear(keep, proj.out_features)
        new_proj.weight.copy_(proj.weight[:, :keep])
        new_proj.bias.copy_(proj.bias)
        setattr(block.attn.module, "proj" if len(block.attn.qkv) == 1 else "o_proj", new_proj)
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        new_fc1, new_fc2 = nn.Linear(fc1.in_features, keep_hidden), nn.Linear(keep_hidden, fc2.out_features)
        new_fc1.weight.copy_(fc1.weight[:keep_hidden])
        new_fc1.bias.copy_(fc1.bias[:keep_hidden])
        new_fc2.weight.copy_(fc2.weight[:, :keep_hidden])
        new_fc2.bias.copy_(fc2.bias)
        mlp = loaded.model.get_submodule(adapter.module_name(fc1).rsplit(".", 1)[0])
        mlp.fc1, mlp.fc2 = new_fc1, new_fc2
    adapter.set_attention_shape(index, keep_heads, head_dim)


@pytest.mark.parametrize(
    "source", ["timm:vit_tiny_patch16_224", "timm:deit_tiny_distilled_patch16_224", "hf"]
)
def test_pruned_model_round_trips_in_a_fresh_process(source, tmp_path, hf_vit_dir):
    loaded = load_model(ModelRef(f"hf:{hf_vit_dir}") if source == "hf" else tiny_ref(source))
    heads = loaded.adapter.blocks()[1].attn.num_heads
    shrink_block(loaded, 1, keep_heads=heads - 1, keep_hidden=40)
    x = loaded.example_input(4, seed=3)
    expected = loaded.model(x).detach()

    directory = save_artifact(loaded, tmp_path / "artifact")
    manifest = json.loads((directory / "model.json").read_text())
    assert sorted(p.name for p in directory.iterdir()) == ["model.json", "model.safetensors"]
    assert manifest["blocks"][1]["num_heads"] == heads - 1
    assert manifest["blocks"][1]["mlp_hidden"] == 40
    assert manifest["blocks"][0] == loaded.adapter.structure()[0]

    assert torch.equal(_fresh_process_logits(directory, x, tmp_path), expected)
    in_process = load_model(ModelRef(str(directory)))
    assert in_process.adapter.structure() == loaded.adapter.structure()
    assert torch.equal(in_process.model(x), expected)


def test_damaged_artifacts_fail_clearly(tmp_path):
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    directory = save_artifact(loaded, tmp_path / "a")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or incomplete checkpoint .*model.safetensors"):
        load_model(ModelRef(str(directory)))
    (directory / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt or incomplete artifact manifest"):
        load_model(ModelRef(str(directory)))


def test_newer_format_and_unknown_edit_are_refused(tmp_path):
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    directory = save_artifact(loaded, tmp_path / "a")
    manifest = json.loads((directory / "model.json").read_text())
    (directory / "model.json").write_text(
        json.dumps({**manifest, "edits": [{"kind": "warp", "module": "head"}]})
    )
    with pytest.raises(CheckpointError, match="unknown structural edit 'warp'"):
        load_model(ModelRef(str(directory)))
    (directory / "model.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99, newer"):
        load_model(ModelRef(str(directory)))
