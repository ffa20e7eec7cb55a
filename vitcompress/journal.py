"""What a run has finished, so that rerunning the same recipe into its directory starts after it.

After every pass the pipeline writes `OUT/.passes.json` (atomically): the ledger so far, which
artifact holds the current PyTorch model and the teacher, and the ONNX files made. A rerun of the
same recipe (the output directory's owner check guarantees the same resolved recipe) rebuilds that
state from those files and goes on with the next pass. Passes are seeded by their position, so the
result is the one an uninterrupted run gives. Anything missing on disk means no resume: the run
starts over rather than guess.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.fileio import write_json
from vitcompress.state import ModelState, Parity, PassRecord, RunSettings

if TYPE_CHECKING:
    from vitcompress.models.loader import LoadedModel, ModelRef

log = logging.getLogger(__name__)

JOURNAL_FILE = ".passes.json"
LOADED = "loaded"  # the teacher is the model as loaded


@dataclass
class Journal:
    path: Path
    model_artifact: str | None = None  # the artifact directory of the current model; None: as loaded
    teacher: str | None = None  # LOADED, an artifact directory, or None (no teacher kept)

    @classmethod
    def for_dir(cls, out_dir: Path) -> Journal:
        return cls(out_dir / JOURNAL_FILE)

    def start(self, state: ModelState) -> None:
        self.model_artifact, self.teacher = None, LOADED if state.teacher is not None else None

    def passed(self, done: int, state: ModelState, changed_model: bool, new_teacher: bool) -> None:
        """Record that the first `done` passes have finished, leaving `state`."""
        last = state.records[-1]
        if changed_model and last.artifact is None:  # the model exists in memory only: no resume
            self.path.unlink(missing_ok=True)
            return
        if changed_model:
            self.model_artifact = last.artifact
        if new_teacher:  # a pass made its model the teacher (distill's become_teacher)
            self.teacher = last.artifact if state.teacher is not None else None
        write_json(
            self.path,
            {
                "done": done,
                "records": [r.to_dict() for r in state.records],
                "model_artifact": self.model_artifact,
                "teacher": self.teacher,
                "model_changed": state.model_changed,
                "onnx_path": str(state.onnx_path) if state.onnx_path else None,
                "baseline_onnx": str(state.baseline_onnx) if state.baseline_onnx else None,
            },
        )

    def restore(self, source: ModelRef, steps: int, settings: RunSettings) -> tuple[ModelState, int] | None:
        """The state after the passes an earlier run of this recipe finished, or None: `source` is the
        recipe's model, `steps` its number of passes."""
        try:
            data = json.loads(self.path.read_text())
            done = int(data["done"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        files = [data["model_artifact"], data["onnx_path"], data["baseline_onnx"]]
        if data["teacher"] not in (None, LOADED):
            files.append(data["teacher"])
        if not 0 < done <= steps or any(f is not None and not Path(f).exists() for f in files):
            return None
        from vitcompress.models.artifact import load_artifact

        model = (
            load_artifact(Path(data["model_artifact"])) if data["model_artifact"] else self._as_loaded(source, settings.seed)
        )
        teacher: LoadedModel | None = None
        if data["teacher"] == LOADED:
            teacher = self._as_loaded(source, settings.seed)
        elif data["teacher"] is not None:
            teacher = load_artifact(Path(data["teacher"]))
        self.model_artifact, self.teacher = data["model_artifact"], data["teacher"]
        records = tuple(_record(r) for r in data["records"])
        # models edited in place keep the name they were loaded under (it goes into the ONNX metadata)
        label = str(records[0].details.get("source", model.label))
        for reloaded in (model, teacher):
            if reloaded is not None:
                reloaded.label = label
        log.info(
            "%s: passes 1-%d of this recipe finished earlier; going on from there", settings.out_dir, done
        )
        state = ModelState(
            model=model,
            settings=settings,
            records=records,
            onnx_path=Path(data["onnx_path"]) if data["onnx_path"] else None,
            baseline_onnx=Path(data["baseline_onnx"]) if data["baseline_onnx"] else None,
            teacher=teacher,
            model_changed=bool(data["model_changed"]),
        )
        return state, done

    @staticmethod
    def _as_loaded(source: ModelRef, seed: int) -> LoadedModel:
        from vitcompress.models import load_model
        from vitcompress.state import seed_everything

        seed_everything(seed)  # what the first run drew a random-init model with
        return load_model(source)


def _record(data: dict[str, Any]) -> PassRecord:
    parity = data.get("parity")
    record = PassRecord(**{**data, "parity": None})
    return replace(record, parity=Parity(**parity)) if parity else record
