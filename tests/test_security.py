"""Pins SECURITY.md's guarantees: loopback by default, constant-time token check, no pickle on any
path, output names that cannot leave --out, no patient IDs or image content in INFO logs."""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images
from reliability_support import pickled_blob, pickled_npy
from serve_support import slice_files

from core.formats import codecs

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "correct-horse-battery-staple-1"
TOKEN_ENV = "GLIOMASEG_SECURITY_TOKEN"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("security") / "bundle")


@pytest.fixture(scope="module")
def url(ray_session, bundle) -> Iterator[str]:
    """The app started with start()'s defaults for everything but the port and the token."""
    from ray import serve

    from serve.app import ServeSettings, start
    from serve.demo import free_port

    os.environ[TOKEN_ENV] = TOKEN
    try:
        yield start(ServeSettings(bundle=str(bundle), token_env=TOKEN_ENV), port=free_port(), name="security")
    finally:
        serve.shutdown()
        os.environ.pop(TOKEN_ENV, None)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_loopback_bind_by_default(url: str) -> None:
    import psutil
    from ray import serve

    from serve.app import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["run", "--bundle", "b"]).host == "127.0.0.1"
    assert serve.context._get_global_client().http_config.host == "127.0.0.1"
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening and set(listening) == {"127.0.0.1"}, listening
    # The throughput-optimized Serve gives each ingress replica its own server (direct ingress, ports 30000 and
    # up by default): on the same loopback host, never all interfaces (that is `serve run --haproxy` only).
    replica = [c.laddr.ip for c in psutil.net_connections("tcp")
               if c.status == "LISTEN" and 30000 <= c.laddr.port < 31000]
    assert replica and set(replica) == {"127.0.0.1"}, replica


def test_an_unhealthy_answer_carries_no_exception_text() -> None:
    import asyncio

    import serve.ingress as ingress

    def ping_fails() -> None:
        raise RuntimeError("replica at /secret/bundle/path on 10.1.2.3 died")

    fake_self = types.SimpleNamespace(model=types.SimpleNamespace(ping=types.SimpleNamespace(remote=ping_fails)))
    answer = asyncio.run(ingress.Ingress.func_or_class.healthz(fake_self))
    assert answer.status_code == 503
    assert json.loads(answer.body) == {"error": "unavailable", "detail": "model deployment not ready"}


def test_token_compared_in_constant_time(url: str, monkeypatch) -> None:
    import serve.ingress as ingress

    calls: list[tuple[str, str]] = []
    real = ingress.hmac.compare_digest
    spy = types.SimpleNamespace(compare_digest=lambda a, b: calls.append((a, b)) or real(a, b))
    authorise = ingress.Ingress.func_or_class._authorise
    # @serve.ingress copies the class by cloudpickle: patch the globals the copied method really uses.
    monkeypatch.setitem(authorise.__globals__, "hmac", spy)
    fake_self = types.SimpleNamespace(token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest())
    request = types.SimpleNamespace(headers={"authorization": f"Bearer {TOKEN[:-1]}X"})
    with pytest.raises(Exception, match="bearer token"):
        authorise(fake_self, request)
    assert calls, "the token check does not go through hmac.compare_digest"
    # No == or != on anything token-like anywhere in the ingress source.
    tree = ast.parse((ROOT / "serve" / "ingress.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            assert "token" not in ast.unparse(node).lower(), ast.unparse(node)

    body = codecs.encode_png(sample_images(1)[0])
    wrong = {"Authorization": f"Bearer {TOKEN[:-1]}X"}  # same length, last character differs
    for headers in (wrong, {}, {"Authorization": TOKEN}):
        r = httpx.post(f"{url}/v1/segment", content=body, headers={"Content-Type": "image/png", **headers})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = httpx.post(f"{url}/v1/segment", content=body, headers={"Content-Type": "image/png", **AUTH})
    assert r.status_code == 200


# ------------------------------------------------------------------------------------- no pickle

PICKLE_MODULES = {"pickle", "cPickle", "cloudpickle", "joblib", "dill", "shelve", "marshal", "ray.cloudpickle"}


def _sources() -> list[Path]:
    return sorted(p for pkg in ("core", "serve", "tune") for p in (ROOT / pkg).rglob("*.py"))


def _kw(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return "<missing>"


def test_no_pickle_anywhere_in_the_source() -> None:
    problems: list[str] = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                names += [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
                bad = [n for n in names if n in PICKLE_MODULES or n.split(".")[0] in PICKLE_MODULES]
                if bad:
                    problems.append(f"{where}:{node.lineno} imports {bad}")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = ast.unparse(node.func.value)
            attr = node.func.attr
            if attr == "load" and owner in ("np", "numpy") and _kw(node, "allow_pickle") is not False:
                problems.append(f"{where}:{node.lineno} np.load without allow_pickle=False")
            if attr == "load" and owner == "torch" and _kw(node, "weights_only") is not True:
                problems.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            if attr in ("read_pickle", "loads") and owner in ("pd", "pandas", "pickle"):
                problems.append(f"{where}:{node.lineno} {owner}.{attr}")
            if _kw(node, "allow_pickle") is True:
                problems.append(f"{where}:{node.lineno} allow_pickle=True")
    assert len(_sources()) > 20 and not problems, problems


def test_pickled_inputs_are_refused_without_unpickling(url: str, bundle: Path, tmp_path: Path) -> None:
    import shutil

    from core.inference.predictor import Predictor
    from core.training.checkpoint import read_checkpoint

    marker = tmp_path / "unpickled"
    r = httpx.post(f"{url}/v1/segment", content=pickled_npy(marker),
                   headers={"Content-Type": "application/x-npy", **AUTH})
    assert r.status_code == 422 and "object" in r.json()["detail"]
    with pytest.raises(codecs.DecodeError):
        codecs.decode(pickled_npy(marker), "application/octet-stream", volume=True)
    with pytest.raises(ValueError):
        np.load(io.BytesIO(pickled_npy(marker)), allow_pickle=False)
    # A bundle or checkpoint whose weights file is a pickle (what torch.save writes) fails to load.
    evil = tmp_path / "bundle"
    shutil.copytree(bundle, evil)
    (evil / "model.safetensors").write_bytes(pickled_blob(marker))
    with pytest.raises(Exception) as info:
        Predictor.from_bundle(evil, device="cpu")
    assert "pickle" not in type(info.value).__module__
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.safetensors").write_bytes(pickled_blob(marker))
    (ckpt / "state.json").write_text('{"format": "gliomaseg-checkpoint/1"}')
    with pytest.raises(Exception):  # noqa: B017 (safetensors raises its own error type)
        read_checkpoint(ckpt)
    assert not marker.exists(), "something unpickled an untrusted file"
    # The payloads are live: unpickled in a fresh process (np.load with allow_pickle=True, pickle.loads),
    # each creates its marker, so the refusals above are what kept ``marker`` from existing.
    live = {"npy": tmp_path / "live_npy", "blob": tmp_path / "live_blob"}
    (tmp_path / "live.npy").write_bytes(pickled_npy(live["npy"]))
    (tmp_path / "live.pkl").write_bytes(pickled_blob(live["blob"]))
    script = ("import pickle, sys, numpy as np; np.load(sys.argv[1], allow_pickle=True); "
              "pickle.loads(open(sys.argv[2], 'rb').read())")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "live.npy"), str(tmp_path / "live.pkl")],
                   check=True, cwd=tmp_path, timeout=60)
    assert all(p.is_file() for p in live.values()), live


# ------------------------------------------------------------------------------------- output names

EVIL_NAMES = ["..\\..\\evil.tif", "...tif", "..;x.tif", " ~.tif", "a b\x7f.tif"]


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_output_names_stay_inside_out(url: str, bundle: Path, synth_src: Path, tmp_path: Path) -> None:
    from core.inference.jobs import safe_name as core_safe
    from core.inference.predict import run as core_predict
    from core.inference.predictor import Predictor
    from serve.client import predict_paths
    from serve.client import safe_name as client_safe

    for safe in (core_safe, client_safe):
        for name in ("../../x.tif", "/etc/passwd", "..", "a/../../b", "C:\\x\\..\\y", ".hidden"):
            cleaned = safe(name)
            assert cleaned and "/" not in cleaned and "\\" not in cleaned and not cleaned.startswith(".")
    source = slice_files(synth_src)[0].read_bytes()
    inputs = tmp_path / "in"
    patient = inputs / "..\\..\\patient"
    patient.mkdir(parents=True)
    for k, name in enumerate(EVIL_NAMES, 1):  # one slice number each: a patient's slices need an order
        (inputs / name).write_bytes(source)
        (patient / name.replace(".tif", f"_{k}.tif")).write_bytes(source)
    files = [inputs / n for n in EVIL_NAMES] + [inputs / "x" / ".." / EVIL_NAMES[0]]
    (inputs / "x").mkdir()
    before = _tree(tmp_path)
    out_client, out_core = tmp_path / "a" / "b" / "client", tmp_path / "a" / "b" / "core"
    summary = predict_paths([*files, patient], out_client, url=url, token=TOKEN, concurrency=2)
    assert all("error" not in s for s in summary), summary
    core_predict(Predictor.from_bundle(bundle, device="cpu"), [*files, patient], out_core)
    created = _tree(tmp_path) - before
    outside = [p for p in created if not (p.is_relative_to(out_client) or p.is_relative_to(out_core))
               and p not in (tmp_path / "a", tmp_path / "a" / "b")]
    assert not outside, outside
    written = [p for p in created if p.is_file()]
    assert len(written) > 2 * len(files)
    assert all(not p.name.startswith(".") and "\\" not in p.name for p in written)


# ------------------------------------------------------------------------------------- logs

def test_no_patient_ids_or_image_content_in_info_logs(url: str, synth_src: Path, tmp_path: Path, caplog,
                                                      capfd) -> None:
    import ray

    from core.data.prepare import SplitOptions, prepare
    from serve.client import predict_paths

    patients = sorted(d.name for d in synth_src.iterdir() if d.is_dir())
    ids = {p.rsplit("_", 1)[0] if p.count("_") == 3 else p for p in patients} | set(patients)
    assert all(i.startswith("TCGA_") for i in ids)
    caplog.set_level(logging.INFO)
    prepare(synth_src, tmp_path / "prepared", SplitOptions(val=2, test=2, seed=0), progress=True)
    image = slice_files(synth_src, 1)[0]
    body = image.read_bytes()
    r = httpx.post(f"{url}/v1/segment", content=body, headers={"Content-Type": "image/tiff", **AUTH},
                   params={"format": "json", "overlay": "true"})
    assert r.status_code == 200
    predict_paths([synth_src / patients[2], image], tmp_path / "out", url=url, token=TOKEN)

    captured = capfd.readouterr()
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    serve_logs = "\n".join(p.read_text(errors="replace") for p in (logs_dir / "serve").glob("*.log"))
    assert "POST" in serve_logs or "/v1/segment" in serve_logs  # the request was logged: the check bites
    texts = {"python logging": caplog.text, "stderr": captured.err, "serve logs": serve_logs}
    pixels = base64.b64encode(body[200:260]).decode()
    for source, text in texts.items():
        for pid in ids:
            assert pid not in text, f"patient id {pid} in {source}"
        assert pixels not in text and "data:image/png;base64" not in text, f"image content in {source}"
        assert TOKEN not in text, f"the bearer token in {source}"
