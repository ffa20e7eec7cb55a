"""Latency measurement on every runtime (ONNX Runtime, OpenVINO, TensorRT), done the way a deployment
gate needs it.

Several models, or one model on several runtimes, are measured interleaved in one run (round-robin, rotating which goes first) so that
noise from a shared machine falls on all of them alike; the first model is the baseline every ratio
is taken against. Warm-up runs are excluded; the thread count is fixed and recorded together with
the CPU model, its ISA flags (AVX-512 VNNI, AMX) and the library versions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcompress.budgets import latency_failures
from vitcompress.errors import BudgetExceededError, OnnxModelError
from vitcompress.runtime import OnnxRunner, Provider

if TYPE_CHECKING:
    from vitcompress.runtimes import Precision, Runner, Runtime

log = logging.getLogger(__name__)

ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
)


@dataclass(frozen=True)
class Environment:
    cpu_model: str
    cpu_count: int
    isa: dict[str, bool]
    machine: str
    versions: dict[str, str]

    @classmethod
    def detect(cls) -> Environment:
        import onnx
        import onnxruntime

        model, flags = platform.processor() or "unknown", set()
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    if key in ("model name", "hardware") and model in ("unknown", "", platform.machine()):
                        model = value.strip()
                    elif key in ("flags", "features"):
                        flags.update(value.split())
        except OSError:
            pass
        versions = {
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
        }
        try:
            from importlib.metadata import version

            versions["vitcompress"] = version("vitcompress")
        except Exception:
            pass
        return cls(
            cpu_model=model,
            cpu_count=os.cpu_count() or 1,
            isa={flag: flag in flags for flag in ISA_FLAGS},
            machine=platform.machine(),
            versions=versions,
        )

    def isa_summary(self) -> str:
        return " ".join(flag for flag, present in self.isa.items() if present) or "none detected"


@dataclass(frozen=True)
class Latency:
    model: str
    batch_size: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_ips: float  # images per second at the median latency
    speedup_vs_first: float  # first model's p50 / this p50, at the same batch size
    runtime: str = "ort"  # what ran it (vitcompress.runtimes), its version, precision and threads
    runtime_version: str = ""
    precision: str = ""
    threads: int | None = None


@dataclass(frozen=True)
class BenchSettings:
    provider: str
    threads: int
    batch_sizes: tuple[int, ...]
    warmup: int
    runs: int
    block: int = 1  # consecutive timed runs per model before switching (1: strict round-robin)
    precision: str | None = None  # the precision hint given to runtimes that take one (OpenVINO)


@dataclass(frozen=True)
class BenchReport:
    environment: Environment
    settings: BenchSettings
    results: list[Latency] = field(default_factory=list)
    noisy: bool = False  # the measurement itself looks disturbed (see noise_reasons)
    noise_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def find(self, model: str, batch_size: int, runtime: str | None = None) -> Latency:
        return next(
            r
            for r in self.results
            if r.model == model and r.batch_size == batch_size and runtime in (None, r.runtime)
        )


def _input_for(runner: OnnxRunner | Runner, batch_size: int, seed: int) -> np.ndarray:
    dims = runner.input_shape
    if isinstance(dims[0], int) and dims[0] != batch_size:
        raise OnnxModelError(
            f"{runner.path.name} has a fixed batch size of {dims[0]}, cannot bench batch {batch_size}",
            hint="export with a dynamic batch axis (vitcompress export does) or bench at that batch size",
        )
    shape = [batch_size] + [d if isinstance(d, int) else 1 for d in dims[1:]]
    return np.random.default_rng(seed).standard_normal(shape).astype(runner.input_dtype)


# Pause before each turn of an interleaved run (see time_interleaved); VITCOMPRESS_SETTLE_S overrides
# it (0 turns it off: faster, for runs whose timings nobody reads, such as the test suite)
SETTLE_S = 0.2


def settle_seconds() -> float:
    import os

    value = os.environ.get("VITCOMPRESS_SETTLE_S")
    if value is None:
        return SETTLE_S
    try:
        return max(0.0, float(value))
    except ValueError:
        log.warning("VITCOMPRESS_SETTLE_S=%r is not a number of seconds: using %s", value, SETTLE_S)
        return SETTLE_S


def time_interleaved(
    calls: Sequence[Callable[[], object]],
    warmup: int,
    runs: int,
    on_step: Callable[[int], None] | None = None,
    block: int = 1,
    settle_s: float | None = None,
) -> list[list[float]]:
    """Milliseconds per call: warm-up excluded, then models take turns with a rotating first position.

    With block > 1 each turn is one untimed call (the caches refill after the switch) and then up to
    `block` timed calls in a row: noise still falls on every model alike, but each is timed warm, as
    a deployed model serving requests back to back is. Strict round-robin (block 1) evicts each
    model's weights between calls and measured DeiT-S about 1.8x slower than it runs alone.

    Before each turn of an interleaved run (block > 1) the caller sleeps `settle_s` (default: settle_seconds()): a runtime's
    worker threads keep spinning for a while after their session's last call, and on a 2-core machine
    they steal the cores of the next session. Measured on DeiT-S (ORT, 2 threads, default spinning,
    8 sessions taking turns): one-block graphs read 9.1-9.9 ms with no pause or 10 ms, 5.6-6.8 ms
    with 50 ms and 5.6 ms with 200 ms, against 5.1-5.3 ms alone.
    """
    settle = settle_seconds() if settle_s is None else settle_s
    for call in calls:
        for _ in range(warmup):
            call()
        if on_step:
            on_step(warmup)
    times: list[list[float]] = [[] for _ in calls]
    done, turn = 0, 0
    while done < runs:
        count = min(block, runs - done)
        for j in [(turn + k) % len(calls) for k in range(len(calls))]:
            if settle > 0 and block > 1 and len(calls) > 1:
                time.sleep(settle)
            if block > 1:
                calls[j]()
            for _ in range(count):
                start = time.perf_counter()
                calls[j]()
                times[j].append((time.perf_counter() - start) * 1e3)
        done += count
        turn += 1
        if on_step:
            on_step(len(calls) * count)
    return times


def bench_entries(
    paths: Sequence[Path], runtimes: Sequence[Runtime] | None = None
) -> list[tuple[Path, Runtime]]:
    """What to time: each file on its own runtime (by suffix), or, with `runtimes`, each file on each
    of those runtimes that opens it (an .onnx file on ORT and OpenVINO); the first is the baseline."""
    from vitcompress.runtimes import RUNTIMES, runtime_for

    entries: list[tuple[Path, Runtime]] = []
    for path in map(Path, paths):
        if not runtimes:
            entries.append((path, runtime_for(path)))
            continue
        usable = [rt for rt in runtimes if path.suffix.lower() in RUNTIMES[rt].suffixes]
        if not usable:
            raise OnnxModelError(
                f"none of the runtimes asked for ({', '.join(rt.value for rt in runtimes)}) opens {path}",
                hint=f"{path.suffix} files run on {runtime_for(path).value}",
            )
        entries.extend((path, rt) for rt in usable)
    return entries


def open_bench_runner(
    path: Path, runtime: Runtime, provider: Provider, precision: Precision | None, threads: int
) -> Runner:
    """A runner for timing: ORT with the chosen execution provider, OpenVINO with the precision hint,
    TensorRT on the GPU. ORT and TensorRT run a file in its own precision."""
    from vitcompress.runtimes import Device, Runtime, open_runner
    from vitcompress.runtimes.ort import OrtRunner

    if runtime is Runtime.ort:
        return OrtRunner(path, threads=threads, provider=provider)
    hint = precision if runtime is Runtime.openvino else None
    device = Device.gpu if runtime is Runtime.tensorrt else Device.cpu
    return open_runner(path, runtime, device=device, precision=hint, threads=threads)


def bench_models(
    paths: Sequence[Path],
    provider: Provider = Provider.cpu,
    threads: int = 2,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 10,
    runs: int = 100,
    on_step: Callable[[int], None] | None = None,
    seed: int = 0,
    block: int = 10,
    runtimes: Sequence[Runtime] | None = None,
    precision: Precision | None = None,
    entries: Sequence[tuple[Path, Runtime]] | None = None,
) -> BenchReport:
    """Measure every model at every batch size, interleaved; on_step(n) reports progress in runs.

    Files of different runtimes (model.onnx, model.xml, model.engine) are timed in the same run;
    `runtimes` runs each file on several (see bench_entries). Every result names its runtime,
    runtime version, precision and threads. `entries` ((file, runtime) pairs) replaces paths/runtimes."""
    if not paths and not entries:
        raise OnnxModelError("no models to bench", hint="pass one or more .onnx, .xml or .engine files")
    entries = list(entries) if entries else bench_entries(paths, runtimes)
    runners = [open_bench_runner(p, rt, provider, precision, threads) for p, rt in entries]
    labels = [str(p) for p, _ in entries]
    results: list[Latency] = []
    for batch_size in batch_sizes:
        inputs = [_input_for(r, batch_size, seed) for r in runners]
        calls = [
            (lambda r=runner, x=batch: r.infer(x)) for runner, batch in zip(runners, inputs, strict=True)
        ]
        times = time_interleaved(calls, warmup, runs, on_step, block=block)
        first_p50 = float(np.percentile(times[0], 50))
        for label, runner, samples in zip(labels, runners, times, strict=True):
            ms = np.asarray(samples)
            p50 = float(np.percentile(ms, 50))
            results.append(
                Latency(
                    model=label,
                    batch_size=batch_size,
                    runs=runs,
                    p50_ms=p50,
                    p90_ms=float(np.percentile(ms, 90)),
                    p99_ms=float(np.percentile(ms, 99)),
                    mean_ms=float(ms.mean()),
                    min_ms=float(ms.min()),
                    throughput_ips=batch_size * 1e3 / p50,
                    speedup_vs_first=first_p50 / p50,
                    runtime=runner.info.runtime,
                    runtime_version=runner.info.version,
                    precision=runner.info.precision,
                    threads=runner.info.threads,
                )
            )
    settings = BenchSettings(
        provider.value,
        threads,
        tuple(batch_sizes),
        warmup,
        runs,
        block,
        precision.value if precision else None,
    )
    reasons = noise_reasons(results)
    for reason in reasons:
        log.warning("noisy measurement: %s", reason)
    return BenchReport(Environment.detect(), settings, results, bool(reasons), reasons)


def check_gate(
    latency: Latency, max_p50_ms: float | None, min_speedup: float | None, noise: Sequence[str] = ()
) -> None:
    """Raise BudgetExceededError (exit code 3) when a measured value is past its budget. `noise`
    (noise_reasons of the measurement) goes into the hint: a gate on a disturbed run may be wrong."""
    failures = latency_failures(latency.p50_ms, latency.speedup_vs_first, max_p50_ms, min_speedup)
    if failures:
        hint = (
            f"the measurement was noisy ({noise[0]}): rerun on a quiet machine before trusting this verdict"
            if noise
            else None
        )
        where = f"{latency.model} at batch {latency.batch_size}"
        raise BudgetExceededError(f"latency gate failed: {where}: " + "; ".join(failures), hint=hint)


# --------------------------------------------------------------------------- noise

MAX_TAIL_RATIO = 2.0  # p99 / p50 above this: something else took the CPU during the measurement
MIN_PEAK_FRACTION = 0.5  # a GEMM peak below this share of what the CPU surely reaches: disturbed


def noise_reasons(
    results: Sequence[Latency] = (),
    peak_gmacs: float | None = None,
    expected_gmacs: float | None = None,
    *,
    max_tail_ratio: float = MAX_TAIL_RATIO,
    min_peak_fraction: float = MIN_PEAK_FRACTION,
) -> list[str]:
    """Why a measurement looks disturbed, one sentence per sign; empty when it looks clean.

    Two signs: a latency tail (p99 over `max_tail_ratio` times p50: a model runs the same work every
    call, so a long tail is the machine, not the model), and a measured GEMM peak under
    `min_peak_fraction` of `expected_gmacs`, the least this CPU should reach (expected_gemm_peak)."""
    reasons = []
    for r in results:
        if r.p50_ms > 0 and r.p99_ms > max_tail_ratio * r.p50_ms:
            reasons.append(
                f"{Path(r.model).name} at batch {r.batch_size}: p99 {r.p99_ms:.2f} ms is "
                f"{r.p99_ms / r.p50_ms:.1f}x its p50 {r.p50_ms:.2f} ms (more than {max_tail_ratio:g}x)"
            )
    if peak_gmacs is not None and expected_gmacs and peak_gmacs < min_peak_fraction * expected_gmacs:
        reasons.append(
            f"the measured GEMM peak, {peak_gmacs:.0f} GMAC/s, is {peak_gmacs / expected_gmacs:.0%} of the "
            f"{expected_gmacs:.0f} GMAC/s this CPU reaches at least (under {min_peak_fraction:.0%}): "
            "other work shared the cores"
        )
    return reasons


# --------------------------------------------------------------------------- compute floor

INT8_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeLinear"}
)


def gemm_peak(precision: str, threads: int, size: int = 1024, runs: int = 30) -> float:
    """MACs per second this CPU reaches in ONNX Runtime on a large square GEMM: MatMul for fp32,
    MatMulInteger (u8 x s8, the kernel of ORT's int8 linear layers) for int8. The best of `runs`:
    the practical peak a model's MACs could run at, with the same thread count. On a shared machine
    a single measurement can come out low (fp32: 163 against 214-218 GMAC/s in other runs here), so
    callers that report against it should take the best of several."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if precision == "int8":
        op, a_type, out_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32
        weight = numpy_helper.from_array(rng.integers(-127, 127, (size, size)).astype(np.int8), "b")
        feed = rng.integers(0, 255, (size, size)).astype(np.uint8)
    elif precision == "fp32":
        op, a_type, out_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT
        weight = numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32), "b")
        feed = rng.standard_normal((size, size)).astype(np.float32)
    else:
        raise ValueError(f"no GEMM peak for precision {precision!r}; use fp32 or int8")
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])],
        f"gemm_{precision}",
        [helper.make_tensor_value_info("a", a_type, [size, size])],
        [helper.make_tensor_value_info("y", out_type, [size, size])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {"a": feed})
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"a": feed})
        best = min(best, time.perf_counter() - start)
    return size**3 / best


def _cpu_facts() -> tuple[float | None, int | None]:
    """(clock in MHz, physical cores) from /proc/cpuinfo; None where it does not say."""
    mhz: float | None = None
    cores: set[tuple[str, str]] = set()
    physical = core = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if key == "cpu mhz":
                    with contextlib.suppress(ValueError):
                        mhz = max(mhz or 0.0, float(value))
                elif key == "physical id":
                    physical = value
                elif key == "core id":
                    core = value
                elif not key and core:  # the blank line after each processor
                    cores.add((physical, core))
                    physical = core = ""
        if core:
            cores.add((physical, core))
    except OSError:
        return None, None
    return mhz or None, len(cores) or None


# MACs per cycle per core a GEMM surely reaches: one FMA unit of the widest vector width. Real cores
# often have two, and int8 dot-product instructions (VNNI, ARM dot product) do 4x the lanes; the
# expectation stays low on purpose, so only a clearly disturbed measurement falls below half of it.
def expected_gemm_peak(precision: str, threads: int, env: Environment | None = None) -> float | None:
    """The GEMM rate (GMAC/s) this CPU reaches at least with `threads` threads, from its clock,
    core count and ISA; None where /proc/cpuinfo does not give the clock or the ISA is unknown."""
    env = env or Environment.detect()
    mhz, physical = _cpu_facts()
    if mhz is None:
        return None
    isa = env.isa
    if isa.get("avx512f"):
        lanes = 16
    elif isa.get("avx2") and isa.get("fma"):
        lanes = 8
    elif isa.get("asimd"):
        lanes = 4
    else:
        return None
    if precision == "int8" and any(isa.get(f) for f in ("avx512_vnni", "avx_vnni", "asimddp", "i8mm")):
        lanes *= 2
    cores = min(threads, physical or env.cpu_count, env.cpu_count)
    return cores * lanes * mhz / 1e3


def model_precision(path: Path) -> str:
    """int8 when the graph holds integer-quantized ops (an OpenVINO IR: FakeQuantize), else fp32
    (fp16 files count as fp32 here)."""
    import onnx

    if Path(path).suffix.lower() == ".xml":
        from vitcompress.runtimes.openvino import is_int8, read_model

        return "int8" if is_int8(read_model(Path(path))) else "fp32"

    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    return "int8" if ops & INT8_OPS else "fp32"


@dataclass(frozen=True)
class ComputeFloor:
    macs: int
    precision: str
    peak_gmacs: float  # measured GEMM peak, GMAC/s
    floor_ms: float  # macs / peak: the time with every MAC at peak speed
    fraction: float  # floor_ms / p50: the share of the floor's speed the model runs at (<= 1)
    p50_ms: float | None = None
    expected_gmacs: float | None = None  # the least this CPU should reach (expected_gemm_peak)
    noisy: bool = False  # the peak measured far below expected_gmacs: the floor is too slow
    noise_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One sentence, the right way round: the model runs at N% of its floor's speed (the floor
        is the fastest it could run), e.g. "p50 0.33 ms runs at 27% of its compute floor (floor
        0.090 ms: 19.6 MMACs at 218 GMAC/s, this CPU's measured fp32 GEMM peak)"."""
        p50 = self.p50_ms if self.p50_ms is not None else self.floor_ms / self.fraction
        return (
            f"p50 {p50:.2f} ms runs at {self.fraction:.0%} of its compute floor (floor {self.floor_ms:.3f} ms: "
            f"{self.macs / 1e6:.1f} MMACs at {self.peak_gmacs:.0f} GMAC/s, this CPU's measured "
            f"{self.precision} GEMM peak)"
        )


def compute_floor(path: Path, macs: int, p50_ms: float, threads: int) -> ComputeFloor:
    precision = model_precision(path)
    peak = gemm_peak(precision, threads)
    expected = expected_gemm_peak(precision, threads)
    reasons = noise_reasons(peak_gmacs=peak / 1e9, expected_gmacs=expected)
    for reason in reasons:
        log.warning("noisy measurement: %s; the compute floor taken from it is too high", reason)
    floor_ms = macs / peak * 1e3
    return ComputeFloor(
        macs, precision, peak / 1e9, floor_ms, floor_ms / p50_ms, p50_ms, expected, bool(reasons), reasons
    )


# --------------------------------------------------------------------------- op profile


@dataclass(frozen=True)
class OpTime:
    op_type: str
    nodes: int  # distinct graph nodes of this type that ran
    ms_per_run: float
    share: float  # of the summed node time


def profile_ops(
    path: Path, provider: Provider = Provider.cpu, threads: int = 2, batch_size: int = 1, runs: int = 20
) -> list[OpTime]:
    """Where one inference spends its time, by ONNX Runtime kernel type (after ORT's own fusions,
    e.g. MatMulIntegerToFloat for a quantized linear layer), from ORT's built-in profiler."""
    import json
    import tempfile

    import onnxruntime as ort

    runner = OnnxRunner(Path(path), provider=provider, threads=threads)
    feed = {runner.input_name: _input_for(runner, batch_size, 0)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=runner.session.get_providers())
        for _ in range(3):  # warm-up, dropped below by run index
            session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    finished = 0  # ORT writes a run's node events before that run's model_run event
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            finished += 1
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time") or finished < 3:
            continue
        op = event.get("args", {}).get("op_name", "?")
        totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3
        nodes.setdefault(op, set()).add(event["name"])
    grand = sum(totals.values()) or 1.0
    return [
        OpTime(op, len(nodes[op]), total / runs, total / grand)
        for op, total in sorted(totals.items(), key=lambda kv: -kv[1])
    ]
