"""pretrained/lgg, the shipped model: small, documented, and segmenting real patients as its record says.

The record (bench/results/real-lgg-study-cpu.json, written by `python -m tune study`) measured the test
split on the JPEG-XL pack of ../shared/data/lgg; five of its 20 patients are among the 25 lossless ones,
so this test measures them again from the bit-exact originals and compares patient by patient.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA

from core.bundle import load_bundle
from core.evaluation.evaluate import arrays_from_src, predict_split
from core.evaluation.metrics import per_patient_dice
from core.inference.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "pretrained" / "lgg"
RECORD = ROOT / "bench" / "results" / "real-lgg-study-cpu.json"
N_TEST = 5  # of the 20 test patients, these are among the 25 lossless ones
# JPEG-XL at about 43 dB against the lossless originals: a patient's dsc_volume moves by a few thousandths.
PACK_TOLERANCE = 0.02


def test_shipped_bundle_is_small_documented_and_loads():
    files = {p.name: p.stat().st_size for p in PRETRAINED.rglob("*") if p.is_file()}
    assert {"config.json", "metrics.json", "MODEL_CARD.md"} <= set(files)
    assert sum(files.values()) < 16 * 2**20
    bundle = load_bundle(PRETRAINED)  # checks every file's sha256
    assert bundle.config["weights_dtype"] == "float16"
    card = (PRETRAINED / "MODEL_CARD.md").read_text()
    for needed in ("CC BY-NC-SA 4.0", "not for diagnosis", "dsc_volume", "Test split", "scipy.stats.bootstrap",
                   "reading of this test split"):
        assert needed in card, needed
    record = json.loads(RECORD.read_text())
    for path in ("volume", "one_slice", "flair_only"):
        figures, summary = bundle.metrics["test"][path], record["test"]["per_patient"][path]
        assert summary["patients"] == bundle.metrics["test"]["patients"] == 20, path
        assert figures["dsc_volume"] == summary["mean"] and figures["dsc_volume_worst"] == summary["worst"], path
        assert summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1], path
        assert f"| {summary['mean']:.3f} [{summary['ci95'][0]:.3f}, {summary['ci95'][1]:.3f}] |" in card, path


@pytest.fixture(scope="module")
def lossless(tmp_path_factory) -> Path:
    if not (REAL_DATA / "restore.py").is_file():
        pytest.skip(f"real LGG data not present at {REAL_DATA} (only on the project's development machines)")
    out = tmp_path_factory.mktemp("lgg25")
    subprocess.run([sys.executable, str(REAL_DATA / "restore.py"), str(out)], check=True, capture_output=True)
    return out / "kaggle_3m"


def test_segments_the_lossless_test_patients_as_the_record_measured_them(lossless):
    everyone = arrays_from_src(lossless)
    patients = np.array([p[:12] for p in np.asarray(everyone.patients).astype(str)])
    recorded = json.loads(RECORD.read_text())["test"]["per_patient_dsc_volume"]["volume"]
    assert len(set(patients)) == 25
    arrays = everyone.select(np.flatnonzero(np.isin(patients, list(recorded))))
    masks = predict_split(Predictor.from_bundle(PRETRAINED, "cpu"), arrays)
    patients = np.array([p[:12] for p in np.asarray(arrays.patients).astype(str)])
    measured = per_patient_dice(masks, np.asarray(arrays.masks), patients)
    shared = sorted(measured)
    assert len(shared) == N_TEST
    for patient in shared:
        assert measured[patient] == pytest.approx(recorded[patient], abs=PACK_TOLERANCE), patient
