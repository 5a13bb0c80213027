"""Run: wire source -> plan -> preprocess -> score -> sink, with resume, signals, progress and summary."""

from __future__ import annotations

import gc
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annotator import __version__
from annotator.batching import PlannedRow, WindowPlan, plan_recipe_window
from annotator.card import input_card, write_run_card
from annotator.errors import EXIT_RESUMABLE, AnnotatorError, RunInterrupted
from annotator.images import image_kind
from annotator.progress import RunProgress
from annotator.recipe import Recipe, frozen_recipe_yaml, load_recipe, merge, parse_overrides, validate_recipe
from annotator.scores import JOURNAL_BINS, add, histogram
from annotator.sink import RunFolder, latest_run, output_schema, window_table
from annotator.sources import Window, open_source

RESULT_KEYS_HINT = "model, prompt, pixels, answers, input columns, threshold"


@dataclass
class WindowState:
    """A window between planning and commit: results fill in as its batches are scored."""

    window: Window
    plan: WindowPlan
    pending: int
    probs: list[float | None] = field(default_factory=list)
    masses: list[float | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        rows = self.window.rows
        self.probs, self.masses, self.errors = [None] * rows, [None] * rows, [None] * rows
        for position, error in self.plan.errors.items():
            self.errors[position] = error

    def record(self) -> dict[str, Any]:
        scored = sum(p is not None for p in self.probs)
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
    """Ctrl-C / SIGTERM: the first asks to stop after the current batch, the second exits at once."""

    def __init__(self, console) -> None:
        self.console = console
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            os._exit(EXIT_RESUMABLE)  # committed windows are safe on disk; resume redoes the rest
        self.requested = True
        self.console.print(
            f"[yellow]{signal.Signals(signum).name}: stopping after the current batch "
            "(press Ctrl-C again to quit at once)...[/]"
        )

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def find_latest_unfinished(root: Path = Path("outputs")) -> Path:
    folder = latest_run(root, unfinished=True)
    if folder is None:
        raise AnnotatorError(
            f"No unfinished run under {str(root)!r}. Pass the run folder: `annotate resume OUTPUT_DIR`."
        )
    return folder.root


def prepare_run(recipe: Recipe, overwrite: bool) -> tuple[RunFolder, Any]:
    """Check the input and the output folder (no model yet) and take the folder's lock.

    The folder is emptied and written (`start_fresh`) only once the model has loaded, so an --overwrite
    whose model cannot be loaded leaves the previous run as it was.
    """
    source = open_source(recipe.input, recipe.prompt)
    folder = RunFolder(recipe.output_dir)
    # A run that committed nothing (e.g. its model failed to load) has nothing to lose: start it again.
    if folder.exists() and not overwrite and (folder.finished or folder.committed()):
        if folder.finished:
            raise AnnotatorError(
                f"{str(folder.root)!r} already holds a finished run. Use another `output.dir`, or add "
                "--overwrite to replace it."
            )
        raise AnnotatorError(
            f"{str(folder.root)!r} holds an unfinished run. Continue it with `annotate resume {folder.root}`, "
            "or add --overwrite to start again from scratch."
        )
    folder.acquire_lock()
    return folder, source


def start_fresh(recipe: Recipe, folder: RunFolder, source: Any) -> None:
    """Empty the run folder (an --overwrite) and write the new run's recipe and manifest."""
    import shutil

    for path in (folder.data_dir, folder.journal_dir):
        shutil.rmtree(path, ignore_errors=True)
    for path in (folder.summary_path, folder.manifest_path, folder.recipe_path):
        path.unlink(missing_ok=True)
    folder.create(frozen_recipe_yaml(recipe), _manifest(recipe, source))


def _manifest(recipe: Recipe, source: Any) -> dict[str, Any]:
    return {
        "annotator_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "result_fingerprint": recipe.result_fingerprint(),
        "input_fingerprint": source.fingerprint(),
        "window": recipe.batching.window,
        "total_rows": source.total_rows,
        "limit": recipe.input.limit,
        "input_card": input_card(recipe.model_dump(mode="json"), source),
    }


def prepare_resume(output_dir: Path, overrides: list[str]) -> tuple[Recipe, RunFolder, Any]:
    """Reload the frozen recipe, refuse result-changing edits and changed input, take the lock."""
    folder = RunFolder(output_dir)
    if not folder.exists():
        raise AnnotatorError(
            f"{str(output_dir)!r} is not a run folder (no manifest.json). Start it with `annotate run`."
        )
    import yaml

    frozen = yaml.safe_load(folder.recipe_path.read_text(encoding="utf-8"))
    manifest = folder.manifest()
    # The manifest's limit is the run's: growing a pilot writes it last (see `grow`), recipe.yaml's before.
    frozen.setdefault("input", {})["limit"] = manifest.get("limit", frozen["input"].get("limit"))
    recipe = validate_recipe(merge(frozen, parse_overrides(overrides)), source=str(folder.recipe_path))
    grows = recipe.input.limit != manifest.get("limit")
    if grows:
        check_growth(manifest.get("limit"), recipe.input.limit)
    elif folder.finished:
        raise AnnotatorError(
            f"The run in {str(output_dir)!r} is already finished; see `annotate status {output_dir}`. To annotate "
            f"more rows of its input, grow it: `annotate resume {output_dir} --set input.limit=M` (or =null for all)."
        )
    if recipe.result_fingerprint() != manifest["result_fingerprint"]:
        raise AnnotatorError(
            f"These --set values change results ({RESULT_KEYS_HINT}), so the resumed output would mix two "
            f"settings. Resume without them, or start a new run with `annotate run ... --overwrite`."
        )
    if recipe.batching.window != manifest["window"]:
        raise AnnotatorError(
            f"`batching.window` cannot change on resume (the run uses {manifest['window']}): windows are the unit "
            "of resume. Drop that --set."
        )
    source = open_source(recipe.input, recipe.prompt)
    if source.fingerprint() != manifest["input_fingerprint"] or (
        not grows and source.total_rows != manifest["total_rows"]
    ):
        raise AnnotatorError(
            f"The input has changed since this run started (files, sizes or contents differ from "
            f"{str(folder.manifest_path)!r}). Resuming would mix results of two inputs; start a new run with "
            "--overwrite instead."
        )
    folder.acquire_lock()
    return recipe, folder, source


def check_growth(old_limit: int | None, new_limit: int | None) -> None:
    """A resumed run's `input.limit` may only grow: committed rows are never dropped."""
    if old_limit is None or (new_limit is not None and new_limit < old_limit):
        covered = "the whole input" if old_limit is None else f"the first {old_limit} rows"
        raise AnnotatorError(
            f"`input.limit` can only grow on resume: this run covers {covered}, and --set input.limit={new_limit} "
            "would drop rows it has. To keep fewer rows, export them (`annotate export RUN_DIR --to DIR ...`), or "
            "start a new run with --overwrite."
        )


def grow(folder: RunFolder, recipe: Recipe, total_rows: int | None) -> None:
    """Extend a pilot to `recipe.input.limit` (checked by `prepare_resume`, done once the model has loaded).

    Each step leaves a run that `annotate resume` finishes exactly: without summary.json the pilot is only
    unfinished; the manifest (written atomically, and whose limit resume trusts over recipe.yaml's) then makes
    it the grown run, in which the pilot's last window, if short, no longer counts as committed (`committed`).
    """
    manifest = folder.manifest()
    folder.summary_path.unlink(missing_ok=True)
    folder.create(frozen_recipe_yaml(recipe), {**manifest, "limit": recipe.input.limit, "total_rows": total_rows})


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
    ) -> None:
        self.fresh = fresh  # a new run: the folder is (re)started once the model has loaded
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
        loaded = self._load_model()  # first: an unreachable Hub is reported before torch is even imported
        from annotator.preprocess import resolve_workers
        from annotator.prompt import PromptBuilder
        from annotator.scoring import Scorer

        if self.fresh:
            start_fresh(recipe, self.folder, self.source)
        elif recipe.input.limit != self.folder.manifest().get("limit"):
            grow(self.folder, recipe, self.source.total_rows)
        self.folder.clean_leftovers()
        committed = self.folder.committed()
        write_run_card(self.folder, recipe)
        self.progress.begin(committed.values())
        self.builder = PromptBuilder(loaded.tokenizer, recipe.prompt)
        self.scorer = Scorer(loaded, self.builder, recipe.model.forward, recipe.model.cuda_graphs)
        self.schema = output_schema(self.source.schema, recipe.input.image_column)
        workers = resolve_workers(recipe.batching.workers)
        lookahead = max(2 * recipe.batching.max_batch_size, 8)
        with (
            _settled_memory(),
            self._preprocessor(workers, lookahead) as self.preprocessor,
            StopRequest(self.console) as stop,
            self.progress,
        ):
            self._loop(self._windows_to_do(committed), stop, lookahead)
        return self.finish(loaded.device)

    def _load_model(self):
        """Load the recipe's model, saying so (with the Hub's download bars on a terminal)."""
        from annotator.models import is_hub_model, load_model

        m = self.recipe.model
        self.progress.loading_model(m.name, from_hub=is_hub_model(m.name))
        started = time.perf_counter()
        try:
            loaded = load_model(
                m.name, m.revision, m.dtype, m.device, m.attn_implementation, progress_bars=self.progress.model_bars
            )
        except KeyboardInterrupt:
            again = f"annotate resume {self.folder.root}" if not self.fresh else "the same `annotate run` command"
            raise RunInterrupted(
                f"Interrupted while loading the model, before this session wrote anything to {self.folder.root}. "
                f"To go on, run {again} again."
            ) from None
        self.progress.model_loaded(m.name, loaded.device, loaded.dtype, time.perf_counter() - started)
        return loaded

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
                    launched = self._launch_batch(state, batch, [self.preprocessor.result(t) for t in tickets])
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
            state.probs[row.position] = score.prob
            state.masses[row.position] = score.answer_mass
        state.pending -= 1
        self._advance(len(ready), len(batch) - len(ready))

    def _commit(self, state: WindowState) -> None:
        window = state.window
        table = window_table(
            window.table,
            self.schema,
            window.start,
            state.probs,
            state.masses,
            state.errors,
            self.recipe.output.threshold,
        )
        record = state.record()
        record["positives"] = sum(bool(v) for v in table.column("label").to_pylist())
        record["histograms"] = {"prob": histogram(table.column("prob"), JOURNAL_BINS)}
        record["limit"] = self.recipe.input.limit  # a window cut short by it is redone if the limit grows
        record["session_started"] = self.progress.started_at
        self.folder.write_window(window.index, table, record)
        self.progress.window_committed({**record, "window": window.index})

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
    prob_histogram = None
    for index, record in sorted(records.items()):
        prob_histogram = add(prob_histogram, window_histogram(folder, index, record))
    return {
        "rows": sum(r["rows"] for r in records.values()),
        "scored": sum(r["scored"] for r in records.values()),
        "errors": sum(r["errors"] for r in records.values()),
        "positives": sum(r.get("positives", 0) for r in records.values()),
        "error_kinds": dict(kinds.most_common()),
        "truncated_texts": sum(r.get("truncated_texts", 0) for r in records.values()),
        "windows": len(records),
        "padding_efficiency": round(sum(r["real_tokens"] for r in records.values()) / padded, 4) if padded else None,
        "prob_histogram": prob_histogram or [0] * JOURNAL_BINS,
    }


def window_histogram(folder: RunFolder, index: int, record: dict[str, Any], column: str = "prob") -> list[int]:
    """A committed window's histogram of a score column: from its journal record, else (older runs) its file."""
    counts = record.get("histograms", {}).get(column)
    if counts is not None:
        return counts
    import pyarrow.parquet as pq

    return histogram(pq.read_table(folder.window_file(index), columns=[column]).column(column), JOURNAL_BINS)


def run_recipe(
    recipe_path: str, overrides: list[str], overwrite: bool, console, progress: bool = True, log_format: str = "text"
) -> dict:
    recipe = load_recipe(recipe_path, overrides)
    folder, source = prepare_run(recipe, overwrite)
    return Annotator(recipe, folder, source, console, progress, fresh=True, log_format=log_format).run()


def resume_run(
    output_dir: str | None, overrides: list[str], console, progress: bool = True, log_format: str = "text"
) -> dict:
    root = Path(output_dir) if output_dir else find_latest_unfinished()
    recipe, folder, source = prepare_resume(root, overrides)
    return Annotator(recipe, folder, source, console, progress, log_format=log_format).run()
