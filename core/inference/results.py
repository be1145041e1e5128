"""One segmentation result, one JSON schema: what Serve, SageMaker, `serve batch` and `core predict` answer.

``result_json`` describes the masks of a slice, a slice stack or a scan (all keys always present; README
"Result JSON" lists them with their types): per-slice and whole tumour areas, the volume in mL where a
scan's spacing gives it, the scan's geometry, the answer's ``quality`` and ``review`` flag, what a
per-patient bundle did with single slices, and the masks as COCO RLE. ``VolumeResult`` is a scan's
masks beside the Volume that maps them back to its grid (NIfTI, DICOM SEG out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from core.formats.encoders import rle_encode
from core.formats.media import SLICES

if TYPE_CHECKING:
    from core.formats.volume import Volume
    from core.inference.slices import SlicePredictor
    from core.inference.spacing import VoxelSpacing

CANONICAL_ORDER = ("axial slices, the first the most inferior; rows toward posterior, columns toward the "
                   "patient's left (the Kaggle display orientation)")
STACK_ORDER = "the slices in the order they were sent"
SCAN_FIELDS = ("kind", "source_shape", "plane", "sources", "filled_with_flair", "notes")  # of Volume.summary()
# The schema: every key result_json writes, with its JSON type(s); README "Result JSON" explains each.
RESULT_KEYS: dict[str, tuple[type, ...]] = {
    "model_version": (str,), "input": (str,), "volume": (bool,), "slices": (int,), "size": (list,),
    "tumour_pixels": (int,), "tumour_fraction": (float,), "tumour_slices": (int,), "slice_tumour_pixels": (list,),
    "slice_order": (str,), "volume_ml": (float, type(None)), "class_ml": (dict, type(None)),
    "voxel_ml": (float, type(None)), "spacing_mm": (list, type(None)), "scan": (dict, type(None)),
    "quality": (float, type(None)), "review": (bool, type(None)), "preprocessing_note": (str, type(None)),
    "masks_rle": (list, type(None)),
}


@dataclass
class VolumeResult:
    """A scan's masks: canonical (N,H,W) labels beside the Volume that maps them back to the source."""

    volume: Volume
    masks: np.ndarray
    class_names: list[str]
    quality: float | None = None  # 0-1, higher = more trustworthy (core.inference.quality)
    review: bool | None = None  # quality below the bundle's review threshold

    @property
    def volume_ml(self) -> float:
        return self.volume.volume_ml(self.masks)

    def class_ml(self) -> dict[str, float]:
        return {name: self.volume.volume_ml(self.masks, k) for k, name in enumerate(self.class_names) if k}

    def nifti_bytes(self) -> bytes:
        from core.formats.nifti import nifti_mask_bytes

        return nifti_mask_bytes(self.volume, self.masks, labels=len(self.class_names) - 1)

    def seg_bytes(self, model: str, version: str) -> bytes:
        from core.formats.dicom_seg import dicom_seg_bytes

        return dicom_seg_bytes(self.volume, self.masks, self.class_names, model=model, version=version)


def segment_volume(predictor: SlicePredictor, volume: Volume) -> VolumeResult:
    """Predict a scan's canonical slices as one patient's volume (the bundle's 3D post-processing applies)."""
    answer = predictor.segment(volume.images, spacing=volume.spacing)
    return VolumeResult(volume, np.asarray(answer.masks, np.uint8),
                        list(predictor.config.get("class_names", ["background", "tumour"])),
                        getattr(answer, "quality", None), getattr(answer, "review", None))


def review_label(review: bool | None) -> str:
    """A CSV cell for a review flag: "review", "ok", or empty where the bundle chose no threshold."""
    return "" if review is None else ("review" if review else "ok")


def masks_rle(masks: np.ndarray, class_names: Sequence[str]) -> list[Any]:
    """Per slice: its mask as COCO RLE, or for a multi-class model {class name: RLE} of the labels present."""
    if len(class_names) > 2:
        return [{class_names[k]: rle_encode(m == k) for k in np.unique(m[m > 0]).tolist()} for m in masks]
    return [rle_encode(m) for m in masks]


def result_json(masks: np.ndarray, model_version: str, class_names: Sequence[str], *,
                scan: VolumeResult | None = None, answer: Any = None, volume: bool = True,
                note: str | None = None, rle: bool = True, spacing: VoxelSpacing | None = None) -> dict[str, Any]:
    """The result schema (RESULT_KEYS) for (N,H,W) masks: ``scan`` for a NIfTI or DICOM input (its mL and
    geometry), ``spacing`` a slice stack's (core.inference.spacing: its mL where the client gave it, a note
    where it was assumed), ``answer`` the predictor's volume answer (its ``quality`` and ``review``, read
    where present; the scan's by default), ``volume`` whether the slices were segmented as one patient,
    ``note`` a per-patient bundle's single-slice note, ``rle`` whether the masks travel in the body (False
    where they are written beside it). ``notes`` gathers what the answer assumed or did (``answer_notes``)."""
    masks = np.asarray(masks)
    areas = [int(a) for a in np.count_nonzero(masks.reshape(len(masks), -1), axis=1)]
    answer = scan if answer is None else answer
    quality = getattr(answer, "quality", None)
    body: dict[str, Any] = {
        "model_version": str(model_version), "input": scan.volume.kind if scan else SLICES, "volume": bool(volume),
        "slices": len(masks), "size": [int(s) for s in masks.shape[1:3]], "tumour_pixels": sum(areas),
        "tumour_fraction": sum(areas) / masks.size if masks.size else 0.0,
        "tumour_slices": sum(a > 0 for a in areas), "slice_tumour_pixels": areas,
        "slice_order": CANONICAL_ORDER if scan else STACK_ORDER,
        "volume_ml": None, "class_ml": None, "voxel_ml": None, "spacing_mm": None, "scan": None,
        "quality": None if quality is None else float(quality),
        "review": None if getattr(answer, "review", None) is None else bool(answer.review),
        "preprocessing_note": note, "notes": answer_notes(scan, spacing),
        "masks_rle": masks_rle(masks, class_names) if rle else None,
    }
    if scan is not None:
        summary = scan.volume.summary()
        body.update(volume_ml=float(scan.volume_ml), class_ml=scan.class_ml(), voxel_ml=float(summary["voxel_ml"]),
                    spacing_mm=summary["spacing_mm"], scan={k: summary[k] for k in SCAN_FIELDS})
    elif spacing is not None and spacing.known:  # a slice stack whose spacing the client gave
        voxel = spacing.voxel_ml
        body.update(volume_ml=sum(areas) * voxel, voxel_ml=voxel, spacing_mm=list(spacing.mm),
                    class_ml={name: float(np.count_nonzero(masks == k)) * voxel
                              for k, name in enumerate(class_names) if k})
    return body


def answer_notes(scan: VolumeResult | None, spacing: VoxelSpacing | None = None) -> list[str]:
    """What an answer says beside its masks: a scan's notes (sequences, series, resampling ...), and the
    spacing a slice stack was assumed to have. JSON answers carry them as ``notes``, binary ones beside them
    (``notes_header``, or a JSON side file in the CLIs)."""
    notes = list(scan.volume.notes) if scan is not None else []
    said = spacing.note() if spacing is not None else None
    return [*notes, said] if said else notes


def notes_header(notes: Sequence[str]) -> dict[str, str]:
    """``X-Notes``: the notes as a JSON list in ASCII (a header is one Latin-1 line), ``[]`` when there are none."""
    import json

    return {"X-Notes": json.dumps(list(notes), ensure_ascii=True)}
