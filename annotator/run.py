"""Run: the coordinator of a run folder (signals, progress, summary, the writers' engine); writers do the scoring."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from annotator.card import write_run_card
from annotator.coordinator import Coordinator, WindowQueue, first_uncommitted
from annotator.errors import EXIT_RESUMABLE, RunInterrupted
from annotator.executors import local_executor, resolve_devices
from annotator.folder import Claim, drop_previous, undo_start
from annotator.progress import RunProgress
from annotator.recipe import Recipe, load_recipe
from annotator.scores import JOURNAL_BINS, add, histogram
from annotator.sink import RunFolder
from annotator.start import find_latest_unfinished, grow, prepare_resume, prepare_run
from annotator.writer import WriterSpec


class StopRequest:
    """Ctrl-C / SIGTERM, for a whole `run` or `resume`.

    Until the run loop starts (checks, folder, model load), and while the loop waits on something that can take
    long (planning a window, an image), a signal stops at once with `RunInterrupted` (exit 2, the folder
    resumable). Otherwise the first asks to stop after the current batch. The second always exits at once, after
    killing the worker processes: committed windows are safe on disk; resume redoes the rest.
    """

    def __init__(self, console, log_format: str = "text") -> None:
        self.console = console
        self.log_format = log_format  # json: what a signal prints is a JSON line too (a machine reads stderr)
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
            self._say("error", f"Quit at once. {self.message}", exit_code=EXIT_RESUMABLE)
            os._exit(EXIT_RESUMABLE)
        self.requested = True
        if self.immediate:
            raise RunInterrupted(self.message)
        name = signal.Signals(signum).name
        if self.log_format == "json":
            self._say("stopping", "stopping after the current batch (signal again to quit at once)", signal=name)
            return
        self.console.print(
            f"[yellow]{name}: stopping after the current batch (press Ctrl-C again to quit at once)...[/]"
        )

    def _say(self, event: str, message: str, **fields: Any) -> None:
        """One line on stderr, written at once (a handler must not wait for a lock); JSON with --log-format json."""
        if self.log_format == "json":  # whole lines only: no blank line before it
            os.write(2, (json.dumps({"event": event, "message": message, **fields}) + "\n").encode())
        else:  # a new line first: a progress bar may hold the current one
            os.write(2, f"\n{message}\n".encode())

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
    """The coordinator of one run folder: prepares it, starts the writers, hands out windows, writes the summary.

    Scoring a window is the writers' (`writer.WindowScorer`); where they run is the executor's (`executors.py`,
    `ray_engine.py`); the loop that hands out windows is `coordinator.Coordinator`. Signals, progress and the
    summary are here, the same for every engine.
    """

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
        devices: list[str] | None = None,
    ) -> None:
        self.fresh = fresh  # a new start: a failed load puts the folder back, a loaded model drops any run replaced
        self.stop = stop
        self.recipe = recipe
        self.folder = folder
        self.source = source
        self.console = console
        self.devices = devices  # local devices, checked (`check_run`); None: the recipe's
        self.progress = RunProgress(
            recipe.name, console, source.total_rows, folder.root / "run.log", log_format, show=progress
        )
        self.rows_done = 0  # rows scored or failed in this session, committed or not
        self.executor: Any = None
        self.coordinator: Coordinator | None = None
        self.wait_for_every_writer = False  # hand out windows only once all have loaded (benchmarks)

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
        from annotator.models import is_hub_model

        m = self.recipe.model
        stop = self.stop or StopRequest(self.console)
        self.folder.clean_leftovers()  # before any writer starts: hidden files of writes that were cut short
        self.executor = self._executor()
        with stop, contextlib.closing(self.executor):
            stop.message = self._load_interrupted_message()
            stop.on_exit.append(self.executor.kill)  # a second Ctrl-C: no writer or worker outlives the process
            self.coordinator = Coordinator(
                self.executor, self.progress, stop, m.name, self._advance, self.folder.clean_leftovers
            )
            self.coordinator.describe_window = self._describe_window
            if self.executor.count > 1 or self.recipe.engine.kind == "ray":
                self.progress.writers_started(self.recipe.engine.kind, self.executor.count, self.executor.describe())
            self.progress.loading_model(m.name, from_hub=is_hub_model(m.name))
            self._start_writers(stop)
            committed = self._prepare_folder()
            self.progress.begin(committed.values())
            self.queue = WindowQueue(self._windows_to_do(committed))
            self.coordinator.begin(self.queue, self.progress.started_at)
            stop.message = self._interrupted_message()
            stop.immediate = False
            with self.progress:
                self.coordinator.run(self._interrupted_message())
        return self.finish()

    def _start_writers(self, stop: StopRequest) -> None:
        """Start the writers and wait for a loaded model. A new start whose model cannot load (an error, or a writer
        that dies loading it) leaves the folder as it was (the run it replaced is back); once one has loaded, the
        replaced run is deleted. A signal meanwhile leaves the new run, resumable."""
        try:
            self.coordinator.start_writers(stop.message, every=self.wait_for_every_writer)
        except Exception:
            if self.fresh and not stop.requested:
                undo_start(self.folder, self.folder.claimed or Claim())
            raise
        if self.fresh:
            drop_previous(self.folder)

    def _executor(self) -> Any:
        """The writers' executor: a thread, a process per device, or Ray actors; all get the same `WriterSpec`."""
        spec = self._writer_spec()
        if self.recipe.engine.kind == "ray":
            from annotator.ray_engine import RayExecutor

            return RayExecutor(spec, self.recipe.engine.ray)
        return local_executor(spec, self.devices if self.devices is not None else resolve_devices(self.recipe))

    def _writer_spec(self) -> WriterSpec:
        return WriterSpec(
            recipe=with_absolute_paths(self.recipe),
            root=str(self.folder.root.resolve()),
            owner=self.folder.owner_token,
            input_fingerprint=json.loads(json.dumps(self.source.fingerprint())),
            total_rows=self.source.total_rows,
            model_bars=self.progress.model_bars,
        )

    def _prepare_folder(self) -> dict[int, dict]:
        """A writer has loaded the model: grow a pilot if asked, read the journals. Writers touch the folder only once
        they are handed a window, which is after this."""
        if not self.fresh and self.recipe.input.limit != self.folder.manifest().get("limit"):
            grow(self.folder, self.recipe, self.source.total_rows)
        committed = self.folder.committed()
        write_run_card(self.folder, self.recipe)
        return committed

    def _windows_to_do(self, committed: dict[int, dict]) -> Iterable[int]:
        total = self.source.total_rows
        if total is None:
            return first_uncommitted(committed)  # a stream of unknown length: a writer finds its end
        return [index for index in range(-(-total // self.recipe.batching.window)) if index not in committed]

    def _describe_window(self, index: int) -> str:
        size, total = self.recipe.batching.window, self.source.total_rows
        last = (index + 1) * size if total is None else min((index + 1) * size, total)
        return f"Window {index} (rows {index * size} to {last - 1})"

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

    def _check_every_window(self, committed: dict[int, dict]) -> None:
        """The summary is written only when every window of the input has its journal record and its file."""
        total = self.source.total_rows
        count = -(-total // self.recipe.batching.window) if total is not None else self.queue.end
        missing = [index for index in range(count or 0) if index not in committed]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise RunInterrupted(
                f"{len(missing)} window(s) of {self.folder.root} are not committed ({shown}); run "
                f"`annotate resume {self.folder.root}` to do them."
            )

    def finish(self) -> dict[str, Any]:
        self.folder.clean_leftovers()  # no writer runs any more
        self._check_every_window(self.folder.committed())
        self.folder.lease.check()  # the summary only from the process that still holds the folder
        summary = summarize(self.folder)
        seconds = self.progress.seconds
        summary.update(
            {
                "finished": True,
                "output_dir": str(self.folder.root),
                "model": self.recipe.model.name,
                "device": ",".join(self.executor.label(i) for i in range(self.executor.count)),
                "engine": self.recipe.engine.kind,
                "writers": self.executor.count,
                "session_rows": self.progress.session_rows,
                "session_seconds": round(seconds, 3) if seconds is not None else None,
                "rows_per_s": self.progress.rate(seconds),
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


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe as a writer anywhere reads it: input, output and a local model folder by absolute path."""
    data = recipe.model_dump(mode="json")
    if data["input"]["parquet"] is not None:
        data["input"]["parquet"] = os.path.abspath(os.path.expanduser(data["input"]["parquet"]))
    if data["input"]["hf"] is not None:
        data["input"]["hf"]["path"] = _absolute_if_local(data["input"]["hf"]["path"])
    data["model"]["name"] = _absolute_if_local(data["model"]["name"])
    data["output"]["dir"] = os.path.abspath(recipe.output_dir)
    return Recipe.model_validate(data)


def _absolute_if_local(name: str) -> str:
    """A local path (`~` expanded) made absolute; a Hub name as it is."""
    path = os.path.expanduser(name)
    return os.path.abspath(path) if os.path.exists(path) else name


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
    # From the first instant: a signal exits 2, never a half-written folder.
    with StopRequest(console, log_format) as stop:
        recipe = load_recipe(recipe_path, overrides)
        folder, source = prepare_run(recipe, overwrite)
        annotator = Annotator(recipe, folder, source, console, progress, fresh=True, log_format=log_format, stop=stop)
        return annotator.run()


def resume_run(
    output_dir: str | None, overrides: list[str], console, progress: bool = True, log_format: str = "text"
) -> dict:
    with StopRequest(console, log_format) as stop:
        root = Path(output_dir) if output_dir else find_latest_unfinished()
        recipe, folder, source = prepare_resume(root, overrides)
        fresh = folder.claimed is not None  # stopped before its manifest: started again
        annotator = Annotator(recipe, folder, source, console, progress, fresh=fresh, log_format=log_format, stop=stop)
        return annotator.run()
