"""Inference settings chosen by cross-validation (``python -m tune study``): on pooled out-of-fold
probabilities, each pool patient predicted by the fold model that never saw it.

Every choice is robust to the choosing: among the candidates whose paired per-patient difference from the
best candidate's dsc_volume is not significant (its 95% bootstrap interval reaches 0), the simplest one
is taken. With a few dozen patients most rules are indistinguishable from the best, so a rule ships only
where it helps clearly; a rule tuned to the last decimal of the CV mean is what failed on unseen patients.
Volume rules go through ``postprocess_volume``, so no candidate is scored on a patient it emptied.

The choices, in order: threshold with TTA (on raw masks); the volume rules; the one-slice rules; the quality
score's method and its review cut.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.data.preprocessing import FLAIR
from core.evaluation.metrics import per_patient_dice
from core.evaluation.selection import ValSplit
from core.evaluation.stats import paired_difference, spearman, summary
from core.inference.postprocess import NO_POSTPROCESS, apply_postprocess, postprocess_volume
from core.inference.quality import QUALITY_METHODS, quality_score

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
TTA_MODES = ("none", "flip")
# minimum 3D component (mm3) x minimum lesion area per slice (mm2) x minimum mean component probability
VOLUME_GRID = list(itertools.product((0.0, 500.0, 1500.0, 5000.0), (0.0, 25.0, 100.0),
                                     (0.0, 0.8, 0.85, 0.9, 0.95)))
# one-slice path: minimum lesion area (mm2) x minimum mean lesion probability
SLICE_GRID = list(itertools.product((0.0, 10.0, 25.0, 50.0, 100.0, 200.0), (0.0, 0.8, 0.85, 0.9)))
REVIEW_DICE = 0.7  # a patient below this dsc_volume is one a reader should have been told to review


@dataclass
class Candidate:
    """One setting, how simple it is (lower sorts first) and the per-patient dsc_volume it gives."""

    settings: dict[str, Any]
    simplicity: tuple[float, ...]
    per_patient: dict[str, float]

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_patient.values())))


def robust_choice(candidates: list[Candidate]) -> tuple[Candidate, dict[str, Any]]:
    """The simplest candidate not significantly worse than the best (paired per patient), and the record of
    the choice: the best, how many tied with it, and the chosen one's paired difference from it."""
    best = max(candidates, key=lambda c: (c.mean, [-s for s in c.simplicity]))
    tied = [c for c in candidates if c is best or paired_difference(c.per_patient, best.per_patient)["ci95"][1] >= 0]
    chosen = min(tied, key=lambda c: c.simplicity)
    return chosen, {"chosen": chosen.settings, "chosen_mean": chosen.mean, "best": best.settings,
                    "best_mean": best.mean, "candidates": len(candidates), "not_worse_than_best": len(tied),
                    "chosen_minus_best": paired_difference(chosen.per_patient, best.per_patient)}


def with_flair(images: np.ndarray) -> np.ndarray:
    """(N,H,W,3) images whose pre- and post-contrast are FLAIR's pixels (as the Kaggle set fills a gap)."""
    out = images.copy()
    out[..., 0] = out[..., 2] = out[..., FLAIR]
    return out


def volume_masks(probs: np.ndarray, val: ValSplit, threshold: float, rules: Mapping[str, Any]
                 ) -> tuple[np.ndarray, list[str]]:
    """Thresholded (N,H,W) probabilities with the volume rules applied patient by patient, as the Predictor
    applies them; and the patients whose network mask was kept because the rules would have emptied it."""
    masks = (probs > threshold).astype(np.uint8)
    kept = []
    if any(rules.get(k) for k in ("min_volume_mm3", "min_area_mm2", "min_probability")):
        for rows in val.groups:
            masks[rows], network = postprocess_volume(masks[rows], dict(rules), probs=probs[rows])
            if network:
                kept.append(str(val.patients[rows[0]]))
    return masks, kept


def slice_masks(probs: np.ndarray, threshold: float, rules: Mapping[str, Any]) -> np.ndarray:
    """Thresholded (N,H,W) probabilities with the one-slice rules applied slice by slice."""
    return apply_postprocess((probs > threshold).astype(np.uint8), dict(rules), volume=False, probs=probs)


def _dice(masks: np.ndarray, val: ValSplit) -> dict[str, float]:
    return per_patient_dice(masks, val.truth, val.patients)


def choose_threshold_tta(probs: Mapping[str, np.ndarray], val: ValSplit) -> tuple[str, float, dict[str, Any]]:
    """TTA mode and threshold on raw masks (``probs`` maps a TTA mode to its volume-scope probabilities)."""
    candidates = [Candidate({"tta": tta, "threshold": t}, (float(tta != "none"), abs(t - 0.5)),
                            _dice((probs[tta] > t).astype(np.uint8), val))
                  for tta in TTA_MODES if tta in probs for t in THRESHOLDS]
    chosen, record = robust_choice(candidates)
    return str(chosen.settings["tta"]), float(chosen.settings["threshold"]), record


def choose_volume_rules(probs: np.ndarray, val: ValSplit, threshold: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Minimum component volume, lesion area and component probability, robustly."""
    candidates = []
    for volume, area, probability in VOLUME_GRID:
        rules = {"min_volume_mm3": volume, "min_area_mm2": area, "min_probability": probability}
        active = sum(v > 0 for v in rules.values())
        candidates.append(Candidate(rules, (active, probability, volume, area),
                                    _dice(volume_masks(probs, val, threshold, rules)[0], val)))
    chosen, record = robust_choice(candidates)
    return dict(chosen.settings), record


def choose_slice_rules(probs: np.ndarray, val: ValSplit, threshold: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one-slice path's minimum lesion area and probability, robustly, on one-slice-scope probabilities."""
    candidates = []
    for area, probability in SLICE_GRID:
        rules = {"min_area_slice_mm2": area, "min_probability_slice": probability}
        active = sum(v > 0 for v in rules.values())
        candidates.append(Candidate(rules, (active, probability, area),
                                    _dice(slice_masks(probs, threshold, rules), val)))
    chosen, record = robust_choice(candidates)
    return dict(chosen.settings), record


def choose_review(quality: Mapping[str, float], dice: Mapping[str, float]) -> float | None:
    """The quality below which an answer says "review": the cut that best separates patients under
    REVIEW_DICE from the rest (balanced accuracy); None when no patient, or every patient, is under it."""
    failed = {p for p, d in dice.items() if d < REVIEW_DICE}
    if not failed or len(failed) == len(dice):
        return None
    best, best_score = None, -1.0
    for cut in sorted(set(quality.values())):
        cut = float(cut) + 1e-9  # flags quality <= this patient's
        flagged = {p for p, q in quality.items() if q < cut}
        caught, cleared = len(flagged & failed), len(set(dice) - flagged - failed)
        score = (caught / len(failed) + cleared / (len(dice) - len(failed))) / 2
        if score > best_score:
            best, best_score = round(cut, 4), score
    return best


def choose_quality(probs: np.ndarray, masks: np.ndarray, val: ValSplit, dice: Mapping[str, float]
                   ) -> dict[str, Any]:
    """The quality method whose score ranks patients most like their dsc_volume (Spearman), and its cut."""
    scores = {method: {str(val.patients[rows[0]]): quality_score(probs[rows], masks[rows], method)
                       for rows in val.groups} for method in QUALITY_METHODS}
    rho = {m: spearman([scores[m][p] for p in dice], [dice[p] for p in dice]) for m in QUALITY_METHODS}
    method = max(QUALITY_METHODS, key=lambda m: -2.0 if np.isnan(rho[m]) else rho[m])
    review = choose_review(scores[method], dice)
    flagged = sorted(p for p, q in scores[method].items() if review is not None and q < review)
    return {"method": method, "review_below": review, "spearman_cv": rho[method], "spearman_cv_by_method": rho,
            "review_dice": REVIEW_DICE, "flagged_cv": flagged, "per_patient": scores[method]}


def choose_settings(oof: Callable[[str], np.ndarray], val: ValSplit) -> dict[str, Any]:
    """Every inference setting, chosen on out-of-fold probabilities, with the CV figures of the result.

    ``oof(name)`` returns the pooled (N,H,W) probabilities of a pass: ``volume_<tta>`` (per-patient
    preprocessing), ``slice_<tta>`` (each slice alone) and ``flair_<tta>`` (pre/post replaced by FLAIR).
    The CV figures are on the predictions the settings were chosen on: mildly optimistic.
    """
    tta, threshold, tta_record = choose_threshold_tta({m: oof(f"volume_{m}") for m in TTA_MODES}, val)
    probs = oof(f"volume_{tta}")
    volume_rules, volume_record = choose_volume_rules(probs, val, threshold)
    slice_rules, slice_record = choose_slice_rules(oof(f"slice_{tta}"), val, threshold)
    postprocess = {**NO_POSTPROCESS, **volume_rules, **slice_rules}
    masks, kept = volume_masks(probs, val, threshold, postprocess)
    dice = _dice(masks, val)
    flair_masks, flair_kept = volume_masks(oof(f"flair_{tta}"), val, threshold, postprocess)
    flair = _dice(flair_masks, val)
    one_slice = _dice(slice_masks(oof(f"slice_{tta}"), threshold, postprocess), val)
    raw = _dice((probs > threshold).astype(np.uint8), val)
    return {
        "tta": tta, "threshold": threshold, "postprocess": postprocess,
        "quality": choose_quality(probs, masks, val, dice),
        "search": {"threshold_tta": tta_record, "volume": volume_record, "one_slice": slice_record},
        "cv": {
            "metrics": {"volume": val.metrics(masks), "flair_only": val.metrics(flair_masks)},
            "per_patient": {"volume": summary(dice), "volume_raw": summary(raw), "one_slice": summary(one_slice),
                            "flair_only": summary(flair),
                            "flair_only_drop": summary({p: dice[p] - flair[p] for p in dice})},
            "per_patient_dsc_volume": dice, "per_patient_flair_only": flair,
            "network_mask_kept": {"volume": kept, "flair_only": flair_kept},
        },
    }
