"""Progress: one parseable line (text or JSON) per committed window off a terminal, run.log, one rate everywhere."""

from __future__ import annotations

import io
import json
import re
import time
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from annotator.cli import app
from annotator.progress import RunProgress, format_duration
from tests.conftest import keep_first_windows, read_output, write_recipe

runner = CliRunner()
LINE = re.compile(r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) \[(?P<run>[^\]]+)\] (?P<event>\w+)(?P<rest>.*)$")
PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse(line: str) -> dict[str, str]:
    match = LINE.match(line)
    assert match, f"not a log line: {line!r}"
    return {"event": match["event"], "run": match["run"], **dict(PAIR.findall(match["rest"]))}


def window_lines(text: str) -> list[dict[str, str]]:
    return [fields for fields in map(parse, text.splitlines()) if fields["event"] == "window"]


@pytest.fixture
def recipe(tmp_path, mixed_parquet):
    return write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", batching={"window": 4, "workers": 0})


@pytest.fixture
def slow_clock(monkeypatch) -> None:
    """The run's clock moves a quarter of a second at each reading: numbers that should come from one reading but
    come from two disagree, on any machine (not only when the process is descheduled between the two)."""
    import annotator.progress

    ticks = iter(range(10**9))
    start = time.monotonic()
    clock = {name: getattr(time, name) for name in ("time", "strftime", "localtime")}
    monkeypatch.setattr(annotator.progress, "time", SimpleNamespace(**clock, monotonic=lambda: start + next(ticks) / 4))


def test_off_a_terminal_each_committed_window_is_one_parseable_line(tmp_path, recipe, slow_clock):
    result = runner.invoke(app, ["run", str(recipe)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    events = [parse(line)["event"] for line in result.stderr.splitlines()]
    assert events == ["loading", "loaded", "scoring", "window", "window", "window", "window", "finished"]
    windows = window_lines(result.stderr)
    assert [w["window"] for w in windows] == ["0", "1", "2", "3"]
    assert [w["rows"] for w in windows] == ["4/16", "8/16", "12/16", "16/16"]
    assert windows[-1]["done"] == "100.0%" and windows[-1]["eta"] == "0:00:00"
    table = read_output(tmp_path / "out")
    kept = sum(table.column("label").to_pylist()) / 16
    assert windows[-1]["kept"] == f"{kept:.1%}" and windows[-1]["errors"] == "0"
    assert all(float(w["rows_per_s"]) > 0 for w in windows)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_per_s"] == pytest.approx(summary["session_rows"] / summary["session_seconds"], rel=0.01)
    assert "pairs_per_s" not in summary and summary["session_rows"] == 16
    log = (tmp_path / "out" / "run.log").read_text()
    assert len(window_lines(log)) == 4 and "loading model=tiny" in log, "run.log has the same lines"
    assert "prob    0 " in result.stdout and "(threshold)" in result.stdout, "the histogram after the run"


def test_json_log_lines_parse_and_carry_the_numbers(tmp_path, recipe):
    result = runner.invoke(app, ["run", str(recipe), "--log-format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stderr.splitlines()]
    windows = [e for e in events if e["event"] == "window"]
    assert [e["event"] for e in events if e["event"] != "window"] == ["loading", "loaded", "scoring", "finished"]
    assert [w["rows_done"] for w in windows] == [4, 8, 12, 16] and {w["total_rows"] for w in windows} == {16}
    assert all(w["rows_per_s"] > 0 and w["run"] == "test" and isinstance(w["time"], float) for w in windows)
    assert windows[-1]["eta_s"] == 0 and windows[-1]["kept"] == sum(read_output(tmp_path / "out")["label"].to_pylist())
    assert windows[-1]["kept_share"] == round(windows[-1]["kept"] / 16, 4)
    again = runner.invoke(app, ["run", str(recipe), "--log-format", "json"])
    assert again.exit_code == 1, "the folder holds a finished run"
    assert json.loads(again.stderr.strip())["event"] == "error", "an error is a JSON line too"


def test_resume_appends_a_session_to_run_log_and_quiet_mode_prints_no_line(tmp_path, recipe):
    import shutil

    assert runner.invoke(app, ["run", str(recipe), "--no-progress"]).exit_code == 0
    out = tmp_path / "out"
    (out / "summary.json").unlink()
    keep_first_windows(out, 2)
    shutil.copy(out / "run.log", tmp_path / "first.log")
    result = runner.invoke(app, ["resume", str(out), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0 and "window=" not in result.stderr
    log = (out / "run.log").read_text()
    assert log.startswith((tmp_path / "first.log").read_text())
    second = [parse(line) for line in log.splitlines()[len((tmp_path / "first.log").read_text().splitlines()) :]]
    assert [s["event"] for s in second] == ["loading", "loaded", "scoring", "window", "window", "finished"]
    assert second[2]["rows"] == "8/16" and second[-1]["rows"] == "16/16"


def test_the_bar_on_a_terminal_shows_the_same_numbers(tmp_path):
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160)
    progress = RunProgress("demo", console, 100, tmp_path / "run.log")
    assert progress.mode == "bar"
    progress.loading_model("tiny")
    progress.begin([{"rows": 10, "scored": 9, "errors": 1, "positives": 4}])
    with progress:
        progress.rows_advanced(5, 0)
        time.sleep(0.05)
        progress.window_committed({"window": 1, "rows": 10, "scored": 10, "errors": 0, "positives": 6})
    progress.close()
    text = screen.getvalue()
    assert "rows/s" in text and "ETA" in text and "kept 50.0%" in text and "20/100" in text
    before = progress.seconds
    snapshot = progress.snapshot()
    after = progress.seconds
    assert snapshot["rows_done"] == 20 and snapshot["kept_share"] == 0.5
    assert 10 / after - 0.001 <= snapshot["rows_per_s"] <= 10 / before + 0.001, "the session's 10 rows per second"
    log = [parse(line) for line in (tmp_path / "run.log").read_text().splitlines()]
    assert [entry["event"] for entry in log] == ["loading", "scoring", "window"], "the bar hides nothing from run.log"


@pytest.mark.parametrize(("seconds", "text"), [(None, "-"), (0, "0:00:00"), (3725.4, "1:02:05"), (90061, "1d 1:01:01")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
