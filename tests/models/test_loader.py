"""Model references: timm by name, checkpoints with their mismatches, Hugging Face folders."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_ref
from vitcompress.errors import (
    CheckpointError,
    InputShapeError,
    MissingDependencyError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from vitcompress.models import ModelRef, load_model


def _save_weights(loaded, path):
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(path))
    return path


def test_timm_by_name_builds_eval_model_with_input_spec():
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    assert not loaded.model.training
    assert loaded.input.shape == (3, 32, 32)
    assert loaded.num_classes == 10
    assert loaded.source == {
        "kind": "timm",
        "name": "vit_tiny_patch16_224",
        "kwargs": {"depth": 2, "patch_size": 8, "num_classes": 10, "img_size": 32},
    }
    assert loaded.model(loaded.example_input(3)).shape == (3, 10)


def test_unknown_timm_name_lists_closest():
    with pytest.raises(ModelNotFoundError, match="unknown timm model 'deit_smal_patch16_224'") as info:
        load_model(ModelRef("timm:deit_smal_patch16_224"))
    assert "deit_small_patch16_224" in (info.value.hint or "")


def test_non_vit_timm_model_is_unsupported():
    with pytest.raises(UnsupportedModelError, match="ResNet is not a vision transformer family"):
        load_model(ModelRef("timm:resnet18", num_classes=2))


def test_missing_model_reference(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(ModelRef(str(tmp_path / "nothing")))
    plain_file = tmp_path / "weights.safetensors"
    plain_file.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="--checkpoint"):
        load_model(ModelRef(str(plain_file)))


def test_checkpoint_roundtrip_and_num_classes_inferred(tmp_path):
    original = load_model(tiny_ref("timm:vit_tiny_patch16_224", num_classes=7))
    path = _save_weights(original, tmp_path / "w.safetensors")
    reloaded = load_model(tiny_ref("timm:vit_tiny_patch16_224", num_classes=None, checkpoint=path))
    assert reloaded.num_classes == 7
    x = original.example_input(2)
    assert torch.equal(original.model(x), reloaded.model(x))


def test_head_size_mismatch_reinitializes_head_explicitly(tmp_path, caplog):
    original = load_model(tiny_ref("timm:deit_tiny_distilled_patch16_224", num_classes=7))
    path = _save_weights(original, tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING):
        reloaded = load_model(
            tiny_ref("timm:deit_tiny_distilled_patch16_224", num_classes=3, checkpoint=path)
        )
    assert "classifier head re-initialized: checkpoint has 7 classes, model built with 3" in caplog.text
    assert reloaded.num_classes == 3
    assert torch.equal(reloaded.model.blocks[1].mlp.fc1.weight, original.model.blocks[1].mlp.fc1.weight)


def test_position_embedding_grid_mismatch_is_resampled(tmp_path, caplog):
    original = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    path = _save_weights(original, tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING):
        bigger = load_model(tiny_ref("timm:vit_tiny_patch16_224", img_size=48, checkpoint=path))
    assert "position embedding resampled from (1, 17, 192) to (1, 37, 192)" in caplog.text
    assert bigger.input.shape == (3, 48, 48)
    assert bigger.model(bigger.example_input(1)).shape == (1, 10)


def test_rgb_checkpoint_adapted_to_grey_input(tmp_path, caplog):
    original = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    path = _save_weights(original, tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING):
        grey = load_model(tiny_ref("timm:vit_tiny_patch16_224", in_chans=1, checkpoint=path))
    assert "adapted from 3 to 1 input channels" in caplog.text
    assert grey.input.shape == (1, 32, 32)
    assert len(grey.input.mean) == 1


def test_missing_and_unexpected_keys_are_listed_and_fatal(tmp_path):
    original = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    weights = {k: v.contiguous() for k, v in original.model.state_dict().items()}
    weights.pop("blocks.1.mlp.fc2.bias")
    weights["blocks.1.extra.weight"] = torch.ones(2)
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(tiny_ref("timm:vit_tiny_patch16_224", checkpoint=path))
    message = info.value.message
    assert "missing (1): blocks.1.mlp.fc2.bias" in message
    assert "unexpected (1): blocks.1.extra.weight" in message


def test_checkpoint_of_another_width_builds_that_width_and_guesses_heads_loudly(tmp_path, caplog):
    tiny = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    path = _save_weights(tiny, tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING):
        loaded = load_model(ModelRef("timm:vit_small_patch16_224", checkpoint=path))
    assert "num_heads=3 is a GUESS (64 channels per head)" in caplog.text and "--num-heads" in caplog.text
    assert loaded.adapter.embed_dim == 192 and loaded.adapter.structure()[0]["num_heads"] == 3
    settings = {s.name: s for s in loaded.settings}
    assert settings["num_heads"].source.startswith("GUESS: 64 channels per head")
    x = tiny.example_input(2)
    torch.testing.assert_close(loaded.model(x), tiny.model(x), atol=1e-6, rtol=0)
    # an explicit width the tensors contradict: the tensor, both shapes and the flag
    with pytest.raises(CheckpointError) as info:
        load_model(ModelRef("timm:vit_small_patch16_224", checkpoint=path, kwargs={"embed_dim": 384}))
    message = info.value.message
    assert "embed_dim=384 from --model-kwargs" in message
    assert "patch_embed.proj.weight is (192, 3, 8, 8) in the checkpoint" in message
    assert "the model built with embed_dim=384 expects (384, 3, 8, 8)" in message
    assert "--model-kwargs embed_dim=384" in (info.value.hint or "") and "set it to 192" in (
        info.value.hint or ""
    )


def test_checkpoint_patch_size_is_read_and_an_explicit_other_one_is_refused(tmp_path, caplog):
    patch8 = load_model(tiny_ref("timm:vit_tiny_patch16_224"))  # 8x8 patches on 32x32
    path = _save_weights(patch8, tmp_path / "w.safetensors")
    loaded = load_model(ModelRef("timm:vit_tiny_patch16_224", checkpoint=path))
    assert loaded.source["kwargs"]["patch_size"] == 8 and loaded.input.shape == (3, 32, 32)
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError) as info:
        load_model(
            tiny_ref("timm:vit_tiny_patch16_224", checkpoint=path, kwargs={"depth": 2, "patch_size": 16})
        )
    message = info.value.message
    assert "patch_embed.proj.weight is (192, 3, 8, 8) in the checkpoint" in message
    assert "the model built with patch_size=16 expects (192, 3, 16, 16)" in message
    assert "drop --model-kwargs patch_size=16" in (info.value.hint or "")
    assert "set it to 8" in (info.value.hint or "")
    assert "resampled" not in caplog.text  # no resampling before the refusal


def test_distilled_checkpoint_into_plain_vit_names_the_prefix_tokens(tmp_path):
    deit = load_model(tiny_ref("timm:deit_tiny_distilled_patch16_224"))
    path = _save_weights(deit, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(tiny_ref("timm:vit_tiny_patch16_224", checkpoint=path))
    assert "pos_embed is (1, 18, 192) in the checkpoint, the model expects (1, 17, 192)" in info.value.message
    assert "dist_token" in info.value.message and "deit_*_distilled_*" in (info.value.hint or "")


def test_position_grid_that_is_not_square_is_refused_not_resampled_to_nothing(tmp_path):
    original = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    weights = {k: v.contiguous() for k, v in original.model.state_dict().items()}
    weights["pos_embed"] = weights["pos_embed"][:, :13]  # 12 patch positions: no square grid
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(tiny_ref("timm:vit_tiny_patch16_224", img_size=48, checkpoint=path))
    assert "pos_embed is (1, 13, 192) in the checkpoint, the model expects (1, 37, 192)" in info.value.message
    assert "--img-size" in (info.value.hint or "")


def test_image_smaller_than_one_patch_is_a_user_error(tmp_path):
    original = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    path = _save_weights(original, tmp_path / "w.safetensors")
    for ref in (
        tiny_ref("timm:vit_tiny_patch16_224", img_size=4),
        tiny_ref("timm:vit_tiny_patch16_224", img_size=4, checkpoint=path),
    ):
        with pytest.raises(InputShapeError, match="empty 0x0 patch grid") as info:
            load_model(ref)
        assert "--img-size of at least 8" in (info.value.hint or "")


def test_resolution_is_the_checkpoints_unless_img_size_resamples_it(tmp_path, caplog):
    original = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    path = _save_weights(original, tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING):
        bigger = load_model(
            tiny_ref(
                "timm:vit_tiny_patch16_224",
                img_size=None,
                checkpoint=path,
                kwargs={"depth": 2, "patch_size": 8, "img_size": 48},
            )
        )
    assert "4x4 to 6x6 patches" in caplog.text
    assert bigger.input.shape == (3, 48, 48)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # no --img-size: the checkpoint's own resolution
        same = load_model(ModelRef("timm:vit_tiny_patch16_224", checkpoint=path))
    assert "resampled" not in caplog.text
    assert same.input.shape == (3, 32, 32)
    assert {s.name: s.source for s in same.settings}["img_size"] == (
        "checkpoint pos_embed (1, 17, 192), 4x4 patches of 8 px"
    )


def test_hf_vit_folder_loads_and_matches_transformers(hf_vit_dir):
    import transformers

    loaded = load_model(ModelRef(f"hf:{hf_vit_dir}"))
    reference = transformers.ViTForImageClassification.from_pretrained(hf_vit_dir).eval()
    x = loaded.example_input(2)
    assert loaded.adapter.family == "hf-vit"
    assert loaded.input.shape == (3, 32, 32)
    assert torch.allclose(loaded.model(x), reference(pixel_values=x).logits, atol=1e-6)


def test_hf_folder_without_safetensors_is_refused(tmp_path, hf_vit_dir):
    import shutil

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(hf_vit_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="no .safetensors weights .found pytorch_model.bin."):
        load_model(ModelRef(f"hf:{folder}"))


def test_hf_without_transformers_gives_install_hint(hf_vit_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError) as info:
        load_model(ModelRef(f"hf:{hf_vit_dir}"))
    assert "pip install 'vitcompress[hf]'" in (info.value.hint or "")


def test_hf_num_classes_override_reinitializes_only_the_head(hf_vit_dir, caplog):
    original = load_model(ModelRef(f"hf:{hf_vit_dir}"))
    with caplog.at_level(logging.WARNING):
        resized = load_model(ModelRef(f"hf:{hf_vit_dir}", num_classes=4))
    assert "classifier head re-initialized: checkpoint has 10 classes, model built with 4" in caplog.text
    assert resized.num_classes == 4
    assert resized.model(resized.example_input(2)).shape == (2, 4)
    block_a, block_b = original.adapter.blocks()[0], resized.adapter.blocks()[0]
    assert torch.equal(block_a.mlp.fc1.weight, block_b.mlp.fc1.weight)


def test_hf_rejects_timm_only_options(hf_vit_dir):
    with pytest.raises(CheckpointError, match="do not apply to hf: models"):
        load_model(ModelRef(f"hf:{hf_vit_dir}", img_size=64))


def test_hf_preprocessing_follows_the_image_processor(tmp_path, hf_vit_dir):
    import json
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(hf_vit_dir, folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3})
    )
    loaded = load_model(ModelRef(f"hf:{folder}"))
    assert loaded.input.mean == (0.485, 0.456, 0.406) and loaded.input.std == (0.229, 0.224, 0.225)
    assert loaded.input.interpolation == "bicubic"
    (folder / "preprocessor_config.json").write_text(json.dumps({"resample": 0}))
    assert load_model(ModelRef(f"hf:{folder}")).input.interpolation == "nearest"


def test_run_directory_loads_its_last_artifact_or_says_it_has_none(cli, tmp_path):
    args = ["timm:vit_tiny_patch16_224", "--num-classes", "10", "--img-size", "32"]
    assert cli("prune", *args, "--mlp", "0.5", "--out", tmp_path / "run").exit_code == 0
    assert load_model(ModelRef(str(tmp_path / "run"))).adapter.structure()[0]["mlp_hidden"] == 384
    (tmp_path / "onnx_only").mkdir()
    (tmp_path / "onnx_only" / "report.json").write_text('{"ledger": [{"artifact": "model.onnx"}]}')
    with pytest.raises(ModelNotFoundError, match="holds no model artifact"):
        load_model(ModelRef(str(tmp_path / "onnx_only")))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable vitcompress report"):
        load_model(ModelRef(str(tmp_path / "broken")))
