"""A real patient acquired sagittally: how close its mask comes to the axial one's (issue 41, item 4).

Each Kaggle patient's axial slices (the Kaggle grid's assumed spacing, ``--spacing``) are written as an
axial NIfTI and as a sagittal one with ``--thickness`` mm slices (each slice the mean of the axial voxels
in its slab, on an affine that keeps every voxel where it was), and both go through the Predictor path
(core.formats.nifti.read_nifti, core.inference.results.segment_volume). The sagittal scan is resampled to
axial pixels of the axial grid's size, so the two masks compare voxel for voxel on the axial grid; they also
compare on the sagittal grid, beside the answer the scan got before resampling (voxels reordered only).

    python bench/plane_resampling.py --src /tmp/plane-lgg --bundle pretrained/lgg --patients 2

Writes bench/results/plane-resampling-<device>.json with the machine and the bundle's identity.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import LoadSampler, bundle_identity, fmt, publish, row  # noqa: E402

SEQUENCES = ["pre", "flair", "post"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.count_nonzero(a & b)) / total


def nifti_bytes(slices: np.ndarray, spacing: tuple[float, float, float], axcodes: tuple[str, str, str],
                shift_columns: float = 0.0) -> bytes:
    """Canonical (N,H,W,3) slices as a NIfTI stored with ``axcodes``, its grid moved ``shift_columns`` of a
    column's width toward the patient's left (a thick slab's centre)."""
    from core.formats.volume import slices_grid

    data, affine = slices_grid(slices, spacing, axcodes)
    affine[:3, 3] += np.array([-spacing[2] * shift_columns, 0.0, 0.0])
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    return gzip.compress(image.to_bytes())


def sagittal(images: np.ndarray, column_mm: float, thickness: float) -> tuple[np.ndarray, float]:
    """(N,H,W,3) axial slices -> (N,H,n,3) sagittal slabs ``thickness`` mm thick (the mean of the axial voxels
    each covers, columns split into equal parts where a slab edge falls inside one) and the first slab's centre
    in axial columns. Refuses a thickness that does not tile the columns."""
    parts = next((q for q in range(1, 65) if abs(thickness * q / column_mm - round(thickness * q / column_mm))
                  < 1e-6), None)
    if parts is None:
        raise ValueError(f"{thickness} mm slabs do not tile {column_mm} mm columns")
    per_slab = round(thickness * parts / column_mm)
    fine = np.repeat(images.astype(np.float32), parts, axis=2)
    n = fine.shape[2] // per_slab
    if n * per_slab != fine.shape[2]:
        raise ValueError(f"{images.shape[2]} columns of {column_mm} mm are not a whole number of {thickness} mm slabs")
    slabs = fine.reshape(*fine.shape[:2], n, per_slab, fine.shape[3]).mean(axis=3)
    return np.rint(slabs).astype(np.uint8), (per_slab / 2) / parts - 0.5


def one_patient(predictor: Any, patient: Any, spacing: tuple[float, float, float], thickness: float
                ) -> dict[str, Any]:
    """The axial and sagittal answers for one patient, and the Dice between them on both grids."""
    import core.formats.volume as volume_module
    from core.formats.nifti import read_nifti
    from core.inference.results import segment_volume

    images, truth = np.asarray(patient.images), np.asarray(patient.masks)
    slabs, shift = sagittal(images, spacing[2], thickness)
    thick = (spacing[0], spacing[1], thickness)
    axial_body = nifti_bytes(images, spacing, ("L", "P", "S"))
    sagittal_body = nifti_bytes(slabs, thick, ("A", "S", "L"), shift)
    out: dict[str, Any] = {"patient": patient.id, "slices": int(images.shape[0]),
                           "truth_voxels": int(np.count_nonzero(truth))}
    timings = {}
    t = time.perf_counter()
    axial = segment_volume(predictor, read_nifti(axial_body, sequences=SEQUENCES))
    timings["axial_s"] = time.perf_counter() - t
    t = time.perf_counter()
    volume = read_nifti(sagittal_body, sequences=SEQUENCES)
    resampled = segment_volume(predictor, volume)
    timings["sagittal_s"] = time.perf_counter() - t
    if resampled.masks.shape != axial.masks.shape:
        raise RuntimeError(f"resampled grid {resampled.masks.shape} is not the axial {axial.masks.shape}")
    with mock.patch.object(volume_module, "axial_grid", lambda *a, **k: None):  # voxels reordered only
        reordered = segment_volume(predictor, read_nifti(sagittal_body, sequences=SEQUENCES))
    on_source = volume.to_source(axial.masks)
    out.update(
        dice_sagittal_vs_axial_on_axial_grid=fmt(dice(resampled.masks, axial.masks), 4),
        dice_sagittal_vs_axial_on_sagittal_grid=fmt(dice(volume.to_source(resampled.masks), on_source), 4),
        dice_reordered_only_vs_axial_on_sagittal_grid=fmt(dice(reordered.volume.to_source(reordered.masks),
                                                               on_source), 4),
        dice_axial_vs_truth=fmt(dice(axial.masks, truth), 4),
        dice_sagittal_vs_truth=fmt(dice(resampled.masks, truth), 4),
        volume_ml={"axial": fmt(axial.volume_ml, 4), "sagittal": fmt(resampled.volume_ml, 4),
                   "reordered_only": fmt(reordered.volume_ml, 4)},
        sagittal_source_shape=list(volume.source_shape), notes=[n for n in volume.notes if "acquisition" in n],
        timings={k: fmt(v, 3) for k, v in timings.items()},
    )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from core.data.prepare import read_patients
    from core.inference.predictor import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    load = LoadSampler()
    spacing = tuple(float(v) for v in args.spacing.split(","))
    predictor = Predictor.from_bundle(args.bundle, args.device)
    src = Path(args.src)
    src = src / "kaggle_3m" if (src / "kaggle_3m").is_dir() else src
    patients = []
    for patient in read_patients(src):
        if args.patient and patient.id not in args.patient:
            continue
        patients.append(one_patient(predictor, patient, spacing, args.thickness))  # type: ignore[arg-type]
        load.mark(patient.id)
        print(patients[-1])
        if not args.patient and len(patients) >= args.patients:
            break
    mean = float(np.mean([p["dice_sagittal_vs_axial_on_axial_grid"] for p in patients]))
    before = float(np.mean([p["dice_reordered_only_vs_axial_on_sagittal_grid"] for p in patients]))
    limits = f"{len(patients)} real patients, {args.thickness} mm sagittal slabs, Kaggle spacing assumed {args.spacing}"
    return {
        "bundle": bundle_identity(args.bundle), "load": load.summary(),
        "settings": {"thickness_mm": args.thickness, "axial_spacing_mm": list(spacing), "device": args.device,
                     "threads": args.threads, "source": "lossless restore of ../shared/data/lgg (not in the repo)"},
        "patients": patients,
        "summary": [
            row("sagittal-path mask vs axial mask, Dice on the axial grid (mean)", "close to 1", f"{mean:.3f}", None,
                limits),
            row("reordered-only (before) vs axial mask, Dice on the sagittal grid (mean)", "(for comparison)",
                f"{before:.3f}", None, limits),
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="a Kaggle-layout folder (kaggle_3m/ or its parent)")
    p.add_argument("--bundle", default=str(ROOT / "pretrained" / "lgg"))
    p.add_argument("--patients", type=int, default=2, help="the first N patients (ignored with --patient)")
    p.add_argument("--patient", action="append", help="a patient id to run (repeatable)")
    p.add_argument("--thickness", type=float, default=5.0, help="sagittal slab thickness in mm")
    p.add_argument("--spacing", default="5,0.9375,0.9375", help="the axial slices' assumed z,y,x spacing in mm")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads; 0 = torch's default")
    p.add_argument("--no-write", action="store_true", help="print, do not write bench/results")
    args = p.parse_args(argv)
    result = run(args)
    if args.no_write:
        for line in result["summary"]:
            print(f"{line['metric']}: {line['measured']}")
        return 0
    publish("plane-resampling", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
