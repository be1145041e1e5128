"""core.formats.codecs: every input layout and dtype, every refusal (before decoding), and the encoders."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_support import bomb_tiff, mixed_tiff, tiff_bytes

from core.formats import codecs
from core.formats.codecs import DecodeError, decode
from core.formats.intensity import to_uint8

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8)


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG IHDR claiming width x height with one tiny (invalid) data chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind,data", [
    ("image/tiff", tiff_bytes(RGB, photometric="rgb")),
    ("image/tiff", tiff_bytes(RGB, photometric="rgb", compression="zlib")),
    ("image/tiff", tiff_bytes(np.moveaxis(RGB, -1, 0), photometric="rgb", planarconfig="separate")),
    ("image/png", codecs.encode_png(RGB)),
    ("application/x-npy", codecs.encode_npy(RGB)),
    ("application/x-npy", codecs.encode_npy(np.moveaxis(RGB, -1, 0))),  # channels first
    ("application/x-npy", codecs.encode_npy(np.asfortranarray(RGB))),
    ("application/octet-stream", codecs.encode_npy(RGB)),  # sniffed
    ("image/png; charset=binary", codecs.encode_png(RGB)),
])
def test_decode_rgb_slice(kind: str, data: bytes) -> None:
    out = decode(data, kind, volume=False)
    assert out.shape == (1, 40, 56, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], RGB)


def test_grey_replicates_and_uint16_rescales() -> None:
    grey = RGB[..., 0]
    for data, kind in [(codecs.encode_png(grey), "image/png"), (tiff_bytes(grey), "image/tiff"),
                       (codecs.encode_npy(grey), "application/x-npy")]:
        out = decode(data, kind, volume=False)[0]
        np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
    wide = (grey.astype(np.uint16) * 16)  # 12-bit MRI-like range
    for data, kind in [(codecs.encode_png(wide), "image/png"), (tiff_bytes(wide), "image/tiff"),
                       (codecs.encode_npy(wide.astype(">u2")), "application/x-npy")]:
        out = decode(data, kind, volume=False)[0]  # a slice alone: its own percentile window, as a scan's
        assert out.dtype == np.uint8 and out.max() == 255
        np.testing.assert_array_equal(out[..., 0], to_uint8(wide))


def test_volumes() -> None:
    vol = RNG.integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    for data, kind in [(codecs.encode_volume_tiff(vol), "image/tiff"), (codecs.encode_npy(vol), "application/x-npy"),
                       (codecs.encode_npy(np.moveaxis(vol, -1, 1)), "application/x-npy")]:
        np.testing.assert_array_equal(decode(data, kind, volume=True), vol)
    grey = vol[..., 1]
    out = decode(tiff_bytes(grey, photometric="minisblack"), "image/tiff", volume=True)
    assert out.shape == (5, 40, 56, 3)
    np.testing.assert_array_equal(decode(codecs.encode_npy(grey), "application/x-npy", volume=True)[..., 2], grey)
    assert decode(codecs.encode_png(RGB), "image/png", volume=True).shape == (1, 40, 56, 3)


def _status(data: bytes, kind: str, volume: bool = False, **kw) -> int:
    with pytest.raises(DecodeError) as info:
        decode(data, kind, volume=volume, **kw)
    assert info.value.error and info.value.detail and isinstance(info.value, ValueError)
    return info.value.status


def test_refusals() -> None:
    assert _status(b"", "image/png") == 400
    assert _status(b"hello", "image/tiff") == 400
    assert _status(codecs.encode_png(RGB)[:60], "image/png") == 400  # truncated
    assert _status(codecs.encode_npy(RGB)[:200], "application/x-npy") == 400
    assert _status(b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}    \n", "application/x-npy") == 400
    npy = codecs.encode_npy(RGB)
    assert _status(npy[:10] + b"\x00" + npy[11:], "application/x-npy") == 400  # numpy raises tokenize.TokenError
    assert _status(codecs.encode_png(RGB), "text/plain") == 415
    assert _status(b"whatever", "application/octet-stream") == 415
    assert _status(b"<x/>", "") == 415
    for bad in (RGB.astype(np.float32), np.full((40, 40), np.nan), RGB.astype(np.int16), RGB > 0):
        assert _status(codecs.encode_npy(bad), "application/x-npy") == 422
    assert _status(codecs.encode_npy(np.zeros((40, 40, 4), np.uint8)), "application/x-npy") == 422
    assert _status(codecs.encode_npy(np.zeros(100, np.uint8)), "application/x-npy") == 422
    assert _status(codecs.encode_npy(np.zeros((16, 16, 3), np.uint8)), "application/x-npy") == 422  # too small
    assert _status(codecs.encode_npy(np.zeros((3, 40, 40, 3), np.uint8)), "application/x-npy") == 422  # 3 slices
    assert _status(codecs.encode_volume_tiff(np.zeros((2, 40, 40, 3), np.uint8)), "image/tiff") == 422
    assert _status(tiff_bytes(RGB.astype(np.float32), photometric="rgb"), "image/tiff") == 422
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 128, np.uint8)])
    assert _status(codecs.encode_png(rgba), "image/png") == 422
    rgba[..., 3] = 255  # an opaque alpha channel is dropped, not refused
    np.testing.assert_array_equal(decode(codecs.encode_png(rgba), "image/png", volume=False)[0], RGB)
    # Object arrays are refused from the header; np.save needs pickle for them, which we never load.
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    assert _status(buf.getvalue(), "application/x-npy") == 422


def test_size_limits_checked_before_decoding() -> None:
    assert _status(codecs.encode_npy(np.zeros((1100, 40), np.uint8)), "application/x-npy") == 413
    # Headers claiming huge images with almost no data behind them: refused from the header.
    assert _status(bomb_tiff(), "image/tiff") == 413
    assert _status(bomb_tiff(), "image/tiff", volume=True) == 413
    assert _status(bomb_png(), "image/png") == 413
    assert _status(bomb_png(200_000, 200_000), "image/png") == 413  # past PIL's own bomb limit too
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (100000, 1000, 1000, 3), }"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + header.ljust(117) + b"\n"
    assert _status(npy, "application/x-npy", volume=True) == 413
    vol = codecs.encode_volume_tiff(np.zeros((6, 40, 40, 3), np.uint8))
    assert _status(vol, "image/tiff", volume=True, max_pages=5) == 413
    assert _status(vol, "image/tiff", volume=True, max_pixels=5 * 40 * 40) == 413
    assert decode(vol, "image/tiff", volume=True, max_pages=6).shape[0] == 6
    assert _status(mixed_tiff(), "image/tiff", volume=True) == 422


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.sampled_from(["image/tiff", "image/png", "application/x-npy", ""]))
def test_arbitrary_bytes_only_raise_decode_error(data: bytes, kind: str) -> None:
    for prefix in (b"", b"II*\x00", b"\x89PNG\r\n\x1a\n", b"\x93NUMPY\x01\x00"):
        try:
            out = decode(prefix + data, kind, volume=True)
        except DecodeError as exc:
            assert exc.status in (400, 413, 415, 422)
        else:
            assert out.dtype == np.uint8 and out.ndim == 4


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31))
def test_rle_round_trip(h: int, w: int, seed: int) -> None:
    mask = (np.random.default_rng(seed).random((h, w)) > 0.6).astype(np.uint8)
    rle = codecs.rle_encode(mask)
    assert rle["size"] == [h, w] and sum(rle["counts"]) == h * w
    np.testing.assert_array_equal(codecs.rle_decode(rle), mask)


def test_rle_is_coco_column_major() -> None:
    mask = np.array([[0, 1], [1, 1]], np.uint8)
    assert codecs.rle_encode(mask) == {"size": [2, 2], "counts": [1, 3]}  # F order: 0,1,1,1
    assert codecs.rle_encode(np.ones((2, 2), np.uint8))["counts"] == [0, 4]


def test_encoders() -> None:
    mask = (RNG.random((40, 56)) > 0.7).astype(np.uint8)
    png = np.asarray(Image.open(io.BytesIO(codecs.encode_mask_png(mask))))
    np.testing.assert_array_equal(png, mask * 255)
    masks = np.stack([mask, 1 - mask, mask])
    with tifffile.TiffFile(io.BytesIO(codecs.encode_tiff(masks))) as tif:
        assert len(tif.pages) == 3
        np.testing.assert_array_equal(tif.asarray(), masks * 255)
    np.testing.assert_array_equal(np.load(io.BytesIO(codecs.encode_npy(masks)), allow_pickle=False), masks)
    tinted = codecs.overlay(RGB, mask)
    np.testing.assert_array_equal(tinted[mask == 0], RGB[mask == 0])  # background untouched
    fg = mask == 1
    assert (tinted[fg][:, 0].astype(int) - RGB[fg][:, 0] >= 0).all()  # label 1 pulled towards red
    assert (tinted[fg][:, 0].astype(int) - tinted[fg][:, 1]).mean() > (RGB[fg][:, 0].astype(int) - RGB[fg][:, 1]).mean()
    labels = mask * 2
    assert not np.array_equal(codecs.overlay(RGB, labels)[fg], tinted[fg])  # other labels, other tints
    ov = np.asarray(Image.open(io.BytesIO(codecs.encode_overlay_png(RGB, mask))))
    np.testing.assert_array_equal(ov, tinted)
    vol = RNG.integers(0, 256, (4, 40, 56, 3), dtype=np.uint8)
    anim = Image.open(io.BytesIO(codecs.encode_animation(vol, np.vstack([masks, mask[None]]))))
    assert anim.format == "PNG" and anim.n_frames == 4 and getattr(anim, "is_animated", False)
    assert codecs.mask_scale(["background", "tumour"]) == 255 and codecs.mask_scale(["bg", "a", "b"]) == 1
    assert codecs.data_url(b"\x89PNG").startswith("data:image/png;base64,")
