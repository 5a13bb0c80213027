"""Hugging Face dataset input: a hub id or a local folder, streamed or prepared, read as windows of rows."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from annotator.errors import AnnotatorError, RunInterrupted
from annotator.recipe import HFInput, InputConfig, PromptConfig
from annotator.sources import Window, check_schema, cut_windows

IO_THREADS = 16  # parquet footers and remote images are small, latency-bound reads


class HFSource:
    """A dataset split read through `datasets`, images kept encoded (`Image(decode=False)`).

    Row ids are positions in the split as `datasets` orders it (data files sorted, rows in file order),
    so they are the same for every run of the same revision, streamed or not.
    Streamed parquet data (what the Hub serves) is read row group by row group from the data files `datasets`
    resolved, so a resumed run starts at the row group holding its first row and never downloads earlier ones.
    """

    def __init__(self, config: InputConfig, prompt: PromptConfig) -> None:
        assert config.hf is not None
        self.config = config
        self.hf: HFInput = config.hf
        self.builder, dataset = _load(self.hf)
        from datasets import Features, Image

        features = dataset.features
        if features is None:  # builders that infer types while reading (json, csv) when streamed
            first = next(iter(dataset.with_format("arrow").iter(batch_size=1)), None)
            features = Features.from_arrow_schema(first.schema) if first is not None else Features()
        self.schema: pa.Schema = features.arrow_schema  # keeps the Image feature (decoding) for the output
        where = f"the Hugging Face dataset {self.hf.path!r} (split {self.hf.split!r})"
        check_schema(self.schema, config, prompt, where)
        if isinstance(features[config.image_column], Image):
            dataset = dataset.cast_column(config.image_column, Image(decode=False))
        self.dataset = dataset.with_format("arrow")
        self.files = _data_files(self.builder, self.hf.split)
        # Each parquet data file with the rows of its row groups, from the footers, when streaming parquet data.
        self._parquet: list[tuple[str, list[int]]] | None = self._parquet_layout() if self.hf.streaming else None
        if self._parquet is not None:
            available = sum(sum(groups) for _, groups in self._parquet)
        elif self.hf.streaming:
            available = None
        else:
            available = len(self.dataset)
        if available is None:
            self.total_rows = None  # a stream of unknown length; `input.limit` still stops it
        else:
            self.total_rows = min(available, config.limit) if config.limit else available

    @property
    def seekable(self) -> bool:
        """Whether `windows(size, first)` starts at `first` without reading the rows before it."""
        return not self.hf.streaming or self._parquet is not None

    def fingerprint(self) -> dict[str, Any]:
        """The dataset's identity: settings, the resolved revision (hub commit), and every data file.

        Hub files are named with their commit; local files by name, size and modification time.
        """
        listing = [f if "://" in f else [f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in self.files]
        return {
            "hf": self.hf.model_dump(mode="json"),
            "builder": self.builder.name,
            "revision": self.builder.hash,
            "data_files": len(listing),
            "data_files_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16],
        }

    def windows(self, size: int, first: int = 0, columns: list[str] | None = None) -> Iterator[Window]:
        """Windows `first`, `first + 1`, ... of `size` rows (the last may be shorter)."""
        start = first * size
        end = self.total_rows if self.total_rows is not None else (self.config.limit or sys.maxsize)
        if start >= end:
            return
        dataset = self.dataset.select_columns(columns) if columns is not None else self.dataset
        if not self.hf.streaming:
            tables = (dataset[i : min(i + size, end)] for i in range(start, end, size))
        elif self._parquet is not None:
            tables = self._resumable(self._parquet_from(start, size, columns))
        else:
            tables = self._resumable(_dropping(dataset.iter(batch_size=size), start))
        fetch = columns is None or self.config.image_column in columns
        for window in cut_windows(((table, None) for table in tables), first, size, end):
            if fetch:
                window.table = _fetch_remote_images(window.table, self.config.image_column)
            yield window

    def _parquet_from(self, row: int, size: int, columns: list[str] | None) -> Iterator[pa.Table]:
        """Parquet rows from `row` on, opening only the row groups from the one holding `row`.

        Read with `ParquetFile.iter_batches` rather than a `datasets` stream: a stream left unfinished (a limit,
        a stop) aborts or hangs the interpreter at exit with pyarrow 26 (apache/arrow#45214, datasets#7566).
        """
        import pyarrow.parquet as pq
        from datasets.table import table_cast
        from datasets.utils.file_utils import xopen

        schema = pa.schema([self.schema.field(c) for c in columns or self.schema.names])
        offset = 0
        for url, groups in self._parquet:
            first = 0
            while first < len(groups) and offset + groups[first] <= row:
                offset += groups[first]
                first += 1
            if first == len(groups):
                continue
            with xopen(url, "rb") as f:
                batches = pq.ParquetFile(f).iter_batches(size, row_groups=range(first, len(groups)), columns=columns)
                for batch in batches:
                    skip = max(0, row - offset)
                    offset += batch.num_rows
                    if skip < batch.num_rows:
                        yield table_cast(pa.Table.from_batches([batch]).slice(skip), schema)

    def _resumable(self, tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
        """A failed read (network, file gone) stops the run in a state `annotate resume` continues."""
        try:
            yield from tables
        except OSError as exc:
            raise RunInterrupted(
                f"Reading the Hugging Face dataset {self.hf.path!r} failed ({exc}). Committed windows are safe: "
                "run `annotate resume` once it can be read again."
            ) from exc

    def _parquet_layout(self) -> list[tuple[str, list[int]]] | None:
        """Each data file with its row groups' rows, read from the footers in parallel; None if not parquet data."""
        from datasets.packaged_modules.parquet.parquet import Parquet

        if not isinstance(self.builder, Parquet) or not self.files:
            return None
        with ThreadPoolExecutor(IO_THREADS) as pool:
            return list(zip(self.files, pool.map(_row_group_rows, self.files), strict=True))


def _load(hf: HFInput) -> tuple[Any, Any]:
    """The builder and the split (an IterableDataset when streaming, else a prepared Dataset)."""
    import datasets

    _check_hub(hf)
    try:
        builder = datasets.load_dataset_builder(
            hf.path, hf.name, data_dir=hf.data_dir, data_files=hf.data_files, revision=hf.revision
        )
        if hf.streaming:
            return builder, builder.as_streaming_dataset(split=hf.split)
        builder.download_and_prepare()
        return builder, builder.as_dataset(split=hf.split)
    except Exception as exc:  # datasets reports a missing dataset, offline mode or a bad split in many types
        detail = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise AnnotatorError(
            f"Cannot load the Hugging Face dataset `input.hf.path` = {hf.path!r} (name={hf.name!r}, "
            f"split={hf.split!r}): {detail}. Set `input.hf.path` to a Hub id (user/dataset) or a local folder "
            "of parquet, arrow or image files (or a builder such as `parquet` with `input.hf.data_files`), and "
            "check `input.hf.name` and `input.hf.split`. Hub datasets need network access (HF_HUB_OFFLINE and "
            "HF_DATASETS_OFFLINE unset) and, for private or gated ones, `hf auth login`."
        ) from None


def _check_hub(hf: HFInput) -> None:
    """A Hub dataset with the Hub unreachable is an error in seconds, not after a minute of retries."""
    from datasets import config
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    from annotator.hub import endpoint, is_hub_id, unreachable_reason

    if config.HF_HUB_OFFLINE or hf.path in _PACKAGED_DATASETS_MODULES or not is_hub_id(hf.path):
        return
    reason = unreachable_reason()
    if reason is not None:
        raise AnnotatorError(
            f"Cannot load the Hugging Face dataset `input.hf.path` = {hf.path!r}: the Hub at {endpoint()} cannot "
            f"be reached ({reason}). Without network, point `input.hf.path` at a local copy (a folder of parquet, "
            "arrow or image files), or, if `datasets` has it cached from an earlier run, set "
            "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 before the command."
        )


def _data_files(builder: Any, split: str) -> list[str]:
    files = (builder.config.data_files or {}).get(split.split("[", 1)[0], [])
    return [str(f) for f in files]


def _row_group_rows(url: str) -> list[int]:
    import pyarrow.parquet as pq
    from datasets.utils.file_utils import xopen

    with xopen(url, "rb") as f:
        metadata = pq.ParquetFile(f).metadata
        return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def _dropping(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The tables less their first `rows` rows: how streams of unknown shard sizes (image folders, json) resume.

    Those rows are read again but never decoded; for an image folder that is only its metadata file.
    """
    for table in tables:
        if rows < table.num_rows:
            yield table.slice(rows)
            rows = 0
        else:
            rows -= table.num_rows


def _fetch_remote_images(table: pa.Table, column: str) -> pa.Table:
    """Images given only as remote paths (an image folder streamed from the Hub) fetched into bytes.

    Preprocessing workers read local files only; a failed download leaves the path, which then
    becomes that row's `image: file not found (...)` error.
    """
    images = table.column(column)
    if not pa.types.is_struct(images.type) or {"bytes", "path"} - {f.name for f in images.type}:
        return table
    data, paths = pc.struct_field(images, "bytes"), pc.struct_field(images, "path")
    remote = pc.fill_null(pc.and_(pc.is_null(data), pc.match_substring(paths, "://")), False)
    if not pc.any(remote).as_py():
        return table
    urls = pc.filter(paths, remote).to_pylist()
    with ThreadPoolExecutor(IO_THREADS) as pool:
        fetched = pa.array(list(pool.map(_read_remote, urls)), data.type)
    images, data, remote = images.combine_chunks(), data.combine_chunks(), remote.combine_chunks()
    children = [
        pc.replace_with_mask(data, remote, fetched) if f.name == "bytes" else images.field(f.name) for f in images.type
    ]
    rebuilt = pa.StructArray.from_arrays(children, fields=list(images.type), mask=images.is_null())
    return table.set_column(table.schema.get_field_index(column), table.schema.field(column), rebuilt)


def _read_remote(url: str) -> bytes | None:
    from datasets.utils.file_utils import xopen

    try:
        with xopen(url, "rb") as f:
            return f.read()
    except OSError:
        return None
