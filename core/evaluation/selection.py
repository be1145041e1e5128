"""Inference settings chosen on validation: threshold, test-time augmentation and post-processing.

Each is kept only where it strictly raises val ``dsc_volume`` over the plain prediction without lowering
the worst patient's (``dsc_volume_min``), so a bundle never carries a step that did not help the split
it was selected on, nor one that bought the mean with a patient. The trainer (one network) and
ensemble building (several) both choose through here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.data.arrays import patient_rows
from core.evaluation.metrics import segmentation_metrics
from core.inference.postprocess import NO_POSTPROCESS, apply_postprocess

# Post-processing candidates: (minimum 3D component in mm3, minimum lesion area per slice in mm2; about
# 100-1,100 voxels and 10-230 px on the Kaggle grid). The largest-component rule is not offered: it kept
# an 8,535-px false positive over a 2,356-px tumour.
POSTPROCESS_GRID = [(vol, area) for vol in (0, 500, 1500, 5000) for area in (0, 10, 25, 50, 100, 200)]
# Minimum lesion areas (mm2) tried for the one-slice-at-a-time path, which has no 3D step to remove specks.
SLICE_AREA_GRID = (0, 10, 25, 50, 100, 200, 400)
# Thresholds tried for an ensemble's mean probability (a single network keeps its training threshold).
THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)


class ValSplit:
    """The val truth a choice is scored on: masks (N,H,W), patient and slice per row, class names."""

    def __init__(self, truth: np.ndarray, patients: np.ndarray, slices: np.ndarray,
                 class_names: list[str] | None = None) -> None:
        self.truth, self.patients, self.slices = truth, np.asarray(patients).astype(str), np.asarray(slices)
        self.class_names = class_names if class_names and len(class_names) > 2 else None
        self.groups = patient_rows(self.patients, self.slices)

    def metrics(self, pred: np.ndarray) -> dict[str, float]:
        return segmentation_metrics(pred, self.truth, self.patients, self.class_names)


def better(candidate: dict[str, float], incumbent: dict[str, float]) -> bool:
    """A strictly higher mean ``dsc_volume`` with the worst patient no worse than the incumbent's."""
    return (candidate["dsc_volume"] > incumbent["dsc_volume"]
            and candidate["dsc_volume_min"] >= incumbent["dsc_volume_min"])


def choose_postprocess(raw: np.ndarray, val: ValSplit, base: dict[str, float] | None = None,
                       ) -> tuple[dict[str, Any], dict[str, float], list[dict]]:
    """Best post-processing by val ``dsc_volume``; ``NO_POSTPROCESS`` unless one strictly helps.

    ``base`` is ``val.metrics(raw)`` where the caller has it already.
    """
    base = val.metrics(raw) if base is None else base
    best, best_metrics, search = dict(NO_POSTPROCESS), base, []
    for min_volume, area in POSTPROCESS_GRID:
        settings = {**NO_POSTPROCESS, "min_volume_mm3": float(min_volume), "min_area_mm2": float(area)}
        if settings == NO_POSTPROCESS:
            continue
        pred = raw.copy()
        for rows in val.groups:
            pred[rows] = apply_postprocess(raw[rows], settings, volume=True)
        metrics = val.metrics(pred)
        search.append({**settings, "dsc_volume": metrics["dsc_volume"], "dsc_volume_min": metrics["dsc_volume_min"]})
        if better(metrics, best_metrics):
            best, best_metrics = settings, metrics
    return best, best_metrics, search


def choose_slice_area(raw: np.ndarray, val: ValSplit, base: dict[str, float]) -> tuple[int, dict[str, float]]:
    """``min_area_slice_mm2``: the minimum lesion area for paths that see one slice at a time (serve's
    /v1/segment, SageMaker per slice), scored on val masks post-processed slice by slice; 0 unless one
    strictly helps (``better``). ``base`` is ``val.metrics(raw)``."""
    best_area, best = 0, base
    for area in SLICE_AREA_GRID[1:]:
        metrics = val.metrics(apply_postprocess(raw, {"min_area_slice_mm2": area}, volume=False))
        if better(metrics, best):
            best_area, best = area, metrics
    return best_area, best


def choose_one_slice(predictor: Any, arrays: Any, val: ValSplit) -> tuple[float, dict[str, float]]:
    """``min_area_slice_mm2`` chosen on the real one-slice path: each val slice of ``arrays`` through
    ``predictor`` (a SlicePredictor of the bundle being made) alone, with its own standardisation and crop,
    as /v1/segment and SageMaker per slice see it. Returns the area and that path's val metrics."""
    images = np.ascontiguousarray(np.asarray(arrays.images).transpose(0, 2, 3, 1))
    raw = np.stack([predictor.masks_from_proba(p) for p in predictor.predict_proba(images)])
    return choose_slice_area(raw, val, val.metrics(raw))


def choose_inference(
    raw: np.ndarray, flipped: np.ndarray | None, val: ValSplit, postprocess: bool = True
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """TTA and post-processing chosen together from val masks without (``raw``) and with flip TTA.

    Returns (tta, post-processing, metrics.json entries: val, val_raw, val_postprocessed, val_tta, ...).
    ``flipped=None`` leaves TTA out; ``postprocess=False`` leaves post-processing out.
    """
    candidates = {"none": raw} if flipped is None else {"none": raw, "flip": flipped}
    plain = {mode: val.metrics(pred) for mode, pred in candidates.items()}  # each scored once
    chosen = {
        mode: choose_postprocess(pred, val, plain[mode]) if postprocess else (dict(NO_POSTPROCESS), plain[mode], [])
        for mode, pred in candidates.items()
    }
    tta = "none"
    if "flip" in chosen and better(chosen["flip"][1], chosen["none"][1]):
        tta = "flip"
    settings, metrics, search = chosen[tta]
    if postprocess:
        area, one_slice = choose_slice_area(candidates[tta], val, plain[tta])
        settings = {**settings, "min_area_slice_mm2": float(area)}
    entries = {
        "val": metrics, "val_raw": plain["none"], "val_postprocessed": chosen["none"][1],
        "tta": tta, "postprocess": settings, "postprocess_search": search,
        "tta_search": {mode: c[1]["dsc_volume"] for mode, c in chosen.items()},
    }
    if postprocess:  # the volume-scope masks, post-processed one slice at a time
        entries["val_one_slice"] = one_slice
    if "flip" in chosen:
        entries["val_tta"] = chosen["flip"][1]
    return tta, settings, entries


def choose_threshold(probs: np.ndarray, val: ValSplit, default: float = 0.5) -> tuple[float, dict[str, float]]:
    """Binary threshold on mean probabilities (N,H,W) by val ``dsc_volume``; ``default`` unless one beats it."""
    scores = {t: val.metrics((probs > t).astype(np.uint8))["dsc_volume"] for t in THRESHOLD_GRID}
    best = max(scores, key=lambda t: (scores[t], t == default))
    return (best if scores[best] > scores.get(default, -1.0) else default), scores
