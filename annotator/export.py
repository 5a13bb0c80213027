"""`annotate export`: the kept rows of a finished run (and optionally the rest) as a dataset with a card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from annotator.errors import AnnotatorError
from annotator.sink import HF_METADATA_KEY, RunFolder
from annotator.where import WhereFilter

# Small row groups, as the Hub writes image datasets: a reader can fetch a few rows without megabytes of images.
ROW_GROUP_ROWS = 100


class RowFilter:
    """Which rows are kept: `prob >= min_prob`, or `label == label`; a row with an error never is."""

    def __init__(self, min_prob: float | None, label: str | None) -> None:
        if min_prob is not None and label is not None:
            raise AnnotatorError("Give one of --min-prob or --label, not both (without either, --label true is used).")
        if min_prob is not None and not 0.0 <= min_prob <= 1.0:
            raise AnnotatorError(f"--min-prob {min_prob} is not a probability; give a value from 0 to 1.")
        if label is not None and label.strip().lower() not in ("true", "false"):
            raise AnnotatorError(f"--label {label!r} is not a label; give --label true or --label false.")
        self.min_prob = min_prob
        self.label = None if min_prob is not None else (label or "true").strip().lower() == "true"

    def describe(self) -> str:
        return f"prob >= {self.min_prob}" if self.min_prob is not None else f"label == {str(self.label).lower()}"

    def mask(self, table: pa.Table) -> pa.ChunkedArray:
        if self.min_prob is not None:
            # float64, as the sink compares when it sets `label`, so --min-prob T keeps what threshold T labels true.
            wanted = pc.greater_equal(table.column("prob").cast(pa.float64()), self.min_prob)
        else:
            wanted = pc.equal(table.column("label"), self.label)
        return pc.fill_null(pc.and_(pc.is_null(table.column("error")), wanted), False)


class ShardWriter:
    """Rows appended in order, cut into `data/train-XXXXX-of-NNNNN.parquet` files, hidden until closed."""

    def __init__(self, root: Path, schema: pa.Schema, rows_per_shard: int) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.shards: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            taken = table.slice(0, min(table.num_rows, self.rows_per_shard - self._in_shard - self._pending_rows))
            self._pending.append(taken)
            self._pending_rows += taken.num_rows
            table = table.slice(taken.num_rows)
            if self._pending_rows >= ROW_GROUP_ROWS or self._in_shard + self._pending_rows == self.rows_per_shard:
                self._flush()

    def _open(self) -> pq.ParquetWriter:
        self.shards.append(self.data_dir / f".train-{len(self.shards):05d}.parquet.tmp")
        return pq.ParquetWriter(self.shards[-1], self.schema, compression="zstd")

    def _flush(self) -> None:
        self._writer = self._writer or self._open()
        self._writer.write_table(pa.concat_tables(self._pending), row_group_size=ROW_GROUP_ROWS)
        self._in_shard += self._pending_rows
        self._pending, self._pending_rows = [], 0
        if self._in_shard == self.rows_per_shard:
            self._writer.close()
            self._writer, self._in_shard = None, 0

    def close(self) -> None:
        """Write what is buffered, then name every shard."""
        if self._pending:
            self._flush()
        if not self.shards:
            # No row kept: one shard with the schema and no row group (pyarrow, DuckDB and polars read it as 0 rows).
            self._writer = self._open()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for i, hidden in enumerate(self.shards):
            os.replace(hidden, self.data_dir / f"train-{i:05d}-of-{len(self.shards):05d}.parquet")


def export_run(
    output_dir: Path,
    to: Path,
    min_prob: float | None,
    label: str | None,
    rejected: Path | None,
    drop_columns: str,
    rows_per_shard: int,
    where: str | None = None,
) -> dict[str, int]:
    """Stream a finished run's files into the kept (and optionally the rejected) dataset; returns the counts."""
    folder = RunFolder(output_dir)
    if not folder.exists():
        raise AnnotatorError(f"{str(output_dir)!r} is not a run folder (no manifest.json). Pass a run's output folder.")
    if not folder.finished:
        raise AnnotatorError(
            f"The run in {str(output_dir)!r} is unfinished, so some rows are missing. Finish it with "
            f"`annotate resume {output_dir}`, then export."
        )
    if rows_per_shard < 1:
        raise AnnotatorError(f"--rows-per-shard {rows_per_shard} must be at least 1.")
    if where is not None and (min_prob is not None or label is not None):
        raise AnnotatorError('Give --where alone: it replaces --label and --min-prob (e.g. --where "prob >= 0.8").')
    row_filter = RowFilter(min_prob, label) if where is None else None
    _check_targets(to, rejected)
    files = folder.data_files()
    if not files:
        raise AnnotatorError(f"The run in {str(output_dir)!r} has no rows, so there is nothing to export.")
    schema = pq.read_schema(files[0])
    row_filter = row_filter or WhereFilter(where, schema)
    _check_filter_columns(row_filter, schema)
    drop = _columns_to_drop(drop_columns, schema)
    out_schema = _schema_without(schema, drop)
    kept = ShardWriter(to, out_schema, rows_per_shard)
    rest = ShardWriter(rejected, out_schema, rows_per_shard) if rejected is not None else None
    counts = {"kept": 0, "rejected": 0, "errors": 0}
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP_ROWS):
            rows = pa.Table.from_batches([batch])
            mask = row_filter.mask(rows)
            selected = pc.sum(mask).as_py() or 0
            counts["kept"] += selected
            counts["rejected"] += rows.num_rows - selected
            counts["errors"] += rows.num_rows - rows.column("error").null_count
            rows = rows.drop_columns(drop)
            kept.write(rows.filter(mask))
            if rest is not None:
                rest.write(rows.filter(pc.invert(mask)))
    recipe = yaml.safe_load(folder.recipe_path.read_text(encoding="utf-8"))
    for which, writer in (("kept", kept), ("rejected", rest)):
        if writer is not None:
            writer.close()
            card = _card(recipe, folder, writer.root, which, row_filter, counts)
            (writer.root / "README.md").write_text(card, encoding="utf-8")
    return {"kept": counts["kept"], "rejected": counts["rejected"]}


def _check_filter_columns(row_filter: RowFilter | WhereFilter, schema: pa.Schema) -> None:
    """--label and --min-prob read `label` and `prob`: a run of several questions (or of answers) has others."""
    if isinstance(row_filter, WhereFilter) or "label" in schema.names:
        return
    decided = [n for n in schema.names if n.startswith(("label_", "answer_")) and not n.startswith("answer_mass")]
    decided += [n for n in ("answer",) if n in schema.names]
    example = " and ".join(decided[:2]) if decided and decided[0].startswith("label_") else None
    if example is None and decided:
        example = f"{decided[0]} == '...'"
    raise AnnotatorError(
        f"This run asked several questions or chose between answers, so it has no `label` column for --label or "
        f"--min-prob; its columns are {', '.join(decided)}. Say which rows to keep with --where, e.g. --where "
        f'"{example}".'
    )


def _check_targets(to: Path, rejected: Path | None) -> None:
    for option, target in (("--to", to), ("--rejected", rejected)):
        if target is not None and target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise AnnotatorError(
                f"{option} {str(target)!r} is not an empty folder. Export writes a complete dataset there: "
                "give a new folder, or empty this one first."
            )
    if rejected is not None:
        a, b = to.resolve(), rejected.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise AnnotatorError("--to and --rejected must be two separate folders, neither inside the other.")


def _columns_to_drop(spec: str, schema: pa.Schema) -> list[str]:
    names = list(dict.fromkeys(c.strip() for c in spec.split(",") if c.strip()))
    unknown = [c for c in names if c not in schema.names]
    if unknown:
        raise AnnotatorError(
            f"--drop-columns names {', '.join(unknown)}, not in the run's output. Its columns are: "
            f"{', '.join(schema.names)}."
        )
    if len(names) == len(schema.names):
        raise AnnotatorError("--drop-columns names every column; keep at least one.")
    return names


def _schema_without(schema: pa.Schema, drop: list[str]) -> pa.Schema:
    """The output schema less the dropped columns, in its Hugging Face features metadata too."""
    kept = pa.schema([f for f in schema if f.name not in drop])
    metadata = json.loads((schema.metadata or {}).get(HF_METADATA_KEY, b"{}"))
    features = metadata.get("info", {}).get("features")
    if features is None:
        return kept
    metadata["info"]["features"] = {name: feature for name, feature in features.items() if name not in drop}
    return kept.with_metadata({HF_METADATA_KEY: json.dumps(metadata).encode()})


def _card(
    recipe: dict[str, Any],
    run: RunFolder,
    root: Path,
    which: str,
    row_filter: RowFilter | WhereFilter,
    counts: dict[str, int],
) -> str:
    """README.md: a config that `load_dataset(folder)` and the Hub read, then where the rows come from and why."""
    source, model = recipe["input"], recipe["model"]
    one_label = not (recipe["prompt"].get("questions") or recipe["prompt"].get("answers"))  # today's `prob`, `label`
    hf = source.get("hf")
    if hf:
        origin = f"the Hugging Face dataset `{hf['path']}` (config `{hf['name']}`, split `{hf['split']}`"
        origin += f", revision `{hf['revision']}`)" if hf.get("revision") else ")"
    else:
        origin = f"the parquet input `{source['parquet']}`"
    query = recipe["prompt"].get("query")
    text = f"the fixed text `{query}`" if query else f"its `{source['text_column']}` column"
    revision = f" (revision `{model['revision']}`)" if model.get("revision") else ""
    total = counts["kept"] + counts["rejected"]
    header = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]}
    return "\n".join(
        [
            "---",
            yaml.safe_dump(header, sort_keys=False).strip(),
            "---",
            f"# {recipe['name']}: {which} rows",
            "",
            *_asked(recipe, origin, text),
            "",
            "| | |",
            "| --- | --- |",
            f"| recipe | `{recipe['name']}`, run folder `{run.root}` (the frozen recipe is its `recipe.yaml`) |",
            f"| model | `{model['name']}`{revision} |",
            *([f"| threshold | `label = prob >= {recipe['output']['threshold']}` |"] if one_label else []),
            f"| kept | rows with `{row_filter.describe()}` and no `error` |",
            f"| counts | {counts['kept']} kept, {counts['rejected']} rejected, {total} in all |",
            f"| errors | {counts['errors']} row(s) could not be scored: never kept, they are among the rejected |",
            f"| this folder | the {counts[which]} {which} rows |",
            "",
            "```python",
            "from datasets import load_dataset",
            "",
            f'ds = load_dataset("parquet", data_files="{root}/data/*.parquet", split="train")',
            "```",
            "",
        ]
    )


def _asked(recipe: dict[str, Any], origin: str, text: str) -> list[str]:
    """What the model was asked of each row, and which columns hold each answer."""
    prompt = recipe["prompt"]
    if not (prompt.get("questions") or prompt.get("answers")):
        return [
            f"Rows of {origin}. For each row the model was asked whether the image is related to {text}; `prob` "
            f"is P({prompt['positive']!r}) renormalised over {{{prompt['positive']!r}, {prompt['negative']!r}}}."
        ]
    from annotator.recipe import validate_recipe

    lines = [
        f"Rows of {origin}. The model was asked each question below about every row's image (`{{text}}` stands for "
        f"{text}); each answer's probability is renormalised over that question's answers.",
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
        asked = question.text.replace("|", "\\|").replace("\n", " ")
        answers = " / ".join(f"`{a}`" for a in question.answers)
        lines.append(f"| {question.name or '(one question)'} | {asked} | {answers} | {columns} |")
    return lines
