"""Architecture read from a checkpoint's tensors: every timm ViT family the loader knows, built with
non-default widths, patches, depths, biases and tokens, loads from its state dict alone (plus the head
count where the width differs from the named model) and gives the original module's logits."""

from __future__ import annotations

import argparse
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import save_hf
from vitcompress.errors import CheckpointError, ModelNotFoundError
from vitcompress.models import ModelRef, load_model
from vitcompress.models.timm_layout import read_layout


def _perturbed(name: str, **kwargs) -> torch.nn.Module:
    """A timm model whose every parameter differs from its init, so a tensor left unloaded shows."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _save(model: torch.nn.Module, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _same_logits(loaded, original: torch.nn.Module) -> None:
    x = torch.randn(3, *loaded.input.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), original(x), atol=1e-6, rtol=0)


# name the checkpoint is loaded as, the constructor kwargs it was trained with, --num-heads (None: from
# the named model's default, the widths match), and settings the load must report
FAMILIES = {
    "vit-no-qkv-bias": (
        "vit_base_patch16_224",
        dict(embed_dim=96, depth=3, num_heads=4, patch_size=8, img_size=48, qkv_bias=False, num_classes=7),
        4,
        {"patch_size": 8, "embed_dim": 96, "depth": 3, "qkv_bias": False, "img_size": 48, "num_classes": 7},
    ),
    "vit-b-width-no-qkv-bias": (
        "vit_base_patch16_224",
        dict(depth=1, img_size=32, qkv_bias=False, num_classes=4),
        None,
        {"embed_dim": 768, "num_heads": 12, "qkv_bias": False, "img_size": 32, "depth": 1},
    ),
    "deit-heads-from-timm-default": (
        "deit_tiny_patch16_224",
        dict(depth=2, patch_size=4, img_size=16, mlp_ratio=2.5, num_classes=5),
        None,
        {"patch_size": 4, "num_heads": 3, "mlp_ratio": 2.5, "img_size": 16, "num_classes": 5},
    ),
    "deit-distilled": (
        "deit_tiny_distilled_patch16_224",
        dict(embed_dim=64, depth=2, num_heads=2, patch_size=4, img_size=24, num_classes=3, in_chans=1),
        2,
        {"dist_token": True, "embed_dim": 64, "img_size": 24, "in_chans": 1, "num_classes": 3},
    ),
    "deit3-layer-scale": (
        "deit3_small_patch16_224",
        dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32, num_classes=3),
        2,
        {"layer_scale": True, "no_embed_class": True, "img_size": 32},
    ),
    "deit3-checkpoint-without-layer-scale": (
        "deit3_small_patch16_224",
        dict(depth=2, patch_size=8, img_size=32, num_classes=3, init_values=0.0, no_embed_class=False),
        None,
        {"layer_scale": False, "no_embed_class": False, "num_heads": 6},
    ),
    "vit-with-layer-scale-and-qk-norm": (
        "vit_tiny_patch16_224",
        dict(depth=2, patch_size=8, img_size=32, num_classes=3, init_values=1e-3, qk_norm=True),
        None,
        {"layer_scale": True, "qk_norm": True, "num_heads": 3},
    ),
    "dinov2-register-tokens": (
        "vit_small_patch14_reg4_dinov2",
        dict(embed_dim=64, depth=2, num_heads=2, patch_size=7, img_size=28, reg_tokens=2, num_classes=3),
        2,
        {"reg_tokens": 2, "no_embed_class": True, "patch_size": 7, "img_size": 28, "layer_scale": True},
    ),
    "vit-gains-register-tokens": (
        "vit_tiny_patch16_224",
        dict(depth=2, patch_size=8, img_size=32, num_classes=3, reg_tokens=4, no_embed_class=True),
        None,
        {"reg_tokens": 4, "no_embed_class": True},
    ),
    "avg-pool-fc-norm": (
        "vit_tiny_patch16_224",
        dict(depth=2, patch_size=8, img_size=32, num_classes=3, class_token=False, global_pool="avg"),
        None,
        {"class_token": False, "global_pool": "avg", "fc_norm": True},
    ),
    "avg-pool-final-norm": (
        "vit_tiny_patch16_224",
        dict(
            depth=2,
            patch_size=8,
            img_size=32,
            num_classes=3,
            class_token=False,
            global_pool="avg",
            fc_norm=False,
        ),
        None,
        {"class_token": False, "global_pool": "avg", "fc_norm": False},
    ),
    "pre-norm-clip-style": (
        "vit_tiny_patch16_224",
        dict(depth=2, patch_size=8, img_size=32, num_classes=3, pre_norm=True),
        None,
        {"pre_norm": True},
    ),
}


@pytest.mark.parametrize("case", list(FAMILIES))
def test_family_loads_from_its_tensors_with_identical_logits(tmp_path, case):
    name, trained, heads, expected = FAMILIES[case]
    original = _perturbed(name, **trained)
    path = _save(original, tmp_path / "w.safetensors")
    kwargs = {"num_heads": heads} if heads is not None else {}
    loaded = load_model(ModelRef(f"timm:{name}", checkpoint=path, kwargs=kwargs))
    _same_logits(loaded, original)
    settings = {s.name: s for s in loaded.settings}
    for key, value in expected.items():
        assert settings[key].value == value, (key, settings[key])
    assert settings["num_heads"].source == (
        "--num-heads"
        if heads is not None
        else f"timm default of {name} (same width {settings['embed_dim'].value})"
    )
    assert settings["patch_size"].source.startswith("checkpoint patch_embed.proj.weight (")
    # the artifact source rebuilds the same architecture without the checkpoint
    rebuilt = load_model(ModelRef(f"timm:{name}", kwargs=dict(loaded.source["kwargs"])))
    assert rebuilt.model.state_dict().keys() == loaded.model.state_dict().keys()
    assert all(rebuilt.model.state_dict()[k].shape == v.shape for k, v in loaded.model.state_dict().items())


def test_sources_name_the_tensors_the_values_came_from(tmp_path):
    original = _perturbed(
        "vit_base_patch16_224",
        embed_dim=96,
        depth=3,
        num_heads=4,
        patch_size=8,
        img_size=48,
        qkv_bias=False,
        num_classes=7,
    )
    path = _save(original, tmp_path / "w.safetensors")
    loaded = load_model(ModelRef("timm:vit_base_patch16_224", checkpoint=path, kwargs={"num_heads": 4}))
    sources = {s.name: (s.value, s.source) for s in loaded.settings}
    assert sources["patch_size"] == (8, "checkpoint patch_embed.proj.weight (96, 3, 8, 8)")
    assert sources["embed_dim"] == (96, "checkpoint patch_embed.proj.weight (96, 3, 8, 8)")
    assert sources["depth"] == (3, "checkpoint blocks.2.norm1.weight (96,)")
    assert sources["mlp_ratio"] == (4.0, "checkpoint blocks.0.mlp.fc1.weight (384, 96)")
    assert sources["qkv_bias"] == (False, "checkpoint: no blocks.0.attn.qkv.bias")
    assert sources["img_size"] == (48, "checkpoint pos_embed (1, 37, 96), 6x6 patches of 8 px")
    assert sources["num_classes"] == (7, "checkpoint head.weight (7, 96)")
    assert sources["num_heads"] == (4, "--num-heads")
    assert sources["global_pool"] == ("token", "timm default of vit_base_patch16_224")
    assert loaded.source["kwargs"] == {
        "patch_size": 8,
        "embed_dim": 96,
        "depth": 3,
        "qkv_bias": False,
        "in_chans": 3,
        "num_classes": 7,
        "img_size": 48,
        "num_heads": 4,
    }


def test_img_size_flag_resamples_instead_of_the_checkpoint_grid(tmp_path, caplog):
    original = _perturbed("vit_tiny_patch16_224", depth=2, patch_size=8, img_size=32, num_classes=3)
    path = _save(original, tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING):
        loaded = load_model(ModelRef("timm:vit_tiny_patch16_224", checkpoint=path, img_size=48))
    assert "4x4 to 6x6 patches for --img-size" in caplog.text
    assert loaded.input.shape == (3, 48, 48)
    assert {s.name: s.source for s in loaded.settings}["img_size"] == "--img-size"


def test_heads_guess_is_loud_and_num_heads_fixes_it(tmp_path, caplog):
    original = _perturbed(
        "vit_base_patch16_224", embed_dim=128, depth=1, num_heads=4, patch_size=8, img_size=16
    )
    path = _save(original, tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING):
        guessed = load_model(ModelRef("timm:vit_base_patch16_224", checkpoint=path))
    assert "num_heads=2 is a GUESS (64 channels per head)" in caplog.text
    assert "pass --num-heads N" in caplog.text
    assert {s.name: s.value for s in guessed.settings}["num_heads"] == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(guessed.model(x), original(x), atol=1e-4)  # why the guess is loud
    right = load_model(ModelRef("timm:vit_base_patch16_224", checkpoint=path, kwargs={"num_heads": 4}))
    _same_logits(right, original)


def test_heads_from_timm_training_args(tmp_path):
    original = _perturbed(
        "vit_base_patch16_224", embed_dim=96, depth=2, num_heads=4, patch_size=8, img_size=16
    )
    path = tmp_path / "train.pth"
    args = argparse.Namespace(model="vit_base_patch16_224", model_kwargs={"num_heads": 4}, lr=0.1)
    torch.save(
        {"epoch": 3, "arch": "vit_base_patch16_224", "state_dict": original.state_dict(), "args": args}, path
    )
    loaded = load_model(ModelRef("timm:vit_base_patch16_224", checkpoint=path))
    _same_logits(loaded, original)
    assert {s.name: s.source for s in loaded.settings}[
        "num_heads"
    ] == "checkpoint args (model_kwargs num_heads)"
    # the model it was trained as names the heads when its width is the checkpoint's
    tiny = _perturbed("vit_tiny_patch16_224", depth=2, patch_size=8, img_size=16)
    path = tmp_path / "tiny.pth"
    torch.save(
        {"state_dict": tiny.state_dict(), "args": argparse.Namespace(model="vit_tiny_patch16_224")}, path
    )
    loaded = load_model(ModelRef("timm:vit_base_patch16_224", checkpoint=path))
    _same_logits(loaded, tiny)
    assert {s.name: s.source for s in loaded.settings}["num_heads"] == (
        "timm default of vit_tiny_patch16_224 (checkpoint args model)"
    )


@pytest.mark.parametrize(
    ("kwargs", "message", "hint"),
    [
        (
            {"depth": 12},
            "blocks.2.norm1.weight is absent from the checkpoint, the model built with depth=12 expects (64,)",
            "drop --model-kwargs depth=12 (model.kwargs.depth in a recipe), or set it to 2",
        ),
        (
            {"qkv_bias": True},
            "blocks.0.attn.qkv.bias is absent from the checkpoint, the model built with qkv_bias=True expects (192,)",
            "or set it to False",
        ),
        (
            {"mlp_ratio": 2},
            "blocks.0.mlp.fc1.weight is (256, 64) in the checkpoint, the model built with mlp_ratio=2 expects (128, 64)",
            "drop --model-kwargs mlp_ratio=2",
        ),
        (
            {"fc_norm": True},
            "fc_norm.weight is absent from the checkpoint, the model built with fc_norm=True expects (64,)",
            "drop --model-kwargs fc_norm=True",
        ),
        (
            {"class_token": False},
            "cls_token is (1, 1, 64) in the checkpoint",
            "or set it to True",
        ),
        (
            {"init_values": 1e-6},
            "blocks.0.ls1.gamma is absent from the checkpoint, the model built with init_values=1e-06 expects (64,)",
            "the checkpoint was built without it",
        ),
        (
            {"num_heads": 5},
            "--num-heads 5 does not divide the width 64 (blocks.0.attn.qkv.weight is (192, 64) in the checkpoint)",
            "a divisor of 64",
        ),
    ],
)
def test_explicit_kwarg_that_contradicts_the_tensors_is_refused(tmp_path, kwargs, message, hint):
    original = _perturbed(
        "vit_base_patch16_224", embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=16, qkv_bias=False
    )
    path = _save(original, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(ModelRef("timm:vit_base_patch16_224", checkpoint=path, kwargs={"num_heads": 2, **kwargs}))
    assert message in info.value.message
    assert hint in (info.value.hint or "")
    assert info.value.exit_code == 2


def test_explicit_kwargs_that_agree_or_shapes_cannot_show_are_kept(tmp_path):
    original = _perturbed(
        "vit_base_patch16_224", embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=16
    )
    path = _save(original, tmp_path / "w.safetensors")
    loaded = load_model(
        ModelRef(
            "timm:vit_base_patch16_224",
            checkpoint=path,
            kwargs={"num_heads": 2, "depth": 2, "patch_size": 8, "mlp_ratio": 4, "drop_path_rate": 0.1},
        )
    )
    _same_logits(loaded, original)
    assert {s.name: s.source for s in loaded.settings}["depth"] == "--model-kwargs"
    assert loaded.source["kwargs"]["drop_path_rate"] == 0.1
    # pooling changes no tensor: an explicit one is kept, with the norm layout the tensors show
    pooled = load_model(
        ModelRef("timm:vit_base_patch16_224", checkpoint=path, kwargs={"num_heads": 2, "global_pool": "avg"})
    )
    settings = {s.name: (s.value, s.source) for s in pooled.settings}
    assert settings["global_pool"] == ("avg", "--model-kwargs")
    assert settings["fc_norm"] == (False, "checkpoint: no fc_norm.weight")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = original.forward_head(original.forward_features(x), pre_logits=True)
        assert not torch.allclose(
            pooled.model.forward_head(pooled.model.forward_features(x), pre_logits=True), features
        )
        expected = original.head(original.forward_features(x)[:, 1:].mean(dim=1))
        torch.testing.assert_close(pooled.model(x), expected, atol=1e-5, rtol=0)


def test_pruned_checkpoint_with_uneven_blocks_points_to_its_artifact(tmp_path):
    original = _perturbed("vit_tiny_patch16_224", depth=2, patch_size=8, img_size=16)
    weights = {k: v.contiguous() for k, v in original.state_dict().items()}
    weights["blocks.1.mlp.fc1.weight"] = weights["blocks.1.mlp.fc1.weight"][:100].contiguous()
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(ModelRef("timm:vit_tiny_patch16_224", checkpoint=path))
    assert (
        "blocks.0.mlp.fc1.weight is (768, 192), blocks.1.mlp.fc1.weight is (100, 192)" in info.value.message
    )
    assert "artifact directory" in (info.value.hint or "")


def test_random_weights_warn_once_with_the_fix(monkeypatch, caplog):
    import vitcompress.models.loader as loader

    monkeypatch.setattr(loader, "_WARNED_RANDOM", set())
    ref = ModelRef(
        "timm:vit_tiny_patch16_224", num_classes=3, img_size=16, kwargs={"depth": 1, "patch_size": 8}
    )
    with caplog.at_level(logging.WARNING):
        load_model(ref)
        load_model(ref)
    warnings = [r for r in caplog.records if "RANDOM weights" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "--checkpoint FILE" in warnings[0].getMessage()


def test_hub_id_needs_a_local_folder():
    with pytest.raises(ModelNotFoundError) as info:
        load_model(ModelRef("hf:facebook/deit-tiny-patch16-224"))
    assert "hf:facebook/deit-tiny-patch16-224 is not a local folder" in info.value.message
    hint = info.value.hint or ""
    assert "hf download facebook/deit-tiny-patch16-224 --local-dir DIR" in hint
    assert "save_pretrained(DIR)" in hint
    assert info.value.exit_code == 2


def test_read_layout_of_a_distilled_deit():
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", depth=3, patch_size=4, img_size=16, num_classes=5, qkv_bias=False
    )
    found = {k: f.value for k, f in read_layout(model.state_dict()).items()}
    assert found["patch_size"] == 4 and found["depth"] == 3 and found["num_classes"] == 5
    assert found["dist_token"] is True and found["class_token"] is True and found["qkv_bias"] is False
    assert found["pos_tokens"] == 16 + 2


@pytest.mark.parametrize(
    "architecture", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher"]
)
def test_hf_folder_with_non_default_config_matches_transformers(tmp_path, architecture):
    transformers = pytest.importorskip("transformers")
    save_hf(
        tmp_path, architecture, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
        intermediate_size=80, image_size=24, patch_size=6, num_channels=1, qkv_bias=False, num_labels=5,
    )  # fmt: skip
    loaded = load_model(ModelRef(f"hf:{tmp_path}"))
    reference = getattr(transformers, architecture).from_pretrained(tmp_path).eval()
    assert loaded.input.shape == (1, 24, 24)
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(pixel_values=x).logits, atol=1e-6, rtol=0)
    settings = {s.name: (s.value, s.source) for s in loaded.settings}
    assert settings["num_heads"] == (3, "config.json num_attention_heads")
    assert settings["patch_size"] == (6, "config.json patch_size")
    assert settings["qkv_bias"] == (False, "config.json qkv_bias")
    assert loaded.adapter.structure()[0] == {"num_heads": 3, "head_dim": 16, "attn_dim": 48, "mlp_hidden": 80}
