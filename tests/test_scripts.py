"""Benchmark scripts run on tiny settings so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.inprocess import run_script

ROOT = Path(__file__).parent.parent
TINY = '{"depth": 2, "img_size": 32, "patch_size": 8}'


def _run_script(script: str, *args: str, out: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run scripts/SCRIPT with `--json OUT` (in this process: tests/inprocess.py says why); its
    stdout and the JSON it wrote."""
    run = run_script(script, *args, "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(out.read_text())


def test_bench_export_script_smoke(tmp_path):
    run, results = _run_script(
        "bench_export.py",
        "--model",
        "vit_tiny_patch16_224",
        "--kwargs",
        '{"depth": 1, "img_size": 32, "patch_size": 8}',
        "--runs",
        "5",
        "--warmup",
        "1",
        "--threads",
        "1",
        out=tmp_path / "r.json",
    )
    assert "| PyTorch eager fp32 |" in run.stdout
    results = results["results"]
    assert [r["runtime"].split(",")[0] for r in results] == ["PyTorch eager fp32", "ORT fp32", "ORT fp32"]
    assert all(r["p50_ms"] > 0 for r in results)
    assert all(r["max_abs_diff"] < 1e-4 for r in results[1:])


def test_bench_prune_script_smoke(tmp_path):
    run, results = _run_script(
        "bench_prune.py",
        "--smoke",
        "--model",
        "vit_tiny_patch16_224",
        "--kwargs",
        TINY,
        "--runs",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--eval-limit",
        "50",
        "--calibration",
        "64",
        out=tmp_path / "p.json",
    )
    assert "### Latency vs MACs" in run.stdout and "| hessian |" in run.stdout
    ratios = [r["macs_ratio"] for r in results["speed"]]
    assert ratios[0] == 1.0 and abs(ratios[1] - 0.5) <= 0.02 and abs(ratios[2] - 0.25) <= 0.02
    assert all(r["p50_ms"] > 0 for r in results["speed"])
    assert [r["importance"] for r in results["accuracy"]] == ["none (original)", "l2", "taylor", "hessian"]
    assert all(0.0 <= r["top1"] <= 1.0 for r in results["accuracy"])


def test_bench_lowrank_script_smoke(tmp_path):
    run, results = _run_script(
        "bench_lowrank.py",
        "--smoke",
        "--model",
        "vit_tiny_patch16_224",
        "--kwargs",
        TINY,
        "--runs",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--eval-limit",
        "50",
        "--calibration",
        "64",
        "--targets",
        "0.8",
        out=tmp_path / "l.json",
    )
    assert "### Factorized" in run.stdout and "| whitened | 0.80 |" in run.stdout
    assert [r["model"].split()[-1] for r in results["speed"]] == [
        "original",
        "mlp-half-params",
        "comcat-half-head",
    ]
    assert results["speed"][1]["params_ratio"] < 1 and results["speed"][2]["macs_ratio"] < 1
    assert [abs(r["params_ratio"] - 0.8) <= 0.02 for r in results["accuracy"][1:]] == [True, True]


def test_bench_distill_script_smoke(tmp_path):
    run, results = _run_script(
        "bench_distill.py",
        "--smoke",
        "--epochs",
        "0.5",
        "--batch-size",
        "32",
        "--train-limit",
        "128",
        "--eval-limit",
        "50",
        "--ddp-steps",
        "2",
        "--ddp-samples",
        "64",
        out=tmp_path / "d.json",
    )
    assert "### Recovery after pruning" in run.stdout and "### KD step throughput" in run.stdout
    assert [r["model"].split(" + ")[-1] for r in results["accuracy"][2:]] == [
        "0.5 epoch(s) hard labels",
        "0.5 epoch(s) KD",
    ]
    assert [r["processes"] for r in results["throughput"]] == [1, 2]
    assert all(r["images_per_s"] > 0 for r in results["throughput"])


def test_bench_quantize_script_smoke(tmp_path):
    run, results = _run_script(
        "bench_quantize.py",
        "--smoke",
        "--model",
        "vit_tiny_patch16_224",
        "--kwargs",
        TINY,
        "--runs",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--eval-limit",
        "50",
        out=tmp_path / "q.json",
    )
    assert "vs quantize_dynamic" in run.stdout
    assert [r["variant"].split()[0] for r in results["speed"]] == ["ORT", "ORT", "vitcompress"]
    assert results["speed"][0]["speedup_vs_fp32"] == 1.0 and all(r["p50_ms"] > 0 for r in results["speed"])
    assert len(results["accuracy"]) == 3 and results["accuracy"][0]["drop_points"] == 0.0


def test_train_reference_script_smoke(tmp_path):
    out = tmp_path / "ref"
    run = run_script("train_reference.py", "--epochs", "1", "--limit", "300", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads((out / "reference.json").read_text())
    assert info["epochs"] == 1 and 0.0 <= info["top1"] <= 1.0
    # the epochs are watched on images held out of train; the test split is scored once, at the end
    assert info["train_samples"] == 270 and info["validation_samples"] == 30
    assert "epoch 1/1: loss" in run.stdout and "validation top-1" in run.stdout
    assert run.stdout.count("test top-1") == 1
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert weights["patch_embed.proj.weight"].shape == (128, 1, 7, 7)
    again = run_script("train_reference.py", "--out", str(out))
    assert again.returncode == 0 and "cached:" in again.stdout


def test_peer_benchmark_script_smoke(tmp_path):
    """scripts/benchmark.py end to end on tiny models: every row of the accuracy track, measured (the
    speed track runs the same `track` on other recipes: see the next test)."""
    run, results = _run_script("benchmark.py", "--smoke", "--track", "accuracy", out=tmp_path / "b.json")
    variants = [
        "ORT fp32",
        "ORT quantize_dynamic",
        "torch-pruning magnitude 50% MACs",
        "vitcompress edge-cpu-int8",
        "vitcompress prune-kd-int8",
        "vitcompress lowrank-kd",
    ]
    accuracy = results["accuracy"]["rows"]
    assert [r["variant"] for r in accuracy] == variants
    assert results["accuracy"]["test_images"] == 100
    assert all(0.0 <= r["top1"] <= 1.0 for r in accuracy) and accuracy[0]["drop_points"] == 0.0
    for row in accuracy:
        assert row["p50_ms"] > 0 and row["ips_b32"] > 0 and row["peak_rss_mb"] > 100
        assert row["floor_ms"] > 0 and 0 < row["floor_fraction"] <= 1.5
        assert row["precision"] in ("fp32", "int8")
    base = accuracy[0]["macs"]
    # the 50% MAC targets are met, by the peer's bisection and by our planner
    assert abs(accuracy[2]["macs"] / base - 0.5) <= 0.03 and abs(accuracy[4]["macs"] / base - 0.5) <= 0.03
    assert results["peak_macs_per_s"]["int8"] > results["peak_macs_per_s"]["fp32"] > 0
    assert "| vitcompress prune-kd-int8 |" in run.stdout and "goals:" in run.stdout


def test_peer_benchmark_speed_recipes_drop_training_and_gates():
    """The speed track's recipes: the ready recipe minus distillation, validation and every gate,
    calibrated on synthetic data (random-init models have no accuracy to keep)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    spec = {"source": "timm:deit_small_patch16_224", "num_classes": None}
    raw = benchmark.speed_recipe("prune-kd-int8", spec, smoke=True)
    assert [p["kind"] for p in raw["passes"]] == ["prune", "export", "quantize"]
    assert raw["model"] == {"source": "timm:deit_small_patch16_224"} and "budgets" not in raw
    assert raw["data"] == {"calibration": {"source": "synthetic", "num_samples": 64, "num_classes": 1000}}
    quantize = raw["passes"][-1]
    assert quantize["calibration_size"] == 32 and quantize["max_top1_drop"] is None
    assert raw["passes"][0]["calibration_batches"] == 2


def test_time_readme_script_smoke(tmp_path):
    """scripts/time_readme.py times whole commands; its full mode reads its commands from the README."""
    from scripts.time_readme import readme_command

    run, results = _run_script("time_readme.py", "--smoke", out=tmp_path / "t.json")
    assert [r["command"] for r in results["results"]] == ["version", "recipe list"]
    assert all(r["best_s"] > 0 and r["runs"] == 1 for r in results["results"])
    assert "| version |" in run.stdout
    assert readme_command("python scripts/make_example.py")[:2] == ["python", "scripts/make_example.py"]
    assert "prune-kd-int8" in readme_command("vitcompress compress --recipe prune-kd-int8")


def test_bench_sparsify_script_smoke(tmp_path):
    run, results = _run_script(
        "bench_sparsify.py",
        "--smoke",
        "--model",
        "vit_tiny_patch16_224",
        "--kwargs",
        TINY,
        "--runs",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--eval-limit",
        "50",
        out=tmp_path / "s.json",
    )
    assert "dense vs BSR matmul" in run.stdout and "export parity and size on disk" in run.stdout
    accuracy = results["accuracy"]
    assert [r["variant"] for r in accuracy] == [
        "fp32 (dense)",
        "2:4 magnitude",
        "2:4 obs",
        "block:16x16 50% obs, global",
    ]
    assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in accuracy[1:])
    assert {r["variant"] for r in results["kernels"]} >= {"dense", "BSR 16x16 50%", "BSR 32x32 75%"}
    assert [(r["runtime"], r["variant"]) for r in results["model"]][:2] == [
        ("ORT fp32", "dense"),
        ("ORT fp32", "2:4"),
    ]
    dense, sparse = results["sizes"]
    assert sparse["safetensors_zip_mb"] < dense["safetensors_zip_mb"]  # the zeros deflate
    assert sparse["sparse_layers_encoded_mb"] < 0.6 * sparse["sparse_layers_dense_mb"]


def test_bench_sparsify_tensorrt_track_is_a_clear_error_without_a_gpu():
    import onnxruntime
    import pytest

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("TensorRT is here: the track runs for real")
    run = run_script("bench_sparsify.py", "--track", "tensorrt")
    assert run.returncode == 2 and "TensorrtExecutionProvider" in run.stderr and "Traceback" not in run.stderr


def test_bench_intonly_script_smoke(tmp_path):
    run, results = _run_script(
        "bench_intonly.py",
        "--smoke",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        out=tmp_path / "r.json",
    )
    assert "| integer-only (int-only) |" in run.stdout and "where the time goes" in run.stdout
    accuracy = results["accuracy"]
    assert accuracy["chosen"] in {row["setting"] for row in accuracy["selection"]}
    assert [row["samples"] for row in accuracy["test"]] == [64] * 5
    assert results["parity"]["correlation"] > 0.99 and results["parity"]["ops"]["MatMulInteger"] == 16
    speed = results["speed"]
    assert [row["variant"] for row in speed[:3]] == [
        "ORT fp32",
        "vitcompress INT8 (cpu-x86-vnni)",
        "integer-only (int-only)",
    ]
    assert all(row["p50_ms"] > 0 for row in speed)
    assert speed[2]["profile"][0]["ms"] > 0


def test_bench_tokens_script_smoke(tmp_path):
    run, results = _run_script(
        "bench_tokens.py",
        "--track",
        "accuracy",
        "--smoke",
        "--r",
        "2",
        "--macs",
        "--final-tokens",
        "9",
        "--once",
        "4",
        "--once-blocks",
        "1",
        "--batch",
        "2",
        "--int8-r",
        "0",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--eval-limit",
        "40",
        out=tmp_path / "t.json",
    )
    rows = results["accuracy"]["rows"]
    assert [(r["method"], r["final_tokens"]) for r in rows] == [
        ("original", 17),
        ("merge", 13),
        ("prune", 13),
        ("prune+fuse", 13),
        ("merge", 13),
        ("prune", 13),
        ("merge", 9),
        ("prune", 9),
    ]
    assert all(r["macs_ratio"] < 1 for r in rows[1:]) and "### Many-token reference" in run.stdout
    assert all(r["speedup_batch"] > 0 for r in rows) and rows[0]["latency_ratio_b2"] == 1.0


def test_train_reference_p4_variant_is_the_many_token_model(monkeypatch, tmp_path):
    """The p4 variant: 49 patch tokens + class token, cached beside (not over) the p7 reference."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.setenv("VITCOMPRESS_CACHE", str(tmp_path))
    import train_reference

    from vitcompress.models import load_model

    loaded = load_model(train_reference.model_ref(None, "p4"))
    assert (
        loaded.adapter.num_tokens == 50
        and loaded.adapter.embed_dim == 64
        and loaded.input.shape == (1, 28, 28)
    )
    assert train_reference.default_dir("p4") == tmp_path / "reference" / "fmnist-vit-p4"
    assert train_reference.default_dir() == tmp_path / "reference" / "fmnist-vit-p7"
    assert train_reference.VARIANTS["p7"] == (train_reference.KWARGS, train_reference.EPOCHS)  # unchanged


def test_bench_latency_uneven_configurations_are_tune_like(monkeypatch):
    """`bench_latency.py error --kind uneven`: uniform plans down to 1/8, then uneven ones at MAC
    speedups spread over 3-8x, every width a multiple of 8, seeded."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_latency

    from tests.conftest import tiny_ref
    from vitcompress.models import load_model

    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224", kwargs={"depth": 12, "patch_size": 8}))
    configs = bench_latency.uneven_configurations(loaded, 10, seed=0)
    assert configs == bench_latency.uneven_configurations(loaded, 10, seed=0) and len(configs) == 10
    assert configs[0][0] == (1, 48, 192) and configs[2][0] == (1, 24, 96)  # 1/4 and 1/8 of 3 x 64, MLP 768
    assert all(len(set(c)) == 1 for c in configs[:3])  # uniform
    full = bench_latency._macs([(3, 64, 768)] * 12, 192, 17)
    speedups = [full / bench_latency._macs(c, 192, 17) for c in configs[3:]]
    assert all(2.5 <= s <= 9.2 for s in speedups) and max(speedups) > 2 * min(speedups)
    for blocks in configs[3:]:
        small = [b for b in blocks if b[0] <= 2 and b[2] <= 384]
        assert len(small) >= 9 and len(set(blocks)) > 3  # most blocks small, not uniform
        assert all(d % 8 == 0 and m % 8 == 0 and d >= 8 and m >= 8 and h >= 1 for h, d, m in blocks)
