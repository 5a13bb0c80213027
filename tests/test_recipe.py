"""Recipe loading: defaults, --set overrides and their precedence, result fingerprints."""

from pathlib import Path

import pytest
import yaml

from annotator.errors import AnnotatorError
from annotator.recipe import SEED_QUESTION, load_recipe, parse_overrides

BASE = {"name": "r", "input": {"parquet": "x.parquet"}, "batching": {"max_batch_size": 16}}


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def test_defaults_are_the_contracts(recipe_file):
    recipe = load_recipe(recipe_file)
    assert recipe.model.name == "Qwen/Qwen2-VL-2B-Instruct"
    assert (recipe.model.min_pixels, recipe.model.max_pixels) == (3136, 307200)
    assert recipe.prompt.question == SEED_QUESTION
    assert (recipe.prompt.positive, recipe.prompt.negative) == ("Y", "N")
    assert (recipe.batching.max_batch_tokens, recipe.batching.window) == (32768, 4096)
    assert recipe.output_dir.as_posix() == "outputs/r"
    assert recipe.output.threshold == 0.5


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (["model.name=tiny"], lambda r: r.model.name == "tiny"),
        (["batching.max_batch_size=8"], lambda r: r.batching.max_batch_size == 8),  # command line beats the file
        (["batching.max_batch_size=0x10"], lambda r: r.batching.max_batch_size == 16),
        (["output.threshold=0"], lambda r: r.output.threshold == 0.0),  # a zero is applied, not dropped
        (["prompt.query=a=b"], lambda r: r.prompt.query == "a=b"),
        (["input.id_column=null"], lambda r: r.input.id_column is None),
        (["prompt.query="], lambda r: r.prompt.query == ""),
    ],
)
def test_set_overrides(recipe_file, overrides, check):
    recipe = load_recipe(recipe_file, overrides)
    assert check(recipe)
    assert recipe.batching.window == 4096, "keys that were not set keep their values"


def test_file_values_beat_defaults(recipe_file):
    assert load_recipe(recipe_file).batching.max_batch_size == 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model"], "not of the form key=value"),
        (["model.nmae=tiny"], "Did you mean `model.name`?"),
        (["model=tiny"], "`model`"),
    ],
)
def test_bad_overrides_are_user_errors(recipe_file, overrides, message):
    with pytest.raises(AnnotatorError) as error:
        load_recipe(recipe_file, overrides)
    assert message in str(error.value)


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a.b.c=1", "a.b.d=true", "a.e=x"]) == {"a": {"b": {"c": 1, "d": True}, "e": "x"}}


def test_result_fingerprint_ignores_batching_and_devices_only(recipe_file):
    base = load_recipe(recipe_file).result_fingerprint()
    for neutral in ["batching.max_batch_size=2", "batching.max_batch_tokens=100", "model.device=cpu", "input.limit=5"]:
        assert load_recipe(recipe_file, [neutral]).result_fingerprint() == base, neutral
    for changing in [
        "model.max_pixels=100000",
        "prompt.question=Is it {text}?",
        "model.name=tiny",
        "prompt.positive=y",
    ]:
        assert load_recipe(recipe_file, [changing]).result_fingerprint() != base, changing


def test_exactly_one_input_kind(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "input": {"parquet": "x", "hf": {"path": "a/b"}}}))
    with pytest.raises(AnnotatorError, match="exactly one of `input.parquet`"):
        load_recipe(path)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
