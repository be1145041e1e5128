"""The serving step of `make demo`: serve a bundle in-process, send slices and a volume, shut down.

``python -m serve.demo --bundle B --data SYNTH_KAGGLE_DIR --out DIR`` starts Ray Serve on a free
loopback port, sends a few single slices (concurrently) and one whole patient through the client,
writes the masks, overlays, ``model.json`` and ``summary.json`` under DIR, and shuts Serve down.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import add_arguments, from_args, meta
from core.io import write_json


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+): a port the OS hands out now may be taken by one
    of the many processes Ray starts before the HTTP proxy binds it ("Address already in use"). Drawn from the
    OS's entropy, not the ``random`` module's state: training seeds that, and two processes seeded alike would
    draw the same ports, where Serve's proxies (SO_REUSEPORT) would then share one and split its requests."""
    for port in random.SystemRandom().sample(range(20000, 30000), 200):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pick_inputs(data: Path, slices: int) -> tuple[list[Path], Path]:
    """A few slices (tumour slices first, when masks say so) and one patient folder from a Kaggle layout."""
    import numpy as np
    import tifffile

    patients = sorted(d for d in Path(data).iterdir() if d.is_dir())
    if not patients:
        raise FileNotFoundError(f"{data}: no patient folders (expected the kaggle_3m layout)")
    images = sorted(f for f in patients[0].glob("*.tif") if not f.stem.endswith("_mask"))
    with_tumour = [f for f in images if (m := f.with_name(f.stem + "_mask.tif")).is_file()
                   and np.any(tifffile.imread(m))]
    chosen = (with_tumour + [f for f in images if f not in with_tumour])[:slices]
    return chosen, patients[-1]


def run_demo(bundle: str | Path, data: str | Path, out: str | Path, slices: int = 4) -> dict[str, Any]:
    """Serve ``bundle``, segment demo inputs into ``out``; returns the client summary and timings."""
    import httpx
    import ray
    from ray import serve

    from serve.app import ServeSettings, resolve_resources, start
    from serve.client import predict_paths

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen, patient = pick_inputs(Path(data), slices)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    t0 = time.perf_counter()
    try:
        settings = resolve_resources(ServeSettings(bundle=str(bundle)), None)
        url = start(settings, "127.0.0.1", free_port())
        ready_s = time.perf_counter() - t0
        model = httpx.get(f"{url}/v1/model", timeout=30).json()
        write_json(out / "model.json", model)
        t1 = time.perf_counter()
        summary = predict_paths([*chosen, patient], out, url=url, concurrency=8)
        result = {"url": url, "startup_s": round(ready_s, 2), "requests_s": round(time.perf_counter() - t1, 3),
                  "summary": summary}
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    write_json(out / "demo.json", result)
    return result


@dataclass
class DemoOptions:
    """The `python -m serve.demo` options."""

    bundle: str = field(metadata=meta("bundle directory to serve"))
    data: str = field(metadata=meta("Kaggle-layout folder (e.g. demo/data/kaggle_3m)"))
    out: str = field(metadata=meta("where the responses go"))
    slices: int = field(default=4, metadata=meta("single slices to send"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.demo", description=__doc__.splitlines()[0])
    add_arguments(p, DemoOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    args = from_args(parser().parse_args(argv), DemoOptions)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = run_demo(args.bundle, args.data, args.out, args.slices)
    failed = [s for s in result["summary"] if "error" in s]
    for s in result["summary"]:
        print(f"  {s['input']}: {s.get('error') or str(s['slices']) + ' slice(s), ' + str(s['tumour_pixels']) + ' px'}")
    print(f"served {args.bundle} at {result['url']} (ready in {result['startup_s']} s), "
          f"{len(result['summary'])} requests in {result['requests_s']} s; outputs in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
