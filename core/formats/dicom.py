"""DICOM studies in (pydicom): a folder or a zip with one series per sequence.

Which series is which sequence comes from its SeriesDescription (core.formats.volume.sequence_name:
'AX T2 FLAIR', 'T1 POST GAD', ...), or from an explicit mapping ``{"flair": "<SeriesInstanceUID, number
or description>", ...}``. A series' slices are ordered by ImagePositionPatient projected on the slice
normal (row cosine x column cosine), never by file name or InstanceNumber, and must form one regular
grid: one orientation, one pixel spacing, evenly spaced positions on one line. The other sequences are
resampled onto the FLAIR series' grid where theirs differs (same frame of reference, no registration).

The source grid of a Volume from DICOM is (columns, rows, slices) with its RAS+ affine, so a mask goes
back to the series exactly and becomes a DICOM SEG (core.formats.dicom_seg) referencing its instances.
Limits are checked from the headers (read with ``stop_before_pixels``) before any pixel data is read;
a zip's declared sizes and compression ratios are checked before anything is decompressed.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

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
    UnreadableVolume,
    Volume,
    VolumeError,
    VolumeTooLarge,
    ZipBombError,
    build_volume,
    parse_sequences,
    resample_to,
    same_grid,
    sequence_name,
)

NON_IMAGE = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "REG", "DOC", "RTPLAN"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
POSITION_TOL = 0.01  # mm: scanners round positions; more than this is a real difference
Source = str | os.PathLike | bytes


@dataclass
class _Member:
    name: str
    open: Callable[[], IO[bytes]]


@dataclass
class _Series:
    uid: str
    files: list[tuple[str, _Member, Any]]  # (name, member, header without pixels)

    @property
    def header(self) -> Any:
        return self.files[0][2]

    @property
    def label(self) -> str:
        h = self.header
        return f"series {h.get('SeriesNumber', '?')} {str(h.get('SeriesDescription', '') or '(no description)')!r}"


def is_zip_bytes(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def is_dicom_bytes(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def looks_like_dicom_dir(path: str | os.PathLike, probe: int = 20) -> bool:
    """A folder whose first files (recursively) include a DICOM one (preamble 'DICM' or a .dcm name)."""
    for i, f in enumerate(p for p in sorted(Path(path).rglob("*")) if p.is_file() and not _hidden(p.name)):
        if i >= probe:
            return False
        if f.suffix.lower() == ".dcm":
            return True
        with open(f, "rb") as fh:
            if is_dicom_bytes(fh.read(132)):
                return True
    return False


def _hidden(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1].upper() == "DICOMDIR"


def _zip_members(zf: zipfile.ZipFile, where: str, limits: Limits) -> list[_Member]:
    infos = [i for i in zf.infolist() if not i.is_dir() and not _hidden(i.filename)]
    if len(infos) > limits.max_files:
        raise VolumeTooLarge(f"{where}: {len(infos)} files; at most {limits.max_files}")
    total = sum(i.file_size for i in infos)
    if total > limits.max_bytes:
        raise ZipBombError(f"{where}: {total} bytes uncompressed; at most {limits.max_bytes}")
    for i in infos:
        if i.flag_bits & 0x1:
            raise UnreadableVolume(f"{where}: {i.filename} is encrypted")
        if i.file_size > (1 << 20) and i.file_size > limits.max_ratio * max(i.compress_size, 1):
            raise ZipBombError(f"{where}: {i.filename} expands {i.file_size / max(i.compress_size, 1):.0f}-fold "
                               f"({i.compress_size} -> {i.file_size} bytes); at most {limits.max_ratio:.0f}")
    # zipfile stops at each member's declared size and checks its CRC, so the sizes above bound the output
    return [_Member(i.filename, lambda i=i: zf.open(i)) for i in infos]


def _members(source: Source, limits: Limits) -> tuple[list[_Member], str, zipfile.ZipFile | None]:
    if isinstance(source, bytes):
        if is_dicom_bytes(source):
            return [_Member("request body", lambda: io.BytesIO(source))], "request body", None
        try:
            zf = zipfile.ZipFile(io.BytesIO(source))
        except zipfile.BadZipFile as exc:
            raise UnreadableVolume(f"request body: neither a zip nor a DICOM file ({exc})") from exc
        return _zip_members(zf, "request body", limits), "request body", zf
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not _hidden(str(p.relative_to(path)))]
        if len(files) > limits.max_files:
            raise VolumeTooLarge(f"{path}: {len(files)} files; at most {limits.max_files}")
        return [_Member(str(f.relative_to(path)), lambda f=f: open(f, "rb")) for f in files], str(path), None
    if zipfile.is_zipfile(path):
        zf = zipfile.ZipFile(path)
        return _zip_members(zf, str(path), limits), str(path), zf
    return [_Member(path.name, lambda: open(path, "rb"))], str(path), None


def _read(member: _Member, where: str, pixels: bool) -> Any:
    try:
        with member.open() as fh:
            return pydicom.dcmread(fh, stop_before_pixels=not pixels)
    except InvalidDicomError:
        return None
    except zipfile.BadZipFile as exc:
        raise UnreadableVolume(f"{where}/{member.name}: corrupt zip member ({exc})") from exc
    except Exception as exc:  # pydicom raises many types for a truncated or corrupt file
        raise UnreadableVolume(f"{where}/{member.name}: unreadable DICOM ({type(exc).__name__}: {exc})") from exc


def _scan(members: list[_Member], where: str, notes: list[str]) -> list[_Series]:
    """Headers of every image instance, grouped by series; non-image objects and non-DICOM files noted."""
    series: dict[str, _Series] = {}
    other, non_image = 0, 0
    for m in members:
        ds = _read(m, where, pixels=False)
        if ds is None:
            other += 1
            continue
        if str(ds.get("Modality", "")).upper() in NON_IMAGE or "Rows" not in ds:
            non_image += 1
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(f"{where}/{m.name}: a multi-frame (enhanced) image; export the series as "
                              "single-frame images (one file per slice)")
        uid = str(ds.get("SeriesInstanceUID", "")) or "(no SeriesInstanceUID)"
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


def _choose(series: list[_Series], mapping: Mapping[str, str] | None, where: str, notes: list[str]
            ) -> dict[str, _Series]:
    listing = "; ".join(s.label for s in series)
    chosen: dict[str, _Series] = {}
    if mapping:
        for key, selector in mapping.items():
            seq = parse_sequences([key])[0]
            if seq is None:
                raise VolumeError(f"{where}: {key!r} is not a sequence (one of {', '.join(SEQUENCES)}, or t1, t1c ...)")
            found = _match(selector, series)
            if not found:
                raise VolumeError(f"{where}: no series matches {selector!r} for {SEQUENCE_TITLES[seq]} ({listing})")
            if len(found) > 1:
                raise SeveralSeriesError(f"{where}: {len(found)} series match {selector!r} for {SEQUENCE_TITLES[seq]}: "
                                         f"{'; '.join(s.label for s in found)}; give a SeriesInstanceUID")
            chosen[seq] = found[0]
        if "flair" not in chosen:
            raise MissingSequenceError(f"{where}: the mapping names no FLAIR series ({listing})")
        return chosen
    by_seq: dict[str, list[_Series]] = {}
    for s in series:
        seq = sequence_name(str(s.header.get("SeriesDescription", "") or s.header.get("ProtocolName", "")))
        if seq is not None:
            by_seq.setdefault(seq, []).append(s)
    for seq, found in by_seq.items():
        if len(found) > 1:
            raise SeveralSeriesError(f"{where}: {len(found)} series look like {SEQUENCE_TITLES[seq]}: "
                                     f"{'; '.join(s.label for s in found)}; say which with a mapping (--series)")
        chosen[seq] = found[0]
    if not chosen and len(series) == 1:
        notes.append(f"the only series ({series[0].label}) taken as FLAIR: its description names no sequence")
        chosen["flair"] = series[0]
    if "flair" not in chosen:
        raise MissingSequenceError(f"{where}: no FLAIR series among {listing}; say which series is which with "
                                   "a mapping (--series flair=NUMBER)")
    if len(series) > len(chosen):
        notes.append(f"{len(series) - len(chosen)} other series ignored ({listing})")
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
    for i in order:
        name, member, _ = s.files[i]
        ds = _read(member, where, pixels=True)
        if ds is None or not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise NoPixelDataError(f"{where}/{name}: no pixel data")
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise VolumeError(f"{where}/{name}: {photometric} images; expected greyscale (MONOCHROME2)")
        try:
            raw = ds.pixel_array
        except Exception as exc:  # missing codec, truncated data
            raise UnreadableVolume(f"{where}/{name}: pixel data not decodable ({type(exc).__name__}: {exc})") from exc
        if raw.ndim != 2:
            raise DimensionError(f"{where}/{name}: pixel data of shape {raw.shape}, expected one 2D frame")
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        display &= int(ds.get("BitsStored", 16)) <= 8 and slope == 1 and intercept == 0 and raw.dtype.kind == "u"
        values = np.asarray(apply_modality_lut(raw, ds), np.float32)
        if photometric == "MONOCHROME1":  # bright means low: turn it round so the tissue contrast matches
            values = values.max() - values
        arrays.append(values.T)
    stack = np.stack(arrays, axis=-1)
    return stack.astype(np.uint8) if display else stack


def read_dicom(
    source: Source,
    *,
    series: Mapping[str, str] | None = None,
    name: str | None = None,
    limits: Limits = Limits(),
    rescale: str = "auto",
) -> Volume:
    """A DICOM study (folder, zip file, zip or DICOM bytes) -> a canonical Volume on the FLAIR series' grid."""
    members, where, zf = _members(source, limits)
    try:
        notes: list[str] = []
        found = _scan(members, where, notes)
        chosen = _choose(found, series, where, notes)
        voxels = sum(int(s.header.Rows) * int(s.header.Columns) * len(s.files) for s in chosen.values())
        limits.check_voxels(voxels, where)
        grids: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        datasets: dict[str, list[Any]] = {}
        for seq, s in chosen.items():
            order, affine = _geometry(s, where, notes)
            grids[seq] = (_pixels(s, order, where), affine)
            datasets[seq] = [s.files[i][2] for i in order]  # headers only: all a SEG needs of its source
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
        return build_volume(channels, ref_affine, kind="dicom", name=label, sources=sources, rescale=rescale,
                            notes=notes, datasets=datasets[ref_seq])
    finally:
        if zf is not None:
            zf.close()


def iter_series(source: Source, limits: Limits = Limits()) -> Iterator[dict[str, Any]]:
    """What a study holds (uid, number, description, sequence guess, instances): for choosing a mapping."""
    members, where, zf = _members(source, limits)
    try:
        for s in _scan(members, where, []):
            h = s.header
            yield {"uid": s.uid, "number": h.get("SeriesNumber"), "description": str(h.get("SeriesDescription", "")),
                   "sequence": sequence_name(str(h.get("SeriesDescription", ""))), "instances": len(s.files)}
    finally:
        if zf is not None:
            zf.close()
