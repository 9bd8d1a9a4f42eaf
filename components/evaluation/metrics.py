"""Quick signal metrics shared by training snapshots and evaluation (BSSEval itself is museval's)."""
from __future__ import annotations

import numpy as np

EPS = 1e-8


def global_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Utterance-level SDR of the MDX challenges: 10 log10(sum s^2 / sum (s - s_hat)^2), whole signal."""
    reference = np.asarray(reference, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    if reference.shape != estimate.shape:
        raise ValueError(f"reference {reference.shape} and estimate {estimate.shape} differ in shape")
    signal = np.sum(reference ** 2)
    noise = np.sum((reference - estimate) ** 2)
    return float(10.0 * np.log10((signal + EPS) / (noise + EPS)))
