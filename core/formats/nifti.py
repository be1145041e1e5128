"""NIfTI in (nibabel) and NIfTI masks out, on the source's grid with the source's header.

A scan is one 3D or 4D file (sequences along the last axis) or, as nnU-Net names them, one file per
sequence: ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... Which channel is which sequence comes from
``sequences`` (names such as ``flair,t1,t1gd,t2``; see core.formats.volume.sequence_name), else from the
``dataset.json`` of an nnU-Net dataset the files sit in, else (one 3D file) from its file name (``flair``,
``t2f``, ``t2_flair``; a name saying ``t1``, ``t1c``, ``t2`` ... is refused: FLAIR is the one sequence the
model needs; a multi-channel file's name may name each channel in order, ``case_t1_flair_t1ce``), else one
channel is FLAIR. Several channels that nothing names are refused (422 ``unnamed_sequences``, naming the
choices): three volumes are never assumed to be pre-contrast, FLAIR, post-contrast. The Volume's notes say
where the names came from.

Geometry is the header's: a file with neither qform nor sform (both codes 0) is refused, since left and
right cannot be told apart; spatial units (``xyzt_units``) in metres or microns are converted, so the
Volume's affine, spacing and mL are in millimetres (the mask keeps the source header as it was).

Limits are checked from the header before the voxels are read: for bytes (an HTTP body), only the first
540 bytes are decompressed to read it, and never more than the header's claim afterwards (no gzip bomb).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from core.formats.cases import channel_gap, nifti_cases, split_name
from core.formats.volume import (
    SEQUENCE_TITLES,
    DimensionError,
    Limits,
    MissingSequenceError,
    NoOrientationError,
    NotFlairError,
    UnnamedSequencesError,
    UnreadableVolume,
    Volume,
    VolumeError,
    VolumeTooLarge,
    build_volume,
    parse_sequences,
    resample_to,
    same_grid,
    sequence_name,
)

MAX_CHANNELS = 8  # a 4D file with more volumes is a time series, not sequences
TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001}  # xyzt_units; 'unknown' is taken as mm, as tools do
# Words in a file name that name a sequence; 'pre' or 'post' alone are more often an operation's ('postop')
SEQUENCE_WORDS = re.compile(r"\b(flair|t2 ?f|tirm|dark ?fluid|t1(?:w|n|c|ce|gd|wce|post|pre)?|mprage|spgr|bravo"
                            r"|t2(?:w|star|s)?|pdw?|dwi|adc|swi|dti)\b")
Source = str | os.PathLike | bytes


def is_nifti_bytes(data: bytes) -> bool:
    """A single-file NIfTI-1/2 (``.nii``), gzipped or not, by its magic bytes."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.GzipFile(fileobj=io.BytesIO(data[:65536])).read(540)
        except (OSError, EOFError, zlib.error):
            return False
    return data[344:348] in (b"n+1\x00", b"ni1\x00") or data[4:8] in (b"n+2\x00", b"ni2\x00")


class _Beside:
    """The names beside a file, asked one at a time (no folder listing for a lone scan)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __contains__(self, name: object) -> bool:
        return (self.folder / str(name)).is_file()


def _channel(path: Path) -> tuple[str, int, str] | None:
    """(case, channel, suffix) for an nnU-Net channel file (core.formats.cases), else None."""
    split = split_name(path.name, _Beside(path.parent))
    return None if split is None or split[1] is None else (split[0], split[1], split[2])


def case_name(path: str | os.PathLike) -> str:
    """``BraTS_001_0000.nii.gz`` (beside its other channels) -> ``BraTS_001``; ``scan.nii.gz`` -> ``scan``."""
    path = Path(path)
    split = split_name(path.name, _Beside(path.parent))
    return split[0] if split else path.stem


def channel_files(path: str | os.PathLike) -> list[Path]:
    """The nnU-Net channel files of the case ``path`` belongs to (``<case>_0000`` ...), or just ``path``."""
    path = Path(path)
    channel = _channel(path)
    if channel is None:
        return [path]
    case, _, suffix = channel
    siblings = [p.name for p in path.parent.iterdir() if p.name.lower().endswith(suffix.lower())]
    files = nifti_cases(siblings)[case]
    gap = channel_gap(files)
    if gap:
        raise UnreadableVolume(f"{path.parent}/{case}: {gap}")
    return [path.parent / f for f in files]


def dataset_channel_names(path: str | os.PathLike) -> list[str] | None:
    """Channel names from the ``dataset.json`` of the nnU-Net dataset a file sits in (imagesTr/..)."""
    candidate = Path(path).resolve().parent.parent / "dataset.json"
    if not candidate.is_file():
        return None
    try:
        names = json.loads(candidate.read_text()).get("channel_names")
    except (OSError, ValueError):
        return None
    if not isinstance(names, dict):
        return None
    return [str(names[k]) for k in sorted(names, key=int)]


def _check_header(header: Any, limits: Limits, where: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) > 4:
        raise DimensionError(f"{where}: {len(shape)} dimensions {shape}; expected 3 (one sequence) or 4 "
                             "(sequences along the last axis)")
    if len(shape) < 2 or min(shape) < 1:
        raise DimensionError(f"{where}: shape {shape} is not an image volume")
    if len(shape) == 4 and shape[3] > MAX_CHANNELS:
        raise DimensionError(f"{where}: {shape[3]} volumes along the 4th axis; at most {MAX_CHANNELS} sequences "
                             "(is it a time series?)")
    limits.check_voxels(int(np.prod(shape, dtype=np.int64)), where)
    return shape


def _from_bytes(data: bytes, limits: Limits, where: str) -> nib.Nifti1Image:
    """Decompress only the header, check it, then at most the bytes it claims."""
    try:
        stream: Any = gzip.GzipFile(fileobj=io.BytesIO(data)) if data[:2] == b"\x1f\x8b" else io.BytesIO(data)
        head = stream.read(540)
        sizes = {e: int(np.frombuffer(head[:4], f"{e}i4")[0]) for e in "<>"} if len(head) >= 4 else {}
        endian = next((e for e, s in sizes.items() if s in (348, 540)), None)
        if endian is None:
            raise UnreadableVolume(f"{where}: not a single-file NIfTI (.nii or .nii.gz)")
        klass = nib.Nifti1Image if sizes[endian] == 348 else nib.Nifti2Image
        header = klass.header_class(binaryblock=head[: sizes[endian]], endianness=endian, check=False)
        shape = _check_header(header, limits, where)
        needed = int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize
        if needed > limits.max_bytes:
            raise VolumeTooLarge(f"{where}: {needed} bytes uncompressed; at most {limits.max_bytes}")
        raw = head + stream.read(max(needed - len(head), 0))
    except (OSError, EOFError, zlib.error) as exc:
        raise UnreadableVolume(f"{where}: unreadable gzip stream ({exc})") from exc
    if len(raw) < needed:
        raise UnreadableVolume(f"{where}: truncated: {len(raw)} bytes where the header claims {needed}")
    try:
        return klass.from_bytes(raw[:needed])
    except Exception as exc:  # nibabel raises many types for a corrupt header
        raise UnreadableVolume(f"{where}: unreadable NIfTI header ({type(exc).__name__}: {exc})") from exc


def load_nifti(source: Source, limits: Limits = Limits(), where: str | None = None) -> nib.Nifti1Image:
    """A NIfTI image (data not yet read) whose header passed ``limits``; UnreadableVolume otherwise."""
    where = where or ("request body" if isinstance(source, bytes) else str(source))
    if isinstance(source, bytes):
        return _from_bytes(source, limits, where)
    try:
        image = nib.load(os.fspath(source))
    except FileNotFoundError:
        raise
    except Exception as exc:  # ImageFileError, gzip and header errors
        raise UnreadableVolume(f"{where}: unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise UnreadableVolume(f"{where}: {type(image).__name__} is not NIfTI")
    _check_header(image.header, limits, where)
    return image


def read_array(image: nib.Nifti1Image, where: str) -> np.ndarray:
    """The voxels, scaled by the header's slope/intercept (uint8 stays uint8 when unscaled)."""
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # truncated or corrupt data
        raise UnreadableVolume(f"{where}: unreadable voxel data ({type(exc).__name__}: {exc})") from exc
    if data.dtype.kind not in "uif":
        raise UnreadableVolume(f"{where}: voxel type {data.dtype} is not a number")
    return data.astype(np.float32) if data.dtype.kind == "f" and data.dtype != np.float32 else data


NAMING = ("name them, one name per channel in order: sequences=pre,flair,post (HTTP, or the SageMaker custom "
          "attribute sequences=...; --sequences in the CLIs), a dataset.json with channel_names beside imagesTr/, or "
          "a file name that names each channel in order (case_t1_flair_t1ce.nii.gz). Names: pre, flair, post, t1, "
          "t1c (t1gd, t1ce), t2, or - to skip a channel")


def _unnamed(count: int, where: str) -> VolumeError:
    """Several channels and nothing naming them: never guessed (a wrong guess feeds T2 as FLAIR)."""
    if count == 3:
        return UnnamedSequencesError(f"{where}: 3 channels and nothing names them; they are not assumed to be "
                                     f"pre-contrast, FLAIR, post-contrast: {NAMING}")
    return DimensionError(f"{where}: {count} channels and nothing names them; {NAMING}")


def _file_name_sequences(label: str, count: int) -> tuple[list[str | None], str] | None:
    """A multi-channel file whose name names each channel in order (``case_t1_flair_t1ce``), else None."""
    words = SEQUENCE_WORDS.findall(" ".join(re.split(r"[^a-z0-9]+", label.lower())))
    if len(words) != count:
        return None
    return parse_sequences(words), f"the file name ({label!r} says {', '.join(repr(w) for w in words)})"


def name_sequence(name: str) -> tuple[str | None, str]:
    """('flair', 'pre', 'post' or 'other', the word) for a file name that names a sequence ('BraTS_001_t1ce',
    'sub-01_FLAIR', 't2_flair'), (None, '') for one that names none ('patient01', 'case_0000')."""
    text = " ".join(re.split(r"[^a-z0-9]+", name.lower()))
    found = SEQUENCE_WORDS.search(text)
    if not found:
        return None, ""
    return sequence_name(text) or "other", found.group(0)


def _sequence_names(sequences: Sequence[str] | None, paths: list[Any], count: int, name: str | None, where: str
                    ) -> tuple[list[str | None], str]:
    """Each channel's sequence and where that came from: the caller, dataset.json, the file name, or the default."""
    if sequences is not None:
        return parse_sequences(sequences), "the given sequence names"
    first = paths[0]
    names = None if isinstance(first, bytes) else dataset_channel_names(first)
    if names and len(paths) > 1:
        return parse_sequences(names), "the dataset.json channel_names"
    channel = None if isinstance(first, bytes) else _channel(Path(first))
    if names and count == 1 and channel and channel[1] < len(names):
        return parse_sequences([names[channel[1]]]), "the dataset.json channel_names"
    if names and len(paths) == 1 and channel is None and count == len(names) > 1:  # one 4D file of the dataset
        return parse_sequences(names), "the dataset.json channel_names"
    label = name if isinstance(first, bytes) else Path(first).name
    if count == 1:
        seq, word = name_sequence(label or "")
        if seq == "flair":
            return ["flair"], f"the file name ({label!r} says {word!r})"
        if seq is not None:
            what = SEQUENCE_TITLES.get(seq, f"{word.upper()}, which the model does not take")
            raise NotFlairError(f"{where}: the file name {label!r} says {word!r} ({what}), not FLAIR, and FLAIR is "
                                "the sequence the model cannot do without; if it is FLAIR after all, say so "
                                "(--sequences flair, or sequences=flair)")
        return ["flair"], ("the default: one channel is FLAIR (no sequence names given, no dataset.json, "
                      "no sequence word in its name)")
    named = _file_name_sequences(label or "", count) if len(paths) == 1 else None
    if named is None:
        raise _unnamed(count, where)
    return named


def mm_affine(image: Any) -> np.ndarray:
    """The image's affine in millimetres: some writers store metres or microns (``xyzt_units``)."""
    affine = np.array(image.affine, np.float64)
    affine[:3] *= TO_MM.get(image.header.get_xyzt_units()[0], 1.0)
    return affine


def check_orientation(image: Any, where: str) -> None:
    """Refuse a header with neither qform nor sform: nibabel would guess axes, left and right unknown."""
    if int(image.header["sform_code"]) == 0 and int(image.header["qform_code"]) == 0:
        raise NoOrientationError(f"{where}: the header has no orientation (qform_code and sform_code both 0), so "
                                 "left and right are unknown; write the file with its qform or sform (the scanner's "
                                 "affine), e.g. from the DICOM with dcm2niix")


def read_nifti(
    source: Source | Sequence[str | os.PathLike],
    *,
    sequences: Sequence[str] | None = None,
    name: str | None = None,
    limits: Limits = Limits(),
    rescale: str = "auto",
) -> Volume:
    """A NIfTI scan (a file, its bytes, or the list of one file per channel) -> a canonical Volume.

    A path named like ``<case>_0000.nii.gz`` brings its sibling channel files with it.
    """
    if isinstance(source, bytes | str | os.PathLike):
        paths = [source] if isinstance(source, bytes) else channel_files(source)
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise UnreadableVolume("no NIfTI files given")
    first = paths[0]
    where = "request body" if isinstance(first, bytes) else str(first)
    name = name or ("volume" if isinstance(first, bytes) else case_name(first))
    images = [load_nifti(p, limits) for p in paths]
    total = sum(int(np.prod(i.shape)) for i in images)
    limits.check_voxels(total, where)
    # Channels: (label, image index, 4th-axis index or None)
    layout: list[tuple[str, int, int | None]] = []
    for i, (p, image) in enumerate(zip(paths, images, strict=True)):
        label = "request body" if isinstance(p, bytes) else Path(p).name
        if len(image.shape) == 4:
            layout += [(f"{label}[..., {c}]", i, c) for c in range(image.shape[3])]
        else:
            layout.append((label, i, None))
    if len(images) > 1 and any(len(i.shape) == 4 for i in images):
        raise DimensionError(f"{where}: one file per channel must each be 3D")
    wanted, how = _sequence_names(sequences, paths, len(layout), name if isinstance(first, bytes) else None, where)
    if len(wanted) != len(layout):
        raise DimensionError(f"{where}: {len(wanted)} sequence names for {len(layout)} channels")
    chosen: dict[str, tuple[str, int, int | None]] = {}
    for seq, entry in zip(wanted, layout, strict=True):
        if seq is None:
            continue
        if seq in chosen:
            raise DimensionError(f"{where}: {chosen[seq][0]} and {entry[0]} are both {SEQUENCE_TITLES[seq]}")
        chosen[seq] = entry
    if not chosen:
        raise MissingSequenceError(f"{where}: none of the channels ({', '.join(sequences or [])}) is pre-contrast, "
                                   "FLAIR or post-contrast")
    used = sorted({i for _, i, _ in chosen.values()})
    for i in used:
        check_orientation(images[i], where if len(paths) == 1 else str(paths[i]))
    affines = {i: mm_affine(images[i]) for i in used}  # in mm, whatever the header's units
    ref_index = chosen["flair"][1] if "flair" in chosen else 0
    ref, ref_affine = images[ref_index], affines[ref_index]
    ref_shape = tuple(ref.shape[:3]) + (1,) * (3 - len(ref.shape[:3]))
    named = ", ".join(f"{label} = {SEQUENCE_TITLES[seq]}" for seq, (label, _, _) in chosen.items())
    notes: list[str] = [f"sequences from {how}: {named}"]
    units = ref.header.get_xyzt_units()[0]
    if TO_MM.get(units, 1.0) != 1.0:
        notes.append(f"the header's spatial unit is the {units}: spacing and volumes converted to mm and mL")
    channels: dict[str, np.ndarray] = {}
    loaded: dict[int, np.ndarray] = {}  # a 4D file is read once for all its channels
    for seq, (label, i, c) in chosen.items():
        if i not in loaded:
            loaded[i] = read_array(images[i], label)
        data = loaded[i][..., c] if c is not None else loaded[i]
        data = data.reshape(data.shape[:3] + (1,) * (3 - data.ndim))
        if not same_grid(affines[i], ref_affine, data.shape, ref_shape):
            data = resample_to(data, affines[i], ref_affine, ref_shape)  # type: ignore[arg-type]
            notes.append(f"{SEQUENCE_TITLES[seq]} ({label}) resampled onto the reference grid (trilinear)")
        channels[seq] = data
    sources = {seq: label for seq, (label, _, _) in chosen.items()}
    return build_volume(channels, ref_affine, kind="nifti", name=name, sources=sources, rescale=rescale,
                        notes=notes, header=ref.header, limits=limits)


def nifti_mask_image(volume: Volume, masks: np.ndarray, labels: int = 1) -> nib.Nifti1Image:
    """(N,H,W) canonical masks -> a uint8 label image on the source grid: the source header (NIfTI input;
    qform, sform, units and dimension info as they were) or the DICOM grid's affine (DICOM input)."""
    data = volume.to_source(np.asarray(masks).astype(np.uint8))
    if volume.header is not None:
        header = volume.header.copy()
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    else:
        header, klass = nib.Nifti1Header(), nib.Nifti1Image
        header.set_xyzt_units("mm")
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    header.set_intent("label")
    header["cal_min"], header["cal_max"] = 0, max(labels, 1)
    header["descrip"] = b"gliomaseg mask"
    # the source's own affine (in its own units: the header says which), so a viewer overlays the mask exactly
    image = klass(data, volume.header.get_best_affine() if volume.header is not None else volume.affine, header)
    if volume.header is None:
        image.set_qform(volume.affine, code=1)  # scanner coordinates, as the DICOM series has them
        image.set_sform(volume.affine, code=1)
    return image


def nifti_mask_bytes(volume: Volume, masks: np.ndarray, labels: int = 1, compress: bool = True) -> bytes:
    """The mask as ``.nii.gz`` (or ``.nii``) bytes."""
    raw = nifti_mask_image(volume, masks, labels).to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw
