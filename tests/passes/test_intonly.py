"""Integer-only ViT: each integer kernel bit-exact between ONNX Runtime and the NumPy reference, close
to the float function it replaces; the whole graph integer-only, bit-exact and close to the float model."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from vitcompress.passes.intonly import arith
from vitcompress.passes.intonly.arith import Dyadic, IntLayerNormParams, NumpyOps, OnnxOps, Sym
from vitcompress.passes.intonly.build import check_integer_only

_ONNX_ELEM = {
    np.int8: onnx.TensorProto.INT8,
    np.uint8: onnx.TensorProto.UINT8,
    np.int32: onnx.TensorProto.INT32,
    np.int64: onnx.TensorProto.INT64,
}


def _both(kernel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run `kernel(ops, x)` with NumPy and as an ONNX graph in ONNX Runtime."""
    import onnxruntime as ort
    from onnx import helper

    expected = kernel(NumpyOps(), x)
    ops = OnnxOps()
    out = kernel(ops, Sym("x", x.dtype.type))
    graph = helper.make_graph(
        ops.nodes,
        "kernel",
        [helper.make_tensor_value_info("x", _ONNX_ELEM[x.dtype.type], list(x.shape))],
        [helper.make_tensor_value_info(out.name, _ONNX_ELEM[out.dtype], None)],
        ops.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return expected, session.run(None, {"x": x})[0]


def test_dyadic_factor_is_close_and_in_range():
    ratios = np.array([2e-4, 1e-3, 5e-3, 0.02, -0.01])  # per-channel spreads of real weight scales
    factor = Dyadic.of(ratios)  # one shift for all channels; the largest keeps 22 bits
    assert 2**21 <= np.abs(factor.m).max() < 2**22 and factor.k >= 0
    assert np.allclose(factor.value(), ratios, rtol=2**-14)  # 100x smaller: still 15 bits
    assert np.allclose(Dyadic.of(0.0123).value(), 0.0123, rtol=2**-21)


def test_requantize_rounds_and_clips_exactly():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(-(2**24), 2**24, 2000), [-3, -2, -1, 0, 1, 2, 3, 2**30, -(2**30)]])
    x = x.astype(np.int32)[None]
    factor = Dyadic.of(0.0123)
    want, got = _both(lambda ops, v: arith.requantize(ops, v, factor, -127, 127, np.int8), x)
    assert got.dtype == np.int8 and np.array_equal(want, got)
    exact = np.clip(np.floor(x * factor.value() + 0.5), -127, 127)  # round half up, then saturate
    assert np.array_equal(got, exact.astype(np.int8))


def test_shiftmax_bit_exact_and_close_to_softmax():
    rng = np.random.default_rng(1)
    scale = 2e-3
    scores = rng.normal(0, 1500, (2, 3, 17, 17)).astype(np.int32)
    scores[0, 0, 0] = 0  # a row of equal scores
    want, got = _both(lambda ops, v: arith.shiftmax(ops, v, scale), scores)
    assert got.dtype == np.uint8 and np.array_equal(want, got)
    real = scores * scale
    softmax = np.exp(real - real.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    error = np.abs(got / 256 - softmax)
    assert error.max() < 0.05 and error.mean() < 0.005
    assert np.all(got[0, 0, 0] == got[0, 0, 0, 0])  # equal scores, equal probabilities


def test_shiftgelu_bit_exact_and_close_to_gelu():
    rng = np.random.default_rng(2)
    scale = 6.0 / 32767
    x = rng.integers(-32767, 32768, (4, 9, 64)).astype(np.int32)
    x[0, 0] = -5  # a row with no positive value
    want, got = _both(lambda ops, v: arith.shiftgelu(ops, v, scale), x)
    assert got.dtype == np.int32 and np.array_equal(want, got)
    real = x * scale
    gelu = 0.5 * real * (1 + np.vectorize(math.erf)(real / math.sqrt(2)))
    error = np.abs(got * scale / 256 - gelu)
    assert error.max() < 0.1 and error.mean() < 0.03


def test_integer_sqrt_from_a_calibrated_start():
    start = 10_000
    roots = np.array([0, 1, start / 16, start / 4, start, 4 * start, 8 * start, 16 * start])
    n = np.rint(roots**2).astype(np.int64)[:, None]
    want, got = _both(lambda ops, v: arith.integer_sqrt(ops, v, start=start), n)
    assert np.array_equal(want, got)
    got = got[:, 0]
    assert got[0] >= 1 and got[1] >= 1  # never 0: no division by zero downstream
    assert np.array_equal(got[2:7], roots[2:7].astype(np.int64))  # exact from start/16 to 8x start
    assert abs(got[7] / roots[7] - 1) < 0.001  # 16x above: within 0.1%


def test_layernorm_bit_exact_and_close_to_float():
    rng = np.random.default_rng(3)
    width = 48
    gamma, beta = rng.normal(1, 0.3, width), rng.normal(0, 0.2, width)
    x = (rng.normal(0, 40_000, (2, 5, width)) + rng.normal(0, 20_000, (2, 5, 1))).astype(np.int32)
    s_out = 4.0 / 127
    start = int(40_000 * math.sqrt(width))
    params = IntLayerNormParams.make(gamma, beta, s_out, start)
    want, got = _both(lambda ops, v: arith.layernorm(ops, v, params), x)
    assert got.dtype == np.uint8 and np.array_equal(want, got)
    got = got.astype(np.int64) - arith.ACT_ZERO  # int8 values travel as uint8 + 128
    xf = x.astype(np.float64)
    normal = (xf - xf.mean(-1, keepdims=True)) / xf.std(-1, keepdims=True) * gamma + beta
    assert np.abs(got * s_out - np.clip(normal, -4, 4)).max() < 2.5 * s_out


# --------------------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def tiny_timm():
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10, depth=2, patch_size=8
    )
    return model.eval()


def _plan(model, image=(32, 32), seed=0, count=16):
    from vitcompress.passes.intonly.vit import calibrate, plan_integer, read_vit

    vit = read_vit(model, image)
    images = np.random.default_rng(seed).normal(0, 1, (count, 3, *image)).astype(np.float32)
    return vit, plan_integer(vit, calibrate(vit, [images[:8], images[8:]], 99.99), use_percentile=False)


def _ort_outputs(model_proto, images):
    import onnxruntime as ort

    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})


def test_whole_vit_bit_exact_integer_only_and_close_to_float(tiny_timm):
    import torch

    from vitcompress.passes.intonly.vit import (
        build_onnx,
        dequantize_output,
        float_forward,
        reference_accumulators,
    )

    vit, plan = _plan(tiny_timm)
    images = np.random.default_rng(7).normal(0, 1, (12, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = tiny_timm(torch.from_numpy(images)).numpy()
        assert np.abs(float_forward(vit, torch.from_numpy(images)).numpy() - expected).max() < 1e-4
    model = build_onnx(plan, expose_accumulators=True)
    onnx.checker.check_model(model, full_check=True)
    logits, accumulators = _ort_outputs(model, images)
    reference = reference_accumulators(plan, images)
    assert accumulators.dtype == np.int32 and np.array_equal(accumulators, reference)
    assert np.array_equal(logits, dequantize_output(reference, plan))
    correlation = np.corrcoef(logits.ravel(), expected.ravel())[0, 1]
    assert correlation > 0.99
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.75

    report = check_integer_only(model)
    assert report.integer_only and not report.violations
    assert report.ops["MatMulInteger"] == 1 + 2 * 7 + 1  # patch embed, q, kv, q@k, p@v, proj, fc1, fc2, head
    assert set(report.tensor_types) <= {"int8", "uint8", "int32", "int64", "uint64"}
    assert report.boundary == {
        "QuantizeLinear (input quantizer)": 1,
        "DequantizeLinear (output dequantizer)": 1,
    }
    assert "integer-only: yes" in report.summary()


def test_checker_finds_float_inside(tiny_timm):
    from onnx import helper

    from vitcompress.passes.intonly.vit import build_onnx

    _, plan = _plan(tiny_timm)
    model = build_onnx(plan)
    # a float detour in the middle of the graph: Cast to float and back
    victim = next(n for n in model.graph.node if n.op_type == "Transpose")
    original = victim.output[0]
    victim.output[0] = "detour_in"
    model.graph.node.extend(
        [
            helper.make_node("Cast", ["detour_in"], ["detour_float"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Cast", ["detour_float"], [original], to=onnx.TensorProto.INT8),
        ]
    )
    del model.graph.value_info[:]
    report = check_integer_only(_sorted(model))
    assert not report.integer_only
    assert any("detour_float is float32" in v for v in report.violations)


def _sorted(model):
    """Topologically sort the graph's nodes (the detour was appended at the end)."""
    nodes = list(model.graph.node)
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    ordered = []
    while nodes:
        for node in nodes:
            if all(not name or name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
                nodes.remove(node)
                break
        else:
            raise AssertionError("cycle")
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


@pytest.mark.parametrize("fixture", ["hf_vit_dir", "hf_deit_dir"])
def test_hugging_face_integer_only(fixture, request):
    import torch

    from vitcompress.models import ModelRef, load_model
    from vitcompress.passes.intonly.vit import build_onnx, reference_accumulators

    loaded = load_model(ModelRef(f"hf:{request.getfixturevalue(fixture)}"))
    embeddings = loaded.model.net.base_model.embeddings
    with torch.no_grad():  # Hugging Face DeiT initializes its tokens and positions at 0: a class token
        for name in ("cls_token", "distillation_token", "position_embeddings"):  # of ~1e-5 is lost to
            if hasattr(embeddings, name):  # any shared residual scale; trained ones are not that small
                getattr(embeddings, name).normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    _, plan = _plan(loaded.model)
    assert (plan.head2 is not None) == (fixture == "hf_deit_dir")  # DeiT with teacher: two heads
    images = np.random.default_rng(3).normal(0, 1, (4, 3, 32, 32)).astype(np.float32)
    logits, accumulators = _ort_outputs(build_onnx(plan, expose_accumulators=True), images)
    assert np.array_equal(accumulators, reference_accumulators(plan, images))
    with torch.no_grad():
        expected = loaded.model(torch.from_numpy(images)).numpy()
    assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > 0.98


def test_distilled_deit_averages_its_two_heads_in_integers():
    import timm
    import torch

    from vitcompress.passes.intonly.vit import build_onnx, float_forward, reference_accumulators

    torch.manual_seed(1)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        img_size=32,
        num_classes=10,
        depth=1,
        patch_size=8,
    ).eval()
    vit, plan = _plan(model)
    images = np.random.default_rng(4).normal(0, 1, (6, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
        assert np.abs(float_forward(vit, torch.from_numpy(images)).numpy() - expected).max() < 1e-4
    logits, accumulators = _ort_outputs(build_onnx(plan, expose_accumulators=True), images)
    assert np.array_equal(accumulators, reference_accumulators(plan, images))
    assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > 0.99


def test_unsupported_variants_are_refused_by_name():
    import timm

    from vitcompress.errors import UnsupportedModelError
    from vitcompress.passes.intonly.vit import read_vit

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        num_classes=10,
        depth=1,
        patch_size=8,
        global_pool="avg",
    )
    with pytest.raises(UnsupportedModelError, match="pooling 'avg'"):
        read_vit(model, (32, 32))
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        num_classes=10,
        depth=1,
        patch_size=8,
        qk_norm=True,
    )
    with pytest.raises(UnsupportedModelError, match="blocks.0.attn.q_norm"):
        read_vit(model, (32, 32))


# --------------------------------------------------------------------------- configuration and CLI


def test_int_only_preset_and_its_rules():
    from pydantic import ValidationError

    from vitcompress.passes.quantize import Mode, QuantizeConfig

    cfg = QuantizeConfig(preset="int-only", calibration_size=1)
    assert cfg.mode is Mode.integer_only and cfg.filename == "model.intonly.onnx" and cfg.needs_data()
    with pytest.raises(ValidationError, match="not entropy"):
        QuantizeConfig(preset="int-only", calibration="entropy")
    with pytest.raises(ValidationError, match="integer-only takes 1"):
        QuantizeConfig(mode="static", calibration_size=1)
    with pytest.raises(ValidationError, match="finetune_steps is integer-only's"):
        QuantizeConfig(mode="static", finetune_steps=10)


def test_cli_quantize_int_only_needs_a_recipe(cli, tmp_path):
    result = cli("quantize", tmp_path / "model.onnx", "--out", tmp_path / "x.onnx", "--preset", "int-only")
    assert result.exit_code == 2
    assert "built from the PyTorch model" in result.output and "--recipe int-only" in result.output


def test_cli_integer_check(cli, tmp_path, tiny_timm):
    from vitcompress.passes.intonly.vit import build_onnx

    _, plan = _plan(tiny_timm)
    integer = tmp_path / "int.onnx"
    onnx.save(build_onnx(plan), integer)
    result = cli("integer-check", integer)
    assert result.exit_code == 0, result.output
    assert "integer-only: yes" in result.output and "MatMulInteger 16" in result.output
    floaty = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            "f",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    onnx.save(floaty, tmp_path / "float.onnx")
    result = cli("integer-check", tmp_path / "float.onnx")
    assert result.exit_code == 4
    assert "is not integer-only" in result.output and "x is float32" in result.output


def test_bad_calibration_data_is_refused_before_any_work():
    import torch

    from vitcompress.passes.intonly.build import IntegerOnlyError, _calibration_batches

    class Data:
        def __init__(self, images):
            self.images = images

        def batches(self, size):
            for i in range(0, len(self.images), size):
                yield torch.from_numpy(self.images[i : i + size]), torch.zeros(0)

    with pytest.raises(IntegerOnlyError, match="empty"):
        _calibration_batches(Data(np.zeros((0, 3, 32, 32), np.float32)), (3, 32, 32), 4)
    nan = np.zeros((2, 3, 32, 32), np.float32)
    nan[1, 0, 0, 0] = np.nan
    with pytest.raises(IntegerOnlyError, match="NaN or Inf"):
        _calibration_batches(Data(nan), (3, 32, 32), 4)
    with pytest.raises(IntegerOnlyError, match=r"shape \(3, 16, 16\)"):
        _calibration_batches(Data(np.zeros((1, 3, 16, 16), np.float32)), (3, 32, 32), 4)
    assert IntegerOnlyError("x").exit_code == 2


def test_integer_aware_finetuning_trains_through_the_integer_arithmetic():
    import torch
    import torch.nn.functional as F

    from tests.conftest import tiny_ref
    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.models import load_model
    from vitcompress.passes.intonly.build import Finetune, plan_model
    from vitcompress.passes.intonly.qat import FakeQuantViT
    from vitcompress.passes.intonly.vit import float_forward, read_vit, reference_accumulators

    torch.manual_seed(0)
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224", kwargs={"depth": 1, "patch_size": 8}))
    data = load_dataset(DataSpec(source="synthetic", num_samples=32), loaded.input, loaded.num_classes)
    images = next(iter(data.batches(32)))[0]
    base = plan_model(loaded, data, None)
    vit = read_vit(loaded.model, (32, 32))
    student = FakeQuantViT(vit, base.scales)
    with torch.no_grad():
        expected = float_forward(vit, images)
        fake = student(images)
    integer = reference_accumulators(base, images.numpy()) * base.output_scale
    # the fake-quant model computes like the integer one: closer to it than the float model is
    assert np.abs(fake.numpy() - integer).mean() < np.abs(expected.numpy() - integer).mean()
    loss = F.kl_div(
        F.log_softmax(student(images), -1),
        F.log_softmax(expected, -1),
        log_target=True,
        reduction="batchmean",
    )
    loss.backward()  # gradients reach every weight through the rounding (straight-through)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.module.parameters())

    tuned = plan_model(loaded, data, None, finetune=Finetune(data, steps=4, lr=1e-5, batch_size=16))
    assert tuned.finetune_losses is not None and all(np.isfinite(tuned.finetune_losses))
    assert tuned.scales == base.scales  # frozen at calibration: the graph quantizes where training did
    assert not np.array_equal(tuned.blocks[0].fc1.weight, base.blocks[0].fc1.weight)
