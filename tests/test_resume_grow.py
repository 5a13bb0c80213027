"""Growing a pilot: `annotate resume RUN --set input.limit=M` keeps the pilot's full windows, redoes its short last
one, equals a run of every row byte for byte, and resumes exactly from a kill at any step of the growth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from annotator.cli import app
from annotator.sink import RunFolder
from tests.conftest import counting_planned_rows, jpeg_bytes, run_once, write_dataset, write_recipe

runner = CliRunner()
ROWS, WINDOW = 40, 6


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    sizes = [(320, 240), (240, 320), (400, 120), (280, 280)]
    images = [jpeg_bytes(*sizes[i % len(sizes)], seed=i) for i in range(ROWS)]
    captions = [f"row {i}" for i in range(ROWS)]
    return write_dataset(tmp_path_factory.mktemp("grow-input") / "in.parquet", images, captions)


def recipe(folder: Path, dataset: Path, name: str) -> Path:
    return write_recipe(folder / f"{name}.yaml", dataset, folder / name, batching={"window": WINDOW, "workers": 0})


@pytest.fixture(scope="module")
def whole(tmp_path_factory, dataset, tiny_model_cache) -> Path:
    """A run of every row, the reference."""
    folder = tmp_path_factory.mktemp("grow-whole")
    return run_once(folder, recipe(folder, dataset, "whole"), tiny_model_cache) / "whole"


def files_of(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "data").glob("part-*.parquet"))}


def assert_equals_whole(run: Path, whole: Path) -> None:
    assert files_of(run) == files_of(whole), "same files, same bytes: same rows, row ids and probs"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rows"] == ROWS and summary["finished"]
    assert json.loads(invoke("status", run, "--json").output)["rows"] == f"{ROWS} / {ROWS}"


def test_a_pilot_grown_in_steps_to_every_row_equals_a_run_of_every_row(tmp_path, dataset, whole, monkeypatch):
    pilot = tmp_path / "pilot"
    assert invoke("run", recipe(tmp_path, dataset, "pilot"), "--no-progress", "--limit", "15").exit_code == 0
    assert json.loads((pilot / "summary.json").read_text())["rows"] == 15
    planned = counting_planned_rows(monkeypatch)
    result = invoke("resume", pilot, "--set", "input.limit=26", "--no-progress")
    assert result.exit_code == 0, result.output
    assert planned == [6, 6, 2], "windows 0 and 1 are kept; window 2 (3 rows) is redone with 6, then 3 and 4"
    planned.clear()
    result = invoke("resume", pilot, "--set", "input.limit=null", "--no-progress")
    assert result.exit_code == 0, result.output
    assert planned == [6, 6, 4], "window 4 held 2 rows: redone with 6, then windows 5 and 6"
    assert_equals_whole(pilot, whole)
    manifest = RunFolder(pilot).manifest()
    assert manifest["limit"] is None and manifest["total_rows"] == ROWS


def grown_then_killed(tmp_path: Path, dataset: Path, whole: Path, step: str) -> Path:
    """A pilot of 15 rows as a kill during its growth to every row would leave it, at `step`."""
    pilot = tmp_path / "pilot"
    assert invoke("run", recipe(tmp_path, dataset, "pilot"), "--no-progress", "--limit", "15").exit_code == 0
    folder = RunFolder(pilot)
    (pilot / "summary.json").unlink()  # grow's first step
    if step == "summary deleted":
        return pilot
    frozen = yaml.safe_load(folder.recipe_path.read_text())
    folder.recipe_path.write_text(yaml.safe_dump({**frozen, "input": {**frozen["input"], "limit": None}}))
    if step == "recipe written":  # its second step; the manifest still says 15
        return pilot
    manifest = {**folder.manifest(), "limit": None, "total_rows": ROWS}
    folder.manifest_path.write_text(json.dumps(manifest))  # its third
    if step == "manifest written":
        return pilot
    # The redone window 2 renamed into place with its 6 rows, killed before its journal line.
    shutil.copy(whole / "data" / "part-000002.parquet", pilot / "data" / "part-000002.parquet")
    return pilot


@pytest.mark.parametrize("step", ["summary deleted", "recipe written", "manifest written", "window file replaced"])
def test_a_kill_at_any_step_of_the_growth_resumes_exactly(tmp_path, dataset, whole, step):
    pilot = grown_then_killed(tmp_path, dataset, whole, step)
    if step in ("summary deleted", "recipe written"):  # still the pilot: resume finishes it; growing it again works
        assert invoke("resume", pilot, "--no-progress").exit_code == 0
        assert json.loads((pilot / "summary.json").read_text())["rows"] == 15
        assert invoke("resume", pilot, "--no-progress", "--set", "input.limit=null").exit_code == 0
    else:
        assert RunFolder(pilot).committed().keys() == {0, 1}, "the short window no longer counts"
        result = invoke("resume", pilot, "--no-progress")  # the manifest's limit wins over recipe.yaml's
        assert result.exit_code == 0, result.output
    assert_equals_whole(pilot, whole)


@pytest.mark.parametrize(
    ("pilot", "then", "expected"),
    [
        (15, "input.limit=10", "can only grow on resume"),
        (None, "input.limit=20", "this run covers the whole input"),
    ],
)
def test_a_limit_that_would_drop_rows_is_refused(tmp_path, dataset, whole, pilot, then, expected):
    run = tmp_path / "run"
    if pilot is None:
        shutil.copytree(whole, run)
    else:
        assert invoke("run", recipe(tmp_path, dataset, "run"), "--no-progress", "--limit", pilot).exit_code == 0
    before = files_of(run)
    result = invoke("resume", run, "--set", then, "--no-progress")
    assert result.exit_code == 1 and expected in result.output.replace("\n", " ")
    assert files_of(run) == before and (run / "summary.json").exists() and not (run / "lock").exists()


@pytest.mark.parametrize("then", [[], ["--set", "input.limit=15"], ["--log-format", "json"]])
def test_resuming_a_finished_run_is_done_not_an_error(tmp_path, dataset, then):
    """Nothing to do is success: a loop that resumes until it succeeds (`until annotate resume DIR; do ...`) ends.
    The run is left as it was, and the message says how to grow it."""
    run = tmp_path / "run"
    assert invoke("run", recipe(tmp_path, dataset, "run"), "--no-progress", "--limit", 15).exit_code == 0
    before = files_of(run)
    result = invoke("resume", run, "--no-progress", *then)
    assert result.exit_code == 0, result.output
    said = result.output.replace("\n", " ")
    if "json" in then:
        line = json.loads(result.stderr.strip().splitlines()[-1])
        assert line["event"] == "already_finished" and line["exit_code"] == 0
        said = line["message"]
    assert "already finished: nothing to resume" in said and "--set input.limit=M" in said
    assert files_of(run) == before and not (run / "lock").exists()


@pytest.mark.parametrize(
    ("then", "says"),
    [
        ("prompt.question=Is it {text}?", "--set prompt.question would change results"),
        ("batching.window=7", "`batching.window` cannot change on resume"),
    ],
)
def test_a_finished_run_refuses_what_an_unfinished_one_refuses(tmp_path, dataset, then, says):
    """Asked for another question, a finished run said "Done" and ignored it: the user thought the new question
    was asked. It is the mistake it is on an unfinished run (exit 1)."""
    run = tmp_path / "run"
    assert invoke("run", recipe(tmp_path, dataset, "run"), "--no-progress", "--limit", 15).exit_code == 0
    before = files_of(run)
    result = invoke("resume", run, "--no-progress", "--set", then)
    assert result.exit_code == 1 and says in result.output.replace("\n", " "), result.output
    assert files_of(run) == before
