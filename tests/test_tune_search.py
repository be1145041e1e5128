"""A real Ray Tune search on the session's local Ray: ASHA stops trials, the best bundle predicts, the
study is Optuna's, the report has its images."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from tune_support import TINY_NET

from tune.results import read_leaderboard
from tune.search import SearchOptions, run_search

# A tiny, fast-learning network; lr spans "learns nothing" to "learns in one epoch", so the trials'
# metrics differ widely and ASHA (grace 1, reduction factor 2) certainly stops some. Two trials at a
# time: ASHA judges a trial against those that reached its rung before it, so with all six at once
# whether any is stopped depended on which reported first (a suite run saw all six complete).
TINY = {**TINY_NET, "oversample": 0.5, "warmup_epochs": 0, "lr": {"loguniform": [1.0e-5, 3.0e-2]}}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def asha_run(ray_session, prepared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_runs")
    info = run_search(SearchOptions(
        data=prepared_dir, name="asha", storage=str(root), num_samples=6, max_epochs=4, grace_period=1,
        reduction_factor=2, scheduler="asha", search="tpe", seed=0, fixed=dict(TINY), verbose=0, ensemble=2,
        max_concurrent=2,
    ))
    return root / "asha", info


def leaderboard(run) -> list[dict[str, str]]:
    return read_leaderboard(run / "leaderboard.csv")


def test_asha_stops_trials_early_and_leaderboard_lists_every_trial(asha_run):
    run, info = asha_run
    rows = leaderboard(run)
    assert len(rows) == 6 == info["trials"]
    reasons = [r["stop_reason"] for r in rows]
    assert "early-stopped by ASHA" in reasons, reasons
    assert "completed" in reasons, reasons
    for r in rows:
        assert {"arch", "lr", "dropout", "lambda_focal", "dsc_volume", "dice_tumour", "epochs_run"} <= set(r)
        assert r["arch"] == "lite" and r["epochs"] == "4"
        assert 1 <= int(r["epochs_run"]) <= 4
        if r["stop_reason"] == "early-stopped by ASHA":
            assert int(r["epochs_run"]) < 4
    objectives = [float(r["objective"]) for r in rows]
    assert objectives == sorted(objectives, reverse=True)
    assert [int(r["rank"]) for r in rows] == list(range(1, 7))


def test_best_bundle_is_the_best_trial_and_predicts(asha_run, prepared_dir):
    from core.data.arrays import load_split
    from core.inference.predictor import Predictor

    run, info = asha_run
    top = leaderboard(run)[0]
    assert info["best_trial"]["trial_id"] == top["trial_id"]
    metrics = json.loads((run / "best" / "metrics.json").read_text())
    assert metrics["trial_id"] == top["trial_id"]
    assert metrics["epoch"] == int(top["best_epoch"])  # the best epoch's weights, not the last epoch's
    # Exported from the checkpoint, not re-trained: the raw val metric is the one the trial reported.
    assert metrics["val_raw"]["dsc_volume"] == pytest.approx(float(top["objective"]), abs=1e-6)
    val = load_split(prepared_dir, "val")
    predictor = Predictor.from_bundle(run / "best", device="cpu")
    masks = predictor.predict(np.ascontiguousarray(val.images[:4].transpose(0, 2, 3, 1)))
    assert masks.shape == (4, *val.masks.shape[1:]) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}


def test_run_builds_the_top_two_ensemble_and_compares_it(asha_run, prepared_dir):
    from core.bundle import load_bundle
    from core.data.arrays import load_split
    from core.evaluation.evaluate import evaluate_split
    from core.inference.predictor import Predictor

    run, info = asha_run
    comparison = json.loads((run / "ensemble.json").read_text())
    assert info["ensemble"] == comparison
    ranked = [r["trial_id"] for r in leaderboard(run)]
    members = load_bundle(run / "ensemble").config["members"]
    assert [m["source"].split()[1] for m in members] == ranked[:2]  # the two best trials, best first
    best = json.loads((run / "best" / "metrics.json").read_text())["val"]["dsc_volume"]
    assert comparison["best_single"]["val"]["dsc_volume"] == pytest.approx(best)
    # The compared figure is what the written ensemble bundle scores on val (core's evaluation).
    scored = evaluate_split(Predictor.from_bundle(run / "ensemble", "cpu"), load_split(prepared_dir, "val"))
    assert comparison["ensemble"]["val"]["dsc_volume"] == pytest.approx(scored["dsc_volume"], abs=1e-6)
    assert "selected on this val" in comparison["selection"]
    from tune.ensemble import build_run_ensemble

    with pytest.raises(ValueError, match="at least 2"):
        build_run_ensemble(run, 1)


def test_checkpoints_keep_the_best_two_plus_the_latest(asha_run):
    run, _ = asha_run
    for trial in (run / "ray").glob("trial_*"):
        checkpoints = sorted(trial.glob("checkpoint_*"))
        assert 1 <= len(checkpoints) <= 3, checkpoints
        assert (checkpoints[-1] / "checkpoint" / "state.safetensors").is_file()


def test_study_is_readable_by_optuna(asha_run):
    import optuna

    run, _ = asha_run
    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{run / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6
    assert set(done[0].params) == {"dropout", "lambda_focal", "lr"}
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_report_writes_html_and_png_images(asha_run):
    from tune.report import make_report

    run, _ = asha_run
    index = make_report(str(run))
    assert index == run / "report" / "index.html"
    text = index.read_text()
    names = ["optimisation_history", "param_importances", "parallel_coordinates", "learning_curves",
             "best_predictions", "worst_predictions"]
    for name in names:
        png = run / "report" / f"{name}.png"
        assert png.stat().st_size > 2000, name  # a real plot, not an empty or placeholder image
        assert png.read_bytes()[:8] == PNG
        assert f"{name}.png" in text
    assert "Leaderboard" in text


def test_existing_run_needs_resume(asha_run, prepared_dir):
    run, _ = asha_run
    with pytest.raises(FileExistsError, match="--resume"):
        run_search(SearchOptions(data=prepared_dir, name="asha", storage=str(run.parent), verbose=0))
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        run_search(SearchOptions(data=prepared_dir, name="other", storage=str(run.parent), resume=True, verbose=0))


def test_wandb_logger_logs_config_metrics_and_prediction_panels(prepared_dir, monkeypatch):
    """The trial-side W&B logger, against a stand-in wandb module (W&B itself is never required)."""
    from core.config import TrainConfig
    from core.data.arrays import load_split, load_split_info
    from core.training.trainer import Trainer
    from tune.wandb_logging import TrialWandb, wandb_mode

    calls: dict[str, list] = {"init": [], "log": [], "image": []}

    class Run:
        def log(self, data, step=None):
            calls["log"].append((step, data))

        def finish(self):
            calls["init"].append("finished")

    fake = types.SimpleNamespace(
        init=lambda **kw: calls["init"].append(kw) or Run(),
        Image=lambda image, caption=None, masks=None: calls["image"].append((image.shape, masks)) or "img",
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    cfg = TrainConfig(arch="lite", filters=8, epochs=2, batch_size=8, lr=1e-2, device="cpu", patience=0)
    val = load_split(prepared_dir, "val", mmap=False)
    trainer = Trainer(cfg, load_split(prepared_dir, "train", mmap=False), val, load_split_info(prepared_dir))
    logger = TrialWandb(cfg, val, project="p", group="g", mode="offline")
    trainer.fit(logger.log_epoch)
    logger.finish()
    init = calls["init"][0]
    assert init["project"] == "p" and init["mode"] == "offline" and init["config"]["arch"] == "lite"
    assert [step for step, _ in calls["log"]] == [1, 2]
    assert "dsc_volume" in calls["log"][0][1] and "val_predictions" in calls["log"][0][1]  # epoch 1 is a best
    panels = [d for _, d in calls["log"] if "val_predictions" in d]
    assert len(panels) == (2 if trainer.best_epoch == 2 else 1)
    shape, masks = calls["image"][0]
    assert shape == (*val.images.shape[2:], 3)
    assert set(masks) == {"prediction", "ground_truth"}
    assert masks["ground_truth"]["mask_data"].shape == val.masks.shape[1:]
    assert calls["init"][-1] == "finished"
