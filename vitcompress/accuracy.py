"""Accuracy of a model on a data split: top-1, top-5 and mean cross-entropy, in PyTorch or ONNX Runtime.

The same `Dataset` batches feed both runtimes, so a torch model and its ONNX export are compared on
exactly the same preprocessed inputs. An ONNX file exported by vitcompress carries its input spec
(size, interpolation, crop, pixel range, mean/std), class count and class names in its metadata;
that is what makes `eval model.onnx` preprocess the data the way the model expects.

`check_sanity` asks whether a score can be trusted as a reference before any gate compares against
it: a model scored near chance, inputs far from what its normalization produces, or the same images
scoring far better under another common preprocessing all mean the data is not fed the way the model
was trained, and a drop measured against such a baseline proves nothing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.errors import DataError, OnnxModelError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from vitcompress.choices import Provider
    from vitcompress.data import Dataset
    from vitcompress.models.loader import InputSpec, LoadedModel
    from vitcompress.runtimes import Precision, Runner, Runtime
    from vitcompress.state import EvalFn


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassScore:
    index: int
    name: str
    samples: int
    correct: int  # top-1 hits

    @property
    def top1(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "top1": self.top1}


@dataclass(frozen=True)
class EvalResult:
    model: str
    runtime: str
    data: str
    samples: int
    top1: float
    top5: float
    loss: float
    wall_s: float
    per_class: tuple[ClassScore, ...] = field(default=(), compare=False)
    # what ran it: runtime version, the precision it computed in, threads (files only)
    runtime_version: str = ""
    precision: str = ""
    threads: int | None = None
    # top-1 right or wrong, per sample in the data's order: what the sanity probe pairs against
    hits: tuple[bool, ...] = field(default=(), compare=False, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self, per_class: bool = False) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("per_class", "hits")}
        out["images_per_s"] = self.images_per_s
        if per_class:
            out["per_class"] = [c.to_dict() for c in self.per_class]
        return out


class _Tally:
    def __init__(self) -> None:
        import numpy as np

        self.n = self.top1 = self.top5 = 0
        self.loss = 0.0
        self.class_count = np.zeros(0, dtype=np.int64)  # per label: samples, top-1 hits
        self.class_hits = np.zeros(0, dtype=np.int64)
        self.hits: list[bool] = []

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        import numpy as np

        logits = logits.astype(np.float64)
        shifted = logits - logits.max(1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        self.loss += float(-log_probs[np.arange(len(labels)), labels].sum())
        k = min(5, logits.shape[1])
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        hit = top[:, 0] == labels
        self.top1 += int(hit.sum())
        self.hits.extend(bool(h) for h in hit)
        self.top5 += int((top == labels[:, None]).any(1).sum())
        self.n += len(labels)
        width = max(logits.shape[1], int(labels.max()) + 1 if len(labels) else 0, len(self.class_count))
        if width > len(self.class_count):
            self.class_count = np.pad(self.class_count, (0, width - len(self.class_count)))
            self.class_hits = np.pad(self.class_hits, (0, width - len(self.class_hits)))
        np.add.at(self.class_count, labels, 1)
        np.add.at(self.class_hits, labels[hit], 1)

    def per_class(self, names: Sequence[str]) -> tuple[ClassScore, ...]:
        return tuple(
            ClassScore(i, names[i] if i < len(names) else str(i), int(n), int(h))
            for i, (n, h) in enumerate(zip(self.class_count, self.class_hits, strict=True))
        )


# One evaluation protocol for every accuracy in a run (validate, the quantize gate, distillation's
# selection, `eval`): batches of this many images. Dynamic INT8 computes activation scales per
# batch, so the same file scored at batch 1 and at batch 256 gave two top-1s in one report
# (91.36% vs 91.64%) before everything used this one figure.
EVAL_BATCH_SIZE = 64


def _check_finite(logits: np.ndarray, label: str) -> None:
    import numpy as np

    if not np.isfinite(logits).all():
        raise OnnxModelError(f"{label} produced NaN/Inf logits on the evaluation data")


def evaluate_torch(
    loaded: LoadedModel,
    data: Dataset,
    batch_size: int = EVAL_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    import torch

    tally = _Tally()
    model = loaded.model
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for inputs, labels in data.batches(batch_size):
                logits = model(inputs).float().numpy()
                _check_finite(logits, loaded.label)
                tally.add(logits, labels.numpy())
                if on_batch:
                    on_batch(len(labels))
    finally:
        model.train(was_training)
    return _result(loaded.label, "pytorch", data, tally, time.perf_counter() - start)


def onnx_metadata(path: Path) -> dict[str, Any] | None:
    """The vitcompress metadata a model file carries: ONNX metadata_props, OpenVINO IR rt_info, the
    .ort format's custom metadata, or a TensorRT engine's sidecar .json."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".xml":
        from vitcompress.runtimes.openvino import model_metadata, read_model

        return model_metadata(read_model(path), path)
    if suffix in (".ort", ".engine", ".plan"):
        from vitcompress.runtimes import open_runner

        if suffix == ".ort":
            return open_runner(path).metadata()
        from vitcompress.runtimes.base import parse_metadata

        sidecar = Path(str(path) + ".json")
        meta = (parse_metadata(sidecar.read_text()) or {}).get("input") if sidecar.is_file() else None
        return dict(meta) if isinstance(meta, dict) else None
    import onnx

    from vitcompress.runtimes.base import METADATA_KEY

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return dict(json.loads(prop.value))
    return None


def onnx_classes(path: Path) -> tuple[str, ...] | None:
    """The class names an exported file records (the data's, when the run had named classes)."""
    meta = onnx_metadata(path)
    names = (meta or {}).get("classes")
    return tuple(str(n) for n in names) if isinstance(names, list) else None


def onnx_input_spec(path: Path) -> tuple[InputSpec, int]:
    from vitcompress.models.loader import InputSpec
    from vitcompress.runtime import check_input_dims, check_onnx_file

    if Path(path).suffix.lower() == ".onnx":
        check_onnx_file(path)  # a broken declared input shape is refused before any data is prepared for it
    meta = onnx_metadata(path)
    if meta is None:
        engine = Path(path).suffix.lower() in (".engine", ".plan")
        raise OnnxModelError(
            f"{path} has no vitcompress input metadata (mean/std, size, classes)"
            + (f": an engine keeps it in {Path(path).name}.json beside it" if engine else ""),
            hint="build engines with vitcompress convert --to tensorrt, which writes it"
            if engine
            else "export it with vitcompress export, or evaluate the PyTorch model it came from",
        )
    try:
        spec, classes = InputSpec.from_dict(meta["input"]), int(meta["num_classes"])
        dims: list[int | str | None] = [1, int(spec.channels), int(spec.height), int(spec.width)]
    except (KeyError, TypeError, ValueError) as err:
        raise OnnxModelError(
            f"{path} has unreadable vitcompress input metadata: {type(err).__name__}: {err}",
            hint="re-export it with vitcompress export",
        ) from err
    check_input_dims(path, "metadata input", dims, what="vitcompress metadata input")
    return spec, classes


def file_runner(
    path: Path,
    provider: Provider | None = None,
    threads: int | None = None,
    runtime: Runtime | None = None,
    precision: Precision | None = None,
) -> Runner:
    """A runner for a model file: ONNX Runtime with `provider` for .onnx/.ort, else the runtime its
    suffix (or `runtime`) names, with the precision hint where that runtime takes one."""
    from vitcompress.runtimes import Device, Runtime, open_runner, runtime_for
    from vitcompress.runtimes.ort import OrtRunner

    runtime = runtime or runtime_for(Path(path))
    if runtime is Runtime.ort:
        return OrtRunner(Path(path), threads=threads, provider=provider, precision=precision)
    device = Device.gpu if runtime is Runtime.tensorrt else Device.cpu
    return open_runner(Path(path), runtime, device=device, precision=precision, threads=threads)


def checked_score(value: object, label: str) -> float:
    """A caller's eval_fn result: a top-1 fraction in [0, 1], or an error that says what came back."""
    import numbers

    if isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0:
        return float(value)
    raise DataError(
        f"eval_fn returned {value!r} for {label}; it must return top-1 accuracy as a fraction in [0, 1]",
        hint="return correct / total (divide a percentage by 100)",
    )


def score_file(
    eval_fn: EvalFn,
    path: Path,
    provider: Provider | None = None,
    threads: int | None = None,
    runtime: Runtime | None = None,
    precision: Precision | None = None,
) -> float:
    """The caller's accuracy of a model file: `eval_fn` gets the file as a call from a batch of
    inputs (a torch tensor) to logits (a torch tensor), like the module it was exported from."""
    import torch

    runner = file_runner(path, provider, threads, runtime, precision)

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runner.run(inputs.detach().cpu().float().numpy()))

    return checked_score(eval_fn(predict), str(path))


def score_torch(eval_fn: EvalFn, model: torch.nn.Module, label: str) -> float:
    """The caller's accuracy of a PyTorch model, in eval mode and without gradients."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return checked_score(eval_fn(model), label)
    finally:
        model.train(was_training)


def evaluate_onnx(
    path: Path,
    data: Dataset,
    provider: Provider | None = None,
    threads: int | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
    runtime: Runtime | None = None,
    precision: Precision | None = None,
) -> EvalResult:
    """Score a model file (.onnx, .ort, OpenVINO .xml, TensorRT .engine) on `data`."""
    from dataclasses import replace

    runner = file_runner(path, provider, threads, runtime, precision)
    tally = _Tally()
    start = time.perf_counter()
    for inputs, labels in data.batches(batch_size):
        logits = runner.run(inputs.numpy())
        _check_finite(logits, str(path))
        tally.add(logits, labels.numpy())
        if on_batch:
            on_batch(len(labels))
    info = runner.info
    name = f"onnxruntime-{info.device}" if info.runtime == "ort" else f"{info.runtime}-{info.device}"
    result = _result(str(path), name, data, tally, time.perf_counter() - start)
    return replace(result, runtime_version=info.version, precision=info.precision, threads=info.threads)


def _result(model: str, runtime: str, data: Dataset, tally: _Tally, wall: float) -> EvalResult:
    return EvalResult(
        model=model,
        runtime=runtime,
        data=data.spec.describe(),
        samples=tally.n,
        top1=tally.top1 / max(1, tally.n),
        top5=tally.top5 / max(1, tally.n),
        loss=tally.loss / max(1, tally.n),
        wall_s=wall,
        per_class=tally.per_class(data.classes),
        hits=tuple(tally.hits),
    )


# --------------------------------------------------------------------------- sanity of a reference score

# A score near chance: not significantly above the most frequent class's share (one-sided binomial
# test at this level), or less than this fraction of the way from that share to 100%.
CHANCE_P_VALUE = 0.01
CHANCE_MIN_GAIN = 0.10
# Inputs after mean/std: whatever data a normalization was fitted to lands within a few units of 0
# with a spread of order 1 (digits on ImageNet's mean/std: mean -1.2, std 1.6). Outside these
# bounds the pixels are on another scale than the model's (0-255 fed as 0-1, or the reverse) or the
# images are blank.
STAT_MAX_ABS_MEAN = 3.0
STAT_MIN_STD = 0.05
STAT_MAX_STD = 5.0
# The probe: the same images under other common preprocessing; one that scores at least this much
# more top-1, by an exact sign test on the images the two disagree on, says the data is not fed the
# way the model was trained.
PROBE_IMAGES = 64
PROBE_MIN_GAIN = 0.10
PROBE_P_VALUE = 0.001
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact; n is an evaluation set's size)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


@dataclass(frozen=True)
class Candidate:
    """A common preprocessing the probe tries: pixel range, mean and std."""

    label: str
    input_range: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def probe_candidates(spec: InputSpec) -> list[Candidate]:
    """The usual ways ViTs are fed, for this channel count; the one in use is left out."""
    c = spec.channels

    def per_channel(values: tuple[float, ...]) -> tuple[float, ...]:
        return values if c == 3 else (sum(values) / len(values),) * c

    options = [
        Candidate("pixels in [0, 1] without mean/std", "0-1", (0.0,) * c, (1.0,) * c),
        Candidate("mean 0.5, std 0.5 (pixels in [-1, 1])", "0-1", (0.5,) * c, (0.5,) * c),
        Candidate("ImageNet mean/std", "0-1", per_channel(IMAGENET_MEAN), per_channel(IMAGENET_STD)),
        Candidate("pixels in [0, 255] without mean/std", "0-255", (0.0,) * c, (1.0,) * c),
    ]

    def same(a: Candidate) -> bool:
        return a.input_range == spec.input_range and all(
            math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-4)
            for x, y in zip((*a.mean, *a.std), (*spec.mean, *spec.std), strict=True)
        )

    return [o for o in options if not same(o)]


@dataclass(frozen=True)
class Sanity:
    """Whether a model's score on some data can be trusted as a reference, and why not."""

    model: str
    data: str
    preprocessing: str
    samples: int
    top1: float
    chance: float  # the most frequent class's share: what always answering it scores
    p_above_chance: float  # one-sided binomial p-value of top1 against chance
    input_mean: tuple[float, ...]  # per channel, of the preprocessed probe images
    input_std: tuple[float, ...]
    probe: tuple[dict[str, Any], ...]  # top-1 on the probe images under each preprocessing tried
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        return "; ".join(self.problems) if self.problems else "ok"


def check_sanity(
    predict: Callable[[np.ndarray], np.ndarray],
    data: Dataset,
    result: EvalResult,
    label: str,
    probe_images: int = PROBE_IMAGES,
    batch_size: int = EVAL_BATCH_SIZE,
) -> Sanity:
    """Judge `result`: the score of `predict` (a batch -> logits function) on `data`.

    Three signs of a model fed data the way it was not trained, each with its threshold above:
    1. top-1 near chance;
    2. per-channel mean/std of the preprocessed inputs far from anything a normalization produces;
    3. another common preprocessing (pixels in [0, 1] unnormalized, mean/std 0.5, ImageNet's,
       pixels in [0, 255]) scoring significantly better on the same images. Only the candidates run
       the model again (on `probe_images` images, stratified): the preprocessing in use is paired
       with `result`'s own per-image hits, and a model that leaves no room for a 10-point gain on
       those images is not probed at all.
    """
    import numpy as np

    from vitcompress.data import describe_input, stratified

    spec = data.preprocess.spec
    problems: list[str] = []
    counts = np.bincount(data.labels)
    chance = float(counts.max() / counts.sum()) if counts.sum() else 0.0
    hits = round(result.top1 * result.samples)
    p_value = binomial_tail(hits, result.samples, chance)
    gain = (result.top1 - chance) / (1.0 - chance) if chance < 1.0 else 0.0
    if p_value >= CHANCE_P_VALUE or gain < CHANCE_MIN_GAIN:
        problems.append(
            f"top-1 {result.top1:.1%} on {result.samples} images is near chance ({chance:.1%}, the most "
            f"frequent class; binomial p = {p_value:.2g}, {max(gain, 0.0):.0%} of the way from chance to 100%)"
        )
    # the probe images, decoded once; mean/std are per-channel affine, so every candidate is
    # computed from them: back to pixels in [0, 1], then forward under the candidate
    count = min(probe_images, len(data))
    chosen = stratified(data.labels, count, 0)
    probe = data.subset(chosen, f"{data.raw.description}, sanity probe")
    xs, ys = [], []
    for x, y in probe.batches(batch_size):
        xs.append(x.numpy())
        ys.append(y.numpy())
    inputs, labels = np.concatenate(xs), np.concatenate(ys)
    mean = inputs.mean(axis=(0, 2, 3)).astype(np.float64)
    std = inputs.std(axis=(0, 2, 3)).astype(np.float64)
    for channel, (m, sd) in enumerate(zip(mean, std, strict=True)):
        if abs(m) > STAT_MAX_ABS_MEAN or not STAT_MIN_STD <= sd <= STAT_MAX_STD:
            problems.append(
                f"preprocessed inputs are off scale: channel {channel} has mean {m:+.3g} and std {sd:.3g} "
                f"(a normalization that fits the data gives |mean| <= {STAT_MAX_ABS_MEAN:g} and std in "
                f"[{STAT_MIN_STD:g}, {STAT_MAX_STD:g}])"
            )
            break

    def correct(batch: np.ndarray) -> np.ndarray:
        out = [
            predict(batch[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]
            for i in range(0, len(batch), batch_size)
        ]
        return np.concatenate(out)

    # paired with the evaluation's own per-image hits when it scored exactly these samples
    paired = len(result.hits) == len(data)
    used = np.asarray(result.hits, dtype=bool)[chosen] if paired else correct(inputs)
    tried: list[dict[str, Any]] = [{"preprocessing": "as used", "top1": float(used.mean())}]
    best: tuple[float, Candidate, float] | None = None
    if 1.0 - float(used.mean()) >= PROBE_MIN_GAIN:
        view = (1, -1, 1, 1)
        scale = 255.0 if spec.input_range == "0-255" else 1.0
        pixels = (
            inputs * np.asarray(spec.std, np.float32).reshape(view)
            + np.asarray(spec.mean, np.float32).reshape(view)
        ) / scale
        for cand in probe_candidates(spec):
            fed = (
                pixels * (255.0 if cand.input_range == "0-255" else 1.0)
                - np.asarray(cand.mean, np.float32).reshape(view)
            ) / np.asarray(cand.std, np.float32).reshape(view)
            ok = correct(fed.astype(np.float32))
            better, worse = int((ok & ~used).sum()), int((used & ~ok).sum())
            sign_p = binomial_tail(better, better + worse, 0.5)
            tried.append({"preprocessing": cand.label, "top1": float(ok.mean()), "sign_test_p": sign_p})
            lift = float(ok.mean() - used.mean())
            if lift >= PROBE_MIN_GAIN and sign_p < PROBE_P_VALUE and (best is None or lift > best[0]):
                best = (lift, cand, sign_p)
    if best is not None:
        lift, cand, sign_p = best
        problems.append(
            f"the same {count} images score {float(used.mean()) + lift:.1%} top-1 with {cand.label} but "
            f"{float(used.mean()):.1%} as preprocessed (pixels in [{spec.input_range.replace('-', ', ')}], "
            f"mean {_fmt(spec.mean)}, std {_fmt(spec.std)}; sign test p = {sign_p:.2g}): the data is not "
            "fed the way the model was trained; set mean/std/input_range on the data source "
            "(eval: --mean/--std/--input-range)"
        )
    return Sanity(
        model=label,
        data=result.data,
        preprocessing=describe_input(spec, whole=not data.lazy),
        samples=result.samples,
        top1=result.top1,
        chance=chance,
        p_above_chance=p_value,
        input_mean=tuple(float(v) for v in mean),
        input_std=tuple(float(v) for v in std),
        probe=tuple(tried),
        problems=tuple(problems),
    )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def warn_if_insane(sanity: Sanity) -> None:
    """Say it loudly: one warning per problem, naming the model and the data."""
    for problem in sanity.problems:
        log.warning("SANITY CHECK FAILED for %s on %s: %s", sanity.model, sanity.data, problem)


def sanity_onnx(
    path: Path,
    data: Dataset,
    result: EvalResult,
    provider: Provider | None = None,
    threads: int | None = None,
    label: str | None = None,
    runtime: Runtime | None = None,
    precision: Precision | None = None,
) -> Sanity:
    runner = file_runner(path, provider, threads, runtime, precision)
    return check_sanity(runner.run, data, result, label or str(path))


def sanity_torch(loaded: LoadedModel, data: Dataset, result: EvalResult) -> Sanity:
    import torch

    model = loaded.model
    was_training = model.training
    model.eval()

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch)).float().numpy()  # type: ignore[no-any-return]

    try:
        return check_sanity(predict, data, result, loaded.label)
    finally:
        model.train(was_training)
