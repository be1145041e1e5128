"""bench/gpu_check.py's CPU smoke: the GPU acceptance run's code paths (restore + prepare, Trainer epochs,
K trial processes, Predictor by batch size, the train-pipeline comparison) end to end on tiny data, and
the JSON it writes (into a temporary folder, never bench/results/)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from tune_support import ROOT, driver_env

RESULTS = ROOT / "bench" / "results"
REAL_DATA = ROOT.parent / "shared" / "data" / "lgg"  # as tests/conftest.py and gpu_check find it


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out, work = tmp_path_factory.mktemp("gpu_check_out"), tmp_path_factory.mktemp("gpu_check_work")
    before = {p.name: p.stat().st_mtime for p in RESULTS.glob("*.json")}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--smoke", "--out", str(out),
           "--work", str(work)]
    proc = subprocess.run(cmd, cwd=ROOT, env=driver_env(None), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime for p in RESULTS.glob("*.json")} == before, "wrote into bench/results"
    [path] = out.glob("gpu-check-smoke-*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_smoke_trains_finite_on_the_data_it_restored(smoke):
    assert smoke["benchmark"] == "gpu-check-smoke" and smoke["smoke"] is True
    assert smoke["settings"]["device"] == "cpu"
    expected = "lossless" if (REAL_DATA / "restore.py").is_file() else "synth"
    assert smoke["settings"]["pack"] == expected
    train = smoke["train"]
    assert len(train["epochs"]) == smoke["settings"]["epochs"] >= 1
    assert all(math.isfinite(e["train_loss"]) for e in train["epochs"]) and train["loss_finite"] is True
    assert all(0.0 <= e["dsc_volume"] <= 1.0 for e in train["epochs"])
    dsc = [e["dsc_volume"] for e in train["epochs"]]  # rising: a later epoch beats the first (the GPU's target)
    assert train["dsc_rising"] == ((max(dsc[1:]) > dsc[0]) if len(dsc) > 1 else None)
    # No CUDA here: the data sits on the CPU and autocast is off (bfloat16 is what a GPU run must show).
    assert train["data_device"] == "cpu" and train["autocast_dtype"] == "float32"
    assert train["train_slices"] > 0 and train["val_slices"] > 0 and train["peak_memory"]["host_rss_mib"] > 0


@pytest.mark.slow
def test_smoke_measures_k_trials_predictor_and_pipeline(smoke):
    by_k = smoke["sharing"]["by_k"]
    assert set(by_k) == {"1", "2"}
    for k, r in by_k.items():
        assert r["trial_epochs"] == int(k) * smoke["settings"]["trial_epochs"]
        assert r["trial_epochs_per_hour"] > 0 and r["loss_finite"] is True
        assert len(r["peak_memory_per_trial"]) == int(k)
        assert all(m["host_rss_mib"] > 0 for m in r["peak_memory_per_trial"])
    assert by_k["1"]["ratio_vs_k1"] == 1.0
    by_batch = smoke["predictor"]["by_batch"]
    assert set(by_batch) == {"1", "8"} and all(v["slices_per_s"] > 0 for v in by_batch.values())
    pipeline = smoke["pipeline"]
    assert pipeline["speedup_gliomaseg_over_study"] > 0
    assert {"gliomaseg", "study", "model_only"} <= set(pipeline["figures"])
    assert pipeline["settings"]["crop"] == 224  # the study's 224 of 256, on the real-size slices


@pytest.mark.slow
def test_smoke_json_has_timings_verdict_and_table_rows(smoke):
    sys.path.insert(0, str(ROOT))
    from bench.summarize import table

    timings = smoke["timings"]
    assert {"restore_s", "prepare_s", "train_s", "sharing_s", "predictor_s", "pipeline_s", "total_s"} <= set(timings)
    assert timings["total_s"] >= sum(v for k, v in timings.items() if k != "total_s") * 0.99
    # GPU targets do not apply on a CPU; the time budget does.
    assert smoke["met"]["train"] is None and smoke["met"]["sharing"] is None and smoke["met"]["pipeline"] is None
    sys.path.insert(0, str(ROOT / "bench"))  # gpu_check runs as a script: its siblings import by name
    from bench.gpu_check import BUDGET_S

    assert smoke["met"]["budget"] is (timings["total_s"] <= BUDGET_S)
    assert len(smoke["summary"]) == 5
    assert all(set(r) == {"metric", "target", "measured", "met", "limits"} for r in smoke["summary"])
    rendered = table([{**smoke, "_file": "gpu-check-smoke-cpu.json"}])
    assert rendered.count("gpu-check-smoke (gpu-check-smoke-cpu.json)") == 5
