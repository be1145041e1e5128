"""Serving under load on loopback: `python -m serve run` against the in-process Predictor and a JSON endpoint.

A bounded asyncio/httpx load generator (a fixed number of requests per level, and a time limit) drives
/v1/segment (NPY slices; PNG at a few levels) and /v1/segment/volume at each concurrency. The bound is
the in-process batched Predictor on the same bundle, measured in the same run before the server starts
and after it stops. The earlier endpoints' style (the AWS sample's ``predictor.predict(x.tolist())``)
is a minimal FastAPI app in a subprocess taking ``{"inputs": [[...]]}`` float lists and answering a JSON
mask: bytes per request and latency, beside the binary API's.

    python bench/serve_load.py                                      # CPU: lite f16, 256 px, random weights
    python bench/serve_load.py --device cuda --arch unet --filters 32 --requests 512
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    CACHE,
    ROOT,
    LoadSampler,
    add_model_options,
    add_threads_option,
    fmt,
    percentile,
    publish,
    random_bundle,
    resolve_threads,
    row,
    timed_repeats,
)

from core.formats.codecs import encode_npy, encode_png
from serve.demo import free_port


def bound(args: argparse.Namespace, bundle: Path, slices: np.ndarray) -> dict[str, float]:
    """In-process Predictor: slices/s at batch 32 (all threads and 1 thread) and one-slice latency."""
    import torch

    from core.inference.predictor import Predictor

    pred = Predictor.from_bundle(bundle, device=args.device, batch_size=32)
    batch = np.concatenate([slices] * (32 // len(slices) + 1))[:32]
    pred.predict(batch)
    out: dict[str, float] = {}
    default = torch.get_num_threads()
    threads = args.threads or default
    for n in sorted({default, threads}):
        torch.set_num_threads(n)
        t = timed_repeats(lambda: pred.predict(batch), 2, 5, 3.0, args.device)
        out[f"slices_per_s_threads{n}"] = 32 / float(np.median(t))
    torch.set_num_threads(threads)
    one = timed_repeats(lambda: pred.predict(slices[:1]), 5, 30, 2.0, args.device)
    out["one_slice_p50_ms"] = 1000 * float(np.median(one))
    vol = slices[: args.volume_slices]
    t = timed_repeats(lambda: pred.predict(vol, volume=True), 2, 5, 2.0, args.device)
    out["volume_slices_per_s"] = len(vol) / float(np.median(t))
    out["threads"], out["default_threads"] = threads, default
    torch.set_num_threads(default)
    return out


async def load_level(url: str, body: bytes, headers: dict[str, str], conc: int, n: int,
                     limit_s: float) -> dict[str, Any]:
    """``n`` requests (fewer if ``limit_s`` passes) from ``conc`` concurrent clients."""
    import httpx

    lat: list[float] = []
    codes: dict[str, int] = {}
    received: list[int] = []
    issued = 0
    deadline = time.perf_counter() + limit_s

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < n and time.perf_counter() < deadline:
            issued += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(url, content=body, headers=headers)
                codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                    received.append(len(r.content))
            except httpx.HTTPError as exc:
                codes[type(exc).__name__] = codes.get(type(exc).__name__, 0) + 1

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(limits=limits, timeout=limit_s + 60, trust_env=False) as http:
        await http.post(url, content=body, headers=headers)  # connection and route warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(conc)))
        wall = time.perf_counter() - start
    ms = [1000 * v for v in lat]
    return {"concurrency": conc, "ok": len(lat), "issued": issued, "codes": codes, "wall_s": wall,
            "requests_per_s": len(lat) / wall, "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99), "request_bytes": len(body),
            "response_bytes": int(np.mean(received)) if received else 0}


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    load = LoadSampler()
    from tests.bundle_factory import sample_images

    bundle = random_bundle("bundle", args.arch, args.filters, args.size)
    slices = sample_images(max(16, args.volume_slices), args.size, args.size, seed=1)
    before = bound(args, bundle, slices)
    load.mark("bound before")
    levels = [int(c) for c in args.concurrency.split(",")]
    one, vol = slices[0], slices[: args.volume_slices]
    bodies = {
        "slice_npy": ("/v1/segment?format=npy", encode_npy(one), "application/x-npy", levels),
        "slice_png": ("/v1/segment?format=png", encode_png(one), "image/png", [1, 32]),
        "volume_npy": ("/v1/segment/volume?format=npy", encode_npy(vol), "application/x-npy", levels),
    }
    serve_port = free_port()
    base = f"http://127.0.0.1:{serve_port}"
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in bodies}
    cmd = [sys.executable, "-m", "serve", "run", "--bundle", str(bundle), "--port", str(serve_port),
           "--max-batch-size", "32", "--batch-wait-ms", str(args.batch_wait_ms)]
    started = time.perf_counter()
    with server(cmd, f"{base}/healthz", args.startup_timeout):
        startup = time.perf_counter() - started
        load.mark("serve up")
        for name, (path, body, ctype, conc_levels) in bodies.items():
            for conc in conc_levels:
                n = (max(args.requests // args.volume_slices, conc) if "volume" in name
                     else max(args.requests, 2 * conc))
                res = asyncio.run(load_level(base + path, body, {"content-type": ctype}, conc, n, args.level_s))
                results[name].append(res)
                load.mark(f"{name} c={conc}")
                print(f"{name} c={conc}: {res['requests_per_s']:.1f} req/s p50 {res['p50_ms']:.0f} ms "
                      f"codes {res['codes']}", flush=True)
    after = bound(args, bundle, slices)
    load.mark("bound after")
    json_port = free_port()
    x = (slices[:1].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    json_body = ('{"inputs": ' + str(x.tolist()) + "}").encode()
    jcmd = [sys.executable, str(Path(__file__).with_name("json_endpoint.py")), "--bundle", str(bundle),
            "--port", str(json_port), "--device", args.device, "--threads", str(args.threads)]
    json_results = []
    with server(jcmd, f"http://127.0.0.1:{json_port}/ping", args.startup_timeout):
        for conc in (1, 8):
            res = asyncio.run(load_level(f"http://127.0.0.1:{json_port}/invocations", json_body,
                                         {"content-type": "application/json"}, conc, max(8, 2 * conc), args.level_s))
            json_results.append(res)
            load.mark(f"json c={conc}")
            print(f"json c={conc}: {res['requests_per_s']:.1f} req/s p50 {res['p50_ms']:.0f} ms", flush=True)
    return summarise(args, before, after, results, json_results, startup, load)


def summarise(args: argparse.Namespace, before: dict[str, float], after: dict[str, float],
              results: dict[str, list[dict[str, Any]]], json_results: list[dict[str, Any]], startup: float,
              load: LoadSampler) -> dict[str, Any]:
    threads, default = int(before["threads"]), int(before["default_threads"])
    bound_sps = (before[f"slices_per_s_threads{threads}"] + after[f"slices_per_s_threads{threads}"]) / 2
    bound_all = (before[f"slices_per_s_threads{default}"] + after[f"slices_per_s_threads{default}"]) / 2
    one_ms = (before["one_slice_p50_ms"] + after["one_slice_p50_ms"]) / 2
    vol_sps = (before["volume_slices_per_s"] + after["volume_slices_per_s"]) / 2
    by = {name: {r["concurrency"]: r for r in rs} for name, rs in results.items()}
    for r in results["slice_npy"] + results["slice_png"]:
        r["share_of_bound"] = r["requests_per_s"] / bound_sps
    for r in results["volume_npy"]:
        r["slices_per_s"] = r["requests_per_s"] * args.volume_slices
        r["share_of_bound"] = r["slices_per_s"] / vol_sps
    c32 = by["slice_npy"].get(32, {})
    share32 = c32.get("share_of_bound", float("nan"))
    overhead = by["slice_npy"][1]["p50_ms"] - one_ms if 1 in by["slice_npy"] else float("nan")
    j1 = json_results[0]
    s1 = by["slice_npy"].get(1, {})
    limits = (f"CPU: {os.cpu_count()} cores shared by the load generator, Serve's proxy, ingress and replica, "
              f"and other jobs; the bound is the Predictor at {threads} thread(s) like the 1-CPU replica "
              f"({fmt(bound_sps)} slices/s; {fmt(bound_all)} at torch's default {default})")
    return {
        "settings": vars(args),
        "serve_startup_s": startup,
        "bound": {"before": before, "after": after, "slices_per_s": bound_sps, "one_slice_p50_ms": one_ms,
                  "slices_per_s_default_threads": bound_all, "volume_slices_per_s": vol_sps},
        "serve": results,
        "json_endpoint": json_results,
        "load": load.summary(),
        "target": {"share_of_bound_at_32_min": 0.8, "p50_overhead_ms_at_1_max": 15.0},
        "met": {"share_of_bound_at_32": share32 >= 0.8, "p50_overhead_at_1": overhead <= 15.0},
        "summary": [
            row("/v1/segment throughput at concurrency 32, share of in-process bound", ">= 80%",
                f"{100 * share32:.0f}% ({fmt(c32.get('requests_per_s', float('nan')))} req/s vs "
                f"{fmt(bound_sps)} slices/s; p50/p95/p99 {fmt(c32.get('p50_ms', 0))}/{fmt(c32.get('p95_ms', 0))}/"
                f"{fmt(c32.get('p99_ms', 0))} ms)", share32 >= 0.8, limits),
            row("/v1/segment p50 overhead at concurrency 1", "<= 15 ms",
                f"{fmt(overhead)} ms (p50 {fmt(s1.get('p50_ms', 0))} ms vs in-process {fmt(one_ms)} ms)",
                overhead <= 15.0, f"the batch wait ({args.batch_wait_ms:g} ms, @serve.batch waiting for company), "
                "HTTP proxy -> ingress -> replica hops and NPY decode/encode, all on the same loaded cores"),
            row("JSON-list endpoint (earlier style) vs binary NPY, concurrency 1", "binary smaller and faster",
                f"{j1['request_bytes'] / 1e6:.2f} MB vs {s1.get('request_bytes', 0) / 1e3:.0f} kB per request; p50 "
                f"{fmt(j1['p50_ms'])} vs {fmt(s1.get('p50_ms', 0))} ms",
                j1["p50_ms"] > s1.get("p50_ms", float("inf")), "JSON encode/parse of ~200k floats per slice"),
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p, arch="lite", filters=16, size=256)
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--requests", type=int, default=64, help="slices per level (at least 2x the concurrency)")
    p.add_argument("--volume-slices", type=int, default=8)
    p.add_argument("--level-s", type=float, default=60.0, help="time limit per level")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    add_threads_option(p, "torch threads of the in-process bound and the JSON endpoint (1 on CPU, as Ray gives "
                          "the 1-CPU model replica)")
    args = p.parse_args()
    resolve_threads(args)
    CACHE.mkdir(parents=True, exist_ok=True)
    result = run(args)
    publish("serve-load", result)


if __name__ == "__main__":
    main()
