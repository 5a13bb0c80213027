"""Grids from header sizes, batch cutting under the token budget, order restoring, padding efficiency."""

import random

import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

from annotator.batching import (
    Batch,
    ImageShapeError,
    grid_thw,
    image_token_count,
    padding_efficiency,
    plan_batches,
    restore_order,
    smart_resize,
)


@pytest.mark.parametrize(
    ("width", "height", "min_pixels", "max_pixels", "grid"),
    [
        (756, 476, 3136, 307200, (1, 30, 48)),  # the seed's image
        (476, 756, 3136, 307200, (1, 48, 30)),
        (1, 1, 3136, 307200, (1, 4, 4)),  # tiny images are raised to min_pixels
        (28, 28, 3136, 307200, (1, 4, 4)),
        (4000, 3000, 3136, 307200, (1, 34, 44)),
        (200, 1, 3136, 307200, (1, 2, 58)),  # a 1-pixel-high strip still gets 28 rows
    ],
)
def test_grid_cases(width, height, min_pixels, max_pixels, grid):
    assert grid_thw(height, width, min_pixels, max_pixels) == grid


def test_seed_image_is_360_image_tokens():
    assert image_token_count(grid_thw(476, 756, 3136, 307200)) == 360


def test_smart_resize_matches_transformers_on_random_sizes():
    rng = random.Random(0)
    for _ in range(2000):
        height, width = rng.randint(1, 5000), rng.randint(1, 5000)
        if max(height, width) / min(height, width) > 200:
            continue
        min_pixels = rng.choice([3136, 56 * 56 * 4])
        max_pixels = rng.choice([307200, 12845056, 100000])
        assert smart_resize(height, width, min_pixels, max_pixels) == reference_smart_resize(
            height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels
        )


@pytest.mark.parametrize(("height", "width"), [(1, 201), (10, 2500), (3000, 10)])
def test_aspect_ratio_over_200_is_an_error(height, width):
    with pytest.raises(ImageShapeError, match="aspect ratio over 200"):
        grid_thw(height, width, 3136, 307200)


def test_plan_batches_covers_every_row_once_within_budget():
    rng = random.Random(1)
    lengths = [rng.randint(20, 900) for _ in range(500)]
    batches = plan_batches(lengths, max_batch_tokens=4096, max_batch_size=16)
    positions = [p for b in batches for p in b.positions]
    assert sorted(positions) == list(range(500))
    for batch in batches:
        assert len(batch.positions) <= 16
        assert batch.padded_length == max(lengths[p] for p in batch.positions)
        assert batch.padded_tokens <= 4096 or len(batch.positions) == 1


def test_plan_batches_sorts_so_similar_lengths_share_a_batch():
    lengths = [100, 500, 101, 499, 102, 498]
    batches = plan_batches(lengths, max_batch_tokens=1500, max_batch_size=3)
    assert [sorted(lengths[p] for p in b.positions) for b in batches] == [[498, 499, 500], [100, 101, 102]]


def test_a_row_longer_than_the_budget_gets_its_own_batch():
    batches = plan_batches([5000, 10, 10], max_batch_tokens=100, max_batch_size=8)
    assert batches[0] == Batch((0,), 5000)
    assert batches[1].positions == (1, 2)


def test_restore_order_gives_results_back_in_input_order():
    lengths = [3, 9, 1, 7, 5]
    batches = plan_batches(lengths, max_batch_tokens=20, max_batch_size=2)
    results = [[f"row{p}" for p in b.positions] for b in batches]
    assert restore_order(batches, results, 5) == [f"row{i}" for i in range(5)]


def test_padding_efficiency_is_real_over_padded_tokens():
    lengths = [10, 6, 4]
    batches = [Batch((0, 1), 10), Batch((2,), 4)]
    assert padding_efficiency(lengths, batches) == pytest.approx((10 + 6 + 4) / (20 + 4))
    assert padding_efficiency([], []) == 1.0
