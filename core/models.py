"""Model registry: 2D MONAI networks by name, binary (1 logit) or multi-class (K+1 logits)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks import nets

ModelFactory = Callable[[int, int, int, float], torch.nn.Module]


def _levels(filters: int, depth: int = 5) -> tuple[int, ...]:
    return tuple(filters * 2**i for i in range(depth))


def _unet(in_ch: int, out_ch: int, filters: int, dropout: float) -> torch.nn.Module:
    return nets.UNet(
        spatial_dims=2, in_channels=in_ch, out_channels=out_ch, channels=_levels(filters),
        strides=(2, 2, 2, 2), num_res_units=2, dropout=dropout,
    )


def _attention_unet(in_ch: int, out_ch: int, filters: int, dropout: float) -> torch.nn.Module:
    return nets.AttentionUnet(
        spatial_dims=2, in_channels=in_ch, out_channels=out_ch, channels=_levels(filters),
        strides=(2, 2, 2, 2), dropout=dropout,
    )


def _segresnet(in_ch: int, out_ch: int, filters: int, dropout: float) -> torch.nn.Module:
    return nets.SegResNet(
        spatial_dims=2, in_channels=in_ch, out_channels=out_ch, init_filters=filters,
        dropout_prob=dropout or None, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
    )


def _swin_unetr(in_ch: int, out_ch: int, filters: int, dropout: float) -> torch.nn.Module:
    # feature_size must be a multiple of 12 for SwinUNETR's heads; round the filter count up to one.
    feature_size = max(12, -(-filters // 12) * 12)
    return nets.SwinUNETR(
        spatial_dims=2, in_channels=in_ch, out_channels=out_ch, feature_size=feature_size,
        drop_rate=dropout, use_checkpoint=False,
    )


def _lite(in_ch: int, out_ch: int, filters: int, dropout: float) -> torch.nn.Module:
    """A small residual U-Net for CPU and edge inference (<= 0.5 M parameters at filters <= 16)."""
    f = min(filters, 16)
    return nets.UNet(
        spatial_dims=2, in_channels=in_ch, out_channels=out_ch, channels=(f, 2 * f, 4 * f, 8 * f),
        strides=(2, 2, 2), num_res_units=1, dropout=dropout,
    )


MODELS: dict[str, ModelFactory] = {
    "unet": _unet,
    "attention_unet": _attention_unet,
    "segresnet": _segresnet,
    "swin_unetr": _swin_unetr,
    "lite": _lite,
}

# Input sizes must be divisible by this for every level of every registered network.
SIZE_MULTIPLE = 32


def build_model(arch: str, in_channels: int, out_channels: int, filters: int, dropout: float) -> torch.nn.Module:
    """Instantiate a registered network; raises ValueError naming the known ones."""
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(MODELS)}")
    return MODELS[arch](in_channels, out_channels, filters, dropout)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
