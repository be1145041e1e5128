"""Request and response codecs shared by Ray Serve, the core predict CLI and the SageMaker handler.

Pure functions over bytes and numpy arrays. This module is copied verbatim into the SageMaker archive,
so it imports only numpy, tifffile, PIL and the standard library, never core or torch.

Decoding turns TIFF (single or multi-page), PNG or .npy bytes into (N,H,W,3) uint8 slices. Every
size limit is checked against the headers (TIFF page tags, PNG IHDR, .npy header) BEFORE any pixel
data is decoded, so a small file that claims a huge image costs nothing. ``.npy`` is parsed by hand
from its header and never unpickled. uint16 input is rescaled per channel by the request's maximum.

Run-length JSON is COCO's uncompressed RLE: ``{"size": [H, W], "counts": [...]}`` over the mask in
column-major (Fortran) order, counts alternating background/foreground and starting with background,
so ``pycocotools.mask.frPyObjects`` reads it unchanged.
"""

from __future__ import annotations

import base64
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile
from PIL import Image

TIFF, PNG, NPY = "image/tiff", "image/png", "application/x-npy"
JSON = "application/json"
MEDIA_ALIASES = {
    "image/tiff": TIFF, "image/tif": TIFF, "image/x-tiff": TIFF,
    "image/png": PNG, "application/x-npy": NPY, "application/npy": NPY, "application/x-numpy": NPY,
}
# Declared types we sniff from the magic bytes instead (browsers send "" for .npy, curl sends these).
SNIFFED = {"", "application/octet-stream", "binary/octet-stream"}
EXTENSIONS = {".tif": TIFF, ".tiff": TIFF, ".png": PNG, ".npy": NPY}

DEFAULT_MAX_PIXELS = 1 << 25  # 512 slices of 256x256 per request
DEFAULT_MAX_PAGES = 1024
OVERLAY_COLOURS = np.array(
    [[255, 40, 40], [40, 200, 255], [255, 200, 0], [120, 255, 120], [200, 120, 255]], np.float32
)


class DecodeError(ValueError):
    """A request body that cannot become model input; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.status, self.error, self.detail = status, error, detail

    def to_dict(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


def _bad(detail: str) -> DecodeError:
    return DecodeError(400, "undecodable", detail)


def _too_large(detail: str) -> DecodeError:
    return DecodeError(413, "too_large", detail)


def _shape(detail: str) -> DecodeError:
    return DecodeError(422, "invalid_input", detail)


def sniff(data: bytes) -> str | None:
    """Media type from the magic bytes, or None."""
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return TIFF
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return PNG
    if data[:6] == b"\x93NUMPY":
        return NPY
    return None


def media_type(content_type: str | None, data: bytes = b"") -> str:
    """Canonical media type of a request: parameters dropped, aliases mapped; 415 when unsupported."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
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


def decode(
    data: bytes,
    content_type: str | None,
    *,
    volume: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_pages: int = DEFAULT_MAX_PAGES,
    min_size: int = 32,
    max_size: int = 1024,
) -> np.ndarray:
    """Request bytes -> (N,H,W,3) uint8 slices. ``volume=False`` demands exactly one slice.

    Raises DecodeError: 400 undecodable, 413 too large, 415 unsupported type, 422 wrong shape/dtype.
    """
    kind = media_type(content_type, data)
    if not data:
        raise _bad("empty request body")
    limits = _Limits(volume, max_pixels, max_pages if volume else 1, min_size, max_size)
    if kind == NPY:
        slices = _decode_npy(data, limits)
    elif kind == PNG:
        slices = [_decode_png(data, limits)]
    else:
        slices = _decode_tiff(data, limits)
    if not slices:  # a (0,H,W,3) .npy: np.stack would raise a bare ValueError (a 500)
        raise _shape("the request holds no slices")
    slices = [_to_hwc(s, i) for i, s in enumerate(slices)]
    if len({s.shape for s in slices}) > 1:
        raise _shape(f"slices differ in shape: {sorted({s.shape[:2] for s in slices})}")
    return _to_uint8(np.stack(slices))


@dataclass(frozen=True)
class _Limits:
    volume: bool
    max_pixels: int
    max_pages: int
    min_size: int
    max_size: int

    def check_count(self, n: int) -> None:
        if n > self.max_pages:
            if not self.volume:
                raise _shape(f"{n} slices sent to the single-slice endpoint; send them as a volume")
            raise _too_large(f"more than {self.max_pages} slices in one request")

    def check(self, n: int, h: int, w: int) -> None:
        """Refuse claimed dimensions before any pixels are decoded."""
        self.check_count(n)
        if h > self.max_size or w > self.max_size:
            raise _too_large(f"slice of {h}x{w}; at most {self.max_size}x{self.max_size}")
        if h < self.min_size or w < self.min_size:
            raise _shape(f"slice of {h}x{w}; at least {self.min_size}x{self.min_size}")
        if n * h * w > self.max_pixels:
            raise _too_large(f"{n}x{h}x{w} pixels; at most {self.max_pixels} per request")


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.hasobject or dtype.fields is not None:
        raise _shape(f"{where}: object or structured dtype {dtype} is not accepted")
    if np.dtype(dtype).newbyteorder("=") not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise _shape(f"{where}: dtype {dtype} is not supported; send uint8 or uint16")


def _spatial(shape: tuple[int, ...], volume: bool) -> tuple[int, int, int]:
    """(N,H,W) implied by an array shape; see _to_hwc for the accepted layouts."""
    nd = len(shape)
    if nd == 2:
        return 1, shape[0], shape[1]
    if nd == 3:
        if shape[-1] in (1, 3):
            return 1, shape[0], shape[1]
        if shape[0] == 3 and not volume:
            return 1, shape[1], shape[2]
        if volume:
            return shape[0], shape[1], shape[2]
    if nd == 4 and (shape[-1] in (1, 3) or shape[1] == 3):
        return (shape[0], shape[1], shape[2]) if shape[-1] in (1, 3) else (shape[0], shape[2], shape[3])
    raise _shape(f"array of shape {tuple(shape)}; expected HxW, HxWx3"
                 + (", NxHxW or NxHxWx3" if volume else " (one slice)"))


def _decode_npy(data: bytes, limits: _Limits) -> list[np.ndarray]:
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"npy format version {version} is not supported")
    except Exception as exc:  # numpy's header parser raises many types (tokenize.TokenError among them)
        raise _bad(f"not a readable .npy file ({type(exc).__name__}: {exc})") from None
    _check_dtype(dtype, "npy")
    n, h, w = _spatial(tuple(shape), limits.volume)
    limits.check(n, h, w)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - fp.tell() < count * dtype.itemsize:
        raise _bad(f".npy header claims {count} values of {dtype} but the body is shorter")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=fp.tell())
    arr = arr.reshape(shape, order="F" if fortran else "C")
    if arr.ndim == 4 or (arr.ndim == 3 and limits.volume and arr.shape[-1] not in (1, 3)):
        return list(arr)
    return [arr]


def _decode_png(data: bytes, limits: _Limits) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=["PNG"])
            w, h = im.size
            limits.check(1, h, w)  # IHDR only: nothing decoded yet
            im.load()
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(f"PNG claims too many pixels ({exc})") from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise _bad(f"not a readable PNG ({type(exc).__name__}: {exc})") from None
    if im.mode in ("1", "P", "PA"):
        im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
    if im.mode in ("LA", "RGBA"):
        arr = np.asarray(im)
        if arr[..., -1].min() < 255:
            raise _shape("PNG has transparent pixels; send an opaque greyscale or RGB slice")
        return arr[..., :-1]
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise _shape(f"PNG mode {im.mode} holds values outside 0..65535")
        return arr.astype(np.uint16)
    if im.mode not in ("L", "RGB"):
        raise _shape(f"PNG mode {im.mode} is not supported; send greyscale or RGB, 8 or 16 bit")
    return np.asarray(im)


def _decode_tiff(data: bytes, limits: _Limits) -> list[np.ndarray]:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            pages = []
            for page in tif.pages:  # headers only; stop early on too many pages
                limits.check_count(len(pages) + 1)
                pages.append(page)
            if not pages:
                raise _bad("TIFF has no pages")
            for i, page in enumerate(pages):
                if getattr(page, "imagedepth", 1) > 1:
                    raise _shape(f"page {i}: volumetric TIFF pages are not supported")
                spp = int(getattr(page, "samplesperpixel", 1))
                if spp not in (1, 3):
                    raise _shape(f"page {i}: {spp} samples per pixel; expected 1 (grey) or 3 (RGB)")
                _check_dtype(np.dtype(page.dtype) if page.dtype is not None else np.dtype("V"), f"page {i}")
                limits.check(len(pages), int(page.imagelength), int(page.imagewidth))
            return [_page_array(p) for p in pages]
    except DecodeError:
        raise
    except Exception as exc:  # tifffile and its codecs raise many types for corrupt files
        raise _bad(f"not a readable TIFF ({type(exc).__name__}: {exc})") from None


def _page_array(page: Any) -> np.ndarray:
    arr = page.asarray()
    if page.axes.startswith("S") and arr.ndim == 3:  # planar RGB
        arr = np.moveaxis(arr, 0, -1)
    return arr


def _to_hwc(arr: np.ndarray, i: int) -> np.ndarray:
    """One slice as HxWxC: HxW and HxWx1 replicate to 3 channels; 3xHxW (channels first) is moved."""
    if arr.ndim == 2:
        arr = arr[..., None]
    elif arr.ndim == 3 and arr.shape[-1] not in (1, 3) and arr.shape[0] == 3:
        arr = np.moveaxis(arr, 0, -1)
    elif arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise _shape(f"slice {i}: shape {arr.shape}; expected HxW or HxWx3")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def _to_uint8(stack: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 scaled per channel by the request's maximum (MRI intensities have no fixed range)."""
    if stack.dtype == np.uint8:
        return np.ascontiguousarray(stack)
    if stack.dtype.newbyteorder("=") != np.dtype(np.uint16):
        raise _shape(f"dtype {stack.dtype} is not supported; send uint8 or uint16")
    peak = stack.reshape(-1, stack.shape[-1]).max(0).astype(np.float32)
    scale = np.where(peak > 0, 255.0 / np.maximum(peak, 1), 0.0).astype(np.float32)
    out = np.empty(stack.shape, np.uint8)
    for i, s in enumerate(stack):  # slice by slice: a float copy of a whole volume would be 4x its size
        out[i] = np.rint(s.astype(np.float32) * scale).clip(0, 255)
    return out


# ---------------------------------------------------------------------------------------- encoders


def mask_scale(class_names: Sequence[str]) -> int:
    """Value a foreground pixel gets in viewable mask images: 255 for binary, labels as-is otherwise."""
    return 255 if len(class_names) <= 2 else 1


def encode_png(image: np.ndarray) -> bytes:
    """HxW or HxWx3 uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_mask_png(mask: np.ndarray, scale: int = 255) -> bytes:
    """(H,W) mask -> greyscale PNG; binary masks as 0/255 with the default scale."""
    return encode_png((mask.astype(np.uint16) * scale).clip(0, 255).astype(np.uint8))


def encode_tiff(masks: np.ndarray, scale: int = 255) -> bytes:
    """(H,W) or (N,H,W) masks -> TIFF with one greyscale page per slice (0/255 for binary)."""
    stack = (np.asarray(masks).astype(np.uint16) * scale).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    tifffile.imwrite(buf, stack, photometric="minisblack", compression="zlib")
    return buf.getvalue()


def encode_volume_tiff(images: np.ndarray) -> bytes:
    """(N,H,W,3) uint8 slices -> multi-page RGB TIFF (a volume request body)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(images), photometric="rgb")
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """Any plain numeric array -> .npy bytes (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """(H,W) mask foreground -> COCO uncompressed RLE (column-major, counts start with background)."""
    flat = np.asarray(mask).ravel(order="F") > 0
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of rle_encode: (H,W) uint8 0/1. Malformed input raises DecodeError (400)."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = np.asarray(rle["counts"], dtype=np.int64)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"not a COCO RLE dict with size [H, W] and integer counts ({type(exc).__name__})") from None
    if counts.ndim != 1 or h < 0 or w < 0 or (counts < 0).any():
        raise _bad("RLE size and counts must be non-negative, counts a flat list")
    if h * w > DEFAULT_MAX_PIXELS:
        raise _too_large(f"RLE of {h}x{w}; at most {DEFAULT_MAX_PIXELS} pixels")
    if counts.sum() != h * w:
        raise _bad(f"RLE counts sum to {counts.sum()}, expected {h * w}")
    values = np.arange(len(counts)) % 2
    return np.repeat(values.astype(np.uint8), counts).reshape((h, w), order="F")


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """HxWx3 uint8 slice with the mask's foreground tinted (red for label 1)."""
    out = image.astype(np.float32)
    for label in np.unique(mask[mask > 0]):
        region = mask == label
        out[region] = (1 - alpha) * out[region] + alpha * OVERLAY_COLOURS[(int(label) - 1) % len(OVERLAY_COLOURS)]
    return out.clip(0, 255).astype(np.uint8)


def encode_overlay_png(image: np.ndarray, mask: np.ndarray) -> bytes:
    return encode_png(overlay(image, mask))


def encode_animation(images: np.ndarray, masks: np.ndarray, frame_ms: int = 120) -> bytes:
    """One patient's overlays as an animated PNG (APNG, lossless, looping); one slice gives a plain PNG."""
    frames = [Image.fromarray(overlay(i, m)) for i, m in zip(images, masks, strict=True)]
    buf = io.BytesIO()
    if len(frames) == 1:
        frames[0].save(buf, format="PNG")
    else:
        frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0,
                       compress_level=1)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def read_file(path: str, *, volume: bool = False, **limits: Any) -> np.ndarray:
    """Decode a local file by its extension, with the same rules and limits as a request."""
    with open(path, "rb") as f:
        data = f.read()
    suffix = os.path.splitext(path)[1].lower()  # unknown or none: sniffed from the magic bytes
    return decode(data, EXTENSIONS.get(suffix, ""), volume=volume, **limits)

