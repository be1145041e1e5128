"""Figures over patients: a bootstrap interval for a mean, and two models compared patient by patient.

Patients are the unit: a test split of 20 patients is 20 samples, whatever its slice count, so every
interval here resamples patients. Two models are compared by their paired per-patient differences (the
same patients, each scored by both), which removes the patient-to-patient spread that dwarfs model
differences in a comparison of two means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

BOOTSTRAP_SAMPLES = 10_000
# scipy.stats.bootstrap's percentile method: defined for any sample, a constant one included (BCa is not),
# which paired differences of two nearly identical pipelines often are.
BOOTSTRAP_METHOD = "percentile"
BOOTSTRAP = f"scipy.stats.bootstrap, {BOOTSTRAP_METHOD} method, {BOOTSTRAP_SAMPLES:,} resamples of patients"


def bootstrap_interval(values: Sequence[float], level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean of ``values`` (one per patient): ``BOOTSTRAP``."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    if x.size == 1 or np.ptp(x) == 0:
        return float(x.mean()), float(x.mean())
    result = stats.bootstrap((x,), np.mean, confidence_level=level, n_resamples=samples,
                             method=BOOTSTRAP_METHOD, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def summary(per_patient: Mapping[str, float], level: float = 0.95) -> dict[str, Any]:
    """Mean, bootstrap interval, worst patient and count of a per-patient figure."""
    values = np.asarray(list(per_patient.values()), np.float64)
    low, high = bootstrap_interval(values, level)
    worst = min(per_patient, key=per_patient.__getitem__)
    return {"mean": float(values.mean()), "ci95": [low, high], "worst": float(per_patient[worst]),
            "worst_patient": worst, "patients": int(values.size)}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], level: float = 0.95) -> dict[str, Any]:
    """``a - b`` on the patients both scored: mean, bootstrap interval, and which is better.

    ``verdict`` is "a" or "b" only where the interval excludes 0, else "undecided": a mean gap inside the
    patients' own spread decides nothing.
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two models share no patient: a paired comparison needs the same patients")
    diff = np.asarray([a[p] - b[p] for p in common], np.float64)
    low, high = bootstrap_interval(diff, level)
    verdict = "a" if low > 0 else "b" if high < 0 else "undecided"
    return {"mean": float(diff.mean()), "ci95": [low, high], "patients": len(common),
            "a_better": int((diff > 0).sum()), "b_better": int((diff < 0).sum()), "verdict": verdict}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (nan for fewer than three pairs or a constant side)."""
    if len(x) < 3 or np.ptp(np.asarray(x, float)) == 0 or np.ptp(np.asarray(y, float)) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)
