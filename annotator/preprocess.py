"""Preprocessing in worker processes: decode, orient, convert and resize each image, bounded in time.

Workers import PIL and NumPy only (never torch), start fast, and return uint8 arrays at the model's
input size; normalising and patchifying happen on the scoring device. A hung decoder costs its row a
timeout error; a crashed worker costs only its row: the jobs it took down are retried, each alone.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
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


def _worker_start(parent: int) -> None:
    # Ctrl-C reaches the whole process group; the main process decides how to stop, workers finish their job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A parent killed with -9 cannot stop its workers, and they would wait on the job queue forever (each holds
    # the queue's write end too): leave as soon as the parent is gone.
    threading.Thread(target=_exit_with, args=(parent,), name="orphan-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


# A second Ctrl-C kills the pool and exits without its cleanup; multiprocessing's resource tracker then removes
# the pool's semaphores itself and would print a warning about them. It starts with our -W options: hush that one.
TRACKER_QUIET = "ignore:resource_tracker:UserWarning"
CHECK_S = 0.2  # how often a wait that may be long (an image, a window) looks whether the run was told to stop


def _new_pool(workers: int) -> ProcessPoolExecutor:
    if TRACKER_QUIET not in sys.warnoptions:
        sys.warnoptions.append(TRACKER_QUIET)
    # spawn: the parent holds torch and its threads; forking those is unsafe.
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start, initargs=(os.getpid(),))


def _discard(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: a hung worker is killed, since shutdown alone would wait for it forever."""
    for process in list((pool._processes or {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


class Preprocessor:
    """Runs `ImageJob`s in order-preserving tickets: `submit` now, `result` later in the same order."""

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.restarts = 0
        # ticket -> job and its future; None while it waits for a pool (it was submitted to a broken one)
        self._pending: OrderedDict[int, tuple[ImageJob, Future | None]] = OrderedDict()
        self._next_ticket = 0
        self._pool: ProcessPoolExecutor | None = _new_pool(workers) if workers > 0 else None
        self._alone: ProcessPoolExecutor | None = None  # one worker, for retrying a job after a crash

    def submit(self, job: ImageJob) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        self._pending[ticket] = (job, self._submit(job))
        return ticket

    def _submit(self, job: ImageJob) -> Future | None:
        if self._pool is None:
            return None
        try:
            return self._pool.submit(prepare_image, job)
        except BrokenProcessPool:  # a worker died since the last `result`, which will restart the pool
            return None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def result(self, ticket: int, check: Callable[[], None] | None = None) -> np.ndarray | str:
        """The ticket's image or error. Earlier tickets must have been collected: the timeout counts from here.

        `check` is called every `CHECK_S` while the image is not ready: it may raise to give up waiting (a writer
        told to stop, in a thread that no signal reaches).
        """
        if self.workers == 0:
            return prepare_image(self._pending.pop(ticket)[0])
        job, future = self._pending[ticket]
        if future is None:  # it never ran; the restart submits it first, being the oldest ticket
            self._restart()
            job, future = self._pending[ticket]
        del self._pending[ticket]
        try:
            return self._wait(future, check)
        except FutureTimeout:
            self._restart()
            return self._timeout_error()
        except BrokenProcessPool:
            # A dead worker fails every job in flight, not only its own: retry this one alone, so that
            # only a job that really kills its worker gets an error.
            self._restart()
            return self._retry_alone(job)

    def _wait(self, future: Future, check: Callable[[], None] | None) -> np.ndarray | str:
        if check is None:
            return future.result(timeout=self.timeout_s)
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                return future.result(timeout=max(0.0, min(CHECK_S, left)))
            except FutureTimeout:
                if left <= CHECK_S:
                    raise
                check()

    def _retry_alone(self, job: ImageJob) -> np.ndarray | str:
        if self._alone is None:
            self._alone = _new_pool(1)
        try:
            return self._alone.submit(prepare_image, job).result(timeout=self.timeout_s)
        except FutureTimeout:
            error = self._timeout_error()
        except BrokenProcessPool:
            error = "decode: worker crashed (twice, the second time alone)"
        _discard(self._alone)
        self._alone = None
        return error

    def _timeout_error(self) -> str:
        return f"decode: timeout (over {self.timeout_s:g}s)"

    def _restart(self) -> None:
        """Replace the pool (killing a hung or dead worker) and resubmit every job still waiting, in order."""
        self.restarts += 1
        _discard(self._pool)
        self._pool = _new_pool(self.workers)
        for ticket, (job, future) in list(self._pending.items()):
            if future is None or future.cancelled() or not future.done() or future.exception() is not None:
                self._pending[ticket] = (job, self._submit(job))

    def kill_workers(self) -> None:
        """SIGKILL every worker process; takes no lock, so a signal handler may call it before exiting at once."""
        for pool in (self._pool, self._alone):
            processes = getattr(pool, "_processes", None) or {}
            for process in list(processes.values()):
                with contextlib.suppress(ProcessLookupError, TypeError):  # gone already, or not started (no pid)
                    os.kill(process.pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop the workers at once; jobs not collected are dropped (a stopped run redoes their window)."""
        for pool in (self._pool, self._alone):
            if pool is not None:
                _discard(pool)
        self._pool = self._alone = None

    def __enter__(self) -> Preprocessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
