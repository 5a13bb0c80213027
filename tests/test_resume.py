"""Crash safety: kill -9 / Ctrl-C / SIGTERM at any instant, then `annotate resume`, gives the uninterrupted output."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from annotator.cli import app
from tests.conftest import (
    Pause,
    counting_planned_rows,
    journal_lines,
    journals,
    jpeg_bytes,
    keep_first_windows,
    read_output,
    use_writer_hooks,
    write_dataset,
    write_recipe,
)

runner = CliRunner()
ROWS = 120


def annotate(*args: str | Path) -> subprocess.Popen:
    """`annotate ...` in its own process, as a user would start it."""
    command = [sys.executable, "-c", "from annotator.cli import main; main()", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    sizes = [(320, 240), (240, 320), (400, 120), (280, 280), (360, 240)]
    images = [jpeg_bytes(*sizes[i % len(sizes)], seed=i) for i in range(ROWS)]
    captions = [f"caption number {i} " + "word " * (i % 7) for i in range(ROWS)]
    return write_dataset(tmp_path_factory.mktemp("input") / "in.parquet", images, captions)


def make_recipe(folder: Path, dataset: Path, name: str, **batching) -> Path:
    return write_recipe(
        folder / f"{name}.yaml",
        dataset,
        folder / name,
        model={"max_pixels": 28 * 28 * 64},  # large enough that a window takes a killable while
        batching={"window": 6, "max_batch_size": 4, "workers": 0, **batching},
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, dataset, tiny_model_cache) -> Path:
    """The folder of an uninterrupted run, made once for the module."""
    folder = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANNOTATOR_CACHE", str(tiny_model_cache))
        assert invoke("run", make_recipe(folder, dataset, "reference"), "--no-progress").exit_code == 0
    return folder / "reference"


@pytest.fixture(scope="module")
def reference(reference_run):
    return read_output(reference_run)


def assert_same_output(output: Path, reference) -> None:
    table = read_output(output)
    assert table.column("row_id").to_pylist() == list(range(ROWS)), "every row once, in order"
    assert table.column("prob").to_pylist() == reference.column("prob").to_pylist()
    assert table.column("caption").to_pylist() == reference.column("caption").to_pylist()
    assert not [p for p in (output / "data").iterdir() if p.name.startswith((".", "_"))]
    assert json.loads((output / "summary.json").read_text())["rows"] == ROWS


def wait_until(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.mark.slow
def test_kill_9_from_the_first_instant_to_the_last_commit_then_resume_is_exact(
    tmp_path, dataset, reference, monkeypatch
):
    """kill -9 in the first 100 ms, while starting up, right after the manifest (the model loading), after some
    commits and around the last one; each time `annotate resume` (or `run` again when the folder holds no recipe
    yet) goes on. The result is the uninterrupted run's, row for row and bit for bit."""
    # Each window takes half a second more to read (one after the other): the run is still going at the first four
    # instants on any machine, the latest being 2 s after its start (its 5 windows take 2.5 s) or 0.05 s after its
    # second commit (window 4 takes 0.5 s still). Only the kill around the last commit may come too late.
    use_writer_hooks(monkeypatch, SCALEOUT_WINDOW_DELAY="0.5")
    rng = random.Random(11)
    limit = 30  # 5 windows of 6
    output = tmp_path / "killed"
    recipe = make_recipe(tmp_path, dataset, "killed")
    last = limit // 6
    instants = [
        ("first 100 ms", lambda: True, rng.uniform(0, 0.1)),
        ("starting up", lambda: True, rng.uniform(0.3, 2.0)),
        ("model loading", lambda: (output / "manifest.json").exists(), rng.uniform(0, 0.2)),
        ("after 2 commits", lambda: journal_lines(output) >= 2, rng.uniform(0, 0.05)),
        ("around the last commit", lambda: journal_lines(output) >= last - 1, rng.uniform(0, 0.1)),
    ]
    killed = []
    for when, ready, delay in instants:
        started_with = "resume" if (output / "recipe.yaml").exists() else "run"
        args = ("resume", output) if started_with == "resume" else ("run", recipe, "--limit", limit)
        process = annotate(*args, "--no-progress")
        wait_until(ready, process)
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed.append((when, started_with))
        out, _ = process.communicate(timeout=120)
        assert process.returncode in (0, -signal.SIGKILL), out
        if (output / "summary.json").exists():
            break
    assert len(killed) >= 4, killed
    if not (output / "summary.json").exists():
        finish = annotate("resume", output, "--no-progress")
        out, _ = finish.communicate(timeout=300)
        assert finish.returncode == 0, out
    table = read_output(output)
    assert table.column("row_id").to_pylist() == list(range(limit)), "every row once, in order"
    assert table.column("prob").to_pylist() == reference.column("prob").to_pylist()[:limit], "bit-identical"
    assert table.column("caption").to_pylist() == reference.column("caption").to_pylist()[:limit]
    assert not [p for p in (output / "data").iterdir() if p.name.startswith((".", "_"))]
    assert not (output / ".previous-run").exists() and not (output / "lock").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume(tmp_path, dataset, reference, signum, monkeypatch):
    output = tmp_path / "interrupted"
    # The writer waits before committing window 2 until the signal comes: two windows are committed, the run is
    # under way and far from its end, on any machine.
    pause = Pause(monkeypatch, tmp_path, window=2).hold()
    process = annotate("run", make_recipe(tmp_path, dataset, "interrupted"), "--no-progress")
    try:
        pause.writer(process)
        assert journal_lines(output) == 2
        process.send_signal(signum)
        out, _ = process.communicate(timeout=120)
    finally:
        pause.release()
    assert process.returncode == 2, out
    assert f"annotate resume {output}" in out.replace("\n", "")
    assert not (output / "lock").exists()
    status = json.loads(invoke("status", output, "--json").output)
    assert status["state"] == "interrupted" and status["next"] == f"annotate resume {output}"
    assert 0 < status["rows_done"] < ROWS
    assert invoke("resume", output, "--no-progress").exit_code == 0
    assert_same_output(output, reference)


def interrupted_copy(run: Path, destination: Path, keep_windows: int) -> Path:
    """A copy of a finished run turned into one that stopped after `keep_windows` windows."""
    shutil.copytree(run, destination)
    (destination / "summary.json").unlink()
    keep_first_windows(destination, keep_windows)
    return destination


def test_resume_refuses_changed_input(tmp_path, dataset):
    own = tmp_path / "in.parquet"
    shutil.copy(dataset, own)
    recipe = make_recipe(tmp_path, own, "changed")
    assert invoke("run", recipe, "--no-progress", "--limit", "12").exit_code == 0
    output = interrupted_copy(tmp_path / "changed", tmp_path / "partial", keep_windows=1)
    table = pq.read_table(own)
    pq.write_table(table.slice(1).append_column("extra", [list(range(ROWS - 1))]), own)
    result = invoke("resume", output, "--no-progress")
    assert result.exit_code == 1 and "input has changed" in result.output


def test_resume_notices_an_edit_in_place_that_keeps_the_size_and_the_footer(tmp_path, dataset):
    from annotator.sources import _footer_hash

    own = tmp_path / "in.parquet"
    shutil.copy(dataset, own)
    assert invoke("run", make_recipe(tmp_path, own, "edited"), "--no-progress", "--limit", "12").exit_code == 0
    output = interrupted_copy(tmp_path / "edited", tmp_path / "partial", keep_windows=1)
    footer, size = _footer_hash(own), own.stat().st_size
    time.sleep(0.01)
    with open(own, "r+b") as f:  # one byte of a data page, far from the footer
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert (_footer_hash(own), own.stat().st_size) == (footer, size)
    result = invoke("resume", output, "--no-progress")
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "was modified (its time changed)" in message and "touch -d @" in message


@pytest.mark.parametrize(
    "override",
    ["model.max_pixels=3136", "prompt.question=is {text} here?", "prompt.system=Be terse.", "model.name=other"],
)
def test_resume_refuses_result_changing_overrides(tmp_path, dataset, reference_run, override):
    output = interrupted_copy(reference_run, tmp_path / "partial", keep_windows=3)
    result = invoke("resume", output, "--set", override, "--set", "batching.max_batch_size=2", "--no-progress")
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "change results" in message
    assert f"--set {override.partition('=')[0]} would change" in message, "names the key, and only it"


def test_resume_names_a_hand_edited_recipe_that_changes_results(tmp_path, reference_run):
    output = interrupted_copy(reference_run, tmp_path / "partial", keep_windows=3)
    recipe = output / "recipe.yaml"
    edited = recipe.read_text().replace("system: You are a helpful assistant.", "system: Be terse.")
    assert edited != recipe.read_text()
    recipe.write_text(edited)
    result = invoke("resume", output, "--no-progress")
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "recipe.yaml that change results" in message and "was edited" in message
    assert len(read_output(output)) == 18, "nothing written"


def test_resume_accepts_a_changed_batch_size(tmp_path, dataset, reference_run, reference):
    output = interrupted_copy(reference_run, tmp_path / "partial", keep_windows=3)
    result = invoke(
        "resume",
        output,
        "--set",
        "batching.max_batch_size=1",
        "--set",
        "batching.max_batch_tokens=999",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    table = read_output(output)
    assert table.column("row_id").to_pylist() == list(range(ROWS))
    for got, want in zip(table.column("prob").to_pylist(), reference.column("prob").to_pylist(), strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_resume_refuses_a_changed_window(tmp_path, dataset, reference_run):
    output = interrupted_copy(reference_run, tmp_path / "partial", keep_windows=3)
    result = invoke("resume", output, "--set", "batching.window=7", "--no-progress")
    assert result.exit_code == 1 and "batching.window" in result.output


def test_hidden_leftovers_and_torn_journal_lines_are_cleaned(tmp_path, dataset, reference_run, reference):
    output = interrupted_copy(reference_run, tmp_path / "partial", keep_windows=4)
    leftover = output / "data" / ".part-000004.parquet.999.tmp"
    leftover.write_bytes(b"PAR1 half a file")
    (journal_path,) = journals(output)
    with open(journal_path, "a") as journal:
        journal.write('{"window": 4, "rows"')  # killed mid-append
    assert invoke("resume", output, "--no-progress").exit_code == 0
    assert not leftover.exists()
    assert_same_output(output, reference)


def test_resume_skips_committed_windows_without_reading_their_images(
    tmp_path, dataset, reference_run, monkeypatch, reference
):
    output = interrupted_copy(reference_run, tmp_path / "partial", keep_windows=15)
    seen = counting_planned_rows(monkeypatch)
    assert invoke("resume", output, "--no-progress").exit_code == 0
    assert sum(seen) == ROWS - 15 * 6
    assert_same_output(output, reference)


def test_default_resume_picks_the_latest_unfinished_run(tmp_path, dataset, reference_run, monkeypatch, reference):
    output = interrupted_copy(reference_run, tmp_path / "partial", keep_windows=2)
    os.makedirs("outputs", exist_ok=True)
    target = Path("outputs") / "partial"
    output.rename(target)
    assert json.loads(invoke("status", "--json").output)["output_dir"] == str(target)
    assert invoke("resume", "--no-progress").exit_code == 0
    assert_same_output(target, reference)


def test_run_into_an_unfinished_folder_points_to_resume(tmp_path, dataset, reference_run):
    partial = interrupted_copy(reference_run, tmp_path / "partial", keep_windows=2)
    recipe = write_recipe(tmp_path / "r.yaml", dataset, partial)
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 1 and "annotate resume" in result.output


def test_a_live_lock_blocks_a_second_writer(tmp_path, dataset, reference_run):
    from annotator.lease import HOST, Lease

    output = interrupted_copy(reference_run, tmp_path / "partial", keep_windows=2)
    with Lease(output / "lock"):
        result = invoke("resume", output, "--no-progress")
        message = " ".join(result.output.split())
        assert result.exit_code == 1 and f"is in use: held by pid {os.getpid()} on {HOST} until" in message
        status = json.loads(invoke("status", output, "--json").output)
        assert status["state"] == "running" and f"held by pid {os.getpid()}" in status["lock"]


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path, dataset, reference_run, reference):
    from tests.test_lease import dead_pid, write_holder

    output = interrupted_copy(reference_run, tmp_path / "partial", keep_windows=2)
    write_holder(output / "lock", pid=dead_pid())
    assert json.loads(invoke("status", output, "--json").output)["state"] == "interrupted"
    assert invoke("resume", output, "--no-progress").exit_code == 0
    assert_same_output(output, reference)


def test_a_write_failure_is_resumable_and_leaves_nothing_half_written(tmp_path, dataset, monkeypatch, reference):
    import annotator.sink

    output = tmp_path / "diskfull"
    original = annotator.sink.pq.write_table
    calls = []

    def disk_full_on_third(table, where, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            where.write(b"partial bytes")
            raise OSError(28, "No space left on device")
        return original(table, where, **kwargs)

    monkeypatch.setattr(annotator.sink.pq, "write_table", disk_full_on_third)
    result = invoke("run", make_recipe(tmp_path, dataset, "diskfull"), "--no-progress")
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert sorted(p.name for p in (output / "data").iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    monkeypatch.setattr(annotator.sink.pq, "write_table", original)
    assert invoke("resume", output, "--no-progress").exit_code == 0
    assert_same_output(output, reference)


QUESTIONS = {"text": "Related to {text}?", "cat": "A cat?", "kind": {"question": "Which?", "answers": ["A", "B"]}}


@pytest.fixture(scope="module")
def questions_run(tmp_path_factory, dataset, tiny_model_cache) -> Path:
    """A finished run of three questions over the first 12 rows (two windows)."""
    folder = tmp_path_factory.mktemp("questions")
    recipe = write_recipe(
        folder / "q.yaml",
        dataset,
        folder / "run",
        prompt={"questions": QUESTIONS},
        output={"thresholds": {"cat": 0.4}},
        batching={"window": 6, "max_batch_size": 4, "workers": 0},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANNOTATOR_CACHE", str(tiny_model_cache))
        assert invoke("run", recipe, "--no-progress", "--limit", "12").exit_code == 0
    return folder / "run"


@pytest.mark.parametrize(
    "override",
    [
        "prompt.questions.cat.question=A dog?",
        "prompt.questions.dog=A dog?",
        "prompt.questions.kind.answers=[B, A]",
        "output.thresholds.cat=0.5",
        "prompt.questions.text=Related to {text}, really?",
        "prompt.positive=y",
    ],
)
def test_resume_refuses_a_changed_question_set(tmp_path, questions_run, override):
    output = interrupted_copy(questions_run, tmp_path / "partial", keep_windows=1)
    result = invoke("resume", output, "--set", override, "--no-progress")
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and f"--set {override.partition('=')[0]} would change results" in message
    assert len(read_output(output)) == 6, "nothing written"


def test_a_resumed_run_of_questions_equals_the_uninterrupted_one(tmp_path, questions_run):
    output = interrupted_copy(questions_run, tmp_path / "partial", keep_windows=1)
    result = invoke("resume", output, "--no-progress")
    assert result.exit_code == 0, result.output
    assert read_output(output).equals(read_output(questions_run))
    summary = json.loads((output / "summary.json").read_text())
    assert summary["questions"] == json.loads((questions_run / "summary.json").read_text())["questions"]
