"""The load side of bench/serve_load.py: a bounded asyncio/httpx load generator that can ask the server
for its hop timings (serve.timing), and server subprocesses started and stopped cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from common import CACHE, ROOT, percentile

from serve import timing


async def load_level(url: str, body: bytes, headers: dict[str, str], conc: int, n: int,
                     limit_s: float, hops: bool = False) -> dict[str, Any]:
    """``n`` requests (fewer if ``limit_s`` passes) from ``conc`` concurrent clients; with ``hops``, each
    asks for Server-Timing and the level reports the median of each hop (serve.timing.HOPS) in ms."""
    import httpx

    lat: list[float] = []
    codes: dict[str, int] = {}
    received: list[int] = []
    breakdowns: list[dict[str, float]] = []
    issued = 0
    deadline = time.perf_counter() + limit_s
    send_headers = {**headers, "X-Gliomaseg-Timing": "1"} if hops else headers

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < n and time.perf_counter() < deadline:
            issued += 1
            t0, sent = time.perf_counter(), time.time()
            try:
                r = await http.post(url, content=body, headers=send_headers)
                codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                    received.append(len(r.content))
                    if hops and "server-timing" in r.headers and "x-timing-window" in r.headers:
                        breakdowns.append(timing.breakdown(r.headers["server-timing"], r.headers["x-timing-window"],
                                                           sent, time.time()))
            except httpx.HTTPError as exc:
                codes[type(exc).__name__] = codes.get(type(exc).__name__, 0) + 1

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(limits=limits, timeout=limit_s + 60, trust_env=False) as http:
        await http.post(url, content=body, headers=headers)  # connection and route warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(conc)))
        wall = time.perf_counter() - start
    ms = [1000 * v for v in lat]
    out = {"concurrency": conc, "ok": len(lat), "issued": issued, "codes": codes, "wall_s": wall,
           "requests_per_s": len(lat) / wall, "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
           "p99_ms": percentile(ms, 99), "request_bytes": len(body),
           "response_bytes": int(np.mean(received)) if received else 0}
    if breakdowns:
        out["hops_ms"] = {k: round(percentile([b[k] for b in breakdowns], 50), 3) for k in (*timing.HOPS, "total")}
        out["hops_ms"]["requests"] = len(breakdowns)
    return out


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5, trust_env=False).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")


@contextlib.contextmanager
def server(cmd: list[str], health: str, timeout: float) -> Iterator[subprocess.Popen]:
    """A server subprocess in its own session; SIGTERM (then SIGKILL) to that session on exit."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    log = open(CACHE / f"server-{Path(cmd[1 if cmd[1] != '-m' else 2]).stem}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(health, proc, timeout)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
