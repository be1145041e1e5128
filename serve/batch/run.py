"""The `serve batch` driver: plan the cohort, skip what is written, run the stages on Ray Data with the
resources the cluster has, then write patients.csv and summary.json."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from core.bundle.files import read_config
from core.config import BATCH_SIZE, meta
from core.inference.jobs import ScanFlags
from serve.batch import report
from serve.batch.plan import plan
from serve.batch.stages import Segmenter, read_patient, write_patient
from serve.batch.store import MARKER, Store, worker_runtime_env

log = logging.getLogger(__name__)

IO_CPUS = 0.25  # read/write tasks mostly wait on files or S3; a fraction lets them run beside the actors


@dataclass
class BatchRun:
    """The `serve batch` options of the run itself (BatchOptions adds how scans are read)."""

    # Strings, not Paths: s3:// bundles and prefixes are resolved by core.bundle.load_bundle and the Store.
    bundle: str = field(metadata=meta("bundle directory or s3://bucket/prefix"))
    src: str = field(metadata=meta(
        "folder or s3://bucket/prefix of patients: Kaggle-layout folders, NIfTI cases (<case>.nii.gz, "
        "<case>_0000.nii.gz ...) or DICOM studies (a folder or a .zip)"))
    out: str = field(metadata=meta("output folder or s3://bucket/prefix"))
    workers: int | None = field(default=None, metadata=meta(
        "predictor actors (default: one per GPU share, else CPUs - 1)"))
    gpus_per_worker: float | None = field(default=None, metadata=meta(
        "GPU share per actor (default 1 when the cluster has a GPU, else 0)"))
    cpus_per_worker: float = field(default=1.0, metadata=meta("CPUs (torch threads) per actor"))
    batch_size: int = field(default=BATCH_SIZE, metadata=meta("slices per forward pass"))
    progress: bool = field(default=True, metadata=meta("Ray Data's progress bars"))
    address: str | None = field(default=None, metadata=meta(
        "Ray cluster address (default: local or RAY_ADDRESS)"))


@dataclass
class BatchOptions(ScanFlags, BatchRun):
    """One `serve batch` run: the command's options, the run's first, then how scans are read (as core
    predict reads them)."""


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


def io_tasks(workers: int, gpus_per_worker: float) -> int:
    """Reads (and writes) in flight. On CPU one per actor: a patient's read is far shorter than its
    prediction, and each extra read or write process competes for the cores the actors' torch threads
    hold (a cause of run-to-run variance on a 2-core machine). A GPU actor outpaces one reader: two."""
    return max(1, (2 if gpus_per_worker > 0 else 1) * workers)


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
    remote_args = worker_runtime_env()  # S3 endpoint, region, profile: never the keys
    ds = ray.data.from_items([{"job": json.dumps(j)} for j in todo], override_num_blocks=len(todo))
    io_pool = ray.data.TaskPoolStrategy(size=min(len(todo), io_tasks(workers, gpw)))
    scan_options = {"sequences": opts.sequences, "series": opts.series, "rescale": opts.rescale,
                    "spacing": opts.spacing}
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
            # Ray starts workers at niceness +15: beside any other job the actors would get almost no CPU
            # while `core predict` runs at 0 (a cause of the unstable cohort times); a batch run is a
            # foreground job. Read by the raylet at start-up, so set before ray.init.
            os.environ.setdefault("RAY_worker_niceness", "0")
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
