"""Batched on-device augmentation and the device-cached loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.data.arrays import SplitArrays
from core.inference.resize import normalise
from core.training.augment import AugmentSettings, augment_batch
from core.training.loader import DeviceDataset

IDENTITY = AugmentSettings(flip=0.0, rotate_deg=0.0, scale=(1.0, 1.0), intensity_scale=0.0,
                           intensity_shift=0.0, noise=0.0)


def _batch(n: int = 8, size: int = 64, labels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for i in range(n):
        y, x = torch.randint(8, size - 24, (2,), generator=gen).tolist()
        masks[i, y : y + 16, x : x + 12] = 1 + i % labels
    images = torch.rand(n, 3, size, size, generator=gen) * 0.2
    images[:, 1] += masks.float() * 0.7  # the lesion is bright in the FLAIR channel
    return images, masks


@pytest.mark.parametrize("labels", [1, 3])
def test_masks_keep_their_label_values(labels):
    images, masks = _batch(labels=labels)
    settings = AugmentSettings(crop=32)
    for seed in range(5):
        out_images, out_masks = augment_batch(images, masks, settings, torch.Generator().manual_seed(seed))
        assert out_masks.dtype == torch.uint8
        assert set(out_masks.unique().tolist()) <= set(range(labels + 1))
        assert out_images.shape == (8, 3, 32, 32) and out_masks.shape == (8, 32, 32)


def test_image_and_mask_move_together():
    images, masks = _batch()
    settings = AugmentSettings(intensity_scale=0.0, intensity_shift=0.0, noise=0.0)
    out_images, out_masks = augment_batch(images, masks, settings, torch.Generator().manual_seed(1))
    bright = out_images[:, 1] > 0.55
    inter = (bright & (out_masks > 0)).sum().item()
    union = (bright | (out_masks > 0)).sum().item()
    assert inter / union > 0.8  # only the bilinear edges may differ


def test_identity_settings_change_nothing_and_flip_flips():
    images, masks = _batch()
    out_images, out_masks = augment_batch(images, masks, IDENTITY, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out_images, images, atol=1e-5, rtol=0)
    assert torch.equal(out_masks, masks)
    flip = AugmentSettings(**{**IDENTITY.__dict__, "flip": 1.0})
    out_images, out_masks = augment_batch(images, masks, flip, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out_images, images.flip(-1), atol=1e-5, rtol=0)
    assert torch.equal(out_masks, masks.flip(-1))


def test_same_generator_seed_same_batch():
    images, masks = _batch()
    a = augment_batch(images, masks, AugmentSettings(), torch.Generator().manual_seed(3))
    b = augment_batch(images, masks, AugmentSettings(), torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _arrays(n: int = 20, tumour_every: int = 5) -> SplitArrays:
    rng = np.random.default_rng(0)
    masks = np.zeros((n, 32, 32), np.uint8)
    masks[::tumour_every, 4:8, 4:8] = 1
    return SplitArrays(
        images=rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), masks=masks,
        patients=np.array([f"p{i // 10}" for i in range(n)]), slices=np.arange(n) % 10,
    )


def test_loader_batches_are_full_normalised_and_cover_the_split():
    arrays = _arrays()
    data = DeviceDataset(arrays, "cpu")
    batches = data.epoch_batches(8, torch.Generator().manual_seed(0))
    assert batches.shape == (3, 8)  # ceil(20/8) full batches, padded from the permutation
    assert set(batches.flatten().tolist()) == set(range(20))
    x, y, stats = data.batch(batches[0])
    x = normalise(x, stats)  # the default bundle normalisation: /255
    assert x.dtype == torch.float32 and x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_allclose(x.numpy(), arrays.images[batches[0].numpy()] / 255.0, rtol=1e-6)
    assert torch.equal(y, torch.from_numpy(arrays.masks[batches[0].numpy()]))


def test_loader_oversamples_tumour_slices():
    data = DeviceDataset(_arrays(n=40, tumour_every=10), "cpu")  # 10% tumour slices
    batches = data.epoch_batches(10, torch.Generator().manual_seed(0), oversample=0.5)
    tumour = set(data.tumour_idx.tolist())
    share = np.mean([i in tumour for i in batches.flatten().tolist()])
    assert share >= 0.5


def test_loader_draws_hard_negatives_by_what_the_model_called_tumour():
    data = DeviceDataset(_arrays(n=40, tumour_every=10), "cpu")
    empty = data.empty_idx.tolist()
    hard = empty[3]
    seen = torch.arange(len(data))  # the model called nothing tumour ...
    data.note_predictions(seen, torch.full((len(data), 1, *data.image_size), -5.0))
    called = torch.full((1, 1, *data.image_size), -5.0)
    called[0, 0, :16] = 5.0  # ... except half of one tumour-free slice
    data.note_predictions(torch.tensor([hard]), called)
    batches = data.epoch_batches(10, torch.Generator().manual_seed(0), oversample=0.2, hard_negatives=0.5)
    tumour, places = set(data.tumour_idx.tolist()), batches[:, 2:7].flatten().tolist()
    assert all(i in tumour for i in batches[:, :2].flatten().tolist())
    assert set(places) <= set(empty)
    assert np.mean([i == hard for i in places]) > 0.9  # half a slice against one pixel for each of the rest
    plain = data.epoch_batches(10, torch.Generator().manual_seed(0), oversample=0.2)
    assert np.mean([i == hard for i in plain[:, 2:7].flatten().tolist()]) < 0.2


def test_loader_rejects_non_uint8():
    arrays = _arrays()
    arrays.images = arrays.images.astype(np.float32)
    with pytest.raises(ValueError, match="uint8"):
        DeviceDataset(arrays, "cpu")
