"""Device-cached data: a split's uint8 arrays are copied to the device once and batched there.

Batches are gathered by index tensors on the device, converted to float and normalised there; the
host never touches pixel data between epochs. uint8 keeps the cache 4x smaller than float32 (the
Kaggle train split is ~0.8 GB as uint8).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from core.data.arrays import SplitArrays
from core.inference.resize import resize_images, resize_labels

SCALE = 1.0 / 255.0  # the bundle's normalisation: uint8 -> [0, 1]


class DeviceDataset:
    """One split resident on ``device``: images (N,3,H,W) uint8, masks (N,H,W) uint8.

    With ``size``, the split is resized once, on the device, to that training resolution (images
    area-averaged, masks by majority so they stay 0/1 or labels): one prepared directory serves every size.
    """

    def __init__(
        self,
        arrays: SplitArrays,
        device: torch.device | str,
        scale: float = SCALE,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.scale = scale
        # One host-to-device copy per split for the whole run (np.array reads a read-only memmap once).
        self.images = torch.from_numpy(np.array(arrays.images, copy=True)).to(self.device)
        self.masks = torch.from_numpy(np.array(arrays.masks, copy=True)).to(self.device)
        if self.images.dtype != torch.uint8 or self.masks.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images and masks, got {self.images.dtype} and {self.masks.dtype}")
        if self.images.ndim != 4 or self.masks.shape != (self.images.shape[0], *self.images.shape[2:]):
            raise ValueError(f"images {tuple(self.images.shape)} and masks {tuple(self.masks.shape)} do not match")
        if size is not None:
            self.images, self.masks = resize_images(self.images, size), resize_labels(self.masks, size)
        tumour = self.masks.flatten(1).amax(1) > 0
        self.tumour_idx = torch.nonzero(tumour).flatten()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 images (B,3,H,W) and uint8 masks (B,H,W) for device index tensor ``idx``."""
        return self.images.index_select(0, idx).float().mul_(self.scale), self.masks.index_select(0, idx)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, math.ceil(len(self) / batch_size))

    def epoch_batches(
        self, batch_size: int, gen: torch.Generator | None = None, oversample: float = 0.0
    ) -> torch.Tensor:
        """(steps, batch_size) index tensor for one epoch, on the device.

        A random permutation, padded with its own head so every batch is full (fixed shapes, and the
        same step count on every data-parallel rank). With ``oversample`` > 0, the first
        ``round(oversample * batch_size)`` places of each batch are tumour slices drawn at random.
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
        return idx

    def eval_batches(self, batch_size: int) -> list[torch.Tensor]:
        """Sequential index tensors covering every slice once, in order."""
        n = len(self)
        return [torch.arange(s, min(s + batch_size, n), device=self.device) for s in range(0, n, batch_size)]
