"""Shared by the tune tests: tiny trial settings, `python -m tune` subprocess environments, and readers of
Ray's experiment directory (driver state and per-trial result lines)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tiny, fast network for trials (each test adds its lr and other settings).
TINY_NET = {"arch": "lite", "filters": 8, "batch_size": 8, "patience": 0}


def driver_env(ray_address: str | None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """Environment for a driver subprocess: the repo importable, on the given Ray (or its own with None)."""
    env = {k: v for k, v in os.environ.items() if k not in (*drop, "RAY_ADDRESS")}
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


def snapshot(experiment: Path) -> dict[str, str]:
    """Trial id -> status in the driver's latest experiment-state file (what a resume starts from)."""
    files = sorted(glob.glob(str(experiment / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        state = json.loads(Path(files[-1]).read_text())
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return {}
    trials = (json.loads(t[0]) if isinstance(t[0], str) else t[0] for t in state["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


def result_lines(experiment: Path, trial_id: str) -> list[dict]:
    path = experiment / f"trial_{trial_id}" / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
