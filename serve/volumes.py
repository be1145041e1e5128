"""Whole-patient requests (``POST /v1/segment/volume``): what a body is, which answer was asked for, and
that answer's bytes. Pure functions over bytes and arrays, no Ray: the ingress runs the heavy ones in a
thread, and tests call them directly.

Bodies are a slice stack (multi-page TIFF, (N,H,W,3) ``.npy``, one PNG; core.formats.codecs) or a scan
(NIfTI ``.nii``/``.nii.gz``, a zipped DICOM study, one DICOM file; core.formats.load), known by the
Content-Type (SCAN_TYPES, codecs.MEDIA_ALIASES) and, for a generic or missing type or a scan type, by
their magic bytes. A scan's masks come back on its own grid (NIfTI with the source's affine and header;
DICOM SEG referencing the source series) or, as TIFF/NPY, in the model's canonical slice order
(CANONICAL_ORDER). The output is ``format=`` if given, else the first supported ``Accept`` type, else NIfTI
for a scan and a multi-page TIFF for a slice stack. Every refusal is a codecs.DecodeError (its status,
error and detail become the JSON error response).

A scan body may be named (``Content-Disposition: attachment; filename="patient_t1.nii.gz"``): the name
becomes the answer's file names and, for a 3D NIfTI, says its sequence as a file name does for `core
predict`; ``sequences=flair,t1,...`` names a NIfTI's channels as ``--sequences`` does.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

from core.formats import codecs

if TYPE_CHECKING:
    from core.formats.volume import Limits, Volume
    from core.inference.predict import VolumeResult

NIFTI, DICOM, SLICES = "nifti", "dicom", "slices"  # what a body holds
NIFTI_MEDIA, DICOM_MEDIA = "application/gzip", "application/dicom"  # what .nii.gz and a SEG go out as
# Request types of scans. gzip and zip say only "compressed": the bytes say what is inside (a gzip that
# is no NIfTI, or a zip without DICOM, is a 400 naming what was expected).
SCAN_TYPES = {
    "application/x-nifti": NIFTI, "application/nifti": NIFTI, "application/x-nifti-gz": NIFTI,
    "image/nifti": NIFTI, "application/gzip": NIFTI, "application/x-gzip": NIFTI,
    "application/zip": DICOM, "application/x-zip-compressed": DICOM, "application/dicom+zip": DICOM,
    "application/dicom": DICOM,
}
FORMATS = ("nifti", "dicom-seg", "tiff", "npy", "json", "png")
ACCEPT = {  # response media type -> format
    "application/json": "json", "image/tiff": "tiff", "image/tif": "tiff", "application/x-npy": "npy",
    "application/npy": "npy", "image/png": "png", "application/dicom": "dicom-seg", **{
        t: "nifti" for t in ("application/gzip", "application/x-gzip", "application/x-nifti", "application/nifti",
                             "application/x-nifti-gz")},
}
MEDIA = {"nifti": NIFTI_MEDIA, "dicom-seg": DICOM_MEDIA, "tiff": codecs.TIFF, "npy": codecs.NPY,
         "json": codecs.JSON, "png": codecs.PNG}
SEQUENCE_VIEWS = ("rgb", "pre", "flair", "post")  # rgb: the three blended, as the model sees them
CANONICAL_ORDER = ("axial slices, the first the most inferior; rows toward posterior, columns toward the "
                   "patient's left (the Kaggle display orientation)")
STACK_ORDER = "the slices in the order they were sent"
_FILENAME = re.compile(r"""filename\*?\s*=\s*(?:[\w-]+'[\w-]*')?"?([^";]+)"?""", re.IGNORECASE)
SCAN_EXTENSIONS = (".nii.gz", ".nii", ".zip", ".dcm", ".gz")
MASK_ALPHA = 0.45  # as codecs.overlay, so a page compositing the layers shows what overlay=true burns in
ACCEPTED = ("image/tiff, application/x-npy, image/png (slice stacks); application/gzip or application/x-nifti "
            "(NIfTI), application/zip or application/dicom+zip (a zipped DICOM study), application/dicom")


def _base(media: str | None) -> str:
    return (media or "").split(";", 1)[0].strip().lower()


def declared_kind(content_type: str | None) -> str | None:
    """NIFTI, DICOM or SLICES from the Content-Type; None when generic (sniff the bytes); 415 otherwise.
    Called before the body is read, so an unusable type costs no upload."""
    base = _base(content_type)
    if base in SCAN_TYPES:
        return SCAN_TYPES[base]
    if base in codecs.MEDIA_ALIASES:
        return SLICES
    if base in codecs.SNIFFED:
        return None
    raise codecs.DecodeError(415, "unsupported_media_type", f"{base!r} is not supported; send {ACCEPTED}")


def body_kind(declared: str | None, data: bytes) -> str:
    """What the body holds: its bytes decide for a generic or scan type (a .nii.gz sent as
    application/zip is still NIfTI); a slice type is decoded as declared (codecs checks its bytes)."""
    from core.formats.load import sniff_volume  # here: nibabel/pydicom load only when a volume comes

    if not data:
        raise codecs.DecodeError(400, "undecodable", "empty request body")
    if declared == SLICES:
        return SLICES
    sniffed = sniff_volume(data)
    if sniffed:
        return sniffed
    if declared is None and codecs.sniff(data):
        return SLICES
    said = "a NIfTI" if declared == NIFTI else "a zipped DICOM study" if declared == DICOM else "an image"
    raise codecs.DecodeError(400 if declared else 415, "undecodable" if declared else "unsupported_media_type",
                             f"the body should be {said} but its bytes are none of NIfTI (.nii, .nii.gz), a zip "
                             f"of DICOM files, DICOM, TIFF, PNG or .npy; send {ACCEPTED}")


def requested_format(fmt: str | None, accept: str | None, overlay: bool) -> str | None:
    """The output asked for: ``format=`` wins, then the first supported Accept type (by q-value); None
    means "the default for what the body turns out to be". 400 for an unknown format, 406 for an Accept
    that lists nothing this endpoint makes."""
    if fmt is not None:
        fmt = fmt.strip().lower()
        if fmt not in FORMATS:
            raise codecs.DecodeError(400, "bad_request", f"format={fmt!r}; expected one of {', '.join(FORMATS)}")
        if fmt == "png" and not overlay:
            raise codecs.DecodeError(400, "bad_request", "format=png is for single slices; use nifti, dicom-seg, "
                                                          "tiff, npy or json for volumes (or overlay=true)")
        return fmt
    if not accept or not accept.strip():
        return None
    ranked: list[tuple[float, int, str]] = []
    for i, item in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for p in params:
            key, _, value = p.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            ranked.append((-q, i, media.lower()))
    for _, _, media in sorted(ranked):
        if media in ("*/*", "application/*", "image/*", ""):
            return None
        if media in ACCEPT and (ACCEPT[media] != "png" or overlay):
            return ACCEPT[media]
    raise codecs.DecodeError(406, "not_acceptable", f"Accept {accept!r}: this endpoint answers "
                             f"{', '.join(sorted(set(ACCEPT)))} (image/png with overlay=true); or give format=")


def output_format(requested: str | None, kind: str) -> str:
    """The format to answer with for this body; 406 for an answer that this body cannot give."""
    fmt = requested or (NIFTI if kind != SLICES else "tiff")
    if fmt == "dicom-seg" and kind != DICOM:
        what = "a NIfTI scan" if kind == NIFTI else "a slice stack"
        raise codecs.DecodeError(406, "not_acceptable", f"a DICOM SEG references the DICOM series it segments; the "
                                 f"body is {what}: send a zipped DICOM study, or ask for nifti, tiff, npy or json")
    if fmt == "nifti" and kind == SLICES:
        raise codecs.DecodeError(406, "not_acceptable", "a TIFF/NPY slice stack has no voxel geometry (spacing, "
                                 "orientation) to write a NIfTI with: send the NIfTI or DICOM scan, or ask for "
                                 "tiff, npy or json")
    return fmt


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
              sequences: list[str] | None = None, name: str | None = None) -> Volume:
    """A scan body -> a canonical Volume, within the request limits (VolumeError otherwise)."""
    from core.formats.load import load_volume

    volume = load_volume(data, limits=limits, sequences=sequences, name=name)
    n, h, w = volume.images.shape[:3]
    if n > max_slices:
        raise codecs.DecodeError(413, "too_large", f"{n} axial slices; at most {max_slices} per request")
    if max(h, w) > max_size:
        raise codecs.DecodeError(413, "too_large", f"axial slices of {h}x{w}; at most {max_size} a side")
    if min(h, w) < min_size:
        raise codecs.DecodeError(422, "invalid_input", f"axial slices of {h}x{w}; at least {min_size} a side")
    return volume


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


def volume_json(masks: np.ndarray, version: str, result: VolumeResult | None, quality: float | None = None,
                review: bool | None = None) -> dict[str, Any]:
    """Per-slice and whole-volume tumour figures; ``volume_ml`` (and the spacing) where a scan gives it,
    None for a slice stack, whose pixels have no size; the answer's ``quality`` and ``review``."""
    areas = [int(a) for a in np.count_nonzero(masks.reshape(len(masks), -1), axis=1)]
    body: dict[str, Any] = {
        "model_version": version, "input": result.volume.kind if result else SLICES,
        "slices": len(masks), "size": [int(s) for s in masks.shape[1:]], "tumour_pixels": sum(areas),
        "tumour_slices": sum(a > 0 for a in areas), "slice_tumour_pixels": areas,
        "slice_order": CANONICAL_ORDER if result else STACK_ORDER,
        "volume_ml": None, "class_ml": None, "voxel_ml": None, "spacing_mm": None, "scan": None,
        "quality": quality, "review": review,
    }
    if result is not None:
        summary = result.volume.summary()
        body.update(volume_ml=result.volume_ml, class_ml=result.class_ml(), voxel_ml=summary["voxel_ml"],
                    spacing_mm=summary["spacing_mm"],
                    scan={k: summary[k] for k in ("kind", "source_shape", "plane", "sources", "filled_with_flair",
                                                  "notes")})
    return body


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
