"""Dataset cards: `load_dataset(RUN_DIR)` reads the run, the cards parse as DatasetCards with license, size,
source and split, a user's README.md is never overwritten, and the README's filter decodes no image."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import DatasetCard
from typer.testing import CliRunner

from annotator.card import _card_data, size_category
from annotator.cli import app
from tests.conftest import CAPTIONS, MIXED_SIZES, jpeg_bytes, read_output, run_once, write_dataset, write_recipe

runner = CliRunner()
LICENSED = "---\nlicense: cc-by-4.0\npretty_name: Demo photos\n---\n# Demo photos\n"


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def licensed_run(tmp_path_factory, tiny_model_cache) -> Path:
    """A run over a parquet folder whose dataset card states a license; two rows cannot be scored."""
    root = tmp_path_factory.mktemp("card-run")
    images = [jpeg_bytes(w, h, seed=i) for i, (w, h) in enumerate(MIXED_SIZES)] + [b"broken", None]
    parquet = write_dataset(root / "photos" / "data" / "train.parquet", images, CAPTIONS + ["x", "y"])
    (root / "photos" / "README.md").write_text(LICENSED)
    return run_once(root, write_recipe(root / "r.yaml", parquet, root / "run"), tiny_model_cache) / "run"


def test_load_dataset_of_the_run_folder_reads_its_data_only(licensed_run):
    import datasets

    loaded = datasets.load_dataset(str(licensed_run), split="train")
    assert len(loaded) == 10 and loaded["row_id"] == list(range(10))
    assert isinstance(loaded.features["image"], datasets.Image) and loaded.features["error_kind"].dtype == "string"
    assert loaded["error_kind"][8:] == ["decode: not an image", "image: missing"]
    card = DatasetCard.load(licensed_run / "README.md")
    assert card.data.license == "cc-by-4.0", "the input's license is carried over"
    assert card.data.size_categories == ["n<1K"]
    assert card.data.configs == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/part-*.parquet"}]}
    ]
    assert "10 rows, 8 scored, 2 with an error" in card.text and "prob        rows" in card.text
    assert str(licensed_run.parent) not in card.text.split("```python")[1], "the usage snippet is relative"


def test_the_readme_filter_decodes_no_image_and_error_kinds_group(licensed_run):
    import datasets
    import duckdb

    loaded = datasets.load_dataset(str(licensed_run), split="train")
    kept = loaded.filter(lambda label: label is True, input_columns="label")  # the README's line
    assert kept["row_id"] == [r["row_id"] for r in read_output(licensed_run).to_pylist() if r["label"]]
    with pytest.raises(Exception, match="(?i)image"):
        loaded.filter(lambda row: row["label"] is True)  # without input_columns: decodes "broken", and fails
    groups = duckdb.sql(
        f"SELECT error_kind, count(*) FROM read_parquet('{licensed_run}/data/*.parquet') "
        "WHERE error IS NOT NULL GROUP BY error_kind ORDER BY error_kind"
    ).fetchall()
    assert groups == [("decode: not an image", 1), ("image: missing", 1)]


def test_export_card_carries_license_size_split_histogram_and_a_relative_snippet(licensed_run, tmp_path):
    import datasets

    result = invoke("export", licensed_run, "--to", tmp_path / "kept", "--top-fraction", "0.5")
    assert result.exit_code == 0, result.output
    card = DatasetCard.load(tmp_path / "kept" / "README.md")
    assert card.data.license == "cc-by-4.0" and card.data.size_categories == ["n<1K"]
    assert card.data.annotations_creators == ["machine-generated"]
    assert card.data.configs[0]["data_files"] == [{"split": "train", "path": "data/train-*"}]
    assert "the top 0.5 of all rows by `prob` (5 rows" in card.text and "0.95-1.00" in card.text
    assert str(tmp_path) not in card.text and 'load_dataset("kept", split="train")' in card.text
    assert len(datasets.load_dataset(str(tmp_path / "kept"), split="train")) == 5


def test_a_user_readme_in_the_output_folder_is_never_overwritten(tmp_path, mixed_parquet):
    # A folder holding only the user's README.md is not a run folder: the run refuses it, touching nothing.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("my notes")
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out")
    assert invoke("run", recipe, "--no-progress").exit_code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md"]
    # In a run folder, the user's README.md (in place of the card) survives runs, --overwrite included.
    (tmp_path / "out" / "README.md").unlink()
    assert invoke("run", recipe, "--no-progress", "--limit", "3").exit_code == 0
    (tmp_path / "out" / "README.md").write_text("my notes")
    assert invoke("run", recipe, "--no-progress", "--overwrite").exit_code == 0
    assert (tmp_path / "out" / "README.md").read_text() == "my notes"


def test_a_dataset_split_is_kept_by_the_run_card_and_the_export(tmp_path):
    import datasets
    import yaml

    from tests.test_hf_source import hf_parquet_dataset, hf_recipe

    dataset = hf_parquet_dataset(tmp_path / "ds", rows=6)
    for shard in (dataset / "data").glob("train-*"):
        shard.rename(shard.with_name(shard.name.replace("train", "validation")))
    (dataset / "README.md").write_text(LICENSED)
    recipe = hf_recipe(tmp_path / "r.yaml", dataset, tmp_path / "out", True)
    data = yaml.safe_load(recipe.read_text())
    data["input"]["hf"]["split"] = "validation"
    recipe.write_text(yaml.safe_dump(data))
    assert invoke("run", recipe, "--no-progress").exit_code == 0
    assert len(datasets.load_dataset(str(tmp_path / "out"), split="validation")) == 6
    assert invoke("export", tmp_path / "out", "--to", tmp_path / "kept", "--min-prob", "0").exit_code == 0
    assert [p.name for p in (tmp_path / "kept" / "data").iterdir()] == ["validation-00000-of-00001.parquet"]
    card = DatasetCard.load(tmp_path / "kept" / "README.md")
    assert card.data.license == "cc-by-4.0" and "split `validation`" in card.text
    assert len(datasets.load_dataset(str(tmp_path / "kept"), split="validation")) == 6


def test_hf_input_keeps_its_split_name_and_hub_id():
    recipe = {"name": "coco", "input": {"hf": {"path": "jxie/coco_captions", "split": "validation[:10%]"}}}
    data = _card_data(
        recipe, {"license": "cc-by-4.0", "dataset": "jxie/coco_captions"}, 12_345, "data/x-*", "validation"
    )
    assert data.source_datasets == ["extended|jxie/coco_captions"] and data.size_categories == ["10K<n<100K"]
    from annotator.card import split_name

    assert split_name(recipe) == "validation"


@pytest.mark.parametrize(("rows", "category"), [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (10**9, "1B<n<10B")])
def test_size_category(rows, category):
    assert size_category(rows) == category


def test_a_readme_without_metadata_beside_the_input_prints_nothing(tmp_path):
    """huggingface_hub warned 'Repo card metadata block was not found' on stderr: a stray line in every run of such
    an input, and a line that is not JSON under --log-format json."""
    import logging

    from annotator.card import _input_license

    data = tmp_path / "in"
    data.mkdir()
    (data / "README.md").write_text("Photos of my cats, no metadata block.\n")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("huggingface_hub.repocard")
    logger.addHandler(handler)
    try:
        source = type("Source", (), {"fingerprint": lambda self: [{"file": str(data / "a.parquet")}]})()
        assert _input_license({"input": {"parquet": str(data)}}, source) is None
    finally:
        logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
