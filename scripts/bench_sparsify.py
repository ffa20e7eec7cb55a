"""Sparsify benchmark: accuracy of post-training 2:4 and block sparsity (OBS vs magnitude, and after KD
with the mask fixed) on the Fashion-MNIST reference, and what sparse weights buy on this CPU.

    python scripts/bench_sparsify.py --track accuracy            # needs the reference model
    python scripts/bench_sparsify.py --track speed --runs 100    # DeiT-S shapes, kernels and runtimes
    python scripts/bench_sparsify.py --track parity              # DeiT-S/B: 2:4 OBS, export, parity
    python scripts/bench_sparsify.py --track tensorrt            # GPU only: TensorRT 2:4 vs dense fp16
    python scripts/bench_sparsify.py --smoke                     # tiny, for the test suite

Accuracy track: the reference ViT (scripts/train_reference.py); every attention (qkv, proj) and MLP
(fc1, fc2) linear sparsified post-training (128-column lazy blocks, sequential calibration). OBS
settings (damping x calibration images, stratified from the training images) are chosen per variant
on a validation split of 5,000 other training images; the 10k test images are scored once, for the
chosen settings. `--kd` adds 2:4 + the prune-kd recipe's KD budget (3 epochs, batch
128, lr 1e-3, 0.5 labels + 0.5 soft KD at T=2, shift-flip; best weights on 10% of train held out)
with the mask fixed during training, run as a recipe through the pipeline.
Speed track: (1) one linear of each DeiT-S shape (197 tokens, batch 1): dense fp32 `F.linear` vs
torch's block-sparse BSR matmul at 16x16 and 32x32 blocks, 50% and 75% sparsity, interleaved rounds;
(2) the whole DeiT-S (random init, 224): dense vs 2:4, ONNX Runtime fp32 and OpenVINO INT8 (ORT static
QDQ read by OpenVINO) with and without OpenVINO's sparse-weights decompression
(CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE); (3) sizes on disk: safetensors, ONNX, both deflated (zip),
and the sparse encoding of the sparsified layers.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import benchlib

from vitcompress.data import DataSpec, load_dataset
from vitcompress.models import ModelRef, load_model
from vitcompress.passes.export import ExportConfig, export_model
from vitcompress.passes.sparsify.config import SparsifyConfig
from vitcompress.passes.sparsify.engine import sparsify_model

ACCURACY_VARIANTS = [  # (label, config)
    ("2:4 magnitude", {"pattern": "2:4", "method": "magnitude"}),
    ("2:4 obs", {"pattern": "2:4", "method": "obs"}),
    ("block:16x16 50% magnitude", {"pattern": "block:16x16", "sparsity": 0.5, "method": "magnitude"}),
    ("block:16x16 50% obs", {"pattern": "block:16x16", "sparsity": 0.5, "method": "obs"}),
    (
        "block:16x16 50% magnitude, global",
        {"pattern": "block:16x16", "sparsity": 0.5, "method": "magnitude", "allocation": "global"},
    ),
    (
        "block:16x16 50% obs, global",
        {"pattern": "block:16x16", "sparsity": 0.5, "method": "obs", "allocation": "global"},
    ),
    ("block:1x8 50% magnitude", {"pattern": "block:1x8", "sparsity": 0.5, "method": "magnitude"}),
    ("block:1x8 50% obs", {"pattern": "block:1x8", "sparsity": 0.5, "method": "obs"}),
]


def accuracy_track(args: argparse.Namespace) -> list[dict]:
    """Each variant at the OBS settings (damping x calibration images) that score best on a validation
    split held out of the training images; the test split is scored once, for the chosen settings."""
    from vitcompress.data import holdout

    ref, source = benchlib.reference(args)
    base = load_model(ref)
    test = load_dataset(
        DataSpec(source=source, split="test", limit=args.eval_limit), base.input, base.num_classes
    )
    pool = load_dataset(
        DataSpec(source=source, split="train", limit=args.train_pool), base.input, base.num_classes
    )
    rest, val = holdout(pool, args.val_size, seed=1)
    calibrations = {n: holdout(rest, n, seed=2)[1] for n in args.calibrations}
    top1_0 = benchlib.top1(base, test)
    rows = [
        {
            "variant": "fp32 (dense)",
            "settings": "-",
            "sparsity": 0.0,
            "val_top1": benchlib.top1(base, val),
            "top1": top1_0,
            "drop_points": 0.0,
            "wall_s": 0.0,
        }
    ]
    variants = ACCURACY_VARIANTS
    if args.smoke:
        keep = ("2:4 magnitude", "2:4 obs", "block:16x16 50% obs, global")
        variants = [v for v in ACCURACY_VARIANTS if v[0] in keep]
    for label, settings in variants:
        grid = (
            [(d, n) for d in args.dampings for n in args.calibrations]
            if settings["method"] == "obs"
            else [(0.01, 0)]
        )
        best = None
        for damping, count in grid:
            loaded = load_model(ref)
            cfg = SparsifyConfig(
                **settings, damping=damping, batch_size=64, calibration_batches=max(1, -(-count // 64))
            )
            start = time.perf_counter()
            result = sparsify_model(loaded, cfg, calibrations[count] if cfg.needs_data() else None)
            wall = time.perf_counter() - start
            val_top1 = benchlib.top1(loaded, val)
            chosen = f"damping {damping:g}, {count} images" if cfg.needs_data() else "-"
            print(f"{label} ({chosen}): val {val_top1:.2%} ({wall:.1f} s)", file=sys.stderr)
            if best is None or val_top1 > best[0]:
                best = (val_top1, loaded, result, wall, chosen, damping, count)
        assert best is not None
        val_top1, loaded, result, wall, chosen, damping, count = best
        top1 = benchlib.top1(loaded, test)  # once, for the settings the validation split chose
        rows.append(
            {
                "variant": label,
                "settings": chosen,
                "damping": damping,
                "calibration": count,
                "sparsity": result.sparsity,
                "val_top1": val_top1,
                "top1": top1,
                "drop_points": 100 * (top1_0 - top1),
                "wall_s": wall,
            }
        )
        print(f"{label}: test {top1:.2%}", file=sys.stderr)
    return rows


KD_RECIPE = """\
version: 1
name: sparse-kd
model: {model}
run: {{threads: {threads}}}
data:
  train: {{source: {source}, split: train{train_limit}}}
  eval: {{source: {source}, split: test{eval_limit}}}
  calibration: {{source: {source}, split: train, limit: {calibration}}}
passes:
  - kind: sparsify
    pattern: "2:4"
    method: {method}
    damping: {damping}
    batch_size: 64
    calibration_batches: {batches}
  - kind: distill
    epochs: {epochs}
    batch_size: 128
    lr: 0.001
    hard_label: 0.5
    soft_kd: 0.5
    temperature: 2.0
    augment: shift-flip
    eval_every: 500
    eval_limit: 2000
"""


def kd_track(args: argparse.Namespace, workdir: Path, chosen: dict[str, dict]) -> list[dict]:
    """2:4 then the prune-kd recipe's KD budget with the mask fixed, as a recipe through the pipeline;
    OBS at the settings the accuracy track chose on its validation split (`chosen`: rows by variant)."""
    from vitcompress.models.artifact import load_artifact
    from vitcompress.passes.sparsify.select import sparse_layers
    from vitcompress.pipeline import run_recipe
    from vitcompress.recipe import parse_recipe

    ref, source = benchlib.reference(args)
    model = {
        "source": ref.source,
        "checkpoint": str(ref.checkpoint) if ref.checkpoint else None,
        "num_classes": ref.num_classes,
        "img_size": ref.img_size,
        "in_chans": ref.in_chans,
        "kwargs": ref.kwargs,
    }
    rows = []
    for method in args.kd_methods:
        row = chosen[f"2:4 {method}"]
        calibration = row["calibration"] or args.calibration
        text = KD_RECIPE.format(
            model=json.dumps(model),
            threads=args.threads,
            source=source,
            train_limit=", limit: 256" if args.smoke else "",
            eval_limit=f", limit: {args.eval_limit}" if args.eval_limit else "",
            calibration=calibration,
            method=method,
            damping=row["damping"],
            batches=max(1, -(-calibration // 64)),
            epochs=args.kd_epochs,
        )
        out = workdir / f"kd-{method}"
        start = time.perf_counter()
        result = run_recipe(parse_recipe(text, "sparse-kd"), out)
        record = next(r for r in result.ledger if r.kind == "distill")
        student = load_artifact(Path(str(record.artifact)))
        layers = sparse_layers(student.model)
        rows.append(
            {
                "variant": f"2:4 {method} + KD ({args.kd_epochs:g} epochs, mask fixed)",
                "settings": row["settings"] + " (as chosen above)" if method == "obs" else "-",
                "sparsity": sum(r.sparsity for r in layers) / len(layers),
                "pattern_holds": all(r.holds for r in layers),
                "top1": record.top1,
                "drop_points": 100 * (chosen["fp32 (dense)"]["top1"] - record.top1),
                "val_top1": record.details.get("val_top1"),
                "wall_s": time.perf_counter() - start,
            }
        )
        print(f"{rows[-1]['variant']}: {record.top1:.2%}", file=sys.stderr)
    return rows


def _median_ms(fn, runs: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - start) / runs * 1e3


def kernel_track(args: argparse.Namespace) -> list[dict]:
    """Dense F.linear vs BSR matmul per DeiT-S linear shape, interleaved: every round times each once."""
    import torch.nn.functional as F

    from vitcompress.passes.sparsify.config import parse_pattern
    from vitcompress.passes.sparsify.select import magnitude_mask

    shapes = {"qkv 384->1152": (1152, 384), "proj 384->384": (384, 384), "fc1 384->1536": (1536, 384),
              "fc2 1536->384": (384, 1536)}  # fmt: skip
    tokens = 197
    if args.smoke:
        shapes = {"fc1 64->256": (256, 64)}
        tokens = 17
    rows = []
    gen = torch.Generator().manual_seed(0)
    for label, (out_f, in_f) in shapes.items():
        x = torch.randn(tokens, in_f, generator=gen)
        weight = torch.randn(out_f, in_f, generator=gen)
        variants: dict[str, object] = {"dense": lambda w=weight, x=x: F.linear(x, w)}
        for block in (16, 32):
            for sparsity in (0.5, 0.75):
                sparse = weight * magnitude_mask(weight, parse_pattern(f"block:{block}x{block}"), sparsity)
                bsr = sparse.to_sparse_bsr((block, block))
                torch.testing.assert_close((bsr @ x.T).T, F.linear(x, sparse), atol=1e-3, rtol=1e-3)
                variants[f"BSR {block}x{block} {sparsity:.0%}"] = lambda b=bsr, x=x: b @ x.T
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()  # type: ignore[operator]
        for _ in range(max(3, args.runs // 10)):
            for name, fn in variants.items():
                times[name].append(_median_ms(fn, 10))
        dense = statistics.median(times["dense"])
        for name, values in times.items():
            p50 = statistics.median(values)
            rows.append({"shape": label, "variant": name, "p50_ms": p50, "speedup": dense / p50})
    return rows


def _onnx_zeros(path: Path) -> int:
    """Exact zeros among the 2-D float initializers (the linear weights) of an ONNX file."""
    import onnx
    from onnx import numpy_helper

    return sum(
        int((numpy_helper.to_array(t) == 0).sum())
        for t in onnx.load(str(path)).graph.initializer
        if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT
    )


def _deflated(path: Path) -> int:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        archive.write(path, path.name)
    return len(buffer.getvalue())


def _openvino_times(paths: dict[str, tuple[Path, float]], args: argparse.Namespace) -> dict[str, dict]:
    """OpenVINO CPU, batch 1, INFERENCE_NUM_THREADS fixed; every variant one block of runs per round."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    compiled = {}
    for name, (path, rate) in paths.items():
        config = {"INFERENCE_NUM_THREADS": args.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if rate < 1:
            config["CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE"] = rate
        compiled[name] = core.compile_model(core.read_model(str(path)), "CPU", config)
    shape = [1, *list(compiled[next(iter(compiled))].inputs[0].partial_shape.get_min_shape())[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    requests = {name: c.create_infer_request() for name, c in compiled.items()}
    samples: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(args.warmup):
        for request in requests.values():
            request.infer({0: x})
    for _ in range(max(3, args.runs // 10)):
        for name, request in requests.items():
            for _ in range(10):
                start = time.perf_counter()
                request.infer({0: x})
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"p50_ms": float(np.percentile(v, 50)), "p90_ms": float(np.percentile(v, 90))}
        for name, v in samples.items()
    }


def model_track(args: argparse.Namespace, workdir: Path) -> tuple[list[dict], list[dict]]:
    from safetensors.torch import save_file

    from vitcompress.passes.quantize import QuantizeConfig, quantize_model

    ref = benchlib.speed_model(args)
    files: dict[str, dict[str, Path]] = {}
    sizes = []
    for variant in ("dense", "2:4"):
        torch.manual_seed(0)
        loaded = load_model(ref)
        encoded = None
        if variant == "2:4":
            result = sparsify_model(loaded, SparsifyConfig(method="magnitude"))
            encoded = (result.dense_bytes, result.encoded_bytes)
        weights = workdir / f"{variant}.safetensors"
        save_file(
            {k: v.contiguous() for k, v in loaded.model.state_dict().items() if "sparsity_mask" not in k},
            str(weights),
        )
        exported = export_model(loaded, workdir / f"{variant}.onnx", ExportConfig())
        fp32 = exported.path
        zeros_onnx = _onnx_zeros(fp32)
        calibration = load_dataset(
            DataSpec(source="synthetic", num_samples=32), loaded.input, loaded.num_classes
        )
        int8 = workdir / f"{variant}.int8.onnx"
        quantize_model(
            fp32,
            int8,
            QuantizeConfig(mode="static", activation_type="uint8", weight_type="int8", calibration_size=16),
            calibration,
            threads=args.threads,
        )
        files[variant] = {"fp32": fp32, "int8": int8}
        sizes.append(
            {
                "variant": variant,
                "safetensors_mb": weights.stat().st_size / 1e6,
                "safetensors_zip_mb": _deflated(weights) / 1e6,
                "onnx_mb": fp32.stat().st_size / 1e6,
                "onnx_zip_mb": _deflated(fp32) / 1e6,
                "int8_onnx_zip_mb": _deflated(int8) / 1e6,
                "parity_max_abs_diff": exported.parity.max_abs_diff,
                "parity_top1_agreement": exported.parity.top1_agreement,
                "onnx_zero_weights": zeros_onnx,
                "sparse_layers_dense_mb": encoded[0] / 1e6 if encoded else None,
                "sparse_layers_encoded_mb": encoded[1] / 1e6 if encoded else None,
            }
        )
    timings = benchlib.time_variants([files["dense"]["fp32"], files["2:4"]["fp32"]], args)
    rows = [
        {"runtime": "ORT fp32", "variant": variant, **timing}
        for variant, timing in zip(("dense", "2:4"), timings, strict=True)
    ]
    ov_paths = {
        "dense": (files["dense"]["int8"], 1.0),
        "dense, sparse decompression on": (files["dense"]["int8"], 0.4),
        "2:4": (files["2:4"]["int8"], 1.0),
        "2:4, sparse decompression on": (files["2:4"]["int8"], 0.4),
    }
    ov_times = _openvino_times(ov_paths, args)
    base = ov_times["dense"]["p50_ms"]
    for name, timing in ov_times.items():
        rows.append(
            {"runtime": "OpenVINO INT8", "variant": name, **timing, "latency_ratio": timing["p50_ms"] / base}
        )
    return rows, sizes


def parity_track(args: argparse.Namespace, workdir: Path) -> list[dict]:
    """DeiT-S/B (random init): 2:4 OBS on synthetic calibration images, export, parity; wall times."""
    rows = []
    for name in args.parity_models:
        torch.manual_seed(0)
        loaded = load_model(ModelRef(f"timm:{name}", kwargs=json.loads(args.kwargs)))
        calibration = load_dataset(
            DataSpec(source="synthetic", num_samples=16), loaded.input, loaded.num_classes
        )
        start = time.perf_counter()
        result = sparsify_model(loaded, SparsifyConfig(batch_size=8, calibration_batches=2), calibration)
        wall = time.perf_counter() - start
        exported = export_model(loaded, workdir / f"{name}.onnx", ExportConfig())
        rows.append(
            {
                "model": name,
                "layers": len(result.layers),
                "sparsity": result.sparsity,
                "sparsify_s": wall,
                "onnx_zero_weights": _onnx_zeros(exported.path),
                "zeros": result.zeros,
                "parity_max_abs_diff": exported.parity.max_abs_diff,
                "parity_top1_agreement": exported.parity.top1_agreement,
            }
        )
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    return rows


def tensorrt_track(args: argparse.Namespace, workdir: Path) -> list[dict]:
    """GPU only: dense vs 2:4 engines (fp16 weights) with ONNX Runtime's TensorRT provider, one
    interleaved run; the 2:4 session is built with sparsity on (vitcompress.runtime). Here, without
    the provider, it stops with ProviderUnavailableError (exit 2) before building anything."""
    from vitcompress.passes.quantize import QuantizeConfig, quantize_model
    from vitcompress.runtime import Provider, require_provider
    from vitcompress.timing import bench_models

    require_provider(Provider.tensorrt)
    rows = []
    for name in args.parity_models:
        paths = []
        for variant in ("dense", "2:4"):
            torch.manual_seed(0)
            loaded = load_model(ModelRef(f"timm:{name}", kwargs=json.loads(args.kwargs)))
            if variant == "2:4":
                sparsify_model(
                    loaded, SparsifyConfig(method="magnitude")
                )  # speed does not depend on which zeros
            fp32 = export_model(loaded, workdir / f"{name}-{variant}.onnx", ExportConfig()).path
            fp16 = workdir / f"{name}-{variant}.fp16.onnx"
            quantize_model(fp32, fp16, QuantizeConfig(preset="gpu-fp16", verify_provider=False), None)
            paths.append(fp16)
        report = bench_models(paths, Provider.tensorrt, args.threads, [1, 32], args.warmup, args.runs)
        for batch in (1, 32):
            base = report.find(str(paths[0]), batch).p50_ms
            for variant, path in zip(("dense fp16", "2:4 fp16"), paths, strict=True):
                latency = report.find(str(path), batch)
                rows.append(
                    {
                        "model": name,
                        "variant": variant,
                        "batch": batch,
                        "p50_ms": latency.p50_ms,
                        "p90_ms": latency.p90_ms,
                        "speedup": base / latency.p50_ms,
                    }
                )
    return rows


def main() -> int:
    parser = benchlib.parser(__doc__)
    parser.add_argument(
        "--track", choices=["speed", "accuracy", "parity", "tensorrt", "both"], default="both"
    )
    parser.add_argument(
        "--parity-models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"]
    )
    parser.add_argument("--calibration", type=int, default=512, help="magnitude + KD: calibration images")
    parser.add_argument(
        "--calibrations", type=int, nargs="+", default=[512, 2048], help="OBS: calibration sizes tried"
    )
    parser.add_argument(
        "--dampings", type=float, nargs="+", default=[0.001, 0.01, 0.1], help="OBS: dampings tried"
    )
    parser.add_argument("--train-pool", type=int, default=12000, help="training images the splits come from")
    parser.add_argument("--val-size", type=int, default=5000, help="validation images (held out of the pool)")
    parser.add_argument("--kd", action="store_true", help="accuracy: also 2:4 + KD with the mask fixed")
    parser.add_argument("--kd-epochs", type=float, default=3.0)
    parser.add_argument("--kd-methods", nargs="+", default=["obs"], choices=["obs", "magnitude"])
    args = parser.parse_args()
    if args.smoke:
        args.calibration = min(args.calibration, 64)
        args.calibrations, args.dampings, args.train_pool, args.val_size = [64], [0.01], 300, 100
        args.kd_epochs = min(args.kd_epochs, 0.25)
    results = benchlib.start(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.track in ("accuracy", "both"):
            results["accuracy"] = accuracy_track(args)
            if args.kd:
                chosen = {r["variant"]: r for r in results["accuracy"]}
                results["accuracy"] += kd_track(args, Path(tmp), chosen)
            benchlib.table(
                "Post-training sparsity of every attention and MLP linear, top-1 on the test split",
                [
                    ("variant", lambda r: r["variant"]),
                    ("settings (chosen on val)", lambda r: r.get("settings", "-")),
                    ("sparsity", lambda r: f"{r['sparsity']:.1%}"),
                    ("val top-1", lambda r: f"{r['val_top1']:.2%}" if r.get("val_top1") is not None else "-"),
                    ("test top-1", lambda r: f"{r['top1']:.2%}"),
                    ("drop (points)", lambda r: f"{r['drop_points']:.2f}" if "drop_points" in r else "-"),
                    ("wall s", lambda r: f"{r['wall_s']:.1f}"),
                ],
                results["accuracy"],
            )
        if args.track == "tensorrt":
            results["tensorrt"] = tensorrt_track(args, Path(tmp))
            benchlib.table(
                "TensorRT (ONNX Runtime provider): dense fp16 vs 2:4 fp16 engines, interleaved",
                [
                    ("model", lambda r: r["model"]),
                    ("variant", lambda r: r["variant"]),
                    ("batch", lambda r: str(r["batch"])),
                    ("p50 ms", lambda r: f"{r['p50_ms']:.3f}"),
                    ("p90 ms", lambda r: f"{r['p90_ms']:.3f}"),
                    ("speed-up", lambda r: f"{r['speedup']:.2f}x"),
                ],
                results["tensorrt"],
            )
        if args.track == "parity":
            results["parity"] = parity_track(args, Path(tmp))
            benchlib.table(
                "2:4 OBS (synthetic calibration, random init), export, parity",
                [
                    ("model", lambda r: r["model"]),
                    ("layers", lambda r: str(r["layers"])),
                    ("sparsity", lambda r: f"{r['sparsity']:.1%}"),
                    ("sparsify s", lambda r: f"{r['sparsify_s']:.0f}"),
                    ("zeros in weights / in ONNX", lambda r: f"{r['zeros']:,} / {r['onnx_zero_weights']:,}"),
                    ("max abs diff", lambda r: f"{r['parity_max_abs_diff']:.1e}"),
                    ("top-1 agreement", lambda r: f"{r['parity_top1_agreement']:.0%}"),
                ],
                results["parity"],
            )
        if args.track in ("speed", "both"):
            results["kernels"] = kernel_track(args)
            benchlib.table(
                f"torch {torch.__version__} dense vs BSR matmul, fp32, {args.threads} threads, interleaved",
                [
                    ("layer", lambda r: r["shape"]),
                    ("variant", lambda r: r["variant"]),
                    ("p50 ms", lambda r: f"{r['p50_ms']:.3f}"),
                    ("speed-up vs dense", lambda r: f"{r['speedup']:.2f}x"),
                ],
                results["kernels"],
            )
            results["model"], results["sizes"] = model_track(args, Path(tmp))
            benchlib.table(
                f"{args.model}: dense vs 2:4, batch 1, {args.threads} threads, interleaved per runtime",
                [
                    ("runtime", lambda r: r["runtime"]),
                    ("variant", lambda r: r["variant"]),
                    ("p50 ms", lambda r: f"{r['p50_ms']:.2f}"),
                    ("p90 ms", lambda r: f"{r['p90_ms']:.2f}"),
                    ("latency ratio", lambda r: f"{r['latency_ratio']:.3f}"),
                ],
                results["model"],
            )
            benchlib.table(
                f"{args.model}: export parity and size on disk (MB)",
                [
                    ("variant", lambda r: r["variant"]),
                    (
                        "export parity max abs diff / top-1",
                        lambda r: f"{r['parity_max_abs_diff']:.1e} / {r['parity_top1_agreement']:.0%}",
                    ),
                    ("zero weights in ONNX", lambda r: f"{r['onnx_zero_weights']:,}"),
                    ("safetensors", lambda r: f"{r['safetensors_mb']:.1f}"),
                    ("safetensors zip", lambda r: f"{r['safetensors_zip_mb']:.1f}"),
                    ("ONNX fp32", lambda r: f"{r['onnx_mb']:.1f}"),
                    ("ONNX fp32 zip", lambda r: f"{r['onnx_zip_mb']:.1f}"),
                    ("ONNX int8 zip", lambda r: f"{r['int8_onnx_zip_mb']:.1f}"),
                    (
                        "sparse layers: dense / 2:4-encoded",
                        lambda r: (
                            f"{r['sparse_layers_dense_mb']:.1f} / {r['sparse_layers_encoded_mb']:.1f}"
                            if r["sparse_layers_dense_mb"]
                            else "-"
                        ),
                    ),
                ],
                results["sizes"],
            )
    return benchlib.finish(args, results)


if __name__ == "__main__":
    from vitcompress.errors import VitcompressError

    try:
        sys.exit(main())
    except VitcompressError as err:  # e.g. --track tensorrt without the TensorRT provider
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
