"""Decoders: TIFF (single or multi-page), PNG or .npy bytes -> (N,H,W,3) uint8 slices.

Pure functions over bytes and numpy arrays (numpy, tifffile, PIL and the standard library). Every size
limit is checked against the headers (TIFF page tags, PNG IHDR, .npy header) BEFORE any pixel data is
decoded, so a small file that claims a huge image costs nothing. ``.npy`` is parsed by hand from its header
and never unpickled. uint16 input maps to uint8 by one rule for a whole volume (core.formats.intensity, as
NIfTI and DICOM scans): a request's slices together, or one patient's slice files together (``stack_volume``
over files decoded with ``raw=True``); only a slice sent alone is its own scope. What a body is (its media
type) is core.formats.media; the refusals are its DecodeError.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from core.formats.intensity import to_uint8
from core.formats.media import EXTENSIONS, NPY, PNG, DecodeError, media_type

DEFAULT_MAX_PIXELS = 1 << 25  # 512 slices of 256x256 per request
DEFAULT_MAX_PAGES = 1024


def bad(detail: str) -> DecodeError:
    """400: bytes that are not what they claim to be."""
    return DecodeError(400, "undecodable", detail)


def too_large(detail: str) -> DecodeError:
    return DecodeError(413, "too_large", detail)


def _shape(detail: str) -> DecodeError:
    return DecodeError(422, "invalid_input", detail)


def decode(
    data: bytes,
    content_type: str | None,
    *,
    volume: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_pages: int = DEFAULT_MAX_PAGES,
    min_size: int = 32,
    max_size: int = 1024,
    raw: bool = False,
) -> np.ndarray:
    """Request bytes -> (N,H,W,3) uint8 slices. ``volume=False`` demands exactly one slice. ``raw=True``
    keeps uint16 as it is, for a caller that stacks several files into one volume (``stack_volume``).

    Raises DecodeError: 400 undecodable, 413 too large, 415 unsupported type, 422 wrong shape/dtype.
    """
    kind = media_type(content_type, data)
    if not data:
        raise bad("empty request body")
    limits = _Limits(volume, max_pixels, max_pages if volume else 1, min_size, max_size)
    if kind == NPY:
        arr = _read_npy(data, limits)
        if arr.dtype == np.uint8 and arr.shape[-1] == 3 and arr.flags.c_contiguous and (
                arr.ndim == 3 or (arr.ndim == 4 and len(arr))):
            return arr if arr.ndim == 4 else arr[None]  # zero-copy: a read-only view on the request's bytes
        slices = _npy_slices(arr, limits)
    elif kind == PNG:
        slices = [_decode_png(data, limits)]
    else:
        slices = _decode_tiff(data, limits)
    if not slices:  # a (0,H,W,3) .npy: np.stack would raise a bare ValueError (a 500)
        raise _shape("the request holds no slices")
    slices = [_to_hwc(s, i) for i, s in enumerate(slices)]
    if len({s.shape for s in slices}) > 1:
        raise _shape(f"slices differ in shape: {sorted({s.shape[:2] for s in slices})}")
    stack = np.stack(slices)
    if raw:
        return stack.astype(stack.dtype.newbyteorder("="), copy=False)
    return volume_uint8(stack)


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
            raise too_large(f"more than {self.max_pages} slices in one request")

    def check(self, n: int, h: int, w: int) -> None:
        """Refuse claimed dimensions before any pixels are decoded."""
        self.check_count(n)
        if h > self.max_size or w > self.max_size:
            raise too_large(f"slice of {h}x{w}; at most {self.max_size}x{self.max_size}")
        if h < self.min_size or w < self.min_size:
            raise _shape(f"slice of {h}x{w}; at least {self.min_size}x{self.min_size}")
        if n * h * w > self.max_pixels:
            raise too_large(f"{n}x{h}x{w} pixels; at most {self.max_pixels} per request")


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


def _read_npy(data: bytes, limits: _Limits) -> np.ndarray:
    """The .npy body as an array viewing ``data`` (no copy), its header checked against ``limits`` first."""
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
        raise bad(f"not a readable .npy file ({type(exc).__name__}: {exc})") from None
    _check_dtype(dtype, "npy")
    n, h, w = _spatial(tuple(shape), limits.volume)
    limits.check(n, h, w)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - fp.tell() < count * dtype.itemsize:
        raise bad(f".npy header claims {count} values of {dtype} but the body is shorter")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=fp.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def _npy_slices(arr: np.ndarray, limits: _Limits) -> list[np.ndarray]:
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
        raise too_large(f"PNG claims too many pixels ({exc})") from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise bad(f"not a readable PNG ({type(exc).__name__}: {exc})") from None
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
                raise bad("TIFF has no pages")
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
        raise bad(f"not a readable TIFF ({type(exc).__name__}: {exc})") from None


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


def volume_uint8(stack: np.ndarray) -> np.ndarray:
    """(N,H,W,3) uint8 or uint16 slices of one volume (or one slice) -> uint8. uint8 stays as it is; uint16
    maps per channel by core.formats.intensity's percentile window over the whole stack, so every slice of a
    volume shares one scale (MRI intensities have no fixed range, and a hot pixel must not darken its slice)."""
    if stack.dtype == np.uint8:
        return np.ascontiguousarray(stack)
    if stack.dtype.newbyteorder("=") != np.dtype(np.uint16):
        raise _shape(f"dtype {stack.dtype} is not supported; send uint8 or uint16")
    out = np.empty(stack.shape, np.uint8)
    for c in range(stack.shape[-1]):
        # a grey slice is one channel repeated: map it once
        same = next((d for d in range(c) if np.array_equal(stack[..., d], stack[..., c])), None)
        out[..., c] = out[..., same] if same is not None else to_uint8(stack[..., c])
    return out


def stack_volume(slices: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
    """One patient's slice files, each decoded with ``raw=True`` into (H,W,3) slices (``names[i]`` the file of
    ``slices[i]``, for errors), as one (N,H,W,3) uint8 volume: one size, one bit depth, one intensity scale.

    Raises DecodeError (422) naming the first file that differs from the first slice in size or bit depth.
    """
    if not slices:
        raise _shape("a volume needs at least one slice")
    first = slices[0]
    for name, s in zip(names, slices, strict=True):
        if s.shape != first.shape:
            raise _shape(f"{name}: slice of {s.shape[0]}x{s.shape[1]}, but {names[0]} is "
                         f"{first.shape[0]}x{first.shape[1]}; a volume needs one size")
        if s.dtype.itemsize != first.dtype.itemsize:
            raise _shape(f"{name}: {8 * s.dtype.itemsize}-bit, but {names[0]} is {8 * first.dtype.itemsize}-bit; "
                         "a volume's slices need one bit depth (one intensity scale)")
    return volume_uint8(np.stack(slices))


def read_file(path: str, *, volume: bool = False, raw: bool = False, **limits: Any) -> np.ndarray:
    """Decode a local file by its extension, with the same rules and limits as a request (``raw``: as decode)."""
    with open(path, "rb") as f:
        data = f.read()
    suffix = os.path.splitext(path)[1].lower()  # unknown or none: sniffed from the magic bytes
    return decode(data, EXTENSIONS.get(suffix, ""), volume=volume, raw=raw, **limits)

