"""Scans as request bodies and cohort files for the serving tests (Serve, batch, SageMaker, web page):
synthetic slices written as NIfTI and as zipped DICOM studies by tests/volume_support.py, and the bad
bodies every path must refuse with its 4xx."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from volume_support import SPACING, dcm_files, reorient, write_dicom_series, write_nifti, write_study

NIFTI_AXES = ("R", "A", "S")  # stored unlike the model's orientation, so a wrong turn would show
DICOM_AXES = ("L", "P", "S")  # DICOM's usual storage


KAGGLE = ["pre", "flair", "post"]  # the channels of nifti_scan's files: name them (sequences=), nothing guesses
KAGGLE_TEXT = ",".join(KAGGLE)


def nifti_scan(images: np.ndarray, path: Path, axcodes: tuple[str, str, str] = NIFTI_AXES) -> Path:
    """Canonical (N,H,W,3) uint8 slices as a 4D .nii.gz (sequences along the last axis), voxels SPACING; its
    three channels are pre-contrast, FLAIR, post-contrast (KAGGLE), which a reader must be told."""
    source, affine = reorient(images, axcodes)
    return write_nifti(path, source, affine)


def zip_folder(folder: Path, target: Path | None = None) -> bytes:
    """The .dcm files under ``folder`` as zip bytes (written to ``target`` too when given)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in dcm_files(folder):
            zf.write(f, f.relative_to(folder).as_posix())
    if target is not None:
        target.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def dicom_study(images: np.ndarray, folder: Path, axcodes: tuple[str, str, str] = DICOM_AXES) -> dict:
    """Three shuffled series (pre, FLAIR, post) of the slices under ``folder``; write_study's truth."""
    return write_study(folder, images, axcodes)


def two_flair_study(images: np.ndarray, folder: Path) -> dict[int, str]:
    """A routine study: pre, axial FLAIR (series 2), post, and a 3D sagittal FLAIR (series 4) of the same
    head; returns the series UIDs by number."""
    info = write_study(folder, images)
    source, affine = reorient(images, ("A", "S", "L"))  # slices along left-right: sagittal
    write_dicom_series(folder / "s3", source[..., 1], affine, "SAG 3D FLAIR", study=info["study"], series_number=4)
    return {int(ds.SeriesNumber): str(ds.SeriesInstanceUID)
            for ds in (pydicom.dcmread(sorted(dcm_files(folder / f"s{c}"))[0], stop_before_pixels=True)
                       for c in range(4))}


def flair_headers(folder: Path) -> list[pydicom.Dataset]:
    """The FLAIR series (written by dicom_study) in slice-position order."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in dcm_files(folder / "s1")]
    return sorted(headers, key=lambda d: float(d.ImagePositionPatient[2]))


def voxel_ml() -> float:
    return float(np.prod(SPACING)) / 1000.0


def read_nifti_bytes(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def bad_bodies(images: np.ndarray, tmp: Path) -> dict[str, tuple[bytes, str, int, str]]:
    """name -> (body, content type, status, error code) of scans every path must refuse."""
    tmp.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[bytes, str, int, str]] = {}
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", bytes(16 << 20))  # 16 MB of zeros in ~16 kB
    out["zip_bomb"] = (bomb.getvalue(), "application/zip", 413, "zip_bomb")
    source, affine = reorient(images, NIFTI_AXES)
    nan = source[..., 1].astype(np.float32)  # one channel (FLAIR): nothing to name, so the NaN is the refusal
    nan[3, 4, 2] = np.nan
    out["nan_nifti"] = (write_nifti(tmp / "nan.nii.gz", nan, affine).read_bytes(), "application/gzip", 422,
                        "non_finite")
    raw = bytearray(gzip.decompress(write_nifti(tmp / "ok.nii.gz", source, affine).read_bytes()))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:352])))
    header["dim"] = [4, 8192, 8192, 4096, 3, 1, 1, 1]  # claims 800 G voxels; the data is 200 kB
    raw[:348] = header.binaryblock
    out["huge_header"] = (gzip.compress(bytes(raw)), "application/gzip", 413, "too_large")
    study = tmp / "nopixels"
    write_study(study, images)
    first = sorted(dcm_files(study / "s1"))[0]
    ds = pydicom.dcmread(first)
    del ds.PixelData
    ds.save_as(first)
    out["no_pixel_data"] = (zip_folder(study), "application/zip", 422, "no_pixel_data")
    out["gzip_not_nifti"] = (gzip.compress(b"just some text, not a scan " * 40), "application/gzip", 400,
                             "undecodable")
    return out
