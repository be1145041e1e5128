"""SageMaker entry point (becomes ``code/inference.py`` in model.tar.gz; not imported in this repo).

The SageMaker PyTorch container imports this module and calls ``model_fn`` once, then per request
``input_fn`` -> ``predict_fn`` -> ``output_fn``. Everything of gliomaseg's it needs is vendored next
to it as ``gliomaseg_core`` (see serve/sagemaker/export.py).

Requests (Content-Type): ``application/x-npy``, ``image/tiff`` (one page or many), ``image/png``; a scan:
NIfTI (``application/gzip`` or ``application/x-nifti``: a ``.nii.gz``/``.nii``, 3D or 4D) or a DICOM study
(``application/zip``/``application/dicom+zip``: a zip of its series; ``application/dicom``: one file),
also recognised by its bytes under ``application/octet-stream``; or ``application/json``
``{"s3_uri": "s3://b/k.tif", "output_prefix": "s3://b/out/"}``, which reads the image or scan from S3 and
writes the mask there (payloads over the 6 MB invocation limit go this way; ``"format"`` png, tiff, npy,
or for a scan nifti (its default) or dicom-seg). Several slices form one patient volume (3D
post-processing) unless the type says ``; volume=false`` (or the JSON ``"volume": false``); a scan always
does. Responses (Accept, with q-values, negotiated by core.formats.media as Serve's are):
``application/json`` (default: core's result schema, the same JSON Serve answers, RLE masks included),
``application/x-npy`` ((N,H,W) uint8 labels), ``image/png`` (one slice, 0/255), ``image/tiff`` (one page
per slice), and for a scan ``application/gzip`` (the NIfTI mask on the scan's own grid, with its affine and
header) or ``application/dicom`` (a DICOM SEG referencing the source series or enhanced image's frames;
DICOM input only). A scan's NPY/TIFF masks are in the model's slice order: axial, the first slice the most
inferior. A 3D NIfTI body is FLAIR; an S3 object's file name may say its sequence, as for `core predict`
(``patient_t1.nii.gz`` is a 422). One slice of a per-patient bundle is answered (200) with a note:
``preprocessing_note`` in JSON, and for every answer the ``X-Amzn-SageMaker-Custom-Attributes`` header (the
invocation's CustomAttributes). Bad requests raise errors the container turns into 4xx responses whose message
(the body's first line) is the error JSON Serve answers, ``{"error", "detail"}``, with the status of core's one
mapping (core.formats.media.error_answer); an unexpected failure is a 500 whose text stays in the log. A volume
is checked against a memory budget as Serve checks it (``GLIOMASEG_VOLUME_BUDGET_MB``; core.inference.budget):
413 over the whole budget, 503 with ``Retry-After`` while the memory free now cannot take it.

What Serve takes as query parameters comes as the invocation's CustomAttributes (``spacing=5,0.94,0.94;
sequences=flair,t1; series=3``) or, for an S3 request, as JSON fields (``"spacing": [5, 0.94, 0.94]``): a slice
stack's spacing in mm (core.inference.spacing; without one the answer says which it assumed,
``spacing_assumed=`` in the response's custom attributes), a NIfTI's sequence names, a DICOM study's series
(a SeriesNumber or SeriesInstanceUID for FLAIR, or ``flair=3,pre=1``). A binary answer's notes (what the JSON answer
says in ``notes``) come back in the response's custom attributes as ``notes=[...]``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gliomaseg_core.data.preprocessing import single_slice_note
from gliomaseg_core.formats import codecs
from gliomaseg_core.formats.media import (
    DICOM_MEDIA,
    FORMAT_MEDIA,
    JSON,
    NIFTI_MEDIA,
    NPY,
    SCAN_TYPES,
    SLICES,
    TIFF,
    check_series,
    choose_format,
    declared_kind,
    error_answer,
    error_headers,
    preferences,
    refusal,
)
from gliomaseg_core.inference.budget import MemoryBudget, available_memory, budget_from_mb, volume_bytes
from gliomaseg_core.inference.jobs import parse_series
from gliomaseg_core.inference.predictor import Predictor
from gliomaseg_core.inference.results import answer_notes, result_json
from gliomaseg_core.inference.spacing import parse_spacing, scan_spacing, stack_spacing
from gliomaseg_core.io import s3_client

try:
    from sagemaker_inference.errors import GenericInferenceToolkitError as RequestError
except ImportError:  # outside the container: same shape, so callers can read .status_code/.message

    class RequestError(Exception):  # type: ignore[no-redef]
        def __init__(self, status_code: int, message: str | None = None, phrase: str | None = None) -> None:
            self.status_code, self.message = status_code, message or "Invalid Request"
            self.phrase = phrase or self.message
            super().__init__(status_code, self.message, self.phrase)


log = logging.getLogger("gliomaseg.sagemaker")


def _refusal(status: int, error: str, detail: str) -> RequestError:
    """An error the toolkit answers with ``status``: its message (the body's first line) is the error JSON
    Serve answers, ``{"error", "detail"}``."""
    return RequestError(status, json.dumps({"error": error, "detail": detail}), error)


def _refuse(exc: BaseException) -> RequestError:
    """Any exception as core's one status and error JSON (core.formats.media.error_answer), as Serve maps it."""
    status, body = error_answer(exc)
    if status >= 500:
        log.error("internal error: %s", type(exc).__name__, exc_info=exc)
    return _refusal(status, body["error"], body["detail"])

# What this endpoint answers with, in the order a wildcard picks from (``image/*``: PNG before TIFF).
OFFERED = ("json", "npy", "png", "tiff", "nifti", "dicom-seg")
SCOPE_HEADER = "X-Amzn-SageMaker-Custom-Attributes"  # the one response header SageMaker hands the caller
SCAN_SUFFIXES = (".nii", ".nii.gz", ".zip", ".dcm")
LIMITS = {
    "max_pixels": int(os.environ.get("GLIOMASEG_MAX_PIXELS", codecs.DEFAULT_MAX_PIXELS)),
    "max_pages": int(os.environ.get("GLIOMASEG_MAX_PAGES", codecs.DEFAULT_MAX_PAGES)),
    "max_size": int(os.environ.get("GLIOMASEG_MAX_SIZE", 1024)),
}
MIN_SIZE = 32  # pixels a side, as Serve's min_size and the slice decoders' default
# S3 objects are not bound by the 6 MB invocation limit, but the instance's memory still is.
MAX_S3_BYTES = int(os.environ.get("GLIOMASEG_MAX_S3_BYTES", 512 << 20))
# A scan: three sequences of the slice pixel limit, checked from its headers before decompressing.
MAX_VOXELS = int(os.environ.get("GLIOMASEG_MAX_VOXELS", 3 * LIMITS["max_pixels"]))
S3_FORMATS = ("png", "tiff", "npy", "nifti", "dicom-seg")
# Memory for one volume (estimated as Serve counts it): over it a 413; a 503 with Retry-After when the memory
# free right now (the container's other workers hold the rest) cannot take it. 0: half of what is free at start.
VOLUME_BUDGET = MemoryBudget(budget_from_mb(float(os.environ.get("GLIOMASEG_VOLUME_BUDGET_MB", 0))),
                             available=available_memory)
ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"  # the invocation's CustomAttributes, as the container sees them
MAX_ATTRIBUTES = 1024  # characters SageMaker passes back in the response's custom attributes


@dataclass
class Options:
    """How to read a request's input, from its custom attributes (``spacing=5,1,1; sequences=flair,t1``) or
    its JSON fields: a slice stack's spacing (core.inference.spacing), a NIfTI's sequence names."""

    spacing: tuple[float, float, float] | None = None
    sequences: list[str] | None = None
    series: dict[str, str] | None = None  # a DICOM study's series (core.inference.jobs.parse_series)

    @classmethod
    def parse(cls, values: dict[str, Any]) -> Options:
        picked = values.get("series")
        try:
            spacing = parse_spacing(values.get("spacing"))
            series = ({str(k): str(v) for k, v in picked.items()} if isinstance(picked, dict)
                      else parse_series(None if picked is None else str(picked)))
        except codecs.DecodeError as exc:
            raise _refuse(exc) from exc
        sequences = values.get("sequences")
        if isinstance(sequences, str):
            sequences = [n.strip() for n in sequences.split(",")] if sequences.strip() else None
        if sequences is not None and not (isinstance(sequences, list) and all(isinstance(n, str) for n in sequences)):
            raise _refusal(400, "bad_request", f"sequences={sequences!r}; give names such as flair,t1,t1gd")
        return cls(spacing, sequences, series)


@dataclass
class Request:
    images: np.ndarray  # (N,H,W,3) uint8
    volume: bool
    s3_uri: str | None = None
    output_prefix: str | None = None
    output_format: str | None = None
    scan: Any = None  # a gliomaseg_core.formats.volume.Volume for NIfTI/DICOM input
    options: Options = field(default_factory=Options)


@dataclass
class Prediction:
    masks: np.ndarray  # (N,H,W) uint8 labels
    request: Request
    model_version: str
    class_names: list[str] = field(default_factory=list)
    preprocessing_note: str | None = None  # a per-patient bundle's numbers computed from single slices
    result: Any = None  # gliomaseg_core.inference.results.VolumeResult for a scan: its grid, mL, NIfTI, SEG
    model_name: str = "gliomaseg"  # a DICOM SEG names the algorithm that made it
    answer: Any = None  # the predictor's volume answer (its quality and review), for a volume
    spacing: Any = None  # the VoxelSpacing a volume was post-processed at (given, the scan's, or assumed)

    @property
    def kind(self) -> str:
        return self.result.volume.kind if self.result is not None else SLICES


def model_fn(model_dir: str) -> Predictor:
    """Load the bundle at the archive root (model.safetensors + config.json); GPU when there is one."""
    device = os.environ.get("GLIOMASEG_DEVICE", "auto")
    batch = int(os.environ.get("GLIOMASEG_BATCH_SIZE", 32))
    predictor = Predictor.from_bundle(model_dir, device=device, batch_size=batch)
    log.info("gliomaseg model %s on %s", predictor.version, predictor.device)
    return predictor


def input_fn(body: bytes | str, content_type: str | None, context: Any = None) -> Request:
    """The request's input; ``context`` (the toolkit passes it) carries the invocation's custom attributes."""
    media, params = _parse_type(content_type)
    if media == JSON:
        return _json_request(body, context)
    options = Options.parse(custom_attributes(context))
    if isinstance(body, str):  # the toolkit UTF-8-decodes text/csv bodies; undo it
        body = body.encode("utf-8")
    body = bytes(body)
    from gliomaseg_core.formats.load import body_kind  # nibabel and pydicom load when a body comes

    try:  # what the body is, by the rule of Serve's volume endpoint (core.formats.load)
        kind = body_kind(declared_kind(media), body)
    except codecs.DecodeError as exc:
        raise _refuse(exc) from None
    if kind != SLICES:
        scan = _read_scan(body, options=options)
        _check_memory(scan.images, context)
        return Request(scan.images, True, scan=scan, options=options)
    _check_series(SLICES, options)
    images = _decode(body, content_type.split(";", 1)[0] if content_type else None)
    _check_memory(images, context)
    return Request(images, _volume(params.get("volume"), len(images)), options=options)


def _check_memory(images: np.ndarray, context: Any = None) -> None:
    """Several slices against the memory budget for volumes (core.inference.budget), as Serve checks them: a
    413 over the whole budget, a 503 (``Retry-After`` set on the answer where the toolkit gives a context)
    when the memory free now cannot take it. One slice never counts."""
    if len(images) <= 1:
        return
    try:
        VOLUME_BUDGET.check(volume_bytes(images.nbytes))
    except codecs.DecodeError as exc:
        if hasattr(context, "set_response_header"):  # Serve's headers for the same refusal
            for name, value in error_headers(exc).items():
                context.set_response_header(0, name, value)
        raise _refuse(exc) from None


def custom_attributes(context: Any) -> dict[str, str]:
    """The invocation's CustomAttributes (``key=value; key=value``, keys lower-cased); {} without any."""
    try:
        properties = dict(context.request_processor[0].get_request_properties())
    except (AttributeError, IndexError, TypeError, ValueError):
        return {}
    raw = next((v for k, v in properties.items() if str(k).lower() == ATTRIBUTES), "") or ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes | bytearray) else str(raw)
    out = {}
    for item in text.split(";"):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[key.strip().lower()] = value.strip()
    return out


def predict_fn(data: Request, model: Predictor) -> Prediction:
    given = data.options.spacing
    if data.scan is not None:  # what `core predict` does with the same file
        from gliomaseg_core.inference.results import segment_volume

        try:
            spacing = scan_spacing(data.scan, given)
            result = segment_volume(model, data.scan)
        except Exception as exc:  # core's one mapping: a refusal's status, or a 500 without its text
            raise _refuse(exc) from None
        return Prediction(result.masks, data, model.version, result.class_names, result=result,
                          model_name=str(model.config.get("name") or "gliomaseg"), spacing=spacing)
    spacing = stack_spacing(given)
    try:  # several slices as one patient give the volume answer (with its quality), as a scan does
        answer = model.segment(data.images, spacing=spacing.mm) if data.volume else None
        masks = answer.masks if answer is not None else model.predict(data.images, spacing=given)
    except Exception as exc:  # input the predictor refuses (422), or a 500 without its text
        raise _refuse(exc) from None
    names = list(model.config.get("class_names", []))
    note = None if data.volume else single_slice_note(model.config, "send all the patient's slices in one body")
    return Prediction(np.asarray(masks, dtype=np.uint8), data, model.version, names, note, answer=answer,
                      spacing=spacing if data.volume else None)


def output_fn(prediction: Prediction, accept: str | None, context: Any = None) -> tuple[bytes, str]:
    """The answer in the negotiated format; ``context`` (the toolkit passes it) carries the single-slice note
    of a per-patient bundle as the invocation's custom attributes, as Serve's Warning header does."""
    if prediction.request.s3_uri:
        _set_attributes(context, response_attributes(prediction, binary=False))
        return _write_s3(prediction), JSON
    try:
        fmt = choose_format(preferences(accept or JSON, OFFERED), prediction.kind, "json", OFFERED,
                            len(prediction.masks))
    except codecs.DecodeError as exc:
        raise _refuse(exc) from exc
    _set_attributes(context, response_attributes(prediction, binary=fmt != "json"))
    if fmt == "json":
        return json.dumps(_summary(prediction, rle=True)).encode(), JSON
    return _encode(prediction, FORMAT_MEDIA[fmt]), FORMAT_MEDIA[fmt]


def response_attributes(prediction: Prediction, binary: bool) -> str:
    """The answer's custom attributes (the one header SageMaker hands back): a per-patient bundle's slice scope,
    the spacing used (``spacing_assumed=`` where assumed), the volume in mL where known, and for a binary answer
    its notes as a JSON list (``notes=[...]``, cut to SageMaker's 1024 characters)."""
    parts = []
    if prediction.preprocessing_note:
        parts.append(f"preprocessing_scope=slice; {prediction.preprocessing_note}")
    spacing = prediction.spacing
    if spacing is not None:
        parts.append(f"spacing_mm={spacing.text()}" if spacing.known else f"spacing_assumed={spacing.text()}")
        if spacing.known and prediction.kind == SLICES:
            parts.append(f"volume_ml={float(np.count_nonzero(prediction.masks)) * spacing.voxel_ml:.4f}")
        elif prediction.result is not None:
            parts.append(f"volume_ml={prediction.result.volume_ml:.4f}")
    notes = answer_notes(prediction.result, spacing)
    if binary and notes:
        room = MAX_ATTRIBUTES - len("; ".join(parts)) - len("; notes=")
        text = json.dumps(notes, ensure_ascii=True)
        parts.append("notes=" + (text if len(text) <= room else text[: max(room - 4, 0)] + '..."]'))
    return "; ".join(parts)


def _set_attributes(context: Any, attributes: str) -> None:
    if attributes and hasattr(context, "set_response_header"):
        context.set_response_header(0, SCOPE_HEADER, attributes)


# ------------------------------------------------------------------------------------------ helpers


def _parse_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    parts = [p.strip() for p in (content_type or "").split(";")]
    params = {}
    for p in parts[1:]:
        key, _, value = p.partition("=")
        params[key.strip().lower()] = value.strip().strip('"').lower()
    return parts[0].lower(), params


def _volume(flag: Any, n: int) -> bool:
    """Several slices are one patient unless the client says otherwise; one slice never is."""
    if flag is None:
        return n > 1
    if isinstance(flag, bool):
        return flag and n > 1
    if str(flag).lower() in ("true", "1", "yes"):
        return n > 1
    if str(flag).lower() in ("false", "0", "no"):
        return False
    raise _refusal(400, "bad_request", f"volume={flag!r}; use true or false")


def _decode(data: bytes, content_type: str | None) -> np.ndarray:
    try:
        return codecs.decode(data, content_type, volume=True, **LIMITS)
    except codecs.DecodeError as exc:
        raise _refuse(exc) from exc


def _is_scan(media: str, body: bytes) -> bool:
    """A NIfTI or DICOM body: by its declared type, or by its bytes when the type says nothing."""
    if media in SCAN_TYPES:
        return True
    if media not in codecs.SNIFFED or codecs.sniff(body):
        return False
    from gliomaseg_core.formats.load import sniff_volume  # nibabel/pydicom load only when a scan comes

    return sniff_volume(body) is not None


def _read_scan(data: bytes, name: str | None = None, options: Options | None = None) -> Any:
    """A scan's bytes -> a canonical Volume within the limits (VolumeError is a DecodeError: its status);
    ``name`` (an S3 key's file name) may say a 3D NIfTI's sequence, as a file name does for `core predict`."""
    from dataclasses import replace

    from gliomaseg_core.formats.load import check_request_size, load_volume
    from gliomaseg_core.formats.volume import Limits

    limits = replace(Limits(), max_voxels=MAX_VOXELS, max_bytes=min(Limits().max_bytes, 8 * MAX_VOXELS))
    try:
        options = options or Options()
        scan = load_volume(data, limits=limits, name=name, sequences=options.sequences, series=options.series)
    except codecs.DecodeError as exc:
        raise _refuse(exc) from exc
    try:  # the request limits Serve applies, by the same rule
        return check_request_size(scan, LIMITS["max_pages"], MIN_SIZE, LIMITS["max_size"])
    except codecs.DecodeError as exc:
        raise _refuse(exc) from None


def _check_series(kind: str, options: Options) -> None:
    try:
        check_series(kind, options.series)
    except codecs.DecodeError as exc:
        raise _refuse(exc) from exc


def _check_scan_output(prediction: Prediction, fmt: str) -> None:
    """406 for a NIfTI of slices (no geometry) or a SEG of anything but DICOM (nothing to reference)."""
    why = refusal(fmt, prediction.kind)
    if why:
        raise _refusal(406, "not_acceptable", f"{why}")


def _encode(prediction: Prediction, media: str) -> bytes:
    """Masks as NPY ((N,H,W) labels), TIFF (one page per slice) or PNG (one slice), binary masks 0/255; a
    scan's as NIfTI on its own grid or DICOM SEG."""
    masks, scale = prediction.masks, codecs.mask_scale(prediction.class_names)
    if media == NIFTI_MEDIA:
        return prediction.result.nifti_bytes()
    if media == DICOM_MEDIA:
        try:
            return prediction.result.seg_bytes(prediction.model_name, prediction.model_version)
        except codecs.DecodeError as exc:
            raise _refuse(exc) from exc
    if media == NPY:
        return codecs.encode_npy(masks)
    if media == TIFF:
        return codecs.encode_tiff(masks, scale)
    return codecs.encode_mask_png(masks[0], scale)


def _summary(prediction: Prediction, rle: bool) -> dict[str, Any]:
    """core's result schema: the JSON Serve answers for the same body."""
    return result_json(prediction.masks, prediction.model_version, prediction.class_names, scan=prediction.result,
                       answer=prediction.answer, volume=prediction.request.volume,
                       note=prediction.preprocessing_note, rle=rle, spacing=prediction.spacing)


# ----------------------------------------------------------------------------------------------- S3


def _split_s3(uri: Any, what: str) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith("s3://") or "/" not in uri[5:] or uri.startswith("s3:///"):
        raise _refusal(400, "bad_request", f"{what} must be an s3://bucket/key string, got {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def _s3_error(exc: Exception, uri: str) -> RequestError:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    if code in ("NoSuchKey", "404", "NoSuchBucket", "NotFound"):
        return _refusal(404, "not_found", f"{uri}")
    if code in ("AccessDenied", "403", "Forbidden"):
        return _refusal(403, "forbidden", f"the endpoint's role may not access {uri}")
    return _refusal(400, "s3_error", f"{uri}: {exc}")


def _json_request(body: bytes | str, context: Any = None) -> Request:
    try:
        spec = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refusal(400, "bad_request", f"body is not valid JSON ({exc})") from exc
    if not isinstance(spec, dict) or "s3_uri" not in spec:
        raise _refusal(400, "bad_request", 'JSON requests look like {"s3_uri": "s3://bucket/key", '
                       '"output_prefix": "s3://bucket/prefix/"}')
    uri = spec["s3_uri"]
    bucket, key = _split_s3(uri, "s3_uri")
    out = spec.get("output_prefix") or f"s3://{bucket}/{posixpath.dirname(key)}"
    _split_s3(out.rstrip("/") + "/x", "output_prefix")
    fmt = spec.get("format")
    if fmt not in (None, *S3_FORMATS):
        raise _refusal(400, "bad_request", f"format {fmt!r}; use {', '.join(S3_FORMATS)}")
    options = Options.parse(spec)
    client = s3_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        if int(head.get("ContentLength", 0)) > MAX_S3_BYTES:
            raise _refusal(413, "too_large", f"{uri} is {head['ContentLength']} bytes; at most {MAX_S3_BYTES}")
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except RequestError:
        raise
    except Exception as exc:  # botocore ClientError and friends
        raise _s3_error(exc, uri) from exc
    declared = str(spec.get("content_type") or "").split(";", 1)[0].strip().lower()
    if declared in SCAN_TYPES or (not declared and key.lower().endswith(SCAN_SUFFIXES)) or _is_scan(declared, data):
        base = posixpath.basename(key)
        scan = _read_scan(data, next((base[: -len(e)] for e in SCAN_SUFFIXES[::-1] if base.lower().endswith(e)),
                                     posixpath.splitext(base)[0]), options)
        if fmt not in (None, "nifti", "dicom-seg", "npy", "tiff"):
            raise _refusal(400, "bad_request", f"format {fmt!r} for a scan; use nifti, dicom-seg, npy or tiff")
        _check_memory(scan.images, context)
        return Request(scan.images, True, uri, out, fmt or "nifti", scan=scan, options=options)
    if fmt in ("nifti", "dicom-seg"):
        raise _refusal(400, "bad_request", f"format {fmt!r} needs a NIfTI or DICOM scan; {uri} holds slices")
    _check_series(SLICES, options)
    ext = posixpath.splitext(key)[1].lower()
    images = _decode(data, declared or codecs.EXTENSIONS.get(ext, ""))
    _check_memory(images, context)
    return Request(images, _volume(spec.get("volume"), len(images)), uri, out, fmt, options=options)


def _write_s3(prediction: Prediction) -> bytes:
    req, masks = prediction.request, prediction.masks
    fmt = req.output_format or ("png" if len(masks) == 1 else "tiff")
    if fmt == "png" and len(masks) != 1:
        raise _refusal(400, "bad_request", f"format png holds one slice, the input had {len(masks)}")
    ctype = FORMAT_MEDIA[fmt]
    _check_scan_output(prediction, fmt)
    data = _encode(prediction, ctype)
    _, in_key = _split_s3(req.s3_uri, "s3_uri")
    bucket, prefix = _split_s3(str(req.output_prefix).rstrip("/") + "/x", "output_prefix")
    name = posixpath.basename(in_key)
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else posixpath.splitext(name)[0]
    suffix = {"nifti": "_mask.nii.gz", "dicom-seg": "_seg.dcm"}.get(fmt, f"_mask.{fmt}")
    key = posixpath.join(posixpath.dirname(prefix), f"{stem}{suffix}").lstrip("/")
    uri = f"s3://{bucket}/{key}"
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=ctype)
    except Exception as exc:
        raise _s3_error(exc, uri) from exc
    summary = _summary(prediction, rle=False)
    return json.dumps({"input_uri": req.s3_uri, "mask_uri": uri, "mask_content_type": ctype, **summary}).encode()
