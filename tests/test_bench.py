"""Latency bench: interleaved models, JSON fields, gates and provider errors (RELIABILITY 29)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_ref
from vitcompress.errors import BudgetExceededError, ProviderUnavailableError
from vitcompress.models import load_model
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.runtime import Provider
from vitcompress.timing import bench_models, check_gate


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
    assert set(data) == {"environment", "settings", "results", "gate", "noisy", "noise_reasons"}
    assert data["noisy"] == bool(data["noise_reasons"])
    assert set(data["environment"]) == {"cpu_model", "cpu_count", "isa", "machine", "versions"}
    assert data["settings"] == {
        "provider": "cpu",
        "threads": 1,
        "batch_sizes": [1, 2],
        "warmup": 1,
        "runs": 10,
        "block": 10,
        "precision": None,  # no OpenVINO precision hint asked for
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
    from vitcompress.timing import time_interleaved

    order: list[str] = []
    calls = [lambda: order.append("a"), lambda: order.append("b")]
    steps: list[int] = []
    times = time_interleaved(calls, warmup=1, runs=5, on_step=steps.append, block=2)
    assert [len(t) for t in times] == [5, 5] and all(t >= 0 for ts in times for t in ts)
    # warm-up, then turns of (1 untimed + up to 2 timed) calls, the first position rotating
    assert order == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 2 + ["b"] * 2
    assert sum(steps) == 2 * (1 + 5)


def test_interleaved_turns_pause_so_the_last_sessions_workers_sleep(monkeypatch):
    import time as time_module

    from vitcompress import timing

    pauses: list[float] = []
    monkeypatch.setattr(time_module, "sleep", pauses.append)
    calls = [lambda: None, lambda: None]
    monkeypatch.delenv("VITCOMPRESS_SETTLE_S")
    timing.time_interleaved(calls, warmup=0, runs=4, block=2)
    assert pauses == [timing.SETTLE_S] * 4  # 2 turns x 2 models, before each turn
    pauses.clear()
    monkeypatch.setenv("VITCOMPRESS_SETTLE_S", "0.05")
    timing.time_interleaved(calls, warmup=0, runs=4, block=2)
    assert pauses == [0.05] * 4
    pauses.clear()
    timing.time_interleaved(calls[:1], warmup=0, runs=4, block=2)  # alone: nothing to wait for
    timing.time_interleaved(calls, warmup=0, runs=4, block=1)  # strict round-robin: no pause
    assert pauses == []
    monkeypatch.setenv("VITCOMPRESS_SETTLE_S", "soon")
    assert timing.settle_seconds() == timing.SETTLE_S


def test_gemm_peak_int8_beats_fp32_and_precision_is_read_from_the_graph(tmp_path):
    from vitcompress.timing import gemm_peak, model_precision

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


# --------------------------------------------------------------------------- noisy measurements


def _latency(p50: float, p99: float, model: str = "m.onnx", batch: int = 1):
    from vitcompress.timing import Latency

    return Latency(model, batch, 20, p50, p50, p99, p50, p50 * 0.9, batch * 1e3 / p50, 1.0)


def test_noise_rule_on_synthetic_numbers():
    from vitcompress.timing import noise_reasons

    assert noise_reasons([_latency(1.0, 1.5), _latency(2.0, 3.9)]) == []
    assert noise_reasons([_latency(1.0, 2.0)]) == []  # exactly 2x: still clean
    (tail,) = noise_reasons([_latency(1.0, 1.2), _latency(1.0, 3.1, "dir/b.onnx", 4)])
    assert tail == "b.onnx at batch 4: p99 3.10 ms is 3.1x its p50 1.00 ms (more than 2x)"
    assert noise_reasons([_latency(1.0, 2.5)], max_tail_ratio=3.0) == []
    # the GEMM peak against the least this CPU reaches
    assert noise_reasons(peak_gmacs=60.0, expected_gmacs=83.0) == []
    (peak,) = noise_reasons(peak_gmacs=39.0, expected_gmacs=83.0)
    assert peak.startswith("the measured GEMM peak, 39 GMAC/s, is 47% of the 83 GMAC/s this CPU reaches")
    assert noise_reasons(peak_gmacs=1.0, expected_gmacs=None) == []  # unknown CPU: no verdict
    assert len(noise_reasons([_latency(1.0, 9.0)], peak_gmacs=1.0, expected_gmacs=80.0)) == 2


def test_expected_gemm_peak_is_a_low_bound_from_clock_cores_and_isa(monkeypatch):
    import vitcompress.timing as bench

    env = bench.Environment("cpu", 8, {f: False for f in bench.ISA_FLAGS}, "x86_64", {})
    isa = dict(env.isa, avx2=True, fma=True)
    avx2 = bench.Environment("cpu", 8, isa, "x86_64", {})
    avx512 = bench.Environment("cpu", 8, dict(isa, avx512f=True, avx512_vnni=True), "x86_64", {})
    monkeypatch.setattr(bench, "_cpu_facts", lambda: (2500.0, 4))  # 4 physical cores, 8 threads
    assert bench.expected_gemm_peak("fp32", 2, env) is None  # no vector ISA known
    assert bench.expected_gemm_peak("fp32", 2, avx2) == pytest.approx(2 * 8 * 2.5)
    assert bench.expected_gemm_peak("int8", 2, avx2) == pytest.approx(2 * 8 * 2.5)  # no VNNI
    assert bench.expected_gemm_peak("fp32", 8, avx512) == pytest.approx(4 * 16 * 2.5)  # cores, not SMT
    assert bench.expected_gemm_peak("int8", 1, avx512) == pytest.approx(1 * 32 * 2.5)
    monkeypatch.setattr(bench, "_cpu_facts", lambda: (None, None))
    assert bench.expected_gemm_peak("fp32", 2, avx2) is None
    # this machine: a real CPU's GEMM comes out above half of it (unless the machine is busy)
    monkeypatch.undo()
    expected = bench.expected_gemm_peak("fp32", 1)
    assert expected is None or expected > 1.0


def test_compute_floor_reads_the_right_way_round():
    from vitcompress.timing import ComputeFloor

    floor = ComputeFloor(19_600_000, "fp32", 218.0, 0.09, 0.27, p50_ms=0.333)
    text = floor.describe()
    assert text == (
        "p50 0.33 ms runs at 27% of its compute floor (floor 0.090 ms: 19.6 MMACs at 218 GMAC/s, "
        "this CPU's measured fp32 GEMM peak)"
    )
    assert "p50 is 27%" not in text
    assert set(floor.to_dict()) >= {"macs", "floor_ms", "fraction", "noisy", "noise_reasons"}


def test_bench_cli_warns_when_its_measurement_is_noisy(cli, onnx_pair, monkeypatch):
    import vitcompress.timing as bench

    def jittery(calls, warmup, runs, on_step=None, block=1):
        return [[1.0] * (runs - 1) + [5.0] for _ in calls]  # one call in runs took 5x the median

    monkeypatch.setattr(bench, "time_interleaved", jittery)
    small = onnx_pair[1]
    result = cli("bench", small, "--threads", "1", "--runs", "5", "--warmup", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["noisy"] is True and "p99" in data["noise_reasons"][0]
    assert "noisy measurement: small.onnx at batch 1: p99" in result.stderr
    gated = cli("bench", small, "--threads", "1", "--runs", "5", "--max-p50-ms", "0.5")
    assert gated.exit_code == 3
    assert "latency gate failed" in gated.stderr and "the measurement was noisy" in gated.stderr

    monkeypatch.setattr(bench, "time_interleaved", lambda calls, *a, **k: [[1.0] * 5 for _ in calls])
    calm = cli("bench", small, "--threads", "1", "--runs", "5", "--json")
    assert json.loads(calm.stdout)["noisy"] is False and "noisy" not in calm.stderr
