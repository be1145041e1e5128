"""Fetch the Kaggle lgg-mri-segmentation data with kagglehub (optional dependency)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DATASET = "mateuszbuda/lgg-mri-segmentation"


class DownloadError(RuntimeError):
    """The data could not be fetched; the message says why and what to do."""


def download(out: str | Path) -> Path:
    """Download (or reuse kagglehub's cache) and link the data to ``out/kaggle_3m``."""
    try:
        import kagglehub
    except ImportError as exc:
        raise DownloadError("kagglehub is not installed: in the clone, "
                            ".venv/bin/pip install -e '.[kaggle]'") from exc
    has_credentials = os.environ.get("KAGGLE_USERNAME") or Path("~/.kaggle/kaggle.json").expanduser().exists()
    if not has_credentials and not os.environ.get("KAGGLE_API_TOKEN"):
        raise DownloadError(
            "no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY or put kaggle.json in ~/.kaggle "
            "(https://www.kaggle.com/docs/api); or use `python -m core data synth` for synthetic data"
        )
    try:
        cached = Path(kagglehub.dataset_download(DATASET))
    except Exception as exc:  # network errors, 401/403, ... all mean the same thing to the user
        raise DownloadError(f"could not download {DATASET} (offline or not authorised?): {exc}") from exc
    source = next((p for p in [cached / "kaggle_3m", *cached.glob("*/kaggle_3m")] if p.is_dir()), None)
    if source is None:
        raise DownloadError(f"{cached}: downloaded, but no kaggle_3m/ folder inside")
    target = Path(out) / "kaggle_3m"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} already exists; remove it or choose another --out")
    try:
        target.symlink_to(source, target_is_directory=True)
    except OSError:
        shutil.copytree(source, target)
    return target
