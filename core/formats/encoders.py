"""Encoders: masks and slices as PNG, TIFF, .npy and run-length JSON (what every answer is written as).

Run-length JSON is COCO's uncompressed RLE: ``{"size": [H, W], "counts": [...]}`` over the mask in
column-major (Fortran) order, counts alternating background/foreground and starting with background,
so ``pycocotools.mask.frPyObjects`` reads it unchanged.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from core.formats.decoders import DEFAULT_MAX_PIXELS, bad, too_large


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
        raise bad(f"not a COCO RLE dict with size [H, W] and integer counts ({type(exc).__name__})") from None
    if counts.ndim != 1 or h < 0 or w < 0 or (counts < 0).any():
        raise bad("RLE size and counts must be non-negative, counts a flat list")
    if h * w > DEFAULT_MAX_PIXELS:
        raise too_large(f"RLE of {h}x{w}; at most {DEFAULT_MAX_PIXELS} pixels")
    if counts.sum() != h * w:
        raise bad(f"RLE counts sum to {counts.sum()}, expected {h * w}")
    values = np.arange(len(counts)) % 2
    return np.repeat(values.astype(np.uint8), counts).reshape((h, w), order="F")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
