"""Writer: scores whatever windows it is handed (read, plan, preprocess, score, commit into its own journal).

A writer loads the model once, then takes window ids from its inbox until told to finish or stop. It does not
know who schedules it: a thread of the `annotate` process, a child process per device and a Ray actor run the
same `WindowScorer` (`executors.py`, `ray_engine.py`). What it does is reported through `emit(kind, value)`:
`loaded`, `rows` (scored, errors) per batch, `committed` (the journal record) per window, `end` (a window id
past the input's end).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from annotator import __version__
from annotator.batching import PlannedRow, WindowPlan, plan_recipe_window
from annotator.errors import AnnotatorError, RunInterrupted
from annotator.images import image_kind
from annotator.preprocess import CHECK_S
from annotator.recipe import Recipe
from annotator.scores import JOURNAL_BINS, histogram
from annotator.sink import RunFolder, answer_counts, output_schema, window_table, writer_name
from annotator.sources import Window, open_source

HEARTBEAT_S = 5.0  # how often a writer rewrites its heartbeat file
Emit = Callable[[str, Any], None]


class WriterStopped(Exception):
    """The coordinator asked this writer to stop: windows not yet committed are dropped."""


@dataclass
class WriterSpec:
    """What a writer needs, picklable: the same for a thread, a child process or a Ray actor."""

    recipe: Recipe
    root: str  # the run folder, absolute: a writer may run in another folder or on another host
    device: str = "auto"  # what the model loads on
    label: str = "auto"  # the device as the user named it, for logs and `status`
    owner: str | None = None  # the coordinator's lock token: windows are published only while it holds the folder
    input_fingerprint: Any = None  # as the manifest holds it: the writer checks that it reads the same input
    total_rows: int | None = None
    cpu_threads: int | None = None  # torch threads on a CPU device (the cores shared out between writers)
    workers: int | None = None  # preprocessing processes; None: the recipe's `batching.workers`
    model_bars: str = "none"  # `models.load_model`'s progress_bars
    version: str = __version__  # the coordinator's annotator version


@dataclass
class WindowState:
    """A window between planning and commit: results fill in as its batches are scored."""

    window: Window
    plan: WindowPlan
    pending: int
    scores: list[Any] = field(default_factory=list)  # a `scoring.Score` per scored row, else None
    errors: list[str | None] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        rows = self.window.rows
        self.scores, self.errors = [None] * rows, [None] * rows
        for position, error in self.plan.errors.items():
            self.errors[position] = error

    def record(self) -> dict[str, Any]:
        scored = sum(s is not None for s in self.scores)
        kinds = Counter(image_kind(e) for e in self.errors if e is not None)
        return {
            "start": self.window.start,
            "rows": self.window.rows,
            "scored": scored,
            "errors": self.window.rows - scored,
            "error_kinds": dict(kinds),
            "truncated_texts": self.plan.truncated,
            "real_tokens": self.plan.real_tokens,
            "padded_tokens": self.plan.padded_tokens,
            "seconds": round(time.perf_counter() - self.started, 3),
            "committed_at": time.time(),
        }


class WindowReader:
    """Windows by id: consecutive ids continue one open stream; another id opens the source at its first row, or, for
    a stream that cannot seek (`source.seekable` false: a streamed json or image folder), reads on to it."""

    def __init__(self, source: Any, size: int) -> None:
        self.source = source
        self.size = size
        self.seekable = getattr(source, "seekable", True)
        self._next: int | None = None
        self._windows: Iterator[Window] = iter(())

    def read(self, index: int) -> Window | None:
        """Window `index`, or None when the input ends before it."""
        if self._next is None or index < self._next or (index > self._next and self.seekable):
            self._windows = self.source.windows(self.size, index)
            self._next = index
        window = None
        while self._next <= index:
            window = next(self._windows, None)
            self._next += 1
            if window is None:
                break
        return window


class WindowScorer:
    """Loads the model once (`load`), then scores the windows it is given (`run`) until told to finish or stop."""

    def __init__(self, spec: WriterSpec, emit: Emit) -> None:
        self.spec = spec
        self.recipe: Recipe = spec.recipe
        self.emit = emit
        self.name = writer_name()
        self.folder = RunFolder(spec.root, journal_name=self.name)
        self.folder.fence = self.check_owner
        self.max_batch_tokens = self.recipe.batching.max_batch_tokens
        self.session_started: float | None = None  # the coordinator's session, for the journal and `status`
        self.stopping = threading.Event()
        self.state = "loading"
        self.started = time.time()
        self.loaded_at: float | None = None
        self.label = spec.label
        self.windows_done = self.rows_done = 0
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._beating = threading.Lock()

    # --- what the coordinator sends -----------------------------------------------------------------

    def give(self, kind: str, value: Any = None) -> None:
        """`window` (an id to do), `session` (the session's start time) or `finish` (no more windows)."""
        self._inbox.put((kind, value))

    def stop(self) -> None:
        """Stop after the current batch; windows not committed are dropped (a commit under way completes)."""
        self.stopping.set()
        self._inbox.put(("stop", None))

    # --- checks -------------------------------------------------------------------------------------

    def check_owner(self) -> None:
        """Raise unless the coordinator that started this writer still holds the run folder."""
        if self.spec.owner is not None and self.folder.lock_token() != self.spec.owner:
            raise RunInterrupted(
                f"Writer {self.name} stopped: the run folder {self.spec.root} is no longer held by the process that "
                "started it (it was stopped, or another `annotate resume` took the folder over). Nothing of this "
                "writer's unfinished windows was published."
            )

    def _check_setup(self, source: Any) -> None:
        spec, host = self.spec, socket.gethostname()
        if spec.version != __version__:
            raise AnnotatorError(
                f"The writer on host {host} runs annotator {__version__}, the coordinator {spec.version}. Install the "
                "same annotator version on every node (the same wheel, or the same image)."
            )
        if spec.owner is not None and self.folder.lock_token() != spec.owner:
            raise AnnotatorError(
                f"The writer on host {host} cannot see the run folder {spec.root} as the coordinator wrote it (its "
                f"`lock` is {'missing' if not self.folder.lock_path.exists() else 'not the same'}). The output "
                "folder must be on storage every node sees at the same path: a shared POSIX filesystem (NFS, Lustre, "
                "GPFS, CephFS, a Kubernetes ReadWriteMany volume). Set `output.dir` to such a path."
            )
        seen = json.loads(json.dumps(source.fingerprint()))
        if spec.input_fingerprint is not None and seen != spec.input_fingerprint:
            raise AnnotatorError(
                f"The writer on host {host} reads a different input than the coordinator ({self.recipe.input}). Put "
                "the input where every node sees the same files at the same path, or use a Hugging Face dataset."
            )

    # --- the model, then the windows ----------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        """Check what this writer sees, load the model; returns what `loaded` reports."""
        from annotator.compiling import check_cache_folder, check_compile
        from annotator.models import load_model, resolve_device

        source = open_source(self.recipe.input, self.recipe.prompt)
        self._check_setup(source)
        if self.spec.cpu_threads:
            import torch

            torch.set_num_threads(self.spec.cpu_threads)
        m = self.recipe.model
        started = time.perf_counter()
        device = self.spec.device if self.spec.device != "auto" else m.device
        check_cache_folder()  # as `check_run` did, on this writer's machine (a Ray node's)
        check_compile(m.compile, m.forward, m.cuda_graphs, [resolve_device(device).type])
        loaded = load_model(
            m.name, m.revision, m.dtype, device, m.attn_implementation, progress_bars=self.spec.model_bars
        )
        from annotator.prompt import PromptBuilder
        from annotator.scoring import Scorer

        self.builder = PromptBuilder(loaded.tokenizer, self.recipe.prompt, self.recipe.questions)
        self.scorer = Scorer(loaded, self.builder, m.forward, m.cuda_graphs, m.compile)
        self.schema = output_schema(source.schema, self.recipe.input.image_column, self.recipe.questions)
        self.reader = WindowReader(source, self.recipe.batching.window)
        self.loaded_at = time.time()
        self.state = "ready"
        self.label = self.spec.label if self.spec.label != "auto" else str(loaded.device)
        return {
            "writer": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "label": self.label,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "seconds": time.perf_counter() - started,
        }

    def run(self) -> None:
        """Score windows from the inbox until `finish` (returns) or `stop` (raises `WriterStopped`)."""
        from annotator.preprocess import resolve_workers

        batching = self.recipe.batching
        workers = self.spec.workers if self.spec.workers is not None else resolve_workers(batching.workers)
        lookahead = max(2 * batching.max_batch_size, 8)
        with _settled_memory(), self._preprocessor(workers, lookahead) as self.preprocessor, self._heartbeat():
            self._loop(lookahead)
        self.state = "done"

    def _preprocessor(self, workers: int, lookahead: int) -> Any:
        """The workers and their shared-memory ring, with a slot for every image that can be in flight or held."""
        from annotator.preprocess import Preprocessor

        batching = self.recipe.batching
        # Asked for: under `lookahead` plus one batch (`_loop` asks a batch at a time); held: the batch launched.
        slots = lookahead + 2 * batching.max_batch_size
        preprocessor = Preprocessor(
            workers, batching.image_timeout_s, slots, 3 * self.recipe.model.max_pixels, batching.shared_memory
        )
        if preprocessor.note:
            self.emit("note", preprocessor.note)
        return preprocessor

    def _next_window(self) -> int | None:
        while True:
            kind, value = self._inbox.get()
            if kind == "window":
                return value
            if kind == "session":
                self.session_started = value
                self.write_heartbeat()  # at once: `status` lists this writer from its first window on
                continue
            return None  # finish or stop

    def _plan(self, window: Window) -> WindowState:
        plan = plan_recipe_window(window, self.recipe, self.builder, self.max_batch_tokens)
        return WindowState(window, plan, pending=len(plan.batches))

    def _plan_next(self) -> WindowState | None:
        """The next window handed out, read and planned (on the planner thread); None when there are no more."""
        while True:
            index = self._next_window()
            if index is None:
                return None
            window = self.reader.read(index)
            if window is None:
                self.emit("end", index)
                continue
            if self.state != "scoring":
                self.state = "scoring"
                self.write_heartbeat()
            return self._plan(window)

    def _loop(self, lookahead: int) -> None:
        from annotator.preprocess import ImageJob

        open_windows: deque[WindowState] = deque()  # planned, not yet committed, in the order handed out
        planned: deque[tuple[WindowState, list[PlannedRow]]] = deque()  # batches whose images are not asked for
        submitted: deque[tuple[WindowState, list[PlannedRow], list[int]]] = deque()  # ... and those that are
        max_pixels = self.recipe.input.max_image_pixels
        draft = self.recipe.model.jpeg_draft
        in_flight = None
        # Reading and planning a window and writing one take seconds each (parquet I/O, tokens, fsync):
        # on their own threads they overlap scoring instead of stalling the GPU. One thread each keeps order.
        with ThreadPoolExecutor(1, "plan") as planner, ThreadPoolExecutor(1, "sink") as sink:
            upcoming: Future | None = planner.submit(self._plan_next)
            writing: Future | None = None
            try:
                while True:
                    if self.stopping.is_set():
                        raise WriterStopped
                    # Commit first: a finished window must not wait on (or be lost to) reading the next one.
                    while open_windows and open_windows[0].pending == 0:
                        if writing is not None:
                            writing.result()  # one write at a time: bounded memory, and its error surfaces here
                        writing = sink.submit(self._commit, open_windows.popleft())
                    while self.preprocessor.in_flight < lookahead and (planned or upcoming is not None):
                        if planned:
                            state, batch = planned.popleft()
                            jobs = [ImageJob(r.image, r.resized, max_pixels, draft) for r in batch]
                            submitted.append((state, batch, self.preprocessor.submit_batch(jobs)))
                            continue
                        # The next window may not be handed out yet (the coordinator holds it back until this
                        # writer commits): wait for it only when there is nothing else to do.
                        if not upcoming.done() and (submitted or in_flight is not None):
                            break
                        state = self._wait(upcoming)
                        upcoming = planner.submit(self._plan_next) if state is not None else None
                        if state is None:
                            break
                        self._advance(0, len(state.plan.errors))
                        open_windows.append(state)
                        planned.extend((state, batch) for batch in state.plan.batches)
                        if state.pending == 0:
                            break  # nothing to score (every row failed its checks): commit it before reading on
                    if not submitted:
                        if in_flight is not None:
                            self._finish_and_release(*in_flight)
                            in_flight = None
                        elif not open_windows and upcoming is None:
                            break
                        continue
                    state, batch, tickets = submitted.popleft()
                    # An image may take up to `image_timeout_s`: a stop meanwhile is not kept waiting.
                    images = [self.preprocessor.result(t, self._check_stopping) for t in tickets]
                    launched = self._launch_batch(state, batch, images)
                    # The previous batch's results are read only now, so the GPU ran it while this one was prepared.
                    if in_flight is not None:
                        self._finish_and_release(*in_flight)
                    in_flight = launched, tickets
            except BaseException as stopped:
                if upcoming is not None and not upcoming.done():
                    self._inbox.put(("stop", None))  # the planner may be waiting for a window: release it
                if writing is not None and writing.exception() is not None:
                    # A failed write (disk full) is the news, whatever else stopped the loop.
                    raise writing.exception() from stopped
                raise
            if writing is not None:
                writing.result()

    def _check_stopping(self) -> None:
        if self.stopping.is_set():
            raise WriterStopped

    def _wait(self, future: Future) -> Any:
        """A future's result; a stop meanwhile raises `WriterStopped` (reading a window can stall on a slow disk)."""
        while True:
            try:
                return future.result(timeout=CHECK_S)
            except FutureTimeout:
                self._check_stopping()

    def _launch_batch(self, state: WindowState, batch: list[PlannedRow], images: list):
        """Record decode errors, start scoring the rest; returns what `_finish_batch` needs."""
        from annotator.scoring import ScoreInput, launch_splitting_on_oom

        ready, inputs = [], []
        for row, image in zip(batch, images, strict=True):
            if isinstance(image, str):
                state.errors[row.position] = image
            else:
                ready.append(row)
                inputs.append(ScoreInput(image, row.grid, row.text))
        if not inputs:
            return state, batch, ready, lambda: []
        padded = len(inputs) * max(r.length for r in ready)

        def lower_budget() -> None:
            self.max_batch_tokens = max(1, min(self.max_batch_tokens, padded // 2))

        return state, batch, ready, launch_splitting_on_oom(self.scorer, inputs, lower_budget)

    def _finish_and_release(self, launched: tuple, tickets: list[int]) -> None:
        """Read a batch's scores, then free its images' shared-memory slots: the device has read them by now."""
        self._finish_batch(*launched)
        self.preprocessor.release(tickets)

    def _finish_batch(self, state: WindowState, batch: list[PlannedRow], ready: list[PlannedRow], wait) -> None:
        for row, score in zip(ready, wait(), strict=True):
            state.scores[row.position] = score
        state.pending -= 1
        self._advance(len(ready), len(batch) - len(ready))

    def _commit(self, state: WindowState) -> None:
        window = state.window
        questions = self.recipe.questions
        table = window_table(window.table, self.schema, window.start, state.scores, state.errors, questions)
        record = {**state.record(), **answer_counts(table, questions)}
        record["histograms"] = {
            q.column("prob"): histogram(table.column(q.column("prob")), JOURNAL_BINS) for q in questions if q.yes_no
        }
        record["limit"] = self.recipe.input.limit  # a window cut short by it is redone if the limit grows
        record["session_started"] = self.session_started
        record["device"] = self.label
        self.folder.write_window(window.index, table, record)
        self.windows_done += 1
        self.rows_done += window.rows
        self.emit("committed", {**record, "window": window.index})

    def _advance(self, scored: int, errors: int) -> None:
        self.emit("rows", (scored, errors))

    # --- the heartbeat file `status` reads -----------------------------------------------------------

    @contextlib.contextmanager
    def _heartbeat(self) -> Iterator[None]:
        done = threading.Event()

        def beat() -> None:
            while not done.wait(HEARTBEAT_S):
                self.write_heartbeat()

        thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        thread.start()
        try:
            yield
        except WriterStopped:
            self.state = "stopped"
            raise
        except BaseException:
            self.state = "failed"
            raise
        finally:
            done.set()
            thread.join()
            if self.state in ("ready", "scoring"):  # finished (one that was handed no window too)
                self.state = "done"
            self.write_heartbeat()

    def write_heartbeat(self) -> None:
        """`journal/NAME.heartbeat.json`: where this writer runs, what it has done, and when it last said so (every
        `HEARTBEAT_S`, and when its state changes)."""
        if self.session_started is None:
            return  # nothing handed out yet: the folder may still be being prepared
        beat = {
            "writer": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.label,
            "state": self.state,
            "started": self.started,
            "loaded_at": self.loaded_at,
            "session_started": self.session_started,
            "windows": self.windows_done,
            "rows": self.rows_done,
            "beat": time.time(),
        }
        path = self.folder.journal_dir / f"{self.name}.heartbeat.json"
        hidden = path.with_name(f".{path.name}.tmp")
        # One thread at a time (the hidden file is shared); a heartbeat is for `status`: a full disk stops the run
        # elsewhere.
        with self._beating, contextlib.suppress(OSError):
            hidden.write_text(json.dumps(beat))
            os.replace(hidden, path)


@contextlib.contextmanager
def _settled_memory() -> Iterator[None]:
    """Spare the writer's process work that is not the run's: it is a feeder for the device (docs/performance.md).

    The model and libraries live as long as the run, so the garbage collector stops walking them every time the
    planner allocates a window's rows (that was most of the planner's CPU); garbage is collected first, so that
    none is frozen with them, and they are collectable again after the run. Arrow's default allocator gives freed
    memory back to the kernel within milliseconds, so every window's buffers were page-faulted in and zeroed
    again: jemalloc keeping freed pages for reuse saves that (peak memory is unchanged: the pages kept are those of
    the windows a writer holds at once anyway).
    """
    import pyarrow as pa

    with contextlib.suppress(NotImplementedError):  # a pyarrow built without jemalloc keeps its allocator
        pa.set_memory_pool(pa.jemalloc_memory_pool())
        pa.jemalloc_set_decay_ms(-1)
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
