"""Progress: run events (model loading, rows scored, a window committed) as the bar, log lines and run.log.

One place computes the numbers, whoever schedules the windows: `rows_per_s` is the rows committed in this
session (errors included) per wall second since the model finished loading; the ETA is the rows left at that
rate; `kept` is the share of committed rows labelled positive (a row with an error is never kept).
On a terminal they show in a bar; otherwise (nohup, Slurm, Kubernetes) as one line per committed window, text
or JSON (`--log-format json`). The run folder's `run.log` gets the text lines in every case.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def _value(value: Any) -> str:
    """A logfmt value: bare when it has no space or quote, else JSON-quoted."""
    if isinstance(value, float):
        text = f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"  # 0.0042 rows/s stays readable
    else:
        text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=') else text


class RunProgress:
    """Counts of a run folder as windows commit, shown on `console` and appended to `log_path`.

    `mode` is `bar` (a terminal), `lines` (one text or JSON line per event on stderr) or `quiet`.
    Thread-safe: windows may be committed on another thread than the one scoring.
    """

    def __init__(
        self,
        name: str,
        console: Any,
        total_rows: int | None,
        log_path: Path | None = None,
        log_format: str = "text",
        show: bool = True,
    ) -> None:
        self.name = name
        self.console = console
        self.total_rows = total_rows
        self.log_path = log_path
        self.log_format = log_format
        if not show:
            self.mode = "quiet"
        elif log_format == "text" and console.is_terminal:
            self.mode = "bar"
        else:
            self.mode = "lines"
        self._lock = threading.Lock()
        self._pending_log: list[str] = []  # lines written before the run folder is started
        self._log: TextIO | None = None
        self._bar = None
        self._task = None
        self.rows_done = self.scored = self.errors = self.positives = 0
        self.labelled = False  # the one Y/N question's labels: a run of several questions or of answers has none
        self.session_rows = 0
        self.live_rows = self.live_errors = 0  # rows scored or failed so far, committed or not (the bar)
        self.started_at: float | None = None  # wall clock, for the journal and `status`
        self._started: float | None = None  # monotonic

    # --- events -----------------------------------------------------------------------------------

    def loading_model(self, model: str, from_hub: bool = False) -> None:
        self._emit("loading", model=model, source="hub" if from_hub else "local")

    def model_loaded(self, model: str, device: Any, dtype: Any, seconds: float) -> None:
        self._emit("loaded", model=model, device=str(device), dtype=str(dtype).removeprefix("torch."), seconds=seconds)

    def begin(self, committed: Iterable[dict[str, Any]]) -> None:
        """The run folder is ready and scoring starts: counts of the windows already committed, clock at zero."""
        for record in committed:
            self._count(record)
        self.live_rows, self.live_errors = self.rows_done, self.errors
        if self.log_path is not None:
            try:
                self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
                self._log.writelines(self._pending_log)
                self._log.flush()
            except OSError:
                self._log = None
        self._pending_log.clear()
        self.started_at, self._started = time.time(), time.monotonic()
        self._emit("scoring", rows=self._rows_text(), to_do=self._rows_left())

    def rows_advanced(self, scored: int, errors: int) -> None:
        """Rows scored (or failed) in a batch, not yet committed: moves the bar only."""
        with self._lock:
            self.live_rows += scored + errors
            self.live_errors += errors
            if self._bar is not None:
                self._bar.update(self._task, completed=self.live_rows)

    def window_committed(self, record: dict[str, Any]) -> None:
        """A window's file and journal line are on disk: count it and report it."""
        with self._lock:
            self._count(record)
            self.session_rows += record["rows"]
            self.live_rows = max(self.live_rows, self.rows_done)
            if self._bar is not None:
                self._bar.update(self._task, completed=self.live_rows)
            snapshot = self.snapshot()
            fields = {
                "window": record["window"],
                "rows": self._rows_text(),
                "done": f"{snapshot['done_share']:.1%}" if snapshot["done_share"] is not None else None,
                "rows_per_s": snapshot["rows_per_s"],
                "eta": format_duration(snapshot["eta_s"]),
                "kept": f"{snapshot['kept_share']:.1%}" if snapshot["kept_share"] is not None else None,
                "errors": self.errors,
            }
            self._emit_locked("window", fields, {"window": record["window"], **snapshot})

    def finished(self, summary: dict[str, Any]) -> None:
        self._emit(
            "finished",
            rows=self._rows_text(),
            rows_per_s=summary.get("rows_per_s"),
            seconds=summary.get("session_seconds"),
            kept=f"{self.positives / self.rows_done:.1%}" if self.rows_done and self.labelled else None,
            errors=self.errors,
        )

    def writers_started(self, engine: str, count: int, detail: str) -> None:
        """Several writers (processes or Ray actors) are starting; `detail` says on what."""
        self._emit("writers", engine=engine, count=count, on=detail)

    def writer_died(self, writer: str, how: str, windows: list[int]) -> None:
        """A writer (one of several) died: the windows it held go to the others."""
        self._emit("writer_died", writer=writer, how=how, requeued=",".join(map(str, windows)) or None)

    def note(self, writer: str, message: str) -> None:
        """Something a writer wants said that changes nothing (images through pipes, not shared memory)."""
        self._emit("note", writer=writer, message=message)

    def stopped(self, reason: str) -> None:
        self._emit("stopped", rows=self._rows_text(), reason=reason)

    @property
    def model_bars(self) -> str:
        """Which of the model loading's own progress bars fit this output (see `models.load_model`)."""
        if self.mode == "bar":
            return "all"
        return "downloads" if self.mode == "lines" and self.log_format == "text" else "none"

    # --- numbers ----------------------------------------------------------------------------------

    @property
    def seconds(self) -> float | None:
        return None if self._started is None else time.monotonic() - self._started

    @property
    def rows_per_s(self) -> float | None:
        return self.rate(self.seconds)

    def rate(self, seconds: float | None) -> float | None:
        """Rows committed this session per second over its first `seconds`: numbers shown together come from one
        reading of the clock (the summary's rows_per_s is its session_rows over its session_seconds)."""
        return round(self.session_rows / seconds, 3) if seconds else None

    def snapshot(self) -> dict[str, Any]:
        """The numbers every view shows, computed here only."""
        rate = self.rows_per_s
        left = self._rows_left()
        return {
            "rows_done": self.rows_done,
            "total_rows": self.total_rows,
            "done_share": round(self.rows_done / self.total_rows, 4) if self.total_rows else None,
            "scored": self.scored,
            "errors": self.errors,
            "kept": self.positives if self.labelled else None,
            "kept_share": round(self.positives / self.rows_done, 4) if self.rows_done and self.labelled else None,
            "rows_per_s": rate,
            "eta_s": round(left / rate, 1) if rate and left is not None else None,
        }

    def _count(self, record: dict[str, Any]) -> None:
        self.rows_done += record["rows"]
        self.scored += record["scored"]
        self.errors += record["errors"]
        self.positives += record.get("positives", 0)
        self.labelled = self.labelled or "positives" in record

    def _rows_left(self) -> int | None:
        return None if self.total_rows is None else max(0, self.total_rows - self.rows_done)

    def _rows_text(self) -> str:
        return f"{self.rows_done}/{self.total_rows if self.total_rows is not None else '?'}"

    # --- output -----------------------------------------------------------------------------------

    def _emit(self, event: str, **fields: Any) -> None:
        with self._lock:
            self._emit_locked(event, fields, fields)

    def _emit_locked(self, event: str, text_fields: dict[str, Any], json_fields: dict[str, Any]) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))
        pairs = " ".join(f"{k}={_value(v)}" for k, v in text_fields.items() if v is not None)
        text = f"{stamp} [{self.name}] {event} {pairs}".rstrip()
        if self._log is not None:
            try:
                self._log.write(text + "\n")
                self._log.flush()
            except OSError:  # a full disk stops the run at its next window write, with the reason; not here
                self._log = None
        elif self._started is None:
            self._pending_log.append(text + "\n")
        if self.mode == "quiet":
            return
        if self.mode == "bar":
            message = _on_terminal(event, text_fields)
            if message:
                self.console.print(message, highlight=False, soft_wrap=True, markup=False)
            return
        if self.log_format == "json":
            text = json.dumps({"time": round(now, 3), "run": self.name, "event": event, **json_fields})
        stream: TextIO = getattr(self.console, "file", None) or sys.stderr
        stream.write(text + "\n")  # never wrapped: one event, one line
        stream.flush()

    def __enter__(self) -> RunProgress:
        if self.mode == "bar":
            self._bar = _rich_bar(self)
            self._task = self._bar.add_task(self.name, total=self.total_rows, completed=self.live_rows)
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _on_terminal(event: str, fields: dict[str, Any]) -> str | None:
    """What a person at a terminal reads for an event; the bar shows windows, the summary shows the end."""
    if event == "loading":
        download = (
            " (the first time, it is downloaded into the Hugging Face cache)" if fields["source"] == "hub" else ""
        )
        return f"Loading model {fields['model']}{download}..."
    if event == "loaded":
        return f"Model loaded in {fields['seconds']:.1f} s on {fields['device']} ({fields['dtype']})."
    if event == "writers":
        return f"Starting {fields['count']} writers ({fields['engine']}): {fields['on']}."
    if event == "writer_died":
        again = f"; windows {fields['requeued']} go to the other writers" if fields.get("requeued") else ""
        return f"The writer on {fields['writer']} died ({fields['how']}){again}."
    if event == "note":
        return f"{fields['writer']}: {fields['message']}"
    if event == "scoring":
        done = fields["rows"].split("/")[0]
        return f"Scoring ({done} rows were done before)." if done != "0" else "Scoring."
    return None


def _rich_bar(progress: RunProgress):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
    from rich.text import Text

    class NumbersColumn(ProgressColumn):
        """rows_per_s, ETA, kept and errors from the one snapshot; redrawn live, so a stall shows."""

        def render(self, task) -> Text:
            s = progress.snapshot()
            rate = f"{s['rows_per_s']:,.1f} rows/s" if s["rows_per_s"] else "- rows/s"
            kept = f"kept {s['kept_share']:.1%}" if s["kept_share"] is not None else "kept -"
            text = Text(f"{rate}  ETA {format_duration(s['eta_s'])}  {kept}  ")
            text.append(f"{progress.live_errors} errors", style="red" if progress.live_errors else "dim")
            return text

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        NumbersColumn(),
        console=progress.console,
        transient=False,
    )
