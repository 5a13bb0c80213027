"""Coordinator: hands window ids out to writers, takes back a dead writer's, and stops on a window that kills them.

One loop for every executor (a thread, a process per device, Ray actors): it reads the writers' events, moves
the progress, grants windows, and decides what a failure means. Windows are handed out pull-based: a writer
holds at most `LEASE_DEPTH` uncommitted windows (one being written, one scoring, one read and planned ahead),
and gets the next one as it commits. Lowest ids go first, so the output fills in input order.
"""

from __future__ import annotations

import heapq
import itertools
import pickle
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from annotator.errors import AnnotatorError, RunInterrupted

LEASE_DEPTH = 3  # uncommitted windows a writer may hold
MAX_STRIKES = 3  # writers a window may kill before the run stops and names it
MAX_RESTARTS = 3  # new incarnations of one writer slot after deaths, before the slot is given up
POLL_S = 0.5  # how long the loop waits for an event before it looks at signals again


@dataclass
class WriterFailure:
    """A writer's exception, as it crosses a process boundary: `user` (exit 1), `interrupted` (exit 2) or `crash`."""

    kind: str
    message: str
    detail: str = ""
    original: BaseException | None = None  # the exception itself, when it survives pickling

    @classmethod
    def of(cls, exc: BaseException) -> WriterFailure:
        kind = "user" if isinstance(exc, AnnotatorError) else "interrupted" if isinstance(exc, RunInterrupted) else ""
        try:
            original = pickle.loads(pickle.dumps(exc)) if kind else None
        except Exception:
            original = None
        message = str(exc) if kind else f"{type(exc).__name__}: {exc}"
        return cls(kind or "crash", message, "".join(traceback.format_exception(exc)), original)

    def exception(self) -> BaseException:
        if self.original is not None:
            return self.original
        return AnnotatorError(self.message) if self.kind == "user" else RunInterrupted(self.message)


class WindowQueue:
    """Window ids still to do, and which writer holds which.

    `todo` yields ids in increasing order and may be endless (a stream of unknown length): `end_at` cuts it where
    a writer found the input's end. A window that was held by a writer that died is a suspect: it gets a strike
    and is handed out again alone, so that the window that really kills writers is the one that reaches
    `MAX_STRIKES` (`poisoned`).
    """

    def __init__(self, todo: Iterable[int], depth: int = LEASE_DEPTH, max_strikes: int = MAX_STRIKES) -> None:
        self._fresh: Iterator[int] = iter(todo)
        self._peeked: int | None = None
        self._requeued: list[int] = []  # a heap
        self.held: dict[int, list[int]] = {}
        self.strikes: Counter[int] = Counter()
        self.committed: set[int] = set()
        self.end: int | None = None  # the first id past the input
        self.depth = depth
        self.max_strikes = max_strikes
        self.poisoned: int | None = None

    def _peek_fresh(self) -> int | None:
        if self._peeked is None:
            self._peeked = next(self._fresh, None)
        if self._peeked is not None and self.end is not None and self._peeked >= self.end:
            self._peeked = None
            self._fresh = iter(())
        return self._peeked

    def _next_candidate(self) -> int | None:
        while self._requeued and (self._requeued[0] in self.committed or self._past_end(self._requeued[0])):
            heapq.heappop(self._requeued)
        fresh, again = self._peek_fresh(), self._requeued[0] if self._requeued else None
        return min((i for i in (fresh, again) if i is not None), default=None)

    def _past_end(self, index: int) -> bool:
        return self.end is not None and index >= self.end

    def grant(self, writer: int) -> int | None:
        """The next window for `writer`, or None (it holds enough, or nothing is left to hand out now)."""
        held = self.held.setdefault(writer, [])
        if len(held) >= self.depth or any(self.strikes[w] for w in held):
            return None
        index = self._next_candidate()
        if index is None or (self.strikes[index] and held):
            return None  # a suspect goes to a writer that holds nothing else
        if self._requeued and self._requeued[0] == index:
            heapq.heappop(self._requeued)
        else:
            self._peeked = None
        held.append(index)
        return index

    def commit(self, writer: int, index: int) -> None:
        self.committed.add(index)
        self._release(writer, index)

    def end_at(self, writer: int, index: int) -> None:
        """`writer` found that the input ends before window `index`."""
        self.end = index if self.end is None else min(self.end, index)
        self._release(writer, index)

    def _release(self, writer: int, index: int) -> None:
        held = self.held.get(writer, [])
        if index in held:
            held.remove(index)

    def writer_gone(self, writer: int) -> list[int]:
        """A writer died: its windows go back, each with a strike. Returns them; sets `poisoned` if one had enough."""
        lost = [i for i in self.held.pop(writer, []) if i not in self.committed and not self._past_end(i)]
        for index in lost:
            self.strikes[index] += 1
            heapq.heappush(self._requeued, index)
            if self.strikes[index] >= self.max_strikes and self.poisoned is None:
                self.poisoned = index
        return lost

    @property
    def done(self) -> bool:
        return not any(self.held.values()) and self._next_candidate() is None


@dataclass
class WriterSlot:
    """What the coordinator knows of one writer (one device or actor), across its incarnations."""

    loaded: bool = False
    ever_loaded: bool = False  # an earlier incarnation loaded the model: this device works
    ready: bool = False  # loaded and told the session: may be granted windows
    alive: bool = True
    restarts: int = 0
    label: str = ""
    name: str = ""  # the incarnation's name (its journal and temporary files)
    advanced: list[int] = field(default_factory=lambda: [0, 0])  # rows scored, failed since its last commit


class Coordinator:
    """The run loop: writers' events in, windows and progress out."""

    def __init__(
        self,
        executor: Any,
        progress: Any,
        stop: Any,
        model: str,
        on_rows: Callable[[int, int], None],
        forget: Callable[[str], None] = lambda writer: None,
    ) -> None:
        self.executor = executor
        self.forget = forget  # deletes a dead writer's unfinished files
        self.progress = progress
        self.model = model
        self.stop = stop
        self.on_rows = on_rows
        self.slots = {index: WriterSlot() for index in range(executor.count)}
        self.session_started: float | None = None
        self.queue: WindowQueue | None = None
        self.describe_window: Callable[[int], str] = lambda index: f"window {index}"
        self.deaths: dict[int, list[str]] = {}  # window -> how the writers that held it died
        self.interrupted = "Stopped."  # what a stop says at this point of the run
        # For `annotate bench`: when writers started and loaded (monotonic), and this loop's own CPU time.
        self.started_at: float | None = None
        self.loaded_at: list[float] = []
        self.cpu_seconds = 0.0

    # --- starting -----------------------------------------------------------------------------------

    def start_writers(self, interrupted: str, every: bool = False) -> None:
        """Start the writers, wait until one (`every`: all) has loaded the model; a signal meanwhile stops at once."""
        self.interrupted = interrupted
        self.started_at = time.monotonic()
        self.executor.start()
        wait_for = all if every else any
        while not wait_for(slot.loaded for slot in self.slots.values()):
            if self.stop.requested:
                raise RunInterrupted(interrupted)
            for event in self.executor.events(POLL_S):
                self._handle(*event)

    def begin(self, queue: WindowQueue, session_started: float) -> None:
        """The folder is ready: loaded writers may now be handed windows."""
        self.queue = queue
        self.session_started = session_started
        for index, slot in self.slots.items():
            if slot.loaded and slot.alive:
                self._ready(index)

    def _ready(self, index: int) -> None:
        self.executor.give(index, "session", self.session_started)
        self.slots[index].ready = True

    # --- the loop -----------------------------------------------------------------------------------

    def run(self, interrupted: str) -> None:
        """Hand out every window until all are committed; then let the writers finish."""
        self.interrupted = interrupted
        queue = self.queue
        cpu = time.thread_time()
        while not queue.done:
            if self.stop.requested:
                self.stop_writers()
                raise RunInterrupted(interrupted)
            self._grant()
            for event in self.executor.events(POLL_S):
                self._handle(*event)
        self.cpu_seconds += time.thread_time() - cpu
        for index, slot in self.slots.items():
            if slot.alive:
                self.executor.give(index, "finish")
        self._wait_for_exits()

    def _grant(self) -> None:
        for index, slot in self.slots.items():
            while slot.ready and slot.alive and (window := self.queue.grant(index)) is not None:
                self.executor.give(index, "window", window)

    def stop_writers(self) -> None:
        """Ask every writer to stop after its current batch and wait for them (a commit under way completes)."""
        for index, slot in self.slots.items():
            if slot.alive:
                self.executor.stop(index)
        self._wait_for_exits()

    def _wait_for_exits(self) -> None:
        while any(slot.alive for slot in self.slots.values()):
            for kind, index, value in self.executor.events(POLL_S):
                if kind in ("exited", "failed", "died"):
                    self.slots[index].alive = False
                elif kind == "committed":
                    self._committed(index, value)

    # --- events -------------------------------------------------------------------------------------

    def _handle(self, kind: str, index: int, value: Any) -> None:
        slot = self.slots[index]
        if kind == "loaded":
            slot.loaded = slot.ever_loaded = True
            slot.label, slot.name = value.get("label", ""), value.get("writer", "")
            self.loaded_at.append(time.monotonic())
            self.progress.model_loaded(self.model, value["label"], value["dtype"], value["seconds"])
            if self.session_started is not None:
                self._ready(index)
        elif kind == "rows":
            scored, errors = value
            slot.advanced[0] += scored
            slot.advanced[1] += errors
            self.on_rows(scored, errors)
        elif kind == "committed":
            self._committed(index, value)
        elif kind == "note":
            self.progress.note(self.executor.label(index), value)
        elif kind == "end":
            if self.queue is not None:
                self.queue.end_at(index, value)
        elif kind == "failed":
            self._failed(index, value)
        elif kind in ("died", "exited"):
            # A writer exits by itself only when told to: anything else here is a death.
            self._died(index, value if kind == "died" else "it exited before it was told to")

    def _committed(self, index: int, record: dict[str, Any]) -> None:
        slot = self.slots[index]
        slot.advanced[0] = max(0, slot.advanced[0] - record["scored"])
        slot.advanced[1] = max(0, slot.advanced[1] - record["errors"])
        if self.queue is not None:
            self.queue.commit(index, record["window"])
        self.progress.window_committed(record)

    def _failed(self, index: int, failure: Any) -> None:
        if isinstance(failure, BaseException):  # a writer in this process: its exception, as it was raised
            self.slots[index].alive = False
            self._stop_others()
            if isinstance(failure, KeyboardInterrupt):  # Ctrl-C before the signal handlers took over
                self.stop.requested = True  # as a handled Ctrl-C: a stop, not a failure
                raise RunInterrupted(self.interrupted) from None
            raise failure
        if failure.kind == "crash" and self.slots[index].ever_loaded:
            self._died(index, failure.message, failure.detail)
            return
        self.slots[index].alive = False
        self._stop_others()
        raise failure.exception()

    def _stop_others(self) -> None:
        for index, slot in self.slots.items():
            if slot.alive:
                self.executor.stop(index)

    def _died(self, index: int, how: str, detail: str = "") -> None:
        slot = self.slots[index]
        slot.alive = slot.ready = False
        if slot.name:
            self.forget(slot.name)  # its half-written window files: nobody else writes under its name
        scored, errors = slot.advanced
        slot.advanced = [0, 0]
        self.on_rows(-scored, -errors)  # rows of windows it did not commit are done again elsewhere
        if not slot.ever_loaded:  # its first load: a device (or setup) problem, not a window's
            self._stop_others()
            # Before any window was handed out, a new start is taken back (`Annotator`): it is started again.
            again = "the same command again" if self.queue is None else "`annotate resume`"
            raise RunInterrupted(
                f"The writer on {self.executor.label(index)} died while loading the model ({how}). Check that "
                f"device (memory, drivers), then run {again}."
            )
        lost = self.queue.writer_gone(index) if self.queue is not None else []
        for window in lost:
            self.deaths.setdefault(window, []).append(how)
        self.progress.writer_died(self.executor.label(index), how, lost)
        if self.queue is not None and self.queue.poisoned is not None:
            self.stop_writers()
            raise RunInterrupted(self._poisoned_message(self.queue.poisoned, detail))
        if slot.restarts < MAX_RESTARTS and not self.stop.requested:
            slot.restarts += 1
            slot.alive, slot.loaded = True, False
            self.executor.restart(index)
        elif not any(s.alive for s in self.slots.values()):
            raise RunInterrupted(
                f"Every writer died (the last on {self.executor.label(index)}: {how}). Committed windows are safe; "
                "find the cause (memory, device), then run `annotate resume`."
            )

    def _poisoned_message(self, window: int, detail: str) -> str:
        how = "; ".join(self.deaths.get(window, []))
        last = detail.strip().splitlines()[-1] if detail.strip() else ""
        error = f": {last}" if last else ""
        return (
            f"{self.describe_window(window)} killed {MAX_STRIKES} writers ({how}){error}. The run "
            "stopped rather than go on losing writers; committed windows are safe. Find what in those rows kills a "
            "writer (an image that crashes the decoder, a row that runs the device out of memory), fix or drop it, "
            "then run `annotate resume`."
        )


def first_uncommitted(committed: Iterable[int]) -> Iterator[int]:
    """Window ids from 0 on, less those already committed (endless: the queue cuts it at the input's end)."""
    done = set(committed)
    return (index for index in itertools.count() if index not in done)
