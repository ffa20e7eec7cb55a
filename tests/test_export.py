"""ONNX export: checker, dynamic batch, parity gate, exporters, input checks, external data (RELIABILITY 18-21)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import tiny_ref
from vitcompress.errors import ExportError, InputShapeError, OnnxModelError, ParityError
from vitcompress.models import ModelRef, load_model
from vitcompress.passes.export import ExportConfig, Exporter, export_model
from vitcompress.runtime import OnnxRunner, onnx_size


@pytest.fixture(params=["timm:vit_tiny_patch16_224", "timm:deit_tiny_distilled_patch16_224", "hf_vit"])
def loaded(request, hf_vit_dir):
    if request.param == "hf_vit":
        return load_model(ModelRef(f"hf:{hf_vit_dir}"))
    return load_model(tiny_ref(request.param))


def test_export_parity_and_dynamic_batch(loaded, tmp_path):
    result = export_model(loaded, tmp_path / "m.onnx", ExportConfig())
    assert result.parity.max_abs_diff < 1e-4
    assert result.parity.top1_agreement == 1.0
    assert result.parity.batch == 8
    onnx.checker.check_model(str(result.path), full_check=True)
    graph = onnx.load(str(result.path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert result.op_counts["MatMul"] >= 2 * 4  # qkv, proj, fc1, fc2 per block at least
    # the attention scale is a constant, not Shape->Slice->Cast->Sqrt->Div computed per run
    assert "Sqrt" not in result.op_counts and "Cast" not in result.op_counts
    runner = OnnxRunner(result.path)
    for batch in (1, 3, 8):
        x = loaded.example_input(batch, seed=batch)
        with torch.no_grad():
            expected = loaded.model(x).numpy()
        got = runner.run(x.numpy())
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp files left


def test_dynamo_exporter_also_matches(tmp_path):
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    result = export_model(loaded, tmp_path / "d.onnx", ExportConfig(exporter=Exporter.dynamo, opset=18))
    assert result.exporter == "dynamo"
    assert result.parity.max_abs_diff < 1e-4 and result.parity.top1_agreement == 1.0
    assert OnnxRunner(result.path).run(loaded.example_input(3).numpy()).shape == (3, 10)


def test_missing_onnxscript_gives_install_hint(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    with pytest.raises(ExportError, match="needs the 'onnxscript' package") as info:
        export_model(loaded, tmp_path / "d.onnx", ExportConfig(exporter=Exporter.dynamo, opset=18))
    assert "pip install onnxscript" in (info.value.hint or "")


def test_parity_gate_fails_and_leaves_no_file(tmp_path):
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    impossible = ExportConfig(atol=1e-12, rtol=0.0)
    with pytest.raises(
        ParityError, match=r"does not match PyTorch at batch 1: max \|Δlogit\| .* \(allowed 1e-12\)"
    ):
        export_model(loaded, tmp_path / "m.onnx", impossible)
    assert list(tmp_path.iterdir()) == []


def test_wrong_input_resolution_is_named(tmp_path):
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    result = export_model(loaded, tmp_path / "m.onnx", ExportConfig())
    with pytest.raises(InputShapeError, match="expected 32x32 input .3x32x32 per image., got 3x48x48"):
        OnnxRunner(result.path).run(np.zeros((1, 3, 48, 48), dtype=np.float32))
    with pytest.raises(InputShapeError, match="got 1x32x32"):
        OnnxRunner(result.path).run(np.zeros((2, 1, 32, 32), dtype=np.float32))


def _external_model(tmp_path, location: str):
    weight = onnx.numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    node = onnx.helper.make_node("MatMul", ["input", "w"], ["logits"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 4])],
        [weight],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    if location != "ext.onnx.data":
        proto = onnx.load(str(path), load_external_data=False)
        for entry in proto.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save_model(proto, str(path))
    return path


def test_external_data_beside_the_model_runs(tmp_path):
    path = _external_model(tmp_path, "ext.onnx.data")
    out = OnnxRunner(path).run(np.ones((3, 4), dtype=np.float32))
    assert out.shape == (3, 4) and float(out[0, 0]) == 4.0
    data = tmp_path / "ext.onnx.data"
    assert data.stat().st_size >= 4 * 4 * 4  # the 4x4 float32 weight lives outside the .onnx file
    assert onnx_size(path) == path.stat().st_size + data.stat().st_size


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_escaping_the_folder_is_rejected(tmp_path, location):
    path = _external_model(tmp_path, location)
    with pytest.raises(OnnxModelError, match="outside the model folder"):
        OnnxRunner(path)


def test_external_data_symlink_is_rejected(tmp_path):
    path = _external_model(tmp_path, "ext.onnx.data")
    target = tmp_path / "ext.onnx.data"
    (tmp_path / "real.bin").write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(tmp_path / "real.bin")
    with pytest.raises(OnnxModelError, match="outside the model folder"):
        OnnxRunner(path)


def test_opset_too_old_is_a_config_error():
    with pytest.raises(ValueError, match="opset 13 is too old for ViT attention"):
        ExportConfig(opset=13)
