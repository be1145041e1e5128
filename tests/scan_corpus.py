"""A small corpus of scans that every entry point must answer alike (issue 41): `core predict`, `serve
predict`, ``POST /v1/segment/volume``, `serve batch` and the SageMaker handlers.

``synthetic_scans`` writes it under a folder at test time from the synthetic generator (core.data.synth),
with tifffile, Pillow, numpy, nibabel (tests/volume_support.py), pydicom and highdicom; ``real_scan`` adds
slices of one lossless real patient (tests/conftest.py's ``real_lgg_src``) where the data is. Each scan
exercises one item of the issue: PNG slice files whose number is not at the end of the name, 16-bit slices
with one hot pixel (one intensity rule per volume), slice stacks with a spacing given or assumed, NIfTI
files named, unnamed or 3D, DICOM studies (single-frame, enhanced multi-frame, two FLAIR-like series) and
the notes their answers carry. Nothing here runs an entry point: tests/test_scan_corpus.py does.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from scan_support import KAGGLE_TEXT, dicom_study, nifti_scan, two_flair_study, zip_folder
from volume_support import SPACING, enhance_series, strip_attributes

from core.formats import codecs

CORE, CLIENT, HTTP, BATCH, SAGEMAKER = "core predict", "serve predict", "http", "serve batch", "sagemaker"
ENTRY_POINTS = (CORE, CLIENT, HTTP, BATCH, SAGEMAKER)
STACK_FILE = (CORE, CLIENT, HTTP, SAGEMAKER)  # slices in one file (TIFF pages, .npy): `serve batch` reads one a file
SPACING_TEXT = ",".join(f"{v:g}" for v in SPACING)  # every scan's header spacing, given to slice stacks too
GZ, ZIP = "application/gzip", "application/zip"
HOT = (4, 30, 33)  # (slice, row, column) of the planted 16-bit hot pixel
NAMED = "case_t1_flair_t1ce.nii.gz"  # a 4D NIfTI whose file name names its three channels in order


@dataclass
class Scan:
    """One corpus entry: what the CLIs and `serve batch` read, what HTTP and SageMaker are sent, the options
    (Serve's query, SageMaker's custom attributes, the CLIs' flags) and, for a refusal, its status and code."""

    name: str
    path: Path  # a slice folder, a slice-stack file, a NIfTI file or a zipped DICOM study
    body: bytes  # the file's bytes, or a slice folder's pixels in slice order as one multi-page TIFF
    content_type: str
    options: dict[str, str] = field(default_factory=dict)  # spacing, sequences, series
    paths: tuple[str, ...] = ENTRY_POINTS  # the entry points that take this input
    error: tuple[int, str] | None = None  # (status, error code) every path refuses it with
    s3: bool = False  # SageMaker reads it from S3, whose key keeps the file name (a body has none)

    @property
    def scan(self) -> bool:
        """A NIfTI or DICOM scan: its masks also come back on its own grid."""
        return self.content_type in (GZ, ZIP)

    @property
    def dicom(self) -> bool:
        """A DICOM study: its masks also come back as a DICOM SEG."""
        return self.content_type == ZIP

    @property
    def file_name(self) -> str | None:
        """The name HTTP sends a scan with (Content-Disposition), as `serve predict` does."""
        return self.path.name if self.scan else None


def synthetic_images(root: Path, slices: int = 10, seed: int = 5) -> np.ndarray:
    """(N,64,64,3) uint8 slices of one synthetic patient (core.data.synth)."""
    from core.data.prepare import read_patients
    from core.data.synth import synthesize

    return next(read_patients(synthesize(root, patients=1, slices=slices, size=64, seed=seed))).images


def tiff_bytes(stack: np.ndarray) -> bytes:
    """A multi-page TIFF of (N,H,W,3) RGB or (N,H,W) grey slices."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, stack, photometric="rgb" if stack.ndim == 4 else "minisblack")
    return buffer.getvalue()


def write_slices(folder: Path, names: list[str], stack: np.ndarray) -> Path:
    """One TIFF or PNG file per slice, ``names[k]`` holding ``stack[k]``, written in reverse (creation order
    says nothing)."""
    from PIL import Image

    folder.mkdir(parents=True)
    for name, image in reversed(list(zip(names, stack, strict=True))):
        if name.endswith(".png"):
            Image.fromarray(image).save(folder / name)
        else:
            tifffile.imwrite(folder / name, image)
    return folder


def hot_uint16(images: np.ndarray) -> np.ndarray:
    """(N,H,W) uint16 of the FLAIR channel on a 12-bit-like scale, zero kept zero, one pixel at 65535."""
    flair = images[..., 1].astype(np.uint16)
    stack = np.where(flair > 0, 300 + 14 * flair, 0).astype(np.uint16)
    stack[HOT] = 65535
    return stack


def _zip(folder: Path) -> Path:
    target = folder.with_suffix(".zip")
    zip_folder(folder, target)
    return target


def synthetic_scans(root: Path) -> list[Scan]:
    """The synthetic corpus under ``root`` (one folder per scan)."""
    images = synthetic_images(root / "synth")
    n = len(images)
    spacing = {"spacing": SPACING_TEXT}
    order = write_slices(root / "order" / "order", [f"s{k + 1}_flair.png" for k in range(n)], images)
    stack16 = hot_uint16(images)
    hot16 = write_slices(root / "hot16" / "hot16", [f"P_{k + 1}.tif" for k in range(n)], stack16)
    (root / "stacks").mkdir()
    tiff = root / "stacks" / "stack16.tif"
    tiff.write_bytes(tiff_bytes(stack16))
    npy = root / "stacks" / "stack.npy"
    npy.write_bytes(codecs.encode_npy(images))
    (root / "named").mkdir()
    named = nifti_scan(images, root / "named" / NAMED)
    (root / "unnamed").mkdir()
    unnamed = nifti_scan(images, root / "unnamed" / "case.nii.gz")
    (root / "flair3d").mkdir()
    flair3d = nifti_scan(images[..., 1], root / "flair3d" / "case3d.nii.gz")  # one channel: FLAIR, the rest filled
    dicom_study(images, root / "dicom" / "study")
    strip_attributes(root / "dicom" / "study", ("PatientSex",))  # anonymised: the answer notes it
    dicom_study(images, root / "enhanced" / "enhanced")
    enhance_series(root / "enhanced" / "enhanced" / "s1")  # FLAIR as one multi-frame image (highdicom)
    two_flair_study(images, root / "two" / "two_flair")
    study, enhanced, two = (_zip(root / d) for d in ("dicom/study", "enhanced/enhanced", "two/two_flair"))
    return [
        Scan("order", order, tiff_bytes(images), codecs.TIFF),  # spacing assumed: the answer says so
        Scan("hot16", hot16, tiff_bytes(stack16), codecs.TIFF, spacing),
        Scan("hot16_tiff", tiff, tiff.read_bytes(), codecs.TIFF, spacing, paths=STACK_FILE),
        Scan("stack_npy", npy, npy.read_bytes(), codecs.NPY, spacing, paths=STACK_FILE),
        Scan("nifti_named", named, named.read_bytes(), GZ, s3=True),
        Scan("nifti_unnamed", unnamed, unnamed.read_bytes(), GZ, error=(422, "unnamed_sequences")),
        Scan("nifti_told", unnamed, unnamed.read_bytes(), GZ, {"sequences": KAGGLE_TEXT}),
        Scan("nifti_3d", flair3d, flair3d.read_bytes(), GZ),
        Scan("dicom", study, study.read_bytes(), ZIP),
        Scan("dicom_enhanced", enhanced, enhanced.read_bytes(), ZIP),
        Scan("two_flair", two, two.read_bytes(), ZIP, error=(422, "several_series")),
        Scan("two_flair_told", two, two.read_bytes(), ZIP, {"series": "2"}),
    ]


def real_scan(kaggle_dir: Path, root: Path, first: int = 6, slices: int = 8) -> Scan:
    """A lossless real patient's slices ``first`` .. ``first + slices - 1`` (Kaggle names, so ``_9`` comes
    before ``_10``), copied into a folder of their own; its body stacks them by that number."""
    patient = sorted(d for d in kaggle_dir.iterdir() if d.is_dir())[0]
    folder = root / "real" / patient.name
    folder.mkdir(parents=True)
    ks = range(first, first + slices)
    for k in ks:
        shutil.copy(patient / f"{patient.name}_{k}.tif", folder)
    stack = np.stack([tifffile.imread(folder / f"{patient.name}_{k}.tif") for k in ks])
    return Scan("real", folder, tiff_bytes(stack), codecs.TIFF)


def batch_name(scan: Scan) -> str:
    """The patient name `serve batch` gives a scan copied to its cohort's top (a folder, a case, a zip)."""
    name = scan.path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def batch_groups(scans: list[Scan]) -> list[tuple[dict[str, str], list[Scan]]]:
    """The `serve batch` runs that cover ``scans``: its options are the cohort's, so one run holds the scans
    without options, another those with any (their options merged: each applies only to its own kind of
    input, a slice stack's spacing agreeing with every scan's header), each patient name once per run."""
    plain = [s for s in scans if BATCH in s.paths and not s.options]
    told = [s for s in scans if BATCH in s.paths and s.options]
    merged: dict[str, str] = {}
    for s in told:
        for key, value in s.options.items():
            assert merged.setdefault(key, value) == value, f"{s.name}: {key}={value} vs {merged[key]}"
    groups = [(opts, group) for opts, group in (({}, plain), (merged, told)) if group]
    for _, group in groups:
        names = [batch_name(s) for s in group]
        assert len(set(names)) == len(names), names
    return groups
