"""`annotate bench` prints its fields, worker processes do not change results, draft decoding stays faithful."""

import io
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from annotator.batching import smart_resize
from annotator.bench import (
    SyntheticImage,
    SyntheticPairs,
    parse_sizes,
    photo_like,
    psnr,
    synthetic_captions,
    write_pairs,
)
from annotator.cli import app
from annotator.images import ImageRef, decode_resized
from tests.conftest import CAPTIONS, MIXED_SIZES, jpeg_bytes, read_output, write_dataset, write_recipe

runner = CliRunner()
ON_GPU = torch.cuda.is_available()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def bench_tiny(*options: object) -> dict:
    """`annotate bench --model tiny --workers 0 --json` with `options`: its JSON, once it has exited 0."""
    result = invoke("bench", "--model", "tiny", "--workers", 0, *options, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_tiny_prints_every_field_as_json():
    out = bench_tiny(
        "--pairs", 6, "--sizes", "1600x1200,756x476", "--baseline", "--baseline-pairs", 2, "--count-images", 2,
        "--max-batch-size", 2,  # three batches: a steady rate after the first
    )  # fmt: skip
    assert out["model"] == "tiny" and out["pairs"] == 6 and out["errors"] == 0
    assert out["sizes"] == ["1600x1200:1", "756x476:1"] and out["image_format"] == "jpeg"
    assert out["device"].startswith("cuda" if ON_GPU else "cpu")
    for key in ("pairs_per_s", "tokens_per_s", "preprocess_images_per_s_per_core", "baseline_pairs_per_s"):
        assert out[key] > 0, key
    speedup = out["pairs_per_s"] / out["baseline_pairs_per_s"]  # the field is rounded to 2 decimals: 0.34 for 0.3354
    assert out["speedup_vs_baseline"] == pytest.approx(speedup, rel=0.01, abs=0.005)
    steady = out["steady_pairs_per_s"] / out["baseline_pairs_per_s"]
    assert out["steady_speedup_vs_baseline"] == pytest.approx(steady, rel=0.01, abs=0.005)
    assert 0 < out["padding_efficiency"] <= 1
    assert out["preprocess_images_per_s_per_core_no_draft"] > 0
    assert out["preprocess_by_size"]["1600x1200"]["psnr_db"] >= 40, "draft decoding applies to 1600x1200"
    assert out["preprocess_by_size"]["756x476"]["psnr_db"] is None, "no draft at the target size: identical"
    assert out["draft_min_psnr_db"] == out["preprocess_by_size"]["1600x1200"]["psnr_db"]
    assert out["mean_tokens_per_pair"] > 300, "max_pixels 307200 gives about 360 image tokens"
    assert out["peak_rss_gb"] > 0
    if not ON_GPU:
        assert out["mfu"] is None and out["peak_gpu_mem_gb"] is None
    assert out["forward"] == "lean" and out["compile"] == "auto"
    assert 0 < out["model_load_s"] < 60
    counts = out["op_counts"]
    assert counts["images"] == 2 and counts["grid"] == [1, 30, 48], "seed-sized: 756x476 at max_pixels 307200"
    lean, reference = counts["lean"], counts["transformers"]
    assert lean["host_syncs_per_batch"] == 0 and lean["sync_ops"] == {}
    assert reference["host_syncs_per_batch"] >= 32, "transformers syncs in each of the 32 vision blocks"
    assert 0 < lean["vision_ops"] < reference["vision_ops"] and 0 < lean["forward_ops"] < reference["forward_ops"]
    assert lean["vision_ops_per_image"] == lean["vision_ops"] / 2
    assert lean["vision_memory_mb_per_image"] > 0 and "vision_memory_mb_per_image" not in reference, "not comparable"


@pytest.mark.slow
def test_bench_devices_prints_the_scaling_of_one_writer_per_device():
    result = invoke(
        "bench", "--devices", "cpu,cpu", "--pairs", 24, "--sizes", "320x240", "--workers", 0, "--window", 4, "--json"
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["devices"] == "cpu,cpu" and out["window"] == 4 and "coordination" in out["note"]
    assert out["one_writer"]["writers"] == 1 and out["n_writers"]["writers"] == 2
    for run in (out["one_writer"], out["n_writers"]):
        assert run["windows"] == 6 and run["pairs_per_s"] > 0 and run["coordinator_ms_per_window"] > 0
        assert run["writers_ready_s"] > 0
    one, two = out["one_writer"]["pairs_per_s"], out["n_writers"]["pairs_per_s"]
    assert out["scaling_efficiency"] == pytest.approx(two / (2 * one), abs=0.001)


def test_bench_devices_refuses_too_few_windows_for_its_writers():
    result = invoke("bench", "--devices", "cpu,cpu", "--pairs", 8, "--sizes", "320x240", "--workers", 0, "--json")
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "1 window(s) of 8 rows for 2 writers" in said and "--pairs 32" in said


def test_bench_without_baseline_has_no_ratio():
    out = bench_tiny("--pairs", 2, "--sizes", "320x240", "--count-images", 0, "--forward", "transformers")
    assert out["baseline_pairs_per_s"] is None and out["speedup_vs_baseline"] is None
    assert out["steady_speedup_vs_baseline"] is None
    several = bench_tiny("--pairs", 6, "--sizes", "320x240", "--count-images", 0, "--max-batch-size", 2)
    assert several["steady_pairs_per_s"] > 0 and several["steady_speedup_vs_baseline"] is None, "no naive loop run"
    assert out["steady_pairs_per_s"] is None, "one batch has no steady state"
    assert out["op_counts"] is None and out["forward"] == "transformers"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "4000x"], "is not WIDTHxHEIGHT"),
        (["--sizes", "0x10"], "is not WIDTHxHEIGHT"),
        (["--format", "gif"], "use jpeg or png"),
        (["--pairs", "0"], "at least 1"),
        (["--count-images", "-1"], "--count-images must be 0"),
    ],
)
def test_bench_option_errors(args, message):
    result = invoke("bench", "--model", "tiny", *args)
    assert result.exit_code == 1 and message in result.output


def test_synthetic_pairs_follow_the_weights(tmp_path):
    sizes = parse_sizes("")
    images = [SyntheticImage(w, h, n, data=f"{w}x{h}".encode()) for w, h, n in sizes]  # bytes need not decode here
    cycle = sum(n for _, _, n in sizes)
    write_pairs(tmp_path / "p.parquet", SyntheticPairs(images, synthetic_captions()), 3 * cycle)
    table = pq.read_table(tmp_path / "p.parquet")
    counts = {}
    for value in table.column("image").to_pylist():
        counts[value["bytes"]] = counts.get(value["bytes"], 0) + 1
    assert counts == {f"{w}x{h}".encode(): 3 * n for w, h, n in sizes}
    assert len(set(table.column("caption").to_pylist())) == 3 * cycle, "captions vary row to row"


def test_worker_processes_give_the_same_results(tmp_path):
    truncated = jpeg_bytes(300, 200, seed=9)[:500]
    images = [jpeg_bytes(w, h, seed=i) for i, (w, h) in enumerate(MIXED_SIZES * 2)] + [b"not an image", truncated]
    captions = CAPTIONS + CAPTIONS[::-1] + ["a cat", "a dog"]
    parquet = write_dataset(tmp_path / "in.parquet", images, captions)
    tables = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        recipe = write_recipe(tmp_path / f"r{workers}.yaml", parquet, out, batching={"workers": workers})
        result = invoke("run", recipe, "--no-progress")
        assert result.exit_code == 0, result.output
        tables[workers] = read_output(out)
    serial, parallel = tables[0], tables[2]
    assert serial.num_rows == parallel.num_rows == 18
    assert serial.column("error").to_pylist() == parallel.column("error").to_pylist()
    assert serial.column("error").null_count == 16, "the two broken images are row errors, in both runs"
    assert serial.column("label").to_pylist() == parallel.column("label").to_pylist()
    for column in ("prob", "answer_mass"):
        a = np.array(serial.column(column).to_pylist(), dtype=np.float64)
        b = np.array(parallel.column(column).to_pylist(), dtype=np.float64)
        np.testing.assert_array_equal(a, b)  # same bytes, same plan, same batches: bit-identical


def test_jpeg_draft_decoding_stays_within_40_db_of_the_full_decode():
    """A 12 MP photo-like JPEG at max_pixels 307200: draft decodes at 1/4 scale, and must look the same."""
    buffer = io.BytesIO()
    photo_like(4000, 3000, seed=1).save(buffer, format="JPEG", quality=90)
    ref = ImageRef(data=buffer.getvalue())
    size = smart_resize(3000, 4000, 3136, 307200)
    assert size == (476, 616)
    drafted = decode_resized(ref, size, 10**9, draft=True)
    full = decode_resized(ref, size, 10**9, draft=False)
    with Image.open(io.BytesIO(ref.data)) as image:
        assert image.draft("RGB", (size[1], size[0])) is not None, "draft mode really reduces this image"
    quality = psnr(drafted, full)
    assert 40 <= quality < float("inf"), quality


def assert_ratio_of(ratio: float, seconds: dict[str, float]) -> None:
    """`ratio` is all / one of the unrounded times: the printed ones are rounded to the millisecond."""
    expected = seconds["all"] / seconds["one"]
    rounding = 0.0005 * (1 + expected) / seconds["one"] + 0.0005
    assert ratio == pytest.approx(expected, rel=0.01, abs=rounding)


def test_bench_questions_times_k_questions_against_one_on_the_same_images():
    out = bench_tiny("--pairs", 4, "--sizes", "756x476", "--count-images", 0, "--questions", 3)
    cost = out["question_cost"]
    assert out["questions"] == 3 and cost["questions"] == ["text", "watermark", "screenshot"]
    assert cost["pairs"] == 4 and cost["seconds"]["one"] > 0 and cost["seconds"]["all"] > 0
    assert_ratio_of(cost["measured_ratio"], cost["seconds"])
    if not ON_GPU:
        cpu = cost["cpu_seconds"]
        assert_ratio_of(cost["cpu_time_ratio"], cpu)
        assert cpu["one"] > 0
    # The image and the prefix are shared: three questions add only their own tokens.
    one, three = cost["tokens_per_pair"]["one"], cost["tokens_per_pair"]["all"]
    assert one < three < 3 * one
    assert 1 < cost["flop_ratio"] < 3
    assert out["errors"] == 0
    too_many = invoke("bench", "--model", "tiny", "--pairs", 1, "--questions", 99)
    assert too_many.exit_code == 1 and "--questions must be from 1 to 8" in too_many.output


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["graphs", "--batches", "abc"], "'abc' is not a list of batch sizes"),
        (["graphs", "--batches", "0"], "give positive numbers"),
        (["graphs", "--batches=-4"], "give positive numbers"),
        (["compile", "--dtype", "float64"], "invalid choice: 'float64'"),
        (["elementwise", "--compile"], "--compile applies to `profile` only"),
    ],
)
def test_bench_forward_refuses_bad_arguments_before_the_model_loads(argv, says, monkeypatch, capsys):
    """They failed with a ValueError or AttributeError traceback after the model had loaded."""
    from annotator import bench_forward

    monkeypatch.setattr(bench_forward, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("sys.argv", ["bench_forward", *argv])
    with pytest.raises(SystemExit) as done:
        bench_forward.main()
    assert done.value.code == 1 and says in capsys.readouterr().err


def test_bench_forward_profile_splits_the_forward_and_lists_kernels(monkeypatch, capsys):
    """The prepared GPU profile runs here on the tiny model: its stages (GPU timings: None on a CPU), then the top
    ops by self time."""
    from annotator import bench_forward

    monkeypatch.setattr("sys.argv", ["bench_forward", "profile"])
    bench_forward.main()
    printed = capsys.readouterr().out
    assert printed.count("GPU ms: vision tower, embeddings + decoder, head: None") == 3
    assert "aten::" in printed and "Self CPU time total" in printed


def test_bench_forward_elementwise_times_each_lean_piece_against_transformers(monkeypatch, capsys):
    """The prepared GPU command runs here on the tiny model (to check the script, not to time anything)."""
    from annotator import bench_forward

    monkeypatch.setattr("sys.argv", ["bench_forward", "elementwise"])
    bench_forward.main()
    printed = capsys.readouterr().out
    assert "vision rotary through the Triton kernel: False" in printed  # a CPU
    for piece in (
        "vision rotary (q and k)",
        "vision rotary, PyTorch's ops",
        "vision MLP",
        "patch embedding",
        "decoder RMSNorm",
    ):
        assert re.search(rf"{re.escape(piece)}: lean [\d.]+ ms, transformers [\d.]+ ms per batch", printed), printed
