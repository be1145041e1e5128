"""`python -m serve batch`: segment a cohort (a folder or ``s3://`` prefix of patients) with Ray Data.

Writes OUT/<patient>/<slice>_mask.tif for a folder of slices, OUT/<case>/<case>_mask.nii.gz for a NIfTI
case or DICOM study (and <case>_seg.dcm, a DICOM SEG, for DICOM), patients.csv (with the tumour volume in
mL for scans) and summary.json (with the metrics where the source has masks). Scans are read as `core
predict` reads them. A rerun skips patients already written. Exit status 1 when a patient failed.
"""

from __future__ import annotations

import argparse

from core.config import add_command, from_args
from serve.batch.run import BatchOptions, run_batch


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "batch", _cmd_batch, BatchOptions, doc=__doc__,
                help="segment a cohort (folder or s3:// prefix of patients: slices, NIfTI or DICOM) with Ray Data")


def _cmd_batch(args: argparse.Namespace) -> int:
    opts = from_args(args, BatchOptions)
    summary = run_batch(opts)
    m = summary["metrics"]
    scores = f"; dsc_volume={m['dsc_volume']:.4f} dice_tumour={m['dice_tumour']:.4f}" if m else ""
    print(f"{summary['written']} of {summary['patients']} patients written ({len(summary['skipped'])} skipped, "
          f"{len(summary['failed'])} failed), {summary['slices']} slices{scores}; {opts.out}/summary.json")
    return 1 if summary["failed"] else 0
