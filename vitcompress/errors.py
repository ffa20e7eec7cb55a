"""Exception classes. Every message names what failed, the bad value and the fix.

The CLI turns these into a one-line error and a meaningful exit code:
2 for bad input (a user mistake), 3 for a failed budget gate, 4 for a failed verification
(export parity). Anything else is a bug and exits 1 with a hint to rerun with --debug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_BAD_INPUT = 2
EXIT_BUDGET = 3
EXIT_VERIFICATION = 4


class VitcompressError(Exception):
    """Base class of every error the user is meant to read."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ModelNotFoundError(VitcompressError):
    """An unknown model name, or a model reference that points nowhere."""


class UnsupportedModelError(VitcompressError):
    """A model that loads but is not a vision transformer family we have an adapter for."""


class CheckpointError(VitcompressError):
    """A checkpoint that is missing, corrupt, unsafe or does not fit the model."""


class RecipeError(VitcompressError):
    """A recipe that cannot be parsed or does not validate."""


class ExportError(VitcompressError):
    """The ONNX exporter failed or is not installed."""


class InputShapeError(VitcompressError):
    """Input of the wrong shape for the model."""


class OnnxModelError(VitcompressError):
    """An ONNX file that is unsafe, unreadable or invalid."""


class ProviderUnavailableError(VitcompressError):
    """An ONNX Runtime execution provider that this installation or machine does not have."""


class DataError(VitcompressError):
    """A data set that is missing, empty, corrupt, or does not fit the model."""


class PruneError(VitcompressError):
    """A pruning request that cannot be met on this model (zero heads left, unreachable target)."""


class OutputDirError(VitcompressError):
    """An output directory that is a file, not writable, in use by another run, or holds another run."""


class MissingDependencyError(VitcompressError):
    """An optional package that a feature needs is not installed."""


class QuantizeError(VitcompressError):
    """Quantization cannot run on this model or data, or produced nothing quantized."""


class ParityError(VitcompressError):
    """The exported model does not reproduce the PyTorch model."""

    exit_code = EXIT_VERIFICATION


class BudgetExceededError(VitcompressError):
    """A measured value is over the budget the user set (latency gate)."""

    exit_code = EXIT_BUDGET


class LowRankError(VitcompressError):
    """A factorization request that cannot be met (no layer matched, unreachable budget)."""


class TokensError(VitcompressError):
    """A token schedule the model cannot run (too many tokens removed, wrong length, bad family)."""


class SparsifyError(VitcompressError):
    """A sparsification request that cannot be met (no layer fits the pattern, missing data)."""


class IntegerOnlyError(VitcompressError):
    """An integer-only model cannot be built from this model or data (bad input: exit code 2)."""


class IntegerOnlyVerificationError(VitcompressError):
    """A graph claimed integer-only holds float math, or disagrees with the NumPy reference."""

    exit_code = 4  # a failed verification


class DistillError(VitcompressError):
    """Training cannot go on: NaN loss, mismatched teacher and student, a checkpoint from another run."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to a misspelt one, best first."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A hint sentence for an unknown name: the closest matches, or the valid names when few."""
    choices = sorted(set(choices))
    matches = closest(name, choices)
    if matches:
        return "did you mean " + " or ".join(repr(m) for m in matches) + "?"
    if len(choices) <= 12:
        return "valid: " + ", ".join(choices)
    return f"{len(choices)} valid names; none is close"


class RuntimeModelError(VitcompressError):
    """A model file a runtime cannot use: its weights missing, written by an incompatible version of
    the runtime, or built for another device."""


class PrecisionUnavailableError(VitcompressError):
    """An inference precision this device or runtime does not have (bf16 without AVX512_BF16/AMX)."""
