"""Measure a latency table on this machine: small exported graphs, timed interleaved.

Every probe is the model itself cut to zero or one block (the same patch embedding, tokens, norm and
head; the block shrunk to the probe's shape by the same surgery pruning uses), exported by the same
exporter and converted to the target's precision the same way a compressed model is (ORT INT8: the
static QDQ file of `vitcompress quantize`; OpenVINO INT8: NNCF). Factorized-MLP probes are the
one-block graph with the smallest attention and the full MLP, fc1 and fc2 factorized by the lowrank
pass itself (plain SVD; the weights do not matter for time). All probes and four whole models (the
original and three uniformly pruned ones, for the calibration) are then timed in one interleaved run, so the machine's noise falls on all of
them alike; the medians go into the table.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.latency.table import LatencyModelError, LatencyTable, TableKey, TargetSpec, find_table

if TYPE_CHECKING:
    from torch import nn

    from vitcompress.models.loader import LoadedModel
    from vitcompress.runtimes import Runner

log = logging.getLogger(__name__)

# Progress callback: (what is being done, steps done, steps in all)
Progress = Callable[[str, int, int], None]


def target_facts(spec: TargetSpec) -> dict[str, Any]:
    """The target half of a table key: this CPU, the runtime's version and the settings."""
    from vitcompress.runtimes import RUNTIMES, Runtime
    from vitcompress.timing import Environment

    env = Environment.detect()
    return {
        "cpu": env.cpu_model,
        "isa": env.isa_summary(),
        "runtime": spec.runtime,
        "runtime_version": RUNTIMES[Runtime(spec.runtime)].version(),
        "precision": spec.precision,
        "threads": spec.threads,
        "batch": spec.batch,
    }


def widest(loaded: LoadedModel) -> tuple[int, int, int]:
    blocks = loaded.adapter.blocks()
    return (
        max(b.attn.num_heads for b in blocks),
        max(b.attn.head_dim for b in blocks),
        max(b.mlp.hidden for b in blocks),
    )


def family_facts(loaded: LoadedModel) -> dict[str, Any]:
    """The model half of a table key: what the probes are cut from."""
    heads, head_dim, mlp = widest(loaded)
    source = dict(loaded.source)
    if isinstance(source.get("config"), dict):  # a Hugging Face folder: its place is not its architecture
        source["config"] = {k: v for k, v in source["config"].items() if k != "_name_or_path"}
    return {
        "source": source,
        "input": "x".join(str(s) for s in loaded.input.shape),
        "num_classes": loaded.num_classes,
        "embed": loaded.adapter.embed_dim,
        "tokens": loaded.adapter.num_tokens,
        "depth": len(loaded.adapter.blocks()),
        "heads": heads,
        "head_dim": head_dim,
        "mlp": mlp,
    }


def table_key(loaded: LoadedModel, spec: TargetSpec) -> TableKey:
    return TableKey(family_facts(loaded), target_facts(spec))


def _steps(full: int, fractions: tuple[float, ...], multiple: int) -> list[int]:
    out = {max(multiple, round(full * f / multiple) * multiple) for f in fractions}
    return sorted(w for w in out | {full} if w <= full)


def grid(loaded: LoadedModel) -> tuple[list[int], list[int], list[int]]:
    """Heads, head sizes and MLP widths the table measures: the ends of each range and a few points
    between (latency is close to linear in each between them; measured error in BENCHMARKS.md)."""
    heads, head_dim, mlp = widest(loaded)
    head_grid = sorted({1, -(-heads // 3), -(-2 * heads // 3), heads})
    # down to head size 8 and 1/32 of the MLP: `tune` at 4-8x plans blocks that small, and below the
    # grid a prediction extrapolates (DeiT-S: the grid stopped at head size 16 and MLP 96)
    dim_grid = _steps(head_dim, (0.125, 0.25, 0.5, 0.75), 8)
    mlp_grid = _steps(mlp, (0.03125, 0.0625, 0.25, 0.5, 0.75), 8)
    return head_grid, dim_grid, mlp_grid


# --------------------------------------------------------------------------- probe models


def _block_container(loaded: LoadedModel) -> tuple[nn.Module, str]:
    """The Sequential / ModuleList holding the blocks, and its attribute name in its parent."""
    from torch import nn

    first = loaded.adapter.blocks()[0].module
    for name, module in loaded.model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and any(c is first for c in module.children()):
            return module, name
    raise LatencyModelError(f"{loaded.label}: cannot find the list of transformer blocks to cut probes from")


def cut(loaded: LoadedModel, depth: int) -> LoadedModel:
    """A copy of the model keeping its first `depth` blocks (0: only the fixed parts)."""
    from torch import nn

    from vitcompress.models.adapters import adapter_for

    container, name = _block_container(loaded)
    blocks = list(container.children())[:depth]
    kept = nn.ModuleList(blocks) if isinstance(container, nn.ModuleList) else nn.Sequential(*blocks)
    # deep-copy the model without its blocks, then the kept blocks: never the whole model
    parent_name, _, child = name.rpartition(".")
    parent = loaded.model.get_submodule(parent_name) if parent_name else loaded.model
    setattr(parent, child, type(kept)())
    try:
        model = copy.deepcopy(loaded.model)
    finally:
        setattr(parent, child, container)
    new_parent = model.get_submodule(parent_name) if parent_name else model
    setattr(new_parent, child, copy.deepcopy(kept))
    adapter = adapter_for(model) if depth else loaded.adapter
    return replace(loaded, model=model, adapter=adapter, label=f"{loaded.label} ({depth} block probe)")


def shaped(one_block: LoadedModel, heads: int, head_dim: int, mlp: int) -> LoadedModel:
    """A copy of a one-block probe with its block cut to (heads, head_dim, mlp)."""
    return reshaped(one_block, [(heads, head_dim, mlp)])


def uniform(loaded: LoadedModel, heads: int, head_dim: int, mlp: int) -> LoadedModel:
    """A copy of the whole model with every block cut to one shape (a calibration anchor)."""
    return reshaped(loaded, [(heads, head_dim, mlp)] * len(loaded.adapter.blocks()))


def reshaped(loaded: LoadedModel, blocks: list[tuple[int, int, int]]) -> LoadedModel:
    """A copy of the whole model with block i cut to blocks[i] = (heads, head_dim, mlp)."""
    from vitcompress.passes.prune import Plan, _graph, apply_plan

    model = cut(loaded, len(loaded.adapter.blocks()))
    plan = Plan()
    for i, (b, (heads, head_dim, mlp)) in enumerate(zip(model.adapter.blocks(), blocks, strict=True)):
        h0, d0, m0 = b.attn.num_heads, b.attn.head_dim, b.mlp.hidden
        heads, head_dim = min(heads, h0), min(head_dim, d0)
        if (heads, head_dim) != (h0, d0):
            plan.attn_remove[i] = [
                h * d0 + c for h in range(h0) for c in range(d0) if h >= heads or c >= head_dim
            ]
            plan.heads[i] = (heads, head_dim)
        if mlp < m0:
            plan.mlp_remove[i] = list(range(mlp, m0))
    apply_plan(model, _graph(model), plan)
    return model


# --------------------------------------------------------------------------- files on the target


def target_file(loaded: LoadedModel, spec: TargetSpec, directory: Path, name: str) -> Path:
    """Export `loaded` and convert it to what the target runs: returns the file to time."""
    from vitcompress.passes.export import ExportConfig, export_model

    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / f"{name}.onnx"
    export_model(loaded, onnx_path, ExportConfig(parity_batch=2))
    if spec.precision != "int8":
        return onnx_path
    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.passes.quantize import QuantizeConfig

    # Latency does not depend on the calibration images: a few synthetic ones set the ranges.
    calibration = load_dataset(DataSpec(source="synthetic", num_samples=8), loaded.input, loaded.num_classes)
    if spec.runtime == "ort":
        from vitcompress.passes.quantize import quantize_file

        out = directory / f"{name}.int8.onnx"
        cfg = QuantizeConfig(preset="cpu-x86-vnni", mode="static", calibration_size=8)  # type: ignore[arg-type]
        quantize_file(onnx_path, out, cfg, calibration)
        return out
    from vitcompress.passes.quantize_openvino import nncf_quantize

    xml = directory / f"{name}.int8.xml"
    nncf_quantize(onnx_path, xml, QuantizeConfig(runtime="openvino", calibration_size=8), calibration, None)
    return xml


def open_target(path: Path, spec: TargetSpec) -> Runner:
    from vitcompress.runtime import Provider
    from vitcompress.runtimes import Precision, Runtime
    from vitcompress.timing import open_bench_runner

    hint = Precision(spec.precision) if spec.runtime == "openvino" and spec.precision != "int8" else None
    return open_bench_runner(path, Runtime(spec.runtime), Provider.cpu, hint, spec.threads)


def _timed_call(path: Path, spec: TargetSpec, seed: int = 0) -> Callable[[], object]:
    """One inference of `path` on the target, ready to time, in a session opened as `bench` and
    `validate` open theirs (ONNX Runtime with its default spinning workers): the table predicts what
    those measure.

    History: the first tables were timed with spinning off, because 27 probe sessions taking turns
    inflated one-block DeiT-S probes 2-3x (a session's workers kept spinning into the next one's
    turn). Spinning off made the probes slower than a deployed session instead (whole DeiT-S 55.2 ms
    against 51.9 ms; the 16-token reference 0.73 against 0.52 ms), and `tune` then overshot small
    models. `time_interleaved` now pauses before each turn until the last session's workers sleep."""
    from vitcompress.timing import _input_for

    runner = open_target(path, spec)
    batch = _input_for(runner, spec.batch, seed)
    return lambda: runner.infer(batch)


def time_files(
    paths: list[Path],
    spec: TargetSpec,
    runs: int,
    warmup: int = 5,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Median milliseconds of each file on the target, all timed in one interleaved run."""
    import numpy as np

    from vitcompress.timing import time_interleaved

    calls = [_timed_call(p, spec) for p in paths]
    times = time_interleaved(calls, warmup, runs, on_step, block=10)
    return [float(np.median(t)) for t in times]


# --------------------------------------------------------------------------- the profile


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    kind: str  # fixed | attn | mlp | lowrank | whole | width
    shape: tuple[int, int, int]  # (heads, head_dim, mlp) of the block (or every block of a whole model)
    rank: int = 0  # lowrank: the rank of fc1 and fc2


def probes(loaded: LoadedModel) -> list[ProbeSpec]:
    """What to time. The attention grid is timed with the smallest MLP, and the MLP row (with the
    factorized-MLP and width probes) with the smallest attention: a small block is then read from
    small graphs, not as a small difference of graphs carrying a full MLP or attention (see
    `LatencyTable`)."""
    heads, dims, mlps = grid(loaded)
    h0, d0, m0 = heads[-1], dims[-1], mlps[-1]
    h1, d1, m1 = heads[0], dims[0], mlps[0]  # the smallest grid point: the reference corner
    out = [ProbeSpec("fixed", "fixed", (0, 0, 0))]
    out += [ProbeSpec(f"attn-{h}x{d}", "attn", (h, d, m1)) for h in heads for d in dims]
    out += [ProbeSpec(f"mlp-{m}", "mlp", (h1, d1, m)) for m in mlps if m != m1]
    out += [ProbeSpec(f"lowrank-{r}", "lowrank", (h1, d1, m0), r) for r in lowrank_ranks(loaded)]
    # Width probe: MLP widths just below a multiple of 64, to learn which multiples the kernels favour
    base = max(64, (m0 // 2) // 64 * 64)
    out += [
        ProbeSpec(f"width-{base - k}", "width", (h1, d1, base - k)) for k in (0, 8, 16, 32) if base - k > 0
    ]
    half = (max(1, -(-h0 // 2)), d0, max(8, m0 // 2 // 8 * 8))
    quarter = (max(1, -(-h0 // 4)), d0, max(8, m0 // 4 // 8 * 8))
    floor = (heads[0], dims[0], mlps[0])  # the smallest grid point: no prediction extrapolates below it
    out += [
        ProbeSpec("whole", "whole", (h0, d0, m0)),
        ProbeSpec("whole-half", "whole", half),
        ProbeSpec("whole-quarter", "whole", quarter),
        ProbeSpec("whole-floor", "whole", floor),
    ]
    return out


def lowrank_ranks(loaded: LoadedModel) -> list[int]:
    """Ranks of the factorized-MLP probes: 1/8, 1/4 and 1/2 of the embedding width (multiples of 8),
    the range `rank_fraction` 0.25-0.5 covers on pruned MLPs; only ranks that save MACs."""
    from vitcompress.passes.lowrank.config import breakeven_rank

    embed, mlp = loaded.adapter.embed_dim, widest(loaded)[2]
    ranks = _steps(embed, (0.125, 0.25, 0.5), 8)
    return [r for r in ranks if r < breakeven_rank(mlp, embed)]


def factorized_probe(one_block: LoadedModel, shape: tuple[int, int, int], rank: int) -> LoadedModel:
    """A copy of a one-block probe cut to `shape` with its MLP's fc1 and fc2 factorized at `rank`
    (plain SVD)."""
    from vitcompress.passes.lowrank.config import LowRankConfig
    from vitcompress.passes.lowrank.run import factorize_model

    probe = shaped(one_block, *shape)
    factorize_model(probe, LowRankConfig(rank=rank, round_to=1))
    return probe


def monotone(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence (pool adjacent violators): a wider block is not faster,
    so a dip between grid points is timing noise, averaged out with its neighbours."""
    pools: list[list[float]] = []  # [sum, count]
    for v in values:
        pools.append([v, 1.0])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
            total, count = pools.pop()
            pools[-1][0] += total
            pools[-1][1] += count
    return [p[0] / p[1] for p in pools for _ in range(int(p[1]))]


def monotone_2d(rows: list[list[float]]) -> list[list[float]]:
    """Non-decreasing along both axes: rows (head sizes) first, then columns (heads)."""
    rows = [monotone(r) for r in rows]
    columns = [monotone([r[j] for r in rows]) for j in range(len(rows[0]))]
    return [[columns[j][i] for j in range(len(columns))] for i in range(len(rows))]


def _fast_multiple(width_ms: dict[int, float]) -> int:
    """8 unless widths off a multiple of 16 (or 32) ran slower than the wider multiple of 64."""
    if not width_ms:
        return 8
    base = max(width_ms)
    fast = 8
    for k in (8, 16):
        if base - k in width_ms and width_ms[base - k] > width_ms[base]:
            fast = 2 * k
    return fast


def profile_target(
    loaded: LoadedModel,
    spec: TargetSpec,
    runs: int = 100,
    on_progress: Progress | None = None,
    work_dir: Path | None = None,
) -> LatencyTable:
    """Build the latency table of `loaded`'s family on this machine for `spec` (not cached here)."""
    start = time.perf_counter()
    key = table_key(loaded, spec)
    plan = probes(loaded)
    total = len(plan) + 1
    progress = on_progress or (lambda _what, _done, _total: None)
    heads, dims, mlps = grid(loaded)
    one_block = cut(loaded, 1)
    with tempfile.TemporaryDirectory(prefix="vitcompress-profile-", dir=work_dir) as scratch:
        files: list[Path] = []
        for n, probe in enumerate(plan):
            progress(f"building {probe.name}", n, total)
            if probe.kind == "fixed":
                model = cut(loaded, 0)
            elif probe.kind == "whole":
                model = uniform(loaded, *probe.shape)
            elif probe.kind == "lowrank":
                model = factorized_probe(one_block, probe.shape, probe.rank)
            else:
                model = shaped(one_block, *probe.shape)
            model.model.eval()
            files.append(target_file(model, spec, Path(scratch) / probe.name, probe.name))
        progress("timing", len(plan), total)
        medians = time_files(files, spec, runs)
    by_name = {p.name: ms for p, ms in zip(plan, medians, strict=True)}
    m1 = mlps[0]
    attn = monotone_2d([[by_name[f"attn-{h}x{d}"] for d in dims] for h in heads])
    mlp_ms = monotone(
        [by_name[f"mlp-{m}"] if m != m1 else by_name[f"attn-{heads[0]}x{dims[0]}"] for m in mlps]
    )
    table = LatencyTable(
        key=key,
        heads=heads,
        head_dims=dims,
        attn_ms=attn,
        mlp=mlps,
        mlp_ms=mlp_ms,
        fixed_ms=by_name["fixed"],
        fast_multiple=_fast_multiple({p.shape[2]: by_name[p.name] for p in plan if p.kind == "width"}),
        lowrank_ranks=[p.rank for p in plan if p.kind == "lowrank"],
        lowrank_ms=monotone([by_name[p.name] for p in plan if p.kind == "lowrank"]),
    )
    depth = int(key.family["depth"])
    wholes = [p for p in plan if p.kind == "whole"]
    anchors: list[dict[str, Any]] = [
        {
            "name": p.name,
            "shape": list(p.shape),
            "raw_ms": table.raw_ms([p.shape] * depth),
            "measured_ms": by_name[p.name],
        }
        for p in wholes
    ]
    table.calibration = [(a["raw_ms"], a["measured_ms"]) for a in anchors]
    for p, a in zip(wholes, anchors, strict=True):
        a["predicted_ms"] = table.predict_ms([p.shape] * depth)
    table.anchors = anchors
    table.profile_s = time.perf_counter() - start
    table.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    progress("done", total, total)
    return table


def get_table(
    loaded: LoadedModel,
    spec: TargetSpec,
    on_progress: Progress | None = None,
    profile_if_missing: bool = True,
    path: Path | None = None,
) -> LatencyTable:
    """The cached table for this model family and target; measured now (and cached) when missing.

    `path`: a table file to use instead of the cache; it must match this model and target exactly."""
    from vitcompress.latency.table import check_key, load_table

    key = table_key(loaded, spec)
    if path is not None:
        table = load_table(path)
        check_key(table, key, path)
        return table
    cached = find_table(key)
    if cached is not None:
        return cached
    if not profile_if_missing:
        raise LatencyModelError(
            f"no latency table for {loaded.label} on {spec.label()} on this machine",
            hint="measure it once: vitcompress target profile MODEL (same runtime/precision/threads/batch)",
        )
    log.info("profiling %s on %s (once; cached at %s)", loaded.label, spec.label(), key.path())
    table = profile_target(loaded, spec, on_progress=on_progress)
    table.save()
    return table
