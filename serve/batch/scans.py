"""Scans in `serve batch`: NIfTI cases and DICOM studies found in a cohort beside Kaggle-layout folders,
read into canonical volumes, and their masks written on the source grid (NIfTI; DICOM SEG for DICOM).

A cohort may hold, per patient: a NIfTI file at the top (``<case>.nii.gz``, 3D or 4D), the nnU-Net channel
files of one case (``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...), a zipped DICOM study
(``<study>.zip``), or a folder with one of these inside (NIfTI files, or DICOM files with the series in
subfolders or not). Cases are grouped by their names only, so a local folder and an S3 prefix plan the
same jobs. Reading uses core.formats, exactly as `core predict` does; an S3 case is downloaded into a
temporary folder first, since the readers take paths (a study's series, a case's channel files).

What puts a mask back on the source grid (the affine, the NIfTI header, the DICOM series' headers) travels
between the Ray Data stages as plain JSON (``pack``/``unpack``: the header's 348 bytes, each DICOM header
as its own Part 10 bytes), never as pickled objects.
"""

from __future__ import annotations

import base64
import io
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from core.formats.cases import channel_gap, is_truth_name, nifti_cases
from serve.batch.store import Store

if TYPE_CHECKING:
    from core.formats.volume import Volume
    from core.inference.results import VolumeResult

DICOM_SUFFIXES = (".dcm", ".ima", "")


def looks_like_dicom(name: str) -> bool:
    """A file name scanners and PACS give DICOM: ``.dcm``, ``.ima``, none, or a UID-like numeric suffix."""
    suffix = PurePosixPath(name).suffix.lower()
    return suffix in DICOM_SUFFIXES or suffix[1:].isdigit()


def scan_cases(names: list[str]) -> dict[str, list[str]]:
    """The NIfTI cases among a folder's names (core.formats.cases), leaving out `core evaluate`'s ground truth."""
    return nifti_cases([n for n in names if not is_truth_name(n)])


def _job(patient: str, name: str, kind: str, files: list[str], source: str) -> dict[str, Any]:
    return {"patient": patient, "name": name, "id": name, "kind": kind, "files": files, "source": source,
            "images": [], "masks": [], "outputs": [], "error": channel_gap(files) if kind == "nifti" else ""}


def folder_jobs(src: Store, folder: str, names: list[str]) -> list[dict[str, Any]]:
    """Scan jobs of a folder without TIFF/PNG slices: its NIfTI case(s), else its DICOM study."""
    cases = scan_cases([n for n in names if "/" not in n])
    if len(cases) == 1:  # the folder is the patient
        (files,) = cases.values()
        return [_job(folder, folder, "nifti", [f"{folder}/{f}" for f in files], "files")]
    if cases:  # a folder of cases (an nnU-Net imagesTs/, say): one patient each
        return [_job(f"{folder}/{case}", case, "nifti", [f"{folder}/{f}" for f in files], "files")
                for case, files in cases.items()]
    # A local folder is sniffed (DICOM's preamble, or .dcm names); an S3 prefix is judged by its names.
    local = src.local_path(folder)
    if _sniffs_dicom(local) if local is not None else any(looks_like_dicom(n) for n in names):
        return [_job(folder, folder, "dicom", [f"{folder}/{n}" for n in names], "folder")]
    return []


def _sniffs_dicom(folder: Path) -> bool:
    from core.formats.dicom import looks_like_dicom_dir

    return looks_like_dicom_dir(folder)


def top_jobs(names: list[str]) -> list[dict[str, Any]]:
    """Scan jobs of the files at the cohort's top: NIfTI cases and zipped DICOM studies."""
    jobs = [_job(case, case, "nifti", files, "files") for case, files in scan_cases(names).items()]
    jobs += [_job(PurePosixPath(n).stem, PurePosixPath(n).stem, "dicom", [n], "zip") for n in names
             if n.lower().endswith(".zip")]
    return jobs


def named_files(job: dict[str, Any], src: Store) -> list[str]:
    """What a failure names: a case's files or the zip, a DICOM folder as itself (not its every file)."""
    rels = [job["patient"]] if job["source"] == "folder" else job["files"]
    return [src.where(r) for r in rels]


def outputs(name: str, kind: str) -> list[str]:
    return [f"{name}_mask.nii.gz", *([f"{name}_seg.dcm"] if kind == "dicom" else [])]


def read_scan(job: dict[str, Any], src: Store, options: Mapping[str, Any]) -> Volume:
    """The job's scan as a canonical Volume, read by core.formats as `core predict` reads it."""
    from core.formats.dicom import read_dicom
    from core.formats.nifti import read_nifti
    from core.formats.volume import Limits, UnreadableVolume

    if job["error"]:
        raise UnreadableVolume(job["error"])
    with tempfile.TemporaryDirectory(prefix="gliomaseg-scan-") as tmp:
        paths = [_local(src, rel, Path(tmp)) for rel in job["files"]]
        kwargs: dict[str, Any] = {"name": job["name"], "limits": Limits(), "rescale": options.get("rescale", "auto")}
        if job["kind"] == "nifti":
            return read_nifti(paths, sequences=options.get("sequences"), **kwargs)
        if job["source"] == "zip":
            return read_dicom(paths[0], series=options.get("series"), **kwargs)
        folder = src.local_path(job["patient"]) or Path(tmp) / job["patient"]
        return read_dicom(folder, series=options.get("series"), **kwargs)


def _local(src: Store, rel: str, tmp: Path) -> Path:
    """A path to read ``rel`` from: the file itself in a local cohort, else its download under ``tmp``."""
    local = src.local_path(rel)
    if local is not None:
        return local
    target = tmp / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(src.read(rel))
    return target


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pack(volume: Volume) -> dict[str, Any]:
    """Everything but the pixels that writing the masks needs, as JSON-ready values."""
    import pydicom

    datasets = []
    for ds in volume.datasets:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds)
        datasets.append(_b64(buffer.getvalue()))
    header = volume.header
    return {"affine": volume.affine.tolist(), "source_shape": list(volume.source_shape), "kind": volume.kind,
            "name": volume.name, "sources": volume.sources, "filled": list(volume.filled), "notes": volume.notes,
            "shape": list(volume.images.shape[:3]), "frames": [int(f) for f in volume.frames],
            "resampled_from": None if volume.resampled_from is None else list(volume.resampled_from),
            "header": None if header is None else [type(header).__name__, _b64(header.binaryblock)],
            "datasets": datasets}


def unpack(geometry: Mapping[str, Any]) -> Volume:
    """pack's values -> a Volume whose images are a zero-cost stand-in (masks need only their shape)."""
    import nibabel as nib
    import pydicom

    from core.formats.volume import Volume

    header = None
    if geometry["header"] is not None:
        klass = {"Nifti1Header": nib.Nifti1Header, "Nifti2Header": nib.Nifti2Header}[geometry["header"][0]]
        header = klass(binaryblock=base64.b64decode(geometry["header"][1]), check=False)
    datasets = [pydicom.dcmread(io.BytesIO(base64.b64decode(d))) for d in geometry["datasets"]]
    stand_in = np.broadcast_to(np.zeros((), np.uint8), (*geometry["shape"], 3))
    return Volume(images=stand_in, affine=np.asarray(geometry["affine"], np.float64),
                  source_shape=tuple(geometry["source_shape"]), kind=geometry["kind"], name=geometry["name"],
                  sources=dict(geometry["sources"]), filled=tuple(geometry["filled"]), notes=list(geometry["notes"]),
                  header=header, datasets=datasets, frames=list(geometry["frames"]),
                  resampled_from=None if geometry.get("resampled_from") is None else tuple(geometry["resampled_from"]))


def scan_result(geometry: Mapping[str, Any], masks: np.ndarray, class_names: list[str],
                quality: float | None = None, review: bool | None = None) -> VolumeResult:
    """A scan's masks on the grid ``pack`` recorded: what the NIfTI mask, the SEG and the mL come from."""
    from core.inference.results import VolumeResult

    return VolumeResult(unpack(geometry), np.asarray(masks, np.uint8), class_names, quality, review)


def scan_files(result: VolumeResult, model: str, version: str) -> dict[str, bytes]:
    """The files to write: the NIfTI mask, and a DICOM SEG for DICOM (``model`` and ``version`` name its maker)."""
    names = outputs(result.volume.name, result.volume.kind)
    files = {names[0]: result.nifti_bytes()}
    if result.volume.kind == "dicom":
        files[names[1]] = result.seg_bytes(model, version)
    return files
