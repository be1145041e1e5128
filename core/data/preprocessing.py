"""Input preprocessing that a bundle records and every path applies: intensity standardisation and the
brain crop (numpy only, so the torch-free runtimes, ONNX and the SageMaker archive, use it too).

- ``normalisation``: ``scale`` (x / 255), ``slice`` or ``patient``: each channel clipped to the
  [10th, 99th] percentile of the brain's pixels, then z-scored over them (Buda et al. standardise per
  volume; ``slice`` does it per slice, so a single-slice request needs nothing else).
- ``context`` (2.5D): k neighbouring slices each side (FLAIR, or all sequences) as extra input channels,
  taken from the volume before anything else, the edge slice repeated past either end; a slice given
  alone has only itself, repeated (``single_slice_note`` says so).
- ``crop``: ``none``, ``slice`` or ``patient``: the bounding box of the brain (pixels above 10% of the
  maximum), made square about its centre (padded with black where it leaves the image), resized to the
  model's size; probabilities go back into the box on the source grid, zero outside it.

Both reduce to per-slice numbers that every path applies the same way: ``stats`` (n, C, 4) rows of
(lo, hi, mean, std) with ``(clip(x, lo, hi) - mean) / std``, and ``boxes`` (n, 4) of (y0, x0, side_y,
side_x). A ``patient`` setting computes them over the rows given together (one patient's volume); a
path that sees one slice computes them from that slice and says so (``SlicePredictor.scope_note``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from core.networks.resample import resize_matrix

NORMALISATIONS = ("scale", "slice", "patient")
SEQUENCES = ("all", "flair")  # flair: every channel is FLAIR (a model for scans without pre/post-contrast)
FLAIR = 1  # channel order: pre-contrast, FLAIR, post-contrast
CROPS = ("none", "slice", "patient")
CONTEXT_SEQUENCES = ("flair", "all")  # which sequences of each neighbouring slice a 2.5D input takes
MAX_CONTEXT = 3  # neighbouring slices each side: further ones are 10+ mm away on the Kaggle grid
CHANNEL_NAMES = ("pre-contrast", "flair", "post-contrast")
PERCENTILES = (10.0, 99.0)
BRAIN_FRACTION = 0.1  # brain = pixels brighter than this share of the brightest (Buda et al.'s crop)
MIN_BRAIN_PIXELS = 64  # fewer (an empty top-of-head slice): standardise over the whole slice
MIN_SIDE = 32  # a crop never zooms in more than this many source pixels to the model's size
MIN_STD = 1.0  # in uint8 levels: a flat channel (a missing sequence, an empty slice) is not blown up


@dataclass(frozen=True)
class Preprocessing:
    """What a bundle's ``normalisation`` and ``crop`` entries say; ``plan`` turns them into numbers."""

    normalisation: str = "scale"
    crop: str = "none"
    scale: float = 1.0 / 255.0
    percentiles: tuple[float, float] = PERCENTILES
    brain_fraction: float = BRAIN_FRACTION
    sequences: str = "all"
    context: int = 0
    context_sequences: str = "flair"

    def __post_init__(self) -> None:
        if not 0 <= self.context <= MAX_CONTEXT:
            raise ValueError(f"context must be 0 to {MAX_CONTEXT} neighbouring slices each side, got {self.context}")
        if self.context_sequences not in CONTEXT_SEQUENCES:
            raise ValueError(f"context sequences {self.context_sequences!r} is not one of "
                             f"{', '.join(CONTEXT_SEQUENCES)}")
        if self.sequences not in SEQUENCES:
            raise ValueError(f"sequences {self.sequences!r} is not one of {', '.join(SEQUENCES)}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation {self.normalisation!r} is not one of {', '.join(NORMALISATIONS)}")
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r} is not one of {', '.join(CROPS)}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {self.percentiles}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Preprocessing:
        """From a bundle config (one written before the crop existed has no ``crop``: none)."""
        norm = dict(config.get("normalisation") or {"type": "scale"})
        crop = dict(config.get("crop") or {"type": "none"})
        context = dict(config.get("context") or {"slices": 0})
        return cls(
            normalisation=str(norm.get("type", "scale")), crop=str(crop.get("type", "none")),
            scale=float(norm.get("scale", 1.0 / 255.0)),
            percentiles=tuple(float(p) for p in norm.get("percentiles", PERCENTILES)),  # type: ignore[arg-type]
            brain_fraction=float(norm.get("brain_fraction", crop.get("brain_fraction", BRAIN_FRACTION))),
            sequences=str(config.get("sequences", "all")),
            context=int(context.get("slices", 0)), context_sequences=str(context.get("sequences", "flair")),
        )

    def to_config(self) -> dict[str, Any]:
        """The bundle's ``normalisation`` and ``crop`` entries."""
        norm: dict[str, Any] = {"type": self.normalisation}
        if self.normalisation == "scale":
            norm["scale"] = self.scale
        else:
            norm.update(percentiles=list(self.percentiles), brain_fraction=self.brain_fraction)
        crop: dict[str, Any] = {"type": self.crop}
        if self.crop != "none":
            crop["brain_fraction"] = self.brain_fraction
        # Written only for a FLAIR-only model, so every other bundle's config stays as it was.
        sequences = {"sequences": self.sequences} if self.sequences != "all" else {}
        if self.context:
            sequences["context"] = {"slices": self.context, "sequences": self.context_sequences}
            sequences["channels"] = self.channel_names
        return {"normalisation": norm, "crop": crop, **sequences}

    @property
    def channel_names(self) -> list[str]:
        """The model's input channels: the slice's sequences, then each neighbour's (``flair-1``, ``flair+1``)."""
        names = list(CHANNEL_NAMES)
        kept = [CHANNEL_NAMES[FLAIR]] if self.context_sequences == "flair" else list(CHANNEL_NAMES)
        for offset in self._offsets():
            names += [f"{name}{offset:+d}" for name in kept]
        return names

    def _offsets(self) -> list[int]:
        return [o for o in range(-self.context, self.context + 1) if o != 0]

    def with_context(self, volume: np.ndarray, channel_axis: int = 1) -> np.ndarray:
        """One volume's slices in order, (n,C,H,W) (or channels last with ``channel_axis`` 3) -> the same
        with each neighbour's channels appended (edges repeated); unchanged without ``context``."""
        if not self.context:
            return volume
        kept = [FLAIR] if self.context_sequences == "flair" else list(range(volume.shape[channel_axis]))
        n = len(volume)
        parts = [volume]
        for offset in self._offsets():
            rows = np.clip(np.arange(n) + offset, 0, n - 1)
            parts.append(np.take(np.take(volume, rows, axis=0), kept, axis=channel_axis))
        return np.concatenate(parts, axis=channel_axis)

    def inputs(self, images: np.ndarray, channel_axis: int = 1) -> np.ndarray:
        """The channels the model sees: as given, or (``sequences`` flair) FLAIR in every channel."""
        if self.sequences == "all" or images.shape[channel_axis] <= FLAIR:
            return images
        return np.repeat(np.take(images, [FLAIR], axis=channel_axis), images.shape[channel_axis], axis=channel_axis)

    @property
    def per_patient(self) -> bool:
        """Whether a slice's numbers depend on the rest of its volume."""
        return "patient" in (self.normalisation, self.crop)

    def plan(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(n,C,H,W) slices of one volume (or one slice) -> (stats (n,C,4) float32, boxes (n,4) int64 or None)."""
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"expected (n,C,H,W) slices, got shape {images.shape}")
        n, c = images.shape[:2]
        stats = np.empty((n, c, 4), np.float32)
        if self.normalisation == "scale":
            stats[:] = (0.0, 255.0, 0.0, 1.0 / self.scale)
        elif self.normalisation == "patient":
            stats[:] = self._stats(images)
        else:
            for i in range(n):
                stats[i] = self._stats(images[i : i + 1])
        if self.crop == "none":
            return stats, None
        boxes = np.empty((n, 4), np.int64)
        if self.crop == "patient":
            boxes[:] = self._box(images)
        else:
            for i in range(n):
                boxes[i] = self._box(images[i : i + 1])
        return stats, boxes

    def _brain(self, images: np.ndarray) -> np.ndarray:
        brightest = images.max(axis=1)  # (n,H,W): any channel
        return brightest > self.brain_fraction * float(brightest.max(initial=0))

    def _stats(self, images: np.ndarray) -> np.ndarray:
        """(C,4) over the brain pixels of all the rows given."""
        brain = self._brain(images)
        if brain.sum() < MIN_BRAIN_PIXELS:
            brain = np.ones_like(brain)
        out = np.empty((images.shape[1], 4), np.float32)
        for ch in range(images.shape[1]):
            values = images[:, ch][brain].astype(np.float32)
            lo, hi = np.percentile(values, self.percentiles)
            clipped = np.clip(values, lo, hi)
            out[ch] = (lo, hi, clipped.mean(), max(float(clipped.std()), MIN_STD))
        return out

    def _box(self, images: np.ndarray) -> tuple[int, int, int, int]:
        """(y0, x0, side, side): the brain's bounding box over all rows, square about its centre."""
        h, w = images.shape[2:]
        brain = self._brain(images).any(axis=0)
        if not brain.any():
            side = max(h, w)
            return (h - side) // 2, (w - side) // 2, side, side
        ys, xs = np.flatnonzero(brain.any(axis=1)), np.flatnonzero(brain.any(axis=0))
        y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
        side = max(y1 - y0, x1 - x0, MIN_SIDE)
        return y0 - (side - (y1 - y0)) // 2, x0 - (side - (x1 - x0)) // 2, side, side


VOLUME_ENDPOINT = "send the whole volume to /v1/segment/volume"


def single_slice_note(config: dict[str, Any], remedy: str = VOLUME_ENDPOINT) -> str | None:
    """What a path given one slice (not a volume) tells its caller about a bundle's per-patient
    preprocessing, which it computes from that slice alone, and its 2.5D context, which it fills with
    the slice itself; None where nothing differs."""
    p = Preprocessing.from_config(config)
    what = [f"{k} {v}" for k, v in (("normalisation", p.normalisation), ("crop", p.crop)) if v == "patient"]
    notes = [f"this model's {' and '.join(what)} is per patient and was computed from this slice alone"] if what else []
    if p.context:
        notes.append(f"this model also sees {p.context} neighbouring slice(s) each side, which one slice lacks: "
                     "the slice itself was repeated in their place")
    if not notes:
        return None
    return f"{'; '.join(notes)}; {remedy} for the model's own masks"


def normalise(x: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """(n,C,h,w) pixel values -> standardised float32 with per-slice, per-channel (lo, hi, mean, std)."""
    lo, hi, mean, std = (stats[..., k, None, None] for k in range(4))
    return ((np.clip(x, lo, hi) - mean) / std).astype(np.float32)


def mirror_boxes(boxes: np.ndarray | None, width: int) -> np.ndarray | None:
    """The boxes of the left-right mirrored slices (flip TTA)."""
    if boxes is None:
        return None
    out = boxes.copy()
    out[:, 1] = width - boxes[:, 1] - boxes[:, 3]
    return out


def crop_matrix(start: int, side: int, extent: int, out: int) -> np.ndarray:
    """(out, extent): resample source pixels [start, start+side) of one axis to ``out`` (zero outside)."""
    return _on_source_axis(resize_matrix(side, out), start, extent, axis=1)


def uncrop_matrix(start: int, side: int, extent: int, out: int) -> np.ndarray:
    """(extent, out): model-size values back into source pixels [start, start+side), zero elsewhere."""
    return _on_source_axis(resize_matrix(out, side), start, extent, axis=0)


def _on_source_axis(full: np.ndarray, start: int, extent: int, axis: int) -> np.ndarray:
    """``full`` with its source-pixel ``axis`` (pixels start, start+1, ...) laid on [0, extent): a crop box
    may reach past the image, and what lies outside it is dropped."""
    src = np.arange(start, start + full.shape[axis])
    inside = (src >= 0) & (src < extent)
    shape = list(full.shape)
    shape[axis] = extent
    m = np.zeros(shape, np.float32)
    put, take = [slice(None), slice(None)], [slice(None), slice(None)]
    put[axis], take[axis] = src[inside], inside
    m[tuple(put)] = full[tuple(take)]
    return m


def box_matrices(
    boxes: np.ndarray, shape: tuple[int, int], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per slice: down (n,S0,H), (n,S1,W) and up (n,H,S0), (n,W,S1) matrices for its box."""
    h, w = shape
    down_h = np.stack([crop_matrix(int(b[0]), int(b[2]), h, size[0]) for b in boxes])
    down_w = np.stack([crop_matrix(int(b[1]), int(b[3]), w, size[1]) for b in boxes])
    up_h = np.stack([uncrop_matrix(int(b[0]), int(b[2]), h, size[0]) for b in boxes])
    up_w = np.stack([uncrop_matrix(int(b[1]), int(b[3]), w, size[1]) for b in boxes])
    return down_h, down_w, up_h, up_w
