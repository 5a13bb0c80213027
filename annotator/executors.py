"""Executors: where writers run. One in this process, or one child process per device (Ray: `ray_engine.py`).

Every executor gives the coordinator the same handful of calls (`start`, `events`, `give`, `stop`, `restart`,
`close`) and reports what its writers do as events `(kind, writer, value)`: `loaded`, `rows`, `committed`,
`end`, `exited`, `failed` (an exception or a `WriterFailure`) and `died` (how).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from typing import Any

from annotator.coordinator import WriterFailure
from annotator.errors import AnnotatorError
from annotator.recipe import Recipe
from annotator.writer import WindowScorer, WriterSpec, WriterStopped

PR_SET_PDEATHSIG = 1
EXIT_ORPHANED = 3  # a writer whose coordinator is gone exits with this
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # a writer leaves them to its coordinator


def host_writer(writer: WindowScorer, emit, raw_errors: bool) -> None:
    """Load the model, then score until told to finish; every outcome becomes one last event."""
    try:
        emit("loaded", writer.load())
        writer.run()
        emit("exited", "done")
    except WriterStopped:
        emit("exited", "stopped")
    except BaseException as exc:
        emit("failed", exc if raw_errors else WriterFailure.of(exc))


def drain(events: queue.Queue, timeout: float) -> list:
    """What is in `events`, waiting up to `timeout` for the first item (an empty list if none comes)."""
    try:
        found = [events.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            found.append(events.get_nowait())
        except queue.Empty:
            return found


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def share_cores(recipe: Recipe, writers: int, cores: int) -> tuple[int, int]:
    """(torch threads, preprocessing workers) for each of `writers` writers on `cores` cores."""
    share = max(1, cores // writers)
    workers = recipe.batching.workers
    return share, max(0, min(16, share - 1)) if workers == "auto" else int(workers)


class ThreadExecutor:
    """One writer in a thread of this process: today's path, with the coordinator's loop beside it."""

    count = 1
    scorer_class = WindowScorer  # `annotate bench` swaps in one that counts what the host spends

    def __init__(self, spec: WriterSpec) -> None:
        self.spec = spec
        self._events: queue.Queue[tuple[str, int, Any]] = queue.Queue()
        self.writer: WindowScorer | None = None
        self._thread: threading.Thread | None = None

    def label(self, index: int) -> str:
        return self.writer.label if self.writer is not None else self.spec.label

    def describe(self) -> str:
        return self.label(0)

    def start(self) -> None:
        self.writer = self.scorer_class(self.spec, lambda kind, value: self._events.put((kind, 0, value)))
        self._thread = threading.Thread(target=host_writer, args=(self.writer, self.writer.emit, True), daemon=True)
        self._thread.start()

    def events(self, timeout: float) -> list[tuple[str, int, Any]]:
        return drain(self._events, timeout)

    def give(self, index: int, kind: str, value: Any = None) -> None:
        self.writer.give(kind, value)

    def stop(self, index: int) -> None:
        self.writer.stop()

    def restart(self, index: int) -> None:  # pragma: no cover - a writer in this process fails, it does not die
        raise AssertionError("a writer in this process is never restarted")

    def kill(self) -> None:
        """For a signal handler about to exit at once: the writer's decoding workers go too (no lock taken)."""
        preprocessor = getattr(self.writer, "preprocessor", None)
        if preprocessor is not None:
            preprocessor.kill_workers()

    def close(self) -> None:
        """Stop the writer and wait for its batch; one still loading the model (a download) ends with the process."""
        if self.writer is not None and self._thread is not None and self._thread.is_alive():
            self.writer.stop()
            if self.writer.state != "loading":
                self._thread.join()


@dataclass
class _Child:
    process: Any
    conn: Connection
    over: bool = False  # it sent its last event (exited or failed)


class SlotExecutor:
    """Writers in `count` slots, each started by `_launch`, and started again the same way after a death."""

    count: int

    def start(self) -> None:
        for index in range(self.count):
            self._launch(index)

    def restart(self, index: int) -> None:
        self._launch(index)

    def _launch(self, index: int) -> None:
        raise NotImplementedError


class ProcessExecutor(SlotExecutor):
    """One child process per device. Children ignore Ctrl-C (the coordinator decides) and die with it."""

    def __init__(self, specs: list[WriterSpec], cuda_indexes: list[int | None]) -> None:
        self.specs = specs
        self.cuda_indexes = cuda_indexes
        self.count = len(specs)
        self._children: dict[int, _Child] = {}
        self._context = multiprocessing.get_context("spawn")

    def label(self, index: int) -> str:
        return self.specs[index].label

    def describe(self) -> str:
        spec = self.specs[0]
        return f"{', '.join(s.label for s in self.specs)}; {spec.cpu_threads} threads and {spec.workers} decoders each"

    def _launch(self, index: int) -> None:
        # Called on the main thread only: the kernel's parent-death signal follows the thread that forked.
        ours, theirs = self._context.Pipe()
        settings = {"OMP_NUM_THREADS": str(self.specs[index].cpu_threads or "")}
        cuda = self.cuda_indexes[index]
        if cuda is not None:
            settings["CUDA_VISIBLE_DEVICES"] = str(cuda)  # set before the child imports torch
        process = self._context.Process(
            target=child_main, args=(self.specs[index], theirs, os.getpid(), settings), name=f"annotate-writer-{index}"
        )
        resource_tracker.ensure_running()  # starting, it unblocks the stop signals: started first, it leaves them be
        with _stop_signals_deferred(), _environment(settings):
            process.start()
            theirs.close()
            self._children[index] = _Child(process, ours)

    def events(self, timeout: float) -> list[tuple[str, int, Any]]:
        owners: dict[Any, int] = {}
        for index, child in self._children.items():
            owners[child.conn] = index
            owners[child.process.sentinel] = index
        found: list[tuple[str, int, Any]] = []
        for ready in wait(list(owners), timeout):
            index = owners[ready]
            child = self._children.get(index)
            if child is None:
                continue
            found += self._drain(index, child)
            if ready is child.process.sentinel or not child.process.is_alive():
                found += self._reap(index, child)
        return found

    def _drain(self, index: int, child: _Child) -> list[tuple[str, int, Any]]:
        found = []
        with contextlib.suppress(EOFError, OSError):
            while child.conn.poll():
                kind, value = child.conn.recv()
                found.append((kind, index, value))
                child.over = child.over or kind in ("exited", "failed")
        return found

    def _reap(self, index: int, child: _Child) -> list[tuple[str, int, Any]]:
        child.process.join(timeout=5)
        if child.process.is_alive():
            return []
        del self._children[index]
        child.conn.close()
        if child.over:
            return []
        code = child.process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return [("died", index, how)]

    def give(self, index: int, kind: str, value: Any = None) -> None:
        child = self._children.get(index)
        if child is not None:
            with contextlib.suppress(OSError):  # it died meanwhile: its sentinel says so at the next `events`
                child.conn.send((kind, value))

    def stop(self, index: int) -> None:
        self.give(index, "stop")

    def kill(self) -> None:
        """For a signal handler about to exit at once: SIGKILL every writer process (they would die with us anyway)."""
        for child in list(self._children.values()):
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(child.process.pid, signal.SIGKILL)

    def close(self) -> None:
        """Kill what is left (a stop already waited for the writers that could finish their batch)."""
        for child in self._children.values():
            if child.process.is_alive():
                child.process.kill()
        for child in self._children.values():
            child.process.join()
            child.conn.close()
        self._children.clear()


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until a writer is launched and known, then act as they would have.

    Ctrl-C reaches the whole process group: a child still starting (Python's own handler runs until `child_main`
    ignores it) would die of it, with a traceback, as if its device had failed; so the signals are blocked for this
    thread, and the child inherits them blocked. And the parent's handler (which may stop the run at once) must not
    run half-way through the launch, leaving the child waiting for start-up data never sent or a child not known to
    be killed; another thread may take the signal, so it is deferred at Python's level too.
    """
    caught: list[int] = []
    main = threading.current_thread() is threading.main_thread()  # Python's handlers are the main thread's only
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in STOP_SIGNALS if main}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _environment(settings: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update({k: v for k, v in settings.items() if v})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def die_with(parent: int) -> None:
    """Linux: the kernel kills this process when `parent` dies, even by kill -9, so no writer outlives its run."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request above
        os._exit(EXIT_ORPHANED)


def no_process_locks_for_bars() -> None:
    """tqdm makes a multiprocessing lock (a named semaphore) the first time any bar is made, hidden ones too
    (torch.compile makes some); a writer ends with `os._exit`, so the run would end warning of 'leaked semaphore
    objects'. A writer shares no terminal line with another process: a thread lock serves."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def child_main(spec: WriterSpec, conn: Connection, parent: int, settings: dict[str, str]) -> None:
    """A writer process: events go up the pipe; the pipe closing means the coordinator is gone, so it exits."""
    die_with(parent)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the coordinator decides
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked since the launch: what came is dropped now
    os.environ.update({k: v for k, v in settings.items() if v})
    no_process_locks_for_bars()
    sending = threading.Lock()

    def emit(kind: str, value: Any) -> None:
        with sending:
            try:
                conn.send((kind, value))
            except OSError:
                os._exit(EXIT_ORPHANED)  # the coordinator is gone

    writer = WindowScorer(spec, emit)

    def listen() -> None:
        try:
            while True:
                kind, value = conn.recv()
                if kind == "stop":
                    writer.stop()
                else:
                    writer.give(kind, value)
        except (EOFError, OSError):
            os._exit(EXIT_ORPHANED)  # the coordinator is gone: never go on writing into its folder

    threading.Thread(target=listen, name="coordinator", daemon=True).start()
    host_writer(writer, emit, raw_errors=False)
    os._exit(0)  # skip interpreter teardown: the last event is sent, the journal is synced


def check_engine(recipe: Recipe) -> list[str]:
    """The engine's checks, before anything is written: local devices that exist, or a Ray that can place the
    writers. Returns the local devices."""
    if recipe.engine.kind == "ray":
        from annotator.ray_engine import connect

        connect(recipe.engine.ray)  # joins or starts Ray, plans the actors
        return []
    return resolve_devices(recipe)


def resolve_devices(recipe: Recipe) -> list[str]:
    """The local devices a run uses, each checked to exist (a user error otherwise, before anything is written)."""
    devices = recipe.engine.devices
    if devices == "auto":
        if recipe.model.device != "auto":
            return [recipe.model.device]
        count = _cuda_count()
        return [f"cuda:{i}" for i in range(count)] if count else ["cpu"]
    cuda = [d for d in devices if d.startswith("cuda")]
    if cuda:
        count = _cuda_count()
        named = ["cuda:0" if d == "cuda" else d for d in devices]
        missing = list(dict.fromkeys(d for d in named if d.startswith("cuda") and int(d.split(":")[1]) >= count))
        if missing:
            seen = f"cuda:0 to cuda:{count - 1}" if count else "none"
            raise AnnotatorError(
                f"`engine.devices` names {', '.join(missing)}, but this machine has {count} visible GPU(s) ({seen}). "
                "Name existing devices (e.g. --devices cuda:0,cuda:1), or use auto."
            )
        twice = sorted({d for d in named if d.startswith("cuda") and named.count(d) > 1})
        if twice:
            raise AnnotatorError(
                f"`engine.devices` names {', '.join(twice)} more than once: one writer per GPU. Name each GPU once."
            )
        return named
    cores = available_cores()
    if len(devices) > cores:
        raise AnnotatorError(
            f"`engine.devices` names {len(devices)} CPU writers, but this machine gives the run {cores} core(s): a "
            "CPU writer is faster only with cores of its own, and each holds its own copy of the model in memory. "
            f"Name at most {cores} (`--devices {','.join(['cpu'] * min(cores, 4))}`), or one `cpu` for every core "
            "in one writer."
        )
    return list(devices)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_executor(spec: WriterSpec, devices: list[str]) -> ThreadExecutor | ProcessExecutor:
    """One device: a writer in this process (today's path). Several: a child process each, cores shared out."""
    if len(devices) == 1:
        return ThreadExecutor(replace(spec, device=devices[0], label=devices[0]))
    threads, workers = share_cores(spec.recipe, len(devices), available_cores())
    specs, cuda = [], []
    for device in devices:
        on_gpu = device.startswith("cuda")
        cuda.append(int(device.split(":")[1]) if on_gpu else None)
        specs.append(
            replace(spec, device="cuda" if on_gpu else "cpu", label=device, cpu_threads=threads, workers=workers)
        )
    return ProcessExecutor(specs, cuda)
