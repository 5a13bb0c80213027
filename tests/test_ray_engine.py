"""`engine.kind: ray` on a local Ray (2 CPUs, CPU actors, a CPU reserved): the local output byte for byte, also with
an actor killed mid-run, and a run resumed by the other engine; without Ray, a clean user error."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from annotator.errors import AnnotatorError
from annotator.ray_address import check_address
from annotator.ray_engine import plan_writers
from annotator.recipe import RayConfig
from tests.conftest import Pause, journals, scaleout_recipe
from tests.test_scaleout import assert_same_output, invoke, kill_the_paused_writer, running

ON_RAY = ["--set", "engine.kind=ray", "--set", "engine.ray.cpus_per_worker=0.5"]  # two writers on 2 CPUs, 1 free


@pytest.fixture(scope="module")
def ray_and_pause(tiny_model_cache, tmp_path_factory):
    """One local Ray for the module: 2 CPUs, no dashboard; its workers inherit this environment, in which actors
    pause before committing window 2 while the pause is held (tests/scaleout_hooks)."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ANNOTATOR_CACHE", str(tiny_model_cache))
        env.setenv("RAY_AUTH_MODE", "disabled")  # a local test cluster: no token written under ~/.ray
        pause = Pause(env, tmp_path_factory.mktemp("ray-pause"), window=2)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        yield ray, pause
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(ray_and_pause):
    return ray_and_pause[0]


def test_a_live_cluster_passes_the_address_check_and_a_server_that_is_not_its_gcs_does_not(ray_session, capfd):
    """The check before `ray.init` lets the real GCS through and stops at a gRPC server that is not one (the raylet's
    port here; a proxy's in some networks), quietly: Ray's client logs its failure, the error says it once."""
    gcs = ray_session.get_runtime_context().gcs_address
    start = time.monotonic()
    check_address(gcs)
    assert time.monotonic() - start < 2
    raylet = f"{gcs.rsplit(':', 1)[0]}:{ray_session._private.worker.global_worker.node.node_manager_port}"
    with pytest.raises(AnnotatorError, match=f"'{raylet}', but it is not a Ray cluster's GCS"):
        check_address(raylet)
    assert "gcs_client" not in capfd.readouterr().err


def cut_back(output: Path, keep: int) -> None:
    """A finished run of any engine turned into one interrupted after its first `keep` windows."""
    (output / "summary.json").unlink()
    for journal in journals(output):
        lines = journal.read_text().splitlines(keepends=True)
        journal.write_text("".join(line for line in lines if json.loads(line)["window"] < keep))
    for path in sorted((output / "data").glob("part-*.parquet"))[keep:]:
        path.unlink()


def test_ray_writers_with_one_killed_write_the_local_output(
    tmp_path, scaleout_input, scaleout_reference, ray_and_pause
):
    output, killed = tmp_path / "ray", []
    killer = kill_the_paused_writer(ray_and_pause[1].hold(), killed)  # the actor's process
    result = invoke("run", scaleout_recipe(tmp_path, scaleout_input, "ray"), "--no-progress", *ON_RAY)
    killer.join()
    assert result.exit_code == 0, result.output
    assert killed and not running(killed[0])
    assert "writer_died" in (output / "run.log").read_text(), "its windows went to another actor"
    assert_same_output(output, scaleout_reference)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["engine"] == "ray" and summary["writers"] == 2


def test_a_run_resumed_by_the_other_engine_is_exact(tmp_path, scaleout_input, scaleout_reference, ray_session):
    output = tmp_path / "partial"
    shutil.copytree(scaleout_reference, output)
    cut_back(output, keep=3)  # started by local processes, as `--devices cpu,cpu` writes it in the frozen recipe:
    frozen = yaml.safe_load((output / "recipe.yaml").read_text())
    frozen.setdefault("engine", {})["devices"] = ["cpu", "cpu"]
    (output / "recipe.yaml").write_text(yaml.safe_dump(frozen, sort_keys=False))
    result = invoke("resume", output, "--no-progress", *ON_RAY)  # the local devices do not apply on Ray
    assert result.exit_code == 0, result.output
    assert_same_output(output, scaleout_reference)
    cut_back(output, keep=5)  # windows 3 and 4 now come from Ray actors' journals
    assert len(journals(output)) >= 2
    result = invoke("resume", output, "--no-progress", "--devices", "cpu")
    assert result.exit_code == 0, result.output
    assert_same_output(output, scaleout_reference)
    assert json.loads((output / "summary.json").read_text())["engine"] == "local"


def test_without_ray_the_ray_engine_is_a_user_error_before_anything_is_written(tmp_path, scaleout_input, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    result = invoke("run", scaleout_recipe(tmp_path, scaleout_input, "noray"), "--no-progress", *ON_RAY)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert 'pip install -e ".[ray]"' in " ".join(result.output.split())
    assert not (tmp_path / "noray").exists()


@pytest.mark.parametrize(
    ("config", "resources", "plan"),
    [
        ({}, {"CPU": 64, "GPU": 8}, (8, 7, True)),  # every GPU, the CPUs left after the reserve shared out
        ({"workers": 2, "cpus_per_worker": 4}, {"CPU": 64, "GPU": 8}, (2, 4, True)),
        ({}, {"CPU": 2}, (1, 1, False)),  # no GPU: as many CPU writers as fit beside the reserved CPU
        ({"cpus_per_worker": 0.5}, {"CPU": 2}, (2, 0.5, False)),
        ({"reserved_cpus": 0}, {"CPU": 4}, (4, 1, False)),
    ],
)
def test_the_writers_planned_for_a_cluster(config, resources, plan):
    assert plan_writers(RayConfig(**config), resources) == plan


@pytest.mark.parametrize(
    ("config", "resources", "error"),
    [
        ({"workers": 9}, {"CPU": 64, "GPU": 8}, "one writer per GPU"),
        ({"workers": 3}, {"CPU": 2}, "reserved_cpus"),  # could never all be placed: Ray would wait forever
        ({}, {"CPU": 1}, "reserved_cpus"),
    ],
)
def test_a_plan_ray_could_never_place_is_a_user_error(config, resources, error):
    with pytest.raises(AnnotatorError, match=error):
        plan_writers(RayConfig(**config), resources)
