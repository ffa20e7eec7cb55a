"""Latency bench: interleaved models, JSON fields, gates and provider errors (RELIABILITY 29)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_ref
from vitcompress.bench import bench_models, check_gate
from vitcompress.errors import BudgetExceededError, ProviderUnavailableError
from vitcompress.models import load_model
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.runtime import Provider


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bench")
    small = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    deeper = load_model(tiny_ref("timm:vit_tiny_patch16_224", kwargs={"depth": 6, "patch_size": 8}))
    return (
        export_model(deeper, directory / "deep.onnx", ExportConfig()).path,
        export_model(small, directory / "small.onnx", ExportConfig()).path,
    )


def test_interleaved_bench_reports_every_model_and_batch(onnx_pair):
    steps = []
    report = bench_models(onnx_pair, threads=1, batch_sizes=[1, 4], warmup=2, runs=15, on_step=steps.append)
    assert [(r.model, r.batch_size) for r in report.results] == [
        (str(onnx_pair[0]), 1),
        (str(onnx_pair[1]), 1),
        (str(onnx_pair[0]), 4),
        (str(onnx_pair[1]), 4),
    ]
    for r in report.results:
        assert r.runs == 15
        assert 0 < r.min_ms <= r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.throughput_ips == pytest.approx(r.batch_size * 1e3 / r.p50_ms)
    assert report.find(str(onnx_pair[0]), 1).speedup_vs_first == 1.0
    # 6 blocks vs 2 blocks: the small model must come out faster than the deep baseline
    assert report.find(str(onnx_pair[1]), 1).speedup_vs_first > 1.2
    assert sum(steps) == 2 * 2 * (2 + 15)
    assert report.settings.threads == 1
    assert report.environment.cpu_count >= 1
    assert set(report.environment.isa) >= {"avx512_vnni", "amx_int8", "avx2"}
    assert report.environment.versions["onnxruntime"]


def test_gate_raises_budget_error(onnx_pair):
    report = bench_models(onnx_pair[1:], threads=1, warmup=1, runs=5)
    latency = report.results[0]
    check_gate(latency, max_p50_ms=latency.p50_ms * 10, min_speedup=None)
    with pytest.raises(BudgetExceededError, match="latency gate failed") as info:
        check_gate(latency, max_p50_ms=latency.p50_ms / 10, min_speedup=None)
    assert info.value.exit_code == 3


def test_unavailable_provider_is_a_clear_error(onnx_pair):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ProviderUnavailableError, match="'cuda' .CUDAExecutionProvider. is not available"):
        bench_models(onnx_pair, provider=Provider.cuda, runs=5)


def test_bench_cli_json_fields_and_gate_exit_code(cli, onnx_pair):
    deep, small = onnx_pair
    result = cli(
        "bench",
        deep,
        small,
        "--threads",
        "1",
        "--runs",
        "10",
        "--warmup",
        "1",
        "-b",
        "1",
        "-b",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"environment", "settings", "results", "gate"}
    assert set(data["environment"]) == {"cpu_model", "cpu_count", "isa", "machine", "versions"}
    assert data["settings"] == {
        "provider": "cpu",
        "threads": 1,
        "batch_sizes": [1, 2],
        "warmup": 1,
        "runs": 10,
        "block": 10,
    }
    assert {"p50_ms", "p90_ms", "p99_ms", "throughput_ips", "speedup_vs_first"} <= set(data["results"][0])
    assert len(data["results"]) == 4

    gated = cli("bench", small, "--threads", "1", "--runs", "5", "--max-p50-ms", "0.0001")
    assert gated.exit_code == 3
    assert "latency gate failed" in gated.stderr

    missing = cli("bench", "nope.onnx")
    assert missing.exit_code == 2
    assert "nope.onnx does not exist" in missing.stderr


def test_block_interleaving_times_every_call_and_rotates():
    from vitcompress.bench import time_interleaved

    order: list[str] = []
    calls = [lambda: order.append("a"), lambda: order.append("b")]
    steps: list[int] = []
    times = time_interleaved(calls, warmup=1, runs=5, on_step=steps.append, block=2)
    assert [len(t) for t in times] == [5, 5] and all(t >= 0 for ts in times for t in ts)
    # warm-up, then turns of (1 untimed + up to 2 timed) calls, the first position rotating
    assert order == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 2 + ["b"] * 2
    assert sum(steps) == 2 * (1 + 5)


def test_gemm_peak_int8_beats_fp32_and_precision_is_read_from_the_graph(tmp_path):
    from vitcompress.bench import gemm_peak, model_precision

    fp32, int8 = gemm_peak("fp32", 1, size=512), gemm_peak("int8", 1, size=512)
    assert 1e9 < fp32 < int8  # any x86-64 core does > 1 GMAC/s; u8s8 kernels beat fp32 FMA
    with pytest.raises(ValueError, match="use fp32 or int8"):
        gemm_peak("int4", 1)
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.int8), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w", "s"], ["wf"]),
            helper.make_node("MatMul", ["x", "wf"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight, scale],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "q.onnx"))
    assert model_precision(tmp_path / "q.onnx") == "int8"
    graph.node.pop(0)
    graph.node[0].input[1] = "w"
    onnx.save(helper.make_model(graph), str(tmp_path / "f.onnx"))
    assert model_precision(tmp_path / "f.onnx") == "fp32"


def test_bench_profile_breaks_time_down_by_kernel_type(cli, onnx_pair):
    result = cli(
        "bench", onnx_pair[0], "--threads", "1", "--runs", "5", "--warmup", "1", "--profile", "--json"
    )
    assert result.exit_code == 0, result.output
    profile = json.loads(result.stdout)["profile"][str(onnx_pair[0])]
    ops = {row["op_type"]: row for row in profile}
    assert "MatMul" in ops and ops["MatMul"]["nodes"] >= 4  # qkv, proj, fc1, fc2
    assert abs(sum(row["share"] for row in profile) - 1.0) < 1e-6
    assert all(row["ms_per_run"] > 0 for row in profile)
    assert [r["share"] for r in profile] == sorted((r["share"] for r in profile), reverse=True)
    table = cli("bench", onnx_pair[0], "--threads", "1", "--runs", "5", "--warmup", "1", "--profile")
    assert "time per kernel type" in table.stdout and "MatMul" in table.stdout
