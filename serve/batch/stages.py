"""The three Ray Data stages of `serve batch`: read and decode a patient (CPU task), predict it as one
volume (an actor holding the Predictor), encode, score and write it (CPU task). Each row is one patient;
whatever fails is named in the row (a file, the prediction, the write) instead of raising, so the rest of
the cohort completes. A written patient's ``patient.json`` carries core's result schema
(core.inference.results, without the RLE masks: they are the files beside it).
"""

from __future__ import annotations

import json
import time
from pathlib import PurePosixPath
from types import SimpleNamespace
from typing import Any

import numpy as np

# Light imports only: the read and write tasks load this module, and must not pay for torch.
from core.evaluation.metrics import segmentation_metrics
from core.formats.decoders import decode, stack_volume
from core.formats.encoders import encode_tiff, mask_scale
from core.formats.media import EXTENSIONS, DecodeError, error_answer
from core.inference.results import result_json
from core.inference.spacing import scan_spacing, stack_spacing
from serve.batch import scans
from serve.batch.store import Store

MAX_SIZE = 4096  # pixels a side, as `core predict` allows for local files (requests allow less)


def _decode(name: str, data: bytes) -> np.ndarray:
    """(H,W,3) from one slice file, by core.formats.codecs' rules (grey to 3 channels), uint16 kept as it is:
    a patient's slices are scaled together (stack_volume), a mask's values are labels."""
    pages = decode(data, EXTENSIONS.get(PurePosixPath(name).suffix.lower(), ""), volume=True,
                   max_size=MAX_SIZE, max_pages=64, max_pixels=64 * MAX_SIZE * MAX_SIZE, raw=True)
    if len(pages) != 1:
        raise ValueError(f"{len(pages)} pages; expected one slice per file")
    return pages[0]


def _truth(data: bytes, name: str, shape: tuple[int, ...], classes: int) -> np.ndarray:
    """A ground-truth mask as `core data prepare` reads it: 0/255 (or 0/1) -> 0/1, labels 0..K as they are;
    a 16-bit binary mask may use any one foreground value."""
    mask = _decode(name, data)[..., 0]
    if mask.shape != shape:
        raise ValueError(f"mask of {mask.shape}, its image is {shape}")
    values = set(np.unique(mask).tolist())
    if classes == 1:
        foreground = values - {0}
        if len(foreground) > 1 or (mask.dtype == np.uint8 and not foreground <= {1, 255}):
            raise ValueError(f"non-binary mask (values {sorted(values)[:8]}), expected 0/255")
        return (mask > 0).astype(np.uint8)
    if max(values) > classes:
        raise ValueError(f"label {max(values)} outside 0..{classes}")
    return mask.astype(np.uint8)


def _empty(meta: dict[str, Any]) -> dict[str, Any]:
    """The row of a patient that failed before prediction (``meta`` names why)."""
    return {"meta": json.dumps(meta), "images": np.zeros((0, 1, 1, 3), np.uint8),
            "truth": np.zeros((0, 1, 1), np.uint8)}


def _read_scan(job: dict[str, Any], src: Store, options: dict[str, Any]) -> dict[str, Any]:
    """A NIfTI case or DICOM study as one row: its canonical slices, and its geometry in the meta."""
    meta = {k: job[k] for k in ("patient", "name", "id", "outputs", "kind")}
    meta.update(error="", bad_files=[], has_truth=False)
    try:
        volume = scans.read_scan(job, src, options)
        scan_spacing(volume, options.get("spacing"))  # a --spacing that contradicts the header is refused
        meta.update(geometry=scans.pack(volume), spacing=[float(v) for v in volume.spacing])
    except Exception as exc:  # VolumeError names the problem; S3 and OS errors name the file
        named = scans.named_files(job, src)
        meta.update(error=f"{', '.join(named)}: {exc}", bad_files=named, error_code=error_answer(exc)[1]["error"])
        return _empty(meta)
    return {"meta": json.dumps(meta), "images": volume.images, "truth": np.zeros((0, 1, 1), np.uint8)}


def read_patient(row: dict[str, Any], src: Store, classes: int, scan_options: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Decode one patient; every unreadable file is named in ``bad_files``/``error`` instead of raising."""
    job = json.loads(row["job"])
    if job["kind"] != "slices":
        return _read_scan(job, src, scan_options or {})
    meta = {k: job[k] for k in ("patient", "name", "id", "outputs", "kind")}
    given = (scan_options or {}).get("spacing")  # the slices' (slice, row, column) mm; None: assumed
    meta.update(spacing=list(stack_spacing(given).mm), spacing_given=given is not None)
    if job.get("error"):  # slices the plan could not order (core.formats.cases.slice_order): its message
        meta.update(error=job["error"], bad_files=[src.where(job["patient"])], has_truth=False)
        return _empty(meta)
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
    volume = None
    if not bad:
        try:  # one intensity scale for the whole patient, as `core predict` and `serve predict` stack it
            volume = stack_volume(images, [src.where(f"{job['patient']}/{n}") for n in job["images"]])
        except DecodeError as exc:  # its detail starts with the file it names
            bad.append(exc.detail)
    meta.update(error="; ".join(bad), bad_files=[b.split(": ", 1)[0] for b in bad],
                has_truth=bool(job["masks"]) and not bad)
    if volume is None:  # a volume with a hole would be post-processed wrongly: the patient waits for a rerun
        return _empty(meta)
    return {"meta": json.dumps(meta), "images": volume,
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
                try:  # a scan at its own spacing, so post-processing in mm3 is what `core predict` applies
                    answer = self.predictor.segment(np.asarray(images), spacing=meta.get("spacing"))
                    mask = np.asarray(answer.masks)
                    quality, review = getattr(answer, "quality", None), getattr(answer, "review", None)
                    meta.update(quality=None if quality is None else float(quality),
                                review=None if review is None else bool(review))
                except Exception as exc:  # one bad volume (e.g. out of memory) must not end the cohort
                    meta.update(error=f"{meta['patient']}: prediction failed ({type(exc).__name__}: {exc})",
                                has_truth=False, error_code=error_answer(exc)[1]["error"])
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
        # error_code: core's one mapping (core.formats.media.error_answer), the code Serve and SageMaker answer
        return {"record": json.dumps({**record, "status": "failed", "error": meta["error"],
                                      "error_code": meta.get("error_code"), "files": meta.get("bad_files", [])})}
    try:
        masks = np.asarray(row["masks"])
        area = np.count_nonzero(masks.reshape(len(masks), -1), axis=1)
        record.update(status="segmented", tumour_voxels=int(area.sum()), largest_slice_area=int(area.max(initial=0)),
                      predict_s=meta.get("predict_s"), node=meta.get("node"), metrics=None, masks=meta["outputs"])
        if meta["has_truth"]:
            truth = np.asarray(row["truth"])
            names = class_names if len(class_names) > 2 else None  # as core evaluate passes them
            record["metrics"] = segmentation_metrics(masks, truth, np.full(len(masks), meta["id"]), names)
            tumour = int((np.count_nonzero(truth.reshape(len(truth), -1), axis=1) > 0).sum())
            record.update(truth_tumour_slices=tumour, truth_empty_slices=len(truth) - tumour)
        answer = SimpleNamespace(quality=meta.get("quality"), review=meta.get("review"))
        result = None
        if meta.get("kind", "slices") != "slices":
            result = scans.scan_result(meta["geometry"], masks, class_names, answer.quality, answer.review)
            files = scans.scan_files(result, model[0] or "gliomaseg", model[1] or "unknown")
        spacing = None
        if result is None:  # slices: at the spacing given, else the assumed one, as every path says it
            scale = mask_scale(class_names)
            files = {f: encode_tiff(m, scale) for f, m in zip(record["masks"], masks, strict=True)}
            spacing = stack_spacing(meta["spacing"] if meta.get("spacing_given") else None)
        record.update(result_json(masks, model[1] or "unknown", class_names, scan=result, answer=answer, rle=False,
                                  spacing=spacing))
        out.write_patient(meta["name"], files, record)
    except Exception as exc:  # a full disk or a refused S3 write fails this patient, not the cohort
        return {"record": json.dumps({**record, "status": "failed",
                                      "error": f"{out.where(meta['name'])}: write failed ({exc})"})}
    return {"record": json.dumps(record)}


