"""`python -m tune study` end to end on the synthetic set (prepare, CV trials on local Ray, out-of-fold
choices, one test reading, bundle, card, README table), and the robust choice it rests on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.evaluation.choices import Candidate, robust_choice, volume_masks
from core.evaluation.selection import ValSplit
from tune.study import StudyOptions

EPOCHS = 2
SMOKE_CONFIG = {"arch": "lite", "filters": 4, "image_size": 64, "epochs": EPOCHS, "batch_size": 16, "lr": 3e-3,
                "normalisation": "patient", "brain_crop": "none", "oversample": 0.5, "eval_batch_size": 32}


def test_robust_choice_takes_the_simplest_unless_the_best_is_clearly_better() -> None:
    rng = np.random.default_rng(0)
    base = {f"p{i}": float(v) for i, v in enumerate(rng.uniform(0.5, 0.9, 30))}
    # a hair better on average (+0.002), patients either way: an interval around 0
    noise = {p: v + (0.03 if i % 2 else -0.026) for i, (p, v) in enumerate(base.items())}
    plain, tuned = Candidate({"rule": 0}, (0,), base), Candidate({"rule": 1}, (1,), noise)
    chosen, record = robust_choice([tuned, plain])
    assert record["best"] == {"rule": 1} and chosen is plain  # not significantly better: the simpler wins
    assert record["not_worse_than_best"] == 2 and record["chosen_minus_best"]["verdict"] == "undecided"
    clear = Candidate({"rule": 2}, (2,), {p: v + 0.1 for p, v in base.items()})
    chosen, record = robust_choice([plain, tuned, clear])
    assert chosen is clear and record["not_worse_than_best"] == 1  # better for every patient: it wins


def test_volume_rules_never_score_an_emptied_patient_as_empty() -> None:
    truth = np.zeros((4, 16, 16), np.uint8)
    truth[:2, 4:8, 4:8] = 1
    probs = np.zeros((4, 16, 16), np.float32)
    probs[:2, 4:8, 4:8] = 0.6  # found, but fainter than the rule's 0.9
    val = ValSplit(truth, np.array(["a", "a", "b", "b"]), np.array([0, 1, 0, 1]))
    masks, kept = volume_masks(probs, val, 0.5, {"min_probability": 0.9})
    assert kept == ["a"] and np.array_equal(masks, truth)  # the network's mask, not an empty one


@pytest.fixture(scope="module")
def study(ray_session, synth_src, tmp_path_factory) -> tuple[dict, StudyOptions]:
    from tune.card import README_BEGIN, README_END
    from tune.study import run_study

    root = tmp_path_factory.mktemp("study")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(SMOKE_CONFIG))
    readme = root / "README.md"
    readme.write_text(f"# title\n\n{README_BEGIN}\nold\n{README_END}\n\nafter\n")
    args = StudyOptions(src=synth_src, out=root / "out", config=config, test=3.0, folds=3, name="gliomaseg-smoke",
                        data_licence="synthetic", record=root / "record.json", export=root / "bundle", readme=readme)
    return run_study(args), args


def test_study_keeps_the_test_split_out_of_every_choice(study) -> None:
    record, args = study
    test = set(record["split"]["test"])
    folds = record["folds"]["patients"]
    assert len(test) == 3 and record["split"]["pool"] == 9
    assert sorted(p for f in folds for p in f) == sorted(set(p for f in folds for p in f))  # each once
    assert not test & {p for f in folds for p in f}
    assert set(record["cv"]["per_patient_dsc_volume"]) == {p for f in folds for p in f}
    assert set(record["test"]["per_patient_dsc_volume"]["volume"]) == test
    # fold weights are the last epoch's: no fold's epoch was chosen on the patients it predicts
    assert [row["best_epoch"] for row in record["folds"]["per_fold"]] == [EPOCHS] * 3
    assert record["config"]["keep"] == "last"
    assert record["test"]["reading"] == 1
    for path in ("volume", "one_slice", "flair_only"):
        s = record["test"]["per_patient"][path]
        assert s["ci95"][0] <= s["mean"] <= s["ci95"][1] and s["patients"] == 3
    assert record["compute"]["training_process_cpu_seconds"] > 0 and record["compute"]["epochs"] == 3 * EPOCHS


def test_study_publishes_only_what_the_record_says(study) -> None:
    from core.bundle import load_bundle
    from tune.card import metrics_json, model_card, readme_block, readme_table

    record, args = study
    assert json.loads(Path(args.record).read_text()) == json.loads((args.out / "study.json").read_text())
    bundle = load_bundle(args.export)  # every listed file's digest checks
    assert bundle.config["version"] == record["bundle"]["version"] != "unknown"
    assert bundle.config["data"]["split_hash"] == record["split"]["hash"]
    assert bundle.config["threshold"] == record["choices"]["threshold"]
    assert bundle.config["quality"]["review_below"] == record["quality"]["review_below"]
    assert bundle.metrics == json.loads(json.dumps(metrics_json(record, str(args.record))))
    assert (args.export / "MODEL_CARD.md").read_text() == model_card(record, str(args.record))
    text = args.readme.read_text()
    assert readme_block(text) == readme_table(record) and text.startswith("# title") and text.endswith("after\n")
    figure = f"{record['test']['per_patient']['volume']['mean']:.3f}"
    assert figure in readme_table(record) and figure in model_card(record, "r")


@pytest.mark.parametrize(("keep", "epoch"), [("best", 1), ("last", 2)])
def test_keep_last_exports_the_last_epoch_whatever_val_says(prepared_dir, monkeypatch, keep: str, epoch: int) -> None:
    import torch

    from core.config import TrainConfig
    from core.training.trainer import Trainer

    cfg = TrainConfig.from_dict({**SMOKE_CONFIG, "epochs": 2, "keep": keep, "patience": 0, "device": "cpu"})
    trainer = Trainer.from_prepared(cfg, prepared_dir)
    falling = iter([0.9, 0.1])  # val says the first epoch was the better one
    monkeypatch.setattr(trainer, "validate", lambda: {"dsc_volume": next(falling)})
    trainer.fit()
    assert trainer.best_epoch == epoch
    final = trainer.model.state_dict()
    same = all(torch.equal(v, final[k]) for k, v in trainer.best_model().state_dict().items())
    assert same == (keep == "last")


def test_a_study_run_again_publishes_again_without_a_second_test_reading(study) -> None:
    from tune.study import run_study

    record, args = study
    again = run_study(dataclasses.replace(args, record=None, readme=None, export=None))
    assert again["test"] == record["test"] and again["bundle"] == record["bundle"]  # read once, kept


def test_versus_leaves_the_test_split_unread_unless_the_study_wins_by_cv(study) -> None:
    from tune.study import run_study

    record, args = study
    earlier = args.out.parent / "earlier.json"
    earlier.write_text(json.dumps({**record, "cv": {"per_patient_dsc_volume": {
        p: d - 0.2 for p, d in record["cv"]["per_patient_dsc_volume"].items()}}}))
    won = run_study(dataclasses.replace(args, record=None, readme=None, export=None, versus=earlier))
    assert won["versus"]["verdict"] == "a" and won["versus"]["mean"] == pytest.approx(0.2)
    tied = args.out.parent / "tied.json"
    tied.write_text(json.dumps(record))  # the same study: no better by CV
    (args.out / "study.json").unlink()  # nothing read before: a reading would happen if allowed
    with pytest.raises(SystemExit, match="does not beat"):
        run_study(dataclasses.replace(args, record=None, readme=None, export=None, versus=tied))
    assert "test" not in json.loads((args.out / "study.json").read_text())


def test_folds_from_takes_fold_models_trained_elsewhere_and_checks_their_patients(study, tmp_path) -> None:
    import shutil

    from tune.study import run_study

    record, args = study
    elsewhere = tmp_path / "campaign"  # bench/gpu_campaign.py --unpack's layout
    shutil.copytree(args.out / "cv" / "folds", elsewhere)
    shutil.copy(args.out / "cv" / "folds.json", elsewhere / "folds.json")
    elsewhere_args = dataclasses.replace(
        args, src=None, data=args.out / "prepared", test_split=args.out / "test-split.json", config=None,
        folds_from=elsewhere, out=tmp_path / "out", record=None, readme=None, export=None)
    finished = run_study(elsewhere_args)
    assert finished["cv"]["per_patient_dsc_volume"] == record["cv"]["per_patient_dsc_volume"]  # the same models
    assert finished["test"]["per_patient_dsc_volume"] == record["test"]["per_patient_dsc_volume"]
    metrics = json.loads((elsewhere / "fold0" / "metrics.json").read_text())
    wrong = {**metrics, "train_patients": metrics["val_patients"]}
    (elsewhere / "fold0" / "metrics.json").write_text(json.dumps(wrong))
    with pytest.raises(SystemExit, match="not trained on exactly the pool minus fold 0"):
        run_study(dataclasses.replace(elsewhere_args, out=tmp_path / "out2"))


def test_a_cv_init_must_name_each_folds_own_model(tmp_path) -> None:
    """Progressive resizing in a CV: fold k starts from a fold-k model of the same folds, never one that saw it."""
    from tune.cv import check_fold_inits, fold_init

    folds = [["a", "b"], ["c", "d"]]
    cv = tmp_path / "cv"
    for k in range(2):
        (cv / "folds" / f"fold{k}").mkdir(parents=True)
        (cv / "folds" / f"fold{k}" / "metrics.json").write_text(json.dumps({"fold": k}))
    (cv / "folds.json").write_text(json.dumps({"folds": folds}))
    init = str(cv / "folds" / "fold{fold}")
    assert fold_init(init, 1) == str(cv / "folds" / "fold1")
    check_fold_inits(init, folds)  # the same folds: each start never saw its fold
    with pytest.raises(ValueError, match="name each fold's own bundle"):
        check_fold_inits(str(cv / "folds" / "fold0"), folds)
    with pytest.raises(ValueError, match="trained on patients of fold 0"):
        check_fold_inits(init, [["a", "c"], ["b", "d"]])  # other folds: fold0's model trained on c and d
    (cv / "folds" / "fold1" / "metrics.json").write_text(json.dumps({"fold": 1, "train_patients": ["a", "c"]}))
    with pytest.raises(ValueError, match="trained on patients of fold 1"):
        check_fold_inits(init, folds)


def test_a_progressive_study_starts_and_exports_each_fold_from_its_own_model(study, tmp_path) -> None:
    """tune study with ``init: .../fold{fold}`` (cheap small-image epochs first, then a larger size): every fold
    trains from, and its exported bundle names, that fold's own earlier model, and the study finishes."""
    from core.io import read_json
    from tune.study import run_study

    record, args = study
    larger = tmp_path / "larger.yaml"
    larger.write_text(yaml.safe_dump({**SMOKE_CONFIG, "epochs": 1, "image_size": 96, "lr": 1e-3, "keep": "last",
                                      "init": str(args.out / "cv" / "folds" / "fold{fold}")}))
    progressive = run_study(dataclasses.replace(
        args, src=None, data=args.out / "prepared", test_split=args.out / "test-split.json", config=larger,
        folds_file=args.out / "cv" / "folds.json", out=tmp_path / "out", record=None, readme=None, export=None))
    assert progressive["folds"]["patients"] == record["folds"]["patients"]
    for k in range(3):
        start = read_json(args.out / "cv" / "folds" / f"fold{k}" / "config.json")["version"]
        init = read_json(tmp_path / "out" / "cv" / "folds" / f"fold{k}" / "config.json")["init"]
        assert init["source"] == str(args.out / "cv" / "folds" / f"fold{k}") and init["version"] == start
    assert progressive["test"]["reading"] == 1


@pytest.mark.parametrize("stop", ["early-stopped by none", "error: RayTaskError", "not started"])
def test_an_interrupted_cv_is_continued_never_summarised(monkeypatch, tmp_path, stop: str) -> None:
    """A CV whose driver was stopped (Ctrl+C) holds folds mid-schedule with checkpoints: summarising them would
    export half-trained fold models as the study's."""
    from core.config import TrainConfig
    from tune import cv

    trials = [{"config": {"fold": 0}, "checkpoint": object(), "stop_reason": "completed", "epochs_run": 20},
              {"config": {"fold": 1}, "checkpoint": object(), "stop_reason": stop, "epochs_run": 11}]
    monkeypatch.setattr(cv.results, "collect", lambda *args: trials)
    with pytest.raises(RuntimeError, match=f"fold 1 stopped at epoch 11 \\({stop}\\); rerun"):
        cv.summarise(None, tmp_path, None, [], {}, TrainConfig(), half=False)
    assert not (tmp_path / "folds").exists()


def test_ensemble_of_studies_averages_their_out_of_fold_passes_and_ships_every_member(study, tmp_path) -> None:
    """Two finished studies on the same folds, fold k's models of each ensembled: the out-of-fold passes are
    the mean of each study's cached ones (here the same models copied, so exactly the first study's), the
    candidate holds every member, and a study on other folds is refused by name."""
    import shutil

    from core.bundle import load_bundle
    from tune.card import model_card
    from tune.study import run_study

    record, args = study
    twin = tmp_path / "twin"  # a finished study of its own: its record, fold models and out-of-fold cache
    shutil.copytree(args.out / "cv" / "folds", twin / "cv" / "folds")
    shutil.copytree(args.out / "oof", twin / "oof")
    shutil.copy(args.out / "study.json", twin / "study.json")
    pair_args = dataclasses.replace(
        args, src=None, data=args.out / "prepared", test_split=args.out / "test-split.json", config=None,
        ensemble_of=[args.out, twin], out=tmp_path / "pair", record=None, readme=None, export=None)
    pair = run_study(pair_args)
    assert [c["study"] for c in pair["config"]["ensemble_of"]] == [str(args.out), str(twin)]
    assert pair["cv"]["per_patient_dsc_volume"] == record["cv"]["per_patient_dsc_volume"]
    assert pair["choices"] == record["choices"]
    members = load_bundle(tmp_path / "pair" / "bundle").config["members"]
    assert [m["source"] for m in members] == [f"{s} fold {k}" for s in ("out", "twin") for k in range(3)]
    for patient, dice in record["test"]["per_patient_dsc_volume"]["volume"].items():
        assert pair["test"]["per_patient_dsc_volume"]["volume"][patient] == pytest.approx(dice, abs=1e-3)
    assert pair["compute"]["epochs"] == 2 * record["compute"]["epochs"]
    assert "Hyperparameters of each fold model of each study" in model_card(pair, "r")
    assert 0 < pair["bundle"]["mb"] < 1
    with pytest.raises(SystemExit, match="over --max-bundle-mb 0.01"):  # a candidate too large to ship
        run_study(dataclasses.replace(pair_args, out=tmp_path / "large", max_bundle_mb=0.01))
    assert "cv" in (large := json.loads((tmp_path / "large" / "study.json").read_text())) and "test" not in large

    other = json.loads((twin / "study.json").read_text())
    folds = other["folds"]["patients"]
    other["folds"]["patients"] = [folds[1] + folds[0][:1], folds[0][1:], *folds[2:]]
    (twin / "study.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="folds differ"):
        run_study(dataclasses.replace(pair_args, out=tmp_path / "pair2"))
