"""DICOM frames to values (pydicom): single-frame instances and the frames of enhanced (multi-frame) images.

An enhanced image (Enhanced MR, Legacy Converted Enhanced MR: what Siemens XA, Philips and archive
converters write) keeps each frame's geometry in its functional groups, per frame or shared by all:
PlanePositionSequence (ImagePositionPatient), PlaneOrientationSequence (ImageOrientationPatient),
PixelMeasuresSequence (PixelSpacing, SliceThickness) and PixelValueTransformationSequence (rescale).
``frame_headers`` turns each frame into a small header with those single-frame attributes, so that
core.formats.dicom orders and checks the frames exactly as it does a series of single-frame files, and
the two give the same volume.

Stored values become numbers by the modality LUT (rescale slope/intercept or a LUT sequence).
MONOCHROME1 (bright means low) is turned round within the stored range of the series (0..2**BitsStored-1,
or its signed range), one rule for every slice: a slice's own maximum would shift each slice by a
different amount.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from core.formats.volume import DimensionError, NoPixelDataError, UnreadableVolume, VolumeError

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Series-level attributes a frame header carries, so it stands for its series as a single-frame header does
COPIED = ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "ProtocolName", "FrameOfReferenceUID",
          "Rows", "Columns", "BitsStored", "PixelRepresentation", "PhotometricInterpretation", "Modality")
# functional group -> the single-frame attributes it holds
GROUPS = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
}


def is_multiframe(ds: Any) -> bool:
    """An image with several frames, or an enhanced one (functional groups) even with one."""
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def _item(holder: Any, keyword: str) -> Any:
    seq = holder.get(keyword) if holder is not None else None
    return seq[0] if seq else None


def frame_headers(ds: Any, where: str) -> list[Dataset]:
    """One header per frame with the attributes of a single-frame image: a frame's own functional group
    wins over the shared one, which wins over a top-level attribute (some converters put them there)."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if per_frame and len(per_frame) != n:
        raise VolumeError(f"{where}: {n} frames but {len(per_frame)} per-frame functional group items")
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    out = []
    for i in range(n):
        frame = per_frame[i] if per_frame else None
        header = Dataset()
        for keyword in COPIED:
            if keyword in ds:
                setattr(header, keyword, ds[keyword].value)
        for group, keywords in GROUPS.items():
            item = _item(frame, group) or _item(shared, group)
            for keyword in keywords:
                value = item.get(keyword) if item is not None else None
                if value is None:
                    value = ds.get(keyword)
                if value is not None and value != "":
                    setattr(header, keyword, value)
        out.append(header)
    return out


def frames_of(ds: Any, where: str) -> np.ndarray:
    """The decoded frames (F, rows, columns) of an instance read with its pixel data."""
    if ds is None or not any(k in ds for k in PIXEL_KEYWORDS):
        raise NoPixelDataError(f"{where}: no pixel data")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # missing codec, truncated data
        raise UnreadableVolume(f"{where}: pixel data not decodable ({type(exc).__name__}: {exc})") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or raw.ndim != (3 if frames > 1 else 2):
        raise DimensionError(f"{where}: pixel data of shape {raw.shape}, expected {frames} greyscale frame(s)")
    return raw.reshape((frames, *raw.shape[-2:]))


def stored_range(header: Any) -> tuple[int, int]:
    """The stored values a series can hold: 0..2**BitsStored-1, or the signed range."""
    bits = int(header.get("BitsStored", 16) or 16)
    if int(header.get("PixelRepresentation", 0) or 0):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def frame_values(raw: np.ndarray, header: Any, span: tuple[int, int], where: str) -> tuple[np.ndarray, bool]:
    """One frame's stored values -> (values, whether they are 8-bit display levels), MONOCHROME1 turned
    round within ``span`` (the series' stored range); ``header`` gives the photometric and the rescale."""
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise VolumeError(f"{where}: {photometric} images; expected greyscale (MONOCHROME2)")
    if photometric == "MONOCHROME1":  # bright means low: the same turn for every slice keeps their contrast
        lo, hi = span
        raw = (lo + hi - np.clip(raw.astype(np.int64), lo, hi)).astype(raw.dtype)
    slope = float(header.get("RescaleSlope", 1) or 1)
    intercept = float(header.get("RescaleIntercept", 0) or 0)
    display = int(header.get("BitsStored", 16)) <= 8 and slope == 1 and intercept == 0 and raw.dtype.kind == "u"
    return np.asarray(apply_modality_lut(raw, header), np.float32), display
