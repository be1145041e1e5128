"""`python -m serve batch`: segment a cohort (a folder or ``s3://`` prefix of patients) with Ray Data."""

from __future__ import annotations

import argparse

from core.config import BATCH_SIZE
from core.inference.jobs import add_scan_arguments, scan_options
from serve.batch.run import BatchOptions, run_batch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="segment a cohort (folder or s3:// prefix of patients: slices, NIfTI or DICOM) with Ray Data",
        description="Writes OUT/<patient>/<slice>_mask.tif for a folder of slices, OUT/<case>/<case>_mask.nii.gz "
        "for a NIfTI case or DICOM study (and <case>_seg.dcm, a DICOM SEG, for DICOM), patients.csv (with the "
        "tumour volume in mL for scans) and summary.json (with the metrics where the source has masks). A rerun "
        "skips patients already written. Exit status 1 when a patient failed.",
    )
    p.add_argument("--bundle", required=True, help="bundle directory or s3://bucket/prefix")
    p.add_argument("--src", required=True, help="folder or s3://bucket/prefix of patients: Kaggle-layout folders, "
                   "NIfTI cases (<case>.nii.gz, <case>_0000.nii.gz ...) or DICOM studies (a folder or a .zip)")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--workers", type=int, default=None,
                   help="predictor actors (default: one per GPU share, else CPUs - 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPU share per actor (default 1 when the cluster has a GPU, else 0)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (torch threads) per actor")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="slices per forward pass")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local or RAY_ADDRESS)")
    add_scan_arguments(p)  # as core predict reads scans
    p.set_defaults(func=_cmd_batch)


def _cmd_batch(args: argparse.Namespace) -> int:
    scan = scan_options(args)
    summary = run_batch(BatchOptions(
        bundle=args.bundle, src=args.src, out=args.out, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size, address=args.address,
        sequences=scan.sequences, series=scan.series, rescale=scan.rescale, spacing=scan.spacing))
    m = summary["metrics"]
    scores = f"; dsc_volume={m['dsc_volume']:.4f} dice_tumour={m['dice_tumour']:.4f}" if m else ""
    print(f"{summary['written']} of {summary['patients']} patients written ({len(summary['skipped'])} skipped, "
          f"{len(summary['failed'])} failed), {summary['slices']} slices{scores}; {args.out}/summary.json")
    return 1 if summary["failed"] else 0
