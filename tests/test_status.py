"""`annotate status`: the ETA of a running job from its live session, the prob histogram and kept shares."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from annotator.cli import app
from annotator.fake_run import write_fake_run
from annotator.status import run_status, session_rate
from tests.conftest import read_output
from tests.test_lease import write_holder

runner = CliRunner()


@pytest.fixture
def now(monkeypatch) -> float:
    """The time `status` reads, stopped: rates and heartbeat ages are exact, however slowly the test runs."""
    import annotator.status

    stopped = time.time()
    monkeypatch.setattr(annotator.status, "time", SimpleNamespace(time=lambda: stopped))
    return stopped


def as_running(folder, keep: int, seconds_ago: float, now: float) -> None:
    """Make a finished fake run look like a live one: `keep` windows committed by a session that started
    `seconds_ago`, and the lock held by this process."""
    folder.summary_path.unlink()
    records = [json.loads(line) for line in folder.journal_path.read_text().splitlines()][:keep]
    for i, record in enumerate(records):
        record["session_started"] = now - seconds_ago
        record["committed_at"] = now - seconds_ago + (i + 1) * seconds_ago / (keep + 1)
    folder.journal_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_holder(folder.root / "lock", pid=os.getpid(), since=now - seconds_ago - 5)


def test_a_running_job_has_an_eta_from_its_live_rate(tmp_path, now):
    folder = write_fake_run(tmp_path / "run", rows=1000, window=100)
    as_running(folder, keep=4, seconds_ago=20.0, now=now)
    status = run_status(folder.root)
    assert status["state"] == "running" and status["rows_done"] == 400
    assert status["rows_per_s"] == pytest.approx(400 / 20, rel=0.05), "rows this session / seconds since it began"
    assert status["eta_s"] == pytest.approx(600 / status["rows_per_s"], rel=0.01)
    result = runner.invoke(app, ["status", str(folder.root)])
    assert result.exit_code == 0 and "eta" in result.output and "prob    0 " in result.output


def test_a_session_that_committed_nothing_yet_has_no_rate(tmp_path):
    records = [{"rows": 10, "committed_at": 105.0, "session_started": 100.0}]
    assert session_rate(records, running_since=200.0) == (None, False), "still loading its model"
    rate, live = session_rate(records, running_since=None)
    assert rate == pytest.approx(2.0) and not live, "an interrupted run: its last session's rate"


def test_status_histogram_and_kept_shares_are_exact(tmp_path):
    values = np.float32([0.05, 0.1, 0.3, 0.35, 0.5, 0.5, 0.7, 0.9, 1.0, 0.0] * 7)
    probs = [float(v) for v in values] + [None] * 5  # float32 0.35 is just below 0.35; 0.05 just above 0.05
    folder = write_fake_run(tmp_path / "run", window=16, probs=probs, threshold=0.35)
    status = json.loads(runner.invoke(app, ["status", str(folder.root), "--json"]).output)
    table = read_output(folder.root)
    scored = [p for p in table.column("prob").to_pylist() if p is not None]
    for threshold, share in status["kept_share_at"].items():
        assert share == round(sum(p >= float(threshold) for p in scored) / 75, 4), threshold
    assert status["kept_share"] == round(sum(bool(v) for v in table.column("label").to_pylist()) / 75, 4)
    assert status["kept_share"] == round(sum(p >= 0.35 for p in scored) / 75, 4)
    assert sum(status["prob_histogram"]) == 70 and status["prob_histogram"][-1] == 7, "prob 1 is in the last bin"
    assert status["rows_per_s"] == json.loads(folder.summary_path.read_text())["rows_per_s"]


def test_journals_from_before_histograms_were_recorded_still_give_the_histogram(tmp_path):
    folder = write_fake_run(tmp_path / "run", rows=300, window=64)
    expected = run_status(folder.root)["prob_histogram"]
    records = [json.loads(line) for line in folder.journal_path.read_text().splitlines()]
    folder.journal_path.write_text("".join(json.dumps({**r, "histograms": {}}) + "\n" for r in records))
    assert run_status(folder.root)["prob_histogram"] == expected and sum(expected) > 250


def test_status_shows_each_writer_of_the_live_session(tmp_path, now):
    """Host, device, windows, rows/s and heartbeat of each writer; one that stopped beating is `gone`."""
    folder = write_fake_run(tmp_path / "run", rows=1000, window=100)
    as_running(folder, keep=2, seconds_ago=60.0, now=now)  # an earlier session's journal: not this session's writers
    session = now - 20
    records = [json.loads(line) for line in folder.journal_path.read_text().splitlines()]
    for name, device, windows, beat_ago in (("vm-1-aa", "cuda:0", [2, 3, 4], 1.0), ("vm-2-bb", "cuda:1", [5], 40.0)):
        lines = [{**records[0], "window": w, "start": w * 100, "session_started": session, "committed_at": now - 5}
                 for w in windows]  # fmt: skip
        (folder.journal_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        beat = {"host": "vm", "pid": 1, "device": device, "state": "scoring", "started": session - 10,
                "loaded_at": session - 1, "session_started": session, "beat": now - beat_ago}  # fmt: skip
        (folder.journal_dir / f"{name}.heartbeat.json").write_text(json.dumps(beat))
    status = run_status(folder.root)
    assert status["state"] == "running" and status["rows_done"] == 600
    writers = {w["device"]: w for w in status["writers"]}
    assert sorted(writers) == ["cuda:0", "cuda:1"], "the earlier session's writer is not listed"
    assert writers["cuda:0"]["windows"] == 3 and writers["cuda:0"]["rows"] == 300
    assert writers["cuda:0"]["state"] == "scoring" and writers["cuda:0"]["heartbeat_s_ago"] == pytest.approx(1, abs=1)
    assert writers["cuda:0"]["rows_per_s"] == pytest.approx(300 / 20, rel=0.1), "rows since the session began"
    assert writers["cuda:1"]["state"] == "gone", "no heartbeat for 40 s"
    table = runner.invoke(app, ["status", str(folder.root)]).output
    assert "writers" in table and "cuda:1" in table and "gone" in table


def test_damaged_heartbeats_and_journal_lines_are_left_out_of_the_writers(tmp_path):
    """A heartbeat that is not an object, fields of other types, bytes that are not UTF-8: status still answers."""
    folder = write_fake_run(tmp_path / "run", rows=300, window=100)
    (folder.journal_dir / "vm-1-aa.heartbeat.json").write_text("[1, 2]")
    (folder.journal_dir / "vm-2-bb.heartbeat.json").write_text(
        json.dumps({"host": 7, "device": ["cuda:0"], "beat": "now", "session_started": True, "state": None})
    )
    (folder.journal_dir / "vm-2-bb.jsonl").write_bytes(b'\xff\xfe\n{"window": "0"}\n[]\n{"session_started": "x"}\n')
    status = run_status(folder.root)
    assert status["rows_done"] == 300
    assert all(isinstance(w["host"], str) and isinstance(w["device"], str) for w in status["writers"])
    result = runner.invoke(app, ["status", str(folder.root)])
    assert result.exit_code == 0 and "Traceback" not in result.output
