"""`annotate export`: exactly the filtered rows, sharded, with a card, loadable by `datasets`; clear refusals."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from annotator.cli import app
from tests.conftest import CAPTIONS, MIXED_SIZES, jpeg_bytes, read_output, write_dataset, write_recipe

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_cache) -> Path:
    """One finished run of 18 rows, two of them errors, shared by every test here (export only reads it)."""
    root = tmp_path_factory.mktemp("export-run")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ANNOTATOR_CACHE", str(tiny_model_cache))
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.chdir(root)
        images = [jpeg_bytes(w, h, seed=i) for i, (w, h) in enumerate(MIXED_SIZES * 2)] + [b"not an image", None]
        parquet = write_dataset(root / "in.parquet", images, CAPTIONS + CAPTIONS[::-1] + ["broken", "missing"])
        result = invoke("run", write_recipe(root / "r.yaml", parquet, root / "run"), "--no-progress")
        assert result.exit_code == 0, result.output
    return root / "run"


def rows_of(folder: Path) -> dict[str, list]:
    """The exported dataset's columns, read shard by shard in name order."""
    merged: dict[str, list] = {}
    for f in sorted((folder / "data").glob("*.parquet")):
        for key, values in pq.read_table(f).to_pydict().items():
            merged.setdefault(key, []).extend(values)
    return merged


def expected_ids(run: Path, keep) -> tuple[list[int], list[int]]:
    table = read_output(run).to_pylist()
    kept = [r["row_id"] for r in table if r["error"] is None and keep(r)]
    return kept, [r["row_id"] for r in table if r["row_id"] not in kept]


def test_default_export_keeps_label_true_sharded_with_a_card(finished_run, tmp_path):
    result = invoke(
        "export", finished_run, "--to", tmp_path / "kept", "--rejected", tmp_path / "rest", "--rows-per-shard", "5"
    )
    assert result.exit_code == 0, result.output
    kept, rest = expected_ids(finished_run, lambda r: r["label"])
    assert rows_of(tmp_path / "kept")["row_id"] == kept
    assert rows_of(tmp_path / "rest")["row_id"] == rest
    assert {16, 17} <= set(rest), "rows with an error are rejected"
    shards = sorted(p.name for p in (tmp_path / "kept" / "data").iterdir())
    count = max(1, math.ceil(len(kept) / 5))
    assert shards == [f"train-{i:05d}-of-{count:05d}.parquet" for i in range(count)]
    card = (tmp_path / "kept" / "README.md").read_text()
    facts = [
        "`test`",
        "`tiny`",
        "prob >= 0.5",
        "label == true",
        f"{len(kept)} kept, {len(rest)} rejected",
        "| 2 row(s) could not be scored",
    ]
    for fact in facts:
        assert fact in card, fact
    assert f"kept {len(kept)} rows" in result.output


def test_min_prob_keeps_exactly_those_rows_and_never_an_error(finished_run, tmp_path):
    probs = [p for p in read_output(finished_run).column("prob").to_pylist() if p is not None]
    median = float(np.median(probs))
    assert invoke("export", finished_run, "--to", tmp_path / "a", "--min-prob", median).exit_code == 0
    kept, _ = expected_ids(finished_run, lambda r: r["prob"] >= median)
    assert 0 < len(kept) < 16 and rows_of(tmp_path / "a")["row_id"] == kept
    assert invoke("export", finished_run, "--to", tmp_path / "b", "--min-prob", "0").exit_code == 0
    assert rows_of(tmp_path / "b")["row_id"] == list(range(16)), "every scored row, no row with an error"


def test_label_false_and_dropped_columns(finished_run, tmp_path):
    result = invoke(
        "export", finished_run, "--to", tmp_path / "neg", "--label", "false", "--drop-columns", "answer_mass, error"
    )
    assert result.exit_code == 0, result.output
    kept, _ = expected_ids(finished_run, lambda r: r["label"] is False)
    table = pq.read_table(sorted((tmp_path / "neg" / "data").glob("*.parquet"))[0])
    assert "answer_mass" not in table.column_names and "error" not in table.column_names
    assert b"answer_mass" not in table.schema.metadata[b"huggingface"]
    assert rows_of(tmp_path / "neg")["row_id"] == kept


def test_exported_dataset_loads_with_datasets_images_intact(finished_run, tmp_path):
    import datasets

    assert (
        invoke("export", finished_run, "--to", tmp_path / "out", "--min-prob", "0", "--rows-per-shard", "7").exit_code
        == 0
    )
    by_files = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    by_folder = datasets.load_dataset(str(tmp_path / "out"), split="train")
    for loaded in (by_files, by_folder):
        assert len(loaded) == 16 and isinstance(loaded.features["image"], datasets.Image)
        assert loaded.features["prob"].dtype == "float32" and loaded.features["label"].dtype == "bool"
        assert [loaded[i]["image"].size for i in (0, 9)] == [MIXED_SIZES[0], MIXED_SIZES[1]]


def test_an_export_that_keeps_nothing_still_has_the_schema(finished_run, tmp_path):
    assert invoke("export", finished_run, "--to", tmp_path / "none", "--min-prob", "1").exit_code == 0
    kept, _ = expected_ids(finished_run, lambda r: r["prob"] >= 1.0)
    assert kept == []
    table = pq.read_table(tmp_path / "none" / "data" / "train-00000-of-00001.parquet")
    assert table.num_rows == 0 and table.schema.equals(read_output(finished_run).schema, check_metadata=True)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--min-prob", "0.5", "--label", "true"],
            "one of --min-prob, --label, --top-fraction or --where, not several",
        ),
        (["--top-fraction", "0.3", "--min-prob", "0.5"], "not several"),
        (["--top-fraction", "0.3", "--label", "true"], "not several"),
        (["--top-fraction", "0"], "is not a fraction"),
        (["--top-fraction", "1.5"], "is not a fraction"),
        (["--label", "yes"], "give --label true or --label false"),
        (["--min-prob", "2"], "is not a probability"),
        (["--drop-columns", "prob,colour"], "--drop-columns names colour"),
        (["--rejected", "TO"], "two separate folders"),
        (["--rejected", "TO/rest"], "two separate folders"),
        (["--rows-per-shard", "0"], "must be at least 1"),
        ([], "is not an empty folder"),
    ],
)
def test_bad_exports_are_refused_before_writing(finished_run, tmp_path, args, expected):
    to = tmp_path / "to"
    if expected == "is not an empty folder":
        to.mkdir()
        (to / "keep.txt").write_text("mine")
    args = [str(to) if a == "TO" else str(to / "rest") if a == "TO/rest" else a for a in args]
    result = invoke("export", finished_run, "--to", to, *args)
    assert result.exit_code == 1
    assert expected in result.output.replace("\n", " ")
    assert not (to / "data").exists()


def test_unfinished_runs_and_other_folders_are_refused(finished_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished_run, unfinished)
    (unfinished / "summary.json").unlink()
    result = invoke("export", unfinished, "--to", tmp_path / "a")
    assert result.exit_code == 1 and "annotate resume" in result.output
    result = invoke("export", tmp_path, "--to", tmp_path / "b")
    assert result.exit_code == 1 and "is not a run folder" in result.output


# --- --top-fraction ----------------------------------------------------------------------------------------------


def top_rows(probs: list, fraction: float) -> list[int]:
    """The brute-force answer: round(F x rows) rows (halves up), by prob descending then row id, never an error."""
    from fractions import Fraction

    wanted = math.floor(Fraction(repr(fraction)) * len(probs) + Fraction(1, 2))
    scored = sorted((-p, i) for i, p in enumerate(probs) if p is not None)
    return sorted(i for _, i in scored[:wanted])


@pytest.mark.parametrize("fraction", [0.3, 0.05, 0.5, 0.95, 1.0])
def test_top_fraction_keeps_exactly_the_top_rows_ties_to_the_lower_row_id(tmp_path, fraction):
    from annotator.fake_run import write_fake_run

    rng = np.random.default_rng(11)
    probs = [float(v) for v in np.float32(rng.choice([0.0, 0.1, 0.5, 0.7, 0.70000005, 0.9, 1.0], 203))]
    for i in rng.choice(203, 12, replace=False):
        probs[i] = None
    folder = write_fake_run(tmp_path / "run", window=16, probs=probs)
    result = invoke("export", folder.root, "--to", tmp_path / "kept", "--rejected", tmp_path / "rest",
                    "--top-fraction", fraction, "--rows-per-shard", "7")  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = top_rows(probs, fraction)
    assert rows_of(tmp_path / "kept")["row_id"] == expected
    assert rows_of(tmp_path / "rest")["row_id"] == sorted(set(range(203)) - set(expected))
    ranked = sorted(-p for p in probs if p is not None)
    if fraction < 0.9:  # the cut falls inside a run of equal probs: row ids decide
        assert ranked[len(expected) - 1] == ranked[len(expected)]
    else:
        assert len(expected) == len(ranked), "more rows asked than scored: every scored row, no error row"


def test_top_fraction_rounds_halves_up_and_reads_only_the_prob_column_to_choose(tmp_path, monkeypatch):
    from annotator.fake_run import write_fake_run

    folder = write_fake_run(tmp_path / "run", window=4, probs=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, None])
    columns: list = []
    original = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        columns.append(kwargs.get("columns"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    assert invoke("export", folder.root, "--to", tmp_path / "a", "--top-fraction", "0.25").exit_code == 0
    assert rows_of(tmp_path / "a")["row_id"] == [6, 7, 8], "0.25 x 10 rows = 2.5 -> 3"
    assert columns.count(["prob"]) == 2 * 3 and columns.count(None) == 3, "two passes over prob, one export pass"
    assert invoke("export", folder.root, "--to", tmp_path / "b", "--top-fraction", "0.3").exit_code == 0
    assert rows_of(tmp_path / "b")["row_id"] == [6, 7, 8], "0.3 x 10 is 3, not 4 from 3.0000000000000004"


def test_where_keeps_the_rows_of_an_expression_over_several_questions(questions_run, tmp_path):
    result = invoke(
        "export",
        questions_run,
        "--to",
        tmp_path / "kept",
        "--rejected",
        tmp_path / "rest",
        "--where",
        "label_cat and not label_text or answer_kind == 'B'",
    )
    assert result.exit_code == 0, result.output
    kept, rest = expected_ids(
        questions_run, lambda r: (r["label_cat"] and not r["label_text"]) or r["answer_kind"] == "B"
    )
    assert 0 < len(kept) < 8, "the expression must split the rows, or the test proves nothing"
    assert rows_of(tmp_path / "kept")["row_id"] == kept
    assert rows_of(tmp_path / "rest")["row_id"] == rest
    card = (tmp_path / "kept" / "README.md").read_text()
    for fact in (
        "label_cat and not label_text or answer_kind == 'B'",
        "`label_cat` = prob_cat >= 0.6",
        "Related to {text}?",
        "`A` / `B` / `C`",
        "`answer_kind` (the most likely)",
        "`prob_cat` over every row of the run:",
        "`prob_text` over every row of the run:",
    ):
        assert fact in card, fact


def test_label_or_min_prob_on_a_run_of_several_questions_points_to_where(questions_run, tmp_path):
    result = invoke("export", questions_run, "--to", tmp_path / "kept")
    assert result.exit_code == 1
    assert "no `label` column" in result.output and "--where" in result.output and "label_cat" in result.output
    assert not (tmp_path / "kept").exists()
    both = invoke("export", questions_run, "--to", tmp_path / "kept", "--where", "label_cat", "--min-prob", "0.5")
    assert both.exit_code == 1 and "not several" in both.output
    bad = invoke("export", questions_run, "--to", tmp_path / "kept", "--where", "label_dog")
    assert bad.exit_code == 1 and "'label_dog' is not a column of this run" in bad.output
    assert not (tmp_path / "kept").exists(), "nothing is written for a bad expression"


def test_where_on_a_single_question_run_equals_min_prob(finished_run, tmp_path):
    assert invoke("export", finished_run, "--to", tmp_path / "a", "--min-prob", "0.6").exit_code == 0
    assert invoke("export", finished_run, "--to", tmp_path / "b", "--where", "prob >= 0.6").exit_code == 0
    assert rows_of(tmp_path / "a")["row_id"] == rows_of(tmp_path / "b")["row_id"]


def test_label_filters_never_read_an_input_column_of_that_name_in_a_run_of_answers(tmp_path, tiny_model_cache):
    """A run of `prompt.answers` writes no `label`/`prob`: the input's own `label` and `prob` columns are not its."""
    images = [jpeg_bytes(w, h, seed=i) for i, (w, h) in enumerate(MIXED_SIZES)]
    n = len(images)
    parquet = write_dataset(tmp_path / "in.parquet", images, CAPTIONS[:n], label=[True] * n, prob=[0.9] * n)
    recipe = write_recipe(tmp_path / "r.yaml", parquet, tmp_path / "run", prompt={"answers": ["A", "B"]})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ANNOTATOR_CACHE", str(tiny_model_cache))
        assert invoke("run", recipe, "--no-progress").exit_code == 0
    for args in ([], ["--min-prob", "0.5"], ["--top-fraction", "0.5"]):
        result = invoke("export", tmp_path / "run", "--to", tmp_path / "kept", *args)
        said = " ".join(result.output.split())
        assert result.exit_code == 1 and "its columns are answer." in said and "--where \"answer == 'A'\"" in said
    assert not (tmp_path / "kept").exists()
