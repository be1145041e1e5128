"""`python -m core predict --bundle B INPUT... --out DIR`: the command line of core.inference.predict.

Writes <name>_mask.png (0/255; labels as-is for multi-class) and <name>_overlay.png per slice, and
predictions.csv. A patient folder, a multi-page TIFF or an (N,H,W[,3]) .npy is predicted as one volume. A
NIfTI scan or DICOM study (folder or zip) gives <name>_mask.nii.gz on its own grid, <name>_seg.dcm (DICOM SEG)
for DICOM, <name>_volume.json, and its tumour volume in mL in predictions.csv.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from core.config import PredictorOptions, add_command, from_args, meta
from core.inference.jobs import ScanFlags, scan_options
from core.inference.predict import run


@dataclass
class PredictJob:
    """The `core predict` options of its own (the model's are PredictorOptions, the scans' ScanFlags)."""

    inputs: list[Path] = field(metadata=meta(
        "slice files, patient folders, .nii/.nii.gz files, DICOM folders or zips", positional=True,
        argument={"nargs": "+", "metavar": "INPUT"}))
    out: Path = field(metadata=meta("output directory"))


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "predict", predict_command, PredictorOptions, PredictJob, ScanFlags, doc=__doc__,
                help="masks for TIFF/PNG/NPY slices, patient folders, NIfTI scans and DICOM studies")


def predict_command(args: argparse.Namespace) -> int:
    from core.inference.predictor import Predictor  # here: `python -m core` starts without torch

    predictor = Predictor.from_args(args)
    job = from_args(args, PredictJob)
    rows = run(predictor, job.inputs, job.out, scan_options(args))
    scans = [r for r in rows if r["volume_ml"] != ""]
    tumour = sum(1 for r in rows if int(r["tumour_pixels"]) > 0)  # type: ignore[call-overload]
    for r in scans:
        print(f"{r['input']}: {r['volume_ml']} mL{' (' + str(r['notes']) + ')' if r['notes'] else ''}")
    print(f"{len(rows) - len(scans)} slices and {len(scans)} scans, {tumour} with tumour; outputs in {job.out}")
    return 0
