"""Run: wire source -> plan -> preprocess -> score -> sink, with resume, signals, progress and summary."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annotator.batching import PlannedRow, WindowPlan, plan_recipe_window
from annotator.card import write_run_card
from annotator.errors import EXIT_RESUMABLE, RunInterrupted
from annotator.folder import Claim, drop_previous, undo_start
from annotator.images import image_kind
from annotator.progress import RunProgress
from annotator.recipe import Recipe, load_recipe
from annotator.scores import JOURNAL_BINS, add, histogram
from annotator.sink import RunFolder, answer_counts, output_schema, window_table
from annotator.sources import Window
from annotator.start import find_latest_unfinished, grow, prepare_resume, prepare_run


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


class StopRequest:
    """Ctrl-C / SIGTERM, for a whole `run` or `resume`.

    Until the run loop starts (checks, folder, model load), and while the loop waits on something that can take
    long (planning a window, an image), a signal stops at once with `RunInterrupted` (exit 2, the folder
    resumable). Otherwise the first asks to stop after the current batch. The second always exits at once, after
    killing the worker processes: committed windows are safe on disk; resume redoes the rest.
    """

    def __init__(self, console) -> None:
        self.console = console
        self.requested = False
        self.immediate = True
        self.message = "Interrupted before the run started; nothing was committed. Run the same command again."
        self.on_exit: list[Callable[[], None]] = []
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            for kill in self.on_exit:
                kill()
            # os.write, not the console: the interrupted thread may hold the console's lock.
            os.write(2, f"\nQuit at once. {self.message}\n".encode())
            os._exit(EXIT_RESUMABLE)
        self.requested = True
        if self.immediate:
            raise RunInterrupted(self.message)
        self.console.print(
            f"[yellow]{signal.Signals(signum).name}: stopping after the current batch "
            "(press Ctrl-C again to quit at once)...[/]"
        )

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A wait that may take long: a signal during it stops the run at once."""
        if self.requested:
            raise RunInterrupted(self.message)
        previous, self.immediate = self.immediate, True
        try:
            yield
        finally:
            self.immediate = previous

    def __enter__(self) -> StopRequest:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():  # signals go to main only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            for signum, handler in self._previous.items():
                # After a stop, the process is on its way out: one more signal still exits 2 at once.
                signal.signal(signum, self._handle if self.requested else handler)
            self._previous.clear()


class Annotator:
    """One process annotating a run folder: plans windows, keeps workers busy, scores, commits in order."""

    def __init__(
        self,
        recipe: Recipe,
        folder: RunFolder,
        source: Any,
        console,
        progress: bool = True,
        fresh: bool = False,
        log_format: str = "text",
        stop: StopRequest | None = None,
    ) -> None:
        self.fresh = fresh  # a new start: a failed load puts the folder back, a loaded model drops any run replaced
        self.stop = stop
        self.recipe = recipe
        self.folder = folder
        self.source = source
        self.console = console
        self.progress = RunProgress(
            recipe.name, console, source.total_rows, folder.root / "run.log", log_format, show=progress
        )
        self.max_batch_tokens = recipe.batching.max_batch_tokens
        self.rows_done = 0  # rows scored or failed in this session, committed or not

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        except RunInterrupted as stopped:
            self.progress.stopped(str(stopped))
            raise
        finally:
            self.progress.close()
            self.folder.release_lock()

    def _run(self) -> dict[str, Any]:
        recipe = self.recipe
        stop = self.stop or StopRequest(self.console)
        with stop:
            stop.message = self._load_interrupted_message()
            loaded, self.builder = self._load()
        from annotator.preprocess import resolve_workers
        from annotator.scoring import Scorer

        if not self.fresh and recipe.input.limit != self.folder.manifest().get("limit"):
            grow(self.folder, recipe, self.source.total_rows)
        self.folder.clean_leftovers()
        committed = self.folder.committed()
        write_run_card(self.folder, recipe)
        self.progress.begin(committed.values())
        self.scorer = Scorer(loaded, self.builder, recipe.model.forward, recipe.model.cuda_graphs)
        self.schema = output_schema(self.source.schema, recipe.input.image_column, recipe.questions)
        workers = resolve_workers(recipe.batching.workers)
        lookahead = max(2 * recipe.batching.max_batch_size, 8)
        with (
            _settled_memory(),
            self._preprocessor(workers, lookahead) as self.preprocessor,
            stop,
            self.progress,
        ):
            stop.on_exit.append(self.preprocessor.kill_workers)
            stop.message = self._interrupted_message()
            stop.immediate = False
            self._loop(self._windows_to_do(committed), stop, lookahead)
        return self.finish(loaded.device)

    def _load(self):
        """The model and the prompt builder, saying so (with the Hub's download bars on a terminal).

        A new start whose model cannot load leaves the folder as it was (the run it replaced is back); once it has
        loaded, the replaced run is deleted. A signal during the load leaves the new run, resumable.
        """
        from annotator.models import is_hub_model, load_model
        from annotator.prompt import PromptBuilder

        m = self.recipe.model
        self.progress.loading_model(m.name, from_hub=is_hub_model(m.name))
        started = time.perf_counter()
        try:
            loaded = load_model(
                m.name, m.revision, m.dtype, m.device, m.attn_implementation, progress_bars=self.progress.model_bars
            )
            builder = PromptBuilder(loaded.tokenizer, self.recipe.prompt, self.recipe.questions)
        except RunInterrupted:
            raise
        except KeyboardInterrupt:  # no signal handler here (not the main thread): the same as a handled signal
            raise RunInterrupted(self._load_interrupted_message()) from None
        except Exception:
            if self.fresh:
                undo_start(self.folder, self.folder.claimed or Claim())
            raise
        if self.fresh:
            drop_previous(self.folder)
        self.progress.model_loaded(m.name, loaded.device, loaded.dtype, time.perf_counter() - started)
        return loaded, builder

    def _preprocessor(self, workers: int, lookahead: int):
        """The workers and their shared-memory ring, with a slot for every image that can be in flight or held."""
        from annotator.preprocess import Preprocessor

        batching = self.recipe.batching
        # Asked for: under `lookahead` plus one batch (`_loop` asks a batch at a time); held: the batch launched.
        slots = lookahead + 2 * batching.max_batch_size
        preprocessor = Preprocessor(
            workers, batching.image_timeout_s, slots, 3 * self.recipe.model.max_pixels, batching.shared_memory
        )
        if preprocessor.note:
            self.console.print(f"[yellow]{preprocessor.note}[/]")
        return preprocessor

    def _windows_to_do(self, committed: dict[int, dict]) -> Iterator[Window]:
        first = 0
        while first in committed:
            first += 1
        for window in self.source.windows(self.recipe.batching.window, first):
            if window.index not in committed:
                yield window

    def _plan(self, window: Window) -> WindowState:
        plan = plan_recipe_window(window, self.recipe, self.builder, self.max_batch_tokens)
        return WindowState(window, plan, pending=len(plan.batches))

    def _plan_next(self, windows: Iterator[Window]) -> WindowState | None:
        window = next(windows, None)
        return None if window is None else self._plan(window)

    def _loop(self, windows: Iterator[Window], stop: StopRequest, lookahead: int) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        from annotator.preprocess import ImageJob

        open_windows: deque[WindowState] = deque()  # planned, not yet committed, in input order
        planned: deque[tuple[WindowState, list[PlannedRow]]] = deque()  # batches whose images are not asked for
        submitted: deque[tuple[WindowState, list[PlannedRow], list[int]]] = deque()  # ... and those that are
        max_pixels = self.recipe.input.max_image_pixels
        draft = self.recipe.model.jpeg_draft
        in_flight = None
        # Reading and planning a window and writing one take seconds each (parquet I/O, tokens, fsync):
        # on their own threads they overlap scoring instead of stalling the GPU. One thread each keeps order.
        with ThreadPoolExecutor(1, "plan") as planner, ThreadPoolExecutor(1, "sink") as sink:
            upcoming: Future | None = planner.submit(self._plan_next, windows)
            writing: Future | None = None
            try:
                while True:
                    if stop.requested:
                        raise RunInterrupted(self._interrupted_message())
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
                        with stop.interruptible():  # reading a window's headers can stall on a slow disk
                            state = upcoming.result()
                        upcoming = planner.submit(self._plan_next, windows) if state is not None else None
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
                    with stop.interruptible():  # an image may take up to `image_timeout_s`
                        images = [self.preprocessor.result(t) for t in tickets]
                    launched = self._launch_batch(state, batch, images)
                    # The previous batch's results are read only now, so the GPU ran it while this one was prepared.
                    if in_flight is not None:
                        self._finish_and_release(*in_flight)
                    in_flight = launched, tickets
            except BaseException as stopped:
                if writing is not None and writing.exception() is not None:
                    # A failed write (disk full) is the news, whatever else stopped the loop.
                    raise writing.exception() from stopped
                raise
            if writing is not None:
                writing.result()

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
        record["session_started"] = self.progress.started_at
        self.folder.write_window(window.index, table, record)
        self.progress.window_committed({**record, "window": window.index})

    def _load_interrupted_message(self) -> str:
        return (
            f"Interrupted while loading the model, before any window was committed. The run folder is ready: "
            f"continue with `annotate resume {self.folder.root}`."
        )

    def _interrupted_message(self) -> str:
        return (
            f"Stopped. Committed windows are safe in {self.folder.root}; the window in progress was dropped. "
            f"Continue with: annotate resume {self.folder.root}"
        )

    def _advance(self, scored: int, errors: int) -> None:
        self.rows_done += scored + errors
        self.progress.rows_advanced(scored, errors)

    def finish(self, device: Any) -> dict[str, Any]:
        summary = summarize(self.folder)
        seconds = self.progress.seconds
        summary.update(
            {
                "finished": True,
                "output_dir": str(self.folder.root),
                "model": self.recipe.model.name,
                "device": str(device),
                "session_rows": self.progress.session_rows,
                "session_seconds": round(seconds, 3) if seconds is not None else None,
                "rows_per_s": self.progress.rows_per_s,
            }
        )
        if summary["rows"] != self.source.total_rows and self.source.total_rows is not None:
            raise RunInterrupted(
                f"The run folder holds {summary['rows']} rows but the input has {self.source.total_rows}; "
                f"run `annotate resume {self.folder.root}`."
            )
        write_run_card(self.folder, self.recipe, summary)  # first: the summary is what marks the run finished
        self.folder.write_summary(summary)
        self.progress.finished(summary)
        return summary


@contextmanager
def _settled_memory() -> Iterator[None]:
    """Spare the main process work that is not the run's: it is a feeder for the device (docs/performance.md).

    The model and libraries live as long as the run, so the garbage collector stops walking them every time the
    planner allocates a window's rows (that was most of the planner's CPU); garbage is collected first, so that
    none is frozen with them, and they are collectable again after the run. Arrow's default allocator gives freed
    memory back to the kernel within milliseconds, so every window's buffers were page-faulted in and zeroed
    again: jemalloc keeping freed pages for reuse saves that (peak memory is unchanged: a run holds at most two
    windows).
    """
    import pyarrow as pa

    with suppress(NotImplementedError):  # a pyarrow built without jemalloc keeps its allocator
        pa.set_memory_pool(pa.jemalloc_memory_pool())
        pa.jemalloc_set_decay_ms(-1)
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def summarize(folder: RunFolder) -> dict[str, Any]:
    """Counts over every committed window, from the journals alone (no data file is read)."""
    records = folder.committed()
    kinds: Counter[str] = Counter()
    for r in records.values():
        kinds.update(r.get("error_kinds", {}))
    padded = sum(r["padded_tokens"] for r in records.values())
    scored = sum(r["scored"] for r in records.values())
    answers = _answer_totals(records.values(), scored)
    prob_histogram = None
    if not answers:  # the single Y/N question
        for index, record in sorted(records.items()):
            prob_histogram = add(prob_histogram, window_histogram(folder, index, record))
    for name, counts in answers.get("questions", {}).items():
        if "positives" in counts:
            column = f"prob_{name}"
            counts["prob_histogram"] = None
            for index, record in sorted(records.items()):
                counts["prob_histogram"] = add(
                    counts["prob_histogram"], window_histogram(folder, index, record, column)
                )
    return {
        "rows": sum(r["rows"] for r in records.values()),
        "scored": scored,
        "errors": sum(r["errors"] for r in records.values()),
        # Labels of the single Y/N question; per question in `questions`, or `answers`, otherwise.
        "positives": None if answers else sum(r.get("positives", 0) for r in records.values()),
        **answers,
        "error_kinds": dict(kinds.most_common()),
        "truncated_texts": sum(r.get("truncated_texts", 0) for r in records.values()),
        "windows": len(records),
        "padding_efficiency": round(sum(r["real_tokens"] for r in records.values()) / padded, 4) if padded else None,
        "prob_histogram": None if answers else prob_histogram or [0] * JOURNAL_BINS,
    }


def window_histogram(folder: RunFolder, index: int, record: dict[str, Any], column: str = "prob") -> list[int]:
    """A committed window's histogram of a score column: from its journal record, else (older runs) its file."""
    counts = record.get("histograms", {}).get(column)
    if counts is not None:
        return counts
    import pyarrow.parquet as pq

    return histogram(pq.read_table(folder.window_file(index), columns=[column]).column(column), JOURNAL_BINS)


def _answer_totals(records: Iterable[dict[str, Any]], scored: int) -> dict[str, Any]:
    """`answers` ({answer: rows}) of a single question with answers, and `questions` ({name: {positives, negatives}}
    or {name: {answers}}) of a recipe with `prompt.questions`, summed over the journal records (`sink.answer_counts`
    wrote them)."""

    def tally(total: dict[str, Any], counts: dict[str, Any]) -> None:
        if "positives" in counts:
            total["positives"] = total.get("positives", 0) + counts["positives"]
        for answer, n in counts.get("answers", {}).items():
            total.setdefault("answers", {})[answer] = total.get("answers", {}).get(answer, 0) + n

    totals: dict[str, Any] = {}
    for record in records:
        if "answers" in record:
            tally(totals, {"answers": record["answers"]})
        for name, counts in record.get("questions", {}).items():
            tally(totals.setdefault("questions", {}).setdefault(name, {}), counts)
    for counts in totals.get("questions", {}).values():
        if "positives" in counts:
            counts["negatives"] = scored - counts["positives"]
    return totals


def run_recipe(
    recipe_path: str, overrides: list[str], overwrite: bool, console, progress: bool = True, log_format: str = "text"
) -> dict:
    with StopRequest(console) as stop:  # from the first instant: a signal exits 2, never a half-written folder
        recipe = load_recipe(recipe_path, overrides)
        folder, source = prepare_run(recipe, overwrite)
        annotator = Annotator(recipe, folder, source, console, progress, fresh=True, log_format=log_format, stop=stop)
        return annotator.run()


def resume_run(
    output_dir: str | None, overrides: list[str], console, progress: bool = True, log_format: str = "text"
) -> dict:
    with StopRequest(console) as stop:
        root = Path(output_dir) if output_dir else find_latest_unfinished()
        recipe, folder, source = prepare_resume(root, overrides)
        fresh = folder.claimed is not None  # stopped before its manifest: started again
        annotator = Annotator(recipe, folder, source, console, progress, fresh=fresh, log_format=log_format, stop=stop)
        return annotator.run()
