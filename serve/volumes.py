"""Whole-patient requests (``POST /v1/segment/volume``): what a body is, which answer was asked for, and
that answer's bytes. Pure functions over bytes and arrays, no Ray: the ingress runs the heavy ones in a
thread, and tests call them directly.

Bodies are a slice stack (multi-page TIFF, (N,H,W,3) ``.npy``, one PNG; core.formats.codecs) or a scan
(NIfTI ``.nii``/``.nii.gz``, a zipped DICOM study, one DICOM file; core.formats.load), known by the
Content-Type (core.formats.media.SCAN_TYPES, codecs.MEDIA_ALIASES) and, for a generic or missing type or a
scan type, by their magic bytes. A scan's masks come back on its own grid (NIfTI with the source's affine
and header; DICOM SEG referencing the source series) or, as TIFF/NPY, in the model's canonical slice order.
The output is ``format=`` if given, else the best ``Accept`` type this body can have (core.formats.media,
as SageMaker negotiates), else NIfTI for a scan and a multi-page TIFF for a slice stack; JSON is the result
schema (core.inference.results). Every refusal is a codecs.DecodeError (its status, error and detail
become the JSON error response).

A scan body may be named (``Content-Disposition: attachment; filename="patient_t1.nii.gz"``): the name
becomes the answer's file names and, for a 3D NIfTI, says its sequence as a file name does for `core
predict`; ``sequences=flair,t1,...`` names a NIfTI's channels as ``--sequences`` does. ``spacing=z,y,x`` (mm)
gives a slice stack its geometry (core.inference.spacing); without it the answer says which it assumed.
Binary answers carry the JSON answer's ``notes`` in ``X-Notes``. ``series=`` (a SeriesNumber or
SeriesInstanceUID for the FLAIR series, or ``flair=3,pre=1``) picks a DICOM study's series as ``--series`` does.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

from core.formats import codecs
from core.formats.media import (
    DICOM_MEDIA,
    FORMATS,
    NIFTI_MEDIA,
    SLICES,
    choose_format,
    preferences,
)

if TYPE_CHECKING:
    from core.formats.volume import Limits, Volume
    from core.inference.results import VolumeResult
    from core.inference.spacing import VoxelSpacing

# What this endpoint answers a volume with; png only with overlay=true (an animation of the overlays).
VOLUME_FORMATS = ("nifti", "dicom-seg", "tiff", "npy", "json")
SEQUENCE_VIEWS = ("rgb", "pre", "flair", "post")  # rgb: the three blended, as the model sees them
_FILENAME = re.compile(r"""filename\*?\s*=\s*(?:[\w-]+'[\w-]*')?"?([^";]+)"?""", re.IGNORECASE)
SCAN_EXTENSIONS = (".nii.gz", ".nii", ".zip", ".dcm", ".gz")
MASK_ALPHA = 0.45  # as codecs.overlay, so a page compositing the layers shows what overlay=true burns in


def body_kind(declared: str | None, data: bytes) -> str:
    """core.formats.load.body_kind, imported here when a body comes (nibabel and pydicom load with it)."""
    from core.formats.load import body_kind as kind_of

    return kind_of(declared, data)


def offered(overlay: bool) -> tuple[str, ...]:
    return (*VOLUME_FORMATS, "png") if overlay else VOLUME_FORMATS


def requested(fmt: str | None, accept: str | None, overlay: bool) -> list[str]:
    """The answers asked for, best first: ``format=`` alone where given (400 for an unknown one), else the
    Accept header's (core.formats.media.preferences: q-values; 406 for one that lists nothing made here)."""
    if fmt is not None:
        fmt = fmt.strip().lower()
        if fmt not in FORMATS:
            raise codecs.DecodeError(400, "bad_request", f"format={fmt!r}; expected one of {', '.join(FORMATS)}")
        if fmt == "png" and not overlay:
            raise codecs.DecodeError(400, "bad_request", "format=png is for single slices; use nifti, dicom-seg, "
                                                          "tiff, npy or json for volumes (or overlay=true)")
        return [fmt]
    return preferences(accept, offered(overlay), " (image/png with overlay=true); or give format=")


def output_format(wanted: list[str], kind: str, overlay: bool) -> str:
    """The format to answer this body with (NIfTI for a scan, TIFF for a stack by default); 406 for answers
    the body cannot have (a DICOM SEG of a NIfTI, a NIfTI of a slice stack)."""
    return choose_format(wanted, kind, "nifti" if kind != SLICES else "tiff", offered(overlay))


def scan_limits(max_pixels: int) -> Limits:
    """What a scan body may hold: three sequences of the slice-stack pixel limit, and at most 8 bytes a
    voxel decompressed (float64 NIfTI; MR DICOM is 2): both checked from headers before decompressing."""
    from dataclasses import replace

    from core.formats.volume import Limits

    base = Limits()
    return replace(base, max_voxels=3 * max_pixels, max_bytes=min(base.max_bytes, 24 * max_pixels))


def scan_name(disposition: str | None) -> str | None:
    """The file name a client gave its body (Content-Disposition), as a safe stem without its extension:
    never a path (it only names the answer and may say a NIfTI's sequence); None without one."""
    found = _FILENAME.search(disposition or "")
    if not found:
        return None
    name = re.split(r"[\\/]", found.group(1).strip())[-1]
    for ext in SCAN_EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:100]
    return name or None


def sequence_names(sequences: str | None) -> list[str] | None:
    """``sequences=flair,t1,-`` -> the NIfTI channel names (as --sequences); None when not given."""
    if sequences is None or not sequences.strip():
        return None
    return [n.strip() for n in sequences.split(",")]


def read_scan(data: bytes, limits: Limits, max_slices: int, min_size: int, max_size: int,
              sequences: list[str] | None = None, name: str | None = None,
              series: dict[str, str] | None = None) -> Volume:
    """A scan body -> a canonical Volume, within the request limits (VolumeError otherwise); ``series`` picks
    a DICOM study's series (core.inference.jobs.parse_series)."""
    from core.formats.load import check_request_size, load_volume

    volume = load_volume(data, limits=limits, sequences=sequences, name=name, series=series)
    return check_request_size(volume, max_slices, min_size, max_size)


def answer_headers(body: dict[str, Any], spacing: VoxelSpacing) -> dict[str, str]:
    """The figures a client reads without parsing the body: the spacing used (``X-Spacing-Assumed`` where it
    was assumed), the tumour volume in mL where the spacing is known, the quality and the review flag."""
    out = spacing.headers()
    if body["volume_ml"] is not None:
        out["X-Tumour-Volume-mL"] = f"{body['volume_ml']:.4f}"
    if body["quality"] is not None:
        out["X-Quality"] = f"{body['quality']:.4f}"
    if body["review"] is not None:
        out["X-Review"] = "true" if body["review"] else "false"
    return out


def check_sequence(sequence: str) -> None:
    if sequence not in SEQUENCE_VIEWS:
        raise codecs.DecodeError(400, "bad_request",
                                 f"sequence={sequence!r}; expected one of {', '.join(SEQUENCE_VIEWS)}")


def view(images: np.ndarray, sequence: str) -> np.ndarray:
    """(N,H,W,3) slices as shown: ``rgb`` the three channels blended, else one sequence in grey."""
    check_sequence(sequence)
    if sequence == "rgb":
        return images
    channel = images[..., SEQUENCE_VIEWS.index(sequence) - 1]
    return np.repeat(channel[..., None], 3, axis=-1)


def parse_layers(layers: str) -> tuple[str, ...]:
    """``layers=`` -> the sequences to send as grey images: ``true``/``all`` all three, else a comma list."""
    text = layers.strip().lower()
    if text in ("", "false", "0", "no"):
        return ()
    if text in ("true", "1", "yes", "all"):
        return SEQUENCE_VIEWS[1:]
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in SEQUENCE_VIEWS[1:]]
    if bad:
        raise codecs.DecodeError(400, "bad_request", f"layers={layers!r}: {bad} not among pre, flair, post")
    return names


def mask_rgba(mask: np.ndarray) -> np.ndarray:
    """(H,W) labels -> RGBA: each label in its overlay colour at MASK_ALPHA, transparent elsewhere."""
    out = np.zeros((*mask.shape, 4), np.uint8)
    for label in np.unique(mask[mask > 0]):
        colour = codecs.OVERLAY_COLOURS[(int(label) - 1) % len(codecs.OVERLAY_COLOURS)]
        out[mask == label] = (*colour.astype(np.uint8), round(255 * MASK_ALPHA))
    return out


def layer_urls(images: np.ndarray, masks: np.ndarray, sequences: tuple[str, ...]) -> dict[str, list[str]]:
    """PNG data URLs per slice: each asked-for sequence in grey and the mask as an RGBA layer, so a viewer
    switches sequence or hides the mask without asking again."""
    out = {s: [codecs.data_url(codecs.encode_png(c)) for c in images[..., SEQUENCE_VIEWS.index(s) - 1]]
           for s in sequences}
    out["mask"] = [codecs.data_url(codecs.encode_png(mask_rgba(m))) for m in masks]
    return out


def overlay_urls(images: np.ndarray, masks: np.ndarray, sequence: str) -> list[str]:
    shown = view(images, sequence)
    return [codecs.data_url(codecs.encode_overlay_png(i, m)) for i, m in zip(shown, masks, strict=True)]


def encode_masks(fmt: str, masks: np.ndarray, scale: int, result: VolumeResult | None, model: str,
                 version: str) -> tuple[bytes, str, dict[str, str]]:
    """(body, media type, extra headers) of a binary answer: NIfTI/SEG on the source grid, TIFF/NPY in slice
    order (labels as-is in NPY; 0/255 in TIFF for a binary model)."""
    if fmt == "nifti":
        assert result is not None  # output_format refused a slice stack
        name = f"{result.volume.name}_mask.nii.gz"
        return result.nifti_bytes(), NIFTI_MEDIA, {"Content-Disposition": f'attachment; filename="{name}"'}
    if fmt == "dicom-seg":
        from core.formats.dicom import missing_type2

        assert result is not None
        name = f"{result.volume.name}_seg.dcm"
        extra = {"Content-Disposition": f'attachment; filename="{name}"'}
        missing = missing_type2(result.volume.datasets[0])
        if missing:  # a binary answer: the note the JSON answer carries goes in a header
            extra["Warning"] = f'299 gliomaseg "the source has no {", ".join(missing)}: the SEG carries them empty"'
        return result.seg_bytes(model, version), DICOM_MEDIA, extra
    if fmt == "npy":
        return codecs.encode_npy(masks), codecs.NPY, {}
    return codecs.encode_tiff(masks, scale), codecs.TIFF, {}
