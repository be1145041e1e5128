"""Small untrained bundles and brain-like test slices for export tests (no training needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from core.bundle import build_from_config, make_bundle_config, save_bundle
from core.data.preprocessing import Preprocessing


def sample_images(n: int, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """(n,h,w,3) uint8: smooth textures with a bright blob drifting across slices (a lesion-like signal)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((n, h, w, 3)), sigma=(0.8, 3, 3, 0))
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-9)
    yy, xx = np.mgrid[:h, :w]
    blobs = np.stack([
        np.exp(-(((yy - h * (0.3 + 0.4 * k / max(n - 1, 1))) ** 2 + (xx - w * 0.55) ** 2) / (2 * (0.12 * h) ** 2)))
        for k in range(n)
    ])
    img = 150 * noise + 105 * blobs[..., None] * np.array([0.4, 1.0, 0.7])
    return img.clip(0, 255).astype(np.uint8)


def make_random_bundle(
    path: str | Path,
    arch: str = "lite",
    filters: int = 8,
    size: tuple[int, int] = (64, 64),
    class_names: tuple[str, ...] = ("background", "tumour"),
    postprocess: dict | None = None,
    seed: int = 0,
    foreground: float = 0.25,
    metrics: dict | None = None,
    context: int = 0,
) -> Path:
    """Random-init bundle whose output layer is shifted so ~``foreground`` of pixels are positive;
    ``context`` > 0 makes it 2.5D (that many neighbours' FLAIR each side)."""
    torch.manual_seed(seed)
    preprocessing = Preprocessing(context=context)
    config = make_bundle_config(
        {"arch": arch, "filters": filters, "dropout": 0.0, "threshold": 0.5},
        in_channels=len(preprocessing.channel_names), class_names=list(class_names), image_size=size,
        postprocess=postprocess if postprocess is not None else {"min_area": 3, "largest_component": True},
        preprocessing=preprocessing.to_config(),
    )
    model = build_from_config(config).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)][-1]
    images = preprocessing.with_context(sample_images(8, *size, seed=seed).transpose(0, 3, 1, 2))
    x = torch.from_numpy(images).float() / 255
    with torch.no_grad():
        last.weight.mul_(8.0)  # spread the logits so masks follow the image, not float noise
        logits = model(x)
        if last.bias is not None:
            if logits.shape[1] == 1:
                last.bias.sub_(torch.quantile(logits.flatten(), 1 - foreground))
            else:
                last.bias.sub_(logits.mean(dim=(0, 2, 3)))
    metrics = metrics if metrics is not None else {"dsc_volume": 0.5}
    return save_bundle(path, model, config, {**metrics, "note": "random weights for tests"})
