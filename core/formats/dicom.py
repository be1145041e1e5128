"""DICOM studies in (pydicom): a folder or a zip with one series per sequence.

Which series is which sequence comes from its SeriesDescription (core.formats.volume.sequence_name:
'AX T2 FLAIR', 'T1 POST GAD', ...), or from an explicit mapping ``{"flair": "<SeriesInstanceUID, number
or description>", ...}``. A series' slices are ordered by ImagePositionPatient projected on the slice
normal (row cosine x column cosine), never by file name or InstanceNumber, and must form one regular
grid: one orientation, one pixel spacing, evenly spaced positions on one line. The other sequences are
resampled onto the FLAIR series' grid where theirs differs (same frame of reference, no registration).

An enhanced (multi-frame) image is a series of its frames, each placed by its functional groups
(core.formats.dicom_frames), and reads to the same volume as the single-frame series it stands for.

The source grid of a Volume from DICOM is (columns, rows, slices) with its RAS+ affine, so a mask goes
back to the series exactly and becomes a DICOM SEG (core.formats.dicom_seg) referencing its instances
(or the frames of the enhanced image). Patient and study attributes of Type 2 that an anonymiser removed
are noted: the SEG carries them empty.
Limits are checked from the headers (read with ``stop_before_pixels``) before any pixel data is read;
where the files come from (folders, zips, bytes) and their limits is core.formats.dicom_files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.formats.dicom_files import Member, Source, is_dicom_bytes, is_zip_bytes, looks_like_dicom_dir, members
from core.formats.dicom_files import read_member as _read
from core.formats.dicom_frames import frame_headers, frame_values, frames_of, is_multiframe, stored_range
from core.formats.volume import (
    SEQUENCE_TITLES,
    SEQUENCES,
    DimensionError,
    DuplicateSliceError,
    Limits,
    MissingSequenceError,
    MixedOrientationError,
    NoPixelDataError,
    SeveralSeriesError,
    SliceGapError,
    SpacingError,
    Volume,
    VolumeError,
    build_volume,
    parse_sequences,
    resample_to,
    same_grid,
    sequence_name,
)

__all__ = ["is_dicom_bytes", "is_zip_bytes", "iter_series", "looks_like_dicom_dir", "read_dicom", "missing_type2"]

NON_IMAGE = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "REG", "DOC", "RTPLAN"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
POSITION_TOL = 0.01  # mm: scanners round positions; more than this is a real difference
# Type 2 patient and study attributes a DICOM SEG copies from its source (empty when unknown): anonymisers
# remove some of them, and highdicom needs each one present
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass
class _Series:
    uid: str
    files: list[tuple[str, Member, Any]]  # (name, member, header without pixels): one per slice or frame
    enhanced: Any = None  # the header of the one multi-frame image the frames above come from

    @property
    def header(self) -> Any:
        return self.files[0][2]

    @property
    def label(self) -> str:
        h = self.header
        return f"series {h.get('SeriesNumber', '?')} {str(h.get('SeriesDescription', '') or '(no description)')!r}"

    @property
    def plane(self) -> str:
        """'axial', 'coronal' or 'sagittal' from ImageOrientationPatient (the slice normal's nearest axis)."""
        try:
            iop = np.array([float(v) for v in self.header.ImageOrientationPatient], np.float64)
        except (AttributeError, TypeError, ValueError):
            return "plane unknown"
        normal = np.abs(np.cross(iop[:3], iop[3:]))
        return ("sagittal", "coronal", "axial")[int(np.argmax(normal))] if normal.any() else "plane unknown"

    def describe(self) -> str:
        """What a client needs to pick this series: number, description, plane, slices and UID."""
        return f"{self.label} ({self.plane}, {len(self.files)} slices, SeriesInstanceUID {self.uid})"



def _scan(files: list[Member], where: str, notes: list[str]) -> list[_Series]:
    """Headers of every image instance, grouped by series; non-image objects and non-DICOM files noted."""
    series: dict[str, _Series] = {}
    other, non_image = 0, 0
    for m in files:
        ds = _read(m, where, pixels=False)
        if ds is None:
            other += 1
            continue
        if str(ds.get("Modality", "")).upper() in NON_IMAGE or "Rows" not in ds:
            non_image += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "")) or "(no SeriesInstanceUID)"
        known = series.get(uid)
        if is_multiframe(ds) or (known is not None and known.enhanced is not None):
            if known is not None:  # a SEG references one multi-frame source, so a series is one such image
                raise VolumeError(f"{where}/{m.name}: series {uid} holds a multi-frame (enhanced) image and other "
                                  "images; send one multi-frame image per series, or its single-frame images")
            frames = frame_headers(ds, f"{where}/{m.name}")
            series[uid] = _Series(uid, [(f"{m.name} frame {i + 1}", m, h) for i, h in enumerate(frames)], ds)
            continue
        series.setdefault(uid, _Series(uid, [])).files.append((m.name, m, ds))
    if other:
        notes.append(f"{other} file(s) that are not DICOM ignored")
    if non_image:
        notes.append(f"{non_image} non-image DICOM object(s) (SR, SEG, presentation states, ...) ignored")
    if not series:
        raise NoPixelDataError(f"{where}: no DICOM images (no instances with pixel data)")
    return sorted(series.values(), key=lambda s: (int(s.header.get("SeriesNumber", 0) or 0), s.uid))


def _match(selector: str, candidates: list[_Series]) -> list[_Series]:
    sel = selector.strip()
    return [s for s in candidates if sel == s.uid or sel == str(s.header.get("SeriesNumber", ""))
            or sel.lower() == str(s.header.get("SeriesDescription", "")).strip().lower()]


PICK = ("say which with series=<SeriesNumber or SeriesInstanceUID> (HTTP; series=... in SageMaker's custom "
        "attributes; --series in the CLIs), or a mapping such as series=flair=3,pre=1")


def _by_description(series: list[_Series], where: str, chosen: Mapping[str, _Series]) -> dict[str, _Series]:
    """The sequences not ``chosen`` yet, named by SeriesDescription (or ProtocolName) among the series not
    chosen; two candidates for one sequence are a SeveralSeriesError listing both."""
    taken = {s.uid for s in chosen.values()}
    by_seq: dict[str, list[_Series]] = {}
    for s in series:
        seq = sequence_name(str(s.header.get("SeriesDescription", "") or s.header.get("ProtocolName", "")))
        if seq is not None and seq not in chosen and s.uid not in taken:
            by_seq.setdefault(seq, []).append(s)
    chosen: dict[str, _Series] = {}
    for seq, found in by_seq.items():
        if len(found) > 1:
            raise SeveralSeriesError(f"{where}: {len(found)} series look like {SEQUENCE_TITLES[seq]}: "
                                     f"{'; '.join(s.describe() for s in found)}; {PICK}")
        chosen[seq] = found[0]
    return chosen


def _mapped(series: list[_Series], mapping: Mapping[str, str], where: str) -> dict[str, _Series]:
    """The series a mapping names (sequence -> SeriesInstanceUID, SeriesNumber or description)."""
    listing = "; ".join(s.describe() for s in series)
    chosen: dict[str, _Series] = {}
    for key, selector in mapping.items():
        seq = parse_sequences([key])[0]
        if seq is None:
            raise VolumeError(f"{where}: {key!r} is not a sequence (one of {', '.join(SEQUENCES)}, or t1, t1c ...)")
        found = _match(selector, series)
        if not found:
            raise VolumeError(f"{where}: no series matches {selector!r} for {SEQUENCE_TITLES[seq]} ({listing})")
        if len(found) > 1:
            raise SeveralSeriesError(f"{where}: {len(found)} series match {selector!r} for {SEQUENCE_TITLES[seq]}: "
                                     f"{'; '.join(s.describe() for s in found)}; give a SeriesInstanceUID")
        chosen[seq] = found[0]
    return chosen


def _choose(series: list[_Series], mapping: Mapping[str, str] | None, where: str, notes: list[str]
            ) -> dict[str, _Series]:
    """Each sequence's series: the mapping's where it names one, else the one series whose description says
    it (among those the mapping left); a FLAIR is required."""
    listing = "; ".join(s.describe() for s in series)
    chosen = _mapped(series, mapping, where) if mapping else {}
    if mapping and "flair" not in chosen:
        raise MissingSequenceError(f"{where}: the mapping names no FLAIR series ({listing})")
    guessed = _by_description(series, where, chosen)
    if mapping and guessed:
        notes.append("chosen by description where the mapping named none: "
                     + ", ".join(f"{SEQUENCE_TITLES[k]} = {v.label}" for k, v in guessed.items()))
    chosen.update(guessed)
    if not chosen and len(series) == 1:
        notes.append(f"the only series ({series[0].label}) taken as FLAIR: its description names no sequence")
        chosen["flair"] = series[0]
    if "flair" not in chosen:
        raise MissingSequenceError(f"{where}: no FLAIR series among {listing}; {PICK}")
    if len(series) > len({s.uid for s in chosen.values()}):
        used = {s.uid for s in chosen.values()}
        notes.append(f"{len(series) - len(used)} other series ignored "
                     f"({'; '.join(s.label for s in series if s.uid not in used)})")
    return chosen


def _floats(ds: Any, keyword: str, n: int, where: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], np.float64) if value is not None else None
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.isfinite(arr).all():
        raise VolumeError(f"{where}: no valid {keyword}; not a cross-sectional image")
    return arr


def _geometry(s: _Series, where: str, notes: list[str]) -> tuple[list[int], np.ndarray]:
    """Slice order (by position on the normal) and the RAS+ affine of the (column, row, slice) grid."""
    names = [f"{where}/{name}" for name, _, _ in s.files]
    heads = [h for _, _, h in s.files]
    iop = np.stack([_floats(h, "ImageOrientationPatient", 6, n) for h, n in zip(heads, names, strict=True)])
    distinct = np.unique(np.round(iop, 3), axis=0)
    if not np.allclose(iop, iop[0], atol=1e-3):
        raise MixedOrientationError(f"{s.label}: {len(distinct)} different ImageOrientationPatient values "
                                    f"({distinct.tolist()}); one series must have one orientation")
    sizes = {(int(h.Rows), int(h.Columns)) for h in heads}
    if len(sizes) > 1:
        raise DimensionError(f"{s.label}: images of different sizes {sorted(sizes)}")
    ps = np.stack([_floats(h, "PixelSpacing", 2, n) for h, n in zip(heads, names, strict=True)])
    if not np.allclose(ps, ps[0], rtol=1e-4, atol=1e-5):
        raise SpacingError(f"{s.label}: inconsistent PixelSpacing {np.unique(ps, axis=0).tolist()}")
    row_cos, col_cos = iop[0, :3] / np.linalg.norm(iop[0, :3]), iop[0, 3:] / np.linalg.norm(iop[0, 3:])
    normal = np.cross(row_cos, col_cos)
    ipp = np.stack([_floats(h, "ImagePositionPatient", 3, n) for h, n in zip(heads, names, strict=True)])
    depth = ipp @ normal
    order = [int(i) for i in np.argsort(depth, kind="stable")]
    ipp, depth = ipp[order], depth[order]
    if len(order) > 1:
        steps = np.diff(depth)
        if (steps < POSITION_TOL).any():
            i = int(np.argmin(steps))
            raise DuplicateSliceError(f"{s.label}: {names[order[i]]} and {names[order[i + 1]]} are at one slice "
                                      f"position ({depth[i]:.3f} mm): echoes, repeats or two series in one")
        base = float(steps.min())
        tol = max(POSITION_TOL, 0.01 * base)
        gaps = np.flatnonzero(steps > 1.5 * base)
        if len(gaps) and np.all(np.abs(steps[gaps] / base - np.round(steps[gaps] / base)) * base < 4 * tol):
            i = int(gaps[0])
            raise SliceGapError(f"{s.label}: gap in slice positions: {steps[i]:.3f} mm between {names[order[i]]} "
                                f"and {names[order[i + 1]]} where slices are {base:.3f} mm apart "
                                f"({int(round(steps[i] / base)) - 1} slice(s) missing?)")
        if float(steps.max() - base) > tol:
            raise SpacingError(f"{s.label}: inconsistent slice spacing, {base:.3f} to {steps.max():.3f} mm")
        step = (ipp[-1] - ipp[0]) / (len(order) - 1)
        off_line = np.linalg.norm(ipp - (ipp[0] + np.arange(len(order))[:, None] * step), axis=1)
        if float(off_line.max()) > 4 * tol:
            raise SpacingError(f"{s.label}: slice positions do not lie on one line ({off_line.max():.3f} mm off)")
        if np.linalg.norm(np.cross(step / np.linalg.norm(step), normal)) > 1e-3:
            notes.append(f"{s.label}: slices stacked obliquely to their normal (gantry tilt); geometry kept as is")
    else:
        h = heads[0]
        thickness = float(h.get("SpacingBetweenSlices", 0) or h.get("SliceThickness", 0) or 1.0)
        step = normal * thickness
        notes.append(f"{s.label}: one slice; its thickness ({thickness:g} mm) taken as the slice spacing")
    affine = np.eye(4)
    affine[:3, 0] = row_cos * ps[0, 1]  # along a row: the column index, PixelSpacing[1] apart
    affine[:3, 1] = col_cos * ps[0, 0]  # down a column: the row index, PixelSpacing[0] apart
    affine[:3, 2] = step
    affine[:3, 3] = ipp[0]
    return order, LPS_TO_RAS @ affine


def _pixels(s: _Series, order: list[int], where: str) -> np.ndarray:
    """(columns, rows, slices) values in slice order: uint8 where they are 8-bit levels, else float32."""
    arrays, display = [], True
    span = stored_range(s.header)  # one MONOCHROME1 turn for the whole series
    if s.enhanced is not None:  # one file: decode all its frames at once
        name, member, _ = s.files[0]
        frames = frames_of(_read(member, where, pixels=True), f"{where}/{name.rsplit(' frame ', 1)[0]}")
    for i in order:
        name, member, header = s.files[i]
        if s.enhanced is not None:
            raw = frames[i]
        else:
            header = _read(member, where, pixels=True)
            raw = frames_of(header, f"{where}/{name}")[0]
        values, levels = frame_values(raw, header, span, f"{where}/{name}")
        display &= levels
        arrays.append(values.T)
    stack = np.stack(arrays, axis=-1)
    return stack.astype(np.uint8) if display else stack


def missing_type2(ds: Any) -> list[str]:
    """The Type 2 patient/study attributes a header lacks (a DICOM SEG gives them empty)."""
    return [k for k in TYPE2 if k not in ds]


def read_dicom(
    source: Source,
    *,
    series: Mapping[str, str] | None = None,
    name: str | None = None,
    limits: Limits = Limits(),
    rescale: str = "auto",
) -> Volume:
    """A DICOM study (folder, zip file, zip or DICOM bytes) -> a canonical Volume on the FLAIR series' grid."""
    found_files, where, zf = members(source, limits)
    try:
        notes: list[str] = []
        found = _scan(found_files, where, notes)
        chosen = _choose(found, series, where, notes)
        voxels = sum(int(s.header.Rows) * int(s.header.Columns) * len(s.files) for s in chosen.values())
        limits.check_voxels(voxels, where)
        grids: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        orders: dict[str, list[int]] = {}
        for seq, s in chosen.items():
            order, affine = _geometry(s, where, notes)
            grids[seq] = (_pixels(s, order, where), affine)
            orders[seq] = order
            if s.enhanced is not None:
                notes.append(f"{s.label}: one enhanced (multi-frame) image of {len(s.files)} frames")
        ref_seq = "flair"
        ref_values, ref_affine = grids[ref_seq]
        ref_for = chosen[ref_seq].header.get("FrameOfReferenceUID")
        channels: dict[str, np.ndarray] = {}
        for seq, (values, affine) in grids.items():
            if not same_grid(affine, ref_affine, values.shape, ref_values.shape):
                other_for = chosen[seq].header.get("FrameOfReferenceUID")
                if ref_for and other_for and ref_for != other_for:
                    raise VolumeError(f"{where}: {chosen[seq].label} and {chosen[ref_seq].label} are in different "
                                      "frames of reference; they cannot be aligned without registration")
                values = resample_to(values, affine, ref_affine, ref_values.shape)  # type: ignore[arg-type]
                notes.append(f"{SEQUENCE_TITLES[seq]} ({chosen[seq].label}) resampled onto the "
                             f"{SEQUENCE_TITLES[ref_seq]} grid (trilinear, scanner coordinates)")
            channels[seq] = values
        sources = {seq: f"{s.label} {s.uid}" for seq, s in chosen.items()}
        label = name or (Path(os.fspath(source)).stem if not isinstance(source, bytes) else "study")
        ref = chosen[ref_seq]
        # headers only: all a SEG needs of its source (the instances in slice order, or the one enhanced image)
        datasets = [ref.enhanced] if ref.enhanced is not None else [ref.files[i][2] for i in orders[ref_seq]]
        missing = missing_type2(datasets[0])
        if missing:
            notes.append(f"{ref.label}: no {', '.join(missing)} (removed by an anonymiser?); a DICOM SEG of it "
                         "carries them empty")
        return build_volume(channels, ref_affine, kind="dicom", name=label, sources=sources, rescale=rescale,
                            notes=notes, datasets=datasets, frames=orders[ref_seq] if ref.enhanced is not None else (),
                            limits=limits)
    finally:
        if zf is not None:
            zf.close()


def iter_series(source: Source, limits: Limits = Limits()) -> Iterator[dict[str, Any]]:
    """What a study holds (uid, number, description, sequence guess, instances): for choosing a mapping."""
    found_files, where, zf = members(source, limits)
    try:
        for s in _scan(found_files, where, []):
            h = s.header
            yield {"uid": s.uid, "number": h.get("SeriesNumber"), "description": str(h.get("SeriesDescription", "")),
                   "sequence": sequence_name(str(h.get("SeriesDescription", ""))),
                   "instances": 1 if s.enhanced is not None else len(s.files), "slices": len(s.files)}
    finally:
        if zf is not None:
            zf.close()
