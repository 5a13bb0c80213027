"""Preprocessing in worker processes: decode, orient, convert and resize each image, bounded in time.

Workers import PIL and NumPy only (never torch), start fast, and return uint8 arrays at the model's
input size; normalising and patchifying happen on the scoring device. Encoded and decoded images pass
through shared memory (`ring.ImageRing`) where it is available, through pipes otherwise. A hung decoder
costs its row a timeout error; a crashed worker costs only its row: the jobs it took down are retried,
each alone.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import Counter, OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace

import numpy as np

from annotator.images import ImageError, ImageRef, decode_resized
from annotator.ring import ImageRing, MappedRing, RingHandle, shared_memory_problem

# glibc's defaults give large blocks back to the kernel at every free, so each decoded image is page-faulted
# in again. Workers keep them: allocations up to 32 MiB come from the heap, which keeps up to 256 MiB free.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 256 << 20))
PR_SET_PDEATHSIG = 1


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


@dataclass(frozen=True, slots=True)
class _Task:
    """A job as a worker gets it: its encoded bytes may wait in the ring, its decoded image may go to a slot."""

    job: ImageJob
    encoded: tuple[int, int] | None = None  # (offset, length) in the ring; the job's ref then carries no bytes
    slot: int | None = None


@dataclass(frozen=True, slots=True)
class _InSlot:
    """A worker's answer: the decoded image is in ring slot `slot`."""

    slot: int
    shape: tuple[int, ...]


_ring: MappedRing | None = None  # a worker's mapping of the ring


def _start_worker(ring: RingHandle | MappedRing | None, parent: int, tune_malloc: bool) -> None:
    global _ring
    _ignore_interrupts()
    _die_with(parent)
    if tune_malloc:
        _tune_malloc()
    _ring = ring


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this worker when the main process dies, even by kill -9, so none is left behind."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the main process died before the request above
        os._exit(1)


def _tune_malloc() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # not glibc
        return
    for option, value in MALLOC_SETTINGS:
        mallopt(option, value)


def _run_task(task: _Task) -> np.ndarray | str | _InSlot:
    """In a worker: decode the job, taking its bytes from the ring and leaving the image in its slot if it has them."""
    job = task.job
    if task.encoded is not None:
        job = replace(job, ref=replace(job.ref, data=_ring.encoded(*task.encoded)))
    image = prepare_image(job)
    if task.slot is None or isinstance(image, str) or not _ring.write_image(task.slot, image):
        return image
    return _InSlot(task.slot, image.shape)


def resolve_workers(workers: int | str) -> int:
    if workers == "auto":
        return max(0, min(16, (os.cpu_count() or 1) - 1))
    return int(workers)


def _ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group; the main process decides how to stop, workers finish their job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _new_pool(workers: int, ring: ImageRing | None = None, tune_malloc: bool = True) -> ProcessPoolExecutor:
    # spawn: the parent holds torch and its threads; forking those is unsafe.
    context = multiprocessing.get_context("spawn")
    handle = ring.handle() if ring is not None else None
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(handle, os.getpid(), tune_malloc)
    )


def _discard(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: a hung worker is killed, since shutdown alone would wait for it forever."""
    processes = list((pool._processes or {}).values())
    for process in processes:
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:  # dead before their ring slots are used again
        process.join(timeout=5)


class Preprocessor:
    """Runs `ImageJob`s in order-preserving tickets: `submit` now, `result` later in the same order.

    With `slots`, images travel through a shared-memory ring: `result` then gives a view of a slot, valid
    until `release` frees it (after the scorer has copied it to the device). Without shared memory (or with
    `shared_memory=False`) the same images come through pipes, and `note` says why.
    """

    def __init__(
        self,
        workers: int,
        timeout_s: float,
        slots: int = 0,
        slot_bytes: int = 0,
        shared_memory: bool = True,
        tune_malloc: bool = True,
    ) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.tune_malloc = tune_malloc
        self.restarts = 0
        self.counts: Counter[str] = Counter()  # images and encoded bytes through the ring and through pipes
        self.ring: ImageRing | None = None
        self.note: str | None = None
        if workers > 0 and slots > 0 and shared_memory:
            self.ring, self.note = _open_ring(slots, slot_bytes)
        # ticket -> task and its future; None while it waits for a pool (it was submitted to a broken one)
        self._pending: OrderedDict[int, tuple[_Task, Future | None]] = OrderedDict()
        self._held: dict[int, int] = {}  # ticket -> ring slot of an image handed out and not yet released
        self._next_ticket = 0
        self._pool: ProcessPoolExecutor | None = self._new_pool(workers) if workers > 0 else None
        self._alone: ProcessPoolExecutor | None = None  # one worker, for retrying a job after a crash

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        return _new_pool(workers, self.ring, self.tune_malloc)

    def submit(self, job: ImageJob) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        task = self._task(job)
        self._pending[ticket] = (task, self._submit(task))
        return ticket

    def _task(self, job: ImageJob) -> _Task:
        if self.workers == 0:
            return _Task(job)
        height, width = job.size
        slot = self.ring.take_slot(height * width * 3) if self.ring is not None else None
        self.counts["images_shared" if slot is not None else "images_piped"] += 1
        data = job.ref.data
        if data is None:
            return _Task(job, None, slot)
        encoded = self.ring.put_encoded(data) if self.ring is not None else None
        self.counts["encoded_bytes_shared" if encoded else "encoded_bytes_piped"] += len(data)
        # A memoryview of Arrow's buffer cannot be pickled: bytes for the pipe, nothing when the ring has them.
        return _Task(replace(job, ref=replace(job.ref, data=None if encoded else bytes(data))), encoded, slot)

    def _submit(self, task: _Task) -> Future | None:
        if self._pool is None:
            return None
        try:
            return self._pool.submit(_run_task, task)
        except BrokenProcessPool:  # a worker died since the last `result`, which will restart the pool
            return None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def result(self, ticket: int) -> np.ndarray | str:
        """The ticket's image or error. Earlier tickets must have been collected: the timeout counts from here."""
        if self.workers == 0:
            return prepare_image(self._pending.pop(ticket)[0].job)
        task, future = self._pending[ticket]
        if future is None:  # it never ran; the restart submits it first, being the oldest ticket
            self._restart()
            task, future = self._pending[ticket]
        del self._pending[ticket]
        try:
            outcome = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self._restart()
            outcome = self._timeout_error()
        except BrokenProcessPool:
            # A dead worker fails every job in flight, not only its own: retry this one alone, so that
            # only a job that really kills its worker gets an error.
            self._restart()
            outcome = self._retry_alone(task)
        return self._collect(ticket, task, outcome)

    def _collect(self, ticket: int, task: _Task, outcome: np.ndarray | str | _InSlot) -> np.ndarray | str:
        if task.encoded is not None:
            self.ring.free_encoded(*task.encoded)
        if isinstance(outcome, _InSlot):
            self._held[ticket] = outcome.slot
            return self.ring.image(outcome.slot, outcome.shape)
        if task.slot is not None:
            self.ring.free_slot(task.slot)
        return outcome

    def release(self, tickets: list[int]) -> None:
        """Free the ring slots of collected images: the caller no longer reads them (nor does the device)."""
        for ticket in tickets:
            slot = self._held.pop(ticket, None)
            if slot is not None:
                self.ring.free_slot(slot)

    def _retry_alone(self, task: _Task) -> np.ndarray | str | _InSlot:
        if self._alone is None:
            self._alone = self._new_pool(1)
        try:
            return self._alone.submit(_run_task, task).result(timeout=self.timeout_s)
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
        self._pool = self._new_pool(self.workers)
        for ticket, (task, future) in list(self._pending.items()):
            if future is None or future.cancelled() or not future.done() or future.exception() is not None:
                self._pending[ticket] = (task, self._submit(task))

    def pin(self) -> bool:
        """Page-lock the ring for CUDA (copies from it to the GPU are then direct); False if there is none."""
        return self.ring is not None and self.ring.pin()

    def worker_pids(self) -> list[int]:
        pools = [pool for pool in (self._pool, self._alone) if pool is not None]
        return [process.pid for pool in pools for process in (pool._processes or {}).values()]

    def close(self) -> None:
        """Stop the workers at once; jobs not collected are dropped (a stopped run redoes their window)."""
        for pool in (self._pool, self._alone):
            if pool is not None:
                _discard(pool)
        self._pool = self._alone = None
        self._pending.clear()
        self._held.clear()
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    def __enter__(self) -> Preprocessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_ring(slots: int, slot_bytes: int) -> tuple[ImageRing | None, str | None]:
    """The ring, or None and a one-line note saying why images go through pipes instead."""
    problem = shared_memory_problem()
    if problem is None:
        try:
            # Encoded images are usually far smaller than decoded ones; a larger one goes through the pipe.
            return ImageRing(slots, slot_bytes, slots * max(256 << 10, slot_bytes // 2)), None
        except OSError as exc:
            problem = f"cannot map {exc.strerror or exc}"
    return None, f"shared memory is not available ({problem}): images go to and from the workers through pipes"
