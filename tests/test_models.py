"""Every registered network builds and runs on 64x64 and 256x256, binary and multi-class."""

from __future__ import annotations

import pytest
import torch

from core.networks.models import MODELS, build_model, count_parameters, init_output_bias


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("out_ch", [1, 4])
def test_forward_shapes(arch, out_ch):
    model = build_model(arch, 3, out_ch, 12 if arch == "swin_unetr" else 8, 0.1).eval()
    with torch.no_grad():
        for size in (64, 256):
            assert model(torch.rand(2, 3, size, size)).shape == (2, out_ch, size, size)


@pytest.mark.parametrize("filters", [8, 16, 32, 64])
def test_lite_is_small(filters):
    assert count_parameters(build_model("lite", 3, 1, filters, 0.0)) <= 500_000


def test_unknown_arch_names_the_known_ones():
    with pytest.raises(ValueError, match="unet"):
        build_model("resnet", 3, 1, 8, 0.0)


@pytest.mark.parametrize("arch", list(MODELS))
def test_output_bias_starts_at_the_prior(arch):
    model = build_model(arch, 3, 1, 12 if arch == "swin_unetr" else 8, 0.0)
    assert init_output_bias(model, [0.02])
    with torch.no_grad():
        p = model.eval()(torch.rand(2, 3, 64, 64)).sigmoid().mean().item()
    assert p < 0.2  # about the 2% prior, instead of the 50% a zero bias gives
