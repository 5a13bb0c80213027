"""An unreachable Hub is found in seconds: `run` fails with the commands to go on, `plan` finishes, a cached
model still loads. Each runs `annotate` in its own process with the offline flags off, as a user's shell would."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from annotator.cli import app
from tests.conftest import write_recipe

runner = CliRunner()
HUB_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
# "In seconds": the probe's 4 s and the start of a process that imports torch (3 to 5 s in all on the 2-core dev
# machine, more on a loaded one). Without the probe, huggingface_hub's retries take 50 s for `plan` and minutes for
# `run` (measured 2026-11-25): the bound tells them apart with room for a slow machine on either side.
SECONDS = 25


@pytest.fixture
def closed_port() -> str:
    """An endpoint that refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_endpoint():
    """An endpoint that accepts the connection and never answers (a blackhole behind a proxy, a hung mirror)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def annotate(args: list[str], endpoint: str, hf_home: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), PYTHONPATH=os.pathsep.join(sys.path))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", "from annotator.cli import main; main()", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done, time.monotonic() - started


def test_run_with_the_hub_unreachable_fails_in_seconds_with_the_commands_to_go_on(
    tmp_path, mixed_parquet, silent_endpoint
):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", model={"name": HUB_MODEL})
    done, seconds = annotate(["run", str(recipe), "--limit", "4"], silent_endpoint, tmp_path / "hf")
    assert done.returncode == 1, done.stderr
    assert seconds < SECONDS, f"{seconds:.1f} s"
    message = " ".join(done.stderr.split())
    assert f"Could not load model '{HUB_MODEL}': the Hugging Face Hub at {silent_endpoint} cannot be reached" in message
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[-3].strip().startswith(f"annotate run {recipe} --limit 4 --set model.name=tiny ")
    assert lines[-2].strip().startswith(f"HF_HUB_OFFLINE=1 annotate run {recipe} --limit 4 ")
    assert lines[-1].strip().startswith(f"annotate run {recipe} --limit 4 --set model.name=/path/to/")
    assert not (tmp_path / "out" / "data").exists(), "nothing written"


def test_plan_with_the_hub_unreachable_finishes_in_seconds(tmp_path, mixed_parquet, closed_port):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", model={"name": HUB_MODEL})
    done, seconds = annotate(["plan", str(recipe)], closed_port, tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert seconds < SECONDS, f"{seconds:.1f} s"
    assert "cannot be reached" in done.stdout.replace("\n", " ") or "unavailable" in done.stdout


def hub_cache_with(model_dir: Path, hf_home: Path, repo: str) -> None:
    """A Hugging Face cache holding `model_dir` as the `main` revision of `repo`, as a download leaves it."""
    commit = "0" * 40
    repo_dir = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_a_cached_model_loads_with_the_hub_unreachable(tmp_path, mixed_parquet, closed_port, tiny_model_cache):
    hub_cache_with(next(tiny_model_cache.iterdir()), tmp_path / "hf", "acme/tiny-qwen")
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", model={"name": "acme/tiny-qwen"})
    done, _ = annotate(["run", str(recipe), "--limit", "4", "--no-progress"], closed_port, tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert "rows_per_s" in done.stdout and (tmp_path / "out" / "summary.json").exists()


def test_offline_mode_without_the_model_is_one_error_with_the_commands(tmp_path, mixed_parquet):
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", model={"name": HUB_MODEL})
    result = runner.invoke(app, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == 1 and "offline mode (HF_HUB_OFFLINE) is set" in result.output
    assert f"annotate run {recipe} --no-progress --set model.name=tiny" in result.output


def test_the_probe_answers_within_its_deadline(silent_endpoint, monkeypatch):
    from huggingface_hub import constants

    from annotator.hub import unreachable_reason

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", silent_endpoint)
    started = time.monotonic()
    reason = unreachable_reason.__wrapped__(1.0)
    assert reason is not None and time.monotonic() - started < 3


def test_a_hub_dataset_with_the_hub_unreachable_is_an_error_in_seconds(monkeypatch):
    from datasets import config

    import annotator.hub
    from annotator.errors import AnnotatorError
    from annotator.hf_source import _check_hub
    from annotator.recipe import HFInput

    monkeypatch.setattr(config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(annotator.hub, "unreachable_reason", lambda: "[Errno 111] Connection refused")
    with pytest.raises(AnnotatorError, match="cannot be reached.*HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"):
        _check_hub(HFInput(path="jxie/coco_captions"))
    _check_hub(HFInput(path="parquet"))  # a builder name is never the Hub's
