"""Resizing on the device: the torch side of ``core.inference.slices.resize_matrix`` (area down, bilinear up).

The trainer shrinks a split once to its training resolution and enlarges validation probabilities back
to the data's own; the Predictor does the same per request. One set of matrices serves all of them.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from core.inference.slices import resize_matrix


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
