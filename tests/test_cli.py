"""The command line end to end with the tiny model, and the user errors it reports (exit 1, no traceback)."""

import json
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from annotator.cli import app
from annotator.scores import JOURNAL_BINS, histogram
from tests.conftest import DEMO, read_output, write_recipe

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_run_end_to_end(tmp_path, mixed_parquet):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", output={"threshold": 0.4})
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "out")
    source = pq.read_table(mixed_parquet)
    assert table.num_rows == source.num_rows
    assert table.column("row_id").to_pylist() == list(range(source.num_rows))
    assert table.column("idx").to_pylist() == source.column("idx").to_pylist(), "input order is kept"
    assert table.column("caption").to_pylist() == source.column("caption").to_pylist()
    prob = np.array(table.column("prob").to_pylist(), dtype=np.float32)
    assert ((prob >= 0) & (prob <= 1)).all()
    assert table.column("label").to_pylist() == [bool(p >= np.float32(0.4)) for p in prob]
    assert table.column("error").null_count == table.num_rows
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows"] == summary["scored"] == 16
    assert summary["positives"] == sum(table.column("label").to_pylist())
    assert 0 < summary["padding_efficiency"] <= 1
    frozen = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert frozen["output"]["threshold"] == 0.4 and frozen["model"]["name"] == "tiny"


def test_output_loads_with_datasets_as_image_feature(tmp_path):
    import datasets

    recipe = write_recipe(tmp_path / "r.yaml", DEMO, tmp_path / "out")
    assert invoke("run", recipe, "--no-progress", "--limit", "5").exit_code == 0
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    assert len(ds) == 5
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["prob"].dtype == "float32" and ds.features["label"].dtype == "bool"
    assert ds[0]["image"].size == (451, 300)


def test_set_overrides_and_limit(tmp_path, mixed_parquet):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out")
    result = invoke(
        "run",
        recipe,
        "--no-progress",
        "--limit",
        "5",
        "--set",
        "batching.max_batch_size=2",
        "--set",
        "prompt.query=a cat",
    )
    assert result.exit_code == 0, result.output
    frozen = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert frozen["batching"]["max_batch_size"] == 2 and frozen["prompt"]["query"] == "a cat"
    assert read_output(tmp_path / "out").num_rows == 5


def test_run_into_a_finished_run_stops_unless_overwrite(tmp_path, mixed_parquet):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out")
    assert invoke("run", recipe, "--no-progress", "--limit", "3").exit_code == 0
    again = invoke("run", recipe, "--no-progress", "--limit", "3")
    assert again.exit_code == 1 and "already holds a finished run" in again.output
    assert invoke("run", recipe, "--no-progress", "--limit", "4", "--overwrite").exit_code == 0
    assert read_output(tmp_path / "out").num_rows == 4


def test_plan_reports_buckets_without_a_model(tmp_path, mixed_parquet, monkeypatch):
    import annotator.models

    def no_model(*args, **kwargs):
        raise AssertionError("plan must not load a model")

    monkeypatch.setattr(annotator.models, "load_model", no_model)
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out")
    result = invoke("plan", recipe, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["rows"] == plan["scorable"] == 16
    assert sum(b["rows"] for b in plan["buckets"]) == 16
    assert 0 < plan["padding_efficiency"] <= 1
    assert plan["flops"]["total"] > plan["flops"]["vision"] > 0
    assert invoke("plan", recipe).exit_code == 0


def test_status_of_a_finished_run(tmp_path, mixed_parquet):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out")
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    result = invoke("status", tmp_path / "out", "--json")
    status = json.loads(result.output)
    assert status["state"] == "finished" and status["rows_done"] == 16 and status["lock"] == "free"
    assert status["positives"] + status["negatives"] == 16


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"batching": {"max_batch_sise": 4}}, "`batching.max_batch_sise` is not a recipe key"),
        ({"batching": {"max_batch_sise": 4}}, "Did you mean `batching.max_batch_size`?"),
        ({"batching": {"max_batch_size": "many"}}, "`batching.max_batch_size`"),
        ({"input": {"text_column": "captions"}}, "Column 'captions' (`input.text_column`) is not in"),
        ({"input": {"text_column": "captions"}}, "Its columns are: image"),
        ({"input": {"image_column": "idx"}}, "has type int64, which cannot hold images"),
        ({"input": {"text_column": "idx"}}, "has type int64, not text"),
        ({"input": {"parquet": "missing/*.parquet"}}, "matches no parquet file"),
        ({"prompt": {"question": "no placeholder"}}, "must contain `{text}`"),
        ({"output": {"threshold": 2}}, "`output.threshold`"),
    ],
)
def test_recipe_errors_exit_1_with_a_message(tmp_path, mixed_parquet, change, expected):
    recipe = yaml.safe_load(write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out").read_text())
    for section, values in change.items():
        recipe.setdefault(section, {}).update(values)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke("run", tmp_path / "r.yaml", "--no-progress")
    assert result.exit_code == 1
    assert expected in result.output.replace("\n", " ")
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "data").exists(), "nothing is written before the recipe is valid"


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    result = invoke("run", tmp_path / "nope.yaml")
    assert result.exit_code == 1 and "does not exist" in result.output
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    result = invoke("run", tmp_path / "bad.yaml")
    assert result.exit_code == 1 and "not valid YAML" in result.output
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "must be a YAML mapping" in invoke("run", tmp_path / "list.yaml").output


def test_unreachable_hub_model_is_one_clear_error(tmp_path, mixed_parquet):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", model={"name": "nobody/no-such-model"})
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 1
    assert "Could not load model 'nobody/no-such-model'" in result.output.replace("\n", " ")
    assert "tiny" in result.output


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from annotator.cli import app; "
        "app(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_a_run_that_committed_nothing_can_be_run_again(tmp_path, mixed_parquet):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", model={"name": "nobody/no-such-model"})
    assert invoke("run", recipe, "--no-progress").exit_code == 1
    fixed = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out")
    result = invoke("run", fixed, "--no-progress", "--limit", "3")
    assert result.exit_code == 0, result.output
    assert read_output(tmp_path / "out").num_rows == 3


def test_a_damaged_parquet_file_is_a_clear_error(tmp_path):
    from tests.conftest import jpeg_bytes, write_dataset

    path = write_dataset(tmp_path / "in.parquet", [jpeg_bytes(64, 48, seed=i) for i in range(40)], ["c"] * 40)
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(path), path, row_group_size=20)
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 200] = b"\xab" * 200  # the second row group's page header
    path.write_bytes(bytes(data))
    result = invoke("run", write_recipe(tmp_path / "r.yaml", path, tmp_path / "out"), "--no-progress")
    assert result.exit_code == 1
    assert "cannot be read" in result.output and "in.parquet" in result.output
    assert "Traceback" not in result.output


def test_windows_of_failed_rows_are_committed_as_they_come(tmp_path, monkeypatch):
    """A long run of rows that all fail their checks is committed window by window, not read into memory."""
    from annotator.sink import RunFolder
    from annotator.writer import WindowScorer
    from tests.conftest import write_dataset

    path = write_dataset(tmp_path / "in.parquet", [None] * 60, ["c"] * 60)
    planned_at_commit: list[int] = []
    plan, write = WindowScorer._plan, RunFolder.write_window

    def counting_plan(self, window):
        planned_at_commit.append(-1)
        return plan(self, window)

    def recording_write(self, index, table, record):
        planned_at_commit.append(index)
        return write(self, index, table, record)

    monkeypatch.setattr(WindowScorer, "_plan", counting_plan)
    monkeypatch.setattr(RunFolder, "write_window", recording_write)
    result = invoke("run", write_recipe(tmp_path / "r.yaml", path, tmp_path / "out", batching={"window": 6}))
    assert result.exit_code == 0, result.output
    assert read_output(tmp_path / "out").column("error").to_pylist() == ["image: missing (null)"] * 60
    first_commit = planned_at_commit.index(0)
    assert planned_at_commit[:first_commit].count(-1) <= 3, planned_at_commit


def test_overwrite_keeps_the_previous_run_when_the_new_model_cannot_load(tmp_path, mixed_parquet):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out")
    assert invoke("run", recipe, "--no-progress", "--limit", "3").exit_code == 0
    result = invoke("run", recipe, "--no-progress", "--overwrite", "--set", "model.name=nobody/no-such-model")
    assert result.exit_code == 1 and "Could not load model" in result.output
    assert read_output(tmp_path / "out").num_rows == 3
    assert json.loads(invoke("status", tmp_path / "out", "--json").output)["state"] == "finished"


def test_plan_runs_the_checks_run_makes(tmp_path, mixed_parquet):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", prompt={"positive": "Yes indeed"})
    result = invoke("plan", recipe)
    assert result.exit_code == 1 and "`prompt.positive` = 'Yes indeed' is" in " ".join(result.output.split())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    busy = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "busy")
    result = invoke("plan", busy)
    assert result.exit_code == 1 and "not an annotator run folder" in " ".join(result.output.split())


def test_make_tiny_model_writes_a_new_folder_and_replaces_only_its_own(tmp_path):
    assert invoke("make-tiny-model", tmp_path / "tiny").exit_code == 0
    assert (tmp_path / "tiny" / "config.json").is_file() and not list((tmp_path / "tiny").glob(".staging-*"))
    marker = json.loads((tmp_path / "tiny" / ".annotator-tiny-model").read_text())
    assert marker["complete"] and "config.json" in marker["files"]
    assert invoke("make-tiny-model", tmp_path / "tiny").exit_code == 0, "its own folder is rebuilt"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    result = invoke("make-tiny-model", tmp_path / "mine")
    assert result.exit_code == 1 and "thesis.tex" in result.output
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.tex"]


MALFORMED_QUESTIONS = [
    ("cat: Is there a cat?\n    dog: A dog?\n    cat: A cat, again?", {}, "gives `prompt.questions.cat` twice"),
    ("caption: Is the caption good?", {}, "Question name(s) 'caption' of `prompt.questions` are also input columns"),
    ("cat: {question: 'A cat?', positive: 'Yes, absolutely'}", {}, "`prompt.questions.cat.positive` = 'Yes, absolu"),
    ("kind: {question: 'Which?', answers: [A, photograph]}", {}, "`prompt.questions.kind.answers` = 'photograph' is"),
    ("{}", {}, "`prompt.questions` is empty"),
    ("a cat: A cat?", {}, "question name 'a cat' must be ASCII letters (a-z, A-Z), digits and `_`"),
    ("cat: A cat?\n  positive: Yes sir", {}, "`prompt.positive` = 'Yes sir' is"),
    ("cat: A cat?", {"thresholds": {"dog": 0.3}}, "`output.thresholds` names 'dog'"),
]


@pytest.mark.parametrize(("questions", "output", "expected"), MALFORMED_QUESTIONS)
@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_malformed_question_set_is_one_paragraph_before_the_model_loads(
    tmp_path, mixed_parquet, monkeypatch, command, questions, output, expected
):
    import annotator.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load before the questions are checked")

    monkeypatch.setattr(annotator.models, "load_model", no_model)
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", output=output)
    recipe.write_text(f"{recipe.read_text()}prompt:\n  questions:\n    {questions}\n")
    result = invoke(command, recipe, *(["--no-progress"] if command == "run" else []))
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert len(result.output.strip().splitlines()) == 1, "one paragraph"
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists(), "nothing is written before the questions are valid"


def test_output_columns_of_questions_must_not_clash_with_input_columns(tmp_path):
    from tests.conftest import jpeg_bytes, write_dataset

    path = write_dataset(tmp_path / "in.parquet", [jpeg_bytes(64, 48)], ["c"], label_cat=[True])
    recipe = write_recipe(tmp_path / "r.yaml", path, tmp_path / "out", prompt={"questions": {"cat": "A cat?"}})
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 1
    assert "already has column(s) label_cat" in result.output and "rename the questions" in result.output


def test_summary_and_status_count_each_question(questions_run):
    table = read_output(questions_run)
    scored = [row for row in table.to_pylist() if row["error"] is None]
    summary = json.loads((questions_run / "summary.json").read_text())
    status = json.loads(invoke("status", questions_run, "--json").output)
    for counts in (summary["questions"], status["questions"]):
        for name in ("text", "cat"):
            positives = sum(row[f"label_{name}"] for row in scored)
            assert counts[name]["positives"] == positives and counts[name]["negatives"] == len(scored) - positives
            assert counts[name]["prob_histogram"] == histogram(table.column(f"prob_{name}"), JOURNAL_BINS)
        assert counts["kind"] == {"answers": {a: sum(r["answer_kind"] == a for r in scored) for a in "ABC"}}
    assert summary["positives"] is None and status["positives"] is None, "no single label to count"
    assert summary["scored"] == 8 and summary["errors"] == 1
    shown = invoke("status", questions_run).output
    assert "label_cat" in shown and "answer_kind" in shown and "A: " in shown
    histograms = [line.split()[0] for line in shown.splitlines() if re.match(r"prob_\w+ +0 ", line)]
    assert histograms == ["prob_cat", "prob_text"], "a histogram line per Y/N question"
    starts = {line.index(" 0 ") for line in shown.splitlines() if re.match(r"prob_\w+ +0 ", line)}
    assert len(starts) == 1, "the questions' histograms line up"
    log = (questions_run / "run.log").read_text()
    assert "window window=0" in log and "kept=" not in log, "no single kept share for several questions"


def test_plan_counts_flops_with_sharing_per_question(tmp_path, mixed_parquet, monkeypatch):
    import annotator.models

    monkeypatch.setattr(annotator.models, "load_model", lambda *a, **k: pytest.fail("plan must not load a model"))
    prompt = {"questions": {"text": "Related to {text}?", "cat": "A cat?", "dog": "A dog?"}}
    plan = json.loads(
        invoke(
            "plan", write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", prompt=prompt), "--json"
        ).output
    )
    single = json.loads(
        invoke("plan", write_recipe(tmp_path / "one.yaml", mixed_parquet, tmp_path / "o"), "--json").output
    )
    assert [q["name"] for q in plan["questions"]] == ["cat", "dog", "text"]
    assert plan["flops_separate_runs"] == sum(q["flops_alone"] for q in plan["questions"])
    # Sharing: three questions cost less than three runs, more than one; each adds only its own tokens.
    assert 1 < plan["cost_in_single_runs"] < 3
    assert plan["flops"]["vision"] == single["flops"]["vision"], "the vision tower runs once per image"
    shared = plan["flops"]["total"]
    for question in plan["questions"]:
        assert 0 < question["flops_added"] < question["flops_alone"] < shared
    assert "3 questions, shared" in invoke("plan", tmp_path / "r.yaml").output


def test_one_question_with_answers_writes_probs_and_answer(tmp_path, mixed_parquet):
    import datasets

    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", prompt={"answers": ["A", "B", "C"]})
    result = invoke("run", recipe, "--no-progress", "--limit", "6")
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "out")
    assert table.column_names[-6:] == ["row_id", "probs", "answer", "answer_mass", "error", "error_kind"]
    probs = np.array(table.column("probs").to_pylist())
    assert probs.shape == (6, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-6)
    assert table.column("answer").to_pylist() == [("A", "B", "C")[i] for i in probs.argmax(axis=1)]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["answers"] == {a: table.column("answer").to_pylist().count(a) for a in "ABC"}
    assert summary["positives"] is None and "answers" in invoke("status", tmp_path / "out").output
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    assert ds.features["probs"].feature.dtype == "float32" and ds.features["answer"].dtype == "string"
    assert isinstance(ds.features["image"], datasets.Image)


def test_the_annotate_command_is_main_which_leaves_a_stopped_run_before_the_interpreter_teardown(monkeypatch):
    """`annotate` must be `cli.main`, not the bare typer app: after a stop, main runs the exit handlers (signal
    handlers still ours) and leaves with os._exit(2). The interpreter's own teardown resets SIGINT to its default, so a
    second Ctrl-C there killed the process by signal (exit -2 / 130) instead of exit 2."""
    import atexit

    import tomllib

    import annotator.cli as cli
    from tests.conftest import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["annotate"] == "annotator.cli:main"

    ran, left = [], []

    class Left(Exception):
        pass

    def exits(code: int):
        def app():
            raise SystemExit(code)

        return app

    def leave(code: int):
        left.append(code)
        raise Left

    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: ran.append(True))
    monkeypatch.setattr(cli.os, "_exit", leave)
    monkeypatch.setattr(cli, "app", exits(2))
    with pytest.raises(Left):
        cli.main()
    assert ran == [True] and left == [2]
    monkeypatch.setattr(cli, "app", exits(1))
    with pytest.raises(SystemExit) as done:  # other exits are the normal ones
        cli.main()
    assert done.value.code == 1 and left == [2]


def annotate_main(*args: object, **popen) -> subprocess.Popen:
    """`annotate ARGS` as the console script runs it (`cli.main`), its stdout and stderr one pipe."""
    command = [*annotate_main.command, *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


annotate_main.command = [sys.executable, "-c", "from annotator.cli import main; main()"]


def test_a_run_whose_reader_goes_away_finishes_and_says_done(tmp_path):
    """`annotate run ... 2>&1 | head -2`: the pipe closes while the run logs. The run went on to its end (its
    lines are in run.log) and exits 0; it used to stop silently with exit 1 (click's answer to EPIPE)."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", DEMO, out, batching={"window": 2})
    process = annotate_main("run", recipe)
    first = process.stdout.readline()
    assert b"loading model=tiny" in first
    process.stdout.close()  # the reader is gone before the model has loaded
    assert process.wait(timeout=120) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["rows"] == 15
    assert "finished" in (out / "run.log").read_text()
    status = annotate_main("status", out)
    status.stdout.close()
    assert status.wait(timeout=60) == 0
    with open("/dev/full", "w") as full:  # a full disk: the same, where it was a traceback and exit 1
        assert subprocess.run([*annotate_main.command, "status", str(out)], stdout=full, stderr=full).returncode == 0
