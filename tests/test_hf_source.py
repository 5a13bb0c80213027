"""Hugging Face input: local datasets (parquet, imagefolder) streamed or prepared, exact resume, readable output."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from annotator.cli import app
from annotator.errors import AnnotatorError
from annotator.hf_source import HFSource
from annotator.recipe import HFInput, InputConfig, PromptConfig
from tests.conftest import (
    CAPTIONS,
    MIXED_SIZES,
    REPO,
    Pause,
    jpeg_bytes,
    read_output,
    write_dataset,
    write_recipe,
)

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def hf_parquet_dataset(folder: Path, rows: int, row_group: int = 3) -> Path:
    """A local Hub-style dataset: `data/train-*.parquet` written by `datasets`, an Image feature, small row groups."""
    from datasets import Dataset, Features, Image, Value

    sizes = (MIXED_SIZES * (rows // len(MIXED_SIZES) + 1))[:rows]
    dataset = Dataset.from_dict(
        {
            "image": [{"bytes": jpeg_bytes(w, h, seed=i), "path": f"{i}.jpg"} for i, (w, h) in enumerate(sizes)],
            "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)],
            "idx": list(range(rows)),
        },
        features=Features({"image": Image(), "caption": Value("string"), "idx": Value("int64")}),
    )
    (folder / "data").mkdir(parents=True)
    for shard, rows_of_shard in enumerate([range(rows // 2), range(rows // 2, rows)]):
        target = folder / "data" / f"train-{shard:05d}-of-00002.parquet"
        dataset.select(rows_of_shard).to_parquet(str(target), batch_size=row_group)
    return folder


def imagefolder_dataset(folder: Path, rows: int) -> Path:
    """An image folder with captions in metadata.csv, as `datasets` documents it."""
    folder.mkdir(parents=True)
    lines = ["file_name,caption,idx"]
    for i in range(rows):
        (folder / f"{i:03d}.jpg").write_bytes(jpeg_bytes(*MIXED_SIZES[i % len(MIXED_SIZES)], seed=i))
        lines.append(f'{i:03d}.jpg,"{CAPTIONS[i % len(CAPTIONS)]}",{i}')
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def as_plain_parquet(dataset: Path, target: Path) -> Path:
    """The same rows as one parquet file with the images as bytes: the `input.parquet` path to compare against."""
    if (dataset / "metadata.csv").exists():
        with open(dataset / "metadata.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        images = [(dataset / row["file_name"]).read_bytes() for row in rows]
        captions = [row["caption"] for row in rows]
    else:
        table = pa.concat_tables(pq.read_table(f) for f in sorted((dataset / "data").glob("*.parquet")))
        images, captions = table.column("image").to_pylist(), table.column("caption").to_pylist()
    return write_dataset(target, images, captions)


def hf_recipe(path: Path, dataset: Path | str, output: Path, streaming: bool, **sections) -> Path:
    recipe = write_recipe(path, "unused", output, **sections)
    data = yaml.safe_load(recipe.read_text())
    data["input"].pop("parquet")
    data["input"]["hf"] = {"path": str(dataset), "streaming": streaming}
    recipe.write_text(yaml.safe_dump(data))
    return recipe


def annotated(output: Path) -> tuple[list[int], np.ndarray]:
    table = read_output(output)
    return table.column("row_id").to_pylist(), np.array(table.column("prob").to_pylist(), dtype=np.float64)


def source(dataset: Path | str, streaming: bool = True, limit: int | None = None, **hf) -> HFSource:
    config = InputConfig(hf=HFInput(path=str(dataset), streaming=streaming, **hf), limit=limit)
    return HFSource(config, PromptConfig())


# --- windows: the unit of output and of resume ------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("kind", ["parquet", "imagefolder"])
def test_windows_start_anywhere_and_match_a_full_read(tmp_path, kind, streaming):
    make = hf_parquet_dataset if kind == "parquet" else imagefolder_dataset
    dataset = make(tmp_path / "ds", rows=23)
    full = [(w.index, w.start, w.table.column("idx").to_pylist()) for w in source(dataset, streaming).windows(4)]
    assert [i for _, _, ids in full for i in ids] == list(range(23))
    for first in range(len(full) + 1):
        resumed = [
            (w.index, w.start, w.table.column("idx").to_pylist()) for w in source(dataset, streaming).windows(4, first)
        ]
        assert resumed == full[first:]
    limited = source(dataset, streaming, limit=10)
    # A streamed image folder's length is unknown until read; the limit still ends it.
    assert limited.total_rows == (None if kind == "imagefolder" and streaming else 10)
    assert [w.table.num_rows for w in limited.windows(4)] == [4, 4, 2]
    only = next(limited.windows(4, 1, columns=["image"]))
    assert only.table.column_names == ["image"] and only.base_dirs == [None] * 4


@pytest.fixture
def parquet_rows_read(monkeypatch) -> list[int]:
    """Rows of every parquet batch read from now on."""
    rows_read: list[int] = []
    iter_batches = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            rows_read.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    return rows_read


def test_streamed_resume_never_reads_the_committed_row_groups(tmp_path, parquet_rows_read):
    """Resuming at 90% reads at most one row group before the resume point, not the 90% before it."""
    dataset = hf_parquet_dataset(tmp_path / "ds", rows=60, row_group=3)
    stream = source(dataset)
    assert stream.total_rows == 60
    assert sum(w.rows for w in stream.windows(5)) == 60 and sum(parquet_rows_read) == 60
    parquet_rows_read.clear()
    resumed = list(source(dataset).windows(5, first=11))
    assert [w.start for w in resumed] == [55] and resumed[0].table.column("idx").to_pylist() == list(range(55, 60))
    # Row 55 is inside the row group 54-56: only that group's earlier row is read in vain.
    assert sum(parquet_rows_read) == 5 + 1, f"resume read {sum(parquet_rows_read)} rows to annotate 5"


def test_fingerprint_changes_with_the_data_and_not_otherwise(tmp_path):
    dataset = hf_parquet_dataset(tmp_path / "ds", rows=8)
    before = source(dataset).fingerprint()
    json.dumps(before)
    assert source(dataset).fingerprint() == before
    first = sorted((dataset / "data").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(first).slice(0, 2), first)
    assert source(dataset).fingerprint() != before


def test_remote_image_paths_are_fetched_as_bytes(tmp_path):
    """An image folder streamed from the Hub gives paths like hf://...; the source fetches their bytes."""
    import fsspec
    from datasets import Features, Image, Value

    memory = fsspec.filesystem("memory")
    images = [jpeg_bytes(40, 30, seed=i) for i in range(3)]
    for i, data in enumerate(images):
        memory.pipe(f"/remote/{i}.jpg", data)
    structs = [{"bytes": None, "path": f"memory://remote/{i}.jpg"} for i in range(3)]
    structs[1] = {"bytes": images[1], "path": None}
    structs += [None, {"bytes": None, "path": "memory://remote/gone.jpg"}]
    schema = Features({"image": Image(), "caption": Value("string")}).arrow_schema
    pq.write_table(pa.table({"image": structs, "caption": list("abcde")}, schema=schema), tmp_path / "remote.parquet")
    window = next(source("parquet", data_files=str(tmp_path / "remote.parquet")).windows(8))
    fetched = window.table.column("image").to_pylist()
    assert [v["bytes"] for v in fetched[:3]] == images
    assert fetched[3] is None, "a missing image stays missing"
    assert fetched[4] == {"bytes": None, "path": "memory://remote/gone.jpg"}, "a failed download keeps its path"


@pytest.mark.parametrize(
    ("hf", "expected"),
    [
        ({"path": "no-such-user/no-such-dataset"}, "`input.hf.path` = 'no-such-user/no-such-dataset'"),
        ({"path": "missing_folder"}, "Set `input.hf.path` to a Hub id"),
        ({"path": "DATASET", "split": "validation"}, "split='validation'): Bad split: validation"),
        ({"path": "DATASET", "name": "nope"}, "BuilderConfig 'nope' not found"),
    ],
)
def test_unloadable_datasets_are_user_errors(tmp_path, hf, expected):
    dataset = hf_parquet_dataset(tmp_path / "ds", rows=4)
    hf = {k: (str(dataset) if v == "DATASET" else v) for k, v in hf.items()}
    with pytest.raises(AnnotatorError, match=re.escape(expected)):
        HFSource(InputConfig(hf=HFInput(**hf)), PromptConfig())


def test_missing_column_is_reported_before_the_model_loads(tmp_path):
    dataset = hf_parquet_dataset(tmp_path / "ds", rows=4)
    recipe = hf_recipe(tmp_path / "r.yaml", dataset, tmp_path / "out", True, input={"text_column": "text"})
    result = invoke("run", recipe, "--no-progress")
    assert result.exit_code == 1
    assert "Column 'text' (`input.text_column`) is not in the Hugging Face dataset" in result.output


# --- end to end: same results as the parquet path ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parquet", "imagefolder"])
def test_hf_input_gives_the_parquet_inputs_results(tmp_path, kind):
    rows = 12
    if kind == "parquet":
        dataset = hf_parquet_dataset(tmp_path / "ds", rows=rows)
    else:
        dataset = imagefolder_dataset(tmp_path / "ds", rows=rows)
    plain = as_plain_parquet(dataset, tmp_path / "plain.parquet")
    assert invoke("run", write_recipe(tmp_path / "p.yaml", plain, tmp_path / "out-p"), "--no-progress").exit_code == 0
    expected_ids, expected = annotated(tmp_path / "out-p")
    assert expected_ids == list(range(rows))
    for streaming in (True, False):
        output = tmp_path / f"out-{streaming}"
        result = invoke("run", hf_recipe(tmp_path / "r.yaml", dataset, output, streaming), "--no-progress")
        assert result.exit_code == 0, result.output
        row_ids, probs = annotated(output)
        assert row_ids == expected_ids
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        assert read_output(output).column("caption").to_pylist() == pq.read_table(plain).column("caption").to_pylist()


def test_output_of_hf_input_loads_with_datasets_pandas_duckdb_and_polars(tmp_path):
    import datasets
    import duckdb
    import pandas
    import polars

    dataset = hf_parquet_dataset(tmp_path / "ds", rows=10)
    output = tmp_path / "out"
    assert invoke("run", hf_recipe(tmp_path / "r.yaml", dataset, output, True), "--no-progress").exit_code == 0
    pattern = str(output / "data" / "*.parquet")
    loaded = datasets.load_dataset("parquet", data_files=pattern, split="train")
    assert isinstance(loaded.features["image"], datasets.Image) and loaded.features["image"].decode
    assert loaded.features["prob"].dtype == "float32" and loaded.features["label"].dtype == "bool"
    assert loaded.features["error"].dtype == "string" and loaded.features["row_id"].dtype == "int64"
    assert [loaded[i]["image"].size for i in range(3)] == [MIXED_SIZES[i] for i in range(3)]
    table = read_output(output)
    via_duckdb = duckdb.sql(f"SELECT row_id, prob FROM read_parquet('{pattern}') ORDER BY row_id").fetchall()
    assert via_duckdb == list(zip(table.column("row_id").to_pylist(), table.column("prob").to_pylist(), strict=True))
    via_polars = polars.scan_parquet(pattern).select("row_id", "prob", "label").collect()
    assert via_polars["row_id"].to_list() == list(range(10))
    assert via_polars["prob"].to_list() == table.column("prob").to_pylist()
    assert pandas.read_parquet(output / "data")["row_id"].tolist() == list(range(10))


# --- resume of a streamed run after kill -9 ---------------------------------------------------------------------


def test_streamed_run_killed_with_sigkill_resumes_exactly(tmp_path, tiny_model_cache, parquet_rows_read, monkeypatch):
    from annotator.sink import RunFolder

    dataset = hf_parquet_dataset(tmp_path / "ds", rows=48, row_group=3)
    batching = {"window": 4, "max_batch_size": 4, "workers": 0}
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    recipe = hf_recipe(tmp_path / "k.yaml", dataset, killed, True, batching=batching)
    command = [sys.executable, "-c", "from annotator.cli import main; main()", "run", str(recipe), "--no-progress"]
    # The kill comes while the writer is about to commit window 3 (three committed, the run far from its end), on any
    # machine: the writer waits there until it does.
    pause = Pause(monkeypatch, tmp_path, window=3).hold()
    env = {**os.environ, "ANNOTATOR_CACHE": str(tiny_model_cache)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        pause.writer(process)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        pause.release()
        process.kill()  # the run is dead or dies here: a failed wait leaves no process behind
        process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    process.stderr.close()
    committed = len(RunFolder(killed).committed())
    assert 3 <= committed < 12 and not (killed / "summary.json").exists()

    parquet_rows_read.clear()
    result = invoke("resume", killed, "--no-progress")
    assert result.exit_code == 0, result.output
    remaining = 48 - 4 * committed
    assert remaining <= sum(parquet_rows_read) < remaining + 3, "resume read rows of committed windows"

    result = invoke("run", hf_recipe(tmp_path / "w.yaml", dataset, whole, True, batching=batching), "--no-progress")
    assert result.exit_code == 0, result.output
    resumed_ids, resumed = annotated(killed)
    whole_ids, expected = annotated(whole)
    assert resumed_ids == whole_ids == list(range(48)), "every row once, in order"
    np.testing.assert_array_equal(resumed, expected)
    assert json.loads((killed / "summary.json").read_text())["rows"] == 48


# --- the Hub recipe, run against a local copy -------------------------------------------------------------------


def test_coco_captions_recipe_runs_on_a_local_copy(tmp_path):
    """recipes/coco_captions.yaml streams a Hub dataset; here the same recipe reads a local copy of its layout."""
    from datasets import Dataset, Features, Image, Value

    recipe = yaml.safe_load((REPO / "recipes" / "coco_captions.yaml").read_text())
    hf = recipe["input"]["hf"]
    assert hf["streaming"] and recipe["input"]["limit"] and "/" in hf["path"]
    copy = tmp_path / "coco_captions"
    features = Features(
        {"image": Image(), "filename": Value("string"), "cocoid": Value("int64"), "caption": Value("string")}
    )
    rows = 10
    Dataset.from_dict(
        {
            "image": [{"bytes": jpeg_bytes(64 + 8 * i, 48, seed=i), "path": None} for i in range(rows)],
            "filename": [f"COCO_val2014_{i:012d}.jpg" for i in range(rows)],
            "cocoid": list(range(rows)),
            "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)],
        },
        features=features,
    ).to_parquet(str(copy / "data" / f"{hf['split']}-00000-of-00001.parquet"))
    recipe["input"]["hf"] = {**hf, "path": str(copy), "data_files": None}
    recipe["model"]["name"] = "tiny"  # the real model cannot be downloaded here
    recipe["output"]["dir"] = str(tmp_path / "out")
    (tmp_path / "coco.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True))
    result = invoke("run", tmp_path / "coco.yaml", "--no-progress")
    assert result.exit_code == 0, result.output
    table = read_output(tmp_path / "out")
    assert table.num_rows == min(rows, recipe["input"]["limit"])
    assert table.column("caption").to_pylist() == [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)]
    assert table.column("error").null_count == rows
