"""What `python -m core predict --bundle B INPUT... --out DIR` writes: masks for slices, patients and scans.

INPUT is a TIFF/PNG/NPY slice (a multi-page TIFF or an .npy stack: a volume), a patient folder (its slices
form one volume, so 3D post-processing applies), a folder of patient folders, a NIfTI scan
(``.nii``/``.nii.gz``, 4D or nnU-Net channel files ``<case>_0000.nii.gz`` ...) or a DICOM study (a folder or a
``.zip``). A scan gives ``<name>_mask.nii.gz`` on its own grid (its header, or the DICOM series' geometry),
for DICOM also ``<name>_seg.dcm`` (a DICOM SEG referencing the series), and its tumour volume in mL in
predictions.csv. Output names come from input names with every path part and unusual character removed, so
nothing is written outside ``--out`` (core.inference.jobs); a scan's or a patient's ``<name>_volume.json`` is
the result schema (core.inference.results) with the answer's notes. A patient's slices have the ``--spacing``
given (core.inference.spacing), else the Kaggle grid's, assumed and said so. The command line itself is
core/inference/cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.formats.decoders import read_file, stack_volume
from core.formats.encoders import encode_mask_png, mask_scale
from core.formats.overlays import encode_overlay_png
from core.inference.jobs import Job, ScanOptions, collect_jobs, safe_name
from core.inference.results import result_json, review_label, segment_volume
from core.inference.spacing import scan_spacing, stack_spacing
from core.io import atomic_write_bytes, write_csv, write_json

if TYPE_CHECKING:
    from core.inference.slices import SlicePredictor

COLUMNS = ["input", "mask", "tumour_pixels", "volume_ml", "quality", "review", "dicom_seg", "notes"]
LOCAL_MAX_SIZE, LOCAL_MAX_PAGES = 4096, 4096


def read_image(path: Path, raw: bool = False) -> np.ndarray:
    """(N,H,W,3) uint8 slices of one TIFF/PNG/NPY file (TIFF pages or an .npy stack: a volume).

    Same decoding rules as the HTTP API (uint16 rescaled, grey replicated to 3 channels), with limits
    wide enough for local files; ``raw=True`` keeps uint16 for ``stack_volume`` to scale a patient's files as one.
    """
    return read_file(str(path), volume=True, max_size=LOCAL_MAX_SIZE, max_pages=LOCAL_MAX_PAGES,
                     max_pixels=LOCAL_MAX_SIZE * LOCAL_MAX_SIZE * 64, raw=raw)


def read_slices(job: Job) -> tuple[list[tuple[Path, str]], np.ndarray]:
    """A slice job's (input file, output stem) per slice and its (N,H,W,3) uint8 slices: a patient folder's
    files (or a multi-page TIFF's pages) become one volume, one intensity scale for all (``stack_volume``)."""
    entries: list[tuple[Path, str]] = []
    pages: list[np.ndarray] = []
    for path in job.paths:
        slices = read_image(path, raw=True)
        stem = safe_name(path.stem) if job.volume else job.name
        entries += [(path, stem if len(slices) == 1 else f"{stem}_{i + 1}") for i in range(len(slices))]
        pages += list(slices)
    return entries, stack_volume(pages, [str(path) for path, _ in entries])


def _run_scan(predictor: SlicePredictor, job: Job, out: Path, options: ScanOptions) -> dict[str, object]:
    from core.formats.dicom import read_dicom
    from core.formats.nifti import read_nifti
    from core.formats.volume import Limits

    limits = options.limits or Limits()
    if job.kind == "nifti":
        volume = read_nifti(job.paths, sequences=options.sequences, name=job.name, limits=limits,
                            rescale=options.rescale)
    else:
        volume = read_dicom(job.paths[0], series=options.series, name=job.name, limits=limits,
                            rescale=options.rescale)
    scan_spacing(volume, options.spacing)  # a --spacing that contradicts the header is refused
    result = segment_volume(predictor, volume)
    # Every output is encoded before any is written, so a failure leaves nothing half-written.
    outputs = {f"{job.name}_mask.nii.gz": result.nifti_bytes()}
    if volume.kind == "dicom":
        outputs[f"{job.name}_seg.dcm"] = result.seg_bytes(str(predictor.config.get("name") or "gliomaseg"),
                                                          predictor.version)
    for name, data in outputs.items():
        atomic_write_bytes(out / name, data)
    summary = result_json(result.masks, predictor.version, result.class_names, scan=result, rle=False)
    write_json(out / f"{job.name}_volume.json", {"name": job.name, **summary})
    source = job.paths[0] if len(job.paths) == 1 else job.paths[0].parent / f"{job.name} ({len(job.paths)} files)"
    return {"input": str(source), "mask": f"{job.name}_mask.nii.gz",
            "tumour_pixels": int(np.count_nonzero(result.masks)), "volume_ml": round(result.volume_ml, 4),
            "quality": result.quality, "review": review_label(result.review),
            "dicom_seg": f"{job.name}_seg.dcm" if volume.kind == "dicom" else "", "notes": "; ".join(volume.notes)}


def _run_slices(predictor: SlicePredictor, job: Job, out: Path, options: ScanOptions, scale: int
                ) -> list[dict[str, object]]:
    """A slice job: one slice alone, or a patient's slices (a folder, a multi-page TIFF) as one volume at the
    given spacing (else the Kaggle grid's, assumed and said so); one row per slice, and for a volume its
    ``<name>_volume.json`` (the result schema: its mL where the spacing was given, and its notes)."""
    entries, images = read_slices(job)  # a multi-page TIFF gives several slices of one file
    volume = job.volume or len(entries) > 1
    quality: object = ""
    review, notes, voxel_ml = "", "", None
    if volume:
        spacing = stack_spacing(options.spacing)
        answer = predictor.segment(images, spacing=spacing.mm)
        masks, quality = answer.masks, answer.quality
        review = review_label(answer.review)
        names = list(predictor.config.get("class_names", ["background", "tumour"]))
        summary = result_json(masks, predictor.version, names, answer=answer, rle=False, spacing=spacing)
        write_json(out / f"{job.name}_volume.json", {"name": job.name, **summary})
        notes, voxel_ml = "; ".join(summary["notes"]), summary["voxel_ml"]
    else:  # single slices: the one-slice mm2 rules at the given pixel size
        masks = predictor.predict(images, spacing=options.spacing)
    target = out / job.name if volume else out
    rows: list[dict[str, object]] = []
    for (path, stem), image, mask in zip(entries, images, masks, strict=True):
        atomic_write_bytes(target / f"{stem}_mask.png", encode_mask_png(mask, scale))
        atomic_write_bytes(target / f"{stem}_overlay.png", encode_overlay_png(image, mask))
        pixels = int(np.count_nonzero(mask))
        rows.append({"input": str(path), "mask": (target / f"{stem}_mask.png").relative_to(out).as_posix(),
                     "tumour_pixels": pixels, "volume_ml": "" if voxel_ml is None else round(pixels * voxel_ml, 6),
                     "quality": quality, "review": review, "dicom_seg": "", "notes": notes})
    return rows


def run(predictor: SlicePredictor, inputs: list[Path], out: Path, options: ScanOptions | None = None
        ) -> list[dict[str, object]]:
    """Predict every job; write <name>_mask.png and <name>_overlay.png per slice (a NIfTI mask, and a DICOM
    SEG for DICOM, per scan); return one row per slice or scan (a slice of a volume: its own mL, where the
    spacing is known)."""
    options = options or ScanOptions()
    scale = mask_scale(predictor.config.get("class_names", ["background", "tumour"]))
    rows: list[dict[str, object]] = []
    for job in collect_jobs(inputs):
        if job.kind != "slices":
            rows.append(_run_scan(predictor, job, out, options))
        else:
            rows += _run_slices(predictor, job, out, options, scale)
    write_csv(out / "predictions.csv", rows, COLUMNS)
    return rows
