"""Bundle round trip: identical outputs after save/load, no pickle, any input size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.bundle import load_bundle, make_bundle_config, save_bundle
from core.config import TrainConfig
from core.data.arrays import load_split, load_split_info, split_hash
from core.inference.predictor import Predictor
from core.networks.models import build_model
from core.training.trainer import Trainer


@pytest.fixture(scope="module")
def exported(prepared_dir, tmp_path_factory):
    cfg = TrainConfig.from_dict({"arch": "lite", "filters": 8, "epochs": 2, "device": "cpu", "lr": 3e-3})
    trainer = Trainer.from_prepared(cfg, prepared_dir)
    trainer.fit()
    return trainer, trainer.export_bundle(tmp_path_factory.mktemp("bundle") / "b", name="t")


def test_round_trip_gives_identical_outputs(exported, prepared_dir):
    trainer, path = exported
    bundle = load_bundle(path, "cpu")
    x = torch.from_numpy(np.array(load_split(prepared_dir, "val").images[:6])).float() / 255
    with torch.no_grad():
        expected = trainer.best_model().cpu()(x)
        assert torch.equal(bundle.model(x), expected)
    assert bundle.config["name"] == "t" and bundle.config["data"]["split_hash"] == split_hash(
        load_split_info(prepared_dir))
    assert bundle.metrics["epoch"] == trainer.best_epoch


def test_predictor_matches_trainer_masks_and_resizes(exported, prepared_dir):
    trainer, path = exported
    predictor = Predictor.from_bundle(path, "cpu")
    val = load_split(prepared_dir, "val")
    images = np.asarray(val.images).transpose(0, 2, 3, 1)
    raw = trainer.predict_val(trainer.best_model())
    predictor.postprocess = {}  # compare the raw network masks
    assert np.array_equal(predictor.predict(images), raw)
    big = np.repeat(np.repeat(images[:2], 2, axis=1), 2, axis=2)  # 128x128 input -> 128x128 masks
    assert predictor.predict(big).shape == (2, 128, 128)


def test_half_precision_bundle_and_format_checks(tmp_path):
    model = build_model("lite", 3, 1, 8, 0.0).eval()
    config = make_bundle_config(TrainConfig(arch="lite", filters=8).to_dict(), in_channels=3,
                                class_names=["background", "tumour"], image_size=(64, 64), postprocess={})
    save_bundle(tmp_path / "b", model, config, {"val": {}}, half=True)
    loaded = load_bundle(tmp_path / "b")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), atol=2e-2, rtol=0)
    (tmp_path / "b" / "config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format"):
        load_bundle(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_bundle(tmp_path / "missing")
