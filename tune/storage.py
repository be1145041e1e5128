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
# The searcher's files saved with each snapshot, under the same <time> (the driver session's start).
SEARCHER_FILES = ("search_gen_state-{}.json", "searcher-state-{}.pkl", "basic-variant-state-{}.json")
WHOLE_SUFFIX = ".whole"
DRIVER_FILES = (STUDY_DB, "leaderboard.csv", "history.json", "run.json")


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem honouring AWS_ENDPOINT_URL (MinIO, moto, LocalStack) and the region.

    No keys: the filesystem is pickled to the trial workers and into Ray's experiment state, so each
    node finds its own credentials through the AWS chain (instance profile, credentials file; see
    docs/scaling-out.md). The endpoint and region are passed explicitly because the workers' environment
    was fixed when the Ray cluster started.
    """
    kwargs: dict[str, object] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
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

    def keep_whole_snapshot(self) -> None:
        """Copy the newest snapshot group to ``<name>.whole`` (local runs; see KeepWholeSnapshot).

        The searcher's files go first and the experiment state last, each through a temporary file and a
        rename, so a kill while copying leaves every copy whole and the searcher at most one event ahead
        of the experiment state (which resume tolerates: a study ahead of Ray's state).
        """
        if self.remote:
            return
        base = Path(self.experiment_path)
        groups = snapshot_groups({p.name for p in base.iterdir()}) if base.is_dir() else []
        if not groups:
            return
        for name in sorted(groups[0][1], key=lambda n: n.startswith(SNAPSHOT_PREFIX)):  # experiment state last
            tmp = base / f".{name}{WHOLE_SUFFIX}.tmp"
            shutil.copyfile(base / name, tmp)
            os.replace(tmp, base / f"{name}{WHOLE_SUFFIX}")

    def repair_torn_snapshots(self) -> dict[str, str]:
        """Mend Ray's newest experiment snapshot where a killed driver left it torn; name -> what was done.

        Ray writes its experiment state in place, so a driver killed mid-write leaves a truncated
        snapshot, and Tuner.restore takes the newest one: it would resume with trials missing. A torn
        group is renamed ``*.torn`` and replaced by its whole copy (one event behind: the trials resume
        from the checkpoints it names, which still exist). Without a copy (runs on S3, or written before
        copies were kept) it is only set aside, so Ray resumes from an older driver session's snapshot,
        whose checkpoints may have been deleted since.
        """
        fs = self.fs or pafs.LocalFileSystem()
        base = self.experiment_path
        names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))}
        done: dict[str, str] = {}
        for _, group in snapshot_groups(names):
            if all(_whole(fs, f"{base}/{n}") for n in group):
                break
            copies = [f"{n}{WHOLE_SUFFIX}" for n in group]
            restore = all(c in names for c in copies) and all(_whole(fs, f"{base}/{c}") for c in copies)
            for n in group:
                fs.move(f"{base}/{n}", f"{base}/{n}.torn")
                if restore:
                    fs.copy_file(f"{base}/{n}{WHOLE_SUFFIX}", f"{base}/{n}")
                done[n] = "restored from its whole copy" if restore else "set aside"
            if restore:
                break
        return done

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


def snapshot_groups(names: set[str]) -> list[tuple[str, list[str]]]:
    """(time, files) of each of Ray's snapshots among ``names``, newest first."""
    stamps = sorted((n[len(SNAPSHOT_PREFIX):-len(".json")] for n in names
                     if n.startswith(SNAPSHOT_PREFIX) and n.endswith(".json")), reverse=True)
    return [(stamp, [n for n in (f"{SNAPSHOT_PREFIX}{stamp}.json", *(t.format(stamp) for t in SEARCHER_FILES))
                     if n in names]) for stamp in stamps]


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
