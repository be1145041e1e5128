"""What a benchmark ran on: machine, device and library versions, recorded with every result."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
LIBRARIES = ("torch", "monai", "ray", "optuna", "onnxruntime", "numpy")


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "hostname_hash": hex(hash(platform.node()) & 0xFFFF),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "device": "cuda" if gpu else "cpu",
        "python": platform.python_version(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def device_tag(info: dict[str, Any] | None = None) -> str:
    """`cpu`, or the GPU's name in lower case with dashes (e.g. `nvidia-h100-80gb-hbm3`)."""
    info = info or machine_info()
    return "cpu" if info["gpu"] is None else info["gpu"].lower().replace(" ", "-")


def write_result(name: str, payload: dict[str, Any], directory: Path | None = None) -> Path:
    """``directory`` (default bench/results)/<name>-<device>.json, written atomically, with the machine
    recorded beside the figures."""
    from core.io import atomic_write_bytes

    info = machine_info()
    path = (directory or RESULTS) / f"{name}-{device_tag(info)}.json"
    text = json.dumps({"benchmark": name, "machine": info, **payload}, indent=1, default=float)
    atomic_write_bytes(path, text.encode())
    return path
