"""The voxel spacing an answer is made at, the same on every path (Serve, SageMaker, `serve batch`, the CLIs).

A NIfTI or DICOM scan's spacing is its header's. A slice stack (multi-page TIFF, NPY, a folder of PNG/TIFF
slices) carries none: the client may give it (``spacing=z,y,x`` in mm on HTTP, ``--spacing`` in the CLIs, a
SageMaker custom attribute or JSON field); without one the mm3/mm2 post-processing rules run on the Kaggle
grid (core.inference.postprocess.KAGGLE_SPACING_MM) and the answer says so: a note, the
``X-Spacing-Assumed`` header, and no volume in mL (pixels of unknown size have no volume).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.formats.media import DecodeError
from core.inference.postprocess import KAGGLE_SPACING_MM

if TYPE_CHECKING:
    from core.formats.volume import Volume

MAX_SPACING_MM = 50.0  # no MR slice is thicker: a larger value is a unit mistake (metres, microns, pixels)
GIVEN, SCAN, ASSUMED = "given", "scan", "assumed"
SPACING_HELP = "three positive numbers z,y,x in mm (slice, row, column spacing), e.g. spacing=5,0.94,0.94"


def _bad(value: object, why: str) -> DecodeError:
    return DecodeError(400, "bad_spacing", f"spacing={value!r}: {why}; expected {SPACING_HELP}")


def parse_spacing(value: str | Sequence[Any] | None) -> tuple[float, float, float] | None:
    """``"5,0.94,0.94"`` or ``[5, 0.94, 0.94]`` -> (slice, row, column) mm; None for no value. A bad value is a
    400 ``bad_spacing`` naming it."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    if len(parts) != 3:
        raise _bad(value, f"{len(parts)} value(s)")
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise _bad(value, "not numbers") from None
    if not all(math.isfinite(n) and 0 < n <= MAX_SPACING_MM for n in numbers):
        raise _bad(value, f"each must be above 0 and at most {MAX_SPACING_MM:g} mm")
    return numbers[0], numbers[1], numbers[2]


@dataclass(frozen=True)
class VoxelSpacing:
    """The (slice, row, column) spacing in mm an answer used, and where it came from (GIVEN, SCAN, ASSUMED)."""

    mm: tuple[float, float, float]
    source: str

    @property
    def known(self) -> bool:
        """A spacing the data or the client gave: only then is a volume in mL an answer."""
        return self.source != ASSUMED

    @property
    def voxel_ml(self) -> float:
        return self.mm[0] * self.mm[1] * self.mm[2] / 1000.0

    def text(self) -> str:
        return ",".join(f"{v:g}" for v in self.mm)

    def note(self) -> str | None:
        """What an answer says when it assumed the spacing; None where it knew it."""
        if self.known:
            return None
        return (f"no spacing given for this slice stack: post-processing assumed the Kaggle grid's {self.text()} mm "
                "(slice, row, column) and no volume in mL is given; send spacing=z,y,x (mm) for the real one")

    def headers(self) -> dict[str, str]:
        """``X-Spacing-mm`` always; ``X-Spacing-Assumed`` where it was assumed."""
        out = {"X-Spacing-mm": self.text()}
        if not self.known:
            out["X-Spacing-Assumed"] = self.text()
        return out


def stack_spacing(given: Sequence[float] | None) -> VoxelSpacing:
    """A slice stack's spacing: the client's, else the Kaggle grid's, assumed."""
    if given is None:
        return VoxelSpacing(tuple(float(v) for v in KAGGLE_SPACING_MM), ASSUMED)  # type: ignore[arg-type]
    z, y, x = (float(v) for v in given)
    return VoxelSpacing((z, y, x), GIVEN)


def scan_spacing(volume: Volume, given: Sequence[float] | None = None) -> VoxelSpacing:
    """A scan's spacing: its canonical grid's (its header's, or the axial grid a thick sagittal or coronal scan was
    resampled to); a given spacing must agree with the header (1%), else 422 ``spacing_conflict``: the header is
    the scanner's record, and two answers for one scan must not differ."""
    own = tuple(float(v) for v in volume.source_spacing)
    if given is not None and any(abs(g - o) > 0.01 * o for g, o in zip(given, own, strict=True)):
        mine = ",".join(f"{v:g}" for v in own)
        raise DecodeError(422, "spacing_conflict", f"spacing={','.join(f'{v:g}' for v in given)} but the "
                          f"{volume.kind} header says {mine} mm (slice, row, column); leave spacing out for a scan")
    return VoxelSpacing(tuple(float(v) for v in volume.spacing), SCAN)  # type: ignore[arg-type]
