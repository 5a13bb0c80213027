"""Sink: the run folder. Each window becomes one parquet file, made visible atomically, then journaled.

Layout of OUTPUT_DIR:
    recipe.yaml      the frozen, resolved recipe
    manifest.json    input and recipe fingerprints, window size, total rows
    data/            part-NNNNNN.parquet, one per window, in input order (hidden while written)
    journal/         NAME.jsonl, one append-only journal per writer process: a line per committed window
    summary.json     written when the run finishes
    lock             pid and host of the process writing the folder
    run.log          a line per committed window and per session (progress.py)
    README.md        a dataset card whose `configs:` make `load_dataset(OUTPUT_DIR)` read data/ (card.py)
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.errors import AnnotatorError, RunInterrupted
from annotator.images import image_kind

HF_METADATA_KEY = b"huggingface"
OUTPUT_FEATURES = {
    "row_id": {"dtype": "int64", "_type": "Value"},
    "prob": {"dtype": "float32", "_type": "Value"},
    "label": {"dtype": "bool", "_type": "Value"},
    "answer_mass": {"dtype": "float32", "_type": "Value"},
    "error": {"dtype": "string", "_type": "Value"},
    "error_kind": {"dtype": "string", "_type": "Value"},
}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hf_features(schema: pa.Schema, image_column: str) -> dict[str, Any]:
    """Hugging Face feature metadata for the output: the input's own, or derived, plus ours."""
    features: dict[str, Any] | None = None
    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    if raw:
        features = json.loads(raw).get("info", {}).get("features")
    if not features:
        from datasets import Features

        features = Features.from_arrow_schema(schema.remove_metadata()).to_dict()
        if pa.types.is_struct(schema.field(image_column).type):
            features[image_column] = {"_type": "Image"}
    return {**features, **OUTPUT_FEATURES}


def output_schema(input_schema: pa.Schema, image_column: str) -> pa.Schema:
    schema = input_schema.remove_metadata()
    for name, dtype in [
        ("row_id", pa.int64()),
        ("prob", pa.float32()),
        ("label", pa.bool_()),
        ("answer_mass", pa.float32()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
    ]:
        schema = schema.append(pa.field(name, dtype))
    metadata = {"info": {"features": hf_features(input_schema, image_column)}}
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

        A torn last line (killed mid-append) is ignored: its window is simply done again. So is a window
        that holds fewer rows than it now should (a pilot's last window, after `input.limit` grew).
        """
        records: dict[int, dict[str, Any]] = {}
        manifest = self.manifest() if self.manifest_path.is_file() else {}
        for journal in sorted(self.journal_dir.glob("*.jsonl")):
            for line in journal.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if self.window_file(record["window"]).is_file() and window_is_whole(record, manifest):
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
    probs: Sequence[float | None],
    masses: Sequence[float | None],
    errors: Sequence[str | None],
    threshold: float,
) -> pa.Table:
    """The input rows of a window with the annotation columns appended, in the output schema."""
    prob_array = pa.array(probs, pa.float32())
    # The label is decided on the stored float32 value, so `label == (prob >= threshold)` holds in the file.
    labels = [None if p is None else p >= threshold for p in prob_array.to_pylist()]
    columns = [
        *table.columns,
        pa.array(range(start, start + table.num_rows), pa.int64()),
        prob_array,
        pa.array(labels, pa.bool_()),
        pa.array(masses, pa.float32()),
        pa.array(errors, pa.string()),
        pa.array([None if e is None else image_kind(e) for e in errors], pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)
