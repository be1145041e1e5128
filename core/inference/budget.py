"""A memory budget for volumes: how many bytes of decoded volumes one server process holds at once.

A request limit counts a one-slice request and a volume of hundreds of MB alike, so a burst of volumes can
exhaust a replica however few requests it takes. Each volume therefore holds an estimate of its memory
(``volume_bytes``: its body while it is read, then its decoded slices and the copies made from them) until
its answer is made, and gives it back however the request ends. A volume that does not fit beside those
held is refused with a 503 and ``Retry-After`` (``media.Busy``); one larger than the whole budget, which no
wait would let in, with a 413. Single slices are bounded by their size limit and never take from it.

Standard library only (the SageMaker archive vendors it).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

from core.formats.media import Busy, DecodeError

MB = 1 << 20
DEFAULT_FRACTION = 0.5  # of the memory the process may use when it starts
# A volume's working memory per decoded byte: its uint8 slices, the model's float32 probabilities and
# masks made from them, and the answer encoded from those (an estimate, not a measurement).
WORKING_COPIES = 4
RETRY_AFTER_S = 2


def volume_bytes(decoded_bytes: int) -> int:
    """Estimated memory of answering a volume whose decoded slices take ``decoded_bytes``."""
    return int(decoded_bytes) * WORKING_COPIES


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory() -> int | None:
    """Bytes this process may still take: the smaller of what the machine has available and what its
    container's cgroup limit leaves (v2, else v1); None where neither can be read."""
    found = [_meminfo_available()]
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for none
            found.append(max(0, limit - usage))
            break
    known = [n for n in found if n is not None]
    return min(known) if known else None


def default_budget(fraction: float = DEFAULT_FRACTION, fallback: int = 1 << 30) -> int:
    """``fraction`` of the memory available to this process now (``fallback`` bytes where unknown)."""
    free = available_memory()
    return max(MB, int(fraction * free)) if free is not None else fallback


def budget_from_mb(mb: float) -> int:
    """A configured budget in MB (0: derived, ``default_budget``) as bytes."""
    return int(mb * MB) if mb > 0 else default_budget()


class MemoryBudget:
    """Bytes of volumes held at once, at most ``total``; thread-safe (held on the event loop, given back
    from any thread). ``available`` (optional) reports the memory free right now, for a process whose
    neighbours (other workers of one container) take from the same memory unseen."""

    def __init__(self, total: int, retry_after: int = RETRY_AFTER_S,
                 available: Callable[[], int | None] | None = None) -> None:
        if total <= 0:
            raise ValueError(f"a memory budget must be > 0 bytes, got {total}")
        self.total, self.retry_after, self._available = int(total), retry_after, available
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes held now by requests in progress."""
        return self._held

    def _take(self, delta: int, request: int) -> None:
        """Add ``delta`` bytes to what is held for a request that then holds ``request`` bytes, or refuse:
        413 if the request alone is over the whole budget, else 503 if it does not fit now."""
        with self._lock:
            if delta > 0:
                if request > self.total:
                    raise DecodeError(413, "too_large", f"this volume needs about {request // MB} MB (its body, "
                                      f"then {WORKING_COPIES}x its decoded slices), over the whole memory budget "
                                      f"for volumes of {self.total // MB} MB: send fewer or smaller slices, or "
                                      "raise the budget (volume_budget_mb)")
                if self._held + delta > self.total:
                    raise self._busy(f"volumes being answered hold {self._held // MB} MB of the "
                                     f"{self.total // MB} MB memory budget; this one needs about "
                                     f"{request // MB} MB")
                free = self._available() if self._available is not None else None
                if free is not None and delta > free:
                    raise self._busy(f"this volume needs about {request // MB} MB and {free // MB} MB are "
                                     "free now")
            self._held += delta

    def _busy(self, why: str) -> Busy:
        return Busy("busy", f"{why}: retry in {self.retry_after} s (single slices are still answered)",
                    self.retry_after)

    @contextlib.contextmanager
    def hold(self, nbytes: int = 0) -> Iterator[Hold]:
        """Hold ``nbytes`` (refused as ``_take`` says: 413 or 503) until the block ends, however it ends; the ``Hold``
        it yields resizes the amount as the volume's size becomes known."""
        held = Hold(self)
        held.resize(nbytes)
        try:
            yield held
        finally:
            held.resize(0)

    def check(self, nbytes: int) -> None:
        """Refuse as ``hold`` would, holding nothing (a process answering one request at a time)."""
        with self.hold(nbytes):
            pass


class Hold:
    """The bytes one request holds of a MemoryBudget."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget, self.nbytes = budget, 0

    def resize(self, nbytes: int) -> None:
        """Hold ``nbytes`` from now on; growing is refused as ``MemoryBudget.hold`` is (what was held stays
        held until the block ends), shrinking always succeeds."""
        nbytes = max(0, int(nbytes))
        self.budget._take(nbytes - self.nbytes, nbytes)
        self.nbytes = nbytes
