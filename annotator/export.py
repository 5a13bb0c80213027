"""`annotate export`: the kept rows of a finished run (and optionally the rest) as a dataset with a card."""

from __future__ import annotations

import contextlib
import json
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotator.card import export_card, split_name
from annotator.errors import AnnotatorError, is_undecoded, not_utf8_message
from annotator.folder import enclosing_run, problems
from annotator.questions import Question
from annotator.recipe import read_recipe_file, validate_recipe
from annotator.run import summarize
from annotator.sink import HF_METADATA_KEY, RUN_MARKER, RunFolder
from annotator.where import WhereFilter

# Small row groups, as the Hub writes image datasets: a reader can fetch a few rows without megabytes of images.
ROW_GROUP_ROWS = 100
SEVERAL_FILTERS = (
    "Give one of --min-prob, --label, --top-fraction or --where, not several (without any, --label true is used)."
)


class RowFilter:
    """Which rows are kept: `prob >= min_prob`, or `label == label`; a row with an error never is."""

    def __init__(self, min_prob: float | None, label: str | None) -> None:
        if min_prob is not None and label is not None:
            raise AnnotatorError(SEVERAL_FILTERS)
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


def order_keys(prob: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint32 keys that sort as the float32 values do (nulls give 0, below every value)."""
    floats = pc.fill_null(prob, 0.0).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    bits = floats.view(np.uint32)
    keys = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)
    return np.where(pc.is_null(prob).to_numpy(zero_copy_only=False), np.uint32(0), keys)


class TopFraction:
    """The top F of ALL rows by prob: K = round(F x rows) rows (halves up), or every scored row if fewer are
    scored; ties at the cut go to the lower row_id; a row with an error is never kept.

    Exact in bounded memory, from two passes over the prob column alone: a histogram of the high 16 bits of
    each prob's order key finds the bucket holding the K-th largest, a histogram of the low 16 bits within it
    finds the K-th largest value itself; `mask` then keeps every row above it and, in row order, as many rows
    equal to it as K still needs.
    """

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise AnnotatorError(f"--top-fraction {fraction} is not a fraction; give a value in (0, 1], e.g. 0.3.")
        self.fraction = fraction
        self.cut: int | None = None  # order key of the K-th largest prob; None: keep every scored row
        self.equal_left = 0

    def describe(self) -> str:
        return f"the top {self.fraction:g} of all rows by `prob` ({self.rows_kept} rows, ties to the lower row_id)"

    def prepare(self, files: list[Path]) -> None:
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        self.rows_kept = math.floor(Fraction(repr(self.fraction)) * rows + Fraction(1, 2))
        high = np.zeros(1 << 16, np.int64)
        for keys in _prob_keys(files):
            high += np.bincount(keys >> 16, minlength=1 << 16)
        high[0] = 0  # nulls: never kept
        scored = int(high.sum())
        if self.rows_kept >= scored:
            self.rows_kept = scored
            return
        bucket, above = _kth_from_top(high, self.rows_kept)
        low = np.zeros(1 << 16, np.int64)
        for keys in _prob_keys(files):
            low += np.bincount(keys[(keys >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
        value, greater = _kth_from_top(low, self.rows_kept - above)
        self.cut = (bucket << 16) | value
        self.equal_left = self.rows_kept - above - greater

    def mask(self, table: pa.Table) -> pa.Array:
        keys = order_keys(table.column("prob"))
        if self.cut is None:
            return pa.array(keys > 0)
        wanted = keys > self.cut
        equal = np.flatnonzero(keys == self.cut)[: self.equal_left]
        wanted[equal] = True
        self.equal_left -= len(equal)
        return pa.array(wanted)


def _prob_keys(files: list[Path]):
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 16, columns=["prob"]):
            yield order_keys(batch.column(0)).astype(np.int64)


def _kth_from_top(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The index holding the k-th largest (1-based) of the counted values, and how many lie above it."""
    from_top = np.cumsum(counts[::-1])
    index = len(counts) - 1 - int(np.searchsorted(from_top, k))
    return index, int(from_top[len(counts) - 2 - index]) if index < len(counts) - 1 else 0


class ShardWriter:
    """Rows appended in order, cut into `data/SPLIT-XXXXX-of-NNNNN.parquet` files, hidden until closed."""

    def __init__(self, root: Path, schema: pa.Schema, rows_per_shard: int, split: str = "train") -> None:
        self.root = root
        self.split = split
        self.data_dir = root / "data"
        self.created = [p for p in (root, *root.parents) if not p.exists()]
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
        self.shards.append(self.data_dir / f".{self.split}-{len(self.shards):05d}.parquet.tmp")
        return pq.ParquetWriter(self.shards[-1], self.schema, compression="zstd")

    def _flush(self) -> None:
        self._writer = self._writer or self._open()
        self._writer.write_table(pa.concat_tables(self._pending), row_group_size=ROW_GROUP_ROWS)
        self._in_shard += self._pending_rows
        self._pending, self._pending_rows = [], 0
        if self._in_shard == self.rows_per_shard:
            self._writer.close()
            self._writer, self._in_shard = None, 0

    def discard(self) -> None:
        """A failed export: delete what this writer wrote and the folders it created, nothing else."""
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()
            self._writer = None
        for i, hidden in enumerate(self.shards):
            hidden.unlink(missing_ok=True)
            (self.data_dir / f"{self.split}-{i:05d}-of-{len(self.shards):05d}.parquet").unlink(missing_ok=True)
        (self.root / "README.md").unlink(missing_ok=True)
        for folder in (self.data_dir, *self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()

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
            os.replace(hidden, self.data_dir / f"{self.split}-{i:05d}-of-{len(self.shards):05d}.parquet")


def export_run(
    output_dir: Path,
    to: Path,
    min_prob: float | None,
    label: str | None,
    rejected: Path | None,
    drop_columns: str,
    rows_per_shard: int,
    top_fraction: float | None = None,
    where: str | None = None,
) -> dict[str, int]:
    """Stream a finished run's files into the kept (and optionally the rejected) dataset; returns the counts."""
    folder = RunFolder(output_dir)
    to = to.expanduser()
    rejected = rejected.expanduser() if rejected is not None else None
    if not folder.is_ours():
        raise AnnotatorError(f"{str(output_dir)!r} is not a run folder (no {RUN_MARKER}). Pass a run's output folder.")
    folder.manifest()  # a missing or damaged manifest is an error naming it
    if not folder.finished:
        raise AnnotatorError(
            f"The run in {str(output_dir)!r} is unfinished, so some rows are missing. Finish it with "
            f"`annotate resume {output_dir}`, then export."
        )
    damage = problems(folder)
    if damage:
        fix = (
            f"Run `annotate resume {output_dir}` to redo the missing windows, then export."
            if all(p.repairable for p in damage)
            else "Move the files named out of data/ (or re-run with --overwrite), then export."
        )
        listed = "; ".join(map(str, damage))
        raise AnnotatorError(f"The run folder {str(output_dir)!r} does not add up: {listed}. {fix}")
    if rows_per_shard < 1:
        raise AnnotatorError(f"--rows-per-shard {rows_per_shard} must be at least 1.")
    chosen = [v for v in (min_prob, label, top_fraction, where) if v is not None]
    if len(chosen) > 1:
        raise AnnotatorError(SEVERAL_FILTERS)
    if top_fraction is not None:
        row_filter = TopFraction(top_fraction)
    else:
        row_filter = RowFilter(min_prob, label) if where is None else None
    _check_targets(folder, to, rejected)
    records = folder.committed()
    files = folder.data_files()
    if not files:
        raise AnnotatorError(f"The run in {str(output_dir)!r} has no rows, so there is nothing to export.")
    schema = pq.read_schema(files[0])
    row_filter = row_filter or WhereFilter(where, schema)
    recipe = read_recipe_file(folder.recipe_path)
    _check_filter_columns(row_filter, validate_recipe(recipe).questions)
    drop = _columns_to_drop(drop_columns, schema)
    out_schema = _schema_without(schema, drop)
    if isinstance(row_filter, TopFraction):
        row_filter.prepare(files)
    info = folder.manifest().get("input_card") or {}
    split = info.get("split") or split_name(recipe)
    writers: list[ShardWriter] = []
    try:
        kept = ShardWriter(to, out_schema, rows_per_shard, split)
        writers.append(kept)
        rest = ShardWriter(rejected, out_schema, rows_per_shard, split) if rejected is not None else None
        writers += [rest] if rest is not None else []
        counts = _stream(files, [records[w] for w in sorted(records)], schema, row_filter, drop, kept, rest)
        summary = summarize(folder)
        for which, writer in (("kept", kept), ("rejected", rest)):
            if writer is not None:
                writer.close()
                rule = (
                    f"rows with {row_filter.describe()}" if which == "kept" else f"rows without {row_filter.describe()}"
                )
                card = export_card(recipe, info, writer.root, which, split, rule, counts, summary)
                card.save(writer.root / "README.md")
    except OSError as exc:
        for writer in writers:
            writer.discard()
        raise AnnotatorError(
            f"Could not write the export ({exc.strerror or exc}: {getattr(exc, 'filename', None) or to}). Nothing "
            "half-written is left there; free space or fix permissions, then export again."
        ) from None
    return {"kept": counts["kept"], "rejected": counts["rejected"]}


def _stream(files, records, schema, row_filter, drop, kept, rest) -> dict[str, int]:
    """Every committed file, checked against its journal record, filtered into the writers."""
    counts = {"kept": 0, "rejected": 0, "errors": 0}
    for path, record in zip(files, records, strict=True):
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows != record["rows"] or not parquet.schema_arrow.equals(schema):
            raise AnnotatorError(
                f"{str(path)!r} holds {parquet.metadata.num_rows} rows where the run wrote {record['rows']} (or "
                "other columns): it is not the file this run wrote. Move it away and run `annotate resume` on the "
                "run folder to write it again."
            )
        for batch in parquet.iter_batches(batch_size=ROW_GROUP_ROWS):
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
    return counts


def _check_filter_columns(row_filter: RowFilter | TopFraction | WhereFilter, questions: list[Question]) -> None:
    """--label, --min-prob and --top-fraction read `label` and `prob`, which only a run of the one Y/N question
    writes (an input column of that name in a run of several questions is not the run's)."""
    if isinstance(row_filter, WhereFilter) or (len(questions) == 1 and not questions[0].name and questions[0].yes_no):
        return
    decided = [q.columns[1] for q in questions]
    labels = [q.columns[1] for q in questions if q.yes_no]
    example = " and not ".join(labels[:2]) if labels else f"{decided[0]} == '{questions[0].answers[0]}'"
    raise AnnotatorError(
        "This run asked several questions or chose between answers, so it has no `label` column (nor `prob`) for "
        f"--label, --min-prob or --top-fraction; its columns are {', '.join(decided)}. Say which rows to keep with "
        f'--where, e.g. --where "{example}".'
    )


def _check_targets(folder: RunFolder, to: Path, rejected: Path | None) -> None:
    run = os.path.realpath(folder.root)
    for option, target in (("--to", to), ("--rejected", rejected)):
        if target is None:
            continue
        if is_undecoded(os.path.abspath(target)):  # pyarrow would refuse it half-way, after the folder is made
            raise AnnotatorError(f"{option}: {not_utf8_message(os.path.abspath(target))}")
        where = os.path.realpath(target)
        if where == run or where.startswith(run + os.sep) or run.startswith(where + os.sep):
            raise AnnotatorError(
                f"{option} {str(target)!r} is the run folder, inside it, or holds it. Export into a separate folder."
            )
        holder = enclosing_run(target)
        if holder is not None:
            raise AnnotatorError(
                f"{option} {str(target)!r} is inside the run folder {str(holder)!r}, which holds only what a run "
                "writes. Export into a separate folder."
            )
        above = next((p for p in target.absolute().parents if os.path.lexists(p)), None)
        for link in (target, above):
            if link is not None and os.path.islink(link) and not os.path.exists(link):
                raise AnnotatorError(
                    f"{option} {str(target)!r}: {str(link)!r} is a symbolic link to {os.readlink(link)!r}, which does "
                    "not exist (or whose links lead in a circle), so the export cannot be created there. Create the "
                    "folder it points to, or give the path of a new folder elsewhere."
                )
        if not target.exists() and above is not None and not above.is_dir():  # `--to photo.jpg/kept`
            raise AnnotatorError(
                f"{option} {str(target)!r} is under {str(above)!r}, which is a file, not a folder: the export cannot "
                "be created there. Give the path of a new folder elsewhere."
            )
        if target.exists() and not target.is_dir():  # "empty this one first" would be no fix for a file
            raise AnnotatorError(
                f"{option} {str(target)!r} is a file, not a folder. Export writes a complete dataset into a folder: "
                "give the path of a new one."
            )
        if target.exists() and any(target.iterdir()):
            raise AnnotatorError(
                f"{option} {str(target)!r} is not an empty folder. Export writes a complete dataset there: "
                "give a new folder, or empty this one first."
            )
    if rejected is not None:
        a, b = Path(os.path.realpath(to)), Path(os.path.realpath(rejected))  # Path.resolve raises on a link loop
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
