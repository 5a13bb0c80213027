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
        # YAML reads a bare on/off as a boolean: the switch meant, not a type error
        (
            ["model.cuda_graphs=on", "model.compile=off"],
            lambda r: (r.model.cuda_graphs, r.model.compile) == ("on", "off"),
        ),
        (["model.compile=auto"], lambda r: r.model.compile == "auto"),
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


def test_a_set_value_that_is_a_bare_template_stays_text(recipe_file):
    """`--set prompt.query={text}`: YAML reads `{text}` as a mapping {text: null}; the user meant the template."""
    assert parse_overrides(["prompt.query={text}", "a={x, y}"]) == {"prompt": {"query": "{text}"}, "a": "{x, y}"}
    assert load_recipe(recipe_file, ["prompt.query={text}"]).prompt.query == "{text}"
    assert parse_overrides(["a={b: 1}"]) == {"a": {"b": 1}}, "a real mapping stays one"


def test_result_fingerprint_ignores_batching_and_devices_only(recipe_file):
    base = load_recipe(recipe_file).result_fingerprint()
    neutrals = ["batching.max_batch_size=2", "batching.max_batch_tokens=100", "model.device=cpu", "input.limit=5"]
    for neutral in [*neutrals, "model.compile=on", "model.cuda_graphs=off", "model.forward=transformers"]:
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


def test_a_one_question_recipe_keeps_its_fingerprint_so_older_runs_still_resume(recipe_file):
    # Computed by the code before `prompt.questions` existed (commit 672887c).
    assert load_recipe(recipe_file).result_fingerprint() == "1f3d41261e8cd1f6"
    overrides = ["prompt.query=a cat", "prompt.positive=y", "output.threshold=0.3", "batching.max_batch_size=2"]
    assert load_recipe(recipe_file, overrides).result_fingerprint() == "0ce8a547a70f1c8e"


QUESTIONS = {
    "text": 'Is the image related to "{text}"? Y or N',
    "cat": "Is there a cat? Y or N",
    "kind": {"question": "A photo, a drawing or a chart? A, B or C", "answers": ["A", "B", "C"]},
    "dog": {"question": "A dog? yes or no", "positive": "yes", "negative": "no"},
}


def questions_recipe(tmp_path, prompt=None, output=None) -> Path:
    path = tmp_path / "q.yaml"
    recipe = {**BASE, "prompt": {"questions": QUESTIONS} if prompt is None else prompt, "output": output or {}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_questions_resolve_in_order_with_their_answers_columns_and_thresholds(tmp_path):
    recipe = load_recipe(questions_recipe(tmp_path, output={"threshold": 0.4, "thresholds": {"cat": 0.7}}))
    got = [(q.name, q.answers, q.yes_no, q.threshold, q.columns) for q in recipe.questions]
    assert got == [
        ("text", ("Y", "N"), True, 0.4, ("prob_text", "label_text", "answer_mass_text")),
        ("cat", ("Y", "N"), True, 0.7, ("prob_cat", "label_cat", "answer_mass_cat")),
        ("kind", ("A", "B", "C"), False, 0.4, ("probs_kind", "answer_kind", "answer_mass_kind")),
        ("dog", ("yes", "no"), True, 0.4, ("prob_dog", "label_dog", "answer_mass_dog")),
    ]
    assert recipe.uses_text
    single = load_recipe(questions_recipe(tmp_path, prompt={"answers": ["A", "B", "C"]}))
    assert [(q.name, q.columns) for q in single.questions] == [("", ("probs", "answer", "answer_mass"))]
    shared = load_recipe(
        questions_recipe(tmp_path, prompt={"questions": {"a": "x?", "b": "y?"}, "answers": ["P", "Q"]})
    )
    assert [q.answers for q in shared.questions] == [("P", "Q"), ("P", "Q")]
    assert not shared.uses_text, "no question puts the row's text in"


@pytest.mark.parametrize(
    "change",
    [
        ["prompt.questions.cat=Is there a dog? Y or N"],
        ["prompt.questions.new=Is it new?"],
        ["output.thresholds.cat=0.9"],
        ["prompt.questions.kind.answers=[A, B, D]"],
        ["prompt.answers=[Y, N]"],
        ["prompt.questions.dog.positive=si"],
    ],
)
def test_the_question_set_is_part_of_the_result_fingerprint(tmp_path, change):
    path = questions_recipe(tmp_path)
    assert load_recipe(path, change).result_fingerprint() != load_recipe(path).result_fingerprint()


def test_reordered_questions_change_the_fingerprint_since_columns_follow_their_order(tmp_path):
    forward = load_recipe(questions_recipe(tmp_path)).result_fingerprint()
    backward = {"questions": dict(reversed(list(QUESTIONS.items())))}
    assert load_recipe(questions_recipe(tmp_path, prompt=backward)).result_fingerprint() != forward


@pytest.mark.parametrize(
    ("prompt", "output", "message"),
    [
        ({"questions": {}}, {}, "`prompt.questions` is empty"),
        ({"questions": {"a cat": "x?"}}, {}, "question name 'a cat' must be ASCII letters (a-z, A-Z), digits and `_`"),
        ({"questions": {"cat-2": "x?"}}, {}, "e.g. `cat_2`"),
        ({"questions": {"café au lait": "x?"}}, {}, "e.g. `cafe_au_lait`"),  # é is a letter, not an ASCII one
        ({"questions": {"a": "x?"}, "system": "You judge {text}."}, {}, "`prompt.system` contains `{text}`"),
        ({"system": "You judge {text}."}, {}, "move `{text}` there"),
        ({"questions": {"": "x?"}}, {}, "question name ''"),
        ({"questions": {"Cat": "x?", "cat": "y?"}}, {}, "differ only in case"),
        ({"questions": {"a": "x?"}, "question": "{text}?"}, {}, "not both"),
        ({"questions": {"a": "x {txt}?"}}, {}, "did you mean `{text}`"),
        ({"questions": {"a": "{text} or {text}?"}}, {}, "more than once"),
        ({"questions": {"a": "  "}}, {}, "`prompt.questions.a` is empty"),
        ({"questions": {"a": {"question": "x?", "answers": ["A"]}}}, {}, "at least two answers"),
        ({"questions": {"a": {"question": "x?", "answers": ["A", "A"]}}}, {}, "lists 'A' more than once"),
        ({"questions": {"a": {"question": "x?", "answers": ["A", "B"], "positive": "Y"}}}, {}, "keep one of them"),
        ({"questions": {"a": {"question": "x?", "positive": "N"}}}, {}, "must differ"),
        (
            {"questions": {"a": {"question": "x?", "answer": ["A", "B"]}}},
            {},
            "Did you mean `prompt.questions.a.answers`",
        ),
        ({"answers": ["A", "B"], "positive": "y"}, {}, "not both"),
        ({"questions": {"a": "x?"}}, {"thresholds": {"b": 0.5}}, "`output.thresholds` names 'b'"),
        ({"questions": {"a": "x?"}}, {"thresholds": {"b": 0.5}}, "(for one run: --set output.thresholds.b=null)"),
        ({"questions": {"a": {"question": "x?", "answers": ["A", "B"]}}}, {"thresholds": {"a": 0.5}}, "not a label"),
        ({"questions": {"a": "x?"}}, {"thresholds": {"a": 1.5}}, "not a probability"),
        ({}, {"thresholds": {"a": 0.5}}, "this recipe asks one question"),
        ({"questions": {"x": "x?", "mass_x": "y?"}, "answers": ["A", "B"]}, {}, "both write a column `answer_mass_x`"),
    ],
)
def test_a_malformed_question_set_is_one_paragraph_naming_the_key(tmp_path, prompt, output, message):
    with pytest.raises(AnnotatorError) as error:
        load_recipe(questions_recipe(tmp_path, prompt=prompt, output=output))
    text = str(error.value)
    assert message in text
    assert "\n" not in text.strip()


def test_names_that_differ_only_in_case_are_one_problem_not_a_false_column_clash_per_column(tmp_path):
    with pytest.raises(AnnotatorError) as error:
        load_recipe(questions_recipe(tmp_path, prompt={"questions": {"cat": "x?", "Cat": "y?"}}))
    assert "differ only in case" in str(error.value)
    assert "would both write" not in str(error.value)  # `cat` writes prob_cat, not prob_Cat


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("batching.max_batch_size=-3", "`batching.max_batch_size` (from --set): Input should be greater than"),
        ("batching.max_batch_sise=3", "`batching.max_batch_sise` (from --set) is not a recipe key"),
        ("model=tiny", "`model` (from --set) is a section of keys (name, "),
    ],
)
def test_a_mistake_in_a_set_is_named_as_the_set_not_as_the_recipe_files(tmp_path, change, says):
    with pytest.raises(AnnotatorError) as error:
        load_recipe(questions_recipe(tmp_path), [change])
    assert says in str(error.value)
    assert "e.g. `model.name`" in str(error.value) or "model=" not in change


def test_a_mistake_in_the_recipe_file_is_not_blamed_on_a_set(tmp_path):
    path = questions_recipe(tmp_path)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "batching": {"max_batch_size": -3}}))
    with pytest.raises(AnnotatorError) as error:
        load_recipe(path, ["batching.window=8"])
    assert "`batching.max_batch_size`: Input" in str(error.value)


def test_a_question_name_given_twice_is_an_error_not_a_silent_overwrite(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(
        "name: r\ninput: {parquet: x.parquet}\nprompt:\n  questions:\n    cat: Is there a cat?\n"
        "    dog: Is there a dog?\n    cat: Is there a cat, really?\n"
    )
    with pytest.raises(AnnotatorError, match=r"gives `prompt.questions.cat` twice \(lines 5 and 7\)"):
        load_recipe(path)


def test_question_names_yaml_reads_as_numbers_or_booleans_stay_the_written_text(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text("name: r\ninput: {parquet: x.parquet}\nprompt:\n  questions:\n    1: first?\n    yes: second?\n")
    assert [q.name for q in load_recipe(path).questions] == ["1", "yes"]


def test_setting_a_key_of_a_short_form_question_keeps_its_text(tmp_path):
    path = tmp_path / "r.yaml"
    recipe = {
        "name": "r",
        "input": {"parquet": "x.parquet"},
        "prompt": {"questions": {"cat": "Is there a cat?", "kind": "Which kind?"}},
    }
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(path, ["prompt.questions.cat.positive=y", "prompt.questions.cat.negative=n"])
    cat, kind = loaded.prompt.questions["cat"], loaded.prompt.questions["kind"]
    assert (cat.question, cat.positive, cat.negative) == ("Is there a cat?", "y", "n")
    assert kind.question == "Which kind?" and kind.positive is None
    assert load_recipe(path, ["prompt.questions.cat=Is it a cat?"]).prompt.questions["cat"].question == "Is it a cat?"


def test_set_null_removes_a_named_question_or_threshold_and_a_wrong_name_is_named(tmp_path):
    path = questions_recipe(
        tmp_path, prompt={"questions": {"cat": "A cat?", "dog": "A dog?"}}, output={"thresholds": {"dog": 0.3}}
    )
    loaded = load_recipe(path, ["prompt.questions.dog=null", "output.thresholds.dog=null"])
    assert [q.name for q in loaded.questions] == ["cat"] and loaded.output.thresholds == {}
    with pytest.raises(AnnotatorError) as error:
        load_recipe(path, ["prompt.questions.cow=null"])
    assert "none named 'cow' (there are: cat, dog)" in str(error.value)
    with pytest.raises(AnnotatorError, match="`output.thresholds` names 'dog'"):
        load_recipe(path, ["prompt.questions.dog=null"])  # its threshold is left: said, not dropped silently
    with pytest.raises(AnnotatorError, match="none named 'cow' \\(the recipe has none\\)"):
        load_recipe(questions_recipe(tmp_path, prompt={}), ["prompt.questions.cow=null"])


def test_a_question_given_no_text_is_named_with_its_name(tmp_path):
    path = questions_recipe(tmp_path, prompt={"questions": {"cat": None, "dog": "A dog?"}})
    with pytest.raises(AnnotatorError, match=r"`prompt.questions.cat` is a section of keys \(question, "):
        load_recipe(path)


def test_set_output_thresholds_null_drops_them_all_as_prompt_questions_null_drops_the_questions(tmp_path):
    path = questions_recipe(tmp_path, prompt={"questions": {"cat": "A cat?"}}, output={"thresholds": {"cat": 0.3}})
    with pytest.raises(AnnotatorError, match="`--set output.thresholds=null` drops them"):
        load_recipe(path, ["prompt.questions=null"])
    loaded = load_recipe(path, ["prompt.questions=null", "output.thresholds=null"])
    assert loaded.prompt.questions is None and loaded.output.thresholds == {}


def test_one_gpu_spelled_two_ways_is_one_gpu_named_twice(tmp_path, monkeypatch):
    """`cuda:00` is `cuda:0`: two writers on one GPU were started, since the names differed as text."""
    import annotator.executors

    recipe = load_recipe(questions_recipe(tmp_path), ["engine.devices=cuda:0,cuda:00"])
    assert recipe.engine.devices == ["cuda:0", "cuda:0"]
    monkeypatch.setattr(annotator.executors, "_cuda_count", lambda: 2)
    with pytest.raises(AnnotatorError, match="names cuda:0 more than once"):
        annotator.executors.resolve_devices(recipe)


def test_more_cpu_writers_than_cores_is_refused(tmp_path, monkeypatch):
    """Each CPU writer loads its own model: 5 of them on 2 cores only share the cores (and, with the 2B model in
    float32, need ~45 GB), so it is refused before anything loads."""
    import annotator.executors

    monkeypatch.setattr(annotator.executors, "available_cores", lambda: 2)
    too_many = load_recipe(questions_recipe(tmp_path), ["engine.devices=cpu,cpu,cpu"])
    with pytest.raises(AnnotatorError, match=r"names 3 CPU writers, but this machine gives the run 2 core\(s\)"):
        annotator.executors.resolve_devices(too_many)
    assert annotator.executors.resolve_devices(load_recipe(questions_recipe(tmp_path), ["engine.devices=cpu,cpu"]))


def test_a_bad_value_of_a_checked_key_given_by_set_says_so(tmp_path):
    with pytest.raises(AnnotatorError, match=r"'mps' is not cpu, cuda or cuda:N \(from --set\)"):
        load_recipe(questions_recipe(tmp_path), ["engine.devices=mps"])


@pytest.mark.parametrize(
    ("question", "says"), [("Is {text} here, {text}?", "more than once"), ("Is it {txt}", "did you mean `{text}`?")]
)
def test_a_question_problem_is_said_once_and_ends_once(recipe_file, question, says):
    """`{text}` twice was said twice ("must contain exactly once" and "more than once"); "did you mean...?." ended
    with two stops."""
    with pytest.raises(AnnotatorError) as error:
        load_recipe(recipe_file, [f"prompt.question={question}"])
    message = str(error.value)
    assert says in message and "exactly once" not in message and "?." not in message
