"""Dataset cards (README.md, built with huggingface_hub's DatasetCard): a run folder's and an export's.

The run folder's card has `configs:` naming `data/part-*.parquet`, so `load_dataset(RUN_DIR)` reads the data
and nothing else of the folder (manifest, journal). Both cards carry the input's license when its own card
has one, a size category, the source dataset and the input's split, a histogram of `prob` and a usage
snippet with a relative path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from annotator.scores import text_histogram

RUN_CARD_MARKER = "<!-- annotator run card: rewritten by annotate run/resume; keep your notes in another file -->"
_SIZES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
]


def size_category(rows: int) -> str:
    """The Hub's `size_categories` value for a row count."""
    return next((name for bound, name in _SIZES if rows < bound), "n>1T")


def split_name(recipe: dict[str, Any]) -> str:
    """The input's split (`validation` for `input.hf.split: validation[:10%]`); parquet input is `train`."""
    hf = recipe["input"].get("hf")
    name = hf["split"].split("[", 1)[0] if hf else "train"
    return name if re.fullmatch(r"\w+(\.\w+)*", name) else "train"


def input_card(recipe: dict[str, Any], source: Any = None) -> dict[str, Any]:
    """What a card says about the input, found at run time: its license (from its own dataset card) and Hub id."""
    hf = recipe["input"].get("hf")
    hub_id = hf["path"] if hf and not Path(hf["path"]).exists() and "/" in hf["path"] else None
    license_ = _input_license(recipe, source)
    return {"license": license_, "dataset": hub_id, "split": split_name(recipe)}


def _input_license(recipe: dict[str, Any], source: Any) -> str | list[str] | None:
    """The `license:` of the input's dataset card, or of `datasets`' info for it; None when it states none."""
    from huggingface_hub import DatasetCard

    from annotator.hub import unreachable_reason

    hf = recipe["input"].get("hf")
    readmes: list[Path] = []
    if hf:
        local = Path(hf["path"])
        if local.is_dir():
            readmes.append(local / "README.md")
        elif "/" in hf["path"] and unreachable_reason() is None:
            try:
                from huggingface_hub import hf_hub_download

                readmes.append(
                    Path(hf_hub_download(hf["path"], "README.md", repo_type="dataset", revision=hf.get("revision")))
                )
            except Exception:  # no card, gated, offline: the license stays unknown
                pass
        info = getattr(getattr(source, "builder", None), "info", None)
        if info is not None and getattr(info, "license", None):
            return info.license
    else:
        for file in [Path(f["file"]) for f in getattr(source, "fingerprint", lambda: [])()][:1]:
            readmes += [file.parent / "README.md", file.parent.parent / "README.md"]
    for readme in readmes:
        try:
            with _quiet_hub_cards():
                license_ = DatasetCard.load(readme).data.get("license")
        except Exception:  # not a card, unreadable: look at the next one
            continue
        if license_:
            return license_
    return None


@contextmanager
def _quiet_hub_cards() -> Iterator[None]:
    """huggingface_hub warns on stderr about a README without a metadata block (any README.md beside the input is
    read): a stray line in the run's output, and not JSON under --log-format json. Such a card states no license."""
    logger = logging.getLogger("huggingface_hub.repocard")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _card_data(recipe: dict[str, Any], info: dict[str, Any], rows: int, data_path: str, split: str):
    from huggingface_hub import DatasetCardData

    return DatasetCardData(
        license=info.get("license"),
        size_categories=[size_category(rows)],
        source_datasets=[f"extended|{info['dataset']}"] if info.get("dataset") else None,
        annotations_creators=["machine-generated"],
        pretty_name=recipe["name"],
        tags=["annotator", "image-text-relevance"],
        configs=[{"config_name": "default", "data_files": [{"split": split, "path": data_path}]}],
    )


def origin(recipe: dict[str, Any]) -> str:
    source = recipe["input"]
    hf = source.get("hf")
    if hf:
        revision = f", revision `{hf['revision']}`" if hf.get("revision") else ""
        return f"the Hugging Face dataset `{hf['path']}` (config `{hf['name']}`, split `{hf['split']}`{revision})"
    return f"the parquet input `{source['parquet']}`"


def question_text(recipe: dict[str, Any]) -> str:
    prompt, source = recipe["prompt"], recipe["input"]
    return f"the fixed text `{prompt['query']}`" if prompt.get("query") else f"its `{source['text_column']}` column"


def one_question(recipe: dict[str, Any]) -> bool:
    """Whether the recipe asks one Y/N question (today's `prob`, `label`), not `prompt.questions` or answers."""
    return not (recipe["prompt"].get("questions") or recipe["prompt"].get("answers"))


def asked(recipe: dict[str, Any]) -> list[str]:
    """What the model was asked of each row, and which columns hold each answer (a table for several questions)."""
    prompt = recipe["prompt"]
    if one_question(recipe):
        return [
            f"Rows of {origin(recipe)}. For each row the model was asked whether the image is related to "
            f"{question_text(recipe)}; `prob` is P({prompt['positive']!r}) renormalised over "
            f"{{{prompt['positive']!r}, {prompt['negative']!r}}}."
        ]
    from annotator.recipe import validate_recipe

    lines = [
        f"Rows of {origin(recipe)}. The model was asked each question below about every row's image (`{{text}}` "
        f"stands for {question_text(recipe)}); each answer's probability is renormalised over that question's answers.",
        "",
        "| question | asked | answers | columns |",
        "| --- | --- | --- | --- |",
    ]
    for question in validate_recipe(recipe).questions:
        first, second, mass = question.columns
        if question.yes_no:
            columns = f"`{first}` = P({question.answers[0]!r}), `{second}` = {first} >= {question.threshold}, `{mass}`"
        else:
            columns = f"`{first}` (in the answers' order), `{second}` (the most likely), `{mass}`"
        text = question.text.replace("|", "\\|").replace("\n", " ")
        answers = " / ".join(f"`{a}`" for a in question.answers)
        lines.append(f"| {question.name or '(one question)'} | {text} | {answers} | {columns} |")
    return lines


def histogram_block(counts: list[int], threshold: float | None) -> list[str]:
    return ["```text", "prob        rows", *text_histogram(counts, width=30, threshold=threshold), "```"]


def usage(folder_name: str, split: str, label: str | None = "label") -> list[str]:
    lines = [
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{folder_name}", split="{split}")  # from the folder holding `{folder_name}/`',
    ]
    if label is not None:
        lines += [
            "# Filter on the scores alone: input_columns keeps every image encoded (none is decoded)",
            f'kept = ds.filter(lambda label: label is True, input_columns="{label}")',
        ]
    return [*lines, "```"]


def _first_label(recipe: dict[str, Any]) -> str | None:
    """The label column a usage example filters on: `label`, or the first Y/N question's; None without one."""
    if one_question(recipe):
        return "label"
    from annotator.recipe import validate_recipe

    return next((q.column("label") for q in validate_recipe(recipe).questions if q.yes_no), None)


def _per_question(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, counts) per question of a summary: `questions`, or the one unnamed question with `answers`."""
    if "questions" in summary:
        return list(summary["questions"].items())
    return [("", {"answers": summary.get("answers", {})})]


def _answered(name: str, counts: dict[str, Any]) -> str:
    who = f"`{name}`: " if name else ""
    if "positives" in counts:
        return f"{who}{counts['positives']} positive"
    return who + ", ".join(f"{n} {answer!r}" for answer, n in counts.get("answers", {}).items())


def write_run_card(folder: Any, recipe: Any, summary: dict[str, Any] | None = None) -> None:
    """The run folder's README.md, unless a README.md there is not one of ours (never overwrite a user's file)."""
    from huggingface_hub import DatasetCard

    path = folder.root / "README.md"
    if path.exists() and RUN_CARD_MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        return
    recipe = recipe.model_dump(mode="json") if hasattr(recipe, "model_dump") else recipe
    manifest = folder.manifest()
    info = manifest.get("input_card") or {}
    split = info.get("split") or split_name(recipe)
    total = manifest.get("total_rows")
    threshold = recipe["output"]["threshold"]
    single = one_question(recipe)
    columns = [
        "| column | meaning |",
        "| --- | --- |",
        *(
            [
                f"| `prob` | P({recipe['prompt']['positive']!r}) renormalised over the two answers; null for an error "
                "row |",
                f"| `label` | `prob >= {threshold}` |",
                "| `answer_mass` | P(positive) + P(negative) under the full softmax: how much the model answered at "
                "all |",
            ]
            if single
            else ["| each question's columns | see the table above; `answer_mass*`: how much the model answered |"]
        ),
        "| `error`, `error_kind` | why a row could not be scored, and its short stable kind (for GROUP BY) |",
        "| `row_id` | the row's position in the input |",
    ]
    body_counts: list[str] = []
    if summary is None:
        state = f"Unfinished: rows are added window by window (of {total if total is not None else '?'} rows)."
    else:
        state = f"Finished: {summary['rows']} rows, {summary['scored']} scored, {summary['errors']} with an error"
        if single:
            state += f", {summary['positives']} labelled positive."
            body_counts = ["", *histogram_block(summary["prob_histogram"], threshold)]
        else:
            state += "; " + "; ".join(_answered(name, counts) for name, counts in _per_question(summary)) + "."
            for name, counts in _per_question(summary):
                if counts.get("prob_histogram"):
                    body_counts += ["", f"`prob_{name}`:", "", *histogram_block(counts["prob_histogram"], None)]
    intro = (
        [
            f"Every row of {origin(recipe)}, with `{recipe['model']['name']}`'s answer to whether the image is "
            f"related to {question_text(recipe)}. {state} The run's recipe is `recipe.yaml` beside this card."
        ]
        if single
        else [*asked(recipe), "", f"{state} The run's recipe is `recipe.yaml` beside this card."]
    )
    body = [
        "",
        RUN_CARD_MARKER,
        "",
        f"# {recipe['name']}",
        "",
        *intro,
        "",
        *columns,
        *body_counts,
        "",
        *usage(folder.root.name, split, _first_label(recipe)),
        "",
    ]
    data = _card_data(recipe, info, summary["rows"] if summary else total or 0, "data/part-*.parquet", split)
    DatasetCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body)).save(path)


def export_card(
    recipe: dict[str, Any],
    info: dict[str, Any],
    root: Path,
    which: str,
    split: str,
    rule: str,
    counts: dict[str, int],
    summary: dict[str, Any],
) -> Any:
    """An export's README.md: where the rows come from, why they were kept, the histogram, how to load them."""
    from huggingface_hub import DatasetCard

    model = recipe["model"]
    revision = f" (revision `{model['revision']}`)" if model.get("revision") else ""
    total = counts["kept"] + counts["rejected"]
    body = [
        "",
        f"# {recipe['name']}: {which} rows",
        "",
        *asked(recipe),
        "",
        "| | |",
        "| --- | --- |",
        f"| recipe | `{recipe['name']}` (the run's frozen recipe is its `recipe.yaml`) |",
        f"| model | `{model['name']}`{revision} |",
        f"| source | {origin(recipe)}, split `{split}` |",
        f"| license | {info.get('license') or 'not stated by the input'} |",
        *([f"| threshold | `label = prob >= {recipe['output']['threshold']}` |"] if one_question(recipe) else []),
        f"| kept | {rule}, and no `error` |",
        f"| counts | {counts['kept']} kept, {counts['rejected']} rejected, {total} in all |",
        f"| errors | {counts['errors']} row(s) could not be scored: never kept, they are among the rejected |",
        f"| this folder | the {counts[which]} {which} rows |",
    ]
    if summary.get("prob_histogram") is not None:
        body += ["", "`prob` over every row of the run:", "", *histogram_block(summary["prob_histogram"], None)]
    for name, question in _per_question(summary) if summary.get("prob_histogram") is None else []:
        if question.get("prob_histogram") is not None:
            histogram = histogram_block(question["prob_histogram"], None)
            body += ["", f"`prob_{name}` over every row of the run:", "", *histogram]
    body += ["", *usage(root.name, split, _first_label(recipe)), ""]
    data = _card_data(recipe, info, counts[which], f"data/{split}-*", split)
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body))
