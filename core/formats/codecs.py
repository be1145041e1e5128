"""Slice codecs in one name, for the layers that speak HTTP (serve, the SageMaker handlers, clients, tests).

The code lives by job: ``media`` (types, sniffing, Accept, DecodeError), ``decoders`` (bytes -> slices),
``encoders`` (masks -> PNG, TIFF, .npy, RLE) and ``overlays`` (tinted slices, animations). Modules inside
core import those directly; this one only gathers their public names.
"""

from __future__ import annotations

from core.formats.decoders import DEFAULT_MAX_PAGES, DEFAULT_MAX_PIXELS, decode, read_file, stack_volume
from core.formats.encoders import (
    data_url,
    encode_mask_png,
    encode_npy,
    encode_png,
    encode_tiff,
    encode_volume_tiff,
    mask_scale,
    rle_decode,
    rle_encode,
)
from core.formats.media import EXTENSIONS, JSON, MEDIA_ALIASES, NPY, PNG, SNIFFED, TIFF, DecodeError, media_type, sniff
from core.formats.overlays import OVERLAY_COLOURS, encode_animation, encode_overlay_png, overlay

__all__ = [
    "DEFAULT_MAX_PAGES", "DEFAULT_MAX_PIXELS", "EXTENSIONS", "JSON", "MEDIA_ALIASES", "NPY", "OVERLAY_COLOURS", "PNG",
    "SNIFFED", "TIFF", "DecodeError", "data_url", "decode", "encode_animation", "encode_mask_png", "encode_npy",
    "encode_overlay_png", "encode_png", "encode_tiff", "encode_volume_tiff", "mask_scale", "media_type",
    "overlay", "read_file", "rle_decode", "rle_encode", "sniff", "stack_volume",
]
