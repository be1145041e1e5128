"""A search stored on S3 (a local moto server): Ray's experiment, checkpoints and the driver's files
land under s3://bucket/prefix/NAME, `--resume` restores from S3 alone, and the report uploads."""

from __future__ import annotations

import csv
import io
import os
import shutil

import pytest
from s3_support import moto_s3
from tune_support import TINY_NET

from tune.search import SearchOptions, run_search

BUCKET, PREFIX, NAME = "gliomaseg-test", "sweeps", "s3run"
SAMPLES = 2
TINY = {**TINY_NET, "oversample": 0.5, "lr": {"loguniform": [1.0e-4, 3.0e-2]}}


@pytest.fixture
def s3(monkeypatch):
    with moto_s3(monkeypatch, BUCKET) as client:
        yield client


def test_the_s3_filesystem_sent_to_workers_carries_no_keys(s3, monkeypatch):
    """It is pickled to every trial worker and into Ray's experiment state: endpoint yes, secrets never."""
    import pickle  # only to see what Ray would serialise; nothing here is read back from a file

    from tune.storage import s3_filesystem

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-not-for-the-gcs")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-not-for-the-gcs")
    fs = s3_filesystem()
    sent = pickle.dumps(fs)
    assert b"s3cret-not-for-the-gcs" not in sent and b"token-not-for-the-gcs" not in sent
    assert os.environ["AWS_ENDPOINT_URL"].split("//")[1].encode() in sent  # the check bites: options travel
    fs.get_file_info(f"{BUCKET}/")  # and it still reaches the bucket, with this node's credentials file


def keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


def read(client, key: str) -> str:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def test_search_on_s3_resumes_from_s3_and_reports(ray_session, prepared_dir, tmp_path, monkeypatch, s3):
    from tune.report import make_report

    monkeypatch.setenv("GLIOMASEG_CACHE", str(tmp_path / "cache-a"))
    opts = dict(data=prepared_dir, name=NAME, storage=f"s3://{BUCKET}/{PREFIX}", num_samples=SAMPLES, max_epochs=2,
                scheduler="none", fixed=dict(TINY), verbose=0)
    info = run_search(SearchOptions(**opts))
    assert info["storage"] == f"s3://{BUCKET}/{PREFIX}/{NAME}"
    run = f"{PREFIX}/{NAME}/"
    stored = keys(s3, run)
    for name in ("optuna.db", "leaderboard.csv", "history.json", "run.json", "best/model.safetensors",
                 "best/config.json", "ray/tuner.pkl"):
        assert name in stored, sorted(stored)
    trial_ids = {k.split("/")[1][len("trial_"):] for k in stored if k.startswith("ray/trial_")}
    assert len(trial_ids) == SAMPLES
    assert any(k.endswith("checkpoint/state.safetensors") for k in stored)
    results_before = {t: read(s3, f"{run}ray/trial_{t}/result.json") for t in trial_ids}
    assert not (tmp_path / "runs").exists()  # nothing of the run outside S3 and the driver's cache

    # Resume on a "different machine": an empty local cache, everything comes back from S3.
    shutil.rmtree(tmp_path / "cache-a")
    info2 = run_search(SearchOptions(**opts, resume=True))
    assert info2["trials"] == SAMPLES
    rows = list(csv.DictReader(io.StringIO(read(s3, f"{run}leaderboard.csv"))))
    assert {r["trial_id"] for r in rows} == trial_ids
    assert all(r["stop_reason"] == "completed" for r in rows)
    for t in trial_ids:  # restored as finished, not re-run
        assert read(s3, f"{run}ray/trial_{t}/result.json") == results_before[t]

    monkeypatch.setenv("GLIOMASEG_CACHE", str(tmp_path / "cache-b"))
    index = make_report(f"s3://{BUCKET}/{PREFIX}/{NAME}")
    assert index.is_file()
    stored = keys(s3, run)
    assert {"report/index.html", "report/learning_curves.png", "report/best_predictions.png"} <= stored
