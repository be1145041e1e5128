"""The training engine on synthetic data: quality, determinism, resume, early stopping, CLI, Ray Train."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from core.__main__ import COMMANDS
from core.cli import dispatch
from core.config import TrainConfig
from core.data.arrays import load_split, load_split_info
from core.evaluation.evaluate import evaluate_split
from core.inference.jobs import safe_name
from core.inference.postprocess import NO_POSTPROCESS
from core.inference.predictor import Predictor
from core.training.trainer import EpochResult, Trainer

# Small and fast on 2 CPU cores (~0.25 s per epoch at 64x64); the quality bar is not lowered for it.
FAST = {"arch": "lite", "filters": 8, "epochs": 2, "batch_size": 16, "device": "cpu", "lr": 3e-3}
QUALITY = {"arch": "unet", "filters": 8, "epochs": 15, "batch_size": 16, "device": "cpu", "lr": 3e-3}


def main(argv: list[str]) -> int:
    return dispatch("python -m core", "", COMMANDS, argv)


def _trainer(prepared, **options) -> Trainer:
    cfg = TrainConfig.from_dict({**FAST, **options})
    return Trainer.from_prepared(cfg, prepared)


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def quality_run(prepared_dir, tmp_path_factory):
    trainer = _trainer(prepared_dir, **QUALITY)
    seen: list[EpochResult] = []
    best = trainer.fit(lambda result, _: seen.append(result))
    bundle = trainer.export_bundle(tmp_path_factory.mktemp("quality") / "best")
    return trainer, best, seen, bundle


def test_small_model_reaches_dsc_volume_0_8_on_cpu(quality_run):
    trainer, best, seen, _ = quality_run
    assert best["dsc_volume"] >= 0.8, trainer.history
    assert trainer.best_epoch == best["epoch"] and trainer.best_metric == best["dsc_volume"]
    assert [r.epoch for r in seen] == list(range(1, len(seen) + 1))
    keys = {"train_loss", "lr", "epoch_seconds", "dsc_volume", "dice_tumour", "dice_all", "iou", "fp_slice_rate"}
    assert keys <= set(seen[0].metrics)


def test_exported_bundle_matches_evaluation(quality_run, prepared_dir):
    trainer, best, _, bundle = quality_run
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["epoch"] == trainer.best_epoch
    assert metrics["val_raw"]["dsc_volume"] == pytest.approx(best["dsc_volume"])
    assert metrics["val"]["dsc_volume"] >= metrics["val_raw"]["dsc_volume"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["postprocess"] == metrics["postprocess"]
    if metrics["val"]["dsc_volume"] == metrics["val_raw"]["dsc_volume"]:
        assert config["postprocess"] == NO_POSTPROCESS  # kept only if it helps
    # The Predictor path (per-patient volumes, bundle post-processing) reproduces the recorded metrics.
    predictor = Predictor.from_bundle(bundle, "cpu")
    assert evaluate_split(predictor, load_split(prepared_dir, "val")) == pytest.approx(metrics["val"], nan_ok=True)


def test_same_seed_same_weights(prepared_dir):
    a, b = _trainer(prepared_dir, epochs=1), _trainer(prepared_dir, epochs=1)
    a.fit()
    b.fit()
    assert _same(_weights(a), _weights(b))
    c = _trainer(prepared_dir, epochs=1, seed=1)
    c.fit()
    assert not _same(_weights(a), _weights(c))


@pytest.mark.parametrize("options", [{}, {"hard_negatives": 0.25}], ids=["plain", "hard_negatives"])
def test_checkpoint_resumes_at_the_next_epoch_with_identical_state(prepared_dir, tmp_path, options):
    snapshots = {}

    def keep(result: EpochResult, tr: Trainer) -> None:
        if result.epoch == 2:
            tr.save_checkpoint(tmp_path / "ckpt")
            snapshots["epoch2"] = _weights(tr)

    full = _trainer(prepared_dir, epochs=3, **options)
    full.fit(keep)
    resumed = _trainer(prepared_dir, epochs=3, **options)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.epoch == 2 and len(resumed.history) == 2
    assert _same(_weights(resumed), snapshots["epoch2"])
    assert resumed.best_state is not None and resumed.best_epoch == full.history[:2][
        int(np.argmax([h["dsc_volume"] for h in full.history[:2]]))]["epoch"]
    epochs_run = []
    resumed.fit(lambda r, _: epochs_run.append(r.epoch))
    assert epochs_run == [3]
    assert _same(_weights(resumed), _weights(full))  # the RNG streams were restored too
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    with pytest.raises(ValueError, match="arch"):
        _trainer(prepared_dir, arch="unet").load_checkpoint(tmp_path / "ckpt")


def test_hard_negatives_and_oversample_share_one_batch():
    with pytest.raises(ValueError, match="oversample \\+ hard_negatives"):
        TrainConfig.from_dict({**FAST, "oversample": 0.7, "hard_negatives": 0.5})


def test_early_stopping_and_callback_stop(prepared_dir):
    # A vanishing learning rate cannot improve the metric: patience 2 stops after epoch 1 + 2.
    stalled = _trainer(prepared_dir, epochs=10, lr=1e-12, patience=2, augment=False)
    stalled.fit()
    assert stalled.epoch == 3 and stalled.best_epoch == 1
    stopper = _trainer(prepared_dir, epochs=10)

    def stop(result: EpochResult, tr: Trainer) -> None:
        tr.should_stop = True

    stopper.fit(stop)
    assert stopper.epoch == 1


def test_multiclass_training_and_evaluation(multiclass_prepared_dir, tmp_path):
    info = load_split_info(multiclass_prepared_dir)
    trainer = _trainer(multiclass_prepared_dir, epochs=1, loss="dicece", oversample=0.5, crop=32)
    result = trainer.fit()
    names = info["class_names"][1:]
    assert all(f"dice_{n}" in result for n in names)
    bundle = trainer.export_bundle(tmp_path / "bundle")
    out = tmp_path / "eval"
    args = ["evaluate", "--bundle", str(bundle), "--data", str(multiclass_prepared_dir), "--split", "test",
            "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    assert (out / "confusion_matrix.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["confusion_matrix"]["pixels"]) == len(info["class_names"])


def test_cli_train_resume_evaluate_predict(prepared_dir, synth_src, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--data", str(prepared_dir), "--out", str(run), "--arch", "lite", "--filters", "8",
            "--device", "cpu", "--lr", "3e-3"]
    assert main([*base, "--epochs", "1"]) == 0
    assert main([*base, "--epochs", "1"]) == 2  # refuses to overwrite a run
    assert "already holds a run" in capsys.readouterr().err
    assert main([*base, "--epochs", "2", "--resume"]) == 0
    with (run / "metrics.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2]
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    for name in ("model.safetensors", "config.json", "metrics.json"):
        assert (run / "best" / name).is_file()

    report = tmp_path / "report"
    assert main(["evaluate", "--bundle", str(run / "best"), "--src", str(synth_src), "--out", str(report),
                 "--device", "cpu"]) == 0
    for name in ("per_slice.csv", "per_patient.csv", "summary.json", "dice_histogram.png", "worst_slices.png",
                 "best_slices.png", "per_patient.png"):
        assert (report / name).is_file(), name
    assert json.loads((report / "summary.json").read_text())["patients"] == 12

    patient = sorted(p for p in synth_src.iterdir() if p.is_dir())[0]
    one = sorted(patient.glob("*_1.tif"))[0]
    out = tmp_path / "pred"
    assert main(["predict", "--bundle", str(run / "best"), str(one), str(patient), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert (out / f"{one.stem}_mask.png").is_file() and (out / f"{one.stem}_overlay.png").is_file()
    assert len(list((out / patient.name).glob("*_mask.png"))) == len(list(patient.glob("*_mask.tif")))
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
    assert main(["predict", "--bundle", str(run / "best"), str(tmp_path / "missing.tif"), "--out", str(out)]) == 2


def test_safe_names_cannot_escape():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("..") == "input"
    assert safe_name("C:\\x\\slice 1.tif") == "slice_1.tif"


def test_two_worker_ray_train_run_predicts(ray_session, prepared_dir, tmp_path):
    from core.training.distributed import train_distributed

    cfg = TrainConfig.from_dict({**FAST, "epochs": 1, "workers": 2})
    best = train_distributed(cfg, prepared_dir, tmp_path / "run")
    assert best["epoch"] == 1
    predictor = Predictor.from_bundle(tmp_path / "run" / "best", "cpu")
    val = load_split(prepared_dir, "val")
    # Rank 0 scored the whole val split: the bundle's raw predictions (no TTA, no post-processing, the
    # training threshold) score what the run reported, and with its settings what its metrics.json says.
    metrics = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())
    assert evaluate_split(predictor, val) == pytest.approx(metrics["val"], nan_ok=True)
    predictor.tta, predictor.postprocess, predictor.threshold = "none", dict(NO_POSTPROCESS), cfg.threshold
    assert evaluate_split(predictor, val)["dsc_volume"] == pytest.approx(best["dsc_volume"], abs=1e-6)
    masks = predictor.predict(np.asarray(val.images[:4]).transpose(0, 2, 3, 1))
    assert masks.shape == (4, 64, 64) and set(np.unique(masks)) <= {0, 1}
    assert (tmp_path / "run" / "metrics.csv").is_file() and (tmp_path / "run" / "checkpoint" / "state.json").is_file()
