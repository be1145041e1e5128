"""A scan as the model sees it: axial (N,H,W,3) uint8 slices in the Kaggle orientation, plus the geometry
that puts a mask back onto the scan's own grid exactly.

The model contract (DESIGN.md): a slice is an axial image in the DICOM display orientation (columns run
toward the patient's left, rows toward posterior), channels pre-contrast, FLAIR, post-contrast. Every
reader (core.formats.nifti, core.formats.dicom) hands its source-grid arrays and their RAS+ affine to
``build_volume``, which brings them to that orientation by an exact permutation and flip of the voxel
axes (nibabel's orientation tools: no interpolation), fills a missing sequence with FLAIR (as the Kaggle
set does) and rescales each channel to uint8 by its own percentiles. ``Volume.to_source`` is the exact
inverse, so a mask goes back with the source's shape and affine.

A sagittal or coronal scan with thick slices would give axial pixels as long as its slice spacing, so
its reordered slices are resampled to square pixels at its finest in-plane spacing (``axial_grid``; the
rule and its limits are there) and its masks go back to its own grid by core.formats.regrid; its
``spacing`` and ``voxel_ml`` are then the resampled grid's, the one the model and the mm rules see.

Errors are ``VolumeError`` subclasses of core.formats.media.DecodeError: a ValueError whose ``status``
is the HTTP answer (400 unreadable, 413 too large, 422 unusable) and whose message names the problem.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from core.formats.intensity import to_uint8
from core.formats.media import DecodeError
from core.formats.regrid import labels_to, zoom_images, zoom_labels

SEQUENCES = ("pre", "flair", "post")  # channel order of the model's input (the Kaggle TIFFs)
SEQUENCE_TITLES = {"pre": "pre-contrast", "flair": "FLAIR", "post": "post-contrast"}
# (slice, row, col) of the canonical array point to superior, posterior and the patient's left (RAS+
# axis codes): rows toward posterior and columns toward the left are the DICOM display orientation.
CANONICAL_AXES = ("S", "P", "L")
PLANES = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "L": "sagittal", "R": "sagittal"}
# A sagittal or coronal scan is resampled when its reordered axial pixels are longer than MAX_ANISOTROPY
# times their width (a 3D acquisition of near-cubic voxels is reordered only), and refused when its slices
# are more than MAX_RESAMPLED_SLICE_MM apart or fewer than MIN_RESAMPLED_SLICES: beyond that a tumour
# spans two or three slices and its axial outline would be the interpolation's, not the scanner's.
MAX_ANISOTROPY = 1.25
MAX_RESAMPLED_SLICE_MM = 6.0
MIN_RESAMPLED_SLICES = 8
RESCALES = ("auto", "percentile", "none")


class VolumeError(DecodeError):
    """A scan that cannot become model input; ``status`` maps it to HTTP, the message names the problem."""

    status_code = 422
    code = "invalid_volume"

    def __init__(self, detail: str) -> None:
        super().__init__(self.status_code, self.code, detail)


class UnreadableVolume(VolumeError):
    status_code, code = 400, "undecodable"


class VolumeTooLarge(VolumeError):
    status_code, code = 413, "too_large"


class ZipBombError(VolumeTooLarge):
    code = "zip_bomb"


class NonFiniteError(VolumeError):
    code = "non_finite"


class DimensionError(VolumeError):
    code = "bad_dimensions"


class MixedOrientationError(VolumeError):
    code = "mixed_orientations"


class SliceGapError(VolumeError):
    code = "slice_gap"


class SpacingError(VolumeError):
    code = "inconsistent_spacing"


class SeveralSeriesError(VolumeError):
    code = "several_series"


class DuplicateSliceError(VolumeError):
    code = "duplicate_slices"


class MissingSequenceError(VolumeError):
    code = "missing_sequence"


class NoPixelDataError(VolumeError):
    code = "no_pixel_data"


class NoOrientationError(VolumeError):
    code = "no_orientation"


class NotFlairError(VolumeError):
    code = "not_flair"


class UnnamedSequencesError(VolumeError):
    code = "unnamed_sequences"


class PlaneError(VolumeError):
    code = "unusable_plane"


@dataclass(frozen=True)
class Limits:
    """What a reader accepts, checked from headers before any pixel data is decompressed."""

    max_voxels: int = 1 << 27  # all sequences together: 3 x 512x512x170, or 1 x 512^3
    max_bytes: int = 2 << 30  # uncompressed bytes of an archive's members
    max_files: int = 20_000  # members of a DICOM folder or zip
    max_ratio: float = 200.0  # uncompressed / compressed size of a zip member (DICOM compresses ~3x)

    def check_voxels(self, n: int, where: str) -> None:
        if n > self.max_voxels:
            raise VolumeTooLarge(f"{where}: {n} voxels; at most {self.max_voxels}")


def sequence_name(text: str) -> str | None:
    """'pre', 'flair' or 'post' for a SeriesDescription or channel name ('AX T2 FLAIR', 'T1w', 't1gd',
    'T1 POST GAD', 't2f'), None for anything else (T2, DWI, localisers)."""
    t = text.lower().replace("_", " ")
    if re.search(r"flair|dark ?fluid|tirm|\bt2 ?f\b", t) and not re.search(r"\bt1", t):
        return "flair"
    if re.search(r"\bt2|dwi|adc|diffusion|\bswi|perfusion|local|scout|survey|\bmra?\b|tof", t):
        return None
    if re.search(r"\bpre\b|pre ?contrast|pre-?gad|non ?contrast|without|native|\bt1n\b|\bt1 ?pre", t):
        return "pre"
    if re.search(r"post|\+ ?c\b|\+ ?gd|\bgd\b|gad|contrast|\bce\b|\bt1 ?c(e|gd)?\b|t1gd|t1wce|enhanc", t):
        return "post"
    if re.search(r"\bt1|mprage|spgr|bravo", t):
        return "pre"
    return None


def parse_sequences(names: Sequence[str]) -> list[str | None]:
    """Each channel's sequence ('pre'/'flair'/'post', or None to ignore it), from names like
    ``flair,t1,t1gd,t2``; a name may also be one of SEQUENCES or '-' to skip that channel."""
    out: list[str | None] = []
    for name in names:
        key = name.strip().lower()
        out.append(None if key in ("-", "", "skip") else key if key in SEQUENCES else sequence_name(key))
    return out


@dataclass
class Volume:
    """One patient's scan as model input, and what it takes to put a mask back on the source grid."""

    images: np.ndarray  # (N,H,W,3) uint8, canonical orientation, channels SEQUENCES
    affine: np.ndarray  # (4,4) RAS+ voxel -> world (mm) of the source grid
    source_shape: tuple[int, int, int]  # the source grid (NIfTI i,j,k; DICOM columns, rows, slices)
    kind: str  # "nifti" or "dicom"
    name: str
    sources: dict[str, str]  # sequence -> the file or series it came from
    filled: tuple[str, ...] = ()  # sequences that were missing and are a copy of FLAIR
    notes: list[str] = field(default_factory=list)
    header: Any = None  # the source's nibabel header (NIfTI input), copied into the mask
    # the reference series' pydicom headers in slice order; for an enhanced (multi-frame) image its one header,
    # and ``frames`` the source frame (0-based) of each slice
    datasets: list[Any] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    # the canonical shape before resampling to square axial pixels (axial_grid); None: reordered only
    resampled_from: tuple[int, int, int] | None = None

    @property
    def ornt(self) -> np.ndarray:
        """nibabel orientation transform from the source grid to the canonical one."""
        return canonical_ornt(self.affine)

    @property
    def source_spacing(self) -> tuple[float, float, float]:
        """The source's voxel size in mm (its header's), along the canonical (slice, row, column) axes."""
        return reordered_spacing(self.affine)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical (slice, row, column) axes: the grid the model sees."""
        own = self.source_spacing
        if self.resampled_from is None:
            return own
        z, y, x = (s * f / n for s, f, n in zip(own, self.resampled_from, self.images.shape[:3], strict=True))
        return z, y, x

    @property
    def source_voxel_ml(self) -> float:
        """One source voxel's volume in mL (|det| of the affine: exact for oblique and sheared grids too)."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def voxel_ml(self) -> float:
        """One canonical voxel's volume in mL: the source's, scaled by the resampling where there was one."""
        if self.resampled_from is None:
            return self.source_voxel_ml
        return self.source_voxel_ml * float(np.prod(self.resampled_from)) / float(np.prod(self.images.shape[:3]))

    @property
    def plane(self) -> str:
        """The acquisition plane: where the source's slice axis (its third) points."""
        return acquisition_plane(self.affine)

    def to_source(self, masks: np.ndarray) -> np.ndarray:
        """(N,H,W) canonical masks -> the source grid: the inverse permutation and flip, exactly, after
        the label covering most of each reordered voxel where the slices were resampled."""
        masks = np.asarray(masks)
        if masks.shape != self.images.shape[:3]:
            raise ValueError(f"masks of shape {masks.shape} for a volume of {self.images.shape[:3]}")
        if self.resampled_from is not None:
            masks = labels_to(masks, self.resampled_from)
        back = ornt_transform(axcodes2ornt(CANONICAL_AXES), io_orientation(self.affine))
        out = np.ascontiguousarray(apply_orientation(masks, back))
        assert out.shape == self.source_shape, (out.shape, self.source_shape)
        return out

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """A source-grid label map (beside the scan, say; extra trailing axes kept) -> canonical: reordered,
        and by the nearest voxel onto the resampled grid where there is one."""
        array = np.asarray(array)
        if array.shape[:3] != self.source_shape:
            raise ValueError(f"array of shape {array.shape} for a source grid of {self.source_shape}")
        out = np.ascontiguousarray(apply_orientation(array, self.ornt))
        return out if self.resampled_from is None else zoom_labels(out, self.images.shape[:3])

    def volume_ml(self, masks: np.ndarray, label: int | None = None) -> float:
        """Tumour volume in mL of canonical or source-grid masks (foreground, or one label)."""
        masks = np.asarray(masks)
        selected = masks > 0 if label is None else masks == label
        source = self.resampled_from is not None and masks.shape[:3] != self.images.shape[:3]
        return float(np.count_nonzero(selected)) * (self.source_voxel_ml if source else self.voxel_ml)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (shapes, spacing, sequences, notes) for responses and CSVs."""
        return {
            "name": self.name, "kind": self.kind, "slices": int(self.images.shape[0]),
            "size": [int(s) for s in self.images.shape[1:3]], "source_shape": list(self.source_shape),
            "spacing_mm": [round(s, 6) for s in self.spacing], "voxel_ml": self.voxel_ml, "plane": self.plane,
            "sources": dict(self.sources), "filled_with_flair": list(self.filled), "notes": list(self.notes),
        }


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Foreground volume in mL: voxel count times the voxel volume (mm^3 / 1000)."""
    return float(np.count_nonzero(np.asarray(mask))) * float(np.prod(np.asarray(spacing, np.float64))) / 1000.0


def canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """The permutation and flips that take a grid with this affine to CANONICAL_AXES (nearest axes for an
    oblique affine: the voxels are reordered, never resampled)."""
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise UnreadableVolume(f"affine {affine.tolist()} is not a finite 4x4 matrix")
    src = io_orientation(affine)
    if np.isnan(src).any():
        raise UnreadableVolume("the affine is degenerate (a voxel axis of zero length or two parallel axes)")
    return ornt_transform(src, axcodes2ornt(CANONICAL_AXES))


def reordered_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """A grid's voxel size in mm along the canonical (slice, row, column) axes it is reordered to."""
    sizes = np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))
    out = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _) in enumerate(canonical_ornt(affine)):
        out[int(dst_axis)] = float(sizes[src_axis])
    return out[0], out[1], out[2]


def axial_grid(shape: Sequence[int], spacing: Sequence[float], plane: str,
               max_voxels: int) -> tuple[int, int, int] | None:
    """The (slice, row, column) shape a reordered sagittal or coronal scan is resampled to, None where its
    axial pixels are square enough (MAX_ANISOTROPY) to be used as they are.

    Both in-plane axes go to the finer one's spacing (square pixels, the source's own detail kept), coarser
    only where the three sequences would not fit ``max_voxels``; the slice axis keeps its spacing. A
    PlaneError (422) where the thick axis has too few slices or too thick ones (see MIN_RESAMPLED_SLICES).
    """
    n, h, w = (int(v) for v in shape)
    _, sh, sw = (float(v) for v in spacing)
    if plane == "axial" or max(sh, sw) <= MAX_ANISOTROPY * min(sh, sw):
        return None
    count, thick = (h, sh) if sh > sw else (w, sw)
    if thick > MAX_RESAMPLED_SLICE_MM or count < MIN_RESAMPLED_SLICES:
        raise PlaneError(f"{plane} acquisition of {count} slices {thick:g} mm apart: too "
                         f"{'thick' if thick > MAX_RESAMPLED_SLICE_MM else 'few'} to resample to axial slices (at "
                         f"least {MIN_RESAMPLED_SLICES} slices, at most {MAX_RESAMPLED_SLICE_MM:g} mm apart); "
                         "send an axial series of this study")
    target = max(min(sh, sw), float(np.sqrt(h * sh * w * sw * len(SEQUENCES) * n / max_voxels)))
    rows = h if abs(sh - target) <= 0.01 * target else max(1, round(h * sh / target))
    cols = w if abs(sw - target) <= 0.01 * target else max(1, round(w * sw / target))
    return n, rows, cols


def acquisition_plane(affine: np.ndarray) -> str:
    """'axial', 'coronal' or 'sagittal': the world axis nearest the source's third voxel axis."""
    codes = "RAS"
    axis, _ = io_orientation(np.asarray(affine, np.float64))[2]
    return PLANES[codes[int(axis)]]


def check_finite(array: np.ndarray, where: str) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise NonFiniteError(f"{where}: {bad} voxels are NaN or infinite")


def build_volume(
    channels: Mapping[str, np.ndarray],
    affine: np.ndarray,
    *,
    kind: str,
    name: str,
    sources: Mapping[str, str],
    rescale: str = "auto",
    notes: Sequence[str] = (),
    header: Any = None,
    datasets: Sequence[Any] = (),
    frames: Sequence[int] = (),
    limits: Limits = Limits(),
) -> Volume:
    """Source-grid sequences (each (I,J,K), one grid, keys from SEQUENCES) -> a canonical Volume.

    ``rescale``: ``percentile`` (core.formats.intensity.to_uint8: percentiles of the nonzero voxels to
    0..255), ``none`` (the values are already 0..255 display levels, as in a volume built from Kaggle
    slices), or ``auto``: ``none`` for uint8 data, ``percentile`` otherwise. A missing pre- or
    post-contrast sequence is FLAIR's copy. A thick-sliced sagittal or coronal scan is resampled to
    square axial pixels (``axial_grid``, within ``limits``), and its notes say so.
    """
    if rescale not in RESCALES:
        raise ValueError(f"rescale {rescale!r} is not one of {', '.join(RESCALES)}")
    if "flair" not in channels:
        found = ", ".join(SEQUENCE_TITLES.get(s, s) for s in channels) or "none"
        raise MissingSequenceError(f"{name}: no FLAIR sequence (found: {found}); FLAIR is the one the model "
                                   "cannot do without. Name the sequences (a mapping, or --sequences/--series)")
    shapes = {s: np.shape(a) for s, a in channels.items()}
    if len(set(shapes.values())) > 1:
        raise SpacingError(f"{name}: sequences on different grids {shapes}")
    shape = shapes["flair"]
    if len(shape) != 3:
        raise DimensionError(f"{name}: a sequence of shape {shape}, expected 3 dimensions")
    notes = list(notes)
    out = np.zeros((*shape, 3), np.uint8)
    for c, seq in enumerate(SEQUENCES):
        array = np.asarray(channels.get(seq, channels["flair"]))
        check_finite(array, f"{name} {SEQUENCE_TITLES[seq]}")
        display = rescale == "none" or (rescale == "auto" and array.dtype == np.uint8)
        if display:
            if array.size and (array.min() < 0 or array.max() > 255):
                raise VolumeError(f"{name} {SEQUENCE_TITLES[seq]}: values {array.min()}..{array.max()} are not "
                                  "0..255 display levels; use rescale 'percentile'")
            out[..., c] = array.astype(np.uint8)
        else:
            out[..., c] = to_uint8(array)
    filled = tuple(s for s in SEQUENCES if s not in channels)
    if filled:
        notes.append(f"no {' or '.join(SEQUENCE_TITLES[s] for s in filled)} sequence: filled with a copy of FLAIR "
                     "(as the Kaggle data set does)")
    images = np.ascontiguousarray(apply_orientation(out, canonical_ornt(affine)))
    reordered = (images.shape[0], images.shape[1], images.shape[2])
    plane, spacing = acquisition_plane(affine), reordered_spacing(affine)
    grid = axial_grid(reordered, spacing, plane, limits.max_voxels)
    notes.extend(plane_notes(plane, spacing, reordered, grid))
    if grid is not None:
        images = zoom_images(images, grid)
    return Volume(images=images, affine=np.asarray(affine, np.float64), source_shape=(shape[0], shape[1], shape[2]),
                  kind=kind, name=name, sources=dict(sources), filled=filled, notes=notes, header=header,
                  datasets=list(datasets), frames=[int(f) for f in frames], resampled_from=None if grid is None
                  else reordered)


def plane_notes(plane: str, spacing: Sequence[float], reordered: tuple[int, int, int],
                grid: tuple[int, int, int] | None) -> list[str]:
    """What an answer says of a sagittal or coronal scan (``spacing``: its reordered voxels'): reordered only,
    or resampled and at what spacing."""
    if plane == "axial":
        return []
    if grid is None:
        return [f"{plane} acquisition: the model sees axial slices made by reordering its voxels (no interpolation; "
                f"its axial pixels, {spacing[1]:.3g} x {spacing[2]:.3g} mm, are near square)"]
    row, col = (s * r / g for s, r, g in zip(spacing[1:], reordered[1:], grid[1:], strict=True))
    return [f"{plane} acquisition resampled to axial at {row:.3g} x {col:.3g} mm in-plane (linear; its "
            f"{spacing[1]:.3g} x {spacing[2]:.3g} mm axial pixels, {reordered[1]}x{reordered[2]}, became "
            f"{grid[1]}x{grid[2]}) and the masks mapped back to its grid (each voxel the label covering most of it)"]


def slices_grid(slices: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                axcodes: tuple[str, str, str] = ("L", "P", "S")) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (N,H,W[,C]) slices -> (I,J,K[,C]) voxels and their RAS+ affine, stored as NIfTI files
    usually are (i: columns, j: rows, k: slices), so every tool slices it axially; ``spacing`` is the
    (slice, row, column) size in mm. Reading it back gives the same slices exactly."""
    sz, sy, sx = (float(s) for s in spacing)
    affine = np.array([[0, 0, -sx, 0], [0, -sy, 0, 0], [sz, 0, 0, 0], [0, 0, 0, 1]], np.float64)
    t = ornt_transform(axcodes2ornt(CANONICAL_AXES), axcodes2ornt(axcodes))
    data = np.ascontiguousarray(apply_orientation(np.asarray(slices), t))
    return data, affine @ inv_ornt_aff(t, np.shape(slices)[:3])


def resample_to(array: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray,
                ref_shape: tuple[int, int, int]) -> np.ndarray:
    """A sequence on another grid of the same frame of reference, trilinear onto the reference grid
    (scanner coordinates: no registration), zero outside its field of view."""
    from scipy.ndimage import affine_transform

    matrix = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(ref_affine, np.float64)
    return affine_transform(np.asarray(array, np.float32), matrix[:3, :3], offset=matrix[:3, 3],
                            output_shape=ref_shape, order=1, mode="constant", cval=0.0)


def same_grid(a: np.ndarray, b: np.ndarray, shape_a: Sequence[int], shape_b: Sequence[int]) -> bool:
    """Two grids are one when their shapes match and their affines agree within 1 micrometre."""
    return tuple(shape_a) == tuple(shape_b) and bool(np.allclose(a, b, atol=1e-3, rtol=0))
