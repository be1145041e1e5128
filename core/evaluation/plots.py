"""Matplotlib (Agg) figures for evaluation reports: Dice histogram, slice galleries, bars, confusion."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from core.formats.overlays import overlay  # noqa: E402  (red tint per predicted label)

TRUTH_COLOUR = np.array([60, 255, 60], np.uint8)


def overlay_with_truth(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 uint8: prediction tinted (red for tumour), ground-truth outline in green."""
    out = overlay(image, pred)
    if truth is not None and truth.any():
        fg = truth > 0
        edge = fg & ~ndimage.binary_erosion(fg)
        out[edge] = TRUTH_COLOUR
    return out


def _save(fig: plt.Figure, path: str | os.PathLike, top: float = 1.0) -> None:
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dice_histogram(dice: np.ndarray, path: str | os.PathLike, title: str = "Slice Dice") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(np.asarray(dice, dtype=float), bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    ax.set(xlabel="Dice", ylabel="slices", title=f"{title} (n={len(dice)}, mean={np.nanmean(dice):.3f})")
    _save(fig, path)


def slice_gallery(
    images: np.ndarray,
    preds: np.ndarray,
    truths: np.ndarray,
    titles: Sequence[str],
    path: str | os.PathLike,
    heading: str,
) -> None:
    """A row of slices (HxWx3 uint8 each): prediction in red, truth outline in green."""
    n = max(1, len(images))
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0), squeeze=False)
    for ax in axes[0]:
        ax.axis("off")
    for ax, image, pred, truth, title in zip(axes[0], images, preds, truths, titles, strict=False):
        ax.imshow(overlay_with_truth(image, pred, truth))
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{heading} (red: prediction, green: ground truth)", fontsize=9)
    _save(fig, path, top=0.9)


def per_patient_bars(ids: Sequence[str], dice: Sequence[float], path: str | os.PathLike) -> None:
    order = np.argsort(dice)
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(ids)), 4))
    ax.bar(range(len(ids)), np.asarray(dice)[order], color="tab:orange")
    ax.set_xticks(range(len(ids)), [str(ids[i]) for i in order], rotation=90, fontsize=6)
    ax.set(ylim=(0, 1), ylabel="3D Dice", title=f"Per-patient Dice (mean {np.mean(dice):.3f})")
    _save(fig, path)


def confusion_plot(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> None:
    """Row-normalised confusion matrix (rows: truth, columns: prediction) with pixel counts."""
    rows = matrix.sum(axis=1, keepdims=True)
    norm = matrix / np.maximum(rows, 1)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2, 1.2 * k + 1.5))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{norm[i, j]:.2f}\n{matrix[i, j]}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="prediction", ylabel="ground truth", title="Confusion matrix (pixels)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)
