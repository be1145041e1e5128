"""Media: what a body is and which answer a client gets, the same for Serve, SageMaker and the CLIs.

- Request types: slices (TIFF, PNG, .npy; ``media_type``, or ``sniff`` for a generic type) and scans
  (``SCAN_TYPES``: NIfTI, a zipped DICOM study, one DICOM file).
- Answer formats (``FORMAT_MEDIA``): json, npy, tiff, png, nifti (a .nii.gz mask on the scan's grid) and
  dicom-seg. ``preferences`` reads an Accept header (q-values, then order; q=0 refused; wildcards kept) into
  the formats it names; ``choose_format`` takes the first one this input can have (``refusal``: no DICOM
  SEG but of DICOM, no NIfTI of a slice stack, no PNG of several slices), a wildcard standing for the
  endpoint's default. 406 when none is left.
- ``DecodeError``: every refusal of a body or an answer, with its HTTP status, error code and detail;
  ``error_answer``: the one status and error JSON of any exception, for every path; ``Busy`` (503) a refusal
  that a retry may pass, whose ``Retry-After`` ``error_headers`` gives.

Standard library only (the SageMaker archive vendors it).
"""

from __future__ import annotations

from collections.abc import Sequence

TIFF, PNG, NPY = "image/tiff", "image/png", "application/x-npy"
JSON = "application/json"
NIFTI_MEDIA, DICOM_MEDIA = "application/gzip", "application/dicom"  # what a .nii.gz mask and a SEG go out as
MEDIA_ALIASES = {
    "image/tiff": TIFF, "image/tif": TIFF, "image/x-tiff": TIFF,
    "image/png": PNG, "application/x-npy": NPY, "application/npy": NPY, "application/x-numpy": NPY,
}
# Declared types we sniff from the magic bytes instead (browsers send "" for .npy, curl sends these).
SNIFFED = {"", "application/octet-stream", "binary/octet-stream"}
EXTENSIONS = {".tif": TIFF, ".tiff": TIFF, ".png": PNG, ".npy": NPY}

SLICES, NIFTI, DICOM = "slices", "nifti", "dicom"  # what a body holds
_NIFTI_TYPES = ("application/gzip", "application/x-gzip", "application/x-nifti", "application/nifti",
                "application/x-nifti-gz", "image/nifti")
# Request types of scans. gzip and zip say only "compressed": the bytes say what is inside.
SCAN_TYPES = {**dict.fromkeys(_NIFTI_TYPES, NIFTI), **dict.fromkeys(
    ("application/zip", "application/x-zip-compressed", "application/dicom+zip", "application/dicom"), DICOM)}

FORMAT_MEDIA = {"json": JSON, "npy": NPY, "tiff": TIFF, "png": PNG, "nifti": NIFTI_MEDIA, "dicom-seg": DICOM_MEDIA}
FORMATS = tuple(FORMAT_MEDIA)
ACCEPT = {  # an Accept media type (aliases included) -> the answer format
    **{media: fmt for fmt, media in FORMAT_MEDIA.items()},
    **{alias: {TIFF: "tiff", PNG: "png", NPY: "npy"}[media] for alias, media in MEDIA_ALIASES.items()},
    **dict.fromkeys(_NIFTI_TYPES, "nifti"),
}
ANY = "*/*"


class DecodeError(ValueError):
    """A request body that cannot become model input, or an answer it cannot have; ``status`` is the HTTP
    status to answer with, ``error`` a stable code, ``detail`` what to do."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.status, self.error, self.detail = status, error, detail

    def to_dict(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


class Busy(DecodeError):
    """A request the server has no room for now (503, e.g. its memory budget for volumes is full): the same
    request may succeed after ``retry_after`` seconds, which the answer's ``Retry-After`` says."""

    def __init__(self, error: str, detail: str, retry_after: int) -> None:
        super().__init__(503, error, detail)
        self.retry_after = retry_after


INTERNAL_DETAIL = "the server failed to answer this request; the cause is in its log"


def error_answer(exc: BaseException) -> tuple[int, dict[str, str]]:
    """The one HTTP status and error JSON (``{"error", "detail"}``) for an exception, whoever answers: Serve,
    the SageMaker handlers, `serve batch`'s failure records and the CLIs' messages.

    A DecodeError is its own status; any other ValueError is input the predictor or an encoder refused (422
    ``invalid_input``, its message the detail); anything else is a 500 whose text stays in the log (it may
    name paths, hosts or a patient). An error raised in another process and wrapped (Ray's RayTaskError) is
    mapped by its ``cause``."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    if isinstance(exc, DecodeError):
        return exc.status, exc.to_dict()
    if isinstance(exc, ValueError):
        return 422, {"error": "invalid_input", "detail": str(exc) or type(exc).__name__}
    return 500, {"error": "internal", "detail": INTERNAL_DETAIL}


def error_headers(exc: BaseException) -> dict[str, str]:
    """The headers an error answer carries beside ``error_answer``'s JSON: ``Retry-After`` for a Busy."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    return {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else {}


def check_series(kind: str, series: object) -> None:
    """``series=`` picks DICOM series: given with a NIfTI or a slice stack it is a 400 ``bad_series``, not ignored."""
    if series and kind != DICOM:
        what = "a NIfTI scan (name its channels with sequences=)" if kind == NIFTI else "a slice stack"
        raise DecodeError(400, "bad_series", f"series= picks a DICOM series; the input is {what}")


ACCEPTED = ("image/tiff, application/x-npy, image/png (slice stacks); application/gzip or application/x-nifti "
            "(NIfTI), application/zip or application/dicom+zip (a zipped DICOM study), application/dicom")


def declared_kind(content_type: str | None) -> str | None:
    """NIFTI, DICOM or SLICES from the Content-Type; None when generic (sniff the bytes); 415 otherwise.
    Called before the body is read, so an unusable type costs no upload."""
    base = base_type(content_type)
    if base in SCAN_TYPES:
        return SCAN_TYPES[base]
    if base in MEDIA_ALIASES:
        return SLICES
    if base in SNIFFED:
        return None
    raise DecodeError(415, "unsupported_media_type", f"{base!r} is not supported; send {ACCEPTED}")


def base_type(media: str | None) -> str:
    """``Image/TIFF; q=1`` -> ``image/tiff``."""
    return (media or "").split(";", 1)[0].strip().lower()


def sniff(data: bytes) -> str | None:
    """Media type of slices from the magic bytes, or None."""
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return TIFF
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return PNG
    if data[:6] == b"\x93NUMPY":
        return NPY
    return None


def media_type(content_type: str | None, data: bytes = b"") -> str:
    """Canonical media type of a slice request: parameters dropped, aliases mapped; 415 when unsupported."""
    base = base_type(content_type)
    if base in SNIFFED:
        found = sniff(data)
        if found is None:
            raise DecodeError(415, "unsupported_media_type",
                              "send image/tiff, image/png or application/x-npy (content type missing or generic)")
        return found
    if base not in MEDIA_ALIASES:
        raise DecodeError(415, "unsupported_media_type",
                          f"{base!r} is not supported; send image/tiff, image/png or application/x-npy")
    return MEDIA_ALIASES[base]


def preferences(accept: str | None, offered: Sequence[str], hint: str = "") -> list[str]:
    """The offered formats an Accept header names, and its wildcards (``*/*``, ``image/*``), best first: by
    q-value, then by order; q=0 means "not this". No header means ``*/*``. 406 when it names nothing offered."""
    if not accept or not accept.strip():
        return [ANY]
    ranked: list[tuple[float, int, str]] = []
    for i, item in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for p in params:
            key, _, value = p.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0 and media:
            ranked.append((-q, i, media.lower()))
    prefs: list[str] = []
    for _, _, media in sorted(ranked):
        if media == ANY or (media.endswith("/*") and any(FORMAT_MEDIA[f].startswith(media[:-1]) for f in offered)):
            prefs.append(media)
        elif ACCEPT.get(media) in offered:
            prefs.append(ACCEPT[media])
    if not prefs:
        types = ", ".join(FORMAT_MEDIA[f] for f in offered)
        raise DecodeError(406, "not_acceptable", f"Accept {accept!r}: this endpoint answers {types}{hint}")
    return list(dict.fromkeys(prefs))


def refusal(fmt: str, kind: str, slices: int | None = None) -> str | None:
    """Why an input of ``kind`` (SLICES, NIFTI, DICOM) cannot be answered in ``fmt``; None where it can.
    ``slices``: how many masks a plain PNG would have to hold (None: no such limit, e.g. an animation)."""
    if fmt == "dicom-seg" and kind != DICOM:
        what = "a NIfTI scan" if kind == NIFTI else "a slice stack"
        return (f"a DICOM SEG references the DICOM series it segments; the input is {what}: send a zipped DICOM "
                "study, or ask for nifti, tiff, npy or json")
    if fmt == "nifti" and kind == SLICES:
        return ("a slice stack (TIFF, PNG, NPY) has no voxel geometry (spacing, orientation) to write a NIfTI "
                "with: send the NIfTI or DICOM scan, or ask for tiff, npy or json")
    if fmt == "png" and slices is not None and slices != 1:
        return f"image/png holds one slice, the input has {slices}: ask for tiff, npy or json"
    return None


def choose_format(prefs: Sequence[str], kind: str, default: str, offered: Sequence[str],
                  slices: int | None = None) -> str:
    """The first of ``prefs`` (``preferences``) this input can have; a wildcard is ``default`` where that
    matches it, else the first offered format of its type the input can have. 406 naming why otherwise."""
    reasons: list[str] = []
    for pref in prefs:
        if pref.endswith("/*"):
            for fmt in dict.fromkeys((default, *offered)):
                if (pref == ANY or FORMAT_MEDIA[fmt].startswith(pref[:-1])) and refusal(fmt, kind, slices) is None:
                    return fmt
            continue
        why = refusal(pref, kind, slices)
        if why is None:
            return pref
        reasons.append(why)
    raise DecodeError(406, "not_acceptable", reasons[0] if reasons else f"no answer for {', '.join(prefs)}")
