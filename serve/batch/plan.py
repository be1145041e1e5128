"""Which patients a `serve batch` cohort holds: Kaggle-layout folders of TIFF/PNG slices, NIfTI cases and
DICOM studies (serve.batch.scans), one job each, with names unique in a stable order (a rerun finds
the same names, so it skips the patients already written)."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath
from typing import Any

from serve.batch import scans
from serve.batch.store import Store

log = logging.getLogger("serve.batch")


def plan(src: Store) -> list[dict[str, Any]]:
    """One job per patient: a folder of slices (in slice order, core.formats.cases.slice_order; masks where
    every slice has one), a NIfTI case or a DICOM study (a folder, or a zip at the top). Names are made unique
    in a stable order. A folder whose slices cannot be ordered is a job carrying its ``error``: that patient
    fails, named, and the rest of the cohort runs."""
    from core.data.prepare import patient_id
    from core.formats.cases import slice_order
    from core.inference.jobs import SUFFIXES, safe_name

    top, folders = src.tree()
    jobs: list[dict[str, Any]] = []
    for folder, everything in folders.items():
        names = [n for n in everything if "/" not in n]
        present = set(names)
        images = sorted(n for n in names if PurePosixPath(n).suffix.lower() in SUFFIXES
                        and not PurePosixPath(n).stem.endswith("_mask") and not n.startswith("."))
        error = ""
        try:
            images = slice_order(images)
        except ValueError as exc:
            error = f"{src.where(folder)}: {exc}"
        if not images:
            found = scans.folder_jobs(src, folder, everything)
            if not found:
                log.warning("%s: no TIFF or PNG slices, NIfTI case or DICOM study; not a patient, ignored",
                            src.where(folder))
            jobs += found
            continue
        # <stem>_mask with the image's suffix, else any other (a PNG slice may have a TIFF mask)
        masks = [next((m for s in (PurePosixPath(n).suffix, *SUFFIXES)
                       if (m := f"{PurePosixPath(n).stem}_mask{s}") in present), "") for n in images]
        if any(masks) and not all(masks):
            log.warning("%s: masks for %d of %d slices; no metrics for this patient",
                        src.where(folder), sum(map(bool, masks)), len(images))
        jobs.append({"patient": folder, "name": folder, "id": patient_id(folder), "kind": "slices", "error": error,
                     "images": images, "masks": masks if all(masks) else [],
                     "outputs": [f"{safe_name(PurePosixPath(n).stem)}_mask.tif" for n in images]})
    jobs += scans.top_jobs(top)
    if not jobs:
        raise ValueError(f"{src.uri}: no patients: expected <patient>/<slice>.tif folders, NIfTI cases "
                         "(<case>.nii.gz, <case>_0000.nii.gz ...) or DICOM studies (a folder or a .zip)")
    seen: dict[str, int] = {}
    for job in jobs:  # two patients whose names clean to the same one must not share an output
        name = safe_name(job["name"])
        count = seen.get(name, 0)
        seen[name] = count + 1
        job["name"] = f"{name}_{count + 1}" if count else name
        if job["kind"] != "slices":
            job["id"], job["outputs"] = job["name"], scans.outputs(job["name"], job["kind"])
    return jobs
