"""Sources: stream input rows as windows of consecutive rows, from parquet files or Hugging Face datasets."""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import stat
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


_BYTES_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)


def _is_any(t: pa.DataType, kinds) -> bool:
    return any(kind(t) for kind in kinds)


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return bool(names & {"bytes", "path"})
    return _is_any(t, _BYTES_TYPES + _TEXT_TYPES)


def _is_text_type(t: pa.DataType) -> bool:
    return _is_any(t, _TEXT_TYPES) or pa.types.is_null(t)


def plain_schema(schema: pa.Schema) -> pa.Schema:
    """Dictionary-encoded columns (pandas categoricals) as their value type: how a source hands out its rows."""
    fields = [f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema]
    return pa.schema(fields, metadata=schema.metadata)


def _image_struct_problem(t: pa.DataType) -> str | None:
    wanted = {"bytes": _BYTES_TYPES + (pa.types.is_null,), "path": _TEXT_TYPES + (pa.types.is_null,)}
    for i in range(t.num_fields):
        field = t.field(i)
        if field.name in wanted and not _is_any(field.type, wanted[field.name]):
            kind = "binary" if field.name == "bytes" else "string"
            return f"its field `{field.name}` has type {field.type}, where a {kind} is needed"
    return None


def check_schema(schema: pa.Schema, config: InputConfig, prompt: PromptConfig, where: str) -> None:
    """Missing columns, unusable types and name clashes, reported before any model is loaded."""
    columns = ", ".join(f"{f.name} ({f.type})" for f in schema)
    if len(columns) > 600:
        columns = columns[:600] + f"... ({len(schema)} columns)"
    duplicates = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if duplicates:
        raise AnnotatorError(
            f"{where} has more than one column named {', '.join(map(repr, duplicates))}. Column names must be unique: "
            "rename the duplicates in the input first."
        )
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
    struct_problem = _image_struct_problem(image_type) if pa.types.is_struct(image_type) else None
    if not _is_image_type(image_type) or struct_problem:
        raise AnnotatorError(
            f"Column {config.image_column!r} (`input.image_column`) has type {image_type}, which cannot hold "
            f"images{': ' + struct_problem if struct_problem else ''}. It must hold Hugging Face Image structs "
            f"{{bytes, path}}, encoded image bytes, or paths. Columns in {where}: {columns}."
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
        values = _values(window.table.column(config.text_column))
    return [
        RowInput(None, None, "text: invalid UTF-8") if isinstance(text, _BadText) else RowInput(ref, text, error)
        for (ref, error), text in zip(refs, values, strict=True)
    ]


def _image_refs(images: pa.Array, base_dirs: list[str | None]) -> list[tuple[ImageRef | None, str | None]]:
    """`_image_ref` of every value, reading binary values as views of the array's buffer."""
    kind = images.type
    if pa.types.is_struct(kind):
        names = {kind.field(i).name for i in range(kind.num_fields)}
        data = _binary_views(images.field("bytes")) if "bytes" in names else [None] * len(images)
        path_type = kind.field("path").type if "path" in names else pa.string()
        if data is not None and (pa.types.is_string(path_type) or pa.types.is_large_string(path_type)):
            paths = _values(images.field("path")) if "path" in names else [None] * len(images)
            missing = images.is_null().to_pylist()
            return [
                _image_ref(None if null else {"bytes": value, "path": path}, base_dir)
                for null, value, path, base_dir in zip(missing, data, paths, base_dirs, strict=True)
            ]
    elif (data := _binary_views(images)) is not None:
        return [_image_ref(value, base_dir) for value, base_dir in zip(data, base_dirs, strict=True)]
    return [_image_ref(value, base_dir) for value, base_dir in zip(_values(images), base_dirs, strict=True)]


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


class _BadText(bytes):
    """A string value whose bytes are not UTF-8."""


def _values(column: pa.ChunkedArray | pa.Array) -> list:
    """Python values of a column; strings that are not valid UTF-8 become `_BadText`, never an exception."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    if pa.types.is_struct(column.type):  # image structs: only `path` can hold text
        return [_struct_value(v) for v in column.cast(_bytes_struct(column.type)).to_pylist()]
    return [None if v is None else _decoded(v) for v in column.cast(pa.large_binary()).to_pylist()]


def _decoded(data: bytes) -> str | _BadText:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return _BadText(data)


def _bytes_struct(t: pa.StructType) -> pa.StructType:
    return pa.struct([f.with_type(pa.large_binary()) if _is_any(f.type, _TEXT_TYPES) else f for f in t])


def _struct_value(value: dict | None) -> dict | None:
    if value is None or value.get("path") is None:
        return value
    return {**value, "path": _decoded(value["path"])}


def _image_ref(value: object, base_dir: str | None) -> tuple[ImageRef | None, str | None]:
    if value is None:
        return None, "image: missing (null)"
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return ImageRef(data=data if isinstance(data, memoryview) else bytes(data)), None
        if isinstance(path, _BadText):
            return None, "image: path is not valid UTF-8"
        if path:
            return ImageRef(path=read_path(path, base_dir)), None
        return None, "image: missing (struct has neither bytes nor path)"
    if isinstance(value, _BadText):
        return None, "image: path is not valid UTF-8"
    if isinstance(value, memoryview):
        return ImageRef(data=value), None
    if isinstance(value, bytes | bytearray):
        return ImageRef(data=bytes(value)), None
    if isinstance(value, str):
        return (ImageRef(path=read_path(value, base_dir)), None) if value else (None, "image: missing (empty path)")
    return None, f"image: unsupported value ({type(value).__name__})"


def _walk(top: str, max_depth: int | None, searched: dict[str, str]) -> Iterator[str]:
    """Paths of the files under `top`, each real folder visited once: symbolic links are followed, loops cut.

    Every folder visited is noted in `searched` (its real path -> its path relative to `top`).
    """
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(top, followlinks=True):
        try:
            info = os.stat(folder)
        except OSError:
            dirs.clear()
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((info.st_dev, info.st_ino))
        relative = os.path.relpath(folder, top)
        searched.setdefault(os.path.realpath(folder), relative)
        depth = 0 if relative == "." else relative.count(os.sep) + 1
        if max_depth is not None and depth + 1 >= max_depth:
            dirs.clear()
        dirs.sort()
        for name in files:
            yield os.path.join(folder, name)


def _match_parts(pattern: list[str], parts: list[str], hidden: tuple[str, ...] = (".",)) -> bool:
    """glob.glob's matching, `**` included: wildcards match no name that starts with one of `hidden`."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        stop = next((i for i, p in enumerate(parts) if p.startswith(hidden)), len(parts))
        return any(_match_parts(rest, parts[i:], hidden) for i in range(min(stop, len(parts)) + 1))
    if not parts or (parts[0].startswith(hidden) and not head.startswith(hidden)):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _match_parts(rest, parts[1:], hidden)


def _glob_base(spec: str) -> tuple[str, list[str]]:
    """The folder before the first wildcard, and the pattern's parts after it."""
    parts = spec.split(os.sep)
    for i, part in enumerate(parts):
        if glob.has_magic(part):
            return os.sep.join(parts[:i]) or ("/" if spec.startswith(os.sep) else "."), parts[i:]
    return os.path.dirname(spec) or ".", [os.path.basename(spec)]


class ParquetListing:
    """The input files of `input.parquet`, in order, each listed once by its real path.

    A folder is searched recursively, skipping names that start with `.` or `_` (hidden, or being written); a
    glob matches as `glob.glob` does. Symbolic links are followed but no real folder is searched twice, so loops
    are harmless. Folders are never taken for files; special files (FIFOs, devices, sockets) are refused without
    being opened.
    """

    def __init__(self, spec: str) -> None:
        expanded = os.path.expanduser(spec)
        self.searched: dict[str, str] = {}  # real path of each folder searched -> its path relative to the base
        if glob.has_magic(expanded):
            self.base, self.pattern, self.hidden = *_glob_base(expanded), (".",)
        elif os.path.isdir(expanded):
            self.base, self.pattern, self.hidden = expanded, ["**", "*.parquet"], (".", "_")
        else:
            self.base, self.pattern, self.hidden = None, [], ()
        if self.base is not None:
            depth = None if "**" in self.pattern else len(self.pattern)
            walked = _walk(self.base, depth, self.searched)
            candidates = sorted(p for p in walked if self._matches(os.path.relpath(p, self.base).split(os.sep)))
        else:
            candidates = [expanded] if os.path.lexists(expanded) else []
        self.files = self._regular_once(candidates)
        if not self.files:
            raise AnnotatorError(
                f"`input.parquet` = {spec!r} matches no parquet file. Give a file, a folder holding .parquet "
                "files, or a glob such as data/*.parquet (relative paths are taken from the current folder)."
            )

    def _matches(self, parts: list[str]) -> bool:
        return _match_parts(self.pattern, parts, self.hidden)

    @staticmethod
    def _regular_once(candidates: list[str]) -> list[Path]:
        files, seen = [], set()
        for candidate in candidates:
            try:
                info = os.stat(candidate)
            except OSError:
                continue  # a dangling symbolic link, or one in a loop
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise AnnotatorError(
                    f"Input {candidate!r} is a {_special_kind(info.st_mode)}, not a parquet file; reading it could "
                    "wait forever. Remove it from the input, or point `input.parquet` at regular files."
                )
            real = os.path.realpath(candidate)
            if real not in seen:
                seen.add(real)
                files.append(Path(candidate))
        return files

    def would_read(self, path: Path) -> bool:
        """Whether a file at `path` (which need not exist) would be listed, through any folder the search reached."""
        real = os.path.realpath(path)
        for folder, relative in self.searched.items():
            if real.startswith(folder.rstrip(os.sep) + os.sep):
                parts = [] if relative == "." else relative.split(os.sep)
                if self._matches([*parts, *os.path.relpath(real, folder).split(os.sep)]):
                    return True
        return False


def resolve_parquet_files(spec: str) -> list[Path]:
    """The input files of `input.parquet` (see `ParquetListing`)."""
    return ParquetListing(spec).files


def _special_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device")):
        if test(mode):
            return kind
    return "special file"


def _schema_difference(first: pa.Schema, other: pa.Schema) -> str:
    """The first field in which two schemas differ, in words."""
    for field in first:
        if field.name not in other.names:
            return f"it has no column {field.name!r}"
        theirs = other.field(field.name)
        if theirs.type != field.type:
            return f"its column {field.name!r} is {theirs.type}, not {field.type}"
        if theirs.nullable != field.nullable:
            return f"its column {field.name!r} is {'' if theirs.nullable else 'not '}nullable"
    extra = [n for n in other.names if n not in first.names]
    if extra:
        return f"it has a column {extra[0]!r} the first file lacks"
    return f"its columns are in another order ({', '.join(other.names[:8])})"


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
        if not config.parquet or not config.parquet.strip():
            raise AnnotatorError("`input.parquet` is empty. Give a parquet file, a folder of them, or a glob.")
        self.listing = ParquetListing(config.parquet)
        self.files = self.listing.files
        try:
            self._metadata = [pq.ParquetFile(f).metadata for f in self.files]
            schemas = [plain_schema(pq.read_schema(f)) for f in self.files]
        except (pa.ArrowInvalid, OSError) as exc:
            raise AnnotatorError(
                f"Cannot read parquet input {config.parquet!r}: {exc}. Is it a parquet file?"
            ) from None
        self.schema = schemas[0]
        for f, schema in zip(self.files[1:], schemas[1:], strict=True):
            if not schema.equals(self.schema):
                raise AnnotatorError(
                    f"Parquet file {str(f)!r} has a different schema from {str(self.files[0])!r}: "
                    f"{_schema_difference(self.schema, schema)}. All input files must share one schema."
                )
        check_schema(self.schema, config, prompt, f"{config.parquet!r}")
        available = sum(m.num_rows for m in self._metadata)
        self.total_rows = min(available, config.limit) if config.limit else available

    def fingerprint(self) -> list[dict]:
        """Names, sizes, modification times and footer hashes: changes when any input file is replaced or edited.

        The time catches an edit in place that keeps the size and the footer (a page rewritten with other bytes).
        """
        fingerprint = []
        for f in self.files:
            info = f.stat()
            fingerprint.append(
                {
                    "file": str(f.resolve()),
                    "size": info.st_size,
                    "mtime_ns": info.st_mtime_ns,
                    "footer_sha256": _footer_hash(f),
                }
            )
        return fingerprint

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
                if any(pa.types.is_dictionary(t) for t in batch.schema.types):
                    batch = batch.cast(plain_schema(batch.schema))
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
