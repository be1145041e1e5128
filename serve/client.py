"""`python -m serve predict`: segment slices, patient folders and scans with a gliomaseg server (or ONNX).

A file is one request: a single slice to ``/v1/segment``, a multi-page TIFF or NxHxWx3 .npy to
``/v1/segment/volume``. A folder holding slice files (``*_mask.*`` excluded, in slice order as `core predict`
stacks them: core.formats.cases.slice_order) is one patient: its slices are stacked into one .npy volume
request with one intensity scale (codecs.stack_volume), so 3D post-processing sees the whole patient.
Folders are searched recursively (``kaggle_3m/`` gives one volume per patient).

A scan goes to ``/v1/segment/volume`` as it is: a NIfTI file (``.nii``, ``.nii.gz``), a zipped DICOM
study (``.zip``), one DICOM file (``.dcm``), or a folder of DICOM files (a study, its series in subfolders
or not), zipped on the fly. Its file name travels in Content-Disposition (for a 3D NIfTI it may say the
sequence, as for `core predict`), ``--sequences`` names a NIfTI's channels; ``--spacing z,y,x`` (mm) gives
slice stacks their geometry (core.inference.spacing), and a volume's ``NAME.json`` says the spacing used, the
volume in mL where it is known, and the answer's notes.

Outputs under ``--out`` (names sanitised, never outside it): per slice ``NAME_mask.png`` and
``NAME_overlay.png``; per volume ``NAME_masks.tif`` (one page per slice), ``NAME_overlay.png``
(animated) and ``NAME.json`` (per-slice tumour pixels); per scan ``NAME_mask.nii.gz`` (on the scan's own
grid), ``NAME_seg.dcm`` (DICOM SEG, DICOM input) and ``NAME.json`` (the server's JSON answer: volume in mL,
sequences used, notes); and ``summary.json`` for the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.config import add_command, from_args, meta
from core.formats import codecs
from core.formats.cases import slice_order
from core.inference.jobs import sequences_field, series_field, spacing_field
from core.io import atomic_write_bytes, write_json

SLICE_EXTS = {".tif", ".tiff", ".png", ".npy"}
# Scan files by name -> request type (core.formats.load tells NIfTI from DICOM by the bytes as well)
SCAN_TYPES = {".nii.gz": "application/gzip", ".nii": "application/x-nifti", ".zip": "application/zip",
              ".dcm": "application/dicom"}
SLICES, SCAN, DICOM_FOLDER = "slices", "scan", "dicom-folder"


@dataclass
class Job:
    """One request: a file (slice or volume, decided by its content), a patient folder (a volume), or a scan
    (a NIfTI, zip or DICOM file, or a DICOM folder)."""

    source: Path
    files: list[Path]
    name: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    kind: str = SLICES


def scan_type(path: Path) -> str | None:
    """The request type of a scan file by its name, None for anything else."""
    name = path.name.lower()
    return next((t for ext, t in SCAN_TYPES.items() if name.endswith(ext)), None)


def _is_slice(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SLICE_EXTS and not path.stem.lower().endswith("_mask")


def _walk(folder: Path, jobs: list[Job]) -> None:
    """A folder's slice files are one patient, its NIfTI and zip files scans; a folder of DICOM files
    (recursively: its series may sit in subfolders) is one study; other subfolders are searched."""
    from core.formats.dicom_files import looks_like_dicom_dir  # pydicom loads only when folders come

    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    slices = slice_order(f for f in files if _is_slice(f))
    if slices:
        jobs.append(Job(folder, slices))
    scans = [f for f in files if scan_type(f) not in (None, SCAN_TYPES[".dcm"])]
    jobs += [Job(f, [f], kind=SCAN) for f in scans]
    if not slices and not scans and looks_like_dicom_dir(folder):
        jobs.append(Job(folder, [], kind=DICOM_FOLDER))
        return
    for sub in sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=str):
        _walk(sub, jobs)


def collect(inputs: list[str | Path]) -> list[Job]:
    """Expand files and folders into jobs; a folder with slice files in it is one patient volume, a folder
    of DICOM files one study."""
    jobs: list[Job] = []
    for item in map(Path, inputs):
        if item.is_file():
            jobs.append(Job(item, [item], kind=SCAN if scan_type(item) else SLICES))
        elif item.is_dir():
            _walk(item, jobs)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    if not jobs:
        raise ValueError(f"no slice files ({', '.join(sorted(SLICE_EXTS))}) or scans ({', '.join(SCAN_TYPES)}) "
                         f"found in {', '.join(map(str, inputs))}")
    _assign_names(jobs)
    return jobs


def safe_name(text: str) -> str:
    """A file-name stem that cannot escape a folder: [A-Za-z0-9._-] only, no leading dots, <= 100 chars."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:100]
    return name or "input"


def _assign_names(jobs: list[Job]) -> None:
    used: set[str] = set()
    for job in jobs:
        base = safe_name(_stem(job.source) if job.source.is_file() else job.source.name)
        name, k = base, 2
        while name.lower() in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name.lower())
        job.name = name


def _stem(path: Path) -> str:
    """A file name without its extension (both of ``.nii.gz``)."""
    return path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem


def zip_study(folder: Path) -> bytes:
    """A DICOM folder (its series in subfolders or not) as zip bytes: the body of a zipped study."""
    from core.formats.dicom_files import hidden

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not hidden(f.relative_to(folder).as_posix()):
                zf.write(f, f.relative_to(folder).as_posix())
    return buffer.getvalue()


def scan_body(job: Job) -> tuple[bytes, str, str]:
    """(request body, content type, file name to send) of a scan job."""
    if job.kind == DICOM_FOLDER:
        return zip_study(job.source), SCAN_TYPES[".zip"], f"{safe_name(job.source.name)}.zip"
    return job.source.read_bytes(), str(scan_type(job.source)), safe_name(job.source.name)


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
    slices = [codecs.read_file(str(f), volume=False, raw=True)[0] for f in job.files]
    images = codecs.stack_volume(slices, [str(f) for f in job.files])
    return codecs.encode_npy(images), codecs.NPY, images, True


def write_outputs(out: Path, job: Job, images: np.ndarray, masks: np.ndarray, volume: bool,
                  scale: int, said: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write masks (foreground x ``scale``: the model's, so every job of a run looks alike) and overlays; a
    volume's ``NAME.json`` carries what its answer said beside the masks (``said``: ``volume_headers``)."""
    masks = np.asarray(masks, dtype=np.uint8).reshape(len(images), *images.shape[1:3])
    areas = [int(np.count_nonzero(m)) for m in masks]
    written: list[str] = []
    said = said or {}

    def put(suffix: str, data: bytes) -> None:
        atomic_write_bytes(_inside(out, job.name + suffix), data)
        written.append(job.name + suffix)

    if volume:
        put("_masks.tif", codecs.encode_tiff(masks, scale))
        put("_overlay.png", codecs.encode_animation(images, masks))
        put(".json", json.dumps({"source": str(job.source), "slices": len(masks), "tumour_pixels": sum(areas),
                                 "slice_tumour_pixels": areas, **said}, indent=1).encode())
    else:
        put("_mask.png", codecs.encode_mask_png(masks[0], scale))
        put("_overlay.png", codecs.encode_overlay_png(images[0], masks[0]))
    return {"input": str(job.source), "name": job.name, "volume": volume, "slices": len(masks),
            "tumour_pixels": sum(areas), "volume_ml": said.get("volume_ml"), "notes": said.get("notes", []),
            "outputs": written}


def volume_headers(headers: Any) -> dict[str, Any]:
    """What a volume's binary answer says in its headers: the spacing used, the mL where it is known, notes."""
    ml = headers.get("X-Tumour-Volume-mL")
    spacing = headers.get("X-Spacing-mm")
    return {"volume_ml": float(ml) if ml is not None else None,
            "spacing_mm": [float(v) for v in spacing.split(",")] if spacing else None,
            "spacing_assumed": "X-Spacing-Assumed" in headers, "notes": json.loads(headers.get("X-Notes", "[]"))}


def local_volume_said(masks: np.ndarray, spacing: tuple[float, float, float] | None) -> dict[str, Any]:
    """``volume_headers`` of a volume segmented here (--onnx), by the server's rule (core.inference.spacing)."""
    from core.inference.spacing import stack_spacing

    used = stack_spacing(spacing)
    note = used.note()
    return {"volume_ml": float(np.count_nonzero(masks)) * used.voxel_ml if used.known else None,
            "spacing_mm": list(used.mm), "spacing_assumed": not used.known, "notes": [note] if note else []}


def write_scan_outputs(out: Path, job: Job, answer: dict[str, Any], mask: bytes, seg: bytes | None
                       ) -> dict[str, Any]:
    """Write a scan's JSON answer, its NIfTI mask and (DICOM input) its SEG; the summary line."""
    written = []
    for suffix, data in ((".json", json.dumps({"source": str(job.source), **answer}, indent=1).encode()),
                         ("_mask.nii.gz", mask), ("_seg.dcm", seg)):
        if data is not None:
            atomic_write_bytes(_inside(out, job.name + suffix), data)
            written.append(job.name + suffix)
    scan = answer.get("scan") or {}
    return {"input": str(job.source), "name": job.name, "volume": True, "scan": answer.get("input"),
            "slices": answer.get("slices"), "tumour_pixels": answer.get("tumour_pixels"),
            "volume_ml": answer.get("volume_ml"), "notes": scan.get("notes", []), "outputs": written}


def _error_of(r: Any) -> RuntimeError:
    try:
        err = r.json()
    except ValueError:
        err = {"error": "http_error", "detail": r.text[:200]}
    return RuntimeError(f"HTTP {r.status_code} {err.get('error')}: {err.get('detail')}")


async def _scan_http(client: Any, job: Job, out: Path, auth: dict[str, str], params: dict[str, str]) -> None:
    """A scan as it is: its JSON answer, then its NIfTI mask, then (DICOM) its SEG; one request each."""
    body, ctype, filename = await asyncio.to_thread(scan_body, job)
    headers = {**auth, "Content-Type": ctype, "Content-Disposition": f'attachment; filename="{filename}"'}
    params = {k: v for k, v in params.items() if k != "series" or is_dicom_job(job)}  # --series: DICOM only
    answers: dict[str, Any] = {}
    for fmt in ("json", "nifti", "dicom-seg"):
        if fmt == "dicom-seg" and answers["json"].get("input") != "dicom":
            break
        r = await client.post("/v1/segment/volume", params={**params, "format": fmt}, content=body, headers=headers)
        if r.status_code != 200:
            raise _error_of(r)
        answers[fmt] = r.json() if fmt == "json" else r.content
        if "Warning" in r.headers:  # what a binary answer says beside it (e.g. a SEG's empty patient fields)
            answers["json"].setdefault("warnings", []).append(r.headers["Warning"])
    job.result = await asyncio.to_thread(write_scan_outputs, out, job, answers["json"], answers["nifti"],
                                         answers.get("dicom-seg"))
    job.result["model_version"] = answers["json"].get("model_version")


def query(sequences: list[str] | None = None, spacing: tuple[float, float, float] | None = None,
          series: dict[str, str] | None = None) -> dict[str, str]:
    """The volume endpoint's query parameters for the CLI's options (``sequences=``, ``spacing=``, ``series=``)."""
    params = {"sequences": ",".join(sequences)} if sequences else {}
    if spacing is not None:
        params["spacing"] = ",".join(repr(float(v)) for v in spacing)
    if series:
        params["series"] = ",".join(f"{k}={v}" for k, v in series.items())
    return params


def is_dicom_job(job: Job) -> bool:
    """A DICOM study (a folder, a zip, a .dcm): the only input ``series=`` applies to."""
    return job.kind == DICOM_FOLDER or scan_type(job.source) in (SCAN_TYPES[".zip"], SCAN_TYPES[".dcm"])


async def _run_http(jobs: list[Job], out: Path, url: str, token: str | None, concurrency: int,
                    timeout_s: float, params: dict[str, str]) -> None:
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
                    if job.kind != SLICES:
                        await _scan_http(client, job, out, auth, params)
                        return
                    body, kind, images, volume = await asyncio.to_thread(load, job)
                    path = "/v1/segment/volume" if volume else "/v1/segment"
                    extra = {k: v for k, v in params.items() if k == "spacing"}  # a slice's mm2 rules too
                    r = await client.post(path, params={"format": "npy", **extra}, content=body,
                                          headers={**auth, "Content-Type": kind})
                    if r.status_code != 200:
                        raise _error_of(r)
                    masks = np.load(io.BytesIO(r.content), allow_pickle=False)
                    said = volume_headers(r.headers) if volume else None
                    job.result = await asyncio.to_thread(write_outputs, out, job, images, masks, volume, scale, said)
                    job.result["model_version"] = r.headers.get("X-Model-Version")
                except (codecs.DecodeError, ValueError, RuntimeError, OSError, httpx.HTTPError) as exc:
                    job.result = {"input": str(job.source), "name": job.name, "error": f"{type(exc).__name__}: {exc}"}

        await asyncio.gather(*(one(j) for j in jobs))


def _scan_onnx(predictor: Any, job: Job, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """A scan read and segmented here as the server would (core.formats, core.inference.results)."""
    from core.formats.load import load_volume
    from core.inference.results import result_json, segment_volume
    from core.inference.spacing import scan_spacing

    body, _, filename = scan_body(job)
    volume = load_volume(body, sequences=options.get("sequences"), name=_stem(Path(filename)),
                         series=options.get("series") if is_dicom_job(job) else None)
    scan_spacing(volume, options.get("spacing"))  # a --spacing that contradicts the header is refused
    result = segment_volume(predictor, volume)
    answer = result_json(result.masks, predictor.version, result.class_names, scan=result)  # the server's JSON
    name = str(predictor.config.get("name") or "gliomaseg")
    seg = result.seg_bytes(name, predictor.version) if volume.kind == "dicom" else None
    return write_scan_outputs(out, job, answer, result.nifti_bytes(), seg)


def _run_onnx(jobs: list[Job], out: Path, model: str, options: dict[str, Any]) -> None:
    from core.inference.spacing import stack_spacing
    from serve.edge import OnnxPredictor  # optional path: onnxruntime loads only when asked for

    predictor = OnnxPredictor(model)
    scale = codecs.mask_scale(predictor.config["class_names"])
    spacing = options.get("spacing")
    for job in jobs:
        try:
            if job.kind != SLICES:
                job.result = _scan_onnx(predictor, job, out, options)
                continue
            _, _, images, volume = load(job)
            masks = predictor.predict(images, volume=volume, spacing=stack_spacing(spacing).mm if volume else None)
            said = local_volume_said(np.asarray(masks), spacing) if volume else None
            job.result = write_outputs(out, job, images, masks, volume, scale, said)
        except (codecs.DecodeError, ValueError, OSError) as exc:
            job.result = {"input": str(job.source), "name": job.name, "error": f"{type(exc).__name__}: {exc}"}


def predict_paths(inputs: list[str | Path], out: str | Path, url: str | None = None, token: str | None = None,
                  concurrency: int = 8, onnx: str | None = None, timeout_s: float = 300.0,
                  sequences: list[str] | None = None, spacing: tuple[float, float, float] | None = None,
                  series: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Segment every input, write outputs and ``summary.json`` under ``out``; returns the summary.
    ``sequences`` names each NIfTI scan's channels (as `core predict --sequences`), ``spacing`` is a slice
    stack's (slice, row, column) mm (as `core predict --spacing`), ``series`` a DICOM study's series
    (as `core predict --series`)."""
    if (url is None) == (onnx is None):
        raise ValueError("give exactly one of --url (a gliomaseg server) or --onnx (a local ONNX model)")
    jobs = collect(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if onnx:
        _run_onnx(jobs, out, onnx, {"sequences": sequences, "spacing": spacing, "series": series})
    else:
        params = query(sequences, spacing, series)
        asyncio.run(_run_http(jobs, out, str(url), token, max(1, concurrency), timeout_s, params))
    summary = [j.result for j in jobs]
    write_json(out / "summary.json", summary)
    return summary


def _cmd_predict(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the summary
    opts = from_args(args, ClientOptions)
    summary = predict_paths(opts.inputs, opts.out, url=opts.url, token=opts.token, concurrency=opts.concurrency,
                            onnx=opts.onnx, sequences=opts.sequences, spacing=opts.spacing, series=opts.series)
    failed = [s for s in summary if "error" in s]
    for s in summary:
        what = s.get("error") or f"{s['slices']} slice(s), {s['tumour_pixels']} tumour px"
        if s.get("volume_ml") is not None:
            what += f", {s['volume_ml']:.4g} mL"
        print(f"{s['input']}: {what}")
    print(f"{len(summary) - len(failed)}/{len(summary)} ok; outputs in {opts.out}")
    return 1 if failed else 0


@dataclass(kw_only=True)
class ClientOptions:
    """The `serve predict` options."""

    inputs: list[str] = field(metadata=meta(
        "slices (.tif/.png/.npy), patient folders, .nii/.nii.gz, DICOM .zip/.dcm or DICOM folders", positional=True,
        argument={"nargs": "+", "metavar": "FILES_OR_FOLDERS"}))
    url: str | None = field(default=None, metadata=meta("server base URL, e.g. http://127.0.0.1:8000"))
    token: str | None = field(default=None, metadata=meta("bearer token, if the server requires one"))
    out: str = field(metadata=meta("output folder (created)"))
    concurrency: int = field(default=8, metadata=meta("requests in flight"))
    onnx: str | None = field(default=None, metadata=meta("run this ONNX model locally instead of calling a server"))
    sequences: list[str] | None = sequences_field(
        "NIfTI scans: each channel's sequence in order, e.g. flair,t1,t1gd,t2 ('-' skips one), as for `core predict`")
    series: dict[str, str] | None = series_field(
        "DICOM studies: which series is which sequence by SeriesNumber, description or UID (repeatable; a number or "
        "UID alone is the FLAIR series), as for `core predict`")
    spacing: tuple[float, float, float] | None = spacing_field()


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "predict", _cmd_predict, ClientOptions,
                help="segment slice files, patient folders and scans (NIfTI, DICOM) via a server (or --onnx locally)")
