"""The GPU campaign's carry folder, made here on the CPU (bench/gpu_campaign.py --make-pack): the pool's
patients of ../shared/data/lgg/gpu-pack.zip without the test split's, restore.py, data.csv, the study's
folds.json and the wheels the GPU image lacks, checked to fit one `run` call with the code; and what comes
back, unpacked (--unpack) for `python -m tune study --folds-from`."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from common import ROOT  # first: it puts the repository on sys.path

from core.io import read_json, write_json

MiB = 2**20
CARRY_BYTES = 64 * MiB  # the working tree and the carried paths together
STUDY_FOLDS = ROOT / "runs" / "study-lgg" / "cv" / "folds.json"
WHEELS = ("monai", "nibabel")  # at this environment's versions; torch, numpy, tifffile, Pillow are there
JXL_WHEEL = "pillow-jxl-plugin==1.3.8"  # restore.py's decoder where imagecodecs is absent
PIP_TARGET = ("--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
              "--platform", "manylinux2014_x86_64")  # the GPU image: Python 3.12.3, x86-64 (device KINDS.md)
BUNDLE_FILES = ("config.json", "model.safetensors", "metrics.json")


def pool_pack(src: Path, dst: Path, exclude: set[str], limit: int = 0) -> list[str]:
    """Copy ``src``'s patient folders whose patient id is not in ``exclude`` (the first ``limit``; 0 = all)
    into ``dst``; entries are copied as they are (JPEG-XL and PNG, stored)."""
    from core.data.prepare import patient_id

    tmp = dst.with_name(dst.name + ".tmp")
    with zipfile.ZipFile(src) as zin:
        folders = sorted({n.split("/")[0] for n in zin.namelist()})
        keep = [f for f in folders if patient_id(f) not in exclude][: limit or None]
        wanted = set(keep)
        with zipfile.ZipFile(tmp, "w") as zout:
            for info in zin.infolist():
                if info.filename.split("/")[0] in wanted:
                    zout.writestr(info, zin.read(info))
    os.replace(tmp, dst)
    return keep


def download_wheels(dest: Path) -> list[Path]:
    """monai and nibabel at this environment's versions and the JPEG-XL decoder, for the GPU's Python."""
    from importlib.metadata import version

    specs = [f"{name}=={version(name)}" for name in WHEELS] + [JXL_WHEEL]
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *PIP_TARGET,
           "-d", str(dest), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise SystemExit(f"pip download could not fetch {', '.join(specs)} (is the registry reachable?):\n"
                         f"{proc.stderr[-1500:]}\nfetch them into {dest} elsewhere with: {' '.join(cmd)}")
    return sorted(dest.glob("*.whl"))


def write_carry(src_zip: Path, lgg: Path, dest: Path, test_split: Path, folds_file: Path | None,
                limit: int = 0, wheels: bool = True) -> dict[str, Any]:
    """DEST/gpu-pack.zip (pool patients only; restore.py's ``gpu`` pack name), restore.py, data.csv of those
    patients, folds.json (checked to cover exactly them), wheels/ and pack.json (what it holds)."""
    from core.data.prepare import patient_id

    test = set(read_json(test_split)["patients"]["test"])
    dest.mkdir(parents=True, exist_ok=True)
    folders = pool_pack(src_zip, dest / "gpu-pack.zip", test, limit)
    pool = sorted(patient_id(f) for f in folders)
    shutil.copyfile(lgg / "restore.py", dest / "restore.py")
    lines = (lgg / "data.csv").read_text().splitlines()
    (dest / "data.csv").write_text("\n".join(lines[:1] + [ln for ln in lines[1:] if ln.split(",")[0] in pool]) + "\n")
    if folds_file is not None:
        folds = read_json(folds_file)["folds"]
        if sorted(p for f in folds for p in f) != pool:
            raise SystemExit(f"{folds_file}: its folds do not cover the pack's {len(pool)} pool patients exactly once")
        shutil.copyfile(folds_file, dest / "folds.json")
    if wheels:
        download_wheels(dest / "wheels")
    record = {"source": str(src_zip), "test_split": str(test_split), "left_out": sorted(test), "pool": pool,
              "folds_file": str(folds_file) if folds_file else None,
              "files": {str(p.relative_to(dest)): p.stat().st_size for p in sorted(dest.rglob("*")) if p.is_file()}}
    write_json(dest / "pack.json", record)
    return record


def code_bytes() -> int:
    """Bytes of what a `run` call sends besides the carried paths: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in set(names) if n and (ROOT / n.decode()).is_file())


def make_pack(args: argparse.Namespace) -> None:
    """``--make-pack DIR``: the carry folder, and whether it and the code fit one `run` call."""
    dest = Path(args.make_pack)
    folds = args.folds_file or (STUDY_FOLDS if STUDY_FOLDS.is_file() else None)
    record = write_carry(Path(args.lgg) / "gpu-pack.zip", Path(args.lgg), dest, args.test_split, folds,
                         wheels=not args.no_wheels)
    carried, code = sum(record["files"].values()), code_bytes()
    for name, size in record["files"].items():
        print(f"{size / MiB:8.2f} MiB  {dest / name}")
    total = carried + code
    print(f"{len(record['pool'])} pool patients ({len(record['left_out'])} test patients left out); carry "
          f"{carried / MiB:.1f} MiB + code {code / MiB:.1f} MiB = {total / MiB:.1f} MiB of {CARRY_BYTES / MiB:.0f}")
    if folds is None:
        print("no folds.json carried: the campaign will make its own folds (pass --folds-file to use the study's)")
    if total > CARRY_BYTES:
        raise SystemExit("too large for one `run` call: carry less")


def unpack(src: Path, dest: Path) -> list[Path]:
    """What came back, laid out for `tune study --folds-from`: DEST/folds.json, DEST/timing.json and
    DEST/fold<k>/{config.json,model.safetensors,metrics.json}, each bundle loaded (its hashes checked), fp16."""
    from core.bundle import load_bundle

    folds = read_json(src / "folds.json")["folds"]
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("folds.json", "timing.json"):
        shutil.copyfile(src / name, dest / name)
    bundles = []
    for k in range(len(folds)):
        archive = src / f"fold{k}.zip"
        if not archive.is_file():
            raise SystemExit(f"{archive}: missing; fold {k} did not finish (see {src / 'timing.json'})")
        with zipfile.ZipFile(archive) as zf:
            if sorted(zf.namelist()) != sorted(f"fold{k}/{name}" for name in BUNDLE_FILES):
                raise SystemExit(f"{archive}: expected exactly fold{k}/{{{','.join(BUNDLE_FILES)}}}")
            shutil.rmtree(dest / f"fold{k}", ignore_errors=True)
            zf.extractall(dest)
        bundle = load_bundle(dest / f"fold{k}")
        if bundle.config.get("weights_dtype") != "float16" or bundle.metrics.get("val_patients") != folds[k]:
            raise SystemExit(f"{dest / f'fold{k}'}: not fold {k}'s fp16 bundle")
        bundles.append(dest / f"fold{k}")
    return bundles
