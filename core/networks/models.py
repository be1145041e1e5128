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


def output_layer(
    model: torch.nn.Module, in_channels: int, out_channels: int, size: int = SIZE_MULTIPLE * 2
) -> torch.nn.Module | None:
    """The last convolution (in execution order) that produces ``out_channels`` maps: the logits layer.

    Found by running one dummy forward pass with hooks, because registration order is not execution
    order for every MONAI network.
    """
    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    fired: list[torch.nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: fired.append(mod))
        for m in model.modules()
        if isinstance(m, convs) and m.out_channels == out_channels and m.bias is not None
    ]
    param = next(model.parameters())
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, size, size, device=param.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return fired[-1] if fired else None


def init_output_bias(model: torch.nn.Module, class_prior: list[float], in_channels: int = 3) -> bool:
    """Start the logits at the class prior (RetinaNet's trick) instead of 0.

    With ~1-2% tumour pixels a zero-bias network predicts p=0.5 everywhere and spends hundreds of Adam
    steps unlearning that; starting at the prior makes the Dice term useful from the first step.
    One prior (binary): bias = logit(p). K+1 priors (softmax): bias_c = log(p_c). Returns False when
    no output convolution was found (the network keeps its default initialisation).
    """
    priors = torch.tensor(class_prior, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
    layer = output_layer(model, in_channels, len(class_prior))
    if layer is None:
        return False
    bias = torch.log(priors / (1 - priors)) if len(class_prior) == 1 else torch.log(priors)
    with torch.no_grad():
        layer.bias.copy_(bias.to(layer.bias.dtype))
    return True
