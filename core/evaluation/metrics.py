"""Segmentation metrics from DESIGN.md, vectorised over slices and patients.

All functions take label masks (N,H,W) uint8 (0/1, or 0..K for multi-class). The binary metrics use
the foreground (label > 0); multi-class adds a 3D Dice per class. Undefined means (no tumour slice for
``dice_tumour``, no empty slice for ``fp_slice_rate``) are NaN rather than a made-up number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_KEYS = ("dsc_volume", "dsc_volume_min", "dice_tumour", "dice_all", "iou", "fp_slice_rate")
# Which direction is better, for selection and early stopping.
MINIMISED = frozenset({"fp_slice_rate"})


def is_better(metric: str, value: float, best: float) -> bool:
    """True when ``value`` improves on ``best`` (NaN never improves)."""
    if value != value:  # NaN
        return False
    if best != best:
        return True
    return value < best if metric in MINIMISED else value > best


def worst_value(metric: str) -> float:
    return float("inf") if metric in MINIMISED else float("-inf")


def _flat(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(a.shape[0], -1)


def _slice_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice: foreground pixels in pred, in truth, and in both (int64)."""
    p, t = _flat(pred) > 0, _flat(truth) > 0
    return np.count_nonzero(p, axis=1), np.count_nonzero(t, axis=1), np.count_nonzero(p & t, axis=1)


def _dice(inter: np.ndarray, size_p: np.ndarray, size_t: np.ndarray) -> np.ndarray:
    denom = size_p + size_t
    # empty prediction on empty truth is a perfect answer, not 0/0
    return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), 1.0)


def per_slice_dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Foreground Dice of each (H,W) slice; 1.0 where both are empty."""
    if np.shape(pred) != np.shape(truth):
        raise ValueError(f"prediction shape {np.shape(pred)} != truth shape {np.shape(truth)}")
    sp, st, inter = _slice_counts(pred, truth)
    return _dice(inter, sp, st)


def _group(patients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, inverse = np.unique(np.asarray(patients).astype(str), return_inverse=True)
    return ids, inverse.ravel()


def _per_patient_counts(
    pred: np.ndarray, truth: np.ndarray, patients: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    sp, st, inter = _slice_counts(pred, truth)
    ids, inv = _group(patients)
    n = len(ids)
    return ids, *(np.bincount(inv, weights=v, minlength=n) for v in (sp, st, inter))


def per_patient_dice(pred: np.ndarray, truth: np.ndarray, patients: np.ndarray) -> dict[str, float]:
    """3D Dice of each patient's stack of slices; 1.0 for a tumour-free patient predicted empty."""
    ids, sp, st, inter = _per_patient_counts(pred, truth, patients)
    return {str(i): float(d) for i, d in zip(ids, _dice(inter, sp, st), strict=True)}


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """(truth, pred) pixel counts, shape (n_classes, n_classes), int64."""
    t = np.asarray(truth).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    if t.size and max(t.max(), p.max()) >= n_classes:
        raise ValueError(f"label {max(t.max(), p.max())} out of range for {n_classes} classes")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def segmentation_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    patients: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """All DESIGN.md metrics for one split.

    ``dsc_volume``: 3D Dice per patient, averaged over patients (``dsc_volume_min``: the worst patient's).
    ``dice_tumour``: mean slice Dice over
    slices with tumour in the truth. ``dice_all``: mean slice Dice over all slices (empty/empty = 1).
    ``iou``: 3D IoU per patient, averaged. ``fp_slice_rate``: share of tumour-free slices with any
    predicted foreground. With ``class_names`` of more than two entries (or labels > 1 in the data),
    ``dice_<name>`` holds each foreground class's 3D Dice averaged over patients.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    if len(patients) != pred.shape[0]:
        raise ValueError(f"{len(patients)} patient ids for {pred.shape[0]} slices")
    sp, st, inter = _slice_counts(pred, truth)
    slice_dice = _dice(inter, sp, st)
    ids, inv = _group(patients)
    psp, pst, pint = (np.bincount(inv, weights=v, minlength=len(ids)) for v in (sp, st, inter))
    union = psp + pst - pint
    tumour, empty = st > 0, st == 0
    patient_dice = _dice(pint, psp, pst)
    out = {
        "dsc_volume": _mean(patient_dice),
        "dsc_volume_min": float(patient_dice.min()) if patient_dice.size else float("nan"),  # the worst patient
        "dice_tumour": _mean(slice_dice[tumour]),
        "dice_all": _mean(slice_dice),
        "iou": _mean(np.where(union > 0, pint / np.maximum(union, 1), 1.0)),
        "fp_slice_rate": _mean((sp[empty] > 0).astype(np.float64)),
    }
    n_labels = len(class_names) if class_names else int(max(pred.max(initial=0), truth.max(initial=0))) + 1
    if n_labels > 2:
        names = list(class_names) if class_names else [f"class{c}" for c in range(n_labels)]
        for c in range(1, n_labels):
            _, csp, cst, cint = _per_patient_counts(pred == c, truth == c, patients)
            out[f"dice_{names[c]}"] = _mean(_dice(cint, csp, cst))
    return out
