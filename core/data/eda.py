"""Exploratory plots and statistics of a prepared directory, written to PREPARED/eda/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from core.data.arrays import SPLITS, SplitArrays, load_split, load_split_info  # noqa: E402
from core.formats.overlays import overlay  # noqa: E402
from core.io import write_json  # noqa: E402

CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")


def _channel_stats(arrays: SplitArrays) -> dict[str, np.ndarray]:
    flat = arrays.images.reshape(len(arrays), 3, -1).astype(np.float32)
    return {"min": flat.min(2), "max": flat.max(2), "mean": flat.mean(2), "std": flat.std(2)}


def run_eda(prepared: str | Path, examples: int = 6, seed: int = 0) -> dict[str, Any]:
    """Write the EDA plots and stats.json; returns the stats."""
    prepared = Path(prepared)
    out = prepared / "eda"
    out.mkdir(exist_ok=True)
    info = load_split_info(prepared)
    splits = {s: load_split(prepared, s) for s in SPLITS if info["counts"][s]["slices"]}
    stats: dict[str, Any] = {"splits": info["counts"], "classes": info["class_names"], "channels": {}}

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(splits)
    tumour = [float(splits[s].tumour.mean()) for s in names]
    ax.bar(names, tumour, color="tab:red", label="tumour")
    ax.bar(names, [1 - t for t in tumour], bottom=tumour, color="tab:gray", label="no tumour")
    ax.set_ylabel("share of slices")
    ax.set_title("Tumour / no-tumour slices per split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tumour_share.png", dpi=100)
    plt.close(fig)

    per_split = [_channel_stats(a) for a in splits.values()]
    all_stats = {k: np.concatenate([s[k] for s in per_split]) for k in ("min", "max", "mean", "std")}
    fig, axes = plt.subplots(3, 4, figsize=(12, 7))
    for c, channel in enumerate(CHANNELS):
        stats["channels"][channel] = {}
        for j, key in enumerate(("min", "max", "mean", "std")):
            values = all_stats[key][:, c]
            axes[c, j].hist(values, bins=40, color=f"C{c}")
            axes[c, j].set_title(f"{channel} {key}", fontsize=9)
            stats["channels"][channel][key] = {"mean": float(values.mean()), "std": float(values.std())}
    fig.suptitle("Per-slice channel statistics (uint8)")
    fig.tight_layout()
    fig.savefig(out / "channel_histograms.png", dpi=100)
    plt.close(fig)

    train = next(iter(splits.values()))
    areas = np.concatenate([(a.masks > 0).reshape(len(a), -1).sum(1) for a in splits.values()])
    areas = areas[areas > 0]
    stats["tumour_area_pixels"] = {
        "count": int(areas.size),
        **(
            {"mean": float(areas.mean()), "median": float(np.median(areas)), "max": int(areas.max())}
            if areas.size
            else {}
        ),
    }
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(areas, bins=40, color="tab:red")
    ax.set_xlabel("tumour area (pixels) on tumour slices")
    ax.set_ylabel("slices")
    fig.tight_layout()
    fig.savefig(out / "tumour_area.png", dpi=100)
    plt.close(fig)

    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(train.tumour)
    if rows.size:
        rows = rng.choice(rows, size=min(examples, rows.size), replace=False)
    else:
        rows = np.arange(min(examples, len(train)))
    fig, axes = plt.subplots(2, max(len(rows), 1), figsize=(2.4 * max(len(rows), 1), 5), squeeze=False)
    for j, r in enumerate(rows):
        image = np.asarray(train.images[r]).transpose(1, 2, 0)
        axes[0, j].imshow(image[..., 1], cmap="gray")
        axes[0, j].set_title(f"{train.patients[r]} #{train.slices[r]}", fontsize=7)
        axes[1, j].imshow(overlay(image, np.asarray(train.masks[r])))
        for a in axes[:, j]:
            a.axis("off")
    fig.suptitle("Examples: FLAIR (top) and mask overlay (bottom)")
    fig.tight_layout()
    fig.savefig(out / "examples.png", dpi=100)
    plt.close(fig)

    write_json(out / "stats.json", stats)
    return stats
