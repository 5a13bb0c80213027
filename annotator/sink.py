"""Sink: the run folder. Each window becomes one parquet file, made visible atomically, then journaled.

Layout of OUTPUT_DIR:
    recipe.yaml      the frozen, resolved recipe
    manifest.json    input and recipe fingerprints, window size, total rows
    data/            part-NNNNNN.parquet, one per window, in input order (hidden while written)
    journal/         NAME.jsonl, one append-only journal per writer process: a line per committed window
    summary.json     written when the run finishes
    lock             pid and host of the process writing the folder
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotator.errors import AnnotatorError, RunInterrupted

if TYPE_CHECKING:
    from annotator.questions import Question
    from annotator.scoring import Score

HF_METADATA_KEY = b"huggingface"


def answer_fields(questions: Sequence[Question]) -> list[tuple[str, pa.DataType]]:
    """Each question's output columns and their types, in the recipe's order."""
    fields = []
    for question in questions:
        first, second, mass = question.columns
        if question.yes_no:
            fields += [(first, pa.float32()), (second, pa.bool_())]
        else:
            fields += [(first, pa.list_(pa.float32())), (second, pa.string())]
        fields.append((mass, pa.float32()))
    return fields


def output_fields(questions: Sequence[Question]) -> list[tuple[str, pa.DataType]]:
    """The columns a run appends to the input's: `row_id`, each question's, `error`."""
    return [("row_id", pa.int64()), *answer_fields(questions), ("error", pa.string())]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hf_features(schema: pa.Schema, image_column: str, questions: Sequence[Question]) -> dict[str, Any]:
    """Hugging Face feature metadata for the output: the input's own, or derived, plus ours."""
    from datasets import Features

    features: dict[str, Any] | None = None
    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    if raw:
        features = json.loads(raw).get("info", {}).get("features")
    if not features:
        features = Features.from_arrow_schema(schema.remove_metadata()).to_dict()
        if pa.types.is_struct(schema.field(image_column).type):
            features[image_column] = {"_type": "Image"}
    return {**features, **Features.from_arrow_schema(pa.schema(output_fields(questions))).to_dict()}


def output_schema(input_schema: pa.Schema, image_column: str, questions: Sequence[Question]) -> pa.Schema:
    schema = input_schema.remove_metadata()
    for name, dtype in output_fields(questions):
        schema = schema.append(pa.field(name, dtype))
    metadata = {"info": {"features": hf_features(input_schema, image_column, questions)}}
    return schema.with_metadata({HF_METADATA_KEY: json.dumps(metadata).encode()})


class RunFolder:
    """Everything a run writes, and what resume and status read back."""

    def __init__(self, root: str | Path, journal_name: str = "main") -> None:
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.journal_dir = self.root / "journal"
        self.recipe_path = self.root / "recipe.yaml"
        self.manifest_path = self.root / "manifest.json"
        self.summary_path = self.root / "summary.json"
        self.lock_path = self.root / "lock"
        self.journal_path = self.journal_dir / f"{journal_name}.jsonl"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    @property
    def finished(self) -> bool:
        return self.summary_path.is_file()

    def create(self, recipe_yaml: str, manifest: dict[str, Any]) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self._write_atomic(self.recipe_path, recipe_yaml)
        self._write_atomic(self.manifest_path, json.dumps(manifest, indent=2))

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def _write_atomic(self, path: Path, text: str) -> None:
        hidden = path.with_name(f".{path.name}.tmp")
        with open(hidden, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(hidden, path)
        _fsync_dir(path.parent)

    def window_file(self, index: int) -> Path:
        return self.data_dir / f"part-{index:06d}.parquet"

    def committed(self) -> dict[int, dict[str, Any]]:
        """Window index -> journal record, over every journal, for windows whose file exists.

        A torn last line (killed mid-append) is ignored: its window is simply done again.
        """
        records: dict[int, dict[str, Any]] = {}
        for journal in sorted(self.journal_dir.glob("*.jsonl")):
            for line in journal.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if self.window_file(record["window"]).is_file():
                    records[record["window"]] = record
        return records

    def clean_leftovers(self) -> int:
        """Delete hidden files of writes that never completed and end a torn journal line; returns files deleted."""
        leftovers = [p for p in self.data_dir.iterdir() if p.name.startswith((".", "_"))]
        for path in leftovers:
            path.unlink(missing_ok=True)
        if self.journal_path.is_file() and self.journal_path.stat().st_size:
            with open(self.journal_path, "rb+") as journal:
                journal.seek(-1, os.SEEK_END)
                if journal.read(1) != b"\n":
                    journal.write(b"\n")  # a killed append: the torn line stays unparseable, the next one is whole
        return len(leftovers)

    def write_window(self, index: int, table: pa.Table, record: dict[str, Any]) -> None:
        """Write hidden, fsync, rename into place, then append the journal line that commits it."""
        final = self.window_file(index)
        hidden = self.data_dir / f".{final.name}.{os.getpid()}.tmp"
        try:
            with open(hidden, "wb") as f:
                pq.write_table(table, f)  # snappy: encoded images do not compress, and zstd on them halved write speed
                f.flush()
                os.fsync(f.fileno())
            os.replace(hidden, final)
            _fsync_dir(self.data_dir)
            line = json.dumps({**record, "window": index, "file": final.name}) + "\n"
            with open(self.journal_path, "a", encoding="utf-8") as journal:
                journal.write(line)
                journal.flush()
                os.fsync(journal.fileno())
        except OSError as exc:
            hidden.unlink(missing_ok=True)
            raise RunInterrupted(
                f"Could not write window {index} to {self.data_dir} ({exc.strerror or exc}). Nothing half-written "
                f"is visible; free space or fix permissions, then run `annotate resume {self.root}`."
            ) from exc

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._write_atomic(self.summary_path, json.dumps(summary, indent=2))

    def data_files(self) -> list[Path]:
        return sorted(self.data_dir.glob("part-*.parquet"))

    # --- the lock: one writing process per run folder -------------------------------------------

    def lock_holder(self) -> dict[str, Any] | None:
        """The live process holding the lock, or None (no lock, or a stale one from a dead process)."""
        try:
            holder = json.loads(self.lock_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
            return None
        return holder

    def acquire_lock(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.lock_holder()
                if holder is not None:
                    raise AnnotatorError(
                        f"Run folder {str(self.root)!r} is being written by process {holder.get('pid')} on "
                        f"{holder.get('host')}. Wait for it to finish, or stop it; if that host is gone, delete "
                        f"{str(self.lock_path)!r} and try again."
                    ) from None
                self.lock_path.unlink(missing_ok=True)  # stale: its process is dead
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return
        raise AnnotatorError(f"Could not take the lock {str(self.lock_path)!r}; another process keeps taking it.")

    def release_lock(self) -> None:
        holder = None
        try:
            holder = json.loads(self.lock_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.lock_path.unlink(missing_ok=True)


def latest_run(root: Path, unfinished: bool = False) -> RunFolder | None:
    """The most recently started run folder under `root` (only the unfinished ones, if asked)."""
    folders = [RunFolder(p.parent) for p in root.glob("**/manifest.json")]
    if unfinished:
        folders = [f for f in folders if not f.finished]
    return max(folders, key=lambda f: f.manifest_path.stat().st_mtime, default=None)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def window_table(
    table: pa.Table,
    schema: pa.Schema,
    start: int,
    scores: Sequence[Score | None],
    errors: Sequence[str | None],
    questions: Sequence[Question],
) -> pa.Table:
    """The input rows of a window with the annotation columns appended, in the output schema."""
    columns = [
        *table.columns,
        pa.array(range(start, start + table.num_rows), pa.int64()),
        *answer_columns(scores, questions),
        pa.array(errors, pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def answer_columns(scores: Sequence[Score | None], questions: Sequence[Question]) -> list[pa.Array]:
    """Each question's columns for a window's rows (null where a row has no score), as `answer_fields` lists them.

    A label or an answer is decided on the stored float32 values, so `label == (prob >= threshold)` and `answer ==
    answers[argmax(probs)]` (the first of equals) hold in the file.
    """
    columns: list[pa.Array] = []
    for q, question in enumerate(questions):
        masses = pa.array([None if s is None else s.masses[q] for s in scores], pa.float32())
        if question.yes_no:
            probs = pa.array([None if s is None else s.probs[q][0] for s in scores], pa.float32())
            labels = [None if p is None else p >= question.threshold for p in probs.to_pylist()]
            columns += [probs, pa.array(labels, pa.bool_()), masses]
            continue
        probs = pa.array([None if s is None else s.probs[q] for s in scores], pa.list_(pa.float32()))
        stored = [None if p is None else np.asarray(p, np.float32) for p in probs.to_pylist()]
        answers = [None if p is None else question.answers[int(np.argmax(p))] for p in stored]
        columns += [probs, pa.array(answers, pa.string()), masses]
    return columns


def answer_counts(table: pa.Table, questions: Sequence[Question]) -> dict[str, Any]:
    """A window's answers, counted as its journal record keeps them: `positives` (rows labelled true) of a Y/N
    question, `answers` ({answer: rows}) of one with answers; per question name under `questions` when the recipe
    names its questions (`prompt.questions`)."""
    counts: dict[str, dict[str, Any]] = {}
    for question in questions:
        _, decided, _ = question.columns
        values = table.column(decided)
        if question.yes_no:
            counts[question.name] = {"positives": pc.sum(values).as_py() or 0}
        else:
            found = Counter(v for v in values.to_pylist() if v is not None)
            counts[question.name] = {"answers": {a: found.get(a, 0) for a in question.answers}}
    if len(questions) == 1 and not questions[0].name:
        return counts[""]
    return {"questions": counts}
