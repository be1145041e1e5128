"""What every predictor shares, whatever runs the network (PyTorch in core, ONNX Runtime on the edge).

Input rules (HxWx3 or HxW uint8 slices of any size), the bundle's preprocessing (standardisation and
brain crop, core.data.preprocessing: computed per slice or per volume), grouping same-size slices into
batches, thresholding or arg-max, and post-processing live here once. A subclass supplies ``_network``
(standardised model-size input -> probabilities) or, to keep the pixels on its device, ``_forward``.
Imports numpy, core.data.preprocessing, core.inference.postprocess and .quality and core.networks.resample
only, so torch-free runtimes use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.data.preprocessing import FLAIR, Preprocessing, box_matrices, mirror_boxes, normalise
from core.inference.postprocess import apply_postprocess, postprocess_volume
from core.inference.quality import assess
from core.networks.resample import resize_matrix

Images = np.ndarray | Sequence[np.ndarray]
Spacing = Sequence[float] | None  # (slice, row, column) mm; None: the Kaggle grid's
TTA_MODES = ("none", "flip")  # test-time augmentation: none, or left-right flip with probabilities averaged


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N,C,H,W) float32 -> (N,C,*size) with ``resize_matrix`` on each axis (numpy twin of core.inference.resize)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    wh, ww = resize_matrix(x.shape[2], size[0]), resize_matrix(x.shape[3], size[1])
    return np.einsum("oh,nchw,pw->ncop", wh, x, ww, optimize=True).astype(np.float32)


def model_input(batch: np.ndarray, stats: np.ndarray, boxes: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """(n,H,W,3) uint8 -> the network's (n,3,*size) float32 input: cropped or resized, rounded to uint8
    levels (as the trainer's resized split is stored), standardised."""
    x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
    if boxes is None:
        x = resize(x, size)
    else:
        down_h, down_w, _, _ = box_matrices(boxes, batch.shape[1:3], size)
        x = np.einsum("noh,nchw,npw->ncop", down_h, x, down_w, optimize=True)
    return np.ascontiguousarray(normalise(np.clip(np.round(x), 0, 255), stats))


def model_output(probs: np.ndarray, shape: tuple[int, int], boxes: np.ndarray | None) -> np.ndarray:
    """The network's (n,K,*size) probabilities back on the slices' (H,W) grid (into their boxes)."""
    if boxes is None:
        return resize(probs, shape)
    _, _, up_h, up_w = box_matrices(boxes, shape, tuple(probs.shape[2:]))
    return np.einsum("nho,ncop,nwp->nchw", up_h, probs, up_w, optimize=True).astype(np.float32)


def as_slices(images: Images) -> list[np.ndarray]:
    """Validate and unify inputs to a list of HxWx3 uint8 arrays; ValueError names the problem."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3 and images.shape[-1] == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"expected (N,H,W,3) or (H,W,3) images, got shape {images.shape}")
        images = list(images)
    slices = []
    for i, s in enumerate(images):
        s = np.asarray(s)
        if s.ndim == 2:
            s = np.repeat(s[..., None], 3, axis=-1)
        if s.ndim != 3 or s.shape[-1] != 3:
            raise ValueError(f"slice {i}: expected HxWx3 or HxW, got shape {s.shape}")
        if s.dtype != np.uint8:
            raise ValueError(f"slice {i}: expected uint8, got {s.dtype}")
        slices.append(s)
    return slices


@dataclass
class Segmentation:
    """One volume's answer: (N,H,W) uint8 masks, their quality (0-1) and whether a reader should review it."""

    masks: np.ndarray
    quality: float | None = None
    review: bool | None = None
    network_mask_kept: bool = False  # the rules would have emptied the volume: the network's mask, for review


def _check_one_size(slices: list[np.ndarray]) -> None:
    if len({s.shape for s in slices}) > 1:
        raise ValueError(f"a volume's slices must all have one size, got {sorted({s.shape[:2] for s in slices})}")


class SlicePredictor:
    """Bundle config -> masks at each input's own resolution; subclasses implement ``_network``."""

    config: dict[str, Any]
    metrics: dict[str, Any]
    batch_size: int
    # Held around each forward chunk: callers sharing one predictor across threads (a Serve replica's
    # slice batches and volumes) set a fair lock here, so they take turns per chunk, not per call.
    device_gate: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext

    def _configure(self, config: dict[str, Any], metrics: dict[str, Any], batch_size: int) -> None:
        self.config, self.metrics, self.batch_size = config, metrics, batch_size
        self.size = (int(config["image_size"][0]), int(config["image_size"][1]))
        self.threshold = float(config.get("threshold", 0.5))
        self.postprocess = config.get("postprocess", {})
        # A routed ensemble's FLAIR-only path may carry its own rules, chosen on its members' predictions.
        self.postprocess_flair_only: dict[str, Any] | None = config.get("postprocess_flair_only")
        self.quality = config.get("quality") or {}
        self.multiclass = int(config["model_args"]["out_channels"]) > 1
        self.tta = str(config.get("tta", "none"))
        if self.tta not in TTA_MODES:
            raise ValueError(f"bundle config: tta {self.tta!r} is not one of {', '.join(TTA_MODES)}")
        self.preprocessing = Preprocessing.from_config(config)

    @property
    def version(self) -> str:
        return str(self.config.get("version", "unknown"))

    def _network(self, x: np.ndarray) -> np.ndarray:
        """(n,C,*size) standardised float32 -> (n,K,*size) probabilities (K = 1 binary, classes otherwise)."""
        raise NotImplementedError

    def _forward(self, batch: np.ndarray, stats: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
        """(n,H,W,3) uint8 of one size -> (n,H,W) probabilities, or (n,C,H,W) for multi-class (numpy)."""
        probs = model_output(self._network(model_input(batch, stats, boxes, self.size)), batch.shape[1:3], boxes)
        return probs if self.multiclass else probs[:, 0]

    def _forward_tta(self, batch: np.ndarray, stats: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
        """``_forward``, averaged with the left-right mirrored pass where the bundle chose flip TTA."""
        probs = self._forward(batch, stats, boxes)
        if self.tta == "flip":
            mirrored = self._forward(np.ascontiguousarray(batch[:, :, ::-1]), stats,
                                     mirror_boxes(boxes, batch.shape[2]))
            probs = 0.5 * (probs + mirrored[..., ::-1])
        return probs

    @staticmethod
    def _volumes(n: int, volume: bool, patients: Sequence[str] | None) -> list[list[int]]:
        """The rows of each volume among ``n`` slices: all of them (``volume``), each patient's (in the
        order given), or each slice alone."""
        if volume:
            return [list(range(n))] if n else []
        if patients is None:
            return [[i] for i in range(n)]
        if len(patients) != n:
            raise ValueError(f"{len(patients)} patient ids for {n} slices")
        by_patient: dict[str, list[int]] = {}
        for i, p in enumerate(patients):
            by_patient.setdefault(str(p), []).append(i)
        return list(by_patient.values())

    def _model_slices(self, slices: list[np.ndarray], groups: list[list[int]]) -> list[np.ndarray]:
        """The channels the model sees per HxWx3 slice: the bundle's sequences, then its 2.5D neighbours
        from the slice's volume (``groups``)."""
        slices = [self.preprocessing.inputs(s, channel_axis=2) for s in slices]
        if not self.preprocessing.context:
            return slices
        for rows in groups:
            _check_one_size([slices[i] for i in rows])
            stacked = self.preprocessing.with_context(np.stack([slices[i] for i in rows]), channel_axis=3)
            for k, i in enumerate(rows):
                slices[i] = stacked[k]
        return slices

    def _plans(self, slices: list[np.ndarray], groups: list[list[int]],
               ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """Per slice: standardisation stats and crop box, from its volume (``groups``) where the bundle's
        preprocessing is per patient, otherwise from itself."""
        stats: list[np.ndarray] = [np.empty(0)] * len(slices)
        boxes: list[np.ndarray | None] = [None] * len(slices)
        for rows in groups:
            _check_one_size([slices[i] for i in rows])
            volume_chw = np.stack([slices[i] for i in rows]).transpose(0, 3, 1, 2)
            group_stats, group_boxes = self.preprocessing.plan(volume_chw)
            for k, i in enumerate(rows):
                stats[i] = group_stats[k]
                boxes[i] = None if group_boxes is None else group_boxes[k]
        return stats, boxes

    def predict_proba(self, images: Images, volume: bool = False,
                      patients: Sequence[str] | None = None) -> list[np.ndarray]:
        """Per slice: (H,W) tumour probability (binary) or (C,H,W) class probabilities (multi-class).

        ``volume=True``: the slices are one patient's volume, in order; ``patients``: the patient of each
        slice (each patient's slices in order). A ``patient`` bundle standardises and crops over those and
        a 2.5D bundle takes its neighbours from them; otherwise each slice stands alone.
        """
        slices = as_slices(images)
        groups = self._volumes(len(slices), volume, patients)
        slices = self._model_slices(slices, groups)
        stats, boxes = self._plans(slices, groups)
        out: list[np.ndarray | None] = [None] * len(slices)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(slices):
            by_shape.setdefault(s.shape[:2], []).append(i)
        for idx in by_shape.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                chunk_boxes = None if boxes[chunk[0]] is None else np.stack([boxes[i] for i in chunk])
                with self.device_gate():
                    probs = self._forward_tta(np.stack([slices[i] for i in chunk]),
                                              np.stack([stats[i] for i in chunk]), chunk_boxes)
                for i, p in zip(chunk, probs, strict=True):
                    out[i] = p
        return out  # type: ignore[return-value]

    def segment(self, images: Images, spacing: Spacing = None) -> Segmentation:
        """One patient's slices, in order, as a volume: per-patient preprocessing, the 3D post-processing
        at ``spacing``, and the answer's quality score."""
        probs = self.predict_proba(images, volume=True)  # one size: the volume's plan checks it
        if not probs:
            return Segmentation(np.zeros((0, *self.size), np.uint8))
        stacked = np.stack(probs)
        tumour = None if self.multiclass else stacked
        masks, kept = postprocess_volume(np.stack([self.masks_from_proba(p) for p in probs]), self._rules(images),
                                         probs=tumour, spacing=spacing)
        quality, review = assess(stacked, masks, self.quality)
        return Segmentation(masks, quality, True if kept else review, kept)

    def predict(self, images: Images, volume: bool = False, spacing: Spacing = None) -> np.ndarray | list[np.ndarray]:
        """Masks (uint8; 0/1 binary or 0..K labels). ``volume=True``: the slices are one patient in order,
        so per-patient preprocessing and 3D post-processing (at ``spacing``) apply. Same-size input gives
        an array."""
        if volume:
            return self.segment(images, spacing).masks
        slices = as_slices(images)
        masks = [self.slice_mask(s, p, spacing) for s, p in zip(slices, self.predict_proba(slices), strict=True)]
        if len({m.shape for m in masks}) == 1:
            return np.stack(masks) if masks else np.zeros((0, *self.size), np.uint8)
        return masks

    def slice_mask(self, image: np.ndarray, proba: np.ndarray, spacing: Spacing = None) -> np.ndarray:
        """One slice's mask from its probabilities, with the one-slice rules at ``spacing`` (None: the Kaggle
        grid's): what ``predict`` gives a slice, for callers that batch slices of different spacings."""
        mask = self.masks_from_proba(proba)[None]
        return apply_postprocess(mask, self._rules([image]), volume=False,
                                 probs=None if self.multiclass else proba[None], spacing=spacing)[0]

    def _rules(self, images: Images) -> dict[str, Any]:
        """The post-processing for these slices: the FLAIR-only path's where every slice's pre- and
        post-contrast are exact copies of FLAIR (what a routed ensemble sends to its FLAIR-only members)."""
        if not self.postprocess_flair_only:
            return self.postprocess
        slices = as_slices(images)
        copies = bool(slices) and all((s == s[..., FLAIR : FLAIR + 1]).all() for s in slices)
        return self.postprocess_flair_only if copies else self.postprocess

    def masks_from_proba(self, proba: np.ndarray) -> np.ndarray:
        if self.multiclass:
            return proba.argmax(axis=0).astype(np.uint8)
        return (proba > self.threshold).astype(np.uint8)
