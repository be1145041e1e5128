"""One entry point for scans, whatever they are: a NIfTI file, nnU-Net channel files, a DICOM folder or
zip, or the bytes of any of these (an HTTP body), recognised by their bytes as well as their names.

For serve (``POST /v1/segment/volume``), batch and SageMaker::

    volume = load_volume(body, limits=Limits(max_voxels=...))          # VolumeError -> its .status
    masks = predictor.predict(volume.images, volume=True)              # (N,H,W) canonical
    nifti = nifti_mask_bytes(volume, masks, labels=len(class_names) - 1)  # source grid, source header
    seg = dicom_seg_bytes(volume, masks, class_names, model=..., version=...)  # DICOM input only
    ml = volume.volume_ml(masks)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.formats.cases import is_nifti_name
from core.formats.dicom import is_dicom_bytes, is_zip_bytes, looks_like_dicom_dir, read_dicom
from core.formats.media import ACCEPTED, DICOM, NIFTI, SLICES, DecodeError, check_series, sniff
from core.formats.nifti import is_nifti_bytes, read_nifti
from core.formats.volume import Limits, UnreadableVolume, Volume

NIFTI_MEDIA = "application/x-nifti"  # .nii; gzipped bodies are sniffed from their bytes
ZIP_MEDIA = "application/zip"  # a zipped DICOM study
DICOM_MEDIA = "application/dicom"  # one DICOM file (a SEG in responses)
MEDIA_TYPES = {
    "application/x-nifti": NIFTI_MEDIA, "application/nifti": NIFTI_MEDIA, "image/nifti": NIFTI_MEDIA,
    "application/x-nifti-gz": NIFTI_MEDIA, "application/zip": ZIP_MEDIA, "application/x-zip-compressed": ZIP_MEDIA,
    "application/dicom": DICOM_MEDIA, "application/dicom+zip": ZIP_MEDIA,
}


def sniff_volume(data: bytes) -> str | None:
    """'nifti' or 'dicom' from the bytes (a .nii/.nii.gz, a zip, or a single DICOM file), else None."""
    if is_zip_bytes(data) or is_dicom_bytes(data):
        return "dicom"
    if is_nifti_bytes(data):
        return "nifti"
    return None


def volume_kind(path: str | os.PathLike) -> str | None:
    """'nifti' or 'dicom' for a path that holds a scan (by name, then by content), else None."""
    path = Path(path)
    if path.is_dir():
        return "dicom" if looks_like_dicom_dir(path) else None
    if is_nifti_name(path):
        return "nifti"
    if path.suffix.lower() in (".zip", ".dcm"):
        return "dicom"
    if path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(65536)
        return sniff_volume(head)
    return None


def load_volume(
    source: str | os.PathLike | bytes,
    *,
    sequences: Sequence[str] | None = None,
    series: Mapping[str, str] | None = None,
    name: str | None = None,
    limits: Limits = Limits(),
    rescale: str = "auto",
) -> Volume:
    """Read a scan into a canonical Volume; ``sequences`` names NIfTI channels, ``series`` maps DICOM series."""
    kind = sniff_volume(source) if isinstance(source, bytes) else volume_kind(source)
    if kind is None:
        if not isinstance(source, bytes) and not Path(source).exists():
            raise FileNotFoundError(f"{source}: no such file or directory")
        where = "request body" if isinstance(source, bytes) else str(source)
        raise UnreadableVolume(f"{where}: neither NIfTI (.nii, .nii.gz) nor DICOM (a folder, a zip or a .dcm file)")
    check_series(kind, series)
    if kind == "nifti":
        return read_nifti(source, sequences=sequences, name=name, limits=limits, rescale=rescale)
    return read_dicom(source, series=series, name=name, limits=limits, rescale=rescale)


def check_request_size(volume: Volume, max_slices: int, min_size: int, max_size: int) -> Volume:
    """A scan's canonical slices within a request's limits, the same on Serve and SageMaker: 413 ``too_large``
    past ``max_slices`` or ``max_size`` a side, 422 ``invalid_input`` under ``min_size``."""
    from core.formats.media import DecodeError

    n, h, w = volume.images.shape[:3]
    if n > max_slices:
        raise DecodeError(413, "too_large", f"{n} axial slices; at most {max_slices} per request")
    if max(h, w) > max_size:
        raise DecodeError(413, "too_large", f"axial slices of {h}x{w}; at most {max_size} a side")
    if min(h, w) < min_size:
        raise DecodeError(422, "invalid_input", f"axial slices of {h}x{w}; at least {min_size} a side")
    return volume


def body_kind(declared: str | None, data: bytes) -> str:
    """What a request body holds (SLICES, NIFTI or DICOM; ``declared``: what core.formats.media.declared_kind said),
    the same for Serve's volume endpoint and the SageMaker handlers: its bytes decide for a generic or scan
    type (a .nii.gz sent as application/zip is still NIfTI); a slice type is decoded as declared (codecs
    checks its bytes). An empty body is a 400, a body that is nothing known a 400 or 415."""
    if not data:
        raise DecodeError(400, "undecodable", "empty request body")
    if declared == SLICES:
        return SLICES
    sniffed = sniff_volume(data)
    if sniffed:
        return sniffed
    if declared is None and sniff(data):
        return SLICES
    said = "a NIfTI" if declared == NIFTI else "a zipped DICOM study" if declared == DICOM else "an image"
    raise DecodeError(400 if declared else 415, "undecodable" if declared else "unsupported_media_type",
                      f"the body should be {said} but its bytes are none of NIfTI (.nii, .nii.gz), a zip "
                      f"of DICOM files, DICOM, TIFF, PNG or .npy; send {ACCEPTED}")
