"""DICOM SEG out (highdicom): a mask on the source series' grid, referencing its instances (or, for an
enhanced image, its frames), so PACS viewers (OHIF, 3D Slicer, Weasis) overlay it on the series it was
predicted from. Type 2 patient/study attributes the source lacks (anonymised) go into the SEG empty."""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from core.formats.dicom import missing_type2
from core.formats.volume import Volume, VolumeError

# SNOMED CT property types per class name; anything else is a generic tissue segment
PROPERTY_TYPES = {
    "tumour": codes.SCT.Neoplasm, "tumor": codes.SCT.Neoplasm, "tumour_core": codes.SCT.Neoplasm,
    "oedema": codes.SCT.Edema, "edema": codes.SCT.Edema, "csf": codes.SCT.CerebrospinalFluid,
    "white_matter": codes.SCT.WhiteMatter, "grey_matter": codes.SCT.GrayMatter,
}
ABNORMAL = {"tumour", "tumor", "tumour_core", "oedema", "edema"}


def segment_descriptions(class_names: Sequence[str], model: str, version: str) -> list[hd.seg.SegmentDescription]:
    """One segment per foreground class (label k is segment k), written by this model as an AI algorithm."""
    algorithm = hd.AlgorithmIdentificationSequence(name=model[:64] or "gliomaseg",
                                                   family=codes.cid7162.ArtificialIntelligence,
                                                   version=version[:64] or "unknown")
    out = []
    for k, name in enumerate(class_names[1:], start=1):
        key = name.lower()
        category = codes.SCT.MorphologicallyAbnormalStructure if key in ABNORMAL else codes.SCT.Tissue
        out.append(hd.seg.SegmentDescription(
            segment_number=k, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=PROPERTY_TYPES.get(key, codes.SCT.Tissue),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        ))
    return out


def dicom_seg(
    volume: Volume,
    masks: np.ndarray,
    class_names: Sequence[str] = ("background", "tumour"),
    *,
    model: str = "gliomaseg",
    version: str = "unknown",
    series_number: int = 9900,
) -> hd.seg.Segmentation:
    """(N,H,W) canonical label masks of a Volume read from DICOM -> a BINARY DICOM SEG whose frames are
    the source series' instances, or the source image's frames (same frame of reference, study and patient)."""
    if volume.kind != "dicom" or not volume.datasets:
        raise ValueError(f"{volume.name}: a DICOM SEG needs a volume read from DICOM (this one is {volume.kind})")
    labels = volume.to_source(np.asarray(masks).astype(np.uint8)).transpose(2, 1, 0)  # (slice, row, column)
    if volume.frames:  # one enhanced image: highdicom pairs mask i with its frame i, so put them in frame order
        if len(volume.datasets) != 1 or labels.shape[0] != len(volume.frames):
            raise ValueError(f"{labels.shape[0]} mask slices for {len(volume.frames)} frames of "
                             f"{len(volume.datasets)} source image(s)")
        in_frames = np.empty_like(labels)
        in_frames[np.asarray(volume.frames)] = labels
        labels = in_frames
    elif labels.shape[0] != len(volume.datasets):
        raise ValueError(f"{labels.shape[0]} mask slices for {len(volume.datasets)} source instances")
    if int(labels.max(initial=0)) >= len(class_names):
        raise ValueError(f"label {int(labels.max())} has no class name (classes {list(class_names)})")
    sources = [_with_type2(ds) for ds in volume.datasets]
    try:
        return _segmentation(sources, labels, class_names, model, version, series_number)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a source header highdicom cannot use
        raise VolumeError(f"{volume.name}: no DICOM SEG can reference this series ({type(exc).__name__}: "
                          f"{exc}); the NIfTI mask is unaffected") from exc


def _with_type2(ds: Any) -> Any:
    """The header, or a copy with its missing Type 2 patient/study attributes present and empty."""
    missing = missing_type2(ds)
    if not missing:
        return ds
    ds = copy.deepcopy(ds)
    for keyword in missing:
        setattr(ds, keyword, "")
    return ds


def _segmentation(sources: list[Any], labels: np.ndarray, class_names: Sequence[str], model: str, version: str,
                  series_number: int) -> hd.seg.Segmentation:
    reference = sources[0]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.ascontiguousarray(labels),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(class_names, model, version),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="gliomaseg",
        manufacturer_model_name=model[:64] or "gliomaseg",
        software_versions=version[:64] or "unknown",
        device_serial_number="0",
        content_description=f"{model} segmentation of {reference.get('SeriesDescription', '')}"[:64],
        series_description=f"{model} segmentation"[:64],
        # an empty prediction is still an answer: keep its frames so the SEG says "nothing here"
        omit_empty_frames=bool(labels.any()),
    )


def dicom_seg_bytes(volume: Volume, masks: np.ndarray, class_names: Sequence[str] = ("background", "tumour"),
                    **kwargs: object) -> bytes:
    """The SEG as Part 10 file bytes."""
    buffer = io.BytesIO()
    dicom_seg(volume, masks, class_names, **kwargs).save_as(buffer, enforce_file_format=True)  # type: ignore[arg-type]
    return buffer.getvalue()
