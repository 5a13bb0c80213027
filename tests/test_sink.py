"""The sink's `error_kind` column and the rule that a committed window must hold every row it now should."""

from __future__ import annotations

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from annotator.cli import app
from annotator.questions import resolve_questions
from annotator.recipe import PromptConfig
from annotator.scoring import Score
from annotator.sink import output_schema, window_is_whole, window_table
from tests.conftest import jpeg_bytes, write_dataset, write_recipe


def test_error_kind_is_the_error_without_its_detail():
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    questions = resolve_questions(PromptConfig())
    schema = output_schema(pa.schema([("image", image)]), "image", questions)
    table = pa.table({"image": pa.array([None, None, None], image)})
    errors = [None, "decode: truncated image (image file is truncated (3 bytes not processed))", "text: empty"]
    out = window_table(table, schema, 0, [Score(((0.5, 0.5),), (1.0,)), None, None], errors, questions)
    assert out.column("error_kind").to_pylist() == [None, "decode: truncated image", "text: empty"]
    assert out.column("error").to_pylist() == errors, "the readable message is kept whole"
    assert b'"error_kind": {"dtype": "string"' in out.schema.metadata[b"huggingface"]


def test_an_input_column_named_error_kind_is_a_user_error(tmp_path):
    parquet = write_dataset(tmp_path / "in.parquet", [jpeg_bytes(32, 32)], ["a cat"], error_kind=["mine"])
    result = CliRunner().invoke(app, ["run", str(write_recipe(tmp_path / "r.yaml", parquet, tmp_path / "out"))])
    assert result.exit_code == 1 and "already has column(s) error_kind" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("record", "manifest", "whole"),
    [
        ({"start": 0, "rows": 6}, {"window": 6, "total_rows": 15}, True),
        ({"start": 12, "rows": 3}, {"window": 6, "total_rows": 15}, True),  # the last window of 15 rows
        ({"start": 12, "rows": 3}, {"window": 6, "total_rows": 40}, False),  # ... after the limit grew to 40
        ({"start": 12, "rows": 3}, {"window": 6, "total_rows": None, "limit": None}, True),  # a stream that ended
        ({"start": 12, "rows": 3, "limit": 15}, {"window": 6, "total_rows": None, "limit": None}, False),  # cut
        ({"start": 12, "rows": 3, "limit": 15}, {"window": 6, "total_rows": None, "limit": 15}, True),
        ({"start": 12, "rows": 3, "limit": 15}, {"window": 6, "total_rows": None, "limit": 30}, False),
        ({"start": 12, "rows": 2, "limit": 15}, {"window": 6, "total_rows": None, "limit": 30}, True),  # ended at 14
        ({"start": 0, "rows": 3}, {}, True),  # no manifest: nothing to compare with
    ],
)
def test_a_window_is_whole_when_it_holds_every_row_it_now_should(record, manifest, whole):
    assert window_is_whole(record, manifest) is whole
