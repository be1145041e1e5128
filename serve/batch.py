"""`python -m serve batch`: segment a whole cohort (a folder or ``s3://`` prefix of patients) with Ray Data.

A patient is a Kaggle-layout folder of TIFF/PNG slices, a NIfTI case or a DICOM study (serve/batch_scans.py:
masks as NIfTI on the scan's grid, a DICOM SEG for DICOM, the tumour volume in mL in patients.csv).
One row per patient (a volume is a few MB), so a patient's slices stay together and in order and the
bundle's 3D post-processing applies exactly as in `core evaluate` and `core predict`. Three stages stream through the
cluster: read and decode (CPU tasks) -> predict (an actor pool, each actor loading the bundle once,
on a GPU share when asked) -> encode, score and write (CPU tasks). Every patient is committed as a
unit with its ``patient.json`` record (serve/batch_store.py), so a rerun skips finished patients and
a crash loses none. An unreadable slice fails only its patient, named by file in the log and in
``summary.json``; the rest of the cohort completes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from core.evaluation.metrics import segmentation_metrics

# Light imports only: the read and write tasks load this module, and must not pay for torch.
from core.formats.codecs import EXTENSIONS, decode, encode_tiff, mask_scale
from core.inference.bundle_uri import read_config
from serve import batch_report as report
from serve import batch_scans as scans
from serve.batch_plan import plan
from serve.batch_store import MARKER, Store, worker_env

log = logging.getLogger(__name__)

IO_CPUS = 0.25  # read/write tasks mostly wait on files or S3; a fraction lets them run beside the actors
MAX_SIZE = 4096  # pixels a side, as `core predict` allows for local files (requests allow less)


@dataclass
class BatchOptions:
    """One `serve batch` run: the command's options."""

    bundle: str  # a str, not a Path: s3:// bundles are resolved by core.bundle.load_bundle
    src: str
    out: str
    workers: int | None = None  # default: one per GPU share, else (CPUs - 1) / cpus_per_worker
    gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    batch_size: int = 32
    progress: bool = True  # Ray Data's progress bars
    address: str | None = None  # Ray to start or join when none is running (None: local or RAY_ADDRESS)
    sequences: list[str] | None = None  # NIfTI channel names (core predict --sequences); None: dataset.json/default
    series: dict[str, str] | None = None  # DICOM sequence -> series (core predict --series); None: descriptions
    rescale: str = "auto"  # scan intensities to uint8 (core predict --rescale)


def _decode(name: str, data: bytes) -> np.ndarray:
    """(H,W,3) uint8 from one slice file, by core.formats.codecs' rules (uint16 rescaled, grey to 3 channels)."""
    pages = decode(data, EXTENSIONS.get(PurePosixPath(name).suffix.lower(), ""), volume=True,
                   max_size=MAX_SIZE, max_pages=64, max_pixels=64 * MAX_SIZE * MAX_SIZE)
    if len(pages) != 1:
        raise ValueError(f"{len(pages)} pages; expected one slice per file")
    return pages[0]


def _truth(data: bytes, name: str, shape: tuple[int, ...], classes: int) -> np.ndarray:
    """A ground-truth mask as `core data prepare` reads it: 0/255 (or 0/1) -> 0/1, labels 0..K as they are."""
    mask = _decode(name, data)[..., 0]
    if mask.shape != shape:
        raise ValueError(f"mask of {mask.shape}, its image is {shape}")
    values = set(np.unique(mask).tolist())
    if classes == 1:
        if not (values <= {0, 255} or values <= {0, 1}):
            raise ValueError(f"non-binary mask (values {sorted(values)[:8]}), expected 0/255")
        return (mask > 0).astype(np.uint8)
    if max(values) > classes:
        raise ValueError(f"label {max(values)} outside 0..{classes}")
    return mask


def _read_scan(job: dict[str, Any], src: Store, options: dict[str, Any]) -> dict[str, Any]:
    """A NIfTI case or DICOM study as one row: its canonical slices, and its geometry in the meta."""
    meta = {k: job[k] for k in ("patient", "name", "id", "outputs", "kind")}
    meta.update(error="", bad_files=[], has_truth=False)
    try:
        volume = scans.read_scan(job, src, options)
        meta["geometry"] = scans.pack(volume)
    except Exception as exc:  # VolumeError names the problem; S3 and OS errors name the file
        named = scans.named_files(job, src)
        meta.update(error=f"{', '.join(named)}: {exc}", bad_files=named)
        return {"meta": json.dumps(meta), "images": np.zeros((0, 1, 1, 3), np.uint8),
                "truth": np.zeros((0, 1, 1), np.uint8)}
    return {"meta": json.dumps(meta), "images": volume.images, "truth": np.zeros((0, 1, 1), np.uint8)}


def read_patient(row: dict[str, Any], src: Store, classes: int, scan_options: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Decode one patient; every unreadable file is named in ``bad_files``/``error`` instead of raising."""
    job = json.loads(row["job"])
    if job["kind"] != "slices":
        return _read_scan(job, src, scan_options or {})
    images: list[np.ndarray] = []
    truth: list[np.ndarray] = []
    bad: list[str] = []
    for i, name in enumerate(job["images"]):
        rel = f"{job['patient']}/{name}"
        try:
            image = _decode(name, src.read(rel))
            if images and image.shape != images[0].shape:
                raise ValueError(f"size {image.shape[:2]} differs from the patient's first slice {images[0].shape[:2]}")
            images.append(image)
        except Exception as exc:  # decoders and S3 raise many types; the file name is what matters
            bad.append(f"{src.where(rel)}: {exc}")
            continue
        if job["masks"]:
            mask_rel = f"{job['patient']}/{job['masks'][i]}"
            try:
                truth.append(_truth(src.read(mask_rel), job["masks"][i], image.shape[:2], classes))
            except Exception as exc:
                bad.append(f"{src.where(mask_rel)}: {exc}")
    meta = {k: job[k] for k in ("patient", "name", "id", "outputs", "kind")}
    meta.update(error="; ".join(bad), bad_files=[b.split(": ", 1)[0] for b in bad],
                has_truth=bool(job["masks"]) and not bad)
    if bad:  # a volume with a hole would be post-processed wrongly: the patient waits for a rerun
        return {"meta": json.dumps(meta), "images": np.zeros((0, 1, 1, 3), np.uint8),
                "truth": np.zeros((0, 1, 1), np.uint8)}
    return {"meta": json.dumps(meta), "images": np.stack(images),
            "truth": np.stack(truth) if truth else np.zeros((0, 1, 1), np.uint8)}


class Segmenter:
    """The actor-pool stage: loads the bundle once per actor, predicts each patient as one volume."""

    def __init__(self, bundle: str, device: str, batch_size: int, threads: int) -> None:
        import ray
        import torch

        from core.inference.predictor import Predictor

        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        if device == "cpu":
            torch.set_num_threads(max(1, threads))  # what the actor reserved, as in the single-process run
        self.predictor = Predictor.from_bundle(bundle, device, batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        metas, masks = [], []
        for meta_json, images in zip(batch["meta"], batch["images"], strict=True):
            meta = json.loads(str(meta_json))
            mask = np.zeros((0, 1, 1), np.uint8)
            if not meta["error"]:
                t0 = time.perf_counter()
                try:
                    # A scan's post-processing rules apply at its own spacing (the Kaggle grid's for slices).
                    spacing = scans.unpack(meta["geometry"]).spacing if "geometry" in meta else None
                    answer = self.predictor.segment(np.asarray(images), spacing)
                    mask = np.asarray(answer.masks)
                    meta.update(quality=answer.quality, review=answer.review)
                except Exception as exc:  # one bad volume (e.g. out of memory) must not end the cohort
                    meta.update(error=f"{meta['patient']}: prediction failed ({type(exc).__name__}: {exc})",
                                has_truth=False)
                meta.update(predict_s=time.perf_counter() - t0, node=self.node)
            metas.append(json.dumps(meta))
            masks.append(mask)
        return {"meta": np.array(metas, dtype=object), "masks": _column(masks), "truth": _column(list(batch["truth"]))}


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """A batch column: stacked when the shapes agree, else an object array (Ray's ragged tensors)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def write_patient(row: dict[str, Any], out: Store, class_names: list[str], model: tuple[str, str] = ("", "")
                  ) -> dict[str, str]:
    """Masks as ``<slice>_mask.tif`` (0/255), or for a scan ``<name>_mask.nii.gz`` on its grid (and
    ``<name>_seg.dcm`` for DICOM), the patient's statistics and metrics, committed together. ``model`` is
    the bundle's (name, version), which a DICOM SEG records."""
    meta = json.loads(row["meta"])
    record: dict[str, Any] = {k: meta[k] for k in ("patient", "name", "id")}
    if meta["error"]:
        return {"record": json.dumps({**record, "status": "failed", "error": meta["error"],
                                      "files": meta.get("bad_files", [])})}
    try:
        masks = np.asarray(row["masks"])
        area = np.count_nonzero(masks.reshape(len(masks), -1), axis=1)
        record.update(status="segmented", slices=len(masks), tumour_slices=int((area > 0).sum()),
                      tumour_voxels=int(area.sum()), largest_slice_area=int(area.max(initial=0)),
                      predict_s=meta.get("predict_s"), node=meta.get("node"), metrics=None,
                      quality=meta.get("quality"), review=meta.get("review"))
        record["masks"] = meta["outputs"]
        if meta["has_truth"]:
            truth = np.asarray(row["truth"])
            names = class_names if len(class_names) > 2 else None  # as core evaluate passes them
            record["metrics"] = segmentation_metrics(masks, truth, np.full(len(masks), meta["id"]), names)
            tumour = int((np.count_nonzero(truth.reshape(len(truth), -1), axis=1) > 0).sum())
            record.update(truth_tumour_slices=tumour, truth_empty_slices=len(truth) - tumour)
        if meta.get("kind", "slices") != "slices":
            files, fields = scans.scan_files(meta["geometry"], masks, class_names, model[0] or "gliomaseg",
                                             model[1] or "unknown")
            record.update(fields)
        else:
            scale = mask_scale(class_names)
            files = {f: encode_tiff(m, scale) for f, m in zip(record["masks"], masks, strict=True)}
        out.write_patient(meta["name"], files, record)
    except Exception as exc:  # a full disk or a refused S3 write fails this patient, not the cohort
        return {"record": json.dumps({**record, "status": "failed",
                                      "error": f"{out.where(meta['name'])}: write failed ({exc})"})}
    return {"record": json.dumps(record)}


# ------------------------------------------------------------------------------------------ driver


def _resources(opts: BatchOptions, patients: int) -> tuple[int, float]:
    """(workers, GPUs per worker) from the options and the running cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    gpw = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if gpus > 0 else 0.0)
    if gpw > 0 and gpus == 0:
        if opts.workers is None:
            raise ValueError(f"--gpus-per-worker {gpw} but the Ray cluster has no GPU now; give --workers to wait "
                             "for an autoscaler to add GPU nodes")
        log.warning("no GPU in the cluster yet: the %d actors wait for the autoscaler to add GPU nodes", opts.workers)
    workers = opts.workers or (int(gpus // gpw) if gpw > 0 else int((cpus - 1) // opts.cpus_per_worker))
    workers = max(1, min(workers, patients))
    # CPU actors holding every CPU would leave none for the reads: the pipeline would wait forever.
    if gpw == 0 and workers * opts.cpus_per_worker + IO_CPUS > cpus:
        raise ValueError(f"{workers} workers x {opts.cpus_per_worker} CPUs leave none of the cluster's {cpus:g} "
                         "CPUs for reading and writing; lower --workers or --cpus-per-worker")
    return workers, gpw


def _segment(todo: list[dict[str, Any]], src: Store, out: Store, config: dict[str, Any],
             opts: BatchOptions) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    import ray

    workers, gpw = _resources(opts, len(todo))
    class_names = list(config.get("class_names", ["background", "tumour"]))
    model = (str(config.get("name") or "gliomaseg"), str(config.get("version") or "unknown"))
    ray.data.DataContext.get_current().enable_progress_bars = opts.progress
    if len(ray.nodes()) > 1 and not (src.remote and out.remote):
        log.warning("local --src/--out on a %d-node cluster: every node must see them (a shared file system); "
                    "else use s3://", len(ray.nodes()))
    env = worker_env()
    remote_args: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    ds = ray.data.from_items([{"job": json.dumps(j)} for j in todo], override_num_blocks=len(todo))
    # Two reads and two writes in flight per actor keep it fed without a process per fractional CPU.
    io_pool = ray.data.TaskPoolStrategy(size=min(len(todo), 2 * workers))
    scan_options = {"sequences": opts.sequences, "series": opts.series, "rescale": opts.rescale}
    ds = ds.map(read_patient, fn_kwargs={"src": src, "classes": max(1, len(class_names) - 1),
                                         "scan_options": scan_options},
                compute=io_pool, num_cpus=IO_CPUS, **remote_args)
    ds = ds.map_batches(
        Segmenter, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"bundle": opts.bundle, "device": "cuda" if gpw > 0 else "cpu",
                               "batch_size": opts.batch_size, "threads": max(1, round(opts.cpus_per_worker))},
        # Ray Data spreads the pool's actors over the nodes by default (DataContext.scheduling_strategy).
        num_cpus=opts.cpus_per_worker, num_gpus=gpw or None, **remote_args,
    )
    ds = ds.map(write_patient, fn_kwargs={"out": out, "class_names": class_names, "model": model},
                compute=io_pool, num_cpus=IO_CPUS, **remote_args)
    records: list[dict[str, Any]] = []
    start, seen = time.perf_counter(), []  # (seconds, slices) of each segmented patient as it comes back
    for row in ds.iter_rows():
        record = json.loads(row["record"])
        records.append(record)
        if record["status"] == "failed":
            log.error("patient %s failed: %s", record["patient"], record["error"])
        else:
            seen.append((time.perf_counter() - start, record["slices"]))
            log.info("patient %s: %d slices, %d with tumour -> %s", record["patient"], record["slices"],
                     record["tumour_slices"], out.where(record["name"]))
    # The first patient waits for the actors to start; the rate after it is the pipeline's steady pace.
    after = None
    if len(seen) > 1 and seen[-1][0] > seen[0][0]:
        after = sum(n for _, n in seen[1:]) / (seen[-1][0] - seen[0][0])
    timing = {"first_patient_s": seen[0][0] if seen else None, "slices_per_s_after_first": after}
    return records, {"workers": workers, "gpus_per_worker": gpw}, timing


def run_batch(opts: BatchOptions) -> dict[str, Any]:
    """Segment every unfinished patient of ``opts.src`` into ``opts.out``; write patients.csv and
    summary.json; return the summary. Uses the running Ray, or starts one when any patient is left."""
    start = time.perf_counter()
    src, out = Store(opts.src), Store(opts.out)
    if src.same_place(out):
        raise ValueError(f"--out {opts.out} is --src: masks named <slice>_mask.tif would overwrite the ground truth")
    config = read_config(opts.bundle)  # fails early, before any worker starts, on a wrong bundle URI
    jobs = plan(src)
    done = out.finished()
    todo = [j for j in jobs if j["name"] not in done]
    records: list[dict[str, Any]] = []
    for job in jobs:
        if job["name"] in done:
            records.append({**out.read_json(f"{job['name']}/{MARKER}"), "status": "skipped"})
    log.info("%d patients in %s: %d already written in %s (skipped), %d to segment",
             len(jobs), opts.src, len(jobs) - len(todo), opts.out, len(todo))
    resolved: dict[str, Any] = {"workers": 0, "gpus_per_worker": opts.gpus_per_worker}
    timing: dict[str, Any] = {"first_patient_s": None, "slices_per_s_after_first": None}
    if todo:
        import ray

        started = not ray.is_initialized()  # only now: a wrong URI or a finished cohort needs no Ray
        if started:
            ray.init(address=opts.address, configure_logging=False)
        try:
            new, resolved, timing = _segment(todo, src, out, config, opts)
        finally:
            if started:
                ray.shutdown()
        records += new
    order = {j["name"]: i for i, j in enumerate(jobs)}
    records.sort(key=lambda r: order[r["name"]])
    settings = {**{k: v for k, v in asdict(opts).items() if k not in ("progress", "address")}, **resolved}
    summary = report.summary(records, settings, config, timing, time.perf_counter() - start)
    out.write("patients.csv", report.patients_csv([r for r in records if r["status"] != "failed"]))
    out.write("summary.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return summary


# --------------------------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="segment a cohort (folder or s3:// prefix of patients: slices, NIfTI or DICOM) with Ray Data",
        description="Writes OUT/<patient>/<slice>_mask.tif for a folder of slices, OUT/<case>/<case>_mask.nii.gz "
        "for a NIfTI case or DICOM study (and <case>_seg.dcm, a DICOM SEG, for DICOM), patients.csv (with the "
        "tumour volume in mL for scans) and summary.json (with the metrics where the source has masks). A rerun "
        "skips patients already written. Exit status 1 when a patient failed.",
    )
    p.add_argument("--bundle", required=True, help="bundle directory or s3://bucket/prefix")
    p.add_argument("--src", required=True, help="folder or s3://bucket/prefix of patients: Kaggle-layout folders, "
                   "NIfTI cases (<case>.nii.gz, <case>_0000.nii.gz ...) or DICOM studies (a folder or a .zip)")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--workers", type=int, default=None,
                   help="predictor actors (default: one per GPU share, else CPUs - 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPU share per actor (default 1 when the cluster has a GPU, else 0)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (torch threads) per actor")
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local or RAY_ADDRESS)")
    p.add_argument("--sequences", help="NIfTI: each channel's sequence in order, e.g. flair,t1,t1gd,t2 (as core "
                   "predict; default: the dataset.json beside the files, else 1 channel FLAIR, 3 the Kaggle order)")
    p.add_argument("--series", action="append", metavar="SEQ=SERIES", help="DICOM: which series is which sequence "
                   "(pre, flair, post) by number, description or UID; repeatable (default: SeriesDescription)")
    p.add_argument("--rescale", default="auto", choices=("auto", "percentile", "none"),
                   help="scan intensities to uint8 (as core predict)")
    p.set_defaults(func=_cmd_batch)


def _cmd_batch(args: argparse.Namespace) -> int:
    from core.inference.predict import parse_series

    summary = run_batch(BatchOptions(
        bundle=args.bundle, src=args.src, out=args.out, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size, address=args.address,
        sequences=args.sequences.split(",") if args.sequences else None, series=parse_series(args.series),
        rescale=args.rescale))
    m = summary["metrics"]
    scores = f"; dsc_volume={m['dsc_volume']:.4f} dice_tumour={m['dice_tumour']:.4f}" if m else ""
    print(f"{summary['written']} of {summary['patients']} patients written ({len(summary['skipped'])} skipped, "
          f"{len(summary['failed'])} failed), {summary['slices']} slices{scores}; {args.out}/summary.json")
    return 1 if summary["failed"] else 0
