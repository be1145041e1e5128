"""GPU placement proven without a GPU: a local Ray cluster that declares 2 GPUs it does not have.

``python -m tune run --gpus-per-trial 0.25`` runs four trials at once per declared GPU, each seeing its
own GPU in CUDA_VISIBLE_DEVICES; ``--gpus-per-trial`` above the cluster's GPUs is a clear error; four
Serve replicas at ``--gpus-per-replica 0.5`` sit two per GPU. None of them crashes for want of CUDA:
each says in its log that it was given a GPU and runs on the CPU.

The cluster runs in its own process (``python tests/test_gpu_placement.py PREPARED OUT``), as the
session's Ray (tests/conftest.py) declares no GPUs. Inside it every trial goes through a hook around
tune's train_trial that records, from inside the trial, its CUDA_VISIBLE_DEVICES, Ray's GPU ids and
timestamps, and holds the trial until eight have started: on a loaded 2-core machine workers start
seconds apart, and a 1-epoch trial could end before the eighth begins, which would prove nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

GPUS, CPUS = 2, 8
PER_TRIAL, PER_REPLICA = 0.25, 0.5
CONCURRENT = int(GPUS / PER_TRIAL)  # 8 trials at once: 4 per declared GPU
SAMPLES = CONCURRENT + 1  # one more must wait for a free quarter GPU
BARRIER_S = 150.0  # how long a trial waits for the other seven to start
TRACE_ENV = "GLIOMASEG_GPU_TRACE"
WARNING_TEXT = "CUDA is not available"


# ---- unit: resolve_device ------------------------------------------------------------------------------
@pytest.mark.parametrize("visible", [None, "", "-1"])
def test_auto_without_an_assigned_gpu_is_cpu_and_quiet(monkeypatch, caplog, visible):
    from core.runtime import resolve_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with caplog.at_level(logging.WARNING, logger="core.runtime"):
        assert resolve_device("auto").type == "cpu"
    assert not caplog.records


def test_auto_given_a_gpu_without_cuda_warns_and_runs_on_cpu(monkeypatch, caplog):
    from core.runtime import resolve_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with caplog.at_level(logging.WARNING, logger="core.runtime"):
        assert resolve_device("auto").type == "cpu"
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "CUDA_VISIBLE_DEVICES=1" in record.getMessage() and "on the CPU" in record.getMessage()
    # An explicit cuda request is still the user's error to fix, not a fallback.
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_trainer_given_a_gpu_without_cuda_says_so(prepared_dir, monkeypatch, caplog):
    from core.config import TrainConfig
    from core.training.trainer import Trainer

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cfg = TrainConfig(arch="lite", filters=8, epochs=1, batch_size=8, device="auto")
    with caplog.at_level(logging.WARNING, logger="core.runtime"):
        trainer = Trainer.from_prepared(cfg, prepared_dir)
    assert trainer.device.type == "cpu"
    assert any("CUDA_VISIBLE_DEVICES=0" in r.getMessage() for r in caplog.records), caplog.text


# ---- the declared-GPU cluster (a subprocess) -----------------------------------------------------------
@pytest.fixture(scope="module")
def placement(prepared_dir, tmp_path_factory) -> dict[str, Any]:
    from tune_support import ROOT, driver_env

    out = tmp_path_factory.mktemp("gpu_placement")
    env = driver_env(None)  # its own cluster, not the session's
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(prepared_dir), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])


def overlap(rows: list[dict[str, Any]]) -> int:
    """Most trials inside train_trial at one instant (an end before a start at the same time)."""
    events = sorted([(r["start"], 1) for r in rows] + [(r["end"], -1) for r in rows], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.slow
@pytest.mark.timeout(1000)  # the cluster's ~20 worker processes start slowly on a loaded 2-core machine
def test_quarter_gpu_trials_run_four_at_once_per_declared_gpu(placement):
    run, trials = placement["tune"]["run"], placement["tune"]["trials"]
    assert placement["cluster"]["GPU"] == GPUS
    assert run["status"] == "finished" and run["stop_reasons"] == {"completed": SAMPLES}, run
    assert run["gpus_per_trial"] == PER_TRIAL
    assert len(trials) == SAMPLES
    for t in trials:
        # Each trial sees exactly its own GPU, and CUDA_VISIBLE_DEVICES agrees with Ray's assignment.
        assert len(t["gpu_ids"]) == 1 and t["cuda_visible_devices"] == t["gpu_ids"][0], t
    first = sorted(trials, key=lambda t: t["start"])[:CONCURRENT]
    assert Counter(t["cuda_visible_devices"] for t in first) == {"0": 4, "1": 4}, first
    assert all(t["released"] - t["start"] < BARRIER_S for t in first), "eight trials never ran at once"
    assert overlap(trials) == CONCURRENT
    for gpu in ("0", "1"):
        # Never more than four quarter-GPU trials on one GPU: the ninth trial waited for a slot.
        assert overlap([t for t in trials if t["cuda_visible_devices"] == gpu]) == 4


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_trial_given_a_gpu_without_cuda_warns_and_trains_on_cpu(placement):
    for t in placement["tune"]["trials"]:
        assert any(f"CUDA_VISIBLE_DEVICES={t['cuda_visible_devices']}," in w and "on the CPU" in w
                   for w in t["warnings"]), t


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_gpus_per_trial_above_the_cluster_is_a_clear_error(placement):
    error = placement["tune"]["too_many"]
    assert error["rc"] == 2, error
    assert "error: --gpus-per-trial 3.0: the Ray cluster has 2.0 GPU(s)" in error["stderr"], error


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_half_gpu_replicas_sit_two_per_declared_gpu(placement):
    serve = placement["serve"]
    assert serve["gpus_per_replica"] == PER_REPLICA
    replicas = serve["replicas"]
    assert len(replicas) == 4, serve
    for r in replicas:
        assert len(r["gpu_ids"]) == 1 and r["cuda_visible_devices"] == r["gpu_ids"][0], r
    assert Counter(r["cuda_visible_devices"] for r in replicas) == {"0": 2, "1": 2}, replicas
    assert serve["available_gpu"] == 0  # the four halves fill both GPUs
    # Served on the CPU, without crashing, and each replica said why in its log.
    assert serve["device"] == "cpu" and serve["segment_status"] == 200, serve
    assert all(r["warned"] for r in replicas), replicas


# ---- what runs inside the cluster's process --------------------------------------------------------------
def traced_trial(config: dict[str, Any], train: Any, val: Any, split_info: dict[str, Any],
                 wandb: dict[str, Any] | None = None) -> None:
    """tune's train_trial, recording from inside the trial where Ray put it and when it ran."""
    import ray
    from ray import tune as ray_tune

    from tune.trainable import train_trial

    trace = Path(os.environ[TRACE_ENV])
    trial = ray_tune.get_context().get_trial_id()
    row: dict[str, Any] = {
        "trial": trial, "pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "start": time.time(),
    }
    (trace / f"{trial}.start").write_text("")
    deadline = time.monotonic() + BARRIER_S
    while len(list(trace.glob("*.start"))) < CONCURRENT and time.monotonic() < deadline:
        time.sleep(0.1)
    row["released"] = time.time()
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("core.runtime")
    logger.addHandler(handler)
    try:
        train_trial(config, train, val, split_info, wandb)
    finally:
        logger.removeHandler(handler)
        row.update(end=time.time(), warnings=records)
        (trace / f"{trial}.json").write_text(json.dumps(row))


def run_tune(prepared: str, out: Path) -> dict[str, Any]:
    """`python -m tune run --gpus-per-trial 0.25` (the CLI, in this process) with traced trials."""
    import tune.search
    from core.cli import dispatch

    trace = Path(os.environ[TRACE_ENV])
    tune.search.train_trial = traced_trial  # run_search looks the trainable up here
    fixed = {"arch": "lite", "filters": 8, "batch_size": 8, "dropout": 0.0, "lr": 0.01, "lambda_focal": 1.0,
             "patience": 0, "warmup_epochs": 0, "tta": "none"}
    common = ["run", "--data", prepared, "--storage", str(out), "--max-epochs", "1", "--scheduler", "none",
              "--search", "random", "--quiet",
              "--max-failures", "0", *[a for k, v in fixed.items() for a in ("--set", f"{k}={v}")]]
    rc = dispatch("python -m tune", "", ("tune.search",), [*common, "--name", "quarter", "--gpus-per-trial",
                                                          str(PER_TRIAL), "--num-samples", str(SAMPLES)])
    assert rc == 0, rc
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        too_many = dispatch("python -m tune", "", ("tune.search",), [*common, "--name", "too-many",
                                                                     "--gpus-per-trial", "3", "--num-samples", "1"])
    run = json.loads((out / "quarter" / "run.json").read_text())
    return {
        "run": {k: run[k] for k in ("status", "trials", "stop_reasons", "gpus_per_trial")},
        "trials": [json.loads(p.read_text()) for p in sorted(trace.glob("*.json"))],
        "too_many": {"rc": too_many, "stderr": stderr.getvalue()},
    }


def _warned(pid: int, replica: str) -> bool:
    """Whether the replica (worker process ``pid``) wrote resolve_device's warning to its stderr log or, where
    Serve keeps replica logs out of stderr (its high-throughput mode), to its own Serve log."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [*logs.glob(f"worker-*-{pid}.err"), *(logs / "serve").glob(f"replica_*_{replica}.log")]
    return any(WARNING_TEXT in p.read_text(errors="replace") for p in files)


def run_serve(out: Path) -> dict[str, Any]:
    """Four replicas at half a GPU each, started as `python -m serve run` starts them."""
    import httpx
    import numpy as np
    import ray
    from bundle_factory import make_random_bundle
    from ray import serve

    from serve.app import APP_NAME, ServeSettings, resolve_resources, start
    from serve.demo import free_port

    bundle = make_random_bundle(out / "bundle")
    settings = resolve_resources(ServeSettings(bundle=str(bundle), replicas="4"), PER_REPLICA)
    url = start(settings, "127.0.0.1", free_port(), timeout_s=300)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # /healthz needs one replica; wait for all four
        states = serve.status().applications[APP_NAME].deployments["SegmentModel"].replica_states
        if states.get("RUNNING") == 4:
            break
        time.sleep(1)
    replicas = []
    for actor in ray.util.list_named_actors(all_namespaces=True):  # from the GCS: no dashboard needed
        if "SegmentModel" not in actor["name"]:
            continue
        handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
        # __ray_call__ runs a function inside the replica's own process: what it sees, not what Ray says.
        pid, env, gpus = ray.get(handle.__ray_call__.remote(lambda _: (
            os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), [str(g) for g in ray.get_gpu_ids()])))
        replicas.append({"pid": pid, "cuda_visible_devices": env, "gpu_ids": gpus,
                         "warned": _warned(pid, actor["name"].rsplit("#", 1)[-1])})
    image = np.zeros((64, 64, 3), np.uint8)
    buf = io.BytesIO()
    np.save(buf, image)
    response = httpx.post(f"{url}/v1/segment?format=npy", content=buf.getvalue(),
                          headers={"Content-Type": "application/x-npy"}, timeout=60)
    info = httpx.get(f"{url}/v1/model", timeout=30).json()
    result = {
        "gpus_per_replica": settings.gpus_per_replica, "replicas": replicas, "device": info["device"],
        "segment_status": response.status_code, "available_gpu": ray.available_resources().get("GPU", 0.0),
    }
    serve.shutdown()
    return result


def main(prepared: str, out: str) -> None:
    import ray

    trace = Path(out) / "trace"
    trace.mkdir()
    os.environ[TRACE_ENV] = str(trace)  # before ray.init: every Ray worker inherits it, trials read it
    # address="local": a new cluster even where `ray start` left one for ray.init() to join.
    ray.init(address="local", num_gpus=GPUS, num_cpus=CPUS, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    result: dict[str, Any] = {"cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}}
    result["tune"] = run_tune(prepared, Path(out))
    result["serve"] = run_serve(Path(out))
    print("RESULT" + json.dumps(result), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    main(sys.argv[1], sys.argv[2])
