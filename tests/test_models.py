"""Model loading as a user sees it: what is loading, and a Ctrl-C while it loads says exactly how to go on."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from annotator.cli import app
from tests.conftest import journals, read_output, write_recipe

runner = CliRunner()


def interrupted_load(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_while_the_model_loads_says_how_to_go_on(tmp_path, mixed_parquet, monkeypatch):
    import annotator.models

    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", batching={"window": 8})
    monkeypatch.setattr(annotator.models, "load_model", interrupted_load)
    result = runner.invoke(app, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "Interrupted while loading the model" in message and f"annotate resume {tmp_path / 'out'}" in message
    # The folder was written before the load: it is a run that resume continues.
    assert (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "lock").exists()

    monkeypatch.undo()
    assert runner.invoke(app, ["resume", str(tmp_path / "out"), "--no-progress"]).exit_code == 0
    (tmp_path / "out" / "summary.json").unlink()
    shutil.rmtree(tmp_path / "out" / "data")
    (tmp_path / "out" / "data").mkdir()
    for journal in journals(tmp_path / "out"):
        journal.write_text("")
    monkeypatch.setattr(annotator.models, "load_model", interrupted_load)
    result = runner.invoke(app, ["resume", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2 and f"annotate resume {tmp_path / 'out'}" in " ".join(result.output.split())
    monkeypatch.undo()
    assert runner.invoke(app, ["resume", str(tmp_path / "out"), "--no-progress"]).exit_code == 0
    assert read_output(tmp_path / "out").num_rows == 16


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_model_being_loaded_is_named_before_it_loads(tmp_path, mixed_parquet, log_format):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out")
    result = runner.invoke(app, ["run", str(recipe), "--limit", "2", "--log-format", log_format])
    assert result.exit_code == 0
    first = result.stderr.splitlines()[0]
    assert ("loading model=tiny" in first) if log_format == "text" else ('"model": "tiny"' in first)
