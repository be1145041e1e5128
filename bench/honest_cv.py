"""Choices made by cross-validation (bench/honest_study.py): every patient of the CV pool is predicted by
the fold model that never saw it (out-of-fold), and TTA, the volume and one-slice post-processing rules
and the quality score's method and review threshold are chosen on those pooled predictions, never on
the test split.

Out-of-fold probabilities are kept in ``runs/NAME/oof/`` (float16 .npy; several hundred MB) so the
choice can be re-run without predicting again.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from core.data.arrays import SplitArrays
from core.data.preprocessing import FLAIR
from core.evaluation.metrics import per_patient_dice
from core.evaluation.selection import ValSplit, better
from core.evaluation.stats import spearman, summary
from core.inference.postprocess import NO_POSTPROCESS, apply_postprocess
from core.inference.quality import QUALITY_METHODS, quality_score
from core.io import read_json

# Volume rules: minimum 3D component (mm3) x minimum lesion area (mm2) x minimum mean component probability.
VOLUME_GRID = list(itertools.product((0.0, 500.0, 1500.0, 5000.0), (0.0, 25.0, 100.0),
                                     (0.0, 0.8, 0.85, 0.9, 0.925, 0.95)))
# One-slice rules: minimum lesion area (mm2) x minimum mean lesion probability.
SLICE_GRID = list(itertools.product((0.0, 10.0, 25.0, 50.0, 100.0, 200.0, 400.0),
                                    (0.0, 0.8, 0.85, 0.9, 0.925, 0.95)))
REVIEW_DICE = 0.7  # a patient below this dsc_volume is one a reader should have been told to review
# (name, volume scope, TTA, pre/post-contrast replaced by FLAIR)
OOF_PASSES = (("volume_none", True, "none", False), ("volume_flip", True, "flip", False),
              ("slice_none", False, "none", False), ("slice_flip", False, "flip", False),
              ("flair_none", True, "none", True), ("flair_flip", True, "flip", True))
FLAIR_PASSES = tuple(p for p in OOF_PASSES if p[3])  # what a FLAIR-only member is asked in a routed ensemble


def with_flair(images: np.ndarray) -> np.ndarray:
    """(N,H,W,3) images whose pre- and post-contrast are FLAIR's pixels (as the Kaggle set fills a gap)."""
    out = images.copy()
    out[..., 0] = out[..., 2] = out[..., FLAIR]
    return out


def out_of_fold(cv_dir: Path, pool: SplitArrays, cache: Path, passes: tuple[tuple[str, bool, str, bool], ...]
                = OOF_PASSES) -> dict[str, np.ndarray]:
    """Each pass's (N,H,W) probabilities for the pool's rows, each patient by its own fold's model."""
    from core.inference.predictor import Predictor

    if all((cache / f"{name}.npy").is_file() for name, *_ in passes):
        return {name: np.load(cache / f"{name}.npy") for name, *_ in passes}
    folds = read_json(cv_dir / "folds.json")["folds"]
    patients = np.asarray(pool.patients).astype(str)
    out = {name: np.zeros(np.shape(pool.masks), np.float16) for name, *_ in passes}
    for k, fold in enumerate(folds):
        predictor = Predictor.from_bundle(cv_dir / "folds" / f"fold{k}", "cpu")
        rows = np.flatnonzero(np.isin(patients, fold))
        images = np.ascontiguousarray(np.asarray(pool.images[rows]).transpose(0, 2, 3, 1))
        for name, volume, tta, flair in passes:
            predictor.tta = tta
            x = with_flair(images) if flair else images
            probs = predictor.predict_proba(x, patients=patients[rows] if volume else None)
            out[name][rows] = np.stack(probs).astype(np.float16)
        print(f"out-of-fold: fold {k} ({len(fold)} patients) predicted", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    for name, array in out.items():
        np.save(cache / f"{name}.npy", array)
    return out


def postprocessed(probs: np.ndarray, val: ValSplit, settings: dict[str, Any], volume: bool) -> np.ndarray:
    """The product's own post-processing of thresholded probabilities, patient by patient (volume) or
    slice by slice."""
    probs = probs.astype(np.float32, copy=False)
    masks = (probs > 0.5).astype(np.uint8)
    if not volume:
        return apply_postprocess(masks, settings, volume=False, probs=probs)
    out = masks.copy()
    for rows in val.groups:
        out[rows] = apply_postprocess(masks[rows], settings, volume=True, probs=probs[rows])
    return out


def search(probs: np.ndarray, val: ValSplit, grid: list[tuple[float, ...]], volume: bool
           ) -> tuple[dict[str, Any], dict[str, float], list[dict[str, Any]]]:
    """The grid's best rule by ``selection.better`` (a strictly higher dsc_volume with the worst patient no
    worse than the incumbent's), starting from no post-processing."""
    probs = probs.astype(np.float32)  # once, not per candidate
    best = dict(NO_POSTPROCESS)
    best_metrics = val.metrics(postprocessed(probs, val, best, volume))
    table = []
    for values in grid:
        if volume:
            settings = {**NO_POSTPROCESS, "min_volume_mm3": values[0], "min_area_mm2": values[1],
                        "min_probability": values[2]}
        else:
            settings = {**NO_POSTPROCESS, "min_area_slice_mm2": values[0], "min_probability_slice": values[1]}
        if settings == NO_POSTPROCESS:
            continue
        metrics = val.metrics(postprocessed(probs, val, settings, volume))
        table.append({**settings, **{k: metrics[k] for k in ("dsc_volume", "dsc_volume_min", "fp_slice_rate")}})
        if better(metrics, best_metrics):
            best, best_metrics = settings, metrics
    return best, best_metrics, table


def choose_review(quality: dict[str, float], dice: dict[str, float]) -> float | None:
    """The quality below which an answer says "review": the cut that best separates patients under
    REVIEW_DICE from the rest (balanced accuracy); None when no patient is under it."""
    failed = {p for p, d in dice.items() if d < REVIEW_DICE}
    if not failed or len(failed) == len(dice):
        return None
    best, best_score = None, -1.0
    for cut in sorted(set(quality.values())):
        cut = float(cut) + 1e-9  # flag quality <= this patient's
        flagged = {p for p, q in quality.items() if q < cut}
        caught, cleared = len(flagged & failed), len(set(dice) - flagged - failed)
        score = (caught / len(failed) + cleared / (len(dice) - len(failed))) / 2
        if score > best_score:
            best, best_score = round(cut, 4), score
    return best


def patient_figures(pred: np.ndarray, val: ValSplit) -> dict[str, float]:
    return per_patient_dice(pred, val.truth, val.patients)


def choose(oof: dict[str, np.ndarray], val: ValSplit) -> dict[str, Any]:
    """TTA and volume rules together, then the one-slice rules, then the quality method and review cut;
    with the CV figures of each (chosen on these same out-of-fold predictions: mildly optimistic)."""
    volume = {mode: search(oof[f"volume_{mode}"], val, VOLUME_GRID, True) for mode in ("none", "flip")}
    tta = "flip" if better(volume["flip"][1], volume["none"][1]) else "none"
    rules, cv_volume, table = volume[tta]
    slice_rules, cv_slice, slice_table = search(oof[f"slice_{tta}"], val, SLICE_GRID, False)
    settings = {**rules, "min_area_slice_mm2": slice_rules["min_area_slice_mm2"],
                "min_probability_slice": slice_rules["min_probability_slice"]}
    raw = val.metrics((oof[f"volume_{tta}"] > 0.5).astype(np.uint8))
    pred = postprocessed(oof[f"volume_{tta}"], val, settings, True)
    dice = patient_figures(pred, val)
    flair_pred = postprocessed(oof[f"flair_{tta}"], val, settings, True)
    flair_dice = patient_figures(flair_pred, val)
    slice_dice = patient_figures(postprocessed(oof[f"slice_{tta}"], val, settings, False), val)
    quality = {}
    for method in QUALITY_METHODS:
        quality[method] = {p: quality_score(oof[f"volume_{tta}"][rows].astype(np.float32), pred[rows], method)
                           for p, rows in ((str(val.patients[r[0]]), r) for r in val.groups)}
    rho = {m: spearman([quality[m][p] for p in dice], [dice[p] for p in dice]) for m in QUALITY_METHODS}
    method = max(QUALITY_METHODS, key=lambda m: -2.0 if np.isnan(rho[m]) else rho[m])
    review = choose_review(quality[method], dice)
    flagged = sorted(p for p, q in quality[method].items() if review is not None and q < review)
    return {
        "tta": tta, "postprocess": settings,
        "quality": {"method": method, "review_below": review, "spearman_cv": rho[method],
                    "spearman_cv_by_method": rho, "review_dice": REVIEW_DICE,
                    "flagged_cv": flagged, "flagged_dice_mean": float(np.mean([dice[p] for p in flagged]))
                    if flagged else None},
        "cv": {"volume_raw": raw, "volume": cv_volume, "one_slice": cv_slice,
               "flair_only": val.metrics(flair_pred),
               "per_patient": {"volume": summary(dice), "one_slice": summary(slice_dice),
                               "flair_only": summary(flair_dice),
                               "flair_only_drop": summary({p: dice[p] - flair_dice[p] for p in dice})},
               "per_patient_dsc_volume": dice, "quality": quality[method]},
        "search": {"tta": {mode: v[1]["dsc_volume"] for mode, v in volume.items()},
                   "volume": table, "one_slice": slice_table},
    }


def flair_route(flair_oof: dict[str, np.ndarray], val: ValSplit, chosen: dict[str, Any]) -> dict[str, Any]:
    """The CV figures of a routed ensemble's FLAIR-only path: the FLAIR-only members' out-of-fold
    probabilities on pre/post replaced by FLAIR, with the TTA ``choose`` fixed and the path's own volume
    rules, searched on these predictions as ``choose`` searches the full path's (its one-slice rules stay
    the full path's: no one-slice FLAIR pass is predicted), against the full path's per-patient dsc_volume."""
    tta = chosen["tta"]
    probs = flair_oof[f"flair_{tta}"]
    rules, _, table = search(probs, val, VOLUME_GRID, True)
    settings = {**chosen["postprocess"], **{k: rules[k] for k in ("min_volume_mm3", "min_area_mm2", "min_probability")}}
    pred = postprocessed(probs, val, settings, True)
    dice, full = patient_figures(pred, val), chosen["cv"]["per_patient_dsc_volume"]
    return {"flair_only": val.metrics(pred), "per_patient": summary(dice), "postprocess": settings,
            "flair_only_drop": summary({p: full[p] - dice[p] for p in dice}), "per_patient_dsc_volume": dice,
            "search": table}
