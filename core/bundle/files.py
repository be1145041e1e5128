"""Bundle locations: a local directory or ``s3://bucket/prefix``, fetched once per node and checked.

A bundle's ``config.json`` records a sha256 per file (``files``: name -> digest; config.json cannot
hash itself). A remote bundle is downloaded into ``<cache>/<sha256 of config.json>`` (the config holds
every other file's digest, so its hash keys the whole content), into a temporary folder first, checked,
then renamed into place; a later load on the same node reuses the verified copy. Nothing here imports
torch or unpickles anything; boto3 is imported only for remote bundles (core.io.s3_client).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from core.io import is_remote, parse_s3_uri, s3_client

log = logging.getLogger(__name__)

# A bundle's files (core.bundle.model writes them); here so that reading a bundle needs no torch.
WEIGHTS, CONFIG, METRICS = "model.safetensors", "config.json", "metrics.json"
FILES_KEY = "files"
_CHUNK = 1 << 20


def member_file(index: int) -> str:
    """An ensemble member's weights file inside its bundle."""
    return f"members/{index}.safetensors"


def cache_root() -> Path:
    """``$GLIOMASEG_BUNDLE_CACHE``, else ``$GLIOMASEG_CACHE/bundles``, else ~/.cache/gliomaseg/bundles."""
    if os.environ.get("GLIOMASEG_BUNDLE_CACHE"):
        return Path(os.environ["GLIOMASEG_BUNDLE_CACHE"])
    return Path(os.environ.get("GLIOMASEG_CACHE", Path.home() / ".cache" / "gliomaseg")) / "bundles"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX names) except config.json and hidden files."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != CONFIG and not any(p.startswith(".") for p in rel.split("/")):
            out[rel] = sha256_file(path)
    return out


def _safe_name(name: str) -> bool:
    """A relative POSIX name that stays inside its folder (no absolute path, no "..", no backslash)."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\\" not in name


def listed_files(config: Mapping[str, Any], where: str) -> dict[str, str] | None:
    """The config's name -> sha256 table, checked to stay inside the bundle; None for older bundles."""
    files = config.get(FILES_KEY)
    if files is None:
        return None
    if not isinstance(files, dict):
        raise ValueError(f"{where}/{CONFIG}: '{FILES_KEY}' must map file names to sha256 digests")
    for name, digest in files.items():
        # A crafted config must not make a download write outside the cache folder.
        if name == CONFIG or not _safe_name(str(name)):
            raise ValueError(f"{where}/{CONFIG}: file name {name!r} is not a plain relative path")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"{where}/{CONFIG}: sha256 of {name} is not a 64-digit hex digest")
    return {str(k): str(v) for k, v in files.items()}


def verify_files(folder: Path, files: Mapping[str, str], shown: str | None = None) -> None:
    """Check every listed file against its sha256; errors name the file (``shown`` is its location)."""
    shown = shown or str(folder)
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{shown}/{name}: missing; {CONFIG} lists it with sha256 {expected[:12]}...")
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(f"{shown}/{name}: sha256 {actual[:12]}... does not match {expected[:12]}... recorded in "
                             f"{CONFIG} (the file was changed or corrupted after the bundle was written)")


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


@contextlib.contextmanager
def _s3_errors(uri: str, missing: str = "no such object") -> Iterator[None]:
    """botocore failures as the errors the CLIs report in one line: a missing object -> FileNotFoundError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise FileNotFoundError(f"{uri}: {missing} ({code})") from exc
        raise ValueError(f"{uri}: S3 refused the request ({exc})") from exc
    except BotoCoreError as exc:
        raise ValueError(f"{uri}: cannot reach S3 ({exc})") from exc


def read_remote_config(uri: str, client: Any | None = None) -> tuple[bytes, dict[str, Any]]:
    """config.json of a remote bundle (one small GET): its bytes and parsed content."""
    bucket, prefix = parse_s3_uri(uri)
    client = client or s3_client()
    where = f"s3://{bucket}/{_key(prefix, CONFIG)}"
    with _s3_errors(where):
        raw = client.get_object(Bucket=bucket, Key=_key(prefix, CONFIG))["Body"].read()
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object")
    return raw, config


def read_config(uri: str | os.PathLike, client: Any | None = None) -> dict[str, Any]:
    """A bundle's config.json, local or remote, without fetching weights (to check a URI early)."""
    if is_remote(uri):
        return read_remote_config(str(uri), client)[1]
    path = Path(uri) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a bundle directory needs {CONFIG}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _remote_names(client: Any, bucket: str, prefix: str, uri: str) -> dict[str, str]:
    """Older bundles record no hashes: every object under the prefix, name -> ETag (keys the cache)."""
    found: dict[str, str] = {}
    with _s3_errors(uri):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_key(prefix, ""))
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"][len(_key(prefix, "")):]
                if not name or name == CONFIG or name.endswith("/"):
                    continue
                if not _safe_name(name):  # a key such as "a/../../x" must not land outside the cache
                    log.warning("%s: skipping object %r (not a plain relative name)", uri, name)
                    continue
                found[name] = str(obj.get("ETag", ""))
    return found


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One download per node at a time for one bundle (replicas on a node start together)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent downloads still end in one atomic rename
        yield
        return
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached_ok(target: Path, files: Mapping[str, str] | None) -> bool:
    if not (target / CONFIG).is_file():
        return False
    if files is None:
        return True  # keyed by the objects' ETags; nothing recorded to check against
    try:
        verify_files(target, files)
        return True
    except (FileNotFoundError, ValueError) as exc:
        log.warning("cached bundle %s failed its check (%s); fetching it again", target, exc)
        return False


def resolve_bundle(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                   client: Any | None = None) -> Path:
    """Local directory for a bundle: a local path as given; ``s3://`` fetched (or reused) and checked."""
    if not is_remote(uri):
        return Path(uri)
    uri = str(uri).rstrip("/")
    bucket, prefix = parse_s3_uri(uri)
    client = client or s3_client()
    raw, config = read_remote_config(uri, client)
    files = listed_files(config, uri)
    digest = hashlib.sha256(raw)
    names = files
    if files is None:
        log.info("%s records no file hashes; loading it unchecked", uri)
        names = _remote_names(client, bucket, prefix, uri)
        digest.update(json.dumps(names, sort_keys=True).encode())
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / digest.hexdigest()
    with _locked(root / f".{target.name}.lock"):
        if target.is_dir():
            if _cached_ok(target, files):
                log.debug("bundle %s: cached at %s", uri, target)
                return target
            shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            for name in names or {}:
                dest = tmp / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shown = f"s3://{bucket}/{_key(prefix, name)}"
                with _s3_errors(shown, missing=f"missing; {CONFIG} lists it"):
                    client.download_file(bucket, _key(prefix, name), str(dest))
            if files is not None:
                verify_files(tmp, files, shown=uri)
            (tmp / CONFIG).write_bytes(raw)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("bundle %s: fetched into %s", uri, target)
    return target
