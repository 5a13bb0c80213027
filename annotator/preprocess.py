"""Preprocessing in worker processes: decode, orient, convert and resize each image, bounded in time.

Workers import PIL and NumPy only (never torch), start fast, and return uint8 arrays at the model's
input size; normalising and patchifying happen on the scoring device. A hung decoder costs its row a
timeout error; a crashed worker costs only its row, which is retried once first.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from annotator.images import ImageError, ImageRef, decode_resized


@dataclass(frozen=True, slots=True)
class ImageJob:
    """Decode `ref` and resize it to `size` = (height, width)."""

    ref: ImageRef
    size: tuple[int, int]
    max_image_pixels: int
    draft: bool = True


def prepare_image(job: ImageJob) -> np.ndarray | str:
    """The resized uint8 image, or the row's error message."""
    try:
        return decode_resized(job.ref, job.size, job.max_image_pixels, draft=job.draft)
    except ImageError as exc:
        return str(exc)
    except MemoryError:
        return "decode: out of memory"
    except Exception as exc:  # a codec bug must cost a row, not the run
        return f"decode: failed ({type(exc).__name__}: {exc})"


def resolve_workers(workers: int | str) -> int:
    if workers == "auto":
        return max(0, min(16, (os.cpu_count() or 1) - 1))
    return int(workers)


class Preprocessor:
    """Runs `ImageJob`s in order-preserving tickets: `submit` now, `result` later in the same order."""

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.restarts = 0
        self._pending: OrderedDict[int, tuple[ImageJob, Future | None]] = OrderedDict()
        self._next_ticket = 0
        self._pool: ProcessPoolExecutor | None = None
        if workers > 0:
            self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: the parent holds torch and its threads; forking those is unsafe.
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, job: ImageJob) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        future = self._pool.submit(prepare_image, job) if self._pool else None
        self._pending[ticket] = (job, future)
        return ticket

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def result(self, ticket: int) -> np.ndarray | str:
        job, future = self._pending.pop(ticket)
        if future is None:
            return prepare_image(job)
        for attempt in range(2):
            try:
                return future.result(timeout=self.timeout_s)
            except FutureTimeout:
                self._restart()
                return f"decode: timeout (over {self.timeout_s:g}s)"
            except BrokenProcessPool:
                self._restart()
                if attempt == 0:
                    future = self._pool.submit(prepare_image, job)
        return "decode: worker crashed (twice on this image)"

    def _restart(self) -> None:
        """Replace the pool (killing a hung or dead worker) and resubmit every job still waiting."""
        self.restarts += 1
        old = self._pool
        for process in list(getattr(old, "_processes", {}).values()):
            process.kill()
        old.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()
        for ticket, (job, future) in list(self._pending.items()):
            finished = future.done() and not future.cancelled() and future.exception() is None
            if not finished:
                self._pending[ticket] = (job, self._pool.submit(prepare_image, job))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Preprocessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
