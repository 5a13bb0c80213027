"""The questions a recipe asks of every image: names, templates, answers and thresholds, resolved and checked."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from annotator.recipe import OutputConfig, PromptConfig

QUESTION_NAME = re.compile(r"[A-Za-z0-9_]+")
PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


@dataclass(frozen=True, slots=True)
class Question:
    """One question every image is asked: its template, answers and threshold, and the columns it fills.

    A Y/N question (`positive`/`negative`) fills `prob`, `label`, `answer_mass`; a question with `answers` fills
    `probs`, `answer`, `answer_mass`. Named questions (`prompt.questions`) add `_<name>` to each column.
    """

    name: str  # "" for the single `prompt.question`
    text: str  # the template; `{text}` (at most once) is where a row's text goes
    answers: tuple[str, ...]  # one token each; for Y/N, (positive, negative)
    yes_no: bool
    threshold: float

    def column(self, base: str) -> str:
        return f"{base}_{self.name}" if self.name else base

    @property
    def columns(self) -> tuple[str, str, str]:
        """Its output columns: (prob, label, answer_mass) or (probs, answer, answer_mass), suffixed by name."""
        bases = ("prob", "label", "answer_mass") if self.yes_no else ("probs", "answer", "answer_mass")
        return tuple(self.column(b) for b in bases)

    def fingerprint(self) -> dict[str, Any]:
        threshold = self.threshold if self.yes_no else None
        return {"name": self.name, "text": self.text, "answers": list(self.answers), "threshold": threshold}


def resolve_questions(prompt: PromptConfig, output: OutputConfig | None = None) -> list[Question]:
    """`prompt.question` or every `prompt.questions` entry, with the answers and threshold that apply to it
    (`output` gives thresholds; without it, where only names, texts and answers matter, they are 0.5)."""
    if prompt.questions is None:
        return [_question("", prompt.question, prompt.answers, None, None, prompt, output)]
    questions = []
    for name, entry in prompt.questions.items():
        own_yes_no = entry.positive is not None or entry.negative is not None
        answers = None if own_yes_no else entry.answers if entry.answers is not None else prompt.answers
        questions.append(_question(name, entry.question, answers, entry.positive, entry.negative, prompt, output))
    return questions


def _question(
    name: str,
    text: str,
    answers: list[str] | None,
    positive: str | None,
    negative: str | None,
    prompt: PromptConfig,
    output: OutputConfig | None,
) -> Question:
    default, thresholds = (0.5, {}) if output is None else (output.threshold, output.thresholds)
    if answers is not None:
        return Question(name, text, tuple(answers), False, default)
    yes_no = (positive or prompt.positive, negative or prompt.negative)
    return Question(name, text, yes_no, True, thresholds.get(name, default))


def question_problems(prompt: PromptConfig, output: OutputConfig) -> list[str]:
    """What is wrong with the set of questions, answers and thresholds, each said with its fix (no tokenizer needed)."""
    from annotator.recipe import PromptConfig

    problems: list[str] = []
    # Values compared with the defaults, not keys with those given: a frozen recipe (`recipe.yaml`) gives every key.
    defaults = PromptConfig()
    if "{text}" in prompt.system:
        problems.append(
            "`prompt.system` contains `{text}`, but the system turn is the same for every row and is sent as written; "
            "the row's text goes into the question: move `{text}` there"
        )
    if prompt.answers is not None:
        problems.extend(_answer_problems(prompt.answers, "prompt.answers"))
    if prompt.questions is None:
        if prompt.answers is not None and (prompt.positive, prompt.negative) != (defaults.positive, defaults.negative):
            problems.append("give `prompt.answers` or `prompt.positive`/`prompt.negative`, not both")
        problems.extend(_template_problems(prompt.question, "prompt.question"))
        if output.thresholds:
            problems.append(
                "`output.thresholds` sets thresholds per question of `prompt.questions`; this recipe asks one "
                "question, whose threshold is `output.threshold` (`--set output.thresholds=null` drops them)"
            )
        return problems
    if prompt.question != defaults.question:
        problems.append("give `prompt.question` (one question) or `prompt.questions` (several), not both")
    if not prompt.questions:
        problems.append(
            "`prompt.questions` is empty: give at least one question as `name: question`, or remove the key to ask "
            "`prompt.question`"
        )
    lowered: dict[str, str] = {}
    for name, entry in prompt.questions.items():
        key = f"prompt.questions.{name}"
        if not QUESTION_NAME.fullmatch(name):
            problems.append(
                f"question name {name!r} must be ASCII letters (a-z, A-Z), digits and `_` only (it becomes part of "
                f"column names such as `prob_{name}`, which SQL and other tools read); rename it, e.g. "
                f"`{ascii_name(name)}`"
            )
        elif name.lower() in lowered:
            problems.append(
                f"question names {lowered[name.lower()]!r} and {name!r} differ only in case, so their columns would "
                "clash in tools that ignore case (DuckDB, SQL); rename one"
            )
        lowered.setdefault(name.lower(), name)
        problems.extend(_template_problems(entry.question, key))
        if entry.answers is not None and (entry.positive is not None or entry.negative is not None):
            problems.append(f"`{key}` gives `answers` and `positive`/`negative`; keep one of them")
        if entry.answers is not None:
            problems.extend(_answer_problems(entry.answers, f"{key}.answers"))
    questions = resolve_questions(prompt, output)
    for question in questions:
        if question.yes_no and question.answers[0] == question.answers[1]:
            problems.append(f"`prompt.questions.{question.name}`: its positive and negative answers must differ")
    # `answer_mass_x` of question `x` is also `answer_<name>` of a question named `mass_x`.
    owners: dict[str, str] = {}
    for question in questions:
        for column in question.columns:
            other = owners.setdefault(column.lower(), question.name)
            if other != question.name and other.lower() != question.name.lower():  # names of one case: said above
                problems.append(
                    f"questions {other!r} and {question.name!r} would both write a column `{column}`; rename one"
                )
    by_name = {q.name: q for q in questions}
    unknown = [n for n in output.thresholds if n not in by_name]
    if unknown:
        problems.append(
            f"`output.thresholds` names {', '.join(map(repr, unknown))}, not a question of `prompt.questions` "
            f"({', '.join(by_name) or 'none'}); fix the name or drop it (for one run: "
            f"{' '.join(f'--set output.thresholds.{n}=null' for n in unknown)})"
        )
    for name, threshold in output.thresholds.items():
        if name in by_name and not by_name[name].yes_no:
            problems.append(
                f"`output.thresholds.{name}`: question {name!r} has `answers`, so it gets `answer_{name}` (the most "
                "likely answer), not a label; drop its threshold"
            )
        if not 0.0 <= threshold <= 1.0:
            problems.append(f"`output.thresholds.{name}` = {threshold} is not a probability; give a value from 0 to 1")
    return problems


def ascii_name(name: str) -> str:
    """A question name of ASCII letters, digits and `_` close to `name` (`café au lait` -> `cafe_au_lait`)."""
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub("[^A-Za-z0-9_]+", "_", plain).strip("_")[:64] or "q1"


def _template_problems(template: str, key: str) -> list[str]:
    problems = []
    if not template.strip():
        problems.append(f"`{key}` is empty; write the question the model is asked")
    if template.count("{text}") > 1:
        problems.append(f"`{key}` contains `{{text}}` more than once; the row's text goes in one place")
    strays = [p for p in PLACEHOLDER.findall(template) if p != "{text}"]
    if strays:
        problems.append(
            f"`{key}` contains {', '.join(strays)}, but `{{text}}` is the only placeholder (the row's text goes "
            "there); did you mean `{text}`?"
        )
    return problems


def _answer_problems(answers: list[str], key: str) -> list[str]:
    if len(answers) < 2:
        return [f"`{key}` needs at least two answers to choose between (got {answers!r})"]
    problems = []
    if any(not a.strip() for a in answers):
        problems.append(f'`{key}` holds an empty answer; each answer is a word the model can reply, e.g. "A"')
    repeated = sorted({a for a in answers if answers.count(a) > 1})
    if repeated:
        problems.append(f"`{key}` lists {', '.join(map(repr, repeated))} more than once; each answer once")
    return problems


def uses_text(prompt: PromptConfig) -> bool:
    """Whether any question puts the row's text (`{text}`) in."""
    return any("{text}" in q.text for q in resolve_questions(prompt))


def reads_text_column(prompt: PromptConfig) -> bool:
    """Whether rows' texts come from `input.text_column`: some question uses `{text}` and no `prompt.query` is set."""
    return prompt.query is None and uses_text(prompt)


def output_columns(prompt: PromptConfig) -> list[str]:
    """The columns a run adds to the input's, in order."""
    columns = ["row_id"]
    for question in resolve_questions(prompt):
        columns.extend(question.columns)
    return [*columns, "error", "error_kind"]
