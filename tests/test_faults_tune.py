"""Tune under faults: a trial's worker killed mid-epoch resumes from its checkpoint; a driver killed
three times at random points still ends with every trial completed exactly once; a crash while
writing prepared/ or a checkpoint leaves the previous files intact.

Experiment state is read through tests/tune_support.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from tune_support import ROOT, TINY_NET, driver_env, result_lines, snapshot

TINY = {**TINY_NET, "warmup_epochs": 0}


def _trial_workers(ray_session) -> list[psutil.Process]:
    """This session's Tune trial processes (children of our raylet: other Rays on the host are left alone)."""
    node = ray_session._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::ImplicitFunc") and raylet in {p.pid for p in proc.parents()}:
            found.append(proc)
    return found


@pytest.mark.slow
def test_trial_worker_killed_mid_epoch_resumes_from_its_checkpoint(ray_session, prepared_dir, tmp_path):
    from tune.search import SearchOptions, run_search

    epochs, experiment = 8, tmp_path / "actor" / "ray"
    killed: dict[str, object] = {}

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "epochs_before" not in killed:
            trials = list(experiment.glob("trial_*/result.json"))
            lines = len(result_lines(experiment, trials[0].parent.name[6:])) if trials else 0
            workers = _trial_workers(ray_session)
            if lines >= 2 and workers:  # two epochs (and checkpoints) done: now inside a later epoch
                workers[0].send_signal(signal.SIGKILL)
                killed.update(epochs_before=lines, pid=workers[0].pid)
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    run_search(SearchOptions(data=prepared_dir, name="actor", storage=str(tmp_path), num_samples=1,
                             max_epochs=epochs, scheduler="none", fixed={**TINY, "lr": 3e-3}, verbose=0))
    thread.join(5)
    assert "epochs_before" in killed, "the trial finished before its worker could be killed"
    (trial_dir,) = experiment.glob("trial_*")
    lines = result_lines(experiment, trial_dir.name[6:])
    reported = [line["epoch"] for line in lines]
    # Continued, not restarted: every epoch reported once, in order (a restart from zero repeats 1, 2...).
    assert reported == list(range(1, epochs + 1)), reported
    assert lines[-1]["stop_reason"] == "completed"
    state = snapshot(experiment)
    assert list(state.values()) == ["TERMINATED"]
    errors = list(trial_dir.glob("error*.txt")) + list(trial_dir.glob("error*.pkl"))
    assert errors or any(int(line.get("iterations_since_restore", 0)) < int(line["training_iteration"])
                         for line in lines), "no sign the trial failed and was restored"
    history = json.loads((tmp_path / "actor" / "history.json").read_text())
    assert [h["epoch"] for h in history[0]["history"]] == list(range(1, epochs + 1))


SAMPLES, EPOCHS, KILLS = 4, 3, 3


def _cmd(prepared: Path, storage: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "tune", "run", "--data", str(prepared), "--name", "thrice", "--storage", str(storage),
        "--num-samples", str(SAMPLES), "--max-epochs", str(EPOCHS), "--scheduler", "none", "--max-concurrent", "2",
        *(f"--set={k}={v}" for k, v in TINY.items()), "--set", "lr={loguniform: [1.0e-3, 1.0e-2]}", "--quiet",
        *extra,
    ]


def _epochs_reported(experiment: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in experiment.glob("trial_*/result.json"))


@pytest.mark.slow
def test_driver_killed_three_times_ends_with_every_trial_completed_once(ray_session, prepared_dir, tmp_path):
    # `tune run` snapshots Ray's experiment state after every event (TUNE_GLOBAL_CHECKPOINT_S=0): with
    # Ray's default period a driver killed between a checkpoint's deletion and the next snapshot would
    # resume a trial from a checkpoint that no longer exists. This test pins that default.
    env = driver_env(ray_session.get_runtime_context().gcs_address, drop=("TUNE_GLOBAL_CHECKPOINT_S",))
    experiment, rng = tmp_path / "thrice" / "ray", random.Random(8)
    done_at_kill: list[tuple[float, list[str]]] = []  # per kill: its time and the trials finished by then
    for attempt in range(KILLS):
        extra = ("--resume",) if attempt else ()
        with (tmp_path / f"driver{attempt}.log").open("w") as log:
            proc = subprocess.Popen(_cmd(prepared_dir, tmp_path, *extra), cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            # A random point 1-3 reported epochs into this driver's life (of 12 in all), so each
            # resume makes progress and the kills land early, midway and late in the run.
            target = _epochs_reported(experiment) + rng.randint(1, 3)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None and _epochs_reported(experiment) < target:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            assert proc.poll() is None, (tmp_path / f"driver{attempt}.log").read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        done_at_kill.append((time.time(), [t for t, s in snapshot(experiment).items() if s == "TERMINATED"]))
        time.sleep(1.0)  # let the cluster reap the dead driver's trial workers
    assert len(done_at_kill[-1][1]) < SAMPLES, "the run finished before the third kill"

    final = subprocess.run(_cmd(prepared_dir, tmp_path, "--resume"), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=240)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    state = snapshot(experiment)
    # What an uninterrupted run ends with: SAMPLES trials, all completed, every epoch reported.
    assert len(state) == SAMPLES and set(state.values()) == {"TERMINATED"}, state
    run = json.loads((tmp_path / "thrice" / "run.json").read_text())
    assert run["status"] == "finished" and run["trials"] == SAMPLES and run["stop_reasons"] == {"completed": SAMPLES}
    for trial_id in state:
        lines = result_lines(experiment, trial_id)
        epochs = [(line["epoch"], line["training_iteration"]) for line in lines]
        # No epoch trained more than twice: a kill that lands after an epoch's report but before (or while)
        # the driver snapshots it resumes the trial from the checkpoint before, so that one epoch trains
        # again; a trial restarted from scratch, or a finished one run again, fails here or below. A trial
        # that finished before the snapshot caught up re-reports its end, one iteration on (nothing trained).
        # Ray copies result files to storage in the background, so a kill can lose a trial's earlier lines
        # (seen: a file holding only epoch 3, or only the re-reported end); history.json, filled from each
        # trial's checkpoint, is where every epoch is asserted (below).
        trained = Counter(e for e, it in epochs if e == it)
        assert set(trained) <= set(range(1, EPOCHS + 1)), (trial_id, epochs)
        assert max(trained.values(), default=0) <= 2 and sum(trained.values()) <= EPOCHS + KILLS, (trial_id, epochs)
        assert not lines or lines[-1]["epoch"] == EPOCHS and lines[-1]["stop_reason"] == "completed", (trial_id, epochs)
    # A trial finished before a kill was not touched afterwards: every line it has was reported (by its
    # worker's clock, whole seconds) before that kill (line counts read at the kill proved unreliable: a
    # trial finished by the snapshot's account once had none of its lines in result.json yet).
    for killed_at, finished in done_at_kill:
        for trial_id in finished:
            stamps = [line["timestamp"] for line in result_lines(experiment, trial_id)]
            assert max(stamps, default=0) <= killed_at, trial_id
    history = json.loads((tmp_path / "thrice" / "history.json").read_text())
    assert sorted(t["trial_id"] for t in history) == sorted(state)
    # Resumed trials continued from their checkpoints: every epoch, in order (filled from each trial's
    # checkpoint where its result file lost lines).
    for trial in history:
        assert [h["epoch"] for h in trial["history"]] == list(range(1, EPOCHS + 1)), trial["trial_id"]
    with (tmp_path / "thrice" / "leaderboard.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["trial_id"] for r in rows) == sorted(state)
    assert all(r["stop_reason"] == "completed" and int(r["epochs_run"]) == EPOCHS for r in rows), rows
    assert (tmp_path / "thrice" / "best" / "model.safetensors").is_file()

    import optuna  # the study stays whole across the kills: one completed Optuna trial per Tune trial

    study = optuna.load_study(study_name="thrice", storage=f"sqlite:///{tmp_path / 'thrice' / 'optuna.db'}")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == SAMPLES


def test_resume_without_a_run_is_a_one_line_error(prepared_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "tune", "run", "--data", str(prepared_dir), "--name", "none",
                          "--storage", str(tmp_path), "--resume"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "no run to resume" in out.stderr


# ---------------------------------------------------------------------------------- crash-safe writes

def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_prepare_leaves_previous_prepared_intact(synth_src, tmp_path, monkeypatch):
    import core.data.prepare as prep

    out = tmp_path / "prepared"
    prep.prepare(synth_src, out, prep.SplitOptions(val=2, test=2, seed=0), progress=False)
    before = _digests(out)
    real, calls = prep.save_split, []

    def failing(folder: Path, arrays) -> None:
        calls.append(folder)
        real(folder, arrays)
        if len(calls) == 2:  # train and val written into the temporary folder, then the crash
            raise OSError("disk full (injected)")

    monkeypatch.setattr(prep, "save_split", failing)
    with pytest.raises(OSError, match="injected"):
        prep.prepare(synth_src, out, prep.SplitOptions(val=3, test=3, seed=1), progress=False)
    assert _digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no temporary folder left


CRASH = r'''
import os, signal, sys
from pathlib import Path
import core.training.checkpoint as ckpt
from core.config import TrainConfig
from core.training.trainer import Trainer

prepared, target, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cfg = TrainConfig(arch="lite", filters=8, epochs=1, batch_size=8, device="cpu", patience=0)
trainer = Trainer.from_prepared(cfg, prepared)
trainer.fit()
real = ckpt.save_file

def crash(tensors, path):
    real(tensors, path)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])  # half a weights file on disk
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no exception handler runs
    raise OSError("injected")

ckpt.save_file = crash
try:
    trainer.save_checkpoint(target)
except OSError:
    sys.exit(3)
'''


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_crashed_checkpoint_write_leaves_previous_checkpoint_intact(prepared_dir, tmp_path, mode):
    from core.config import TrainConfig
    from core.training.trainer import Trainer

    cfg = TrainConfig(arch="lite", filters=8, epochs=1, batch_size=8, device="cpu", patience=0)
    trainer = Trainer.from_prepared(cfg, prepared_dir)
    target = tmp_path / "ckpt" / "checkpoint"
    trainer.save_checkpoint(target)
    before = _digests(target)
    proc = subprocess.run([sys.executable, "-c", CRASH, str(prepared_dir), str(target), mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == (3 if mode == "raise" else -signal.SIGKILL), proc.stderr[-2000:]
    assert _digests(target) == before
    fresh = Trainer.from_prepared(cfg, prepared_dir)
    fresh.load_checkpoint(target)  # still a whole, loadable checkpoint
    assert fresh.epoch == trainer.epoch
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "checkpoint"]
    if mode == "raise":
        assert not leftovers, leftovers  # cleaned up on the way out
    else:  # SIGKILL runs no cleanup: a hidden temporary sibling may remain, never the target itself
        assert all(name.startswith(".checkpoint.tmp-") for name in leftovers), leftovers


def test_history_takes_epochs_a_killed_driver_lost_from_the_trial_checkpoint(prepared_dir, tmp_path):
    """Ray copies a trial's result file to storage in the background; a driver killed mid-copy once left a
    trial whose file held only its re-reported last epoch. Its checkpoint (written by the worker) has all."""
    import pandas as pd
    from ray import tune

    from core.config import TrainConfig
    from core.training.trainer import Trainer
    from tune.objective import CHECKPOINT_DIR
    from tune.results import trial_history

    cfg = TrainConfig(arch="lite", filters=8, epochs=2, batch_size=8, device="cpu", patience=0)
    trainer = Trainer.from_prepared(cfg, prepared_dir)
    trainer.fit()
    folder = tmp_path / "trial" / "checkpoint_000001"
    trainer.save_checkpoint(folder / CHECKPOINT_DIR)
    last = {**trainer.history[-1], "training_iteration": 2, "stop_reason": "completed"}
    lost = tune.Result(metrics=last, checkpoint=None, error=None, path=str(tmp_path / "trial"),
                       metrics_dataframe=pd.DataFrame([last]))
    assert [row["epoch"] for row in trial_history(lost)] == [2]  # the result file alone
    kept = tune.Result(metrics=last, checkpoint=tune.Checkpoint.from_directory(folder), error=None,
                       path=str(tmp_path / "trial"), metrics_dataframe=pd.DataFrame([last]))
    rows = trial_history(kept)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[0]["dsc_volume"] == pytest.approx(trainer.history[0]["dsc_volume"])
    assert rows[0]["train_loss"] == pytest.approx(trainer.history[0]["train_loss"])


@pytest.mark.parametrize("kept_copy", [True, False])
def test_resume_mends_a_torn_ray_snapshot(tmp_path, kept_copy):
    """A driver killed while Ray wrote its snapshot leaves it truncated; resume must not restore a run with
    trials missing (seen as a run that 'finished' with one trial). With the whole copy KeepWholeSnapshot
    kept after the last complete save, the torn snapshot is replaced by it; without one, it is set aside
    and Ray resumes from the previous driver session's snapshot."""
    import pickle

    from tune.storage import RunStorage

    storage = RunStorage.open("run", str(tmp_path))
    ray_dir = Path(storage.experiment_path)
    ray_dir.mkdir(parents=True)
    old, new = "2026-01-01_00-00-01", "2026-01-01_00-00-02"
    files = [f"experiment_state-{new}.json", f"search_gen_state-{new}.json", f"searcher-state-{new}.pkl"]
    for stamp in (old, new):
        (ray_dir / f"experiment_state-{stamp}.json").write_text(json.dumps({"trial_data": [], "stamp": stamp}))
        (ray_dir / f"search_gen_state-{stamp}.json").write_bytes(pickle.dumps({"counter": 4}))
        (ray_dir / f"searcher-state-{stamp}.pkl").write_bytes(pickle.dumps({"n": 4}))
    if kept_copy:
        storage.keep_whole_snapshot()  # what the callback does after each complete save
        assert sorted(p.name for p in ray_dir.glob("*.whole")) == sorted(f"{f}.whole" for f in files)
    newest = ray_dir / files[0]
    newest.write_text(newest.read_text()[:20])  # the next save, cut short by a kill
    done = storage.repair_torn_snapshots()
    assert sorted(done) == sorted(files)
    if kept_copy:
        assert set(done.values()) == {"restored from its whole copy"}
        assert json.loads(newest.read_text())["stamp"] == new
    else:
        assert set(done.values()) == {"set aside"} and not newest.exists()
        assert sorted(p.name for p in ray_dir.glob("experiment_state-*.json"))[-1] == f"experiment_state-{old}.json"
    assert (ray_dir / f"{files[0]}.torn").read_text() == '{"trial_data": [], "'  # kept for a post-mortem
    assert storage.repair_torn_snapshots() == {}  # whole snapshots are left alone


@pytest.mark.parametrize("logger", ["KeepDriverResults", "KeepDriverProgress"])
def test_a_retried_trial_keeps_the_rows_the_driver_logged_before_its_node_died(tmp_path, logger):
    """The upload Tune made before the trial's first epoch is empty; the driver's own file has the rows."""
    from types import SimpleNamespace

    import pyarrow.fs

    from tune import search

    name = "result.json" if logger == "KeepDriverResults" else "progress.csv"
    driver, uploaded = tmp_path / "driver", tmp_path / "storage"
    driver.mkdir(), uploaded.mkdir()
    (driver / name).write_text("epoch 1\nepoch 2\n")
    (uploaded / name).write_text("")
    trial = SimpleNamespace(checkpoint=object(), local_path=str(driver), storage=SimpleNamespace(
        trial_fs_path=str(uploaded), storage_filesystem=pyarrow.fs.LocalFileSystem()))
    getattr(search, logger)()._restore_from_remote(name, trial)
    assert (driver / name).read_text() == "epoch 1\nepoch 2\n"

    # A new driver process (resume) has no file of its own: it starts from the upload.
    (driver / name).unlink()
    (uploaded / name).write_text("epoch 1\n")
    getattr(search, logger)()._restore_from_remote(name, trial)
    assert (driver / name).read_text() == "epoch 1\n"
