"""Run: the coordinator of a run folder (checks, resume, signals, progress, summary); writers do the scoring."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from annotator import __version__
from annotator.card import input_card, write_run_card
from annotator.coordinator import Coordinator, WindowQueue, first_uncommitted
from annotator.errors import EXIT_RESUMABLE, AnnotatorError, RunInterrupted
from annotator.executors import local_executor
from annotator.progress import RunProgress
from annotator.recipe import Recipe, frozen_recipe_yaml, load_recipe, merge, parse_overrides, validate_recipe
from annotator.scores import JOURNAL_BINS, add, histogram
from annotator.sink import RunFolder, latest_run
from annotator.sources import open_source
from annotator.writer import WriterSpec

RESULT_KEYS_HINT = "model, prompt, pixels, answers, input columns, threshold"


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
    check_engine(recipe)
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
        devices: list[str] | None = None,
    ) -> None:
        self.fresh = fresh  # a new run: the folder is (re)started once a writer has loaded the model
        self.recipe = recipe
        self.folder = folder
        self.source = source
        self.console = console
        self.devices = devices if devices is not None else check_engine(recipe)
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
        self.executor = self._executor()
        with StopRequest(self.console) as stop, contextlib.closing(self.executor):
            forget = self.folder.clean_leftovers
            self.coordinator = Coordinator(self.executor, self.progress, stop, m.name, self._advance, forget)
            self.coordinator.describe_window = self._describe_window
            if self.executor.count > 1 or self.recipe.engine.kind == "ray":
                self.progress.writers_started(self.recipe.engine.kind, self.executor.count, self.executor.describe())
            self.progress.loading_model(m.name, from_hub=is_hub_model(m.name))
            again = f"annotate resume {self.folder.root}" if not self.fresh else "the same `annotate run` command"
            self.coordinator.start_writers(
                f"Interrupted while loading the model, before this session wrote anything to {self.folder.root}. "
                f"To go on, run {again} again.",
                every=self.wait_for_every_writer,
            )
            committed = self._prepare_folder()
            self.progress.begin(committed.values())
            self.queue = WindowQueue(self._windows_to_do(committed))
            self.coordinator.begin(self.queue, self.progress.started_at)
            with self.progress:
                self.coordinator.run(self._interrupted_message())
        return self.finish()

    def _executor(self) -> Any:
        """The writers' executor: a thread, a process per device, or Ray actors; all get the same `WriterSpec`."""
        spec = self._writer_spec()
        if self.recipe.engine.kind == "ray":
            from annotator.ray_engine import RayExecutor

            return RayExecutor(spec, self.recipe.engine.ray)
        return local_executor(spec, self.devices)

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
        """A writer has loaded the model: start (or grow) the folder, clean what killed writes left, read the journals.

        Writers touch the folder only once they are handed a window, which is after this.
        """
        if self.fresh:
            start_fresh(self.recipe, self.folder, self.source)
        elif self.recipe.input.limit != self.folder.manifest().get("limit"):
            grow(self.folder, self.recipe, self.source.total_rows)
        self.folder.clean_leftovers()
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


def check_engine(recipe: Recipe) -> list[str]:
    """The engine's checks, before anything is written: local devices that exist, or a Ray that can place the writers.
    Returns the local devices."""
    if recipe.engine.kind == "ray":
        from annotator.ray_engine import connect

        connect(recipe.engine.ray)  # joins or starts Ray, plans the actors
        return []
    from annotator.executors import resolve_devices

    return resolve_devices(recipe)


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe as a writer anywhere reads it: input, output and a local model folder by absolute path."""
    data = recipe.model_dump(mode="json")
    if data["input"]["parquet"] is not None:
        data["input"]["parquet"] = os.path.abspath(data["input"]["parquet"])
    if data["input"]["hf"] is not None and os.path.exists(data["input"]["hf"]["path"]):
        data["input"]["hf"]["path"] = os.path.abspath(data["input"]["hf"]["path"])
    if os.path.exists(data["model"]["name"]):
        data["model"]["name"] = os.path.abspath(data["model"]["name"])
    data["output"]["dir"] = os.path.abspath(recipe.output_dir)
    return Recipe.model_validate(data)


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
    devices = check_engine(recipe)  # before anything is written
    folder, source = prepare_run(recipe, overwrite)
    return Annotator(recipe, folder, source, console, progress, True, log_format, devices).run()


def resume_run(
    output_dir: str | None, overrides: list[str], console, progress: bool = True, log_format: str = "text"
) -> dict:
    root = Path(output_dir) if output_dir else find_latest_unfinished()
    recipe, folder, source = prepare_resume(root, overrides)
    return Annotator(recipe, folder, source, console, progress, log_format=log_format).run()
