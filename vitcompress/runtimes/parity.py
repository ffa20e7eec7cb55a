"""One parity gate for every runtime: a converted file must reproduce its reference on the same batch.

The tolerance depends on the precision the runtime computes in, and every check states the one it
used. fp32 is held to the ONNX export's gate (max |Δlogit| <= 1e-4 + 1e-4 * max|logit|, top-1
agreement 100%). bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4% per rounding, and a
transformer rounds at every matmul and LayerNorm), so it is held to 1e-2 + 5e-2 * max|logit| and
75% top-1 agreement on random images, whose logits are close to ties; fp16 (10 bits) to
1e-2 + 2e-2 * max|logit|; an int8 file run by another runtime than the one it was quantized
for, to 5e-2 + 1e-1 * max|logit| and 75%. Measured here: OpenVINO bf16 moved a tiny random ViT's logits by 1% of
their scale, fp32 by 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from vitcompress.errors import ParityError
from vitcompress.runtimes.base import Precision

if TYPE_CHECKING:
    import numpy as np

    from vitcompress.runtimes.base import Runner
    from vitcompress.state import Parity


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_top1_agreement: float

    def allowed(self, max_abs_reference: float) -> float:
        return self.atol + self.rtol * max_abs_reference

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TOLERANCES: dict[Precision, Tolerance] = {
    Precision.fp32: Tolerance(1e-4, 1e-4, 1.0),
    Precision.bf16: Tolerance(1e-2, 5e-2, 0.75),
    Precision.fp16: Tolerance(1e-2, 2e-2, 0.75),
    # the same int8 file on two runtimes: kernels round activations to the grid differently
    Precision.int8: Tolerance(5e-2, 1e-1, 0.75),
}


def tolerance_for(precision: str) -> Tolerance:
    """The tolerance of a precision as a runner records it ("bf16", "int8+bf16" counts as its float part)."""
    base = precision.split("+")[-1]
    return TOLERANCES[Precision(base)] if base in Precision.__members__ else TOLERANCES[Precision.fp32]


def measure(
    reference: Callable[[np.ndarray], np.ndarray], runner: Runner, images: np.ndarray, label: str
) -> Parity:
    import numpy as np

    from vitcompress.state import Parity

    expected = reference(images)
    got = runner.run(images)
    if got.shape != expected.shape:
        raise ParityError(
            f"{runner.path.name}: output shape {got.shape}, the reference gives {expected.shape}"
        )
    return Parity(
        max_abs_diff=float(np.abs(got - expected).max()),
        max_abs_reference=float(np.abs(expected).max()),
        top1_agreement=float((got.argmax(1) == expected.argmax(1)).mean()),
        batch=len(images),
        reference=label,
    )


def check(parity: Parity, tolerance: Tolerance, what: str, hint: str) -> None:
    """Raise ParityError (exit 4) past the tolerance, naming the measured and allowed values."""
    allowed = tolerance.allowed(parity.max_abs_reference)
    if parity.max_abs_diff > allowed or parity.top1_agreement < tolerance.min_top1_agreement:
        raise ParityError(
            f"{what} does not match {parity.reference} at batch {parity.batch}: max |Δlogit| "
            f"{parity.max_abs_diff:.3g} (allowed {allowed:.3g} = {tolerance.atol:g} + {tolerance.rtol:g} x "
            f"{parity.max_abs_reference:.3g}), top-1 agreement {parity.top1_agreement:.3f} (required "
            f"{tolerance.min_top1_agreement:.3f})",
            hint=hint,
        )


def report(parity: Parity, tolerance: Tolerance, info: dict[str, Any]) -> dict[str, Any]:
    """What a ledger entry records: the measurement, the tolerance it was held to, what ran it."""
    return {
        **asdict(parity),
        "allowed_max_abs_diff": tolerance.allowed(parity.max_abs_reference),
        "tolerance": tolerance.to_dict(),
        "runner": info,
    }
