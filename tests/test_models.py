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


def test_the_random_model_has_the_same_weights_in_every_process_and_leaves_the_random_state_alone(tiny):
    """Writers of one run, and a resumed run, load `qwen2-vl-2b-random` separately: they must score with the same
    weights. Checked on the tiny model's config (the 2B one costs 9 GB a copy)."""
    import torch

    from annotator.models import random_model

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = random_model(tiny.model.config, torch.float32, "cpu")
    after = torch.rand(3)
    second = random_model(tiny.model.config, torch.float32, "cpu")
    assert torch.equal(before, after), "the caller's random state is untouched"
    one, two = first.state_dict(), second.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert any(v.std() > 0 for v in one.values() if v.is_floating_point() and v.numel() > 1), "weights are random"


def test_the_cache_folder_expands_a_tilde_as_every_other_path(tmp_path, monkeypatch):
    """ANNOTATOR_CACHE=~/cache was taken as written: the tiny model was built under ~ and then looked for as a Hub
    id ('~/cache/tiny-qwen2-vl-v1'), with a message about the Hub."""
    from annotator.models import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ANNOTATOR_CACHE", "~/cache")
    assert cache_dir() == tmp_path / "home" / "cache"


def test_a_cache_folder_the_tiny_model_cannot_be_built_in_names_annotator_cache(tmp_path, mixed_parquet, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("ANNOTATOR_CACHE", str(tmp_path / "file"))
    result = runner.invoke(app, ["plan", str(write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out"))])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "set ANNOTATOR_CACHE to a folder you can write to" in " ".join(result.output.split()), result.output
