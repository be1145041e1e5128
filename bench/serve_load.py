"""Serving under load on loopback: `python -m serve run` against the in-process Predictor, a plain FastAPI
+ uvicorn peer, and a JSON endpoint, all in one run.

A bounded asyncio/httpx load generator (bench/load_client.py: a fixed number of requests per level, and
a time limit) drives /v1/segment (NPY slices; PNG at a few levels) and /v1/segment/volume at each
concurrency. Each slice request asks for the replica's Server-Timing (serve.timing), so every level
reports the median per hop: proxy (client send -> handler start), read (the body from the proxy),
decode, handle (the model call's own hop: ~0 with the model in the ingress replica), batch wait, model,
encode, response (handler end -> client has the answer). The bound is the in-process Predictor on the
same bundle and slice, measured before the server starts and after it stops. The peer
(bench/fastapi_peer.py: what a user writes instead of Serve) runs beside Serve and answers the same
/v1/segment at the same levels, alternating with it (Serve, peer, Serve, peer: ``--rounds`` each) so a
drift in the machine's load falls on both: Serve's throughput at concurrency 32 against it, and its p50 at
concurrency 1, per round and pooled. The record names the bundle as loaded (version, architecture, hash).
``--mixed-volume-slices N`` measures slice latency while an N-slice volume runs on the same replica; ``--sweep
8:16,16:32,32:64`` runs Serve again per max_batch_size:max_ongoing_requests at concurrency 1 and 32 (what the
defaults are to be chosen from). The earlier endpoints' style (the AWS sample's
``predictor.predict(x.tolist())``) is a minimal FastAPI app taking ``{"inputs": [[...]]}`` float lists:
bytes per request and latency, beside the binary API's.

    python bench/serve_load.py                                      # CPU: lite f16, 256 px, random weights
    python bench/serve_load.py --bundle pretrained/lgg --prepared runs/lgg-prepared --mixed-volume-slices 500
    python bench/serve_load.py --device cuda --arch unet --filters 32 --requests 512
    python bench/serve_load.py ... --ingress haproxy     # serve run --haproxy: serve-load-haproxy-<device>.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    CACHE,
    LoadSampler,
    add_model_options,
    add_threads_option,
    bundle_identity,
    fmt,
    percentile,
    publish,
    random_bundle,
    resolve_threads,
    row,
    timed_repeats,
)
from load_client import load_level, server

from core.formats.codecs import encode_npy, encode_png
from serve.demo import free_port

INGRESSES = ("optimized", "haproxy", "proxy-actor")


def bound(args: argparse.Namespace, bundle: Path, slices: np.ndarray) -> dict[str, float]:
    """In-process Predictor: slices/s at batch 32 (all threads and 1 thread) and one-slice latency, in a fresh
    process each time (as a replica or the peer starts: torch's thread pool remembers earlier runs)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_bound, (args, bundle, slices))


def _bound(args: argparse.Namespace, bundle: Path, slices: np.ndarray) -> dict[str, float]:
    import torch

    from core.inference.predictor import Predictor

    pred = Predictor.from_bundle(bundle, device=args.device, batch_size=32)
    batch = np.concatenate([slices] * (32 // len(slices) + 1))[:32]
    pred.predict(batch)
    out: dict[str, float] = {}
    default = torch.get_num_threads()
    threads = args.threads or default
    # The replica's thread count first, all of it: after a run at more threads, torch at fewer was ~3 ms
    # slower per slice here (44.7 vs 47.9 ms), which would flatter Serve's overhead.
    torch.set_num_threads(threads)
    t = timed_repeats(lambda: pred.predict(batch), 2, 5, 3.0, args.device)
    out[f"slices_per_s_threads{threads}"] = 32 / float(np.median(t))
    one = timed_repeats(lambda: pred.predict(slices[:1]), 5, 30, 2.0, args.device)
    out["one_slice_p50_ms"] = 1000 * float(np.median(one))
    vol = slices[: args.volume_slices]
    t = timed_repeats(lambda: pred.predict(vol, volume=True), 2, 5, 2.0, args.device)
    out["volume_slices_per_s"] = len(vol) / float(np.median(t))
    if default != threads:
        torch.set_num_threads(default)
        t = timed_repeats(lambda: pred.predict(batch), 2, 5, 3.0, args.device)
        out[f"slices_per_s_threads{default}"] = 32 / float(np.median(t))
    out["threads"], out["default_threads"] = threads, default
    torch.set_num_threads(default)
    return out


def sample_slices(args: argparse.Namespace, n: int) -> np.ndarray:
    """(n,H,W,3) uint8: real slices from ``--prepared`` (its val split, or its test split where it has no
    val, tumour slices first), else synthetic."""
    if args.prepared:
        from core.data.arrays import load_split

        val = load_split(args.prepared, "val")
        if len(val.masks) == 0:
            val = load_split(args.prepared, "test")
        order = np.argsort(-np.asarray(val.masks).reshape(len(val.masks), -1).max(1), kind="stable")[:n]
        return np.ascontiguousarray(np.asarray(val.images)[np.sort(order)].transpose(0, 2, 3, 1))
    from tests.bundle_factory import sample_images

    return sample_images(n, args.size, args.size, seed=1)


def serve_cmd(args: argparse.Namespace, bundle: Path, port: int, batch: int, ongoing: int) -> list[str]:
    cmd = [sys.executable, "-m", "serve", "run", "--bundle", str(bundle), "--port", str(port),
           "--max-batch-size", str(batch), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-ongoing-requests", str(ongoing), "--torch-threads", str(args.torch_threads)]
    if args.mixed_volume_slices:  # a 500-slice 256 px volume is ~98 MB of NPY
        cmd += ["--max-body-mb", str(max(64, args.mixed_volume_slices * args.size * args.size * 3 / 2**20 + 8))]
    cmd += ["--haproxy"] if args.ingress == "haproxy" else []
    return [*cmd, "--split"] if args.split else cmd


async def mixed(base: str, slice_body: bytes, volume_body: bytes) -> dict[str, Any]:
    """Slices one at a time while one long volume runs on the same replica: their latency meanwhile."""
    import httpx

    npy = {"content-type": "application/x-npy"}
    async with httpx.AsyncClient(timeout=1800, trust_env=False) as http:
        t0 = time.perf_counter()
        volume = asyncio.create_task(http.post(f"{base}/v1/segment/volume?format=npy", content=volume_body,
                                               headers=npy))
        lat: list[float] = []
        while not volume.done():
            s0 = time.perf_counter()
            r = await http.post(f"{base}/v1/segment?format=npy", content=slice_body, headers=npy)
            if r.status_code == 200 and not volume.done():
                lat.append(1000 * (time.perf_counter() - s0))
        status = (await volume).status_code
    ms = sorted(lat)
    return {"volume_status": status, "volume_s": time.perf_counter() - t0, "slices_during": len(ms),
            "slice_p50_ms": percentile(ms, 50), "slice_p95_ms": percentile(ms, 95),
            "slice_max_ms": ms[-1] if ms else None}


def one_level(base: str, name: str, body: tuple, conc: int, args: argparse.Namespace, load: LoadSampler,
              tag: str) -> dict[str, Any]:
    path, payload, ctype, _ = body
    n = max(args.requests // args.volume_slices, conc) if "volume" in name else max(args.requests, 2 * conc)
    res = asyncio.run(load_level(base + path, payload, {"content-type": ctype}, conc, n, args.level_s,
                                 hops=name.startswith("slice") and tag == "serve"))
    load.mark(f"{tag} {name} c={conc}")
    print(f"{tag} {name} c={conc}: {res['requests_per_s']:.1f} req/s p50 {res['p50_ms']:.1f} ms "
          f"hops {res.get('hops_ms', '')} codes {res['codes']}", flush=True)
    return res


def run_levels(base: str, bodies: dict[str, tuple], args: argparse.Namespace, load: LoadSampler,
               tag: str) -> dict[str, list[dict[str, Any]]]:
    """Every level of every body once, against one server."""
    return {name: [one_level(base, name, body, conc, args, load, tag) for conc in body[3]]
            for name, body in bodies.items()}


def alternate(serve_base: str, peer_base: str, bodies: dict[str, tuple], args: argparse.Namespace,
              load: LoadSampler) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Each level ``args.rounds`` times, Serve then the peer (slices only: the peer has no volume endpoint),
    so both see the same drift; every run is kept, with its round."""
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in bodies}
    peer: list[dict[str, Any]] = []
    for name, body in bodies.items():
        for conc in body[3]:
            for rnd in range(args.rounds):
                results[name].append({**one_level(serve_base, name, body, conc, args, load, "serve"), "round": rnd})
                if name == "slice_npy":
                    peer.append({**one_level(peer_base, name, body, conc, args, load, "peer"), "round": rnd})
    return results, peer


def pooled(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per concurrency, the rounds' mean throughput and median p50/p95/p99 (the first round's other fields)."""
    by: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["concurrency"], []).append(r)
    return {c: {**rs[0], "requests_per_s": float(np.mean([r["requests_per_s"] for r in rs])),
                **{k: float(np.median([r[k] for r in rs])) for k in ("p50_ms", "p95_ms", "p99_ms")},
                "rounds": len(rs)} for c, rs in by.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    load = LoadSampler()
    bundle = Path(args.bundle) if args.bundle else random_bundle("bundle", args.arch, args.filters, args.size)
    slices = sample_slices(args, max(16, args.volume_slices))
    before = bound(args, bundle, slices)
    load.mark("bound before")
    levels = [int(c) for c in args.concurrency.split(",")]
    one, vol = slices[0], slices[: args.volume_slices]
    bodies = {
        "slice_npy": ("/v1/segment?format=npy", encode_npy(one), "application/x-npy", levels),
        "slice_png": ("/v1/segment?format=png", encode_png(one), "image/png", [1, 32]),
        "volume_npy": ("/v1/segment/volume?format=npy", encode_npy(vol), "application/x-npy", levels),
    }
    port, peer_port = free_port(), free_port()
    base, peer_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
    pcmd = [sys.executable, str(Path(__file__).with_name("fastapi_peer.py")), "--bundle", str(bundle), "--port",
            str(peer_port), "--device", args.device, "--threads", str(args.peer_threads)]
    started = time.perf_counter()
    mixed_result = None
    with server(serve_cmd(args, bundle, port, args.max_batch_size, args.max_ongoing_requests), f"{base}/healthz",
                args.startup_timeout):
        startup = time.perf_counter() - started
        load.mark("serve up")
        with server(pcmd, f"{peer_base}/healthz", args.startup_timeout):
            results, peer = alternate(base, peer_base, bodies, args, load)
        if args.mixed_volume_slices:
            long_volume = np.resize(slices, (args.mixed_volume_slices, *slices.shape[1:]))
            mixed_result = asyncio.run(mixed(base, encode_npy(one), encode_npy(long_volume)))
            load.mark("mixed")
            print(f"mixed: {mixed_result}", flush=True)
    sweep = []
    for pair in filter(None, args.sweep.split(",")):
        batch, ongoing = (int(v) for v in pair.split(":"))
        port = free_port()
        with server(serve_cmd(args, bundle, port, batch, ongoing), f"http://127.0.0.1:{port}/healthz",
                    args.startup_timeout):
            one_body = {"slice_npy": (*bodies["slice_npy"][:3], [1, 32])}
            got = run_levels(f"http://127.0.0.1:{port}", one_body, args, load, f"sweep {pair}")["slice_npy"]
        figures = {f"c{r['concurrency']}": {k: r[k] for k in ("requests_per_s", "p50_ms", "p95_ms")} for r in got}
        sweep.append({"max_batch_size": batch, "max_ongoing_requests": ongoing, **figures})
    after = bound(args, bundle, slices)
    load.mark("bound after")
    json_results = json_endpoint(args, bundle, slices, load)
    out = summarise(args, before, after, results, json_results, startup, load, peer)
    out.update({"mixed": mixed_result, "sweep": sweep, "model": bundle_identity(bundle),
                "slices": "real (--prepared val)" if args.prepared else "synthetic"})
    if args.bundle:  # the random-bundle options did not apply: the model is what was loaded
        for key in ("arch", "filters", "size"):
            out["settings"].pop(key, None)
    return out


def json_endpoint(args: argparse.Namespace, bundle: Path, slices: np.ndarray, load: LoadSampler) -> list[dict]:
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
    return json_results


def summarise(args: argparse.Namespace, before: dict[str, float], after: dict[str, float],
              results: dict[str, list[dict[str, Any]]], json_results: list[dict[str, Any]], startup: float,
              load: LoadSampler, peer: list[dict[str, Any]]) -> dict[str, Any]:
    threads, default = int(before["threads"]), int(before["default_threads"])
    bound_sps = (before[f"slices_per_s_threads{threads}"] + after[f"slices_per_s_threads{threads}"]) / 2
    bound_all = (before[f"slices_per_s_threads{default}"] + after[f"slices_per_s_threads{default}"]) / 2
    one_ms = (before["one_slice_p50_ms"] + after["one_slice_p50_ms"]) / 2
    vol_sps = (before["volume_slices_per_s"] + after["volume_slices_per_s"]) / 2
    by = {name: pooled(rs) for name, rs in results.items()}
    for name in ("slice_npy", "slice_png"):
        for r in [*results[name], *by[name].values()]:
            r["share_of_bound"] = r["requests_per_s"] / bound_sps
    for r in [*results["volume_npy"], *by["volume_npy"].values()]:
        r["slices_per_s"] = r["requests_per_s"] * args.volume_slices
        r["share_of_bound"] = r["slices_per_s"] / vol_sps
    nan = float("nan")
    c32, s1 = by["slice_npy"].get(32, {}), by["slice_npy"].get(1, {})
    peer_by = pooled(peer)
    p32, p1 = peer_by.get(32, {}), peer_by.get(1, {})
    share32 = c32.get("share_of_bound", nan)
    overhead = s1.get("p50_ms", nan) - one_ms
    vs_peer32 = c32.get("requests_per_s", nan) / p32.get("requests_per_s", nan) if p32 else nan
    vs_peer1 = s1.get("p50_ms", nan) - p1.get("p50_ms", nan) if p1 else nan
    # Serve and the peer ran back to back in each round: the round's own ratio is the paired comparison.
    paired = [{"concurrency": s["concurrency"], "round": s["round"],
               "throughput_ratio": s["requests_per_s"] / q["requests_per_s"],
               "p50_difference_ms": s["p50_ms"] - q["p50_ms"]}
              for s, q in zip(results["slice_npy"], peer, strict=True)]
    j1 = json_results[0]
    ingress = {"optimized": "Serve's proxy actor (throughput-optimized Serve)", "haproxy": "HAProxy",
               "proxy-actor": "Serve's proxy actor (classic settings)"}[args.ingress]
    limits = (f"CPU: {os.cpu_count()} cores shared by the load generator, {ingress}, the replica, and other "
              f"jobs; the bound is the Predictor at {threads} thread(s) ({fmt(bound_sps)} slices/s; "
              f"{fmt(bound_all)} at torch's default {default})")
    hops1 = s1.get("hops_ms", {})
    met = {"share_of_bound_at_32": share32 >= 0.8, "p50_overhead_at_1": overhead <= 10.0,
           "throughput_vs_peer_at_32": vs_peer32 >= 1.0, "p50_vs_peer_at_1": vs_peer1 <= 5.0}
    return {
        "settings": vars(args),
        "serve_startup_s": startup,
        "bound": {"before": before, "after": after, "slices_per_s": bound_sps, "one_slice_p50_ms": one_ms,
                  "slices_per_s_default_threads": bound_all, "volume_slices_per_s": vol_sps},
        "serve": results,
        "hops_ms_at_1": hops1,
        "peer": {"fastapi_uvicorn": peer, "throughput_ratio_at_32": vs_peer32, "p50_difference_ms_at_1": vs_peer1,
                 "per_round": paired, "order": "per level: Serve then the peer, --rounds times"},
        "json_endpoint": json_results,
        "load": load.summary(),
        "target": {"share_of_bound_at_32_min": 0.8, "p50_overhead_ms_at_1_max": 10.0,
                   "throughput_vs_peer_at_32_min": 1.0, "p50_vs_peer_ms_at_1_max": 5.0},
        "met": met,
        "summary": [
            row("/v1/segment throughput at concurrency 32, share of in-process bound", ">= 80%",
                f"{100 * share32:.0f}% ({fmt(c32.get('requests_per_s', nan))} req/s vs {fmt(bound_sps)} slices/s; "
                f"p50/p95/p99 {fmt(c32.get('p50_ms', 0))}/{fmt(c32.get('p95_ms', 0))}/{fmt(c32.get('p99_ms', 0))} ms)",
                met["share_of_bound_at_32"], limits),
            row("/v1/segment p50 overhead at concurrency 1", "<= 10 ms",
                f"{fmt(overhead)} ms (p50 {fmt(s1.get('p50_ms', 0))} ms vs in-process {fmt(one_ms)} ms); hops "
                + ", ".join(f"{k} {fmt(v)}" for k, v in hops1.items() if k != "requests"),
                met["p50_overhead_at_1"], f"ingress {ingress}; batch wait {args.batch_wait_ms:g} ms; model "
                + ("behind a handle (--split)" if args.split else "inside the ingress replica")),
            row("Serve vs plain FastAPI + uvicorn peer", "c=32 throughput >= peer; c=1 p50 within 5 ms",
                f"{fmt(vs_peer32)}x throughput at 32 ({fmt(c32.get('requests_per_s', nan))} vs "
                f"{fmt(p32.get('requests_per_s', nan))} req/s; rounds "
                + ", ".join(f"{fmt(r['throughput_ratio'])}x" for r in paired if r["concurrency"] == 32)
                + f"); p50 at 1 {fmt(vs_peer1)} ms apart (rounds "
                + ", ".join(f"{fmt(r['p50_difference_ms'])}" for r in paired if r["concurrency"] == 1) + ")",
                met["throughput_vs_peer_at_32"] and met["p50_vs_peer_at_1"],
                f"peer: one process, torch at {args.peer_threads or default} thread(s), no batching"),
            row("JSON-list endpoint (earlier style) vs binary NPY, concurrency 1", "binary smaller and faster",
                f"{j1['request_bytes'] / 1e6:.2f} MB vs {s1.get('request_bytes', 0) / 1e3:.0f} kB per request; p50 "
                f"{fmt(j1['p50_ms'])} vs {fmt(s1.get('p50_ms', 0))} ms",
                j1["p50_ms"] > s1.get("p50_ms", float("inf")), "JSON encode/parse of ~200k floats per slice"),
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p, arch="lite", filters=16, size=256)
    p.add_argument("--bundle", default=None, help="a bundle to serve (default: a random-weight one of --arch)")
    p.add_argument("--prepared", default=None, help="prepared directory: send its val slices (real data)")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--requests", type=int, default=64, help="slices per level (at least 2x the concurrency)")
    p.add_argument("--volume-slices", type=int, default=8)
    p.add_argument("--level-s", type=float, default=60.0, help="time limit per level")
    p.add_argument("--rounds", type=int, default=2, help="Serve/peer alternations per level (A B A B)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-ongoing-requests", type=int, default=0, help="0: serve run's default")
    p.add_argument("--torch-threads", type=int, default=0, help="Serve replica's torch threads (0: serve's default)")
    p.add_argument("--split", action="store_true", help="serve the model as its own deployment (serve run --split)")
    p.add_argument("--ingress", choices=INGRESSES, default="optimized",
                   help="optimized: serve run's default (Ray's throughput-optimized Serve); haproxy: serve run "
                        "--haproxy; proxy-actor: Serve's classic settings")
    p.add_argument("--peer-threads", type=int, default=-1,
                   help="the FastAPI peer's torch threads (default: as --threads; 0: torch's default)")
    p.add_argument("--mixed-volume-slices", type=int, default=0, help="slice latency while a volume of N runs")
    p.add_argument("--sweep", default="", help="max_batch_size:max_ongoing_requests pairs, e.g. 8:16,16:32,32:64")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    add_threads_option(p, "torch threads of the in-process bound and the JSON endpoint (1 on CPU, as Ray gives "
                          "the 1-CPU model replica)")
    args = p.parse_args()
    resolve_threads(args)
    if args.ingress == "proxy-actor":  # read by `serve run` before it starts Ray (serve.startup)
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "0"
    if args.peer_threads < 0:
        args.peer_threads = args.threads
    CACHE.mkdir(parents=True, exist_ok=True)
    result = run(args)
    publish("serve-load" if args.ingress == "optimized" else f"serve-load-{args.ingress}", result)


if __name__ == "__main__":
    main()
