"""The HTTP ingress deployment: FastAPI routes, auth, body limits, decoding and response encoding.

Decoding and encoding run here (in a thread, off the event loop), so the model replica only ever sees
(H,W,3) uint8 arrays and only ever returns masks. Every error is JSON ``{"error", "detail"}``. What a
volume body is and how its answer is made (NIfTI, DICOM SEG, TIFF, NPY) is serve/volumes.py; a JSON answer
is core's result schema (core.inference.results.result_json), as SageMaker's is. A volume holds its share of
the replica's memory budget (core.inference.budget, ``volume_budget_mb``) from its body until its answer is
made: one that does not fit beside the volumes in progress is a 503 with Retry-After, while slices, which
never count, keep being answered.

The model is a DeploymentHandle (a split app) or, given its constructor arguments, a SegmentModelCore in
this replica (serve.model.LocalHandle: the same calls, no second hop). A 4xx is answered only after the
rest of the body is read (up to the size limit): a client still uploading would otherwise see a reset
connection, not the JSON error. A request with ``X-Gliomaseg-Timing: 1`` gets a ``Server-Timing`` header
(read, decode, handle, wait, model, encode, app in ms) and ``X-Timing-Window`` (wall-clock start,end of the
handler), from which bench/serve_load.py derives the proxy and response hops.

No ``from __future__ import annotations`` here: FastAPI reads the route signatures' real annotations
(``Request``) from the copy @serve.ingress makes, where postponed string annotations do not resolve.
"""

import asyncio
import hashlib
import hmac
import logging
import os
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.data.preprocessing import single_slice_note
from core.formats import codecs
from core.formats.media import check_series, declared_kind, error_answer, error_headers
from core.inference.budget import MB, MemoryBudget, budget_from_mb, volume_bytes
from core.inference.jobs import parse_series
from core.inference.results import VolumeResult, notes_header, result_json
from core.inference.spacing import VoxelSpacing, parse_spacing, scan_spacing, stack_spacing
from serve import volumes
from serve.model import LocalHandle, ModelOutOfMemory, SegmentModelCore
from serve.timing import Hops

log = logging.getLogger(__name__)
TIMING_HEADER = "x-gliomaseg-timing"
DEFAULT_DRAIN = 64 << 20  # outside a replica (no settings to read): ServeSettings' default body limit
INLINE_NPY = 4 << 20  # a .npy body this small decodes on the event loop: a thread hop costs more than it

FORMATS = ("png", "tiff", "npy", "json")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css",
                ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}

api = FastAPI(title="gliomaseg", docs_url=None, redoc_url=None)  # swagger UI would load from a CDN


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _drain_limit() -> int:
    try:
        return int(serve.get_replica_context().servable_object.max_body)
    except Exception:  # not in a replica (unit tests): the default limit
        return DEFAULT_DRAIN


async def drain(request: Request, limit: int | None = None) -> int:
    """Read what is left of the body, up to ``limit`` bytes (default: the replica's body limit), so that a
    client still sending it reads the answer instead of a reset connection. Returns the bytes read."""
    limit = _drain_limit() if limit is None else limit
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                break
    except Exception:  # read already, or the client went away: nothing left to drain
        pass
    return seen


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    await drain(request)
    return _error(exc.status, exc.error, exc.detail, exc.headers)


@api.exception_handler(ValueError)
async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
    """A refused body or answer (DecodeError; a Busy one with Retry-After), or input the predictor or an encoder
    refused: core's one mapping (core.formats.media.error_answer), as SageMaker answers it."""
    await drain(request)
    status, body = error_answer(exc)
    if status >= 500:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(body, status_code=status, headers=error_headers(exc))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    await drain(request)
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return _error(400, "bad_request", problems)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    await drain(request)
    names = {404: "not_found", 405: "method_not_allowed"}
    return _error(exc.status_code, names.get(exc.status_code, "http_error"), str(exc.detail))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # The text stays in the server's log: it can name files, hosts or a patient's data.
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal", "the server failed to answer this request; the cause is in its log")


async def _call_model(method: Any, *args: Any) -> Any:
    """Call a model-deployment method; a replica lost mid-call (killed, preempted node) is retried once on
    another, since segmentation is idempotent. If none answers, 503 with Retry-After, never a 500."""
    for attempt in (1, 2):
        try:
            return await method.remote(*args)
        except ModelOutOfMemory as exc:  # through a handle too: Ray's error subclasses its cause
            raise ApiError(503, "out_of_memory", "the model ran out of device memory for this request; retry "
                           "shortly, or send fewer slices", {"Retry-After": "2"}) from exc
        except (RayActorError, ActorUnavailableError) as exc:
            if attempt == 2:
                raise ApiError(503, "unavailable", f"model replica lost ({type(exc).__name__}); retry shortly",
                               {"Retry-After": "1"}) from exc
    raise AssertionError("unreachable")


def _static_files() -> dict[str, bytes]:
    folder = resources.files("serve") / "static"
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()} if folder.is_dir() else {}


def _check_format(fmt: str) -> None:
    """Refuse a bad single-slice ``format`` before the body is read or the model runs."""
    if fmt not in FORMATS:
        raise ApiError(400, "bad_request", f"format={fmt!r}; expected one of {', '.join(FORMATS)}")


def _encode_masks(masks: np.ndarray, fmt: str, scale: int, headers: dict[str, str]) -> Response:
    if fmt == "npy":  # raw labels (0/1 binary), the lossless machine format
        return Response(codecs.encode_npy(masks), 200, headers, codecs.NPY)
    if fmt == "tiff":
        return Response(codecs.encode_tiff(masks, scale), 200, headers, codecs.TIFF)
    return Response(codecs.encode_mask_png(masks, scale), 200, headers, codecs.PNG)


async def _awaitable(response: Any) -> Any:
    return await response  # asyncio.wait_for wants a coroutine, a DeploymentResponse is only awaitable


def _overlay_png(image: np.ndarray, mask: np.ndarray, sequence: str) -> bytes:
    """One slice's overlay PNG of ``sequence`` (CPU work: run in a thread)."""
    return codecs.encode_overlay_png(volumes.view(image[None], sequence)[0], mask)


def _animation_png(images: np.ndarray, masks: np.ndarray, sequence: str) -> bytes:
    """A volume's animated overlay PNG of ``sequence`` (CPU work: run in a thread)."""
    return codecs.encode_animation(volumes.view(images, sequence), masks)


# The helpers above must be defined before the class: @serve.ingress freezes the FastAPI app (by
# cloudpickle) at decoration time, capturing only the module globals that exist by then.
@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP front door; ``settings`` is ServeSettings as a dict plus ``token_sha256``."""

    def __init__(self, model: DeploymentHandle | dict[str, Any], settings: dict[str, Any]) -> None:
        # A dict is SegmentModelCore's arguments: the model runs here, called as through a handle.
        self.local = SegmentModelCore(**model) if isinstance(model, dict) else None
        self.model = LocalHandle(self.local) if self.local is not None else model
        self.settings = settings
        self.max_body = int(settings["max_body_mb"] * 1024 * 1024)
        # Volumes held at once (their bodies, decoded slices and the copies made from them), bounded apart
        # from the request limit, which counts a slice and a volume alike.
        self.budget = MemoryBudget(budget_from_mb(float(settings.get("volume_budget_mb") or 0)))
        self.token_sha256 = settings.get("token_sha256")
        if settings.get("token_env") and not self.token_sha256:
            # Built where the variable was unset (e.g. `serve deploy`): read it here, and fail closed.
            token = os.environ.get(settings["token_env"])
            if not token:
                raise RuntimeError(f"token_env {settings['token_env']} is set but that variable is empty here")
            self.token_sha256 = hashlib.sha256(token.encode()).hexdigest()
        self.static = _static_files()
        self._info: dict[str, Any] | None = None

    def check_health(self) -> None:
        """Serve's health check: a model in this replica that lost its device makes the replica unhealthy."""
        if self.local is not None:
            self.local.check_health()

    # ------------------------------------------------------------------ helpers

    def _authorise(self, request: Request) -> None:
        if not self.token_sha256:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(given.strip().encode()).hexdigest()
        # Compare digests in constant time, so timing reveals nothing about the token.
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.token_sha256):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token",
                           {"WWW-Authenticate": 'Bearer realm="gliomaseg"'})

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(413, "too_large", f"body of {int(declared)} bytes; at most {self.max_body}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:  # chunked uploads declare no length
                raise ApiError(413, "too_large", f"body over {self.max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _decode(self, request: Request, volume: bool, hops: Hops | None = None) -> np.ndarray:
        self._authorise(request)
        content_type = request.headers.get("content-type", "")
        if content_type.split(";", 1)[0].strip().lower() not in codecs.SNIFFED:
            codecs.media_type(content_type)  # 415 before reading a body we cannot use
        data = await self._body(request)
        if hops is not None:
            hops.mark("read")  # the body's bytes arriving from the proxy, apart from decoding them
        s = self.settings
        pages = s["max_slices"] if volume else 1
        pixels = s["max_pixels"] if volume else s["max_size"] ** 2
        limits = {"volume": volume, "max_pages": pages, "max_pixels": pixels, "min_size": s["min_size"],
                  "max_size": s["max_size"]}
        if len(data) <= INLINE_NPY and data[:6] == b"\x93NUMPY":  # a view on the body: no work to offload
            return codecs.decode(data, content_type, **limits)
        return await asyncio.to_thread(codecs.decode, data, content_type, **limits)

    async def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    async def _headers(self, tumour_pixels: int, **extra: Any) -> dict[str, str]:
        info = await self.info()
        out = {"X-Tumour-Pixels": str(tumour_pixels), "X-Model-Version": info["version"]}
        return out | {k: str(v) for k, v in extra.items()}

    async def _scale(self) -> int:
        return codecs.mask_scale((await self.info())["config"].get("class_names", []))

    # ------------------------------------------------------------------ routes

    @api.get("/")
    def index(self) -> Response:
        return Response(self.static.get("index.html", b"<h1>gliomaseg</h1>"), media_type="text/html; charset=utf-8")

    @api.get("/static/{name}")
    def static(self, name: str) -> Response:
        if name not in self.static:  # a fixed set of names: no path ever reaches the file system
            raise ApiError(404, "not_found", f"no static file {name!r}")
        media = STATIC_TYPES.get(os.path.splitext(name)[1], "application/octet-stream")
        return Response(self.static[name], media_type=media)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(_awaitable(self.model.ping.remote()), timeout=10)
            info = await self.info()
        except Exception as exc:  # an unreachable model is "unhealthy", not a server error
            # Unauthenticated probes get no exception text (paths, hosts): the log has it.
            log.warning("healthz: model deployment not ready: %s: %s", type(exc).__name__, exc)
            return _error(503, "unavailable", "model deployment not ready")
        return JSONResponse({"status": "ok", "model_version": info["version"]})

    @api.get("/v1/model")
    async def model_info(self, request: Request) -> JSONResponse:
        self._authorise(request)
        info = await self.info()
        config = info["config"]
        keys = ("name", "version", "arch", "image_size", "class_names", "channels", "context", "normalisation", "crop",
                "threshold", "postprocess", "tta", "hyperparameters", "model_args")
        s = self.settings
        return JSONResponse({
            **{k: config.get(k) for k in keys}, "metrics": info["metrics"], "device": info["device"],
            "serving": {"max_batch_size": s["max_batch_size"], "batch_wait_ms": s["batch_wait_ms"],
                        "max_ongoing_requests": s["max_ongoing_requests"],  # ServeSettings.ongoing()
                        "volume_budget_mb": round(self.budget.total / MB, 1),  # as resolved in this replica
                        "colocate": bool(s.get("colocate")),
                        "replicas": s["replicas"], "max_body_mb": s["max_body_mb"], "max_slices": s["max_slices"],
                        "max_pixels": s["max_pixels"],
                        "min_size": s["min_size"], "max_size": s["max_size"], "auth": bool(self.token_sha256)},
        })

    @api.post("/v1/segment")
    async def segment(self, request: Request, format: str = "png", overlay: bool = False, sequence: str = "rgb",
                      layers: str = "", spacing: str | None = None) -> Response:
        hops = Hops(request.headers.get(TIMING_HEADER) == "1")
        _check_format(format)
        shown = volumes.parse_layers(layers)
        volumes.check_sequence(sequence)  # a bad name is a 400 before the body is read
        given = parse_spacing(spacing)  # the one-slice mm2 rules' pixel size; None: the Kaggle grid's
        image = (await self._decode(request, volume=False, hops=hops))[0]
        hops.mark("decode")
        mask, batch, inner = await _call_model(self.model.segment, image, given)
        hops.split("handle", inner)  # what is left of the call is its hop (none when the model is here)
        response = await self._slice_answer(image, mask, batch, format, overlay, sequence, shown)
        hops.mark("encode")
        response.headers.update(hops.headers())
        return response

    async def _slice_answer(self, image: np.ndarray, mask: np.ndarray, batch: int, format: str, overlay: bool,
                            sequence: str, shown: tuple[str, ...]) -> Response:
        pixels = int(np.count_nonzero(mask))
        headers = await self._headers(pixels, **{"X-Batch-Size": batch})
        # A per-patient bundle standardises (or crops) one slice by itself here: say so, never silently.
        note = single_slice_note((await self.info())["config"])
        if note:
            headers.update({"X-Preprocessing-Scope": "slice", "Warning": f'299 gliomaseg "{note}"'})
        if format == "json":
            names = (await self.info())["config"].get("class_names", [])
            body = {**await asyncio.to_thread(result_json, mask[None], headers["X-Model-Version"], names,
                                              volume=False, note=note), "batch_size": batch}
            if overlay:
                body["overlay"] = (await asyncio.to_thread(volumes.overlay_urls, image[None], mask[None], sequence))[0]
            if shown:
                body["layers"] = await asyncio.to_thread(volumes.layer_urls, image[None], mask[None], shown)
            return JSONResponse(body, headers=headers)
        if overlay:
            return Response(await asyncio.to_thread(_overlay_png, image, mask, sequence), 200, headers, codecs.PNG)
        if format == "npy":  # a copy of a small array: cheaper here than a thread hop
            return _encode_masks(mask, format, await self._scale(), headers)
        return await asyncio.to_thread(_encode_masks, mask, format, await self._scale(), headers)

    @api.post("/v1/segment/volume")
    async def segment_volume(self, request: Request, format: str | None = None, overlay: bool = False,
                             sequence: str = "rgb", layers: str = "", sequences: str | None = None,
                             spacing: str | None = None, series: str | None = None) -> Response:
        # Everything that can be refused without the body is refused first: auth, format, Accept, type, spacing.
        self._authorise(request)
        wanted = volumes.requested(format, request.headers.get("accept"), overlay)
        shown = volumes.parse_layers(layers)
        volumes.check_sequence(sequence)
        given, picked = parse_spacing(spacing), parse_series(series)
        content_type = request.headers.get("content-type", "")
        declared = declared_kind(content_type)
        if declared == volumes.SLICES:  # a slice type is decoded as declared: its answers are known now
            volumes.output_format(wanted, declared, overlay)
        declared_bytes = request.headers.get("content-length", "")
        # The volume holds its share of the memory budget from its body on, until its answer is made.
        with self.budget.hold(min(int(declared_bytes), self.max_body) if declared_bytes.isdigit() else 0) as held:
            data = await self._body(request)
            held.resize(len(data))
            kind = volumes.body_kind(declared, data)
            fmt = volumes.output_format(wanted, kind, overlay)
            check_series(kind, picked)
            images, scan = await self._decode_volume(request, data, kind, sequences, picked)
            del data
            held.resize(volume_bytes(images.nbytes))  # a 503 here when it does not fit beside the others
            # One spacing rule (core.inference.spacing): the scan's, or the stack's given or assumed one.
            used = scan_spacing(scan, given) if scan is not None else stack_spacing(given)
            answer = await _call_model(self.model.segment_volume, images, used.mm)
            return await self._volume_answer(images, answer, scan, used, fmt, overlay, sequence, shown)

    async def _decode_volume(self, request: Request, data: bytes, kind: str, sequences: str | None,
                             picked: Any) -> tuple[np.ndarray, Any]:
        """(N,H,W,3) uint8 slices of a volume body and, for NIfTI or DICOM, its scan; decoding, decompressing
        and reorienting are CPU work, done in a thread off the event loop."""
        s = self.settings
        if kind == volumes.SLICES:
            images = await asyncio.to_thread(
                codecs.decode, data, request.headers.get("content-type", ""), volume=True,
                max_pages=s["max_slices"], max_pixels=s["max_pixels"], min_size=s["min_size"],
                max_size=s["max_size"])
            return images, None
        scan = await asyncio.to_thread(volumes.read_scan, data, volumes.scan_limits(s["max_pixels"]),
                                       s["max_slices"], s["min_size"], s["max_size"],
                                       volumes.sequence_names(sequences),
                                       volumes.scan_name(request.headers.get("content-disposition")), picked)
        return scan.images, scan

    async def _volume_answer(self, images: np.ndarray, answer: Any, scan: Any, spacing: VoxelSpacing, fmt: str,
                             overlay: bool, sequence: str, shown: tuple[str, ...]) -> Response:
        """A volume's answer in ``fmt``: the result JSON, or binary masks with its figures and notes in headers."""
        masks = np.asarray(answer.masks)
        config = (await self.info())["config"]
        names = list(config.get("class_names", ["background", "tumour"]))
        quality, review = getattr(answer, "quality", None), getattr(answer, "review", None)
        result = VolumeResult(scan, masks, names, quality, review) if scan else None
        body = await asyncio.to_thread(result_json, masks, (await self.info())["version"], names, scan=result,
                                       answer=answer, spacing=spacing, rle=fmt == "json")
        headers = await self._headers(int(np.count_nonzero(masks)), **{"X-Slices": len(masks)})
        headers.update(volumes.answer_headers(body, spacing))
        if fmt == "json":
            if overlay:
                body["overlays"] = await asyncio.to_thread(volumes.overlay_urls, images, masks, sequence)
            if shown:
                body["layers"] = await asyncio.to_thread(volumes.layer_urls, images, masks, shown)
            return JSONResponse(body, headers=headers)
        headers.update(notes_header(body["notes"]))  # what the JSON answer says, beside the binary one
        if fmt == "png":
            return Response(await asyncio.to_thread(_animation_png, images, masks, sequence), 200, headers,
                            codecs.PNG)
        data, media, extra = await asyncio.to_thread(volumes.encode_masks, fmt, masks, await self._scale(), result,
                                                     str(config.get("name") or "gliomaseg"), headers["X-Model-Version"])
        return Response(data, 200, headers | extra, media)
