"""Preprocessing in worker processes: decode, orient, convert and resize each image, bounded in time.

Workers import PIL and NumPy only (never torch), start fast, and return uint8 arrays at the model's
input size; normalising and patchifying happen on the scoring device. Encoded and decoded images pass
through shared memory (`ring.ImageRing`) where it is available, through pipes otherwise. A hung decoder
costs its row a timeout error; a crashed worker costs only its row: the jobs it took down are retried,
each alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace

import numpy as np

from annotator.images import ImageError, ImageRef, decode_resized
from annotator.ring import ImageRing, MappedRing, RingHandle, shared_memory_problem

# glibc serves blocks over 128 KiB with mmap (raising that bar only as such blocks are freed) and trims the heap
# over 128 KiB free, so decoded images and codec buffers are page-faulted in and zeroed again and again. Workers
# take blocks up to 32 MiB from the heap and keep up to 256 MiB of it (docs/performance.md: about 2 ms less per image).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 256 << 20))
PR_SET_PDEATHSIG = 1
# Images a worker decodes per call: each call is a round trip through the pool's manager and feeder threads,
# which costs the main process about 0.4 ms of CPU; a batch's images are spread over the workers in chunks.
CHUNK_IMAGES = 8
ENCODED_BYTES_MAX = 256 << 20


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


@dataclass(eq=False, slots=True)
class _Chunk:
    """Tasks a worker runs in one call; `future` gives their outcomes (None while it waits for a pool)."""

    tickets: list[int]
    tasks: list[_Task]
    future: Future | None = None


@dataclass(frozen=True, slots=True)
class _InSlot:
    """A worker's answer: the decoded image is in ring slot `slot`."""

    slot: int
    shape: tuple[int, ...]


_ring: MappedRing | None = None  # a worker's mapping of the ring


def _start_worker(ring: RingHandle | MappedRing | None, parent: int, tune_malloc: bool) -> None:
    global _ring
    # Ctrl-C reaches the whole process group; the main process decides how to stop, workers finish their job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)
    if tune_malloc:
        _tune_malloc()
    _ring = ring


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this worker when the main process dies, even by kill -9, so none is left behind.

    The kernel watches the thread that started the worker: the writer's loop (`Preprocessor`'s user), which closes
    the pool before it ends.
    """
    # A worker left behind would wait on the job queue forever (each holds the queue's write end too).
    if not sys.platform.startswith("linux"):  # elsewhere: a thread that leaves once the parent is gone
        threading.Thread(target=_exit_with, args=(parent,), name="orphan-watch", daemon=True).start()
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


def _run_tasks(tasks: list[_Task]) -> list[np.ndarray | str | _InSlot]:
    return [_run_task(task) for task in tasks]


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


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


# A second Ctrl-C kills the pool and exits without its cleanup; multiprocessing's resource tracker then removes
# the pool's semaphores itself and would print a warning about them. It starts with our -W options: hush that one.
TRACKER_QUIET = "ignore:resource_tracker:UserWarning"
CHECK_S = 0.2  # how often a wait that may be long (an image, a window) looks whether the run was told to stop


def _new_pool(workers: int, ring: ImageRing | None = None, tune_malloc: bool = True) -> ProcessPoolExecutor:
    if TRACKER_QUIET not in sys.warnoptions:
        sys.warnoptions.append(TRACKER_QUIET)
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
        # ticket -> its task and the chunk it runs in
        self._pending: OrderedDict[int, tuple[_Task, _Chunk]] = OrderedDict()
        self._held: dict[int, int] = {}  # ticket -> ring slot of an image handed out and not yet released
        self._next_ticket = 0
        self._pool: ProcessPoolExecutor | None = self._new_pool(workers) if workers > 0 else None
        self._alone: ProcessPoolExecutor | None = None  # one worker, for retrying a job after a crash

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        return _new_pool(workers, self.ring, self.tune_malloc)

    def submit(self, job: ImageJob) -> int:
        return self._submit_chunk([job])[0]

    def submit_batch(self, jobs: list[ImageJob]) -> list[int]:
        """Tickets for `jobs`, sent to the workers in chunks: one round trip through the pool per chunk."""
        size = max(1, min(CHUNK_IMAGES, -(-len(jobs) // max(1, self.workers))))
        return [
            ticket for start in range(0, len(jobs), size) for ticket in self._submit_chunk(jobs[start : start + size])
        ]

    def _submit_chunk(self, jobs: list[ImageJob]) -> list[int]:
        tickets = list(range(self._next_ticket, self._next_ticket + len(jobs)))
        self._next_ticket += len(jobs)
        chunk = _Chunk(tickets, [self._task(job) for job in jobs])
        chunk.future = self._submit(chunk)
        for ticket, task in zip(tickets, chunk.tasks, strict=True):
            self._pending[ticket] = (task, chunk)
        return tickets

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

    def _submit(self, chunk: _Chunk) -> Future | None:
        if self._pool is None:
            return None
        try:
            return self._pool.submit(_run_tasks, chunk.tasks)
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
            return prepare_image(self._pending.pop(ticket)[0].job)
        task, chunk = self._pending[ticket]
        if chunk.future is None:  # it never ran; the restart submits it first, being the oldest ticket
            self._restart()
        try:
            outcome = self._wait(chunk.future, check)[chunk.tickets.index(ticket)]
        except (FutureTimeout, BrokenProcessPool) as failure:
            if len(chunk.tickets) > 1:  # which of its jobs hung or crashed is unknown: each goes on alone
                for other in chunk.tickets:
                    if other in self._pending:
                        alone = self._pending[other][0]
                        self._pending[other] = (alone, _Chunk([other], [alone]))
                self._restart()
                return self.result(ticket, check)
            del self._pending[ticket]
            self._restart()
            # A dead worker fails every job in flight, not only its own: retry this one alone, so that only a
            # job that really kills its worker gets an error.
            outcome = self._timeout_error() if isinstance(failure, FutureTimeout) else self._retry_alone(task)
        else:
            del self._pending[ticket]
        return self._collect(ticket, task, outcome)

    def _collect(self, ticket: int, task: _Task, outcome: np.ndarray | str | _InSlot) -> np.ndarray | str:
        if task.encoded is not None:
            self.ring.free_encoded(*task.encoded)
        if isinstance(outcome, _InSlot):
            self._held[ticket] = outcome.slot
            image = self.ring.image(outcome.slot, outcome.shape)
            self.counts["decoded_bytes_shared"] += image.nbytes
            return image
        if task.slot is not None:
            self.ring.free_slot(task.slot)
        return outcome

    def release(self, tickets: list[int]) -> None:
        """Free the ring slots of collected images: the caller no longer reads them (nor does the device)."""
        for ticket in tickets:
            slot = self._held.pop(ticket, None)
            if slot is not None:
                self.ring.free_slot(slot)

    def _wait(self, future: Future, check: Callable[[], None] | None) -> list[np.ndarray | str | _InSlot]:
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
        for chunk in dict.fromkeys(chunk for _, chunk in self._pending.values()):
            future = chunk.future
            if future is None or future.cancelled() or not future.done() or future.exception() is not None:
                chunk.future = self._submit(chunk)

    def worker_pids(self) -> list[int]:
        pools = [pool for pool in (self._pool, self._alone) if pool is not None]
        return [process.pid for pool in pools for process in (pool._processes or {}).values()]

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
            # Encoded images are usually far smaller than decoded ones, and one that does not fit goes through the
            # pipe; the area is written all round, so all of it becomes resident: it is capped.
            return ImageRing(slots, slot_bytes, min(ENCODED_BYTES_MAX, slots * max(256 << 10, slot_bytes // 2))), None
        except OSError as exc:
            problem = f"cannot map {exc.strerror or exc}"
    return None, f"shared memory is not available ({problem}): images go to and from the workers through pipes"
