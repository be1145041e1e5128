"""Scans with known geometry for the format tests: the project's synthetic slices written as NIfTI files
and DICOM series (pydicom), in any orientation, with the source-grid truth to compare against."""

from __future__ import annotations

import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from core.formats.volume import CANONICAL_AXES

SPACING = (3.0, 0.9, 0.8)  # canonical (slice, row, column) mm: distinct, so a swapped axis shows


def canonical_affine(spacing: tuple[float, float, float] = SPACING, origin=(90.0, 110.0, -20.0)) -> np.ndarray:
    """RAS+ affine of a canonical (slice, row, column) array: slices toward superior, rows toward posterior,
    columns toward the patient's left (the Kaggle display orientation)."""
    sz, sy, sx = spacing
    affine = np.zeros((4, 4))
    affine[:3, 0] = (0, 0, sz)
    affine[:3, 1] = (0, -sy, 0)
    affine[:3, 2] = (-sx, 0, 0)
    affine[:3, 3] = origin
    affine[3, 3] = 1
    return affine


def rotation(degrees: float, axis: int) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(4)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def reorient(canonical: np.ndarray, axcodes: tuple[str, str, str], affine: np.ndarray | None = None,
             rotate: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A canonical array stored with another axis order and direction (RAS+ codes of its three voxel
    axes), and the affine that keeps every voxel where it was; ``rotate`` tilts the world (oblique)."""
    affine = canonical_affine() if affine is None else affine
    t = ornt_transform(axcodes2ornt(CANONICAL_AXES), axcodes2ornt(axcodes))
    source = np.ascontiguousarray(apply_orientation(canonical, t))
    source_affine = affine @ inv_ornt_aff(t, canonical.shape[:3])
    if rotate is not None:
        source_affine = rotate @ source_affine
    return source, source_affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    image = nib.Nifti1Image(data if dtype is None else data.astype(dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


def write_dicom_series(
    folder: Path,
    source: np.ndarray,
    affine: np.ndarray,
    description: str,
    *,
    study: dict | None = None,
    series_number: int = 1,
    seed: int = 0,
    bits_stored: int | None = None,
) -> list[Path]:
    """One single-frame MR series of a (columns, rows, slices) array on a RAS+ affine's grid, files
    named and numbered in shuffled order (so only ImagePositionPatient can order them)."""
    study = study or new_study()
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    row_cos, col_cos = lps[:3, 0] / np.linalg.norm(lps[:3, 0]), lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    spacing = [float(np.linalg.norm(lps[:3, 1])), float(np.linalg.norm(lps[:3, 0]))]
    values = np.asarray(source)
    bits = bits_stored or (8 if values.max() <= 255 else 16)
    series_uid = generate_uid()
    rng = np.random.default_rng(seed)
    order = rng.permutation(values.shape[2])
    paths = []
    for rank, k in enumerate(order):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        for key, value in study.items():
            setattr(ds, key, value)
        ds.Modality, ds.Manufacturer = "MR", "gliomaseg-tests"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, series_number, description
        ds.InstanceNumber = int(rank + 1)  # shuffled on purpose: not the slice order
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [round(float(v), 6) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.PixelSpacing = [round(v, 6) for v in spacing]
        ds.SliceThickness = round(float(np.linalg.norm(lps[:3, 2])), 6)
        ds.Rows, ds.Columns = int(values.shape[1]), int(values.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
        ds.PixelData = np.ascontiguousarray(values[:, :, k].T.astype("<u2")).tobytes()
        path = folder / f"IM{rng.integers(1 << 30):010d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def new_study(patient: str = "SYNTH001") -> dict:
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    return {
        "PatientName": "Synthetic^Patient", "PatientID": patient, "PatientBirthDate": "19700101",
        "PatientSex": "O", "StudyInstanceUID": generate_uid(), "StudyID": "1", "AccessionNumber": "A1",
        "StudyDate": now.strftime("%Y%m%d"), "StudyTime": now.strftime("%H%M%S"), "ReferringPhysicianName": "",
        "FrameOfReferenceUID": generate_uid(), "SeriesDate": now.strftime("%Y%m%d"),
    }


def write_study(folder: Path, canonical: np.ndarray, axcodes=("L", "P", "S"), rotate=None,
                descriptions=("T1 PRE", "AX T2 FLAIR", "T1 POST GAD"), seed: int = 0,
                spacing: tuple[float, float, float] = SPACING) -> dict:
    """A DICOM study of three series (one per channel of canonical (N,H,W,3) slices) stored in the
    orientation ``axcodes`` with voxels of ``spacing``; returns the source-grid truth and the study attributes."""
    study = new_study()
    source, affine = reorient(canonical, axcodes, canonical_affine(spacing), rotate=rotate)
    for c, description in enumerate(descriptions):
        write_dicom_series(folder / f"s{c}", source[..., c], affine, description, study=study,
                           series_number=c + 1, seed=seed + c)
    return {"source": source, "affine": affine, "study": study}


def dcm_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def read_headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in dcm_files(folder)]


def enhance_series(folder: Path) -> Path:
    """Replace the single-frame series in ``folder`` by one Legacy Converted Enhanced MR image (highdicom),
    its frames in the shuffled file order, so that only their plane positions can order them."""
    import logging

    import highdicom as hd

    logging.getLogger("highdicom").setLevel(logging.ERROR)  # attributes our synthetic files lack are noted
    files = dcm_files(folder)
    datasets = [pydicom.dcmread(p) for p in files]
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=datasets[0].SeriesInstanceUID, series_number=int(datasets[0].SeriesNumber),
        sop_instance_uid=hd.UID(), instance_number=1, include_dimension_index=False)
    for p in files:
        p.unlink()
    target = folder / "enhanced.dcm"
    image.save_as(target, enforce_file_format=True)
    return target


def strip_attributes(folder: Path, keywords: tuple[str, ...]) -> None:
    """Remove attributes from every file under ``folder``, as an anonymiser does."""
    for path in dcm_files(folder):
        ds = pydicom.dcmread(path)
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path)
