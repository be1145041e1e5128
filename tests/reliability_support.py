"""Shared by the reliability and codec tests: TIFF byte builders, the malformed-request corpus and Serve
replica bookkeeping. Imports no torch at module level, so the codec tests stay light."""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

from core.formats import codecs

NPY, TIFF, PNG = "application/x-npy", "image/tiff", "image/png"


def replica_names(app: str, deployment: str = "SegmentModel") -> set[str]:
    """Names of the live Serve replica actors of one deployment (a restarted replica gets a new name)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


class Unpickled:
    """Creates ``marker`` if anything ever unpickles it: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return open, (str(self.marker), "w")


def pickled_npy(marker: Path) -> bytes:
    """An object-dtype .npy whose unpickling creates ``marker`` (the attack, not our code)."""
    buf = io.BytesIO()
    np.save(buf, np.array([Unpickled(marker), 1], dtype=object), allow_pickle=True)
    return buf.getvalue()


def pickled_blob(marker: Path) -> bytes:
    return pickle.dumps({"weight": Unpickled(marker)})


def tiff_bytes(arr: np.ndarray, **kw: object) -> bytes:
    """``arr`` written by tifffile with ``kw`` (photometric, compression, planarconfig...)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def bomb_tiff(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~200-byte TIFF whose tags claim a width x height image (a decompression bomb's header)."""
    data = bytearray(tiff_bytes(np.zeros((40, 50), np.uint8), compression="zlib"))
    page = tifffile.TiffFile(io.BytesIO(bytes(data))).pages[0]
    for tag in page.tags.values():
        if tag.name in ("ImageWidth", "ImageLength"):
            value = width if tag.name == "ImageWidth" else height
            if tag.dtype == 3:  # SHORT tags cannot hold 100k: rewrite the tag as LONG
                struct.pack_into("<HI", data, tag.offset + 2, 4, 1)
            struct.pack_into("<I", data, tag.valueoffset, value)
    return bytes(data)


def many_pages_tiff(pages: int = 10_000) -> bytes:
    """A TIFF with ``pages`` tiny pages (~1.6 MB): a page-count bomb."""
    return tiff_bytes(np.zeros((pages, 8, 8), np.uint8), photometric="minisblack")


def corpus(marker: Path) -> dict[str, tuple[bytes, str, int]]:
    """Malformed single-slice requests: name -> (body, content type, expected status)."""
    from bundle_factory import sample_images  # torch: only the Serve tests build this corpus

    good_tiff = codecs.encode_volume_tiff(sample_images(1, seed=1))
    good_png = codecs.encode_png(sample_images(1, seed=2)[0])
    one = sample_images(1, seed=3)[0]
    nan = np.full((64, 64, 3), np.nan, np.float32)
    return {
        "truncated_tiff": (good_tiff[: len(good_tiff) // 2], TIFF, 400),
        "truncated_tiff_header": (good_tiff[:12], TIFF, 400),
        "wrong_magic_tiff": (b"XX*\x00" + good_tiff[4:], TIFF, 400),
        "wrong_magic_sniffed": (b"XX*\x00" + good_tiff[4:], "application/octet-stream", 415),
        "bomb_100k_tiff": (bomb_tiff(), TIFF, 413),
        "pages_10k_tiff": (many_pages_tiff(), TIFF, 422),  # single-slice endpoint: too many slices
        "zero_byte_tiff": (b"", TIFF, 400),
        "zero_byte_npy": (b"", NPY, 400),
        "zero_byte_untyped": (b"", "application/octet-stream", 415),
        "five_channels": (codecs.encode_npy(np.zeros((64, 64, 5), np.uint8)), NPY, 422),
        "two_channels": (codecs.encode_npy(np.zeros((64, 64, 2), np.uint8)), NPY, 422),
        "nan_float": (codecs.encode_npy(nan), NPY, 422),
        "object_dtype": (pickled_npy(marker), NPY, 422),
        "npy_short_body": (codecs.encode_npy(one)[:500], NPY, 400),
        "png_not_an_image": (b"\x89PNG\r\n\x1a\n" + b"this is text, not chunks" * 20, PNG, 400),
        "png_truncated": (good_png[:80], PNG, 400),
        "png_declared_is_tiff": (b"plain text pretending", PNG, 400),
        "text_plain": (good_png, "text/plain", 415),
        "json_type": (b'{"image": [1, 2, 3]}', "application/json", 415),
        "jpeg_type": (good_png, "image/jpeg", 415),
    }


def volume_corpus() -> dict[str, tuple[bytes, str, int]]:
    """Malformed volume requests (the app under test allows at most 32 slices)."""
    return {
        "pages_10k_volume": (many_pages_tiff(), TIFF, 413),
        "bomb_volume": (bomb_tiff(), TIFF, 413),
        "mixed_sizes": (mixed_tiff(), TIFF, 422),
        "five_channel_volume": (codecs.encode_npy(np.zeros((4, 64, 64, 5), np.uint8)), NPY, 422),
        "zero_slices": (codecs.encode_npy(np.zeros((0, 64, 64, 3), np.uint8)), NPY, 422),
    }


def mixed_tiff() -> bytes:
    """A two-page TIFF whose pages differ in size (40x40, then 48x40)."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(np.zeros((40, 40), np.uint8))
        tw.write(np.zeros((48, 40), np.uint8))
    return buf.getvalue()
