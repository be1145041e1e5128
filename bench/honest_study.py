"""The honest protocol on the real LGG data (issue 26): a test split fixed before any choice and read once.

1. `core data prepare` with the recorded assignment (bench/results/real-lgg-test-split.json: 20 test
   patients of the 99, seed 2026, fixed before anything was chosen; the other 79 form the CV pool);
2. `tune cv` of one configuration on 5 patient-level folds of the 79 (resumable: re-run the command);
3. every pool patient predicted by the fold model that never saw it (out-of-fold), and on those pooled
   predictions TTA, the volume and one-slice post-processing (mm3, mm2, mean component probability)
   and the quality score's method and review cut are chosen (bench/honest_cv.py);
4. the fold ensemble, with those settings and fp16 weights, is the candidate; it is decided on before
   the test split is read. The test split is then read once: per volume, one slice at a time, and
   with pre- and post-contrast replaced by FLAIR, each with a 95% bootstrap interval over patients;
5. ``--flair-cv NAME``: a second CV on the same folds with ``sequences: flair`` (FLAIR in every
   channel); its fold models join the candidate as FLAIR-only members of a routed ensemble (slices whose
   pre- and post-contrast are copies of FLAIR go to them, the rest to the full members); the route's
   own volume rules are chosen on their out-of-fold predictions (TTA as in step 3), with its CV figures;
6. ``--versus RECORD``: an earlier study of this protocol on the same folds, compared by the paired
   per-patient differences of the CV (out-of-fold) dsc_volume, and of the FLAIR-only route's where both
   are routed; ``--export`` writes the ensemble (e.g. pretrained/lgg) with its MODEL_CARD.md, unless a
   paired interval says the earlier one is better on either path.

    python ../shared/data/lgg/restore.py runs/lgg-all --pack gpu
    python bench/honest_study.py --src runs/lgg-all/kaggle_3m --work runs --name cv-base \\
        --config runs/honest-base.yaml --export pretrained/lgg
    # the routed ensemble: first the FLAIR-only CV on the same folds
    python -m tune cv --data runs/prepared-honest --folds 5 --config runs/honest-flair.yaml --name cv-flair \
        --storage runs --half --folds-file runs/cv-base/folds.json
    python bench/honest_study.py ... --flair-cv cv-flair --export pretrained/lgg

Writes bench/results/real-lgg-honest-cpu.json (``--result`` names it otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.honest_card import model_card  # noqa: E402
from bench.honest_cv import FLAIR_PASSES, choose, flair_route, out_of_fold, with_flair  # noqa: E402
from bench.machine import write_result  # noqa: E402
from bench.real_lgg import step as run  # noqa: E402
from core.bundle.files import FILES_KEY  # noqa: E402
from core.data.arrays import SplitArrays, load_split, load_split_info  # noqa: E402
from core.evaluation.metrics import per_patient_dice, segmentation_metrics  # noqa: E402
from core.evaluation.selection import ValSplit  # noqa: E402
from core.evaluation.stats import paired_difference, spearman, summary  # noqa: E402
from core.io import read_json, write_json  # noqa: E402

SPLIT = ROOT / "bench" / "results" / "real-lgg-test-split.json"


def cv_cpu_hours(cv_dir: Path) -> float:
    """CPU-hours of the CV's training: each fold's Tune time (one CPU per fold) from its last result."""
    import json

    seconds = 0.0
    for results in sorted((cv_dir / "ray").glob("fold_*/result.json")):
        lines = results.read_text().strip().splitlines()
        seconds += float(json.loads(lines[-1]).get("time_total_s", 0.0)) if lines else 0.0
    return round(seconds / 3600.0, 3)


def test_figures(bundle: Path, test: SplitArrays) -> dict[str, Any]:
    """The test split, read once: every path's metrics, per-patient dsc_volume with intervals, quality."""
    from core.inference.predictor import Predictor

    predictor = Predictor.from_bundle(bundle, "cpu")
    truth, patients = np.asarray(test.masks), np.asarray(test.patients).astype(str)
    val = ValSplit(truth, patients, np.asarray(test.slices))
    paths = {"volume": np.zeros_like(truth), "one_slice": np.zeros_like(truth), "flair_only": np.zeros_like(truth)}
    quality, review = {}, {}
    for rows in val.groups:
        images = np.ascontiguousarray(np.asarray(test.images[rows]).transpose(0, 2, 3, 1))
        answer = predictor.segment(images)
        paths["volume"][rows] = answer.masks
        quality[str(patients[rows[0]])], review[str(patients[rows[0]])] = answer.quality, answer.review
        paths["one_slice"][rows] = predictor.predict(images)
        paths["flair_only"][rows] = predictor.segment(with_flair(images)).masks
    dice = {name: per_patient_dice(pred, truth, patients) for name, pred in paths.items()}
    drop = {p: dice["volume"][p] - dice["flair_only"][p] for p in dice["volume"]}
    return {
        "metrics": {name: segmentation_metrics(pred, truth, patients) for name, pred in paths.items()},
        "per_patient": {name: summary(d) for name, d in dice.items()}, "flair_only_drop": summary(drop),
        "per_patient_dsc_volume": dice,
        "quality": {"per_patient": quality, "review": review,
                    "spearman": spearman([quality[p] for p in quality], [dice["volume"][p] for p in quality])},
    }


def compare(record: Path, chosen: dict[str, Any]) -> dict[str, Any]:
    """Paired per-patient CV differences (this - earlier) of the full path and, where both are routed, of the
    FLAIR-only route."""
    earlier = read_json(record)["chosen"]
    out = {"record": str(record), **paired_difference(chosen["cv"]["per_patient_dsc_volume"],
                                                      earlier["cv"]["per_patient_dsc_volume"])}
    if "flair_route" in chosen and "flair_route" in earlier:
        out["flair_route"] = paired_difference(chosen["flair_route"]["per_patient_dsc_volume"],
                                               earlier["flair_route"]["per_patient_dsc_volume"])
    return out


def export(bundle: Path, out: Path, metrics: dict[str, Any], card: str) -> None:
    """The evaluated ensemble, as evaluated (its fp16 weights unchanged), with the study's metrics and card."""
    from core.bundle import load_bundle, save_ensemble_bundle

    loaded = load_bundle(bundle, "cpu")
    config = {k: v for k, v in loaded.config.items() if k not in (FILES_KEY, "weights_dtype")}
    save_ensemble_bundle(out, loaded.model, config, {**loaded.metrics, **metrics}, half=True)
    (out / "MODEL_CARD.md").write_text(card)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, required=True, help="the 99 patients' kaggle_3m folder")
    p.add_argument("--work", type=Path, default=ROOT / "runs")
    p.add_argument("--name", default="cv-base", help="the CV's run name under --work")
    p.add_argument("--config", type=Path, required=True, help="YAML of core train options (constants)")
    p.add_argument("--folds-file", type=Path, help="reuse an earlier study's folds.json (for --versus)")
    p.add_argument("--flair-cv", help="a FLAIR-only CV's run name under --work (same folds): route to its models")
    p.add_argument("--note", default="", help="a sentence for the record and the model card (e.g. a second reading)")
    p.add_argument("--versus", type=Path, help="an earlier record of this protocol on the same folds")
    p.add_argument("--export", type=Path, help="write the ensemble here (e.g. pretrained/lgg)")
    p.add_argument("--result", default="real-lgg-honest", help="bench/results/RESULT-<device>.json")
    args = p.parse_args()
    work, started = args.work.resolve(), time.time()
    prepared, log = work / "prepared-honest", work / f"{args.name}.study.log"
    work.mkdir(parents=True, exist_ok=True)
    if not (prepared / "split.json").is_file():
        run(["-m", "core", "data", "prepare", "--src", str(args.src), "--out", str(prepared),
             "--split-file", str(SPLIT), "--no-progress"], log)
    info = load_split_info(prepared)
    if sorted(info["patients"]["test"]) != sorted(read_json(SPLIT)["patients"]["test"]):
        raise SystemExit(f"{prepared}: its test patients are not the recorded ones ({SPLIT})")
    cv_dir = work / args.name
    if not (cv_dir / "cv.json").is_file():
        argv = ["-m", "tune", "cv", "--data", str(prepared), "--folds", "5", "--config", str(args.config),
                "--name", args.name, "--storage", str(work), "--half"]
        run(argv + (["--folds-file", str(args.folds_file)] if args.folds_file else []), log)
    cv = read_json(cv_dir / "cv.json")
    pool = load_split(prepared, "train", mmap=False)
    val = ValSplit(np.asarray(pool.masks), np.asarray(pool.patients), np.asarray(pool.slices))
    chosen_file = cv_dir / "oof" / "chosen.json"  # choose() is deterministic on the cached OOF: kept beside it
    if chosen_file.is_file():
        chosen = read_json(chosen_file)
    else:
        chosen = choose(out_of_fold(cv_dir, pool, cv_dir / "oof"), val)
        write_json(chosen_file, chosen)
    print(f"chosen by CV: tta {chosen['tta']}, post-processing {chosen['postprocess']}, quality "
          f"{chosen['quality']['method']} (Spearman {chosen['quality']['spearman_cv']:.3f}, review below "
          f"{chosen['quality']['review_below']})", flush=True)

    from core.training.ensemble import build_ensemble_bundle

    members, sources, kind = [cv_dir / "folds" / f"fold{r['fold']}" for r in cv["folds"]], \
        [f"fold {r['fold']}" for r in cv["folds"]], "5-fold CV ensemble (fp16)"
    candidate = cv_dir / "shipped"
    if args.flair_cv:
        flair_dir = work / args.flair_cv
        if read_json(flair_dir / "folds.json")["folds"] != read_json(cv_dir / "folds.json")["folds"]:
            raise SystemExit(f"{flair_dir}: its folds are not {cv_dir}'s; run it with --folds-file")
        chosen["flair_route"] = flair_route(out_of_fold(flair_dir, pool, flair_dir / "oof", FLAIR_PASSES), val, chosen)
        flair_folds = read_json(flair_dir / "cv.json")["folds"]
        members += [flair_dir / "folds" / f"fold{r['fold']}" for r in flair_folds]
        sources += [f"FLAIR-only fold {r['fold']}" for r in flair_folds]
        candidate, kind = cv_dir / "shipped-routed", "routed 5+5-fold CV ensemble (fp16): full and FLAIR-only members"
        print(f"FLAIR-only route on CV: drop {chosen['flair_route']['flair_only_drop']['mean']:.4f}", flush=True)
    fixed = {"threshold": 0.5, "tta": chosen["tta"], "postprocess": chosen["postprocess"],
             "quality": {k: chosen["quality"][k] for k in ("method", "review_below")}}
    if args.flair_cv and chosen["flair_route"]["postprocess"] != chosen["postprocess"]:
        fixed["postprocess_flair_only"] = chosen["flair_route"]["postprocess"]  # the route's own, chosen by CV
    build_ensemble_bundle(members, None, ["background", "tumour"], candidate, name="gliomaseg-lgg",
                          sources=sources, fixed=fixed, half=True,
                          extra_metrics={"selection": "threshold, TTA, post-processing and the quality cut chosen "
                                                      "by 5-fold CV (out-of-fold) on the 79 pool patients"})
    versus = compare(args.versus, chosen) if args.versus else {}
    worse = [path for path, v in (("full", versus), ("FLAIR-only", versus.get("flair_route", {})))
             if v.get("verdict") == "b"]
    if worse:  # decided by CV, before the test split is read: the test split stays unread
        print(f"by CV the earlier record is better on the {' and '.join(worse)} path: test split not read, "
              f"nothing exported; {versus}", flush=True)
        return 1
    test = test_figures(candidate, load_split(prepared, "test"))  # the one reading of the test split
    result: dict[str, Any] = {
        "protocol": __doc__.split("\n\n")[0],
        "split": {"file": str(SPLIT.relative_to(ROOT)), "hash": info.get("split_hash"),
                  "test": sorted(info["patients"]["test"]), "pool": len(info["patients"]["train"])},
        "config": cv["config"], "folds": cv["folds"], "cv_summary": cv["summary"], "chosen": chosen,
        "shipped": {"kind": f"{kind}, the bundle the test figures are from",
                    "postprocess": chosen["postprocess"], "tta": chosen["tta"], "quality": fixed["quality"],
                    "postprocess_flair_only": fixed.get("postprocess_flair_only", chosen["postprocess"])},
        "test": test, "note": args.note,
        "flair_config": read_json(work / args.flair_cv / "cv.json")["config"] if args.flair_cv else None,
        "cv_cpu_hours": cv_cpu_hours(cv_dir) + (cv_cpu_hours(work / args.flair_cv) if args.flair_cv else 0.0),
        "study_wall_seconds": round(time.time() - started, 1),
    }
    if versus:
        result["versus"] = versus
    record = write_result(args.result, result)
    print(f"test (read once): dsc_volume {test['per_patient']['volume']['mean']:.4f} "
          f"{test['per_patient']['volume']['ci95']}, one slice {test['per_patient']['one_slice']['mean']:.4f}, "
          f"FLAIR-only drop {test['flair_only_drop']['mean']:.4f}; record {record}", flush=True)
    if args.export:
        metrics = {"test": test["metrics"]["volume"], "test_one_slice": test["metrics"]["one_slice"],
                   "test_flair_only": test["metrics"]["flair_only"], "test_per_patient": test["per_patient"],
                   "cv": chosen["cv"]["per_patient"], "quality": chosen["quality"], "record": str(record)}
        export(candidate, args.export, metrics, model_card(result, info))
        print(f"exported {args.export}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
