"""`annotate report`: one self-contained HTML page of a run, read in two streaming passes of bounded memory.

Pass 1 reads the score columns only (row_id, error, error_kind and each question's columns), batch by batch:
counts, histograms, error kinds with a sample each, and the rows for each thumbnail grid, chosen as the k
smallest of a key (-prob, prob, |prob - threshold| of a Y/N question, -P(answer) of the rows choosing each answer
of a question with answers, a hash of row_id for the random sample) with ties to the lower row_id. Pass 2 reads
the image and text columns of the files holding a chosen row, and stops in each file after its last chosen row.
Thumbnails are small JPEGs inlined as base64.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from annotator.errors import AnnotatorError
from annotator.images import ImageRef, decode_resized, header_size, image_kind, read_path
from annotator.questions import Question
from annotator.recipe import validate_recipe
from annotator.scores import histogram
from annotator.sink import RunFolder

THUMBNAIL_PX = 160
HISTOGRAM_BINS = 100
YES_NO_GRIDS = {
    "positives": "Most confident positives",
    "threshold": "Nearest the threshold",
    "negatives": "Most confident negatives",
}
SHARED_GRIDS = {"random": "Random sample", "errors": "Rows with an error"}
GRIDS = {**YES_NO_GRIDS, **SHARED_GRIDS}  # the grids of a run of the single Y/N question, in page order


class BottomK:
    """The k rows with the smallest (key, row_id) seen so far, in O(k) memory whatever the rows offered."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.keys = np.empty(0)
        self.ids = np.empty(0, np.int64)
        self.where = np.empty(0, np.int64)

    def offer(self, keys: np.ndarray, ids: np.ndarray, where: np.ndarray) -> None:
        if not self.k or not len(keys):
            return
        if len(keys) > self.k:
            kth = np.partition(keys, self.k - 1)[self.k - 1]
            near = keys <= kth  # ties kept: the lower row_id among them must win
            keys, ids, where = keys[near], ids[near], where[near]
        keys = np.concatenate([self.keys.astype(keys.dtype, copy=False), keys])
        ids, where = np.concatenate([self.ids, ids]), np.concatenate([self.where, where])
        order = np.lexsort((ids, keys))[: self.k]
        self.keys, self.ids, self.where = keys[order], ids[order], where[order]


def spread_hash(row_ids: np.ndarray) -> np.ndarray:
    """splitmix64 of the row ids: a fixed random order, so the random sample is the same on every report."""
    x = row_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass
class Pick:
    """A row shown as a thumbnail."""

    row_id: int
    where: int  # file index << 32 | row offset in the file
    scores: dict[str, Any] = field(default_factory=dict)  # every question's columns: prob_cat, answer_kind, ...
    error: str | None = None
    text: str | None = None
    thumbnail: str | None = None  # a data: URI, or None when the image cannot be shown


@dataclass
class QuestionFacts:
    """What one question's columns hold over the run: a Y/N question's prob histogram and labels, or the rows that
    chose each answer of a question with answers; the answer_mass histogram of either."""

    question: Question
    positives: int = 0
    ones: int = 0  # rows with prob exactly 1: the last histogram bin alone cannot tell them apart
    prob_histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    mass_histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    answers: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.question.yes_no:
            self.answers = dict.fromkeys(self.question.answers, 0)

    def grids(self) -> dict[str, str]:
        """{grid key: title} of this question's thumbnail grids; keys end in `_<name>` for a named question."""
        if self.question.yes_no:
            return {self.question.column(base): title for base, title in YES_NO_GRIDS.items()}
        return {self.question.column(f"answer{i}"): f"Answered {a!r}" for i, a in enumerate(self.question.answers)}


@dataclass
class RunFacts:
    """Everything the page shows, gathered from the run folder."""

    questions: list[QuestionFacts]
    rows: int = 0
    scored: int = 0
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    error_samples: dict[str, Pick] = field(default_factory=dict)
    grids: dict[str, list[Pick]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def single(self) -> QuestionFacts | None:
        """The question of a run that asks one unnamed Y/N question (`prompt.question`), else None."""
        first = self.questions[0]
        return first if len(self.questions) == 1 and first.question.yes_no and not first.question.name else None

    @property
    def positives(self) -> int:
        return self.questions[0].positives

    @property
    def prob_histogram(self) -> list[int]:
        return self.questions[0].prob_histogram


def _where(file_index: int, offsets: np.ndarray) -> np.ndarray:
    return (np.int64(file_index) << np.int64(32)) | offsets.astype(np.int64)


def score_columns(questions: list[Question]) -> list[str]:
    """The columns pass 1 reads: row_id, every question's, error (error_kind too when the files have it)."""
    return ["row_id", *(c for q in questions for c in q.columns), "error"]


def scan_scores(files: list[Path], questions: list[Question], k: int) -> tuple[RunFacts, dict[str, BottomK]]:
    """Pass 1: counts, histograms, error kinds and the rows of each grid, from the score columns alone."""
    facts = RunFacts([QuestionFacts(q) for q in questions])
    picks = {key: BottomK(k) for qf in facts.questions for key in qf.grids()}
    picks.update({name: BottomK(k) for name in SHARED_GRIDS})
    first_error_of: dict[str, tuple[int, int, str]] = {}
    for file_index, path in enumerate(files):
        parquet = pq.ParquetFile(path)
        kind_column = ["error_kind"] if "error_kind" in parquet.schema_arrow.names else []
        offset = 0
        for batch in parquet.iter_batches(batch_size=1 << 16, columns=score_columns(questions) + kind_column):
            n = batch.num_rows
            ids = batch.column("row_id").to_numpy(zero_copy_only=False).astype(np.int64)
            where = _where(file_index, np.arange(offset, offset + n))
            facts.rows += n
            facts.scored += n - batch.column(questions[0].columns[0]).null_count
            for qf in facts.questions:
                _scan_question(qf, batch, ids, where, picks)
            picks["random"].offer(spread_hash(ids), ids, where)
            failed = np.flatnonzero(pc.is_valid(batch.column("error")).to_numpy(zero_copy_only=False))
            facts.errors += len(failed)
            picks["errors"].offer(ids[failed].astype(np.float64), ids[failed], where[failed])
            if len(failed):
                messages = pc.take(batch.column("error"), pa.array(failed)).to_pylist()
                kinds = (
                    pc.take(batch.column("error_kind"), pa.array(failed)).to_pylist()
                    if kind_column
                    else [image_kind(m) for m in messages]
                )
                facts.error_kinds.update(kinds)
                for i, kind, message in zip(failed, kinds, messages, strict=True):
                    first_error_of.setdefault(kind, (int(ids[i]), int(where[i]), message))
            offset += n
    facts.error_samples = {
        kind: Pick(row_id, where, error=msg) for kind, (row_id, where, msg) in first_error_of.items()
    }
    return facts, picks


def _scan_question(
    qf: QuestionFacts, batch: pa.RecordBatch, ids: np.ndarray, where: np.ndarray, picks: dict[str, BottomK]
) -> None:
    """One question's columns of a batch: its histograms and counts, and the rows offered to its grids."""
    question = qf.question
    first, decided, mass = question.columns
    qf.mass_histogram = _plus(qf.mass_histogram, histogram(batch.column(mass), HISTOGRAM_BINS))
    if question.yes_no:
        prob = batch.column(first)
        scored = pc.is_valid(prob).to_numpy(zero_copy_only=False)
        p = pc.fill_null(prob, 0.0).to_numpy(zero_copy_only=False).astype(np.float64)
        label = pc.fill_null(batch.column(decided), False).to_numpy(zero_copy_only=False)
        qf.positives += int(label.sum())
        qf.ones += int((scored & (p >= 1.0)).sum())
        qf.prob_histogram = _plus(qf.prob_histogram, histogram(prob, HISTOGRAM_BINS))
        positive, negative = scored & label, scored & ~label
        picks[question.column("positives")].offer(-p[positive], ids[positive], where[positive])
        picks[question.column("negatives")].offer(p[negative], ids[negative], where[negative])
        picks[question.column("threshold")].offer(np.abs(p[scored] - question.threshold), ids[scored], where[scored])
        return
    # The answer the sink chose (the first of equal probs) and its probability: the rows most sure of each answer.
    chosen = pc.index_in(batch.column(decided), value_set=pa.array(question.answers, pa.string()))
    rows = np.flatnonzero(pc.is_valid(chosen).to_numpy(zero_copy_only=False))
    index = pc.drop_null(chosen).to_numpy(zero_copy_only=False).astype(np.int64)
    probs = pc.take(batch.column(first), pa.array(rows, pa.int64()))
    flat = pc.list_flatten(probs).to_numpy(zero_copy_only=False).astype(np.float64)
    if len(flat) != len(rows) * len(question.answers):
        raise AnnotatorError(
            f"column {first!r} does not hold {len(question.answers)} probabilities in every scored row, as this run "
            "writes it: the run folder was changed."
        )
    confidence = flat.reshape(len(rows), len(question.answers))[np.arange(len(rows)), index]
    for i, answer in enumerate(question.answers):
        mine = rows[index == i]
        qf.answers[answer] += len(mine)
        picks[question.column(f"answer{i}")].offer(-confidence[index == i], ids[mine], where[mine])


def _plus(total: list[int], counts: list[int]) -> list[int]:
    return [a + b for a, b in zip(total, counts, strict=True)]


def _picks_in_order(name: str, chosen: BottomK, facts: RunFacts) -> list[Pick]:
    picks = [Pick(int(i), int(w)) for i, w in zip(chosen.ids, chosen.where, strict=True)]
    if name == "errors":  # one row of each kind first, then the first error rows
        samples = list(facts.error_samples.values())
        seen = {p.row_id for p in samples}
        picks = (samples + [p for p in picks if p.row_id not in seen])[: chosen.k]
    return picks


def fill_picks(
    files: list[Path],
    picks: list[Pick],
    recipe: dict[str, Any],
    questions: list[Question],
    base_dirs: list[tuple[int, str]],
) -> None:
    """Pass 2: scores, text and a thumbnail for each chosen row, reading only files that hold one."""
    image_column = recipe["input"]["image_column"]
    uses_text = any("{text}" in q.text for q in questions)
    query = recipe["prompt"].get("query") if uses_text else None
    scores = score_columns(questions)[1:-1]
    max_pixels = recipe["input"]["max_image_pixels"]
    by_file: dict[int, dict[int, list[Pick]]] = {}
    for pick in picks:
        by_file.setdefault(pick.where >> 32, {}).setdefault(pick.where & 0xFFFFFFFF, []).append(pick)
    for file_index, wanted in sorted(by_file.items()):
        parquet = pq.ParquetFile(files[file_index])
        # The row's text: the fixed query, else its text column when the input has one (a question may not use it).
        text_column = None if query else recipe["input"]["text_column"]
        text_column = text_column if text_column in parquet.schema_arrow.names else None
        columns = [image_column, *scores, "error"] + ([text_column] if text_column else [])
        last, offset = max(wanted), 0
        for batch in parquet.iter_batches(batch_size=64, columns=columns):
            for row in set(wanted) & set(range(offset, offset + batch.num_rows)):
                values = {name: batch.column(name)[row - offset].as_py() for name in columns}
                shown = thumbnail(values[image_column], _base_dir(wanted[row][0].row_id, base_dirs), max_pixels)
                for pick in wanted[row]:
                    pick.scores = {name: values[name] for name in scores}
                    pick.error = values["error"]
                    pick.text = query if query else values[text_column] if text_column else None
                    pick.thumbnail = shown
            offset += batch.num_rows
            if offset > last:
                break  # the rest of the file holds no chosen row: its images are never read


def _base_dir(row_id: int, base_dirs: list[tuple[int, str]]) -> str | None:
    """The folder relative image paths of this row resolve against (its input parquet file's)."""
    folder = None
    for first_row, directory in base_dirs:
        if row_id < first_row:
            break
        folder = directory
    return folder


def input_base_dirs(recipe: dict[str, Any]) -> list[tuple[int, str]]:
    """(first row, folder) of each input parquet file, for images stored as relative paths; [] if unknown."""
    spec = recipe["input"].get("parquet")
    if not spec:
        return []
    from annotator.sources import resolve_parquet_files

    try:
        files = resolve_parquet_files(spec)
        counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    except Exception:  # the input moved or changed since the run: thumbnails of path images show as missing
        return []
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
    return [(start, str(f.parent)) for start, f in zip(starts, files, strict=True)]


def thumbnail(value: Any, base_dir: str | None, max_pixels: int) -> str | None:
    """A JPEG of at most THUMBNAIL_PX on its longer side as a data: URI; None if the image cannot be decoded."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        ref = ImageRef(data=bytes(data)) if data else ImageRef(path=read_path(path, base_dir)) if path else None
    elif isinstance(value, bytes | bytearray):
        ref = ImageRef(data=bytes(value))
    elif isinstance(value, str) and value:
        ref = ImageRef(path=read_path(value, base_dir))
    else:
        ref = None
    if ref is None:
        return None
    try:
        width, height = header_size(ref, max_pixels)  # refuses a too-large image before decoding it
        scale = min(1.0, THUMBNAIL_PX / max(width, height))
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        pixels = decode_resized(ref, size, max_pixels, draft=True)
    except Exception:  # a broken image is that row's error already; here it is just not shown
        return None
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def throughput(records: list[dict[str, Any]]) -> dict[str, Any]:
    """`rows_per_s` as the run went: per session, rows committed so far over seconds since its model loaded."""
    points: list[tuple[float, float]] = []
    offset, sessions = 0.0, 0
    by_session: dict[float, list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: r["committed_at"]):
        by_session.setdefault(record.get("session_started") or 0.0, []).append(record)
    for started, mine in sorted(by_session.items()):
        sessions += 1
        start = started or mine[0]["committed_at"]
        rows = 0
        for record in mine:
            rows += record["rows"]
            elapsed = record["committed_at"] - start
            if elapsed > 0:
                points.append((offset + elapsed, rows / elapsed))
        offset += max(0.0, mine[-1]["committed_at"] - start)
    step = max(1, len(points) // 300)
    return {"points": points[::step], "sessions": sessions, "seconds": offset}


def gather(folder: RunFolder, k: int) -> tuple[RunFacts, dict[str, Any]]:
    """Both passes over a run folder; returns the facts and the frozen recipe."""
    recipe = yaml.safe_load(folder.recipe_path.read_text(encoding="utf-8"))
    questions = validate_recipe(recipe, str(folder.recipe_path)).questions
    records = folder.committed()
    files = [folder.window_file(index) for index in sorted(records)]
    started = time.perf_counter()
    facts, chosen = scan_scores(files, questions, k)
    facts.seconds["scores"] = time.perf_counter() - started
    facts.grids = {name: _picks_in_order(name, picked, facts) for name, picked in chosen.items()}
    every_pick = [p for grid in facts.grids.values() for p in grid] + list(facts.error_samples.values())
    started = time.perf_counter()
    fill_picks(files, every_pick, recipe, questions, input_base_dirs(recipe))
    facts.seconds["thumbnails"] = time.perf_counter() - started
    return facts, recipe


def write_report(output_dir: Path, out: Path | None, k: int = 12) -> Path:
    """Write the run's report page; returns its path."""
    from annotator.report_page import REPORT_MARKER, render

    folder = RunFolder(output_dir)
    if not folder.exists():
        raise AnnotatorError(f"{str(output_dir)!r} is not a run folder (no manifest.json). Pass a run's output folder.")
    if not 1 <= k <= 200:
        raise AnnotatorError(f"--thumbnails {k}: give a number from 1 to 200.")
    out = Path(out).expanduser() if out is not None else folder.root / "report.html"  # `~` as in every other path
    if out.is_dir() or not out.parent.is_dir():
        raise AnnotatorError(
            f"--out {str(out)!r} is not a file name in an existing folder; give one such as {folder.root}/report.html."
        )
    _check_outside_runs(out, folder)
    _check_replaceable(out, REPORT_MARKER)
    facts, recipe = gather(folder, k)
    page = render(folder, recipe, facts, throughput(list(folder.committed().values())))
    # A hidden file of a name of its own, renamed over the target: a failed write leaves nothing half-written.
    fd, hidden = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(page)
        _check_replaceable(out, REPORT_MARKER)  # nothing took its place meanwhile
        os.replace(hidden, out)
    except BaseException:
        Path(hidden).unlink(missing_ok=True)
        raise
    return out


def _check_outside_runs(out: Path, folder: RunFolder) -> None:
    """A report goes beside runs, or as a run's own `report.html`: never among a run's data or journals, where it
    would be a stray file that makes the run damaged (any run folder: this one or another)."""
    from annotator.folder import enclosing_run

    holder = enclosing_run(out)
    if holder is None:
        return
    if Path(os.path.realpath(out)) != holder / "report.html" or holder != Path(os.path.realpath(folder.root)):
        raise AnnotatorError(
            f"--out {str(out)!r} is inside the run folder {str(holder)!r}, which holds only what a run writes. "
            "Write the report outside it (a run's own report is its report.html, the default)."
        )


def _check_replaceable(out: Path, marker: str) -> None:
    """A file already at `out` is replaced only if it is a report this command wrote (never a user's file)."""
    if not os.path.lexists(out):
        return
    head = b""
    if out.is_file():  # stat first: a FIFO or device is never opened
        try:
            with open(out, "rb") as file:
                head = file.read(4096)
        except OSError as exc:
            why = exc.strerror or exc
            raise AnnotatorError(f"--out {str(out)!r} cannot be read ({why}); give another file name.") from None
    if marker.encode() not in head:
        raise AnnotatorError(
            f"--out {str(out)!r} already exists and is not a report that `annotate report` wrote, so it is left as it "
            "is. Give a new file name, or move that file away first."
        )
