"""Build the SageMaker ``model.tar.gz``: bundle files at the root, ``code/`` with the entry point.

Layout (what the PyTorch inference container unpacks into /opt/ml/model)::

    model.safetensors  config.json  metrics.json
    code/inference.py            the handlers (serve/sagemaker/inference.py)
    code/requirements.txt        pinned extras the container installs at start-up
    code/gliomaseg_core/...      the core modules inference.py needs, imports renamed
    code/MANIFEST.json           file hashes, source commit-free provenance

The container has torch but not gliomaseg, so core's predictor, post-processing, codecs and scan readers
travel inside the archive: every core module the entry point imports (at the top or inside a function),
and everything those import. They are renamed ``gliomaseg_core`` so that nothing else called ``core`` on
the container's path can shadow them.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.bundle.files import CONFIG, FILES_KEY, METRICS, WEIGHTS, resolve_bundle
from core.io import atomic_write_bytes, parse_s3_uri
from core.io import s3_client as core_s3_client

VENDOR = "gliomaseg_core"
ENTRY_POINT = "inference.py"
TEMPLATE = Path(__file__).with_name("inference.py")
ROOT_MODULES = ("core.inference.predictor", "core.formats.codecs")  # beside what TEMPLATE imports
ARCHIVE_FORMAT = "gliomaseg-sagemaker/1"

# Installed by the container at start-up (pip install -r), pinned so every cold start behaves the same.
# monai is pinned apart: 1.5.2 is the newest release that accepts the container's torch 2.6 (1.6 wants
# torch >= 2.8 and would pull a second torch); the networks gliomaseg builds have the same weights there.
MONAI_PIN = "monai==1.5.2"
# The rest are pinned to the versions of the environment that exports (the one the tests ran in);
# imagecodecs lets tifffile read LZW/JPEG-compressed TIFFs; nibabel, pydicom and highdicom read NIfTI and
# DICOM scans and write their masks (NIfTI, DICOM SEG).
PINNED_FROM_ENV = ("safetensors", "scipy", "tifffile", "imagecodecs", "pillow", "boto3", "nibabel", "pydicom",
                   "highdicom")
OPTIONAL = {"imagecodecs"}

_CORE_IMPORT = re.compile(r"^(\s*)(from|import)(\s+)core(?=[.\s])", re.MULTILINE)


def core_dir() -> Path:
    import core

    return Path(core.__file__).resolve().parent


def module_path(name: str, root: Path) -> Path:
    """File of dotted ``core.x.y`` under ``root`` (the core package directory)."""
    if name == "core":
        return root / "__init__.py"
    parts = name.split(".")[1:]
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    raise FileNotFoundError(f"{name}: no module at {base}.py; the SageMaker archive needs it")


def _core_imports(source: str, name: str, root: Path) -> set[str]:
    """Names of ``core`` modules a module imports (absolute imports; core uses no relative ones)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "core" or a.name.startswith("core.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise ValueError(f"{name}: relative imports are not vendored; use absolute core.* imports")
            mod = node.module or ""
            if mod == "core" or mod.startswith("core."):
                found.add(mod)
                for alias in node.names:  # `from core import x` where x is a submodule
                    sub = f"{mod}.{alias.name}"
                    try:
                        module_path(sub, root)
                        found.add(sub)
                    except FileNotFoundError:
                        pass
    return found


def template_imports(root: Path | None = None, template: Path = TEMPLATE) -> set[str]:
    """The core modules the entry point imports as ``gliomaseg_core.*``, lazily inside functions too."""
    source = re.sub(rf"\b{VENDOR}\b", "core", template.read_text())
    return _core_imports(source, ENTRY_POINT, root or core_dir())


def core_closure(roots: Iterable[str] | None = None, root: Path | None = None) -> list[str]:
    """Every core module the roots (default: ROOT_MODULES and what the entry point imports) import,
    transitively, with the packages that contain them."""
    root = root or core_dir()
    roots = [*ROOT_MODULES, *sorted(template_imports(root))] if roots is None else list(roots)
    todo, seen = list(roots), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_core_imports(module_path(name, root).read_text(), name, root))
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run on import too
    return sorted(seen)


def vendor_source(source: str) -> str:
    """Rename ``core`` imports to the vendored package name."""
    return _CORE_IMPORT.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{VENDOR}", source)


def vendored_files(roots: Iterable[str] | None = None) -> dict[str, bytes]:
    """``code/``-relative path -> contents of the vendored core modules."""
    root = core_dir()
    files: dict[str, bytes] = {}
    for name in core_closure(roots, root):
        path = module_path(name, root)
        rel = Path(VENDOR, *path.relative_to(root).parts).as_posix()
        text = vendor_source(path.read_text())
        leftover = _core_imports(text, name, root)
        if leftover:
            raise ValueError(f"{name}: imports of {sorted(leftover)} survived renaming; vendoring failed")
        files[rel] = text.encode()
    return files


def requirements_text(extra: Iterable[str] = ()) -> str:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in PINNED_FROM_ENV:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            if name not in OPTIONAL:
                raise ValueError(f"{name} is not installed here, so its version cannot be pinned") from None
    head = "# Installed by the SageMaker PyTorch container at start-up; torch and numpy come with the image."
    return "\n".join([head, MONAI_PIN, *pins, *extra]) + "\n"


def archive_members(bundle: str | os.PathLike, extra_requirements: Iterable[str] = ()) -> dict[str, bytes]:
    """Archive path -> bytes. Loads the bundle once so a broken bundle fails here, not on the endpoint."""
    bundle = resolve_bundle(bundle)  # an s3:// bundle is fetched into the node's cache (and checked) first
    from core.bundle import load_bundle  # here: `python -m serve` starts without torch

    loaded = load_bundle(bundle, "cpu")
    members: dict[str, bytes] = {CONFIG: (bundle / CONFIG).read_bytes()}
    if (bundle / WEIGHTS).is_file():  # an ensemble has one weights file per member instead (listed below)
        members[WEIGHTS] = (bundle / WEIGHTS).read_bytes()
    for name in loaded.config.get(FILES_KEY) or {}:  # every file config.json vouches for (e.g. ensemble members)
        members[name] = (bundle / name).read_bytes()
    members[METRICS] = (bundle / METRICS).read_bytes() if (bundle / METRICS).is_file() else b"{}\n"
    code = {ENTRY_POINT: TEMPLATE.read_bytes(), "requirements.txt": requirements_text(extra_requirements).encode()}
    code.update(vendored_files())
    members.update({f"code/{k}": v for k, v in code.items()})
    manifest: dict[str, Any] = {
        "format": ARCHIVE_FORMAT,
        "model_version": loaded.version,
        "arch": loaded.config.get("arch"),
        "entry_point": ENTRY_POINT,
        "vendored_package": VENDOR,
        "sha256": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(members.items())},
    }
    members["code/MANIFEST.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return members


def build_archive(bundle: str | os.PathLike, out: str | os.PathLike, extra_requirements: Iterable[str] = ()) -> Path:
    """Write ``model.tar.gz`` atomically; byte-identical for the same bundle and code (fixed mtimes)."""
    members = archive_members(bundle, extra_requirements)
    raw = io.BytesIO()  # the members are in memory already; the compressed archive is smaller
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(
        fileobj=gz, mode="w", format=tarfile.PAX_FORMAT
    ) as tar:
        dirs = sorted({p.rsplit("/", i)[0] for p in members for i in range(1, p.count("/") + 1)})
        for d in dirs:
            tar.addfile(_info(d, 0, tarfile.DIRTYPE))
        for name in sorted(members):
            tar.addfile(_info(name, len(members[name])), io.BytesIO(members[name]))
    atomic_write_bytes(out, raw.getvalue())
    return Path(out)


def _info(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, size, 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.uname = info.gname = "root"
    return info


def upload_archive(path: str | os.PathLike, s3_uri: str, s3_client: Any | None = None) -> str:
    """Upload to ``s3_uri`` (a ``.tar.gz`` key, or a prefix to put ``model.tar.gz`` under); returns the URI."""
    bucket, key = parse_s3_uri(s3_uri)
    if not key.endswith(".tar.gz"):
        key = f"{key.rstrip('/')}/{Path(path).name}".lstrip("/")
    s3_client = s3_client or core_s3_client()
    s3_client.upload_file(str(path), bucket, key)  # multipart for large archives
    return f"s3://{bucket}/{key}"
