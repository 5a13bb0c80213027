"""`annotate bench`'s host figures: CPU per pair and bytes per image through shared memory and through pipes."""

import json

import pytest
from typer.testing import CliRunner

from annotator.batching import grid_thw
from annotator.cli import app
from annotator.ring import shared_memory_problem

runner = CliRunner()
TINY = ["bench", "--model", "tiny", "--count-images", "0"]  # op counts are tested elsewhere and take a while


@pytest.mark.slow
@pytest.mark.skipif(shared_memory_problem() is not None, reason="no memfd_create here")
def test_bench_counts_host_cpu_and_bytes_for_both_ways_images_travel():
    args = [*TINY, "--pairs", "12", "--sizes", "320x240", "--max-pixels", "50176"]
    result = runner.invoke(app, [*args, "--workers", "1", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    shared, piped = out["host"]["shared_memory"], out["host"]["pipes"]
    _, grid_h, grid_w = grid_thw(240, 320, 3136, 50176)
    decoded = grid_h * grid_w * 14 * 14 * 3
    assert shared["pairs"] == piped["pairs"] == 12
    assert shared["images_through_shared_memory"] == 12 and piped["images_through_shared_memory"] == 0
    assert shared["shared_bytes_per_image"] > decoded and piped["shared_bytes_per_image"] == 0
    assert piped["pipe_bytes_per_image"] > decoded > 10 * shared["pipe_bytes_per_image"]
    for figures in (shared, piped):
        assert figures["main_cpu_ms_per_pair"] > 0 and figures["worker_cpu_ms_per_image"] > 0
    assert out["main_cpu_ms_per_pair"] == shared["main_cpu_ms_per_pair"]
    assert out["planner_window_rows"] == 12 and out["planner_stall_ms_per_window"] >= 0
    malloc = out["worker_cpu_ms_per_image_by_malloc"]
    assert set(malloc) == {"shared_memory_tuned", "shared_memory_glibc_default", "pipes_tuned", "pipes_glibc_default"}
    assert min(malloc.values()) > 0


def test_bench_without_workers_counts_the_main_process_alone():
    args = [*TINY, "--pairs", "2", "--sizes", "320x240", "--workers", "0", "--json"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert list(out["host"]) == ["inline"]
    assert out["main_cpu_ms_per_pair"] == out["host"]["inline"]["main_cpu_ms_per_pair"] > 0
    assert "worker_cpu_ms_per_image_by_malloc" not in out
    no_host = json.loads(runner.invoke(app, [*args, "--no-host"], catch_exceptions=False).stdout)
    assert "host" not in no_host and "main_cpu_ms_per_pair" not in no_host
