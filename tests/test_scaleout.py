"""Several writers on one machine (`--devices cpu,cpu`): the one-process output, byte for byte, also when a writer or
the coordinator is killed at any instant; a window that kills writers stops the run, named, and resume finishes it."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from annotator.cli import app
from annotator.coordinator import Coordinator
from tests.conftest import (
    SCALEOUT_ROWS,
    SCALEOUT_WINDOW,
    Pause,
    journal_lines,
    scaleout_recipe,
    use_writer_hooks,
)

runner = CliRunner()
ROWS, WINDOW = SCALEOUT_ROWS, SCALEOUT_WINDOW


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_same_output(output: Path, reference: Path) -> None:
    """Every data file byte for byte the reference's (so row ids in order and probs bit for bit), nothing hidden."""
    names = sorted(p.name for p in (reference / "data").iterdir())
    assert sorted(p.name for p in (output / "data").iterdir()) == names, "same files, no leftovers"
    for name in names:
        assert (output / "data" / name).read_bytes() == (reference / "data" / name).read_bytes(), name
    summary = json.loads((output / "summary.json").read_text())
    assert summary["rows"] == summary["scored"] == ROWS


def heartbeats(output: Path) -> list[dict]:
    beats = []
    for path in (output / "journal").glob("*.heartbeat.json") if (output / "journal").is_dir() else []:
        try:
            beats.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being replaced
    return beats


def running(pid: int) -> bool:
    """Whether a process runs (a zombie does not: it is dead, waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(condition, timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_two_cpu_writers_write_the_one_process_output(tmp_path, scaleout_input, scaleout_reference, monkeypatch):
    # Windows are handed out once both writers have loaded (as `bench` does), so that each is granted some: else one
    # that loads after the other has committed all 12 windows works for nothing and is, rightly, not listed.
    start_writers = Coordinator.start_writers
    monkeypatch.setattr(
        Coordinator, "start_writers", lambda self, interrupted, every=False: start_writers(self, interrupted, True)
    )
    result = invoke("run", scaleout_recipe(tmp_path, scaleout_input, "two"), "--no-progress", "--devices", "cpu,cpu")
    assert result.exit_code == 0, result.output
    output = tmp_path / "two"
    assert_same_output(output, scaleout_reference)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["writers"] == 2 and summary["device"] == "cpu,cpu" and summary["engine"] == "local"
    status = json.loads(invoke("status", output, "--json").output)
    assert [w["device"] for w in status["writers"]] == ["cpu", "cpu"]
    assert sum(w["windows"] for w in status["writers"]) == ROWS // WINDOW, "each window committed once"
    assert all(w["windows"] > 0 for w in status["writers"]), "both writers worked"
    assert {w["state"] for w in status["writers"]} == {"done"}


def test_writers_asking_several_questions_through_shared_memory_write_the_one_process_output(tmp_path, scaleout_input):
    """The writers' scoring path is the single process's: several questions per row, images through the ring."""
    prompt = {"questions": {"text": "Related to {text}?", "kind": {"question": "Which?", "answers": ["A", "B", "C"]}}}
    sections = {"prompt": prompt, "input": {"limit": 4 * WINDOW}}
    outputs = {}
    for name, devices in (("alone", []), ("writers", ["--devices", "cpu,cpu"])):
        recipe = scaleout_recipe(tmp_path, scaleout_input, name, **sections)
        result = invoke("run", recipe, "--no-progress", "--set", "batching.workers=1", *devices)
        assert result.exit_code == 0, result.output
        outputs[name] = tmp_path / name
    writers = json.loads((outputs["writers"] / "summary.json").read_text())
    assert writers["writers"] == 2 and writers["questions"]["text"]["positives"] >= 0
    names = sorted(p.name for p in (outputs["alone"] / "data").iterdir())
    assert names == sorted(p.name for p in (outputs["writers"] / "data").iterdir()) and len(names) == 4
    for name in names:
        assert (outputs["writers"] / "data" / name).read_bytes() == (outputs["alone"] / "data" / name).read_bytes()


def kill_the_paused_writer(pause: Pause, killed: list[int]) -> threading.Thread:
    """A thread that kills (SIGKILL) the writer paused before its commit, then lifts the pause for the others.

    The paused writer holds its window uncommitted (and the windows it read after it): the kill lands mid-run, on a
    writer with windows to lose, however fast the run goes (it cannot end without that window) or slow it starts.
    """

    def kill() -> None:
        try:
            killed.append(pause.writer())
            os.kill(killed[0], signal.SIGKILL)
        finally:
            pause.release()  # also when no writer came: the run goes on, and the test fails on `killed`

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_a_writer_killed_mid_run_is_replaced_and_the_output_is_the_same(
    tmp_path, scaleout_input, scaleout_reference, monkeypatch
):
    output, killed = tmp_path / "killed", []
    killer = kill_the_paused_writer(Pause(monkeypatch, tmp_path, window=2).hold(), killed)
    result = invoke("run", scaleout_recipe(tmp_path, scaleout_input, "killed"), "--no-progress", "--devices", "cpu,cpu")
    killer.join()
    assert result.exit_code == 0, result.output
    assert killed and not running(killed[0])
    log = (output / "run.log").read_text()
    assert "writer_died" in log and "killed by SIGKILL" in log, log
    assert_same_output(output, scaleout_reference)


def annotate(*args: str | Path) -> subprocess.Popen:
    """`annotate ...` as a user starts it: its own process group, like a job a scheduler kills whole."""
    command = [sys.executable, "-c", "from annotator.cli import main; main()", *map(str, args)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


@pytest.mark.slow
def test_ctrl_c_or_kill_9_of_the_coordinator_leaves_no_writer_behind_and_resume_is_exact(
    tmp_path, scaleout_input, scaleout_reference, monkeypatch
):
    # Each window takes half a second more, so that on any machine the three stops come before the run's 12 windows
    # are done (on a fast one the run could finish between the last check and the kill, and leave nothing to resume).
    use_writer_hooks(monkeypatch, SCALEOUT_WINDOW_DELAY="0.5")
    rng = random.Random(10)
    output = tmp_path / "coordinator"
    process = annotate(
        "run", scaleout_recipe(tmp_path, scaleout_input, "coordinator"), "--no-progress", "--devices", "cpu,cpu"
    )
    stops = ("ctrl-c", "kill -9 of the group", "kill -9 of the coordinator alone")
    for how in stops:
        target = journal_lines(output) + rng.randint(1, 2)
        wait_until(lambda t=target, p=process: journal_lines(output) >= t or p.poll() is not None, what="commits")
        time.sleep(rng.uniform(0, 0.1))
        assert process.poll() is None, "the run finished before it could be stopped; make it longer"
        writers = [b["pid"] for b in heartbeats(output)]
        assert writers, "writers report their pid"
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)  # a terminal sends it to the whole group; writers leave it to us
            out, _ = process.communicate(timeout=120)
            assert process.returncode == 2 and f"annotate resume {output}" in " ".join(out.split()), out
        elif how == "kill -9 of the group":
            os.killpg(process.pid, signal.SIGKILL)  # a scheduler killing the job
        else:
            os.kill(process.pid, signal.SIGKILL)  # the coordinator alone: its writers must stop by themselves
        process.wait()
        assert not (output / "summary.json").exists(), "the run finished before it was stopped; make it longer"
        wait_until(lambda w=writers: not any(running(pid) for pid in w), timeout=15, what="orphan writers to die")
        if how != stops[-1]:
            process = annotate("resume", output, "--no-progress", "--devices", "cpu,cpu")
    result = invoke("resume", output, "--no-progress")  # any engine resumes: here one writer in this process
    assert result.exit_code == 0, result.output
    assert_same_output(output, scaleout_reference)


def writer_processes(parent: int) -> list[int]:
    """The writer processes `parent` has started (spawned, so running multiprocessing's `spawn_main`)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            parent_pid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            spawned = b"spawn_main" in (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent_pid == parent and spawned:
            found.append(int(entry.name))
    return found


def test_ctrl_c_while_writers_start_is_a_stop_not_a_failed_device(tmp_path, scaleout_input):
    # Sent while the writer processes import their modules, before they can ignore it: they must not die of it (a
    # traceback of the interpreter's start-up, or a writer said to have died, where the user only pressed Ctrl-C).
    output = tmp_path / "starting"
    process = annotate(
        "run", scaleout_recipe(tmp_path, scaleout_input, "starting"), "--no-progress", "--devices", "cpu,cpu"
    )
    wait_until(lambda: writer_processes(process.pid) or process.poll() is not None, what="writer processes")
    os.killpg(process.pid, signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    message = " ".join(out.split())
    assert process.returncode == 2 and f"annotate resume {output}" in message, out
    assert not any(noise in out for noise in ("Traceback", "KeyboardInterrupt", "Fatal Python error")), out
    log = output / "run.log"
    assert "died" not in message and "writer_died" not in (log.read_text() if log.exists() else ""), out


def test_a_stop_signal_during_a_writer_launch_acts_after_it_once():
    from annotator.executors import _stop_signals_deferred

    seen, done = [], threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    other = threading.Thread(target=done.wait)  # a thread that does not block it: the kernel may deliver it there
    other.start()
    try:
        with _stop_signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert seen == [], "not half-way through the launch"
            assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []), "a child started here inherits it"
        assert seen == [signal.SIGINT], "then once, by the handler in place before"
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGINT, previous)
        done.set()
        other.join()


@pytest.mark.slow
def test_a_window_that_kills_three_writers_stops_the_run_and_names_it(
    tmp_path, scaleout_input, scaleout_reference, monkeypatch
):
    cause = tmp_path / "cause"
    cause.touch()
    use_writer_hooks(monkeypatch, SCALEOUT_KILL_WINDOW="4", SCALEOUT_CAUSE=str(cause))
    output = tmp_path / "poisoned"
    result = invoke(
        "run", scaleout_recipe(tmp_path, scaleout_input, "poisoned"), "--no-progress", "--devices", "cpu,cpu"
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "Window 4 (rows 24 to 29) killed 3 writers" in message and "annotate resume" in message, message
    assert not (output / "summary.json").exists()
    assert not [p for p in (output / "data").iterdir() if p.name.startswith(".")], "nothing half-written is left"
    cause.unlink()
    result = invoke("resume", output, "--no-progress", "--devices", "cpu,cpu")
    assert result.exit_code == 0, result.output
    assert_same_output(output, scaleout_reference)


def test_writers_that_die_loading_the_model_leave_an_overwritten_run_as_it_was(
    tmp_path, scaleout_input, scaleout_reference, monkeypatch
):
    """--overwrite keeps its promise with several writers: a new start whose model never loads puts the run back."""
    output = tmp_path / "out"
    shutil.copytree(scaleout_reference, output)
    before = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    use_writer_hooks(monkeypatch, SCALEOUT_KILL_LOAD="1")
    recipe = scaleout_recipe(tmp_path, scaleout_input, "out")
    result = invoke("run", recipe, "--no-progress", "--devices", "cpu,cpu", "--overwrite")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "died while loading the model" in message and "run the same command again" in message, message
    after = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert after == before, "the earlier run is back, file for file"
    result = invoke("run", scaleout_recipe(tmp_path, scaleout_input, "new"), "--no-progress", "--devices", "cpu,cpu")
    assert result.exit_code == 2 and not (tmp_path / "new").exists(), "a new folder is taken back whole"


DIES_WITH_PARENT = """
import multiprocessing, os, sys, time
from annotator.executors import die_with

def child(parent, ready):
    die_with(parent)
    open(ready, "w").close()
    time.sleep(120)

if __name__ == "__main__":
    child_process = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(), sys.argv[1]))
    child_process.start()
    print(child_process.pid, flush=True)
    time.sleep(120)
"""


def test_a_writer_process_dies_with_its_coordinator_even_by_kill_9(tmp_path):
    """The kernel kills a writer whose coordinator died (Linux's parent-death signal), whatever it is doing."""
    (tmp_path / "parent.py").write_text(DIES_WITH_PARENT)
    ready = tmp_path / "ready"
    parent = subprocess.Popen([sys.executable, tmp_path / "parent.py", ready], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    wait_until(ready.exists, timeout=60, what="the child to start")
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    wait_until(lambda: not running(child), timeout=30, what="the child to die with its parent")  # else: 120 s


def test_devices_that_do_not_exist_are_a_user_error_before_anything_is_written(tmp_path, scaleout_input):
    recipe = scaleout_recipe(tmp_path, scaleout_input, "nogpu")
    result = invoke("run", recipe, "--no-progress", "--devices", "cuda:0,cuda:7")
    assert result.exit_code == 1
    assert "cuda:7" in result.output and "visible GPU" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "nogpu").exists()
    result = invoke("run", recipe, "--no-progress", "--devices", "gpu")
    assert result.exit_code == 1 and "is not cpu, cuda or cuda:N" in result.output
