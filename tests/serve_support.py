"""Helpers for the Ray Serve tests: start apps on the session's Ray with a free loopback port."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

from serve.app import ServeSettings, start
from serve.demo import free_port


@contextlib.contextmanager
def serving(apps: dict[str, ServeSettings], env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """Run ``{route_prefix: settings}`` as separate apps on one Serve instance; yields prefix -> base URL.

    Serve is shut down on exit, so each test module starts from a clean cluster (one proxy port each).
    """
    from ray import serve

    os.environ.update(env or {})
    port = free_port()
    urls: dict[str, str] = {}
    try:
        for i, (prefix, settings) in enumerate(apps.items()):
            urls[prefix] = start(settings, "127.0.0.1", port, name=f"test{i}", route_prefix=prefix)
        yield urls
    finally:
        serve.shutdown()
        for key in env or {}:
            os.environ.pop(key, None)


def slice_files(kaggle_dir: Path, patient: int = 0) -> list[Path]:
    """One synthetic patient's image files (masks excluded), in slice order."""
    folder = sorted(d for d in kaggle_dir.iterdir() if d.is_dir())[patient]
    files = [f for f in folder.glob("*.tif") if not f.stem.endswith("_mask")]
    return sorted(files, key=lambda f: int(f.stem.rsplit("_", 1)[1]))


def post_volume(url: str, body: bytes, kind: str, **params: str) -> httpx.Response:
    """``POST /v1/segment/volume`` with ``body`` as ``kind`` and the query ``params``."""
    return httpx.post(f"{url}/v1/segment/volume", content=body, headers={"Content-Type": kind}, params=params,
                      timeout=120)


def npy_answer(r: httpx.Response) -> np.ndarray:
    """The masks of a 200 ``format=npy`` answer (its body otherwise, in the assertion)."""
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content), allow_pickle=False)
