"""The quantize pass: choose the path (ONNX Runtime, OpenVINO, integer-only, auto) for the exported
file, write the result atomically, and report what it measured."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.passes.quantize.config import Calibration, Mode, QuantizeConfig
from vitcompress.passes.quantize.onnx import AUTO_SCRATCH, _quantize_one, agreement, refuse_integer_only_file

if TYPE_CHECKING:
    from vitcompress.data import Dataset
    from vitcompress.state import ModelState

log = logging.getLogger(__name__)


def quantize_model(
    source: Path,
    target: Path,
    cfg: QuantizeConfig,
    calibration: Dataset | None,
    eval_data: Dataset | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """Quantize `source` into `target` as `cfg` says: what the pass and the command both run.

    Every candidate is built and gated under a temporary name; `target` appears (one rename) only
    once the accuracy gate has decided, so a kill at any point never leaves an ungated model under
    the final name. Scratch that killed runs left beside `target` is removed first.
    """
    from vitcompress.fileio import atomic_path
    from vitcompress.rundir import clean_dead_scratch

    refuse_integer_only_file(cfg)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_dead_scratch(target.parent, target.name)
    if cfg.runtime == "openvino":  # an IR is two files: written together by the OpenVINO path itself
        from vitcompress.passes.quantize.openvino import quantize_openvino

        return quantize_openvino(source, target, cfg, calibration, eval_data, threads)
    with atomic_path(target) as staged:
        details = _quantize_staged(source, staged, cfg, calibration, eval_data, threads)
    from vitcompress.runtimes.ort import file_precision, version

    # what the result runs on (every record names runtime, version, precision, threads)
    details["runtime"] = {
        "runtime": "ort",
        "version": version(),
        "precision": file_precision(target).value,
        "threads": threads,
    }
    if cfg.ort_format:
        from dataclasses import asdict

        from vitcompress.runtimes.convert import Target, convert_model

        mobile = convert_model(target, Target.ort_mobile, target.with_suffix(".ort"))
        details["ort_mobile"] = {
            **{k: v for k, v in asdict(mobile).items() if k in ("parity", "size_bytes", "details")},
            "path": str(mobile.path),
        }
        log.info("wrote %s (ORT mobile format): %s", mobile.path.name, mobile.details.get("mobile_usability"))
    return details


def _quantize_staged(
    source: Path,
    target: Path,
    cfg: QuantizeConfig,
    calibration: Dataset | None,
    eval_data: Dataset | None,
    threads: int,
) -> dict[str, Any]:
    """quantize_model's work, into a staging path.

    In auto mode, static (calibrated QDQ) and dynamic INT8 are both built, each through the gate,
    and timed against each other on this machine (ONNX Runtime CPU, batch 1, interleaved); the
    faster one that holds max_top1_drop is kept (if neither holds it, the one with the smaller
    drop). Static needs one more kernel per linear layer than dynamic's fused quantize+matmul, so on
    small models the one-liner's graph can be the faster: auto never ships the slower of the two.
    """
    import os
    import tempfile

    from vitcompress.timing import bench_models

    if cfg.mode is not Mode.auto:
        return _quantize_one(source, target, cfg, calibration, eval_data)
    built: dict[Mode, tuple[Path, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f"{AUTO_SCRATCH}{os.getpid()}-") as scratch:
        for mode in (Mode.static, Mode.dynamic):
            path = Path(scratch) / f"{mode.value}.onnx"
            one = cfg.model_copy(update={"mode": mode})
            built[mode] = (
                path,
                _quantize_one(source, path, one, calibration if mode is Mode.static else None, eval_data),
            )
        report = bench_models([path for path, _ in built.values()], threads=threads, warmup=5, runs=30)
        p50 = {mode: report.find(str(path), 1).p50_ms for mode, (path, _) in built.items()}

        def preference(mode: Mode) -> tuple[bool, float]:
            gate = built[mode][1].get("gate")
            if gate is None or gate["met"]:
                return (False, p50[mode])
            return (True, gate["drop_points"])

        chosen = min(built, key=preference)
        os.replace(built[chosen][0], target)
    log.info(
        "auto: static %.3f ms, dynamic %.3f ms at batch 1 (%d threads): kept %s",
        p50[Mode.static],
        p50[Mode.dynamic],
        threads,
        chosen.value,
    )
    details = built[chosen][1]
    details["auto"] = {
        "chosen": chosen.value,
        "p50_ms": {m.value: t for m, t in p50.items()},
        "threads": threads,
    }
    return details


def _integer_only(
    state: ModelState, target: Path, cfg: QuantizeConfig, calibration: Dataset, eval_data: Dataset | None
) -> dict[str, Any]:
    """The integer-only model of the current PyTorch model, with the exported file's metadata; the
    accuracy gate measures it (there is no float to fall back to)."""
    from vitcompress.accuracy import onnx_metadata
    from vitcompress.passes.intonly.build import Finetune, quantize_integer_only

    assert state.onnx_path is not None
    if state.model_changed and state.records and state.records[-1].kind != "export":
        log.info("integer-only reads the current PyTorch model, as exported by the last export pass")
    percentile = cfg.percentile if cfg.calibration is Calibration.percentile else None
    finetune = None
    if cfg.finetune_steps:
        train = state.load_split("train", f"{cfg.step_name} (finetune_steps)")
        finetune = Finetune(train, cfg.finetune_steps, cfg.finetune_lr)
    details = quantize_integer_only(
        state.model, target, calibration, percentile, onnx_metadata(state.onnx_path), finetune
    )
    if cfg.max_top1_drop is not None and eval_data is not None:
        measured = agreement(state.onnx_path, target, eval_data)
        drop = 100 * (measured["float_top1"] - measured["quantized_top1"])
        details["agreement"] = measured
        details["gate"] = {
            "max_top1_drop": cfg.max_top1_drop,
            "drop_points": drop,
            "met": drop <= cfg.max_top1_drop,
            "kept_float": [],
            "models_tried": 1,
        }
    return details


def run(state: ModelState, cfg: QuantizeConfig) -> ModelState:
    from vitcompress.errors import RecipeError
    from vitcompress.runtime import onnx_size
    from vitcompress.state import Measured, Parity

    if state.onnx_path is None:
        raise RecipeError("quantize needs an ONNX model: put an export pass before it")
    calibration = None
    if cfg.needs_data():
        calibration = state.load_split(
            "calibration", f"{cfg.step_name} ({cfg.mode.value})", cfg.calibration_size
        )
    target = state.settings.out_dir / cfg.filename
    has_eval = state.data_spec("eval") is not None
    eval_data = None
    if cfg.max_top1_drop is not None:
        eval_data = state.load_split("eval", f"{cfg.step_name} (max_top1_drop)")
    if cfg.mode is Mode.integer_only:
        assert calibration is not None  # needs_data() loaded it
        details = _integer_only(state, target, cfg, calibration, eval_data)
    else:
        details = quantize_model(state.onnx_path, target, cfg, calibration, eval_data, state.settings.threads)
    gate = details.get("gate")
    if gate is not None and not gate["met"]:
        details["gate_failure"] = (
            f"{cfg.step_name}: top-1 drop {gate['drop_points']:.2f} points > max_top1_drop {cfg.max_top1_drop:g} "
            f"even with {len(gate['kept_float'])} layer(s) in float; the best model found is {target}"
        )
    measured = details.get("agreement")
    if measured is None and (has_eval or state.data_spec("calibration") is not None):
        check_data = state.load_split("eval" if has_eval else "calibration", cfg.step_name, 1000)
        measured = agreement(state.onnx_path, target, check_data)
    parity = None
    top1 = None
    if measured is not None:
        details["agreement"] = measured
        parity = Parity(
            measured["max_abs_diff"],
            0.0,
            measured["top1_agreement"],
            int(measured["samples"]),
            str(state.onnx_path),
        )
        if has_eval:
            top1 = measured["quantized_top1"]
    log.info("quantized %s: %s", target.name, details["quantized_counts"])
    last = state.records[-1] if state.records else None
    outcome = Measured(
        params=last.params if last else None,
        macs=last.macs if last else None,
        size_bytes=onnx_size(target),
        parity=parity,
        top1=top1,
        artifact=str(target),
        details={**details, "settings": cfg.model_dump(mode="json")},
    )
    return state.passed(cfg, outcome, onnx_path=target)
