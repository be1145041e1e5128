"""`python -m serve predict`: segment slice files and patient folders with a gliomaseg server (or ONNX).

A file is one request: a single slice to ``/v1/segment``, a multi-page TIFF or NxHxWx3 .npy to
``/v1/segment/volume``. A folder holding slice files (``*_mask.*`` excluded, sorted by the slice
number) is one patient: its slices are stacked into one .npy volume request, so 3D post-processing
sees the whole patient. Folders are searched recursively (``kaggle_3m/`` gives one volume per patient).

Outputs under ``--out`` (names sanitised, never outside it): per slice ``NAME_mask.png`` and
``NAME_overlay.png``; per volume ``NAME_masks.tif`` (one page per slice), ``NAME_overlay.png``
(animated) and ``NAME.json`` (per-slice tumour pixels); and ``summary.json`` for the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.formats import codecs
from core.io import atomic_write_bytes, write_json

SLICE_EXTS = {".tif", ".tiff", ".png", ".npy"}


@dataclass
class Job:
    """One request: a file (slice or volume, decided by its content) or a patient folder (a volume)."""

    source: Path
    files: list[Path]
    name: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _is_slice(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SLICE_EXTS and not path.stem.lower().endswith("_mask")


def collect(inputs: list[str | Path]) -> list[Job]:
    """Expand files and folders into jobs; a folder with slice files in it is one patient volume."""
    jobs: list[Job] = []
    for item in map(Path, inputs):
        if item.is_file():
            jobs.append(Job(item, [item]))
        elif item.is_dir():
            folders = [item, *sorted((d for d in item.rglob("*") if d.is_dir()), key=str)]
            for folder in folders:
                files = sorted((f for f in folder.iterdir() if _is_slice(f)), key=_natural)
                if files:
                    jobs.append(Job(folder, files))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    if not jobs:
        raise ValueError(f"no slice files ({', '.join(sorted(SLICE_EXTS))}) found in {', '.join(map(str, inputs))}")
    _assign_names(jobs)
    return jobs


def safe_name(text: str) -> str:
    """A file-name stem that cannot escape a folder: [A-Za-z0-9._-] only, no leading dots, <= 100 chars."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:100]
    return name or "input"


def _assign_names(jobs: list[Job]) -> None:
    used: set[str] = set()
    for job in jobs:
        base = safe_name(job.source.stem if job.source.is_file() else job.source.name)
        name, k = base, 2
        while name.lower() in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name.lower())
        job.name = name


def _inside(out: Path, filename: str) -> Path:
    target = (out / filename).resolve()
    if target.parent != out.resolve():  # belt and braces: safe_name already forbids separators
        raise ValueError(f"refusing to write {filename!r} outside {out}")
    return target


def load(job: Job) -> tuple[bytes, str, np.ndarray, bool]:
    """(request body, content type, decoded (N,H,W,3) slices, is-volume) for a job."""
    if job.source.is_file():
        data = job.source.read_bytes()
        kind = codecs.EXTENSIONS.get(job.source.suffix.lower(), "")
        images = codecs.decode(data, kind, volume=True)  # the same rules the server applies
        return data, kind, images, len(images) > 1
    slices = [codecs.read_file(str(f), volume=False)[0] for f in job.files]
    if len({s.shape for s in slices}) > 1:
        raise ValueError(f"{job.source}: slices differ in size; a volume needs one size")
    images = np.stack(slices)
    return codecs.encode_npy(images), codecs.NPY, images, True


def write_outputs(out: Path, job: Job, images: np.ndarray, masks: np.ndarray, volume: bool,
                  scale: int) -> dict[str, Any]:
    """Write masks (foreground x ``scale``: the model's, so every job of a run looks alike) and overlays."""
    masks = np.asarray(masks, dtype=np.uint8).reshape(len(images), *images.shape[1:3])
    areas = [int(np.count_nonzero(m)) for m in masks]
    written: list[str] = []

    def put(suffix: str, data: bytes) -> None:
        atomic_write_bytes(_inside(out, job.name + suffix), data)
        written.append(job.name + suffix)

    if volume:
        put("_masks.tif", codecs.encode_tiff(masks, scale))
        put("_overlay.png", codecs.encode_animation(images, masks))
        put(".json", json.dumps({"source": str(job.source), "slices": len(masks), "tumour_pixels": sum(areas),
                                 "slice_tumour_pixels": areas}, indent=1).encode())
    else:
        put("_mask.png", codecs.encode_mask_png(masks[0], scale))
        put("_overlay.png", codecs.encode_overlay_png(images[0], masks[0]))
    return {"input": str(job.source), "name": job.name, "volume": volume, "slices": len(masks),
            "tumour_pixels": sum(areas), "outputs": written}


async def _run_http(jobs: list[Job], out: Path, url: str, token: str | None, concurrency: int,
                    timeout_s: float) -> None:
    import httpx

    limit = asyncio.Semaphore(concurrency)
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        try:
            info = await client.get("/v1/model", headers=auth)
            info.raise_for_status()
        except httpx.HTTPError as exc:
            raise ValueError(f"{url}: cannot read the model's metadata from /v1/model ({exc})") from exc
        scale = codecs.mask_scale(info.json()["class_names"])

        async def one(job: Job) -> None:
            async with limit:
                try:
                    body, kind, images, volume = await asyncio.to_thread(load, job)
                    path = "/v1/segment/volume" if volume else "/v1/segment"
                    r = await client.post(path, params={"format": "npy"}, content=body,
                                          headers={**auth, "Content-Type": kind})
                    if r.status_code != 200:
                        try:
                            err = r.json()
                        except ValueError:
                            err = {"error": "http_error", "detail": r.text[:200]}
                        raise RuntimeError(f"HTTP {r.status_code} {err.get('error')}: {err.get('detail')}")
                    masks = np.load(io.BytesIO(r.content), allow_pickle=False)
                    job.result = await asyncio.to_thread(write_outputs, out, job, images, masks, volume, scale)
                    job.result["model_version"] = r.headers.get("X-Model-Version")
                except (codecs.DecodeError, ValueError, RuntimeError, OSError, httpx.HTTPError) as exc:
                    job.result = {"input": str(job.source), "name": job.name, "error": f"{type(exc).__name__}: {exc}"}

        await asyncio.gather(*(one(j) for j in jobs))


def _run_onnx(jobs: list[Job], out: Path, model: str) -> None:
    from serve.edge import OnnxPredictor  # optional path: onnxruntime loads only when asked for

    predictor = OnnxPredictor(model)
    scale = codecs.mask_scale(predictor.config["class_names"])
    for job in jobs:
        try:
            _, _, images, volume = load(job)
            masks = predictor.predict(images, volume=volume)
            job.result = write_outputs(out, job, images, masks, volume, scale)
        except (codecs.DecodeError, ValueError, OSError) as exc:
            job.result = {"input": str(job.source), "name": job.name, "error": f"{type(exc).__name__}: {exc}"}


def predict_paths(inputs: list[str | Path], out: str | Path, url: str | None = None, token: str | None = None,
                  concurrency: int = 8, onnx: str | None = None, timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """Segment every input, write outputs and ``summary.json`` under ``out``; returns the summary."""
    if (url is None) == (onnx is None):
        raise ValueError("give exactly one of --url (a gliomaseg server) or --onnx (a local ONNX model)")
    jobs = collect(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if onnx:
        _run_onnx(jobs, out, onnx)
    else:
        asyncio.run(_run_http(jobs, out, str(url), token, max(1, concurrency), timeout_s))
    summary = [j.result for j in jobs]
    write_json(out / "summary.json", summary)
    return summary


def _cmd_predict(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the summary
    summary = predict_paths(args.inputs, args.out, url=args.url, token=args.token,
                            concurrency=args.concurrency, onnx=args.onnx)
    failed = [s for s in summary if "error" in s]
    for s in summary:
        what = s.get("error") or f"{s['slices']} slice(s), {s['tumour_pixels']} tumour px"
        print(f"{s['input']}: {what}")
    print(f"{len(summary) - len(failed)}/{len(summary)} ok; outputs in {args.out}")
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment slice files / patient folders via a server (or --onnx locally)")
    p.add_argument("inputs", nargs="+", metavar="FILES_OR_FOLDERS")
    p.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", default=None, help="bearer token, if the server requires one")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--onnx", default=None, help="run this ONNX model locally instead of calling a server")
    p.set_defaults(func=_cmd_predict)
