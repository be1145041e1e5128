"""Device-cached data: a split's uint8 arrays are copied to the device once and batched there.

Batches are gathered by index tensors on the device and converted to float there, with each slice's
standardisation numbers (core.data.preprocessing, computed once per split, per slice or per patient)
beside them; the host never touches pixel data between epochs. uint8 keeps the cache 4x smaller than
float32 (the Kaggle train split is ~0.8 GB as uint8).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from core.data.arrays import SplitArrays
from core.data.preprocessing import Preprocessing
from core.inference.resize import crop_resize, resize_images, resize_labels, uncrop_resize


class DeviceDataset:
    """One split resident on ``device``: images (N,C,H,W) uint8, masks (N,H,W) uint8, stats (N,C,4); C is 3,
    plus a 2.5D bundle's neighbour channels.

    With ``size``, the split is resized once, on the device, to that training resolution (images
    area-averaged, masks by majority so they stay 0/1 or labels): one prepared directory serves every size.
    With a brain crop, each slice's box (its own or its patient's) is what is resized.
    """

    def __init__(
        self,
        arrays: SplitArrays,
        device: torch.device | str,
        size: tuple[int, int] | None = None,
        preprocessing: Preprocessing | None = None,
        chunk: int = 128,
    ) -> None:
        self.device = torch.device(device)
        self.preprocessing = preprocessing or Preprocessing()
        images = self.preprocessing.inputs(np.asarray(arrays.images))  # a read-only memmap is read once, here
        images = self._with_context(images, arrays)
        masks = np.asarray(arrays.masks)
        if images.dtype != np.uint8 or masks.dtype != np.uint8:
            raise ValueError(f"expected uint8 images and masks, got {images.dtype} and {masks.dtype}")
        if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not match")
        self.native_size = (int(images.shape[2]), int(images.shape[3]))
        stats, boxes = self._plan(images, arrays)
        self.stats = torch.from_numpy(stats).to(self.device)
        self.boxes = boxes  # host (N,4) or None: probabilities go back through them
        # One host-to-device copy per split for the whole run. An array made here (2.5D channels, FLAIR
        # copies) is handed over as it is; the split's own (often a read-only memmap) is copied first.
        owned = not np.may_share_memory(images, arrays.images) and images.flags.writeable
        self.images = torch.from_numpy(images if owned else np.array(images, copy=True)).to(self.device)
        del images
        self.masks = torch.from_numpy(np.array(masks, copy=True)).to(self.device)
        if boxes is not None:
            self.images, self.masks = self._crop(size or self.native_size, chunk)
        elif size is not None:
            self.images, self.masks = resize_images(self.images, size), resize_labels(self.masks, size)
        tumour = self.masks.flatten(1).amax(1) > 0
        self.tumour_idx = torch.nonzero(tumour).flatten()
        self.empty_idx = torch.nonzero(~tumour).flatten()
        # Each slice's share of pixels the model last called tumour (read on tumour-free slices only: all
        # of it is false positive there). 1 until a slice has been seen, so every one is drawn at first.
        self.false_positive = torch.ones(len(self), device=self.device)

    def _with_context(self, images: np.ndarray, arrays: SplitArrays) -> np.ndarray:
        """Each slice with its 2.5D neighbours' channels, taken from its patient's slices in order."""
        if not self.preprocessing.context:
            return images
        out = np.empty((len(images), len(self.preprocessing.channel_names), *images.shape[2:]), images.dtype)
        for rows in arrays.patient_rows():
            out[rows] = self.preprocessing.with_context(images[rows])
        return out

    def _plan(self, images: np.ndarray, arrays: SplitArrays) -> tuple[np.ndarray, np.ndarray | None]:
        """Each slice's standardisation stats and crop box, over its patient's rows where the bundle says so."""
        stats = np.empty((len(images), images.shape[1], 4), np.float32)
        boxes = None if self.preprocessing.crop == "none" else np.empty((len(images), 4), np.int64)
        groups = arrays.patient_rows() if self.preprocessing.per_patient else [np.arange(len(images))]
        for rows in groups:
            rows = np.sort(rows)  # a memmap-friendly read, one patient at a time
            group_stats, group_boxes = self.preprocessing.plan(images[rows])
            stats[rows] = group_stats
            if boxes is not None and group_boxes is not None:
                boxes[rows] = group_boxes
        return stats, boxes

    def _crop(self, size: tuple[int, int], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each slice's box resampled to ``size``: images rounded to uint8 levels, masks by majority."""
        assert self.boxes is not None
        classes = max(2, int(self.masks.max()) + 1 if self.masks.numel() else 2)
        images, masks = [], []
        for start in range(0, len(self.images), chunk):
            rows = slice(start, start + chunk)
            boxes = self.boxes[rows]
            images.append(crop_resize(self.images[rows].float(), boxes, size).round_().clamp_(0, 255).to(torch.uint8))
            onehot = torch.nn.functional.one_hot(self.masks[rows].long(), classes).permute(0, 3, 1, 2).float()
            masks.append(crop_resize(onehot, boxes, size).argmax(1).to(torch.uint8))
        return torch.cat(images), torch.cat(masks)

    def restore(self, probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Probabilities (B,K,h,w) of rows ``idx`` back on the data's own grid (through their boxes)."""
        boxes = None if self.boxes is None else self.boxes[idx.cpu().numpy()]
        return uncrop_resize(probs, boxes, self.native_size)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pixel values as float32 (B,C,H,W), uint8 masks (B,H,W) and standardisation stats (B,C,4) for
        device index tensor ``idx`` (``core.inference.resize.normalise`` applies them, after any warp)."""
        return (self.images.index_select(0, idx).float(), self.masks.index_select(0, idx),
                self.stats.index_select(0, idx))

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, math.ceil(len(self) / batch_size))

    def note_predictions(self, idx: torch.Tensor, logits: torch.Tensor, threshold: float = 0.5) -> None:
        """Record what ``logits`` (B,K,H,W) call tumour on rows ``idx`` (any class but background; one channel:
        probability above ``threshold``): the weights of next epoch's hard negatives."""
        tumour = logits.argmax(1) > 0 if logits.shape[1] > 1 else logits[:, 0].float().sigmoid() > threshold
        self.false_positive.index_copy_(0, idx, tumour.flatten(1).float().mean(1))

    def epoch_batches(
        self, batch_size: int, gen: torch.Generator | None = None, oversample: float = 0.0,
        hard_negatives: float = 0.0,
    ) -> torch.Tensor:
        """(steps, batch_size) index tensor for one epoch, on the device.

        A random permutation, padded with its own head so every batch is full (fixed shapes, and the
        same step count on every data-parallel rank). With ``oversample`` > 0, the first
        ``round(oversample * batch_size)`` places of each batch are tumour slices drawn at random. With
        ``hard_negatives`` > 0, the next ``round(hard_negatives * batch_size)`` places are tumour-free
        slices drawn in proportion to the false-positive share ``note_predictions`` last recorded (plus
        one pixel's worth, so a slice the model got right can still be drawn).
        """
        n, steps = len(self), self.steps_per_epoch(batch_size)
        perm = torch.randperm(n, generator=gen, device=self.device)
        total = steps * batch_size
        if total > n:
            perm = perm.repeat(math.ceil(total / n))
        idx = perm[:total].view(steps, batch_size)
        k = round(oversample * batch_size)
        if k > 0 and len(self.tumour_idx):
            pick = torch.randint(len(self.tumour_idx), (steps, k), generator=gen, device=self.device)
            idx = idx.clone()
            idx[:, :k] = self.tumour_idx[pick]
        h = min(round(hard_negatives * batch_size), batch_size - k)
        if h > 0 and len(self.empty_idx):
            weights = self.false_positive[self.empty_idx] + 1.0 / self.masks[0].numel()
            pick = torch.multinomial(weights, steps * h, replacement=True, generator=gen).view(steps, h)
            idx = idx.clone()
            idx[:, k:k + h] = self.empty_idx[pick]
        return idx

    def eval_batches(self, batch_size: int) -> list[torch.Tensor]:
        """Sequential index tensors covering every slice once, in order."""
        n = len(self)
        return [torch.arange(s, min(s + batch_size, n), device=self.device) for s in range(0, n, batch_size)]
