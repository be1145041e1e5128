"""Evaluate a bundle on a prepared split, a Kaggle-layout folder or NIfTI scans with their masks:
CSVs, summary.json and plots.

NIfTI sources (``--src``): an nnU-Net v2 raw dataset (imagesTr/labelsTr, and imagesTs/labelsTs), or a
folder of scans (``<case>.nii.gz`` or channel files ``<case>_0000.nii.gz`` ...) each with its
``<case>_mask.nii.gz`` beside it; per_patient.csv then has the true and predicted volumes in mL.

``evaluate_split`` is the reusable part (tune and the benchmarks call it): it predicts each patient as one
volume, so the bundle's 3D post-processing applies exactly as it will in serving. The command line is
core/evaluation/cli.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.data.arrays import SplitArrays
from core.evaluation.metrics import confusion_matrix, per_patient_dice, per_slice_dice, segmentation_metrics
from core.io import write_csv, write_json

if TYPE_CHECKING:
    from core.inference.predictor import Predictor

GALLERY = 6  # slices in the worst / best galleries


def _as_predictor(predictor: Predictor | str | os.PathLike, device: str = "auto") -> Predictor:
    # Imported here, not at the top: the `python -m core` commands that need no model start without torch.
    from core.inference.predictor import Predictor

    return predictor if isinstance(predictor, Predictor) else Predictor.from_bundle(predictor, device)


def predict_split(predictor: Predictor, arrays: SplitArrays, volume: bool = True) -> np.ndarray:
    """(N,H,W) uint8 masks in the rows' order, each patient predicted as a volume (post-processed);
    ``volume=False``: each slice alone, as serve's /v1/segment and SageMaker's per-slice requests see it."""
    out = np.zeros(np.shape(arrays.masks), dtype=np.uint8)
    for rows in arrays.patient_rows():
        images = np.ascontiguousarray(np.asarray(arrays.images[rows]).transpose(0, 2, 3, 1))
        out[rows] = predictor.predict(images, volume=volume)
    return out


def _class_names(predictor: Predictor) -> list[str] | None:
    return list(predictor.config["class_names"]) if predictor.multiclass else None


def evaluate_split(predictor: Predictor | str | os.PathLike, arrays: SplitArrays, volume: bool = True,
                   ) -> dict[str, float]:
    """All DESIGN.md metrics of a bundle (or ``Predictor``) on one split, with its post-processing;
    ``volume=False`` scores the one-slice-at-a-time path."""
    predictor = _as_predictor(predictor)
    pred = predict_split(predictor, arrays, volume)
    return segmentation_metrics(pred, np.asarray(arrays.masks), arrays.patients, _class_names(predictor))


def arrays_from_src(src: str | os.PathLike, classes: int = 1) -> SplitArrays:
    """Read a Kaggle-layout folder (validated as `core data prepare` does) into one SplitArrays."""
    from core.data.prepare import read_patients, stack_patients

    patients = list(read_patients(src, classes=classes))
    if not patients:
        raise ValueError(f"{src}: no patients")
    return stack_patients(patients)


def scans_from_src(src: str | os.PathLike, classes: int = 1, sequences: list[str] | None = None
                   ) -> tuple[SplitArrays, dict[str, float], dict[str, Any]] | None:
    """NIfTI scans with masks -> (arrays, voxel mL per patient, notes), or None when ``src`` holds none.

    Cases of different in-plane sizes are resized to the most common one (recorded under ``resized``)."""
    from core.data.nnunet import common_size, is_nnunet_dataset, read_case, read_nnunet
    from core.data.prepare import DataError, stack_patients
    from core.formats.cases import is_nifti_name, is_truth_name, nifti_cases
    from core.formats.nifti import channel_files

    src = Path(src)
    if is_nnunet_dataset(src):
        cases = read_nnunet(src)
        if len(cases.class_names) - 1 != classes:
            raise ValueError(f"{src} has {len(cases.class_names) - 1} foreground classes, the bundle {classes}")
        patients, voxel_ml = cases.patients, cases.voxel_ml
    else:
        names = sorted(p.name for p in src.iterdir() if p.is_file() and is_nifti_name(p.name)) if src.is_dir() else []
        if not names:
            return None
        truth = [n for n in names if is_truth_name(n)]
        masks = {case[: -len("_mask")]: src / files[0] for case, files in nifti_cases(truth).items()}
        images = {case: channel_files(src / files[0])
                  for case, files in nifti_cases([n for n in names if n not in truth]).items()}
        for case in sorted(set(masks) - set(images)):
            raise DataError(f"{masks[case]}: mask without a scan")
        for case in sorted(set(images) - set(masks)):
            raise DataError(f"{images[case][0]}: missing mask (expected {case}_mask.nii.gz beside it)")
        patients, voxel_ml = {}, {}
        for case in sorted(images):
            patients[case], voxel_ml[case] = read_case(case, images[case], masks[case], sequences, classes)  # type: ignore[arg-type]
    patients, resized = common_size(patients)
    for pid, (h0, w0) in resized.items():  # a resized pixel covers a different area
        h, w = patients[pid].images.shape[1:3]
        voxel_ml[pid] *= (h0 * w0) / (h * w)
    return stack_patients([patients[p] for p in sorted(patients)]), voxel_ml, {"resized": resized}


def write_report(
    predictor: Predictor, arrays: SplitArrays, out: str | os.PathLike, source: dict[str, Any],
    voxel_ml: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Predict, then write per_slice.csv, per_patient.csv, summary.json and the PNG plots to ``out``."""
    from core.evaluation import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truth = np.asarray(arrays.masks)
    patients = np.asarray(arrays.patients).astype(str)
    pred = predict_split(predictor, arrays)
    names = _class_names(predictor)
    metrics = segmentation_metrics(pred, truth, patients, names)
    dice = per_slice_dice(pred, truth)
    true_px = np.count_nonzero(truth.reshape(len(truth), -1), axis=1)
    pred_px = np.count_nonzero(pred.reshape(len(pred), -1), axis=1)
    write_csv(out / "per_slice.csv", [
        {"patient": p, "slice": int(s), "dice": round(float(d), 6), "truth_pixels": int(t), "pred_pixels": int(q)}
        for p, s, d, t, q in zip(patients, arrays.slices, dice, true_px, pred_px, strict=True)
    ])
    by_patient = per_patient_dice(pred, truth, patients)
    patient_rows = [
        {"patient": pid, "dice": round(d, 6), "slices": int((patients == pid).sum()),
         "tumour_slices": int((true_px[patients == pid] > 0).sum()),
         "truth_pixels": int(true_px[patients == pid].sum()), "pred_pixels": int(pred_px[patients == pid].sum())}
        for pid, d in by_patient.items()
    ]
    if voxel_ml:  # scans with a known voxel size: tumour volumes in mL
        for row in patient_rows:
            ml = voxel_ml.get(str(row["patient"]))
            row["truth_ml"] = round(row["truth_pixels"] * ml, 4) if ml else ""
            row["pred_ml"] = round(row["pred_pixels"] * ml, 4) if ml else ""
    write_csv(out / "per_patient.csv", patient_rows)
    plots.dice_histogram(dice[(true_px > 0) | (pred_px > 0)], out / "dice_histogram.png",
                         "Slice Dice (slices with tumour in truth or prediction)")
    plots.per_patient_bars(list(by_patient), list(by_patient.values()), out / "per_patient.png")
    # Galleries from slices where there is something to see (truth or prediction non-empty).
    candidates = np.flatnonzero((true_px > 0) | (pred_px > 0))
    ranked = candidates[np.argsort(dice[candidates], kind="stable")]
    for label, rows in (("worst", ranked[:GALLERY]), ("best", ranked[::-1][:GALLERY])):
        images = np.asarray(arrays.images[rows]).transpose(0, 2, 3, 1)
        titles = [f"{patients[r]} #{arrays.slices[r]}\nDice {dice[r]:.2f}" for r in rows]
        plots.slice_gallery(images, pred[rows], truth[rows], titles, out / f"{label}_slices.png",
                            f"{label.capitalize()} slices by Dice")
    summary: dict[str, Any] = {
        "metrics": metrics, "source": source, "slices": len(truth), "patients": len(by_patient),
        "tumour_slices": int((true_px > 0).sum()), "bundle": {
            "name": predictor.config.get("name"), "version": predictor.version,
            "postprocess": predictor.postprocess, "threshold": predictor.threshold,
        },
    }
    known = [r for r in patient_rows if r.get("truth_ml") not in (None, "")]
    if known:
        summary["volume_ml"] = {
            "truth_mean": float(np.mean([r["truth_ml"] for r in known])),
            "pred_mean": float(np.mean([r["pred_ml"] for r in known])),
            "mean_abs_error": float(np.mean([abs(r["pred_ml"] - r["truth_ml"]) for r in known])),
        }
    if names:
        matrix = confusion_matrix(pred, truth, len(names))
        plots.confusion_plot(matrix, names, out / "confusion_matrix.png")
        summary["confusion_matrix"] = {"classes": names, "pixels": matrix.tolist()}
    write_json(out / "summary.json", summary)
    return summary
