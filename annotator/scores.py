"""Score distributions: fixed-edge histograms of a probability column, kept share at thresholds, terminal bars.

A histogram of `bins` bins counts, in bin k, the values p with k/bins <= p < (k+1)/bins (the last bin takes
p == 1). Bin edges are compared in float64, as the sink compares a float32 `prob` with `output.threshold` when
it sets `label`, so the rows counted from bin k up are exactly the rows `prob >= k/bins` keeps.
One function per score column: a later question or answer column gets its histogram the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

JOURNAL_BINS = 20  # in every journal record: thresholds at multiples of 0.05 are exact from the journals alone
STATUS_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
_BLOCKS = " ▁▂▃▄▅▆▇█"


def values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The non-null values of a float column as float64 (nulls are rows with an error)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.null_count:
        column = column.drop_null()
    return column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def histogram(column: pa.Array | pa.ChunkedArray, bins: int) -> list[int]:
    """Counts of the column's non-null values in `bins` equal bins over [0, 1]."""
    edges = np.arange(1, bins, dtype=np.float64) / bins
    index = np.searchsorted(edges, values(column), side="right")
    return np.bincount(index, minlength=bins)[:bins].tolist()


def add(total: Sequence[int] | None, counts: Sequence[int]) -> list[int]:
    return list(counts) if total is None else [a + b for a, b in zip(total, counts, strict=True)]


def at_least(counts: Sequence[int], threshold: float) -> int | None:
    """Rows with a value >= threshold, exact when the threshold is a bin edge below 1 (else None)."""
    bins = len(counts)
    edge = round(threshold * bins)
    if edge / bins != threshold or edge >= bins:  # the last bin holds 1 with the values just below it
        return None
    return int(sum(counts[edge:]))


def kept_shares(counts: Sequence[int], rows: int, thresholds: Sequence[float] = STATUS_THRESHOLDS) -> dict[str, float]:
    """Share of ALL rows (errors are never kept) with prob >= t, for each threshold t that is a bin edge."""
    shares = {}
    for threshold in thresholds:
        kept = at_least(counts, threshold)
        if kept is not None and rows:
            shares[f"{threshold:g}"] = round(kept / rows, 4)
    return shares


def bars(counts: Sequence[int]) -> str:
    """One block character per bin, scaled to the fullest bin: a histogram on one line."""
    top = max(counts, default=0)
    if not top:
        return " " * len(counts)
    return "".join(_BLOCKS[0 if not c else max(1, round(c / top * (len(_BLOCKS) - 1)))] for c in counts)


def text_histogram(counts: Sequence[int], width: int = 40, threshold: float | None = None) -> list[str]:
    """A histogram as text lines, one bin per line (`0.45-0.50 ████ 123`), the threshold's bin marked."""
    bins, top = len(counts), max(counts, default=0) or 1
    lines = []
    for k, count in enumerate(counts):
        low, high = k / bins, (k + 1) / bins
        bar = "█" * round(count / top * width) if count else ""
        mark = " <- threshold" if threshold is not None and low <= threshold < high else ""
        lines.append(f"{low:.2f}-{high:.2f} {bar:<{width}} {count}{mark}")
    return lines
