"""Sources: stream input rows as windows of consecutive rows, from parquet files or Hugging Face datasets."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from annotator.errors import AnnotatorError
from annotator.images import ImageRef, read_path
from annotator.questions import output_columns, reads_text_column
from annotator.recipe import InputConfig, PromptConfig


@dataclass(slots=True)
class Window:
    """Rows [start, start + len(table)) of the input: the unit of sorting, of output and of resume."""

    index: int
    start: int
    table: pa.Table
    base_dirs: list[str | None]  # folder that relative image paths of each row resolve against

    @property
    def rows(self) -> int:
        return self.table.num_rows


@dataclass(frozen=True, slots=True)
class RowInput:
    """A row's image reference and text, or the reason it cannot be scored."""

    image: ImageRef | None
    text: str | None
    error: str | None = None


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return bool(names & {"bytes", "path"})
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def check_schema(schema: pa.Schema, config: InputConfig, prompt: PromptConfig, where: str) -> None:
    """Missing columns, unusable types and name clashes, reported before any model is loaded."""
    columns = ", ".join(f"{f.name} ({f.type})" for f in schema)
    wanted = {"input.image_column": config.image_column, "input.id_column": config.id_column}
    if reads_text_column(prompt):
        wanted["input.text_column"] = config.text_column
    for key, column in wanted.items():
        if column is not None and column not in schema.names:
            raise AnnotatorError(
                f"Column {column!r} (`{key}`) is not in {where}. Its columns are: {columns}. "
                f"Set `{key}` to one of them, e.g. --set {key}=<column>."
            )
    image_type = schema.field(config.image_column).type
    if not _is_image_type(image_type):
        raise AnnotatorError(
            f"Column {config.image_column!r} (`input.image_column`) has type {image_type}, which cannot hold "
            "images. It must hold Hugging Face Image structs {bytes, path}, encoded image bytes, or paths. "
            f"Columns in {where}: {columns}."
        )
    if reads_text_column(prompt):
        text_type = schema.field(config.text_column).type
        if not _is_text_type(text_type):
            raise AnnotatorError(
                f"Column {config.text_column!r} (`input.text_column`) has type {text_type}, not text. Point "
                f"`input.text_column` at a string column, or set `prompt.query` to a fixed text. Columns: {columns}."
            )
    clashes = [c for c in output_columns(prompt) if c in schema.names]
    if clashes:
        raise AnnotatorError(
            f"The input already has column(s) {', '.join(clashes)}, which annotator writes. Rename or drop them "
            "first (an earlier run's output? then export or re-run from the original input)"
            + (", or rename the questions that write them." if prompt.questions else ".")
        )
    named = [name for name in prompt.questions or {} if name in schema.names]
    if named:
        raise AnnotatorError(
            f"Question name(s) {', '.join(map(repr, named))} of `prompt.questions` are also input columns; in "
            "`annotate export --where` and the report a name must mean one thing. Rename the question(s), e.g. "
            f"`{named[0]}_q`."
        )


def row_inputs(window: Window, config: InputConfig, query: str | None, texts: bool = True) -> list[RowInput]:
    """Image references and texts of a window's rows (no texts, all None, when the questions use none); nothing is
    decoded.

    Image bytes stay in the window's Arrow buffers: a reference holds a memoryview of them, not a copy.
    """
    refs: list[tuple[ImageRef | None, str | None]] = []
    for chunk in window.table.column(config.image_column).chunks:
        refs.extend(_image_refs(chunk, window.base_dirs[len(refs) : len(refs) + len(chunk)]))
    if not texts or query is not None:
        values = [query if texts else None] * window.rows
    else:
        values = window.table.column(config.text_column).to_pylist()
    return [RowInput(ref, text, error) for (ref, error), text in zip(refs, values, strict=True)]


def _image_refs(images: pa.Array, base_dirs: list[str | None]) -> list[tuple[ImageRef | None, str | None]]:
    """`_image_ref` of every value, reading binary values as views of the array's buffer."""
    kind = images.type
    if pa.types.is_struct(kind):
        names = {kind.field(i).name for i in range(kind.num_fields)}
        data = _binary_views(images.field("bytes")) if "bytes" in names else [None] * len(images)
        path_type = kind.field("path").type if "path" in names else pa.string()
        if data is not None and (pa.types.is_string(path_type) or pa.types.is_large_string(path_type)):
            paths = images.field("path").to_pylist() if "path" in names else [None] * len(images)
            missing = images.is_null().to_pylist()
            return [
                _image_ref(None if null else {"bytes": value, "path": path}, base_dir)
                for null, value, path, base_dir in zip(missing, data, paths, base_dirs, strict=True)
            ]
    elif (data := _binary_views(images)) is not None:
        return [_image_ref(value, base_dir) for value, base_dir in zip(data, base_dirs, strict=True)]
    return [_image_ref(value, base_dir) for value, base_dir in zip(images.to_pylist(), base_dirs, strict=True)]


def _binary_views(values: pa.Array) -> list[memoryview | None] | None:
    """Each value of a binary array as a memoryview of its buffer (None for nulls); None for other types."""
    if pa.types.is_binary(values.type):
        width = np.int32
    elif pa.types.is_large_binary(values.type):
        width = np.int64
    else:
        return None
    if len(values) == 0:
        return []
    _, offsets, data = values.buffers()
    ends = np.frombuffer(offsets, width)[values.offset : values.offset + len(values) + 1].tolist()
    buffer = memoryview(data if data is not None else b"").cast("B").toreadonly()  # Arrow's view is signed chars
    valid = values.is_valid().to_pylist() if values.null_count else [True] * len(values)
    return [buffer[ends[i] : ends[i + 1]] if ok else None for i, ok in enumerate(valid)]


def _image_ref(value: object, base_dir: str | None) -> tuple[ImageRef | None, str | None]:
    if value is None:
        return None, "image: missing (null)"
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return ImageRef(data=data if isinstance(data, memoryview) else bytes(data)), None
        if path:
            return ImageRef(path=read_path(path, base_dir)), None
        return None, "image: missing (struct has neither bytes nor path)"
    if isinstance(value, memoryview):
        return ImageRef(data=value), None
    if isinstance(value, bytes | bytearray):
        return ImageRef(data=bytes(value)), None
    if isinstance(value, str):
        return (ImageRef(path=read_path(value, base_dir)), None) if value else (None, "image: missing (empty path)")
    return None, f"image: unsupported value ({type(value).__name__})"


def resolve_parquet_files(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not files:
        raise AnnotatorError(
            f"`input.parquet` = {spec!r} matches no parquet file. Give a file, a folder holding .parquet "
            "files, or a glob such as data/*.parquet (relative paths are taken from the current folder)."
        )
    return files


def _footer_hash(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(-8, os.SEEK_END)
        footer_length = int.from_bytes(f.read(4), "little")
        f.seek(-8 - footer_length, os.SEEK_END)
        return hashlib.sha256(f.read(footer_length)).hexdigest()[:16]


class ParquetSource:
    """Parquet files read in order as record batches; windows can start anywhere without reading earlier rows."""

    def __init__(self, config: InputConfig, prompt: PromptConfig) -> None:
        self.config = config
        self.files = resolve_parquet_files(config.parquet)
        try:
            self._metadata = [pq.ParquetFile(f).metadata for f in self.files]
            self.schema = pq.read_schema(self.files[0])
        except (pa.ArrowInvalid, OSError) as exc:
            raise AnnotatorError(
                f"Cannot read parquet input {config.parquet!r}: {exc}. Is it a parquet file?"
            ) from None
        for f in self.files[1:]:
            if not pq.read_schema(f).remove_metadata().equals(self.schema.remove_metadata()):
                raise AnnotatorError(
                    f"Parquet file {str(f)!r} has a different schema from {str(self.files[0])!r}; "
                    "all input files must share one schema."
                )
        check_schema(self.schema, config, prompt, f"{config.parquet!r}")
        available = sum(m.num_rows for m in self._metadata)
        self.total_rows = min(available, config.limit) if config.limit else available

    def fingerprint(self) -> list[dict]:
        """Names, sizes and footer hashes: changes when any input file is replaced or edited."""
        return [
            {"file": str(f.resolve()), "size": f.stat().st_size, "footer_sha256": _footer_hash(f)} for f in self.files
        ]

    def _batches_from(self, start: int, columns: list[str] | None) -> Iterator[tuple[pa.RecordBatch, str]]:
        """Record batches of the input from row `start` on, each with the folder of its file."""
        offset = 0
        for path, metadata in zip(self.files, self._metadata, strict=True):
            if offset + metadata.num_rows <= start:
                offset += metadata.num_rows
                continue
            parquet = pq.ParquetFile(path)
            first_group, group_offset = 0, offset
            while first_group < metadata.num_row_groups:
                group_rows = metadata.row_group(first_group).num_rows
                if group_offset + group_rows > start:
                    break
                group_offset += group_rows
                first_group += 1
            skip = max(0, start - group_offset)
            groups = list(range(first_group, metadata.num_row_groups))
            batches = parquet.iter_batches(batch_size=1024, row_groups=groups, columns=columns)
            while True:
                try:
                    batch = next(batches, None)
                except (OSError, pa.ArrowException) as exc:
                    raise AnnotatorError(
                        f"Parquet file {str(path)!r} (input rows from {offset}) cannot be read: {exc}. The file is "
                        "damaged: re-create it from its source, then run again with --overwrite."
                    ) from None
                if batch is None:
                    break
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                yield batch.slice(skip), str(path.parent)
                skip = 0
            offset += metadata.num_rows

    def windows(self, size: int, first: int = 0, columns: list[str] | None = None) -> Iterator[Window]:
        """Windows `first`, `first + 1`, ... of `size` rows (the last may be shorter)."""
        return cut_windows(self._batches_from(first * size, columns), first, size, self.total_rows)


def cut_windows(
    pieces: Iterable[tuple[pa.Table | pa.RecordBatch, str | None]], first: int, size: int, end: int
) -> Iterator[Window]:
    """Cut consecutive rows into windows `first`, `first + 1`, ... of `size` rows, stopping before row `end`.

    `pieces` start at row `first * size`; each comes with the folder its relative image paths resolve against.
    """
    index, start = first, first * size
    taken: list[pa.Table | pa.RecordBatch] = []
    dirs: list[str | None] = []
    for piece, folder in pieces:
        while piece.num_rows and start + len(dirs) < end:
            part = piece.slice(0, min(size - len(dirs), end - start - len(dirs)))
            taken.append(part)
            dirs.extend([folder] * part.num_rows)
            piece = piece.slice(part.num_rows)
            if len(dirs) == size or start + len(dirs) == end:
                yield Window(index, start, _concat(taken), dirs)
                index, start, taken, dirs = index + 1, start + len(dirs), [], []
        if start >= end:
            return
    if dirs:
        yield Window(index, start, _concat(taken), dirs)


def _concat(pieces: list[pa.Table | pa.RecordBatch]) -> pa.Table:
    tables = [pa.Table.from_batches([p]) if isinstance(p, pa.RecordBatch) else p for p in pieces]
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def open_source(config: InputConfig, prompt: PromptConfig):
    """The source for a recipe's `input` section."""
    if config.parquet is not None:
        return ParquetSource(config, prompt)
    from annotator.hf_source import HFSource

    return HFSource(config, prompt)
