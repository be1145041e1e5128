"""The model replica: one core Predictor, single slices batched across requests with ``@serve.batch``.

``SegmentModelCore`` is a plain class, so it runs either as its own deployment (``SegmentModel``, behind
the ingress's DeploymentHandle) or inside the ingress replica (``LocalHandle``: the same
``handle.method.remote(...)`` calls, no second hop). Imports no torch at module level: the driver and
the ingress of a split app never load it.

Three things keep a replica serving under mixed load:
- the device is shared through a FIFO ``FairGate`` per forward chunk, not per request, so a long volume
  (its chunks of ``batch_size`` slices) and slice batches take turns instead of slices waiting for the
  whole volume;
- a CUDA out-of-memory error is answered (``ModelOutOfMemory``, a 503) after freeing the cache, and
  leaves the replica healthy; only other CUDA errors (a lost device) fail the health check;
- torch threads default to the CPUs the replica holds, leaving one core of the machine to the ingress.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from ray import serve

from core.config import BATCH_SIZE
from core.inference.slices import Segmentation, Spacing

log = logging.getLogger(__name__)


class ModelOutOfMemory(Exception):
    """The device ran out of memory for one request; the replica freed its cache and keeps serving."""


class FairGate:
    """A first-come, first-served lock for threads (threading.Lock lets a releasing thread take it
    straight back, so a volume's next chunk could starve the waiting slice batch)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._busy = False

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            ticket = None
            if self._busy:
                ticket = threading.Event()
                self._waiting.append(ticket)
            self._busy = True
        if ticket is not None:
            ticket.wait()
        try:
            yield
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting.popleft().set()  # handed over: the gate stays busy
                else:
                    self._busy = False


def replica_threads(threads: int, cpus: float) -> int:
    """Torch threads for a replica: ``threads`` if given, else the CPUs it holds, at most all cores but
    one (the ingress, HAProxy or Serve's proxy, and the replica's HTTP server need a core of their own, or
    every request waits on torch)."""
    if threads > 0:
        return threads
    cores = os.cpu_count() or 1
    return max(1, min(max(1, round(cpus)), cores - 1))


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (a RuntimeError saying "out of memory" on older torch), without importing
    torch here."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class SegmentModelCore:
    """One Predictor per replica; ``segment`` batches single slices from concurrent callers."""

    def __init__(self, bundle: str, device: str, max_batch_size: int, batch_wait_s: float,
                 threads: int = 0, cpus: float = 1.0) -> None:
        import torch

        from core.inference.predictor import Predictor  # torch loads in the replica, not in the driver

        if device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(replica_threads(threads, cpus))
        # ``bundle`` may be s3://...: resolved here, on the replica's node, into that node's cache.
        self.predictor = Predictor.from_bundle(bundle, device=device, batch_size=max_batch_size)
        self._segment_batch.set_max_batch_size(max_batch_size)
        # 0 s: a batch is whatever queued while the previous one ran, so a lone request never waits.
        self._segment_batch.set_batch_wait_timeout_s(batch_wait_s)
        # One chunk on the device at a time, in arrival order: a volume runs as chunks of batch_size slices.
        self.predictor.device_gate = FairGate().hold
        self._fatal: str | None = None
        # Warm up so the first request does not pay for lazy initialisation.
        self.predictor.predict(np.zeros((1, *self.predictor.size, 3), np.uint8))

    async def _run(self, method: Callable[..., Any], *args: Any) -> Any:
        """``method`` in a thread, so the event loop keeps queueing requests for the next batch."""
        try:
            return await asyncio.to_thread(method, *args)
        except Exception as exc:
            if is_out_of_memory(exc):
                # Recoverable: this request was too big for what is free now; the next may fit.
                await asyncio.to_thread(_free_device_memory)
                log.warning("out of device memory (%s); cache freed, replica keeps serving", type(exc).__name__)
                raise ModelOutOfMemory("the model ran out of device memory for this request") from None
            if isinstance(exc, RuntimeError) and "CUDA" in str(exc):
                self._fatal = str(exc)  # a broken device will not heal: fail the health check
            raise

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=0.0)  # set per replica in __init__
    async def _segment_batch(self, requests: list[tuple[np.ndarray, Spacing]]
                             ) -> list[tuple[np.ndarray, int, float, float]]:
        """One (HxWx3 slice, its spacing) per caller -> (mask, batch size, batch start, model seconds). The
        network sees the whole batch at once; the one-slice mm2 rules apply at each caller's own spacing."""
        started = time.perf_counter()
        masks = await self._run(self._predict_at_spacings, requests)
        model_s = time.perf_counter() - started
        return [(m, len(requests), started, model_s) for m in masks]

    def _predict_at_spacings(self, requests: list[tuple[np.ndarray, Spacing]]) -> list[np.ndarray]:
        probs = self.predictor.predict_proba([image for image, _ in requests])
        return [self.predictor.slice_mask(image, p, spacing) for (image, spacing), p in zip(requests, probs,
                                                                                             strict=True)]

    async def segment(self, image: np.ndarray, spacing: Spacing = None) -> tuple[np.ndarray, int, dict[str, float]]:
        """One HxWx3 slice (at ``spacing`` mm, None: the Kaggle grid's) -> (HxW mask, size of the batch it ran
        in, {"wait", "model"} seconds)."""
        queued = time.perf_counter()
        mask, batch, started, model_s = await self._segment_batch((image, spacing))
        return mask, batch, {"wait": started - queued, "model": model_s}

    async def segment_volume(self, images: np.ndarray, spacing: tuple[float, float, float] | None = None
                             ) -> Segmentation:
        """One patient's ordered (N,H,W,3) slices -> (N,H,W) masks with 3D post-processing at ``spacing``
        (a scan's; None: the Kaggle grid's), and the answer's quality."""
        return await self._run(self.predictor.segment, images, spacing)

    def info(self) -> dict[str, Any]:
        return {**self.predictor.info(), "version": self.predictor.version}

    def ping(self) -> bool:
        return True

    def check_health(self) -> None:
        if self._fatal:
            raise RuntimeError(f"model replica unusable: {self._fatal}")


SegmentModel = serve.deployment(name="SegmentModel", health_check_period_s=10.0,
                                health_check_timeout_s=30.0)(SegmentModelCore)


class _LocalMethod:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        result = self._fn(*args)
        if asyncio.iscoroutine(result):
            return result

        async def done() -> Any:
            return result

        return done()


class LocalHandle:
    """What the ingress calls on a DeploymentHandle (``handle.segment.remote(x)``), served in-process."""

    def __init__(self, model: SegmentModelCore) -> None:
        self.model = model

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.model, name))
