"""Overlays: a slice with its mask's foreground tinted, as a PNG or one patient's animated PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from core.formats.encoders import encode_png

OVERLAY_COLOURS = np.array(
    [[255, 40, 40], [40, 200, 255], [255, 200, 0], [120, 255, 120], [200, 120, 255]], np.float32
)


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
