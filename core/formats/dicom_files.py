"""Where a DICOM study's files come from: a folder (its series in subfolders or not), a zip file, or the
bytes of a zip or of one DICOM file (an HTTP body); and reading one of them with pydicom.

A zip's declared sizes and compression ratios are checked before anything is decompressed, and a
folder's or zip's file count before any file is read.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pydicom
from pydicom.errors import InvalidDicomError

from core.formats.volume import Limits, UnreadableVolume, VolumeTooLarge, ZipBombError

Source = str | os.PathLike | bytes


@dataclass
class Member:
    """One file of a study: its name (relative to the folder or zip) and how to open it."""

    name: str
    open: Callable[[], IO[bytes]]


def is_zip_bytes(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def is_dicom_bytes(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def looks_like_dicom_dir(path: str | os.PathLike, probe: int = 20) -> bool:
    """A folder whose first files (recursively) include a DICOM one (preamble 'DICM' or a .dcm name)."""
    for i, f in enumerate(p for p in sorted(Path(path).rglob("*")) if p.is_file() and not hidden(p.name)):
        if i >= probe:
            return False
        if f.suffix.lower() == ".dcm":
            return True
        with open(f, "rb") as fh:
            if is_dicom_bytes(fh.read(132)):
                return True
    return False


def hidden(name: str) -> bool:
    """Names no study file has: dot files, macOS resource forks, the DICOMDIR index."""
    parts = name.replace("\\", "/").split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1].upper() == "DICOMDIR"


def zip_members(zf: zipfile.ZipFile, where: str, limits: Limits) -> list[Member]:
    """A zip's files, refused before decompressing when their count, total size or ratio is too large."""
    infos = [i for i in zf.infolist() if not i.is_dir() and not hidden(i.filename)]
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
    return [Member(i.filename, lambda i=i: zf.open(i)) for i in infos]


def members(source: Source, limits: Limits) -> tuple[list[Member], str, zipfile.ZipFile | None]:
    """(files, where they are for messages, the open zip to close afterwards or None) of a study."""
    if isinstance(source, bytes):
        if is_dicom_bytes(source):
            return [Member("request body", lambda: io.BytesIO(source))], "request body", None
        try:
            zf = zipfile.ZipFile(io.BytesIO(source))
        except zipfile.BadZipFile as exc:
            raise UnreadableVolume(f"request body: neither a zip nor a DICOM file ({exc})") from exc
        return zip_members(zf, "request body", limits), "request body", zf
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not hidden(str(p.relative_to(path)))]
        if len(files) > limits.max_files:
            raise VolumeTooLarge(f"{path}: {len(files)} files; at most {limits.max_files}")
        return [Member(str(f.relative_to(path)), lambda f=f: open(f, "rb")) for f in files], str(path), None
    if zipfile.is_zipfile(path):
        zf = zipfile.ZipFile(path)
        return zip_members(zf, str(path), limits), str(path), zf
    return [Member(path.name, lambda: open(path, "rb"))], str(path), None


def read_member(member: Member, where: str, pixels: bool) -> Any:
    """A file's pydicom dataset (its header only unless ``pixels``), None for a file that is not DICOM."""
    try:
        with member.open() as fh:
            return pydicom.dcmread(fh, stop_before_pixels=not pixels)
    except InvalidDicomError:
        return None
    except zipfile.BadZipFile as exc:
        raise UnreadableVolume(f"{where}/{member.name}: corrupt zip member ({exc})") from exc
    except Exception as exc:  # pydicom raises many types for a truncated or corrupt file
        raise UnreadableVolume(f"{where}/{member.name}: unreadable DICOM ({type(exc).__name__}: {exc})") from exc
