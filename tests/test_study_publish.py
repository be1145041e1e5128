"""Every figure published about `pretrained/lgg` (its metrics.json, its MODEL_CARD.md, the README's results
table) is the one its study record holds, and describes a path the bundle takes; bench/README.md's tables are
the records' (bench/summarize.py)."""

from __future__ import annotations

import json
from pathlib import Path

from core.bundle import load_bundle
from tune.card import metrics_json, model_card, readme_block, readme_table

ROOT = Path(__file__).resolve().parents[1]
RECORD = "bench/results/real-lgg-study-cpu.json"
PRETRAINED = ROOT / "pretrained" / "lgg"


def record() -> dict:
    return json.loads((ROOT / RECORD).read_text())


def test_metrics_card_and_readme_are_generated_from_the_record() -> None:
    study = record()
    assert json.loads((PRETRAINED / "metrics.json").read_text()) == json.loads(json.dumps(metrics_json(study, RECORD)))
    assert (PRETRAINED / "MODEL_CARD.md").read_text() == model_card(study, RECORD)
    assert readme_block((ROOT / "README.md").read_text()) == readme_table(study)


def test_the_bundle_is_the_one_the_record_measured() -> None:
    study, bundle = record(), load_bundle(PRETRAINED)  # every file's sha256 checked
    config = bundle.config
    assert config["version"] == study["bundle"]["version"] == bundle.metrics["version"]
    assert config["data"]["split_hash"] == study["split"]["hash"]  # the study's split, not a member's
    assert config["threshold"] == study["choices"]["threshold"] and config["tta"] == study["choices"]["tta"]
    assert config["postprocess"] == study["choices"]["postprocess"]
    assert config["quality"] == {k: study["quality"][k] for k in ("method", "review_below")}
    assert len(config["members"]) == len(study["folds"]["patients"])
    # no route: the FLAIR-copies figures are of the same members and rules as every other input
    assert "postprocess_flair_only" not in config and not bundle.model.routed
    assert sum(p.stat().st_size for p in PRETRAINED.rglob("*") if p.is_file()) < 16 * 2**20


def test_the_record_keeps_the_test_split_out_of_every_choice_and_empties_no_patient() -> None:
    study = record()
    split = json.loads((ROOT / "bench" / "results" / "real-lgg-test-split.json").read_text())
    test, pool = set(split["patients"]["test"]), {p for f in study["folds"]["patients"] for p in f}
    assert set(study["test"]["patients"]) == test and not test & pool and len(pool) == study["split"]["pool"]
    assert study["config"]["keep"] == "last"  # fold weights not chosen on their own fold's patients
    for path, dice in study["test"]["per_patient_dsc_volume"].items():
        assert set(dice) == test, path
    # where a rule would have emptied a volume, the answer was the network's mask, flagged for review
    assert set(study["test"]["network_mask_kept"]["volume"]) <= set(study["test"]["quality"]["reviewed"])


def test_bench_readme_tables_are_generated_from_the_records() -> None:
    """bench/README.md's benchmark and study-variant tables are bench/summarize.py's rendering of the records."""
    from bench.summarize import README, render, variants_table

    assert render() == README.read_text(), "run python bench/summarize.py"
    variants = variants_table()
    assert "real-lgg-study-lite16-2.5d-cpu.json" in variants and "| undecided |" in variants
