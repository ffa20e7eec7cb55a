"""A latency table: one model family measured on one target, cached, interpolated.

Key. A table holds for one model family (the architecture source, input shape, classes, embedding
width, token count and the widest block) on one target: the CPU model and its ISA flags, the runtime
and its version, the precision, the thread count and the batch size. All of it goes into the key and
into the file; a table whose key differs in any field is never used (`check_key` says which field).

Content. Times are medians in milliseconds of small exported graphs: `fixed_ms`, the model with no
block (patch embedding, tokens, final norm, head); `attn_ms[i][j]`, the model with one block of
`heads[i]` heads of size `head_dims[j]` and the smallest MLP of the grid; `mlp_ms[k]`, one block with
the smallest attention of the grid (one head of the smallest size) and MLP width `mlp[k]`. A block's
cost is the one-block graph minus `fixed_ms`, and attention and MLP costs add (they run one after
the other): block(h, d, m) = attn(h, d) + mlp(m) - corner - fixed, where the corner is the one-block
graph at the smallest grid point (`attn_ms[0][0]`). Between grid points the table interpolates
linearly (bilinear over heads x head size).

Why the smallest point is the reference (version 4). Versions 1-3 timed the attention grid with the
full MLP and the MLP row with full attention, so a small block was a small difference of large
graphs (DeiT-S: a block of one head of 16 and MLP 96 read 0.65 ms as 3.44 + 2.81 - 4.90 - 0.70), and
a few percent of noise on those graphs moved every small block of a plan the same way. The plans
`tune` makes at 4-8x keep one or two blocks large and the rest at one or two small heads and narrow
MLPs; one such table predicted them 10% low in the median and 30% at worst ("Uneven and small
plans" in BENCHMARKS.md). Now a small block is read from small graphs, and the grid reaches down
to head size 8 and 1/32 of the MLP, the smallest widths those plans use.

Factorized MLPs (the lowrank pass: fc1 C -> r -> m, fc2 m -> r -> C). `lowrank_ms[k]` is the one-block
graph with the smallest attention and full MLP width whose fc1 and fc2 are both factorized at rank
`lowrank_ranks[k]` (plain SVD). A factorized MLP is predicted as the plain MLP of equal MACs (width
m_eff = (MACs of fc1 + fc2 per token) / 2C, so r(C+m)/C when both are factorized) read from `mlp_ms`,
plus a per-factorized-layer overhead (the thin GEMMs and the extra tensor between them) fitted on
those probes: overhead(r) = (lowrank_ms at r - mlp graph at m_eff) / 2, linear in r between the
probes, constant beyond. Measured on DeiT-S ORT fp32 in BENCHMARKS.md ("Low-rank as a tune knob").

Calibration. Small graphs run hotter in the caches than a whole model and each pays the call
overhead once, so the sum of parts (`raw_ms`) is mapped to the whole model by a piecewise-linear map
through four whole models measured in the same profile: the original and three uniformly pruned
ones (half and a quarter of the heads and MLP, and every block at the grid's smallest shape). With
two anchors (original and half), models far below the half-size anchor were extrapolated and
over-predicted: DeiT-S at 1.6 heads / 400 MLP on average
was predicted 19.9 ms and measured 17.2 ms (+16%); `tune` for 6x landed 34% faster than asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vitcompress.errors import VitcompressError

TABLE_FORMAT = "vitcompress.latency-table"
# 2: four calibration anchors, piecewise calibration; 3: factorized-MLP probes; 4: the grid read from
# its smallest point (attention probes with the smallest MLP, MLP probes with the smallest attention)
TABLE_VERSION = 4

# runtime -> precisions a table can be measured in (what the probe graphs are converted to)
SUPPORTED: dict[str, tuple[str, ...]] = {
    "ort": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
}


class LatencyModelError(VitcompressError):
    """A latency table is missing, from another target, or cannot answer for a model."""


class TableFormatError(LatencyModelError):
    """A latency table written by another version of vitcompress (measured again when found in the cache)."""


def cache_root() -> Path:
    """$VITCOMPRESS_CACHE or ~/.cache/vitcompress: where reference models and latency tables live."""
    return Path(os.environ.get("VITCOMPRESS_CACHE") or Path.home() / ".cache" / "vitcompress")


@dataclass(frozen=True)
class TargetSpec:
    """What to measure on: runtime, precision, threads, batch (the device is this machine's CPU)."""

    runtime: str = "ort"
    precision: str = "fp32"
    threads: int = 2
    batch: int = 1

    def __post_init__(self) -> None:
        if self.runtime not in SUPPORTED:
            raise LatencyModelError(
                f"runtime {self.runtime!r} has no latency tables",
                hint=f"use one of {', '.join(SUPPORTED)} (TensorRT tables need a GPU and are not built yet)",
            )
        if self.precision not in SUPPORTED[self.runtime]:
            raise LatencyModelError(
                f"precision {self.precision!r} is not measured on {self.runtime}",
                hint=f"{self.runtime} tables: {', '.join(SUPPORTED[self.runtime])}",
            )
        if self.threads < 1 or self.batch < 1:
            raise LatencyModelError(f"threads and batch must be >= 1 (got {self.threads}, {self.batch})")

    def label(self) -> str:
        return f"{self.runtime} {self.precision}, {self.threads} threads, batch {self.batch}"


@dataclass(frozen=True)
class TableKey:
    family: dict[str, Any]  # source, input, classes, embed, tokens, widest block
    target: dict[str, Any]  # cpu, isa, runtime, runtime_version, precision, threads, batch

    def digest(self) -> str:
        text = json.dumps({"family": self.family, "target": self.target}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def stem(self) -> str:
        """The file name without digest: family slug and target, so mismatches can be found."""
        source = self.family["source"]
        name = source.get("name") or source.get("kind", "model")
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{name}-{self.family['embed']}x{self.family['depth']}")
        t = self.target
        return f"{slug}-{t['runtime']}-{t['precision']}-t{t['threads']}-b{t['batch']}"

    def path(self, root: Path | None = None) -> Path:
        return (root or cache_root()) / "latency" / f"{self.stem()}-{self.digest()}.json"


# ranks of a block's fc1 and fc2 (None: dense)
MlpRanks = tuple["int | None", "int | None"]


def _segment(xs: list[int] | list[float], x: float) -> int:
    """Index k of the segment xs[k]..xs[k+1] (sorted, at least two points) that x falls on; beyond
    the ends, the end segment."""
    k = 0
    while k < len(xs) - 2 and x > xs[k + 1]:
        k += 1
    return k


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise linear through the grid; beyond it, the nearest segment's line (never below 0)."""
    if len(xs) == 1:
        return ys[0]
    k = _segment(xs, x)
    x0, x1, y0, y1 = xs[k], xs[k + 1], ys[k], ys[k + 1]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class LatencyTable:
    key: TableKey
    heads: list[int]
    head_dims: list[int]
    attn_ms: list[list[float]]  # [heads][head_dims]: one-block graph, the smallest MLP of the grid
    mlp: list[int]
    mlp_ms: list[float]  # one-block graph, the smallest attention of the grid
    fixed_ms: float  # no-block graph
    calibration: list[tuple[float, float]] = field(default_factory=list)  # (raw, measured) anchor points
    anchors: list[dict[str, Any]] = field(default_factory=list)  # whole models measured: raw vs measured
    fast_multiple: int = 8  # MLP/head widths whose multiples the kernels run best (measured)
    lowrank_ranks: list[int] = field(default_factory=list)  # ranks of the factorized-MLP probes
    lowrank_ms: list[float] = field(default_factory=list)  # smallest attention, full MLP at that rank
    profile_s: float = 0.0
    created: str = ""

    # ------------------------------------------------------------------ prediction
    def block_ms(self, heads: int, head_dim: int, mlp: int, ranks: MlpRanks | None = None) -> float:
        """One block's raw cost (one-block graph minus the fixed parts); `ranks`: its MLP factorized."""
        by_heads = [_interp(self.head_dims, row, head_dim) for row in self.attn_ms]
        attn = _interp(self.heads, by_heads, heads)
        return attn + self.mlp_graph_ms(mlp, ranks) - self.attn_ms[0][0] - self.fixed_ms

    def mlp_graph_ms(self, mlp: int, ranks: MlpRanks | None = None) -> float:
        """The one-block graph with full attention and this MLP (factorized at `ranks`: see the module
        docstring)."""
        if ranks is None or ranks == (None, None):
            return _interp(self.mlp, self.mlp_ms, mlp)
        if not self.lowrank_ranks:
            raise LatencyModelError(
                "this latency table has no factorized-MLP probes",
                hint="profile the target again: vitcompress target profile MODEL --force",
            )
        embed = int(self.key.family["embed"])
        macs = sum(embed * mlp if r is None else r * (embed + mlp) for r in ranks)
        overhead = sum(self.factorization_ms(r) for r in ranks if r is not None)
        return _interp(self.mlp, self.mlp_ms, macs / (2 * embed)) + overhead

    def factorization_ms(self, rank: int) -> float:
        """What factorizing one MLP linear at `rank` costs beyond a plain MLP of the same MACs."""
        embed, full = int(self.key.family["embed"]), self.mlp[-1]
        overheads = [
            (ms - _interp(self.mlp, self.mlp_ms, r * (embed + full) / embed)) / 2
            for r, ms in zip(self.lowrank_ranks, self.lowrank_ms, strict=True)
        ]
        if len(overheads) == 1:
            return overheads[0]
        # linear in the rank between the probes, constant beyond them (may be negative: not clamped)
        ranks = self.lowrank_ranks
        rank = min(max(rank, ranks[0]), ranks[-1])
        k = _segment(ranks, rank)
        (r0, r1), (o0, o1) = ranks[k : k + 2], overheads[k : k + 2]
        return o0 + (o1 - o0) * (rank - r0) / (r1 - r0)

    def raw_ms(self, blocks: list[tuple[int, int, int]], ranks: list[MlpRanks] | None = None) -> float:
        per_block: list[MlpRanks | None] = list(ranks) if ranks else [None] * len(blocks)
        return self.fixed_ms + sum(self.block_ms(*b, r) for b, r in zip(blocks, per_block, strict=True))

    def calibrated(self, raw: float) -> float:
        """A sum of parts mapped to a whole model's p50 (see the module docstring)."""
        return calibrate(self.calibration, raw)

    def predict_ms(self, blocks: list[tuple[int, int, int]], ranks: list[MlpRanks] | None = None) -> float:
        """Whole-model p50 for per-block (heads, head_dim, mlp) and MLP ranks: the calibrated sum of
        parts, never below the fixed parts alone (a negative calibration offset must not predict the
        impossible)."""
        return max(self.fixed_ms, self.calibrated(self.raw_ms(blocks, ranks)))

    def factorized(self, rank_fraction: float, round_to: int = 8) -> FactorizedMlpTable:
        """A view of this table for models whose MLPs the lowrank pass factorizes after pruning, at
        `rank_fraction` of each layer's full rank: what the latency-aware planner reads then."""
        data = {f.name: getattr(self, f.name) for f in fields(LatencyTable)}
        return FactorizedMlpTable(**data, rank_fraction=rank_fraction, round_to=round_to)

    def full_blocks(self) -> list[tuple[int, int, int]]:
        depth = int(self.key.family["depth"])
        return [(self.heads[-1], self.head_dims[-1], self.mlp[-1])] * depth

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["key"] = {"family": self.key.family, "target": self.key.target, "digest": self.key.digest()}
        return {"format": TABLE_FORMAT, "format_version": TABLE_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> LatencyTable:
        if data.get("format") != TABLE_FORMAT:
            raise LatencyModelError(f"{path} is not a vitcompress latency table")
        if int(data.get("format_version", 0)) != TABLE_VERSION:
            raise TableFormatError(
                f"{path} is a version-{data.get('format_version')} latency table; this vitcompress "
                f"reads version {TABLE_VERSION}",
                hint="profile the target again: vitcompress target profile MODEL",
            )
        raw = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        key = raw.pop("key")
        raw["calibration"] = [tuple(point) for point in raw.get("calibration", [])]
        return cls(key=TableKey(key["family"], key["target"]), **raw)

    def save(self, path: Path | None = None) -> Path:
        from vitcompress.fileio import write_json

        path = path or self.key.path()
        write_json(path, self.to_dict())
        return path


@dataclass
class FactorizedMlpTable(LatencyTable):
    """A table whose blocks' MLPs are factorized at `rank_fraction` of full rank (rounded to
    `round_to`), as `lowrank` with `rank_fraction` does it: a layer whose rank would not save MACs
    at its width stays dense. Not stored: `LatencyTable.factorized` makes it."""

    rank_fraction: float = 0.5
    round_to: int = 8

    def mlp_ranks(self, mlp: int) -> MlpRanks:
        """The ranks `lowrank` gives fc1 (C -> mlp) and fc2 (mlp -> C) at this MLP width."""
        from vitcompress.passes.lowrank.config import breakeven_rank
        from vitcompress.passes.lowrank.ranks import fraction_rank

        embed = int(self.key.family["embed"])
        rank = fraction_rank(mlp, embed, self.rank_fraction, self.round_to)
        kept = rank if rank < breakeven_rank(mlp, embed) else None  # the same for fc2 (embed x mlp)
        return kept, kept

    def block_ms(self, heads: int, head_dim: int, mlp: int, ranks: MlpRanks | None = None) -> float:
        if ranks is None or ranks == (None, None):  # a dense MLP here is one the pass will factorize
            ranks = self.mlp_ranks(mlp)
        return super().block_ms(heads, head_dim, mlp, ranks)


def calibrate(points: list[tuple[float, float]], raw: float) -> float:
    """Piecewise-linear map from a sum of parts to a whole model through (raw, measured) anchors,
    extended beyond the ends by the end segments. A segment whose slope noise made implausible
    (outside 0.3-3) is replaced by the ratio of its nearer anchor (a pure scale)."""
    pts = sorted(points)
    if not pts:
        return raw
    if len(pts) == 1:
        return raw * pts[0][1] / pts[0][0]
    k = _segment([r for r, _m in pts], raw)
    (r0, m0), (r1, m1) = pts[k], pts[k + 1]
    slope = (m1 - m0) / (r1 - r0) if r1 > r0 else 0.0
    if not 0.3 <= slope <= 3.0:
        r, m = (r0, m0) if abs(raw - r0) <= abs(raw - r1) else (r1, m1)
        return raw * m / r
    return m0 + slope * (raw - r0)


def load_table(path: Path) -> LatencyTable:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LatencyModelError(f"cannot read latency table {path}: {err}") from err
    return LatencyTable.from_dict(data, Path(path))


def check_key(table: LatencyTable, key: TableKey, where: Path | str) -> None:
    """Refuse a table measured for another family or target, naming every field that differs."""
    diffs = [
        f"{part}.{name}: table {theirs!r}, here {ours!r}"
        for part, mine, other in (
            ("family", key.family, table.key.family),
            ("target", key.target, table.key.target),
        )
        for name in sorted(set(mine) | set(other))
        if (ours := mine.get(name)) != (theirs := other.get(name))
    ]
    if diffs:
        raise LatencyModelError(
            f"latency table {where} was measured for another target or model ({'; '.join(diffs[:3])})",
            hint="a table is only valid where it was measured: profile this one with "
            "`vitcompress target profile MODEL` (same --runtime/--precision/--threads/--batch)",
        )


def find_table(key: TableKey, root: Path | None = None) -> LatencyTable | None:
    """The cached table for `key`, or None. Tables of the same model and target settings measured on
    another CPU or runtime version are reported (never used): the caller profiles anew."""
    import logging

    path = key.path(root)
    if path.is_file():
        try:
            table = load_table(path)
        except TableFormatError as err:
            logging.getLogger(__name__).warning("measuring again: %s", err.message)
            return None
        check_key(table, key, path)
        return table
    for other in sorted(path.parent.glob(f"{key.stem()}-*.json")):
        try:
            stale = load_table(other)
            check_key(stale, key, other)
        except LatencyModelError as err:
            logging.getLogger(__name__).warning("not used: %s", err.message)
    return None
