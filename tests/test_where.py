"""`export --where`: the expression language keeps exactly the rows it says, and every mistake names its place."""

import builtins

import pyarrow as pa
import pytest

from annotator.errors import AnnotatorError
from annotator.where import WhereFilter

TABLE = pa.table(
    {
        "row_id": pa.array([0, 1, 2, 3, 4], pa.int64()),
        "label_cat": [True, False, True, None, True],
        "label_text": [False, False, True, None, True],
        "prob_cat": pa.array([0.9, 0.1, 0.7, None, 0.55], pa.float32()),
        "answer_kind": ["photo", "drawing", "photo", None, "chart"],
        "probs_kind": [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], None, [0.1, 0.1, 0.8]],
        "error": [None, None, None, "decode: truncated", None],
    }
)


@pytest.mark.parametrize(
    ("expression", "kept"),
    [
        ("label_cat and not label_text", [0]),
        ("label_cat and label_text", [2, 4]),
        ("not (label_cat or label_text)", [1]),
        ("label_cat == true and label_text == false", [0]),
        ("label_cat != label_text", [0]),
        ("prob_cat >= 0.6", [0, 2]),
        ("prob_cat >= 0.7", [0]),  # the stored float32 0.7 is 0.69999999: compared as stored, as labels are decided
        ("prob_cat > 0.2 and prob_cat < 0.8", [2, 4]),
        ("prob_cat >= .55", [0, 2, 4]),
        ("prob_cat < 5e-1", [1]),
        ("answer_kind == 'photo'", [0, 2]),
        ('answer_kind != "photo" or label_cat', [0, 1, 2, 4]),
        ("answer_kind >= 'd'", [1, 2, 0]),  # strings compare in order: drawing, photo
        ("row_id >= 3", [4]),  # row 3 has an error: never kept, whatever the expression
        ("true", [0, 1, 2, 4]),
        ("row_id > -1 and row_id != -2.5e0", [0, 1, 2, 4]),  # negative numbers
        ("false", []),
        ("not not label_cat", [0, 2, 4]),
        ("(((label_cat)))", [0, 2, 4]),
        ("label_cat or label_text and false", [0, 2, 4]),  # `and` binds tighter than `or`
    ],
)
def test_expressions_keep_exactly_those_rows(expression, kept):
    mask = WhereFilter(expression, TABLE.schema).mask(TABLE)
    assert [i for i, keep in enumerate(mask.to_pylist()) if keep] == sorted(kept)


@pytest.mark.parametrize(
    ("expression", "message", "position"),
    [
        ("label_cat and nto label_text", "'nto' is not a column of this run", 15),
        ("label_cat = true", "`=` is not a comparison", 11),
        ("prob_cat > 0.2 < 0.8", "comparisons do not chain", 16),
        ("prob_cat", "the expression is a number, not true or false", 1),
        ("label_cat and prob_cat", "`and` needs true/false values, and this is a number", 15),
        ("not answer_kind", "`not` needs true/false values, and this is a string", 5),
        ("answer_kind == 1", "`==` compares a string with a number", 13),
        ("label_cat < false", "`<` does not apply to true/false values", 11),
        ("probs_kind == 1", "holds list<", 1),
        ("(label_cat or label_text", "expected `)` to close the `(` at character 1", 25),
        ("label_cat and", "the expression ends too soon", 14),
        ("", "the expression ends too soon", 1),
        ("label_cat label_text", "expected `and`, `or` or the end", 11),
        ("answer_kind == 'photo", "no closing quote", 16),
        ("label_cat; import os", "unexpected character ';'", 10),
        ("__import__('os').system('true')", "unexpected character '.'", 17),
        ("__import__('os')", "'__import__' is not a column", 1),
        ("answer_kind == B", "text is written in quotes, e.g. 'B'", 16),
        ("answer_kind == null", "is no null to compare with", 16),
        ("error == null", "column 'error' is null in every row `--where` can keep", 1),
        ("error != 'decode: truncated'", "a row with an error is never kept", 1),
        ("not " * 65 + "label_cat", "nests `not` and parentheses more than 64 deep", 257),
        ("(" * 65 + "label_cat" + ")" * 65, "nests `not` and parentheses more than 64 deep", 65),
        ("label_cat and " * 201 + "label_cat", "longer than 400 words", 2801),
    ],
)
def test_a_bad_expression_is_one_paragraph_naming_its_position(expression, message, position, monkeypatch):
    monkeypatch.setattr(builtins, "eval", lambda *a: pytest.fail("never Python's eval"))
    with pytest.raises(AnnotatorError) as error:
        WhereFilter(expression, TABLE.schema)
    text = str(error.value)
    assert message in text and f"(at character {position})" in text
    shown = expression if len(expression) <= 200 else expression[:197] + "..."
    assert text.startswith(f"--where {shown!r}: ") and "\n" not in text and len(text) < 1000
