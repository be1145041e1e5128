"""What `serve batch` reports: ``patients.csv``, ``summary.json`` and the cohort metrics, from the
per-patient records (``<patient>/patient.json``), including those of patients a rerun skipped."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

# Slice means are weighted by the slices they average over when patients are combined.
WEIGHTS = {"dice_tumour": "truth_tumour_slices", "dice_all": "slices", "fp_slice_rate": "truth_empty_slices"}
# volume_ml: the tumour volume from the voxel spacing: a scan's, or --spacing for slices (blank without one)
# quality: 0-1, higher = more trustworthy; review: true where it is below the bundle's cut (core.inference.quality)
CSV_COLUMNS = ["patient", "status", "slices", "tumour_slices", "tumour_voxels", "largest_slice_area", "volume_ml",
               "quality", "review"]


def combine_metrics(records: list[dict[str, Any]]) -> dict[str, float] | None:
    """Cohort metrics from each patient's ``core.evaluation.metrics.segmentation_metrics``: volume metrics (dsc_volume,
    iou, dice_<class>) are means over patients, ``*_min`` the worst patient's, slice metrics are weighted by the
    slices they average over, so they equal `core evaluate`'s on the whole cohort (to float rounding)."""
    rows = [r for r in records if r.get("metrics")]
    if not rows:
        return None
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for r in rows for k in r["metrics"]):
        pairs = [(float(r[WEIGHTS[key]]) if key in WEIGHTS else 1.0, float(r["metrics"][key])) for r in rows]
        pairs = [(w, v) for w, v in pairs if w > 0 and not math.isnan(v)]  # NaN: nothing to average there
        if key.endswith("_min"):  # the worst patient's (dsc_volume_min): the cohort's worst, not a mean
            out[key] = min(v for _, v in pairs) if pairs else float("nan")
            continue
        out[key] = sum(w * v for w, v in pairs) / sum(w for w, _ in pairs) if pairs else float("nan")
    return out


def patients_csv(written: list[dict[str, Any]]) -> bytes:
    """One row per written patient: its statistics and, where it had masks, its metrics (blank if undefined)."""
    keys = list(dict.fromkeys(k for r in written if r.get("metrics") for k in r["metrics"]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS + keys)
    writer.writeheader()
    for r in written:
        m = r.get("metrics") or {}
        writer.writerow({**{c: r.get(c) for c in CSV_COLUMNS},
                         **{k: "" if math.isnan(m.get(k, math.nan)) else round(m[k], 6) for k in keys}})
    return buffer.getvalue().encode()


def summary(records: list[dict[str, Any]], settings: dict[str, Any], config: dict[str, Any],
            timing: dict[str, Any], seconds: float) -> dict[str, Any]:
    """summary.json: counts, failures by file, cohort metrics, settings and where the time went."""
    written = [r for r in records if r["status"] != "failed"]
    failed = [r for r in records if r["status"] == "failed"]
    segmented = [r for r in records if r["status"] == "segmented"]
    metrics = combine_metrics(written)
    return {
        "bundle": {"uri": settings["bundle"], "name": config.get("name"), "version": config.get("version", "unknown"),
                   "postprocess": config.get("postprocess", {}), "threshold": config.get("threshold")},
        "src": settings["src"], "out": settings["out"], "patients": len(records), "written": len(written),
        "segmented": [r["patient"] for r in segmented],
        "skipped": [r["patient"] for r in records if r["status"] == "skipped"],
        "failed": [{"patient": r["patient"], "files": r.get("files", []), "error": r["error"],
                    "error_code": r.get("error_code")} for r in failed],  # the code Serve and SageMaker answer
        "unreadable": [f for r in failed for f in r.get("files", [])],
        "slices": sum(r["slices"] for r in written), "tumour_slices": sum(r["tumour_slices"] for r in written),
        "tumour_voxels": sum(r["tumour_voxels"] for r in written),
        "metrics": metrics, "metrics_patients": sum(1 for r in written if r.get("metrics")),
        "settings": settings, "seconds": round(seconds, 3),
        "slices_per_s": round(sum(r["slices"] for r in segmented) / seconds, 3) if seconds > 0 else None,
        # Where the time went: the first patient back (actors starting up), the rate after it, the model.
        **{k: None if v is None else round(v, 3) for k, v in timing.items()},
        "predict_s": round(sum(r.get("predict_s") or 0.0 for r in segmented), 3),
        "nodes": len({r.get("node") for r in segmented}),  # that ran the model
    }
