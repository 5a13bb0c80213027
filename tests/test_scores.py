"""Score histograms count, from bin k up, exactly the rows `prob >= k/bins` keeps (float32 values, float64 edges)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from annotator.scores import at_least, bars, histogram, kept_shares


@pytest.mark.parametrize("bins", [20, 100])
def test_counts_from_a_bin_up_are_exactly_the_rows_a_threshold_keeps(bins):
    rng = np.random.default_rng(0)
    edges = np.arange(bins + 1) / bins
    values = np.concatenate([rng.random(5000), edges, np.nextafter(edges, 0), np.nextafter(edges, 1)]).clip(0, 1)
    column = pa.array(np.float32(values).tolist() + [None], pa.float32())
    counts = histogram(column, bins)
    stored = [v for v in column.to_pylist() if v is not None]  # what the sink compares with the threshold
    assert sum(counts) == len(stored)
    for k in range(bins):
        threshold = float(f"{k / bins:g}")  # as a user types it
        assert at_least(counts, threshold) == sum(v >= threshold for v in stored), threshold
    assert at_least(counts, 0.333) is None, "not a bin edge: no exact answer from the bins"
    assert at_least(counts, 1.0) is None, "the last bin holds 1 together with the values just below it"


def test_kept_shares_are_of_all_rows_and_bars_scale_to_the_fullest_bin():
    counts = [0] * 10 + [5] * 10
    assert kept_shares(counts, rows=200) == {"0.1": 0.25, "0.3": 0.25, "0.5": 0.25, "0.7": 0.15, "0.9": 0.05}
    assert bars([0, 1, 8]) == " ▁█" and bars([0, 0]) == "  "
