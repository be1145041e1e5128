"""Resizing on the device: the torch side of ``core.networks.resample.resize_matrix`` (area down, bilinear up).

The trainer shrinks a split once to its training resolution and enlarges validation probabilities back
to the data's own; the Predictor does the same per request. One set of matrices serves all of them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from core.data.preprocessing import box_matrices
from core.networks.resample import resize_matrix


def _matrix(in_size: int, out_size: int, like: torch.Tensor) -> torch.Tensor:
    return _device_matrix(in_size, out_size, like.device)


@lru_cache(maxsize=64)
def _device_matrix(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """Built and copied to the device once per size pair, not once per batch."""
    return torch.from_numpy(resize_matrix(in_size, out_size)).to(device=device, dtype=torch.float32)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N,C,H,W) float -> (N,C,*size) float32; a no-op at the same size."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    wh, ww = _matrix(x.shape[2], size[0], x), _matrix(x.shape[3], size[1], x)
    return torch.einsum("oh,nchw,pw->ncop", wh, x.float(), ww)


def resize_images(images: torch.Tensor, size: tuple[int, int], chunk: int = 256) -> torch.Tensor:
    """(N,3,H,W) uint8 -> (N,3,*size) uint8, area-averaged and rounded; chunked to bound temporaries."""
    if tuple(images.shape[2:]) == tuple(size):
        return images
    parts = [resize(part, size).round_().clamp_(0, 255).to(torch.uint8) for part in images.split(chunk)]
    return torch.cat(parts) if parts else images.new_zeros((0, images.shape[1], *size))


def resize_labels(masks: torch.Tensor, size: tuple[int, int], chunk: int = 256) -> torch.Tensor:
    """(N,H,W) uint8 labels -> (N,*size) uint8 by majority: each label's area share, then arg-max.

    A binary mask stays exactly 0/1 (a tie goes to background) and a label mask keeps its labels.
    """
    if tuple(masks.shape[1:]) == tuple(size):
        return masks
    classes = int(masks.max()) + 1 if masks.numel() else 1
    out = []
    for part in masks.split(chunk):
        onehot = torch.nn.functional.one_hot(part.long(), max(classes, 2)).permute(0, 3, 1, 2).float()
        out.append(resize(onehot, size).argmax(1).to(torch.uint8))
    return torch.cat(out) if out else masks.new_zeros((0, *size))


def _box_tensors(boxes: np.ndarray, shape: tuple[int, int], size: tuple[int, int], like: torch.Tensor,
                 ) -> list[torch.Tensor]:
    return [torch.from_numpy(m).to(like.device) for m in box_matrices(boxes, shape, size)]


def crop_resize(x: torch.Tensor, boxes: np.ndarray | None, size: tuple[int, int]) -> torch.Tensor:
    """(N,C,H,W) -> (N,C,*size) float32: each slice's crop box (core.data.preprocessing) resampled, or the
    whole slice resized where ``boxes`` is None."""
    if boxes is None:
        return resize(x, size)
    down_h, down_w, _, _ = _box_tensors(boxes, tuple(x.shape[2:]), size, x)
    return torch.einsum("noh,nchw,npw->ncop", down_h, x.float(), down_w)


def uncrop_resize(p: torch.Tensor, boxes: np.ndarray | None, shape: tuple[int, int]) -> torch.Tensor:
    """Model-size (N,K,S0,S1) values back to (N,K,*shape): into each box (zero outside), or resized."""
    if boxes is None:
        return resize(p, shape)
    _, _, up_h, up_w = _box_tensors(boxes, shape, tuple(p.shape[2:]), p)
    return torch.einsum("nho,ncop,nwp->nchw", up_h, p.float(), up_w)


def normalise(x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """(N,C,h,w) pixel values -> standardised, with (N,C,4) rows of (lo, hi, mean, std) (torch twin of
    core.data.preprocessing.normalise)."""
    lo, hi, mean, std = (stats[..., k, None, None] for k in range(4))
    return (torch.minimum(torch.maximum(x, lo), hi) - mean) / std
