"""`python -m tune study`: the protocol that makes a model trustworthy, from data to a shipped bundle.

    python -m tune study --src data/kaggle_3m --out runs/study --config tune/studies/lgg-lite16.yaml \\
        --test-split bench/results/real-lgg-test-split.json --export pretrained/lgg --readme README.md

1. A test split fixed before any choice: ``--test-split FILE`` (a ``split.json``, e.g. of an earlier
   study), or one made by ``--test`` and recorded in OUT/test-split.json. ``--data`` takes a prepared
   directory instead of ``--src``.
2. K-fold CV on the rest, one Ray Tune trial per fold (``tune cv``; a killed study resumes where it
   stopped). Each fold model is trained for the configuration's epochs and kept at its last epoch, so no
   fold's weights are chosen on the patients it predicts. ``--folds-from DIR`` takes fold models trained
   elsewhere instead (bench/gpu_campaign.py, unpacked), checked to be trained on the pool minus their fold.
   ``--ensemble-of STUDY STUDY ...`` takes finished studies on the same folds and test split instead: fold
   k's model of each, probabilities averaged (as nnU-Net's find_best_configuration tries ensembles of
   configurations), their out-of-fold passes averaged from their own caches.
3. Out-of-fold predictions of every pool patient (core.evaluation.oof), and on them the threshold, TTA,
   volume and one-slice rules, quality method and review cut (core.evaluation.choices: among the
   candidates not significantly worse than the best, paired per patient, the simplest).
4. ``--versus RECORD``: an earlier study on the same folds, compared by the paired per-patient
   differences of CV dsc_volume; unless this study wins (the interval above 0) it stops before the test
   split, which stays unread, and exports nothing.
5. The fold ensemble with those settings is the candidate. The test split is read once, at the end: per
   volume, one slice at a time, and with pre/post-contrast replaced by FLAIR, with 95% bootstrap intervals
   over patients.
6. OUT/study.json (``--record`` copies it) holds every figure, the folds, the choices and the compute;
   ``--export`` writes the bundle with its metrics.json and MODEL_CARD.md, ``--readme`` the README's
   results table, all generated from the record (tune.card).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import yaml

from core.config import add_command, from_args, meta
from core.data.arrays import SplitArrays, load_split, load_split_info
from core.io import read_json, write_json
from tune.search import sets_field

PROTOCOL = ("test split fixed before any choice and read once; K-fold CV on the rest with fold models kept "
            "at their last epoch; every setting chosen on out-of-fold predictions (the simplest not "
            "significantly worse than the best, paired per patient); intervals by bootstrap over patients")


@dataclass(kw_only=True)
class StudyOptions:
    """The `tune study` options (also the library entry point: ``run_study(StudyOptions(...))``)."""

    src: Path | None = field(default=None, metadata=meta("a Kaggle-layout folder (kaggle_3m/)", one_of="source"))
    data: Path | None = field(default=None, metadata=meta("a prepared directory with a test split", one_of="source"))
    out: Path = field(metadata=meta("the study's folder (prepared/, cv/, oof/, bundle/)"))
    config: Path | None = field(default=None, metadata=meta(
        "YAML of core train options (constants): train the folds here", one_of="models"))
    folds_from: Path | None = field(default=None, metadata=meta(
        "fold models trained elsewhere (bench/gpu_campaign.py --unpack): choices and test reading only",
        one_of="models"))
    ensemble_of: list[Path] | None = field(default=None, metadata=meta(
        "finished studies' OUT folders on the same folds and test split: fold k's models of each ensembled, "
        "probabilities averaged; choices and test reading only", one_of="models",
        argument={"nargs": "+", "type": Path, "metavar": "STUDY"}))
    fixed: dict[str, Any] = sets_field("override a config option")
    test_split: Path | None = field(default=None, metadata=meta("split.json whose test patients are the test split"))
    test: float = field(default=0.2, metadata=meta("without --test-split: test patients (fraction or count)"))
    folds: int = field(default=5, metadata=meta("folds (one trial each)"))
    folds_file: Path | None = field(default=None, metadata=meta(
        "the folds of an earlier study (folds.json), for --versus"))
    seed: int = field(default=0, metadata=meta("seeds the test split and the fold assignment"))
    cpus_per_trial: float = field(default=1.0, metadata=meta("CPUs per fold"))
    gpus_per_trial: float = field(default=0.0, metadata=meta("GPU share per fold"))
    versus: Path | None = field(default=None, metadata=meta("an earlier study.json on the same folds"))
    name: str = field(default="gliomaseg", metadata=meta("the bundle's name"))
    note: str = field(default="", metadata=meta("a sentence for the record and the card"))
    data_licence: str = field(default="", metadata=meta("the training data and its licence, for the card"))
    max_bundle_mb: float = field(default=16.0, metadata=meta(
        "the largest candidate bundle (MB) the test split is read for and exported (0: any); the shipped one's limit"))
    readings_before: int = field(default=0, metadata=meta("times this test split was read before"))
    record: Path | None = field(default=None, metadata=meta("also write the record here (e.g. bench/results/...)"))
    export: Path | None = field(default=None, metadata=meta("write the bundle, metrics.json and MODEL_CARD.md here"))
    readme: Path | None = field(default=None, metadata=meta("replace this README's study table"))


def prepared_data(opts: StudyOptions, out: Path) -> Path:
    """The prepared directory whose test split is fixed: ``--data`` as given, or ``--src`` prepared once."""
    if opts.data:
        return opts.data
    from core.data.prepare import SplitOptions, prepare

    prepared = out / "prepared"
    if not (prepared / "split.json").is_file():
        if opts.test_split:
            prepare(opts.src, prepared, split_file=opts.test_split, progress=False)
        else:
            prepare(opts.src, prepared, SplitOptions(val=0, test=opts.test, seed=opts.seed), progress=False)
    return prepared


def check_test_split(prepared: Path, test_split: Path | None, out: Path) -> dict[str, Any]:
    """The prepared split's info; its test patients must be the recorded ones (written if none was given)."""
    info = load_split_info(prepared)
    if not info["patients"]["test"]:
        raise SystemExit(f"{prepared}: no test patients; a study reads a test split at its end")
    if test_split is not None:
        wanted = sorted(read_json(test_split)["patients"]["test"])
        if sorted(info["patients"]["test"]) != wanted:
            raise SystemExit(f"{prepared}: its test patients are not those of {test_split}")
    else:
        write_json(out / "test-split.json", {"patients": info["patients"], "split_hash": info.get("split_hash")})
    return info


def study_config(config_file: Path, sets: dict[str, Any]) -> dict[str, Any]:
    """The fold configuration: the YAML's constants and --set, with the study's fixed settings."""
    from core.evaluation.oof import OUT_OF_FOLD_TRAINING
    from tune.cv import base_config

    return base_config(config_file, None, {**sets, **OUT_OF_FOLD_TRAINING})


@dataclass
class FoldModels:
    """What the choices and the test reading start from: the CV's config and per-fold figures, its folds,
    the out-of-fold passes (``oof(name)``), the candidate's member bundles and their names."""

    cv: dict[str, Any]
    folds: list[list[str]]
    oof: Callable[[str], np.ndarray]
    members: list[Path]
    sources: list[str]
    kind: str


def fold_models(cv: dict[str, Any], folds: list[list[str]], bundles: list[Path], pool: SplitArrays,
                out: Path) -> FoldModels:
    """One study's fold models: out-of-fold passes predicted by them and cached in OUT/oof."""
    from core.evaluation.oof import OutOfFold

    return FoldModels(cv, folds, OutOfFold(bundles, folds, pool, out / "oof"), bundles,
                      [f"fold {k}" for k in range(len(bundles))],
                      f"{len(folds)}-fold CV ensemble (fp16), probabilities averaged")


def ensembled_studies(studies: list[Path], pool: SplitArrays, info: dict[str, Any]) -> FoldModels:
    """Finished studies on this pool's folds and test split, fold k's models of each ensembled: each
    out-of-fold pass the mean of the studies' own (cached in their OUT/oof), the candidate all their members."""
    from core.bundle.model import ensemble_config
    from core.evaluation.oof import MeanOutOfFold, OutOfFold

    if len(studies) < 2:
        raise SystemExit("--ensemble-of takes two or more studies")
    parts, members, sources, configs, computes = [], [], [], [], []
    for study in studies:
        path = study / "study.json"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; --ensemble-of takes the OUT folders of finished `tune study` runs")
        record = read_json(path)
        if "cv" not in record:
            raise SystemExit(f"{path}: its out-of-fold choices have not finished; run that study again first")
        if record["split"]["hash"] != info.get("split_hash"):
            raise SystemExit(f"{path}: its test split is not this study's (hash {record['split']['hash']})")
        if "ensemble_of" in record["config"]:
            raise SystemExit(f"{path}: an ensemble of studies itself; name the studies it ensembles instead")
        folds = record["folds"]["patients"]
        models = Path(record["folds_from"]) if record.get("folds_from") else study / "cv" / "folds"
        bundles = [models / f"fold{k}" for k in range(len(folds))]
        for bundle in bundles:
            if not (bundle / "config.json").is_file():
                raise SystemExit(f"{bundle}: the fold model {path} names is missing")
        parts.append(OutOfFold(bundles, folds, pool, study / "oof"))
        members += bundles
        sources += [f"{study.name} fold {k}" for k in range(len(folds))]
        configs.append({"study": str(study), **record["config"]})
        # a study stopped by --versus before its test reading may predate recording its training compute
        computes.append(record.get("compute") or (training_compute(study / "cv") if (study / "cv" / "ray").is_dir()
                                                  else {}))
    try:
        oof = MeanOutOfFold(parts)
        ensemble_config([read_json(b / "config.json") for b in members], "check")
    except ValueError as exc:
        raise SystemExit(f"--ensemble-of: {exc}") from None
    folds = parts[0].folds
    keys = ("training_process_cpu_seconds", "training_fold_wall_seconds", "epochs")
    compute = {k: round(sum(c[k] for c in computes), 1) for k in keys if all(k in c for c in computes)}
    cv = {"config": {"ensemble_of": configs}, "compute": {**compute, "note": "the ensembled studies' training, summed"},
          "folds": [{"fold": k, "patients": len(f), "members": [f"{s.name} fold {k}" for s in studies]}
                    for k, f in enumerate(folds)]}
    return FoldModels(cv, folds, oof, members, sources,
                      f"ensemble of {len(studies)} studies' {len(folds)}-fold CV models ({len(members)} members, "
                      "fp16), probabilities averaged")


def folds_from(directory: Path, pool: SplitArrays) -> tuple[dict[str, Any], list[list[str]], list[Path]]:
    """Fold models trained elsewhere (bench/gpu_campaign.py): ``DIR/folds.json``, ``DIR/fold{k}/`` bundles
    and ``DIR/timing.json``; each must have been trained on exactly the pool minus its fold, at its last epoch."""
    folds = read_json(directory / "folds.json")["folds"]
    bundles = [directory / f"fold{k}" for k in range(len(folds))]
    pool_ids = set(np.unique(np.asarray(pool.patients).astype(str)).tolist())
    if sorted(p for f in folds for p in f) != sorted(pool_ids):
        raise SystemExit(f"{directory}/folds.json: its folds do not cover this study's pool exactly once")
    per_fold, configs = [], []
    for k, (fold, bundle) in enumerate(zip(folds, bundles, strict=True)):
        metrics, config = read_json(bundle / "metrics.json"), read_json(bundle / "config.json")
        trained_on = metrics.get("train_patients")
        if trained_on is None or sorted(trained_on) != sorted(pool_ids - set(fold)):
            raise SystemExit(f"{bundle}: not trained on exactly the pool minus fold {k}")
        if config["hyperparameters"].get("keep") != "last":
            raise SystemExit(f"{bundle}: its weights were chosen on its own fold (keep: last is required)")
        configs.append(config["hyperparameters"])
        per_fold.append({"fold": k, "patients": len(fold), "best_epoch": metrics.get("epoch"),
                         "val": metrics.get("val"), "stop_reason": metrics.get("stop_reason")})
    timing = read_json(directory / "timing.json") if (directory / "timing.json").is_file() else {}
    cv = {"config": configs[0], "folds": per_fold, "compute": timing.get("compute"),
          "device": timing.get("device"), "source": str(directory)}
    return cv, folds, bundles


def training_compute(cv_dir: Path) -> dict[str, Any]:
    """Each fold's process CPU seconds and wall-clock seconds, summed from its checkpointed epoch history."""
    from core.training.checkpoint import STATE

    cpu = wall = 0.0
    epochs = 0
    for fold in sorted((cv_dir / "ray").glob("fold_*")):
        states = sorted(fold.glob(f"checkpoint_*/*/{STATE}"))  # the newest carries every epoch
        if not states:
            continue
        history = json.loads(states[-1].read_text()).get("history", [])
        cpu += sum(float(row.get("epoch_cpu_seconds", 0.0)) for row in history)
        wall += sum(float(row.get("epoch_seconds", 0.0)) for row in history)
        epochs += len(history)
    return {"training_process_cpu_seconds": round(cpu, 1), "training_fold_wall_seconds": round(wall, 1),
            "epochs": epochs,
            "note": "process CPU seconds: each fold's training process, all its threads, summed over folds; "
                    "wall seconds: each fold's epochs end to end, summed over folds (folds ran in parallel)"}


def compare(record: Path, chosen: dict[str, Any], folds: list[list[str]]) -> dict[str, Any]:
    """Paired per-patient CV dsc_volume differences (this study - the earlier one) on the same folds."""
    from core.evaluation.stats import paired_difference

    earlier = read_json(record)
    earlier_folds = earlier.get("folds", {}).get("patients") if isinstance(earlier.get("folds"), dict) else None
    if earlier_folds is not None and sorted(map(sorted, earlier_folds)) != sorted(map(sorted, folds)):
        raise SystemExit(f"{record}: its folds are not this study's; run with --folds-file of that study")
    cv = earlier["cv"]["per_patient_dsc_volume"]
    if sorted(cv) != sorted(p for f in folds for p in f):
        raise SystemExit(f"{record}: its CV patients are not this study's pool")
    return {"record": str(record), **paired_difference(chosen["cv"]["per_patient_dsc_volume"], cv)}


def members_digest(fold_bundles: list[Path]) -> str:
    """sha256 over the fold models' weights: the same folds give the same digest."""
    digest = hashlib.sha256()
    for bundle in fold_bundles:
        digest.update((bundle / "model.safetensors").read_bytes())
    return digest.hexdigest()


def build_candidate(fold_bundles: list[Path], chosen: dict[str, Any], info: dict[str, Any], out: Path,
                    name: str, sources: list[str]) -> Path:
    """The fold ensemble with the CV's settings (fp16 weights); its config names the study's split."""
    from core.training.ensemble import build_ensemble_bundle

    fixed = {"threshold": chosen["threshold"], "tta": chosen["tta"], "postprocess": chosen["postprocess"],
             "quality": {k: chosen["quality"][k] for k in ("method", "review_below")},
             "version": f"{name}-{time.strftime('%Y.%m.%d')}+{members_digest(fold_bundles)[:8]}",
             "data": {"split_hash": info.get("split_hash")}}
    return build_ensemble_bundle(fold_bundles, None, list(info.get("class_names") or ["background", "tumour"]),
                                 out, name=name, sources=sources,
                                 fixed=fixed, half=True)


def read_test(bundle: Path, test: SplitArrays) -> dict[str, Any]:
    """The one reading of the test split: per volume, one slice at a time, and with pre/post replaced by
    FLAIR; per-patient dsc_volume with intervals, the metrics, quality and the volumes a rule would have
    emptied (answered with the network's mask, for review)."""
    from core.evaluation.choices import with_flair
    from core.evaluation.metrics import per_patient_dice, segmentation_metrics
    from core.evaluation.selection import ValSplit
    from core.evaluation.stats import spearman, summary
    from core.inference.predictor import Predictor

    predictor = Predictor.from_bundle(bundle, "cpu")
    truth, patients = np.asarray(test.masks), np.asarray(test.patients).astype(str)
    split = ValSplit(truth, patients, np.asarray(test.slices))
    paths = {name: np.zeros_like(truth) for name in ("volume", "one_slice", "flair_only")}
    quality, review, kept = {}, {}, {"volume": [], "flair_only": []}
    for rows in split.groups:
        patient = str(patients[rows[0]])
        images = np.ascontiguousarray(np.asarray(test.images[rows]).transpose(0, 2, 3, 1))
        answer = predictor.segment(images)
        paths["volume"][rows] = answer.masks
        quality[patient], review[patient] = answer.quality, answer.review
        paths["one_slice"][rows] = predictor.predict(images)
        flair = predictor.segment(with_flair(images))
        paths["flair_only"][rows] = flair.masks
        for path, got in (("volume", answer), ("flair_only", flair)):
            if got.network_mask_kept:
                kept[path].append(patient)
    dice = {name: per_patient_dice(pred, truth, patients) for name, pred in paths.items()}
    return {
        "patients": sorted(set(patients.tolist())),
        "metrics": {name: segmentation_metrics(pred, truth, patients) for name, pred in paths.items()},
        "per_patient": {name: summary(d) for name, d in dice.items()},
        "flair_only_drop": summary({p: dice["volume"][p] - dice["flair_only"][p] for p in dice["volume"]}),
        "per_patient_dsc_volume": dice,
        "quality": {"per_patient": quality, "review": review, "reviewed": sorted(p for p, r in review.items() if r),
                    "spearman": spearman([quality[p] for p in quality], [dice["volume"][p] for p in quality])},
        "network_mask_kept": kept,
    }


def run_study(opts: StudyOptions) -> dict[str, Any]:
    """The whole protocol (module doc); returns the record."""
    from core.evaluation.choices import choose_settings
    from core.evaluation.selection import ValSplit
    from core.evaluation.stats import BOOTSTRAP
    from tune.cv import pool_splits, run_cv

    started, cpu_started = time.time(), time.process_time()
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepared_data(opts, out).resolve()
    info = check_test_split(prepared, opts.test_split, out)
    pool, _ = pool_splits(prepared)
    cv_dir = out / "cv"
    if opts.ensemble_of:
        models = ensembled_studies(opts.ensemble_of, pool, info)
    elif opts.folds_from:
        models = fold_models(*folds_from(opts.folds_from, pool), pool, out)
    else:
        config = study_config(opts.config, opts.fixed)
        cv = run_cv(prepared, "cv", opts.folds, config, out, opts.folds_file, opts.cpus_per_trial,
                    opts.gpus_per_trial, opts.seed, half=True)
        folds = read_json(cv_dir / "folds.json")["folds"]
        cv["compute"] = training_compute(cv_dir)
        models = fold_models(cv, folds, [cv_dir / "folds" / f"fold{k}" for k in range(len(folds))], pool, out)
    cv, folds, fold_bundles = models.cv, models.folds, models.members
    val = ValSplit(np.asarray(pool.masks), np.asarray(pool.patients), np.asarray(pool.slices))
    chosen = choose_settings(models.oof, val)
    record: dict[str, Any] = {
        "protocol": PROTOCOL, "bootstrap": BOOTSTRAP, "name": opts.name, "note": opts.note,
        "data": opts.data_licence,
        "split": {"file": str(opts.test_split) if opts.test_split else str(out / "test-split.json"),
                  "hash": info.get("split_hash"), "test": sorted(info["patients"]["test"]),
                  "pool": len(np.unique(np.asarray(pool.patients)))},
        "config": cv["config"], "folds": {"patients": folds, "per_fold": cv["folds"]},
        **({"folds_from": str(opts.folds_from)} if opts.folds_from else {}),
        "choices": {k: chosen[k] for k in ("tta", "threshold", "postprocess", "search")},
        "quality": {k: v for k, v in chosen["quality"].items() if k != "per_patient"},
        "cv": {**chosen["cv"], "quality": chosen["quality"]["per_patient"]},
        "compute": dict(cv.get("compute") or {}),
    }
    if opts.versus:
        record["versus"] = compare(opts.versus, chosen, folds)
        if record["versus"]["verdict"] != "a":  # decided by CV: a variant that does not win leaves the test unread
            stop_before_test(record, out, opts, f"by CV this study does not beat {opts.versus} (paired per patient: "
                                                f"{record['versus']})")
    digest = members_digest(fold_bundles)
    previous = read_json(out / "study.json") if (out / "study.json").is_file() else {}
    if previous.get("test") and previous.get("bundle", {}).get("members_sha256") == digest \
            and previous.get("choices") == json.loads(json.dumps(record["choices"])):
        # a finished study run again (to publish again, or after a kill past the reading): never a second reading
        candidate, record["bundle"], record["test"] = out / "bundle", previous["bundle"], previous["test"]
    else:
        candidate = build_candidate(fold_bundles, chosen, info, out / "bundle", opts.name, models.sources)
        record["bundle"] = {"version": read_json(candidate / "config.json")["version"], "members_sha256": digest,
                            "kind": models.kind, "mb": round(folder_mb(candidate), 2)}
        if opts.max_bundle_mb and record["bundle"]["mb"] > opts.max_bundle_mb:  # it could never ship
            stop_before_test(record, out, opts, f"the candidate bundle is {record['bundle']['mb']} MB, over "
                                                f"--max-bundle-mb {opts.max_bundle_mb}")
        record["test"] = read_test(candidate, load_split(prepared, "test"))
        record["test"]["reading"] = opts.readings_before + 1
    if opts.versus and "test" in (earlier := read_json(opts.versus)):  # the same test patients, paired
        from core.evaluation.stats import paired_difference

        record["versus"]["test"] = paired_difference(record["test"]["per_patient_dsc_volume"]["volume"],
                                                     earlier["test"]["per_patient_dsc_volume"]["volume"])
    record["compute"].update(study_process_cpu_seconds=round(time.process_time() - cpu_started, 1),
                             study_wall_seconds=round(time.time() - started, 1))
    write_json(out / "study.json", record)
    if opts.record:
        write_json(opts.record, record)
    publish(record, candidate, opts)
    return record


def folder_mb(folder: Path) -> float:
    """A bundle folder's size in MB (MiB), every file in it."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def stop_before_test(record: dict[str, Any], out: Path, opts: StudyOptions, why: str) -> NoReturn:
    """Write the record so far (CV and choices, no test reading) and stop, saying why."""
    write_json(out / "study.json", record)
    if opts.record:
        write_json(opts.record, record)
    raise SystemExit(f"{why}: the test split was not read and nothing was exported; record {out / 'study.json'}")


def publish(record: dict[str, Any], candidate: Path, opts: StudyOptions) -> None:
    """The exported bundle (its metrics.json and card from the record) and the README's table."""
    from tune import card

    if opts.export:
        export = opts.export
        tmp = export.with_name(export.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(candidate, tmp)
        card.write_bundle_files(tmp, record, opts.record or opts.out / "study.json")
        shutil.rmtree(export, ignore_errors=True)
        os.replace(tmp, export)
    if opts.readme:
        card.update_readme(opts.readme, record)


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "study", study_command, StudyOptions, doc=__doc__,
                help="the protocol: fixed test split, CV, choices on out-of-fold, one test reading")


def study_command(args: argparse.Namespace) -> int:
    opts = from_args(args, StudyOptions)
    if opts.config:
        if not opts.config.is_file():
            raise SystemExit(f"--config {opts.config}: no such file")
        yaml.safe_load(opts.config.read_text())  # a malformed YAML fails before any training
    record = run_study(opts)
    test = record["test"]["per_patient"]["volume"]
    print(f"test split (read once, reading {record['test']['reading']}): dsc_volume {test['mean']:.4f} "
          f"[{test['ci95'][0]:.4f}, {test['ci95'][1]:.4f}], worst {test['worst']:.4f}; record "
          f"{opts.out / 'study.json'}")
    return 0
