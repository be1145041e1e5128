"""Bundles at s3:// URIs (a local moto server): fetched once per node into a content-keyed cache, every
file checked against the sha256 config.json records, loaded by the Predictor, `python -m core predict`
and a Serve replica on a second node that has no local copy."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images
from s3_support import moto_s3
from tune_support import ROOT, driver_env

from core.bundle import load_bundle
from core.bundle.files import read_config, resolve_bundle
from core.inference.predictor import Predictor
from serve.demo import free_port

BUCKET = "gliomaseg-bundles"


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """A moto S3 server on loopback; AWS_ENDPOINT_URL and test keys in the environment; a fresh cache."""
    with moto_s3(monkeypatch, BUCKET, GLIOMASEG_BUNDLE_CACHE=str(tmp_path / "cache")) as client:
        yield client


@pytest.fixture(scope="module")
def local_bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "b", seed=3)


def upload(client, bundle: Path, prefix: str) -> str:
    for path in sorted(bundle.iterdir()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    return f"s3://{BUCKET}/{prefix}"


def counting_client(endpoint: str) -> tuple[object, dict[str, int]]:
    """An S3 client that counts the GetObject calls it makes (downloads of file contents)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    calls = {"GetObject": 0}

    def count(**_: object) -> None:
        calls["GetObject"] += 1

    client.meta.events.register("before-call.s3.GetObject", count)
    return client, calls


def test_save_records_hashes_and_local_load_checks_them(local_bundle, tmp_path, caplog):
    import shutil

    config = json.loads((local_bundle / "config.json").read_text())
    assert set(config["files"]) == {"model.safetensors", "metrics.json"}
    for name, digest in config["files"].items():
        assert hashlib.sha256((local_bundle / name).read_bytes()).hexdigest() == digest
    copy = tmp_path / "copy"
    shutil.copytree(local_bundle, copy)
    (copy / "metrics.json").write_text('{"dsc_volume": 0.99}')  # a "better" score pasted in by hand
    with pytest.raises(ValueError, match=r"metrics\.json: sha256 .* does not match"):
        load_bundle(copy)
    (copy / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"metrics\.json: missing"):
        load_bundle(copy)
    # A bundle written before hashes were recorded still loads, with a note saying it is unchecked.
    shutil.copy(local_bundle / "metrics.json", copy / "metrics.json")
    config.pop("files")
    (copy / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="core.bundle"):
        assert load_bundle(copy).version == config["version"]
    assert "no file hashes" in caplog.text


def test_predictor_loads_from_s3_once_per_node(s3, local_bundle, tmp_path):
    uri = upload(s3, local_bundle, "models/b1")
    images = sample_images(4, seed=5)
    expected = Predictor.from_bundle(local_bundle, "cpu").predict(images, volume=True)
    remote = Predictor.from_bundle(uri, "cpu")
    assert np.array_equal(remote.predict(images, volume=True), expected)
    assert remote.version == read_config(local_bundle)["version"] == read_config(uri)["version"]
    cached = [d for d in (tmp_path / "cache").iterdir() if not d.name.startswith(".")]
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    assert cached[0].name == hashlib.sha256((local_bundle / "config.json").read_bytes()).hexdigest()

    # A second load on this node reuses the verified copy: config.json is the only object read.
    client, calls = counting_client(os.environ["AWS_ENDPOINT_URL"])
    weights = cached[0] / "model.safetensors"
    before = weights.stat()
    assert resolve_bundle(uri, client=client) == cached[0]
    assert calls["GetObject"] == 1
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # A fresh node (empty cache) downloads every file once.
    client, calls = counting_client(os.environ["AWS_ENDPOINT_URL"])
    fresh = resolve_bundle(uri, cache_dir=tmp_path / "other-node", client=client)
    assert calls["GetObject"] == 3 and sorted(p.name for p in fresh.iterdir()) == sorted(
        p.name for p in local_bundle.iterdir())

    # A cached copy damaged on disk is noticed and fetched again, not served.
    weights.write_bytes(b"\0" * 16)
    assert resolve_bundle(uri) == cached[0]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == read_config(uri)["files"]["model.safetensors"]


def test_tampered_missing_and_unsafe_remote_files_are_errors_naming_the_file(s3, local_bundle, tmp_path):
    uri = upload(s3, local_bundle, "models/tampered")
    s3.put_object(Bucket=BUCKET, Key="models/tampered/model.safetensors", Body=b"not the weights")
    with pytest.raises(ValueError, match=r"s3://gliomaseg-bundles/models/tampered/model\.safetensors: sha256"):
        Predictor.from_bundle(uri, "cpu")
    uri = upload(s3, local_bundle, "models/missing")
    s3.delete_object(Bucket=BUCKET, Key="models/missing/metrics.json")
    with pytest.raises(FileNotFoundError, match=r"s3://gliomaseg-bundles/models/missing/metrics\.json: missing"):
        load_bundle(uri)
    with pytest.raises(FileNotFoundError, match=r"models/nothing/config\.json"):
        load_bundle(f"s3://{BUCKET}/models/nothing")
    # Nothing half-fetched stays in the cache.
    assert not [d for d in (tmp_path / "cache").iterdir() if not d.name.startswith(".")]
    assert not [d for d in (tmp_path / "cache").iterdir() if ".tmp-" in d.name]

    # A crafted config.json cannot make the download write outside the cache.
    config = json.loads((local_bundle / "config.json").read_text())
    config["files"]["../../escaped.bin"] = "0" * 64
    s3.put_object(Bucket=BUCKET, Key="models/evil/config.json", Body=json.dumps(config).encode())
    with pytest.raises(ValueError, match="not a plain relative path"):
        resolve_bundle(f"s3://{BUCKET}/models/evil")
    assert not (tmp_path / "escaped.bin").exists()


def test_core_predict_cli_reads_an_s3_bundle(s3, local_bundle, tmp_path):
    import tifffile

    from core.inference.predict import run

    uri = upload(s3, local_bundle, "models/cli")
    image = tmp_path / "slice.tif"
    tifffile.imwrite(image, sample_images(1, seed=7)[0])
    env = driver_env(None)
    cmd = [sys.executable, "-m", "core", "predict", "--bundle", uri, "--device", "cpu", str(image)]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run(Predictor.from_bundle(local_bundle, "cpu"), [image], tmp_path / "expected")
    assert (tmp_path / "out" / "slice_mask.png").read_bytes() == (tmp_path / "expected" / "slice_mask.png").read_bytes()

    s3.put_object(Bucket=BUCKET, Key="models/cli/metrics.json", Body=b'{"dsc_volume": 1.0}')
    env["GLIOMASEG_BUNDLE_CACHE"] = str(tmp_path / "cache-2")  # not the copy fetched above
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "out2")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: s3://gliomaseg-bundles/models/cli/metrics.json: sha256" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_sagemaker_archives_an_s3_bundle(s3, local_bundle, tmp_path):
    import tarfile

    from serve.sagemaker.export import build_archive

    uri = upload(s3, local_bundle, "models/export")
    out = build_archive(uri, tmp_path / "model.tar.gz")
    with tarfile.open(out) as tar:
        for name in ("model.safetensors", "config.json", "metrics.json"):
            assert tar.extractfile(name).read() == (local_bundle / name).read_bytes(), name


@pytest.mark.slow
def test_serve_replica_on_another_node_fetches_the_bundle_itself(s3, local_bundle, tmp_path):
    """Two nodes; the model replica fits only on the worker, whose cache is empty: it fetches from S3."""
    uri = upload(s3, local_bundle, "models/served")
    image = sample_images(1, seed=11)[0]
    buf = io.BytesIO()
    np.save(buf, image, allow_pickle=False)
    (tmp_path / "slice.npy").write_bytes(buf.getvalue())
    head_cache, worker_cache = tmp_path / "head-cache", tmp_path / "worker-cache"
    env = {**driver_env(None), "GLIOMASEG_BUNDLE_CACHE": str(head_cache)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "s3_bundle_scenario.py"), uri, str(tmp_path / "slice.npy"),
         str(worker_cache), str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    expected = Predictor.from_bundle(local_bundle, "cpu").predict(image[None])[0]
    assert out["shape"] == list(expected.shape) and out["tumour_pixels"] == int(np.count_nonzero(expected))
    assert out["sha256"] == hashlib.sha256(np.ascontiguousarray(expected).tobytes()).hexdigest()
    assert out["version"] == read_config(local_bundle)["version"]
    key = hashlib.sha256((local_bundle / "config.json").read_bytes()).hexdigest()
    assert (worker_cache / key / "model.safetensors").is_file()  # fetched on the worker node
    assert not (head_cache / key).exists()  # the driver and head node never fetched the weights
