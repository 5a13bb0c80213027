"""Sink: the run folder. Each window becomes one parquet file, made visible atomically, then journaled.

Layout of OUTPUT_DIR:
    .annotator-run   the marker, written first: a folder is a run folder (ours) only with it
    lock             the lease of the coordinator: the one process handing out this folder's windows (lease.py)
    recipe.yaml      the frozen, resolved recipe
    manifest.json    input and recipe fingerprints, window size, total rows; written last when a run starts
    data/            part-NNNNNN.parquet, one per window, in input order (hidden while written)
    journal/         WRITER.jsonl, one append-only journal per writer incarnation (host-pid-token): a line per
                     committed window; WRITER.heartbeat.json beside it says where that writer runs and when it last
                     beat (`status` shows them)
    summary.json     written when the run finishes
    run.log          a line per committed window and per session (progress.py)
    README.md        a dataset card whose `configs:` make `load_dataset(OUTPUT_DIR)` read data/ (card.py)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotator.errors import AnnotatorError, RunInterrupted
from annotator.images import image_kind
from annotator.lease import Lease, LeaseHeld

RUN_MARKER = ".annotator-run"
# What a run writes at the top of its folder besides its marker and lease: all that --overwrite moves away.
# README.md counts only when it is the run's card (card.py marks it); report.html is `annotate report`'s default.
RUN_ENTRIES = ("manifest.json", "recipe.yaml", "summary.json", "README.md", "run.log", "report.html", "data", "journal")
PART_FILE = re.compile(r"part-(\d{6,})\.parquet")
# A window's file while its writer writes it, named after the writer (`writer_name`; a pid in older runs).
PART_LEFTOVER = re.compile(r"\.part-\d{6,}\.parquet\.[A-Za-z0-9][A-Za-z0-9-]*\.tmp")
# In journal/: a writer's heartbeat's hidden file while it is replaced; and all a run writes there (its journals too).
HEARTBEAT_LEFTOVER = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9-]*\.heartbeat\.json\.tmp")
JOURNAL_FILE = re.compile(
    rf"[A-Za-z0-9][A-Za-z0-9_.-]*\.jsonl|[A-Za-z0-9][A-Za-z0-9-]*\.heartbeat\.json|{HEARTBEAT_LEFTOVER.pattern}"
)
# A journal line counts only with these (integer) fields; anything else is a torn or foreign line.
RECORD_FIELDS = ("window", "start", "rows", "scored", "errors", "real_tokens", "padded_tokens")

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
    """The columns a run appends to the input's: `row_id`, each question's, `error`, `error_kind`."""
    return [("row_id", pa.int64()), *answer_fields(questions), ("error", pa.string()), ("error_kind", pa.string())]


def writer_name() -> str:
    """A name for one writer incarnation, unique across hosts: `host-pid-token` (journal and temp file names)."""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-")[:48] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_record(record: object) -> bool:
    """A whole journal record: the counts `summarize` adds up, of the right types."""
    if not isinstance(record, dict) or not all(_count(record.get(key)) for key in RECORD_FIELDS):
        return False
    kinds = record.get("error_kinds", {})
    return (
        isinstance(record.get("committed_at"), int | float)
        and _count(record.get("positives", 0))
        and _count(record.get("truncated_texts", 0))
        and isinstance(kinds, dict)
        and all(isinstance(k, str) and _count(v) for k, v in kinds.items())
    )


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The whole records of one journal, in the order committed; torn, damaged or foreign lines are skipped."""
    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if _is_record(record):
            records.append(record)
    return records


def hf_features(schema: pa.Schema, image_column: str, questions: Sequence[Question]) -> dict[str, Any]:
    """Hugging Face feature metadata for the output: the input's own (when it describes these columns), or derived;
    then the run's columns."""
    from datasets import Features

    features = _input_features(schema)
    if features is None:
        features = {}
        for field in schema.remove_metadata():
            try:
                features.update(Features.from_arrow_schema(pa.schema([field])).to_dict())
            except (ValueError, TypeError, NotImplementedError):
                raise AnnotatorError(
                    f"Input column {field.name!r} has type {field.type}, which Hugging Face datasets cannot describe, "
                    "so the output could not be loaded with `datasets`. Drop that column from the input, or cast it "
                    "to a supported type (e.g. a map to a list of structs)."
                ) from None
        if pa.types.is_struct(schema.field(image_column).type):
            features[image_column] = {"_type": "Image"}
    return {**features, **Features.from_arrow_schema(pa.schema(output_fields(questions))).to_dict()}


def _input_features(schema: pa.Schema) -> dict[str, Any] | None:
    """The input's own `huggingface` features, or None when absent, unreadable or not about these columns."""
    from datasets import Features

    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    if not raw:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
        if not isinstance(features, dict) or sorted(features) != sorted(schema.names):
            return None
        Features.from_dict(features)  # each entry must be a feature `datasets` can build
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return features


def output_schema(input_schema: pa.Schema, image_column: str, questions: Sequence[Question]) -> pa.Schema:
    schema = input_schema.remove_metadata()
    for name, dtype in output_fields(questions):
        schema = schema.append(pa.field(name, dtype))
    metadata = {"info": {"features": hf_features(input_schema, image_column, questions)}}
    return schema.with_metadata({HF_METADATA_KEY: json.dumps(metadata).encode()})


class RunFolder:
    """Everything a run writes, and what resume and status read back."""

    def __init__(self, root: str | Path, journal_name: str = "main") -> None:
        self.root = Path(root).expanduser()
        self.marker_path = self.root / RUN_MARKER
        self.data_dir = self.root / "data"
        self.journal_dir = self.root / "journal"
        self.recipe_path = self.root / "recipe.yaml"
        self.manifest_path = self.root / "manifest.json"
        self.summary_path = self.root / "summary.json"
        self.lock_path = self.root / "lock"
        self.journal_name = journal_name
        self.journal_path = self.journal_dir / f"{journal_name}.jsonl"
        self.lease = Lease(self.lock_path)
        # Called just before a window's file is published: raises if this writer may no longer write here.
        self.fence: Callable[[], None] | None = None
        self.claimed: Any = None  # what this process's start created (`annotator.folder.Claim`), to undo it

    def is_ours(self) -> bool:
        """A run folder: a run wrote its marker here (the first thing it writes)."""
        return self.marker_path.is_file()

    def exists(self) -> bool:
        """A run folder whose run got as far as writing its manifest (the last thing a start writes)."""
        return self.is_ours() and self.manifest_path.is_file()

    @property
    def finished(self) -> bool:
        return self.summary_path.is_file()

    def create(self, recipe_yaml: str, manifest: dict[str, Any]) -> None:
        """A whole run folder in one go, for synthetic runs (`fake_run`); a real run starts with `folder.start`."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.marker_path.touch()
        self.write_text(self.recipe_path, recipe_yaml)
        self.ensure_dirs()
        self.write_text(self.manifest_path, json.dumps(manifest, indent=2))

    def ensure_dirs(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        self.journal_dir.mkdir(exist_ok=True)

    def manifest(self) -> dict[str, Any]:
        """The manifest; a missing or damaged one is an error that names it."""
        try:
            manifest = json.loads(self.manifest_path.read_bytes())
            if isinstance(manifest, dict) and isinstance(manifest.get("window"), int):
                return manifest
        except FileNotFoundError:
            raise AnnotatorError(
                f"{str(self.manifest_path)!r} is missing, so this run folder cannot be checked or continued. "
                "Start the run again with `annotate run RECIPE --overwrite`."
            ) from None
        except (OSError, ValueError):
            pass
        raise AnnotatorError(
            f"{str(self.manifest_path)!r} is damaged (not the manifest annotator wrote), so this run folder cannot be "
            "checked or continued. Start the run again with `annotate run RECIPE --overwrite`."
        )

    def write_text(self, path: Path, text: str) -> None:
        """Write a file of the folder atomically: hidden, fsync, rename."""
        hidden = path.with_name(f".{path.name}.tmp")
        with open(hidden, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(hidden, path)
        _fsync_dir(path.parent)

    def window_file(self, index: int) -> Path:
        return self.data_dir / f"part-{index:06d}.parquet"

    def journal_records(self) -> dict[int, dict[str, Any]]:
        """Window index -> its journal record, over every journal, whether or not its file exists.

        A window done more than once (by two writers, one thought dead that was only slow; or a pilot's short last
        window, done again whole once the limit grew) has a record in each journal that did it: of those, one that
        holds every row the window should (`window_is_whole`) counts, the last committed. Lines that are not whole
        records (a torn append, a damaged file) are skipped: their windows are done again.
        """
        manifest = self._manifest_or_empty()
        records: dict[int, dict[str, Any]] = {}
        ranks: dict[int, tuple[bool, float]] = {}
        journals = sorted(self.journal_dir.glob("*.jsonl")) if self.journal_dir.is_dir() else []
        for journal in journals:
            for record in read_journal(journal):
                index, rank = record["window"], (window_is_whole(record, manifest), record["committed_at"])
                if index not in ranks or rank >= ranks[index]:
                    records[index], ranks[index] = record, rank
        return records

    def _manifest_or_empty(self) -> dict[str, Any]:
        try:
            return self.manifest() if self.manifest_path.is_file() else {}
        except AnnotatorError:
            return {}  # damaged: `status` says so, resume refuses it

    def committed(self) -> dict[int, dict[str, Any]]:
        """Window index -> journal record, for windows whose file exists: what resume skips.

        A window that holds fewer rows than it now should (a pilot's last window, after `input.limit` grew) is not
        committed either: it is done again.
        """
        manifest = self._manifest_or_empty()
        return {
            w: r
            for w, r in self.journal_records().items()
            if self.window_file(w).is_file() and window_is_whole(r, manifest)
        }

    def clean_leftovers(self, writer: str | None = None) -> int:
        """Delete the hidden files of writes that never completed (window files, heartbeats); returns files deleted.

        Only the coordinator calls this: for the whole folder when no writer runs (before they start, after they
        are gone), or for one `writer` it knows is dead. A writer never deletes another's files. A torn journal line
        needs no repair: every writer incarnation appends to a journal of its own, and nobody appends to it again.
        """
        self.ensure_dirs()
        leftovers = [p for p in self.data_dir.iterdir() if PART_LEFTOVER.fullmatch(p.name)]
        leftovers += [p for p in self.journal_dir.iterdir() if HEARTBEAT_LEFTOVER.fullmatch(p.name)]
        if writer is not None:
            leftovers = [p for p in leftovers if p.name.endswith(f".{writer}.tmp") or p.name.startswith(f".{writer}.")]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def write_window(self, index: int, table: pa.Table, record: dict[str, Any]) -> None:
        """Write hidden, fsync, rename into place, then append the journal line that commits it.

        The hidden name carries this writer's name, so writers on any host never write the same temporary file;
        two writers that did the same window rename identical content onto the same final name, atomically.
        """
        final = self.window_file(index)
        tag = self.journal_name if self.journal_name != "main" else str(os.getpid())
        hidden = self.data_dir / f".{final.name}.{tag}.tmp"
        try:
            with open(hidden, "wb") as f:
                pq.write_table(table, f)  # snappy: encoded images do not compress, and zstd on them halved write speed
                f.flush()
                os.fsync(f.fileno())
                size = os.fstat(f.fileno()).st_size
            if self.lease.holder is not None:
                self.lease.check()  # never publish a window from a process whose lease was taken over
            if self.fence is not None:
                self.fence()  # a writer: never publish into a folder its coordinator no longer holds
            os.replace(hidden, final)
            _fsync_dir(self.data_dir)
            line = json.dumps({**record, "window": index, "file": final.name, "bytes": size}) + "\n"
            with open(self.journal_path, "a", encoding="utf-8") as journal:
                journal.write(line)
                journal.flush()
                os.fsync(journal.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):  # a filesystem gone read-only refuses this too
                hidden.unlink(missing_ok=True)
            raise RunInterrupted(
                f"Could not write window {index} to {self.data_dir} ({exc.strerror or exc}). Nothing half-written "
                f"is visible; free space or fix permissions, then run `annotate resume {self.root}`."
            ) from exc
        except BaseException:
            hidden.unlink(missing_ok=True)
            raise

    def write_summary(self, summary: dict[str, Any]) -> None:
        try:
            self.write_text(self.summary_path, json.dumps(summary, indent=2))
        except OSError as exc:
            raise RunInterrupted(
                f"Every window is committed, but {str(self.summary_path)!r} could not be written "
                f"({exc.strerror or exc}). Free space or fix permissions, then run `annotate resume {self.root}` "
                "to finish."
            ) from exc

    def data_files(self) -> list[Path]:
        """The committed window files, in window order."""
        return [self.window_file(w) for w in sorted(self.committed())]

    # --- the lease: one writing process per run folder --------------------------------------------

    def acquire_lock(self) -> None:
        """Take the folder's lease (raises `LeaseHeld`, a user error naming the holder) and keep it renewed."""
        try:
            self.lease.acquire()
        except LeaseHeld:
            raise
        except OSError as exc:
            raise AnnotatorError(
                f"Cannot take the lease {str(self.lock_path)!r}: {exc.strerror or exc}. The run folder must be "
                "writable; fix its permissions or free space."
            ) from None
        self.lease.start_heartbeat()

    def release_lock(self) -> None:
        self.lease.release()

    def lock_holder(self):
        """The holder of the folder's lease while it is live, else None."""
        holder = self.lease.current()
        return holder if holder is not None and not holder.stale() else None

    @property
    def owner_token(self) -> str | None:
        """This process's lease token while it holds the folder: what its writers check before they publish."""
        return self.lease.holder.token if self.lease.holder is not None else None

    def lock_token(self) -> str | None:
        """The token of whoever holds the lease now (live or not, a successor that claimed it included), or None."""
        holder = self.lease.current()
        return holder.token if holder is not None else None


def window_is_whole(record: dict[str, Any], manifest: dict[str, Any]) -> bool:
    """Whether a committed window holds every row it should under the manifest's current total (or limit).

    A run grown from a pilot (`annotate resume --set input.limit=M`) redoes the pilot's last, short window.
    For a stream of unknown length, a short window ends the stream unless the limit in force cut it.
    """
    size = manifest.get("window")
    if size is None or record["rows"] >= size:
        return True
    total = manifest.get("total_rows")
    if total is not None:
        return record["rows"] >= min(size, total - record["start"])
    cut_at = record.get("limit")  # the limit in force when the window was written
    if cut_at is None or record["start"] + record["rows"] < cut_at:
        return True  # the stream itself ended there
    limit = manifest.get("limit")
    return limit is not None and limit <= cut_at


def latest_run(root: Path, unfinished: bool = False) -> RunFolder | None:
    """The most recently started run folder under `root` (only the unfinished ones, if asked).

    Symbolic links are not followed and no run folder is searched inside, so loops and big data folders cost nothing.
    """
    folders = []
    for folder, dirs, files in os.walk(root):
        if RUN_MARKER in files:
            dirs.clear()
            run = RunFolder(folder)
            if run.exists() and not (unfinished and run.finished):
                folders.append(run)
    return max(folders, key=lambda f: f.manifest_path.stat().st_mtime, default=None)


def iter_entries(folder: Path) -> Iterator[str]:
    """Names in a folder, sorted; nothing when it does not exist."""
    try:
        yield from sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return


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
        pa.array([None if e is None else image_kind(e) for e in errors], pa.string()),
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
