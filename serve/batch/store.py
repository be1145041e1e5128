"""Where `serve batch` reads a cohort and writes its masks: a local folder or ``s3://bucket/prefix``.

A ``Store`` is only its URI, so it pickles into Ray Data's tasks and actors on any node, and each
process opens S3 itself (boto3, honouring AWS_ENDPOINT_URL). A patient's output is committed as a
unit: locally its folder appears by one rename (core.io.atomic_dir); on S3 the masks go first and the
``patient.json`` record last, so a patient counts as written only once all of it is there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from core.io import atomic_dir, atomic_write_bytes, is_remote, parse_s3_uri, s3_client

MARKER = "patient.json"  # written last into each patient's folder: "this patient is done"
# What boto3 reads from the environment that is not a secret; forwarded to Ray's workers (worker_env).
# Never the keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN): a runtime_env is stored
# in the GCS and shown on the dashboard. Workers use their node's own credentials: its instance role, or
# the credentials file / profile named here (docs/scaling-out.md).
AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
           "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "GLIOMASEG_CACHE", "GLIOMASEG_BUNDLE_CACHE")
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def worker_env() -> dict[str, str]:
    """The driver's S3 settings and bundle cache, for Ray workers that started before they were set
    (or on nodes without them); never its keys (SECRET_ENV)."""
    return {k: os.environ[k] for k in AWS_ENV if os.environ.get(k)}


def worker_runtime_env() -> dict[str, Any]:
    """Ray remote args carrying worker_env (empty when there is nothing to forward)."""
    env = worker_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


@dataclass(frozen=True)
class Store:
    """A cohort's source or a run's output: a local folder or ``s3://bucket/prefix``, by its URI."""

    uri: str

    def __post_init__(self) -> None:
        if self.remote:
            parse_s3_uri(self.uri)  # ValueError for s3:// without a bucket

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    @property
    def root(self) -> Path:
        return Path(self.uri)

    @cached_property
    def _bucket_prefix(self) -> tuple[str, str]:
        return parse_s3_uri(self.uri)

    @cached_property
    def _client(self) -> Any:
        return s3_client()

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri}  # never pickle a boto3 client into a Ray task

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "uri", state["uri"])

    def where(self, rel: str) -> str:
        """How a file is named in messages: its full path or s3:// URI."""
        return f"{self.uri.rstrip('/')}/{rel}"

    def _key(self, rel: str) -> str:
        prefix = self._bucket_prefix[1]
        return f"{prefix}/{rel}" if prefix else rel

    def same_place(self, other: Store) -> bool:
        if self.remote != other.remote:
            return False
        if self.remote:
            return self._bucket_prefix == other._bucket_prefix
        return self.root.resolve() == other.root.resolve()

    def folders(self) -> dict[str, list[str]]:
        """Each immediate subfolder (a patient) -> the names of the files directly in it, sorted."""
        out: dict[str, list[str]] = {}
        if not self.remote:
            if not self.root.is_dir():
                raise FileNotFoundError(f"{self.uri}: no such directory")
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                out[folder.name] = sorted(f.name for f in folder.iterdir() if f.is_file())
            return out
        bucket, _ = self._bucket_prefix
        start = self._key("")
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start)
        for page in pages:
            for obj in page.get("Contents", []):
                parts = obj["Key"][len(start):].split("/")
                if len(parts) == 2 and parts[1] and not parts[0].startswith("."):
                    out.setdefault(parts[0], []).append(parts[1])
        return {k: sorted(v) for k, v in sorted(out.items())}

    def tree(self) -> tuple[list[str], dict[str, list[str]]]:
        """(the files directly under the root, each immediate subfolder -> every file under it, as a
        relative POSIX path, at any depth), sorted; hidden names are left out. A scan cohort keeps
        NIfTI cases and zipped DICOM studies at the top and a DICOM study's series in subfolders."""
        top: list[str] = []
        out: dict[str, list[str]] = {}
        if not self.remote:
            if not self.root.is_dir():
                raise FileNotFoundError(f"{self.uri}: no such directory")
            for entry in sorted(p for p in self.root.iterdir() if not p.name.startswith(".")):
                if entry.is_file():
                    top.append(entry.name)
                elif entry.is_dir():
                    files = (f.relative_to(entry).as_posix() for f in entry.rglob("*") if f.is_file())
                    out[entry.name] = sorted(f for f in files if not any(x.startswith(".") for x in f.split("/")))
            return top, out
        bucket, _ = self._bucket_prefix
        start = self._key("")
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
            for obj in page.get("Contents", []):
                parts = obj["Key"][len(start):].split("/")
                if not parts[-1] or any(x.startswith(".") for x in parts):
                    continue
                if len(parts) == 1:
                    top.append(parts[0])
                else:
                    out.setdefault(parts[0], []).append("/".join(parts[1:]))
        return sorted(top), {k: sorted(v) for k, v in sorted(out.items())}

    def local_path(self, rel: str) -> Path | None:
        """The file's path when the store is a local folder (readers that want paths use it), else None."""
        return None if self.remote else self.root / rel

    def finished(self) -> set[str]:
        """Patient folders whose record is written (a rerun skips them)."""
        if not self.remote:
            if not self.root.is_dir():
                return set()
            return {p.name for p in self.root.iterdir() if p.is_dir() and (p / MARKER).is_file()}
        return {name for name, files in self.folders().items() if MARKER in files}

    def read(self, rel: str) -> bytes:
        if not self.remote:
            return (self.root / rel).read_bytes()
        bucket, _ = self._bucket_prefix
        return self._client.get_object(Bucket=bucket, Key=self._key(rel))["Body"].read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read(rel))

    def write(self, rel: str, data: bytes) -> None:
        if not self.remote:
            atomic_write_bytes(self.root / rel, data)
            return
        bucket, _ = self._bucket_prefix
        self._client.put_object(Bucket=bucket, Key=self._key(rel), Body=data)

    def write_patient(self, name: str, files: Mapping[str, bytes], record: dict[str, Any]) -> None:
        """All of a patient's files, then its record; a crash leaves it unfinished, never half-marked."""
        marker = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
        if not self.remote:
            with atomic_dir(self.root / name) as tmp:
                for rel, data in files.items():
                    (tmp / rel).write_bytes(data)
                (tmp / MARKER).write_bytes(marker)
            return
        for rel, data in files.items():
            self.write(f"{name}/{rel}", data)
        self.write(f"{name}/{MARKER}", marker)
