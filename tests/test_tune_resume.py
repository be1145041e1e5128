"""An interrupted search (driver killed with SIGKILL) resumes with `--resume`: every trial finished
before the kill is kept and not re-run, the unfinished ones complete, the Optuna study stays whole."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tune_support import ROOT, driver_env, result_lines, snapshot

SAMPLES, EPOCHS = 8, 6


def tune_cmd(prepared: Path, storage: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "tune", "run", "--data", str(prepared), "--name", "killed", "--storage", str(storage),
        "--num-samples", str(SAMPLES), "--max-epochs", str(EPOCHS), "--scheduler", "none", "--max-concurrent", "2",
        "--set", "arch=lite", "--set", "filters=8", "--set", "batch_size=8", "--set", "patience=0",
        "--set", "lr={loguniform: [1.0e-4, 1.0e-2]}", "--quiet", *extra,
    ]


def test_killed_driver_resumes_without_losing_or_rerunning_trials(ray_session, prepared_dir, tmp_path):
    env = driver_env(ray_session.get_runtime_context().gcs_address)
    experiment = tmp_path / "killed" / "ray"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(tune_cmd(prepared_dir, tmp_path), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            done = [t for t, s in snapshot(experiment).items() if s == "TERMINATED"]
            if len(done) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert len(done) >= 2, "no trial finished in time"
        os.kill(proc.pid, signal.SIGKILL)  # the driver only; its trials die with it
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        log.close()
    before = snapshot(experiment)
    finished = {t for t, s in before.items() if s == "TERMINATED"}
    assert len(finished) < SAMPLES, "the run finished before it could be interrupted"
    lines_before = {t: len(result_lines(experiment, t)) for t in finished}
    time.sleep(2)  # let the cluster reap the dead driver's trial actors

    second = subprocess.run(tune_cmd(prepared_dir, tmp_path, "--resume"), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    with (tmp_path / "killed" / "leaderboard.csv").open() as fh:
        rows = {r["trial_id"]: r for r in csv.DictReader(fh)}
    assert finished <= set(rows), "a trial finished before the kill was lost"
    for trial_id in finished:
        assert len(result_lines(experiment, trial_id)) == lines_before[trial_id], f"{trial_id} was re-run"
    assert len(rows) >= SAMPLES
    for r in rows.values():
        assert r["stop_reason"] == "completed", r
        assert int(r["epochs_run"]) == EPOCHS
    # Resumed trials continued from their checkpoints: every epoch is in their history, in order.
    history = json.loads((tmp_path / "killed" / "history.json").read_text())
    for trial in history:
        assert [h["epoch"] for h in trial["history"]] == list(range(1, EPOCHS + 1))
    assert (tmp_path / "killed" / "best" / "model.safetensors").is_file()

    import optuna

    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{tmp_path / 'killed' / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= SAMPLES


@pytest.mark.parametrize("flag", ["--resume"])
def test_cli_errors_are_one_line(prepared_dir, tmp_path, flag):
    out = subprocess.run([sys.executable, "-m", "tune", "run", "--data", str(prepared_dir), "--name", "none",
                          "--storage", str(tmp_path), flag], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "no run to resume" in out.stderr
