"""Where a run lives: ``runs/NAME`` (or ``DIR/NAME``) on disk, or ``s3://bucket/prefix/NAME``.

Ray writes its experiment (trial results, checkpoints, restore state) straight to the location through
a pyarrow filesystem. The driver's own files (optuna.db, leaderboard.csv, history.json, run.json,
best/, report/) are written to a local directory and, for S3, uploaded next to Ray's: SQLite cannot
live on S3, so the study is kept in a local mirror and pushed after every finished trial.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

RAY_DIR = "ray"  # Ray's experiment directory inside the run
STUDY_DB = "optuna.db"
SNAPSHOT_PREFIX = "experiment_state-"  # Ray's experiment snapshots: experiment_state-<time>.json
DRIVER_FILES = (STUDY_DB, "leaderboard.csv", "history.json", "run.json")


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem honouring AWS_ENDPOINT_URL (MinIO, moto, LocalStack) and AWS_* keys.

    Keys and endpoint are passed explicitly because the filesystem is pickled to the trial workers,
    whose environment was fixed when the Ray cluster started.
    """
    kwargs: dict[str, object] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)  # type: ignore[arg-type]


@dataclass
class RunStorage:
    """One run's location. ``local`` holds the driver's files (the run itself when not on S3)."""

    name: str
    root: str  # a directory, or s3://bucket/prefix
    local: Path
    fs: pafs.FileSystem | None = None  # set for S3

    @classmethod
    def open(cls, name: str, storage: str | None = None) -> RunStorage:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"--name {name!r}: use a plain directory name")
        root = storage or "runs"
        if root.startswith("s3://"):
            bucket_prefix = root[len("s3://") :].strip("/")
            if not bucket_prefix:
                raise ValueError(f"--storage {root!r}: no bucket")
            cache = Path(os.environ.get("GLIOMASEG_CACHE", Path.home() / ".cache" / "gliomaseg"))
            return cls(name, f"s3://{bucket_prefix}", cache / "tune" / bucket_prefix / name, s3_filesystem())
        if "://" in root:
            raise ValueError(f"--storage {root!r}: a directory or s3://bucket/prefix")
        local = Path(root).expanduser().resolve() / name
        return cls(name, str(local.parent), local)

    @classmethod
    def from_run_path(cls, path: str) -> RunStorage:
        """``runs/NAME`` or ``s3://bucket/prefix/NAME`` (as given to `python -m tune report`)."""
        path = path.rstrip("/")
        head, _, name = path.rpartition("/")
        return cls.open(name, head or ".")

    @property
    def remote(self) -> bool:
        return self.fs is not None

    @property
    def uri(self) -> str:
        return f"{self.root}/{self.name}"

    @property
    def ray_storage_path(self) -> str:
        """What RunConfig(storage_path=...) takes: a local path, or bucket/prefix/NAME with ``fs``."""
        return self.uri[len("s3://") :] if self.remote else str(self.local)

    @property
    def experiment_path(self) -> str:
        return f"{self.ray_storage_path}/{RAY_DIR}"

    def set_aside_torn_snapshots(self) -> list[str]:
        """Rename Ray's newest experiment snapshots to ``*.torn`` while they are not whole files.

        Ray writes its experiment state in place, so a driver killed mid-write leaves a truncated
        snapshot, and Tuner.restore takes the newest one: it would resume with trials missing. Setting
        torn ones aside makes it resume from the last whole snapshot (finished trials re-report from
        their checkpoints). Returns the names set aside.
        """
        fs = self.fs or pafs.LocalFileSystem()
        base = self.experiment_path
        names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))}
        stamps = sorted((n[len(SNAPSHOT_PREFIX):-len(".json")] for n in names
                         if n.startswith(SNAPSHOT_PREFIX) and n.endswith(".json")), reverse=True)
        moved: list[str] = []
        for stamp in stamps:
            group = [n for n in (f"{SNAPSHOT_PREFIX}{stamp}.json", f"search_gen_state-{stamp}.json",
                                 f"searcher-state-{stamp}.pkl") if n in names]
            if all(_whole(fs, f"{base}/{n}") for n in group):
                break
            for n in group:
                fs.move(f"{base}/{n}", f"{base}/{n}.torn")
            moved += group
        return moved

    @property
    def study_url(self) -> str:
        return f"sqlite:///{self.local / STUDY_DB}"

    def exists(self) -> bool:
        """Does the location already hold a run (Ray experiment or driver files)?"""
        if not self.remote:
            return (self.local / RAY_DIR).exists() or (self.local / STUDY_DB).exists()
        assert self.fs is not None
        info = self.fs.get_file_info(pafs.FileSelector(self.ray_storage_path, allow_not_found=True))
        return bool(info)

    def push(self, *names: str) -> None:
        """Upload driver files or directories (relative to ``local``) to S3; no-op on disk."""
        if not self.remote:
            return
        assert self.fs is not None
        for name in names:
            src = self.local / name
            if not src.exists():
                continue
            dest = f"{self.ray_storage_path}/{name}"
            if name == STUDY_DB:
                with tempfile.TemporaryDirectory() as tmp:  # a consistent snapshot, even mid-write
                    snap = Path(tmp) / STUDY_DB
                    sqlite_backup(src, snap)
                    pafs.copy_files(str(snap), dest, destination_filesystem=self.fs)
                continue
            if src.is_dir():
                self.fs.create_dir(dest, recursive=True)
            pafs.copy_files(str(src), dest, destination_filesystem=self.fs)

    def pull(self, *names: str) -> None:
        """Download driver files or directories from S3 into ``local`` (missing ones are skipped)."""
        if not self.remote:
            return
        assert self.fs is not None
        self.local.mkdir(parents=True, exist_ok=True)
        for name in names:
            src = f"{self.ray_storage_path}/{name}"
            info = self.fs.get_file_info(src)
            if info.type == pafs.FileType.NotFound:
                continue
            dest = self.local / name
            if info.type == pafs.FileType.Directory:
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
            pafs.copy_files(src, str(dest), source_filesystem=self.fs)


def _whole(fs: pafs.FileSystem, path: str) -> bool:
    """The experiment snapshot parses as JSON; Ray's searcher snapshots (pickles, whatever their suffix) end
    with pickle's STOP opcode (checked, never unpickled)."""
    with fs.open_input_stream(path) as fh:
        data = fh.read()
    if path.rsplit("/", 1)[-1].startswith(SNAPSHOT_PREFIX):
        try:
            json.loads(data)
        except ValueError:
            return False
        return True
    return data.endswith(b".")


def sqlite_backup(src: Path, dest: Path) -> None:
    """Copy a SQLite database through its backup API (safe while another connection writes)."""
    with closing(sqlite3.connect(src)) as source, closing(sqlite3.connect(dest)) as target:
        source.backup(target)
