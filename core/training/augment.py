"""Batched on-device augmentation: one affine warp per batch, then intensity changes and noise.

Flip, rotation, scale and the optional random crop are folded into one (B,2,3) affine matrix, so the
whole batch is resampled by a single ``grid_sample`` call: images bilinear, masks nearest-neighbour
(labels are copied, never interpolated, so a binary mask stays exactly binary). The warp runs on pixel
values (its zero padding is black, as the scanner's background), then the batch is standardised, then
intensity changes and noise apply. ``substitute_sequences`` mimics a missing sequence the way the Kaggle
set fills one: with a copy of FLAIR. No per-sample Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random transforms; defaults are the issue's (+-15 deg, scale 0.9-1.1)."""

    flip: float = 0.5  # probability of a left-right flip (brains are roughly symmetric)
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    crop: int = 0  # output size of a random square crop; 0 keeps the full slice
    intensity_scale: float = 0.1  # per-channel gain in [1-s, 1+s]
    intensity_shift: float = 0.1  # per-channel offset in [-s, s] (on the standardised scale)
    noise: float = 0.05  # std of additive Gaussian noise; 0 disables


def _uniform(n: int, low: float, high: float, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def random_affine(
    batch: int,
    size: tuple[int, int],
    settings: AugmentSettings,
    gen: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """(B,2,3) matrices mapping output to input coordinates (``affine_grid`` convention)."""
    angle = _uniform(batch, -1.0, 1.0, gen, device) * math.radians(settings.rotate_deg)
    # A zoom by s samples the input at coordinates / s.
    zoom = _uniform(batch, settings.scale[0], settings.scale[1], gen, device)
    flip = torch.where(torch.rand(batch, generator=gen, device=device) < settings.flip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    if settings.crop and settings.crop < min(size):
        # The crop is a window of crop/size of the (already rotated/zoomed) slice at a random offset:
        # shrink the output grid and translate it, all inside the same warp.
        for axis, extent in ((1, size[0]), (0, size[1])):  # theta row 0 is x (width), row 1 is y
            frac = settings.crop / extent
            theta[:, axis, :2] *= frac
            theta[:, axis, 2] = _uniform(batch, -(1 - frac), 1 - frac, gen, device)
    return theta


def warp(
    images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor, out_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample (B,C,H,W) float images bilinearly and (B,H,W) integer masks with nearest neighbour."""
    b, c = images.shape[:2]
    grid = F.affine_grid(theta.to(images.dtype), [b, c, *out_size], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Nearest sampling of the label values themselves: every output pixel is a copy of an input label.
    warped = F.grid_sample(masks[:, None].to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
    return images, warped[:, 0].round().to(masks.dtype)


FLAIR = 1  # channel order: pre-contrast, FLAIR, post-contrast
# Which channels a missing-sequence draw replaces with FLAIR: pre, post, or both (as in the Kaggle set).
MISSING_PATTERNS = ((0,), (2,), (0, 2))


def substitute_sequences(
    images: torch.Tensor, stats: torch.Tensor, p: float, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """With chance ``p`` per slice, pre- and/or post-contrast become copies of FLAIR, pixels and
    standardisation numbers alike (a copied channel's statistics are FLAIR's, as at inference)."""
    if p <= 0 or images.shape[1] <= FLAIR + 1:
        return images, stats
    b, device = images.shape[0], images.device
    hit = torch.rand(b, generator=gen, device=device) < p
    pattern = torch.randint(len(MISSING_PATTERNS), (b,), generator=gen, device=device)
    images, stats = images.clone(), stats.clone()
    for k, channels in enumerate(MISSING_PATTERNS):
        rows = hit & (pattern == k)
        for ch in channels:
            images[:, ch] = torch.where(rows[:, None, None], images[:, FLAIR], images[:, ch])
            stats[:, ch] = torch.where(rows[:, None], stats[:, FLAIR], stats[:, ch])
    return images, stats


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    settings: AugmentSettings,
    gen: torch.Generator | None = None,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a (B,C,H,W) float batch and its (B,H,W) label masks on their device; ``normalise`` (pixel
    values -> model input) runs between the warp and the intensity changes."""
    b, c, h, w = images.shape
    device = images.device
    out_size = (settings.crop, settings.crop) if settings.crop and settings.crop < min(h, w) else (h, w)
    theta = random_affine(b, (h, w), settings, gen, device)
    images, masks = warp(images, masks, theta, out_size)
    if normalise is not None:
        images = normalise(images)
    if settings.intensity_scale or settings.intensity_shift:
        gain = _uniform(b * c, 1 - settings.intensity_scale, 1 + settings.intensity_scale, gen, device)
        shift = _uniform(b * c, -settings.intensity_shift, settings.intensity_shift, gen, device)
        images = images * gain.view(b, c, 1, 1) + shift.view(b, c, 1, 1)
    if settings.noise > 0:
        images = images + settings.noise * torch.randn(images.shape, generator=gen, device=device)
    return images, masks


def settings_from_config(cfg: object) -> AugmentSettings:
    """Map a TrainConfig's ``crop`` and ``noise`` onto the default ranges."""
    return AugmentSettings(crop=int(getattr(cfg, "crop", 0)), noise=float(getattr(cfg, "noise", 0.05)))
