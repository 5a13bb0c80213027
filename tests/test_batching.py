"""Grids from header sizes, batch cutting under the token budget, order restoring, padding efficiency."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

from annotator.batching import (
    Batch,
    ImageShapeError,
    grid_thw,
    image_token_count,
    padding_efficiency,
    plan_batches,
    plan_recipe_window,
    plan_window,
    restore_order,
    smart_resize,
)
from tests.conftest import write_recipe


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


def old_row_inputs(window, config, query):
    """`sources.row_inputs` as it was: every image value copied into Python objects with `to_pylist`."""
    from annotator.images import ImageRef, read_path
    from annotator.sources import RowInput

    def image_ref(value, base_dir):
        if value is None:
            return None, "image: missing (null)"
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data:
                return ImageRef(data=bytes(data)), None
            if path:
                return ImageRef(path=read_path(path, base_dir)), None
            return None, "image: missing (struct has neither bytes nor path)"
        if isinstance(value, bytes | bytearray | memoryview):
            return ImageRef(data=bytes(value)), None
        if isinstance(value, str):
            return (ImageRef(path=read_path(value, base_dir)), None) if value else (None, "image: missing (empty path)")
        return None, f"image: unsupported value ({type(value).__name__})"

    images = window.table.column(config.image_column).to_pylist()
    texts = [query] * window.rows if query is not None else window.table.column(config.text_column).to_pylist()
    refs = [image_ref(value, base_dir) for value, base_dir in zip(images, window.base_dirs, strict=True)]
    return [RowInput(ref, text, error) for (ref, error), text in zip(refs, texts, strict=True)]


def old_plan(window, recipe, builder):
    from tests.test_prompt import old_question_tokens

    rows = old_row_inputs(window, recipe.input, recipe.prompt.query)
    m, b = recipe.model, recipe.batching
    texts = old_question_tokens(builder, [r.text for r in rows])
    args = (m.min_pixels, m.max_pixels, recipe.input.max_image_pixels, b.max_batch_tokens, b.max_batch_size)
    return plan_window(rows, texts, builder, *args)


def image_columns(structs: list) -> dict[str, pa.Array]:
    """The same images as every column type a source may hold."""
    data = [s and s["bytes"] for s in structs]
    paths = [s and s["path"] for s in structs]
    return {
        "struct": pa.array(structs, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "large struct": pa.array(structs, pa.struct([("bytes", pa.large_binary()), ("path", pa.large_string())])),
        "bytes only": pa.array([s and {"bytes": s["bytes"]} for s in structs], pa.struct([("bytes", pa.binary())])),
        "binary": pa.array(data, pa.binary()),
        "large binary": pa.array(data, pa.large_binary()),
        "paths": pa.array(paths, pa.string()),
    }


@pytest.mark.parametrize("column_type", list(image_columns([])))
def test_the_planner_plans_bad_input_as_it_did(tmp_path, tiny, column_type):
    """Batches, grids, token ids and errors equal the old planner's, whatever the column type and chunking."""
    from annotator.prompt import PromptBuilder
    from annotator.recipe import load_recipe
    from annotator.sources import open_source
    from tests.test_bad_input import MAX_IMAGE_PIXELS, bad_input_rows

    parquet = tmp_path / "input"
    rows = bad_input_rows(parquet)  # image files in input/images, relative paths from the parquet files
    structs = [r[0] for r in rows] * 2
    captions = [r[1] for r in rows] * 2
    table = pa.table({"image": image_columns(structs)[column_type], "caption": pa.array(captions, pa.string())})
    # Two files: a window spans both (two chunks), and windows start inside record batches (sliced arrays).
    pq.write_table(table.slice(0, 31), parquet / "a.parquet", row_group_size=7)
    pq.write_table(table.slice(31), parquet / "b.parquet", row_group_size=7)
    recipe_path = write_recipe(
        tmp_path / "r.yaml",
        parquet,
        tmp_path / "out",
        input={"max_image_pixels": MAX_IMAGE_PIXELS},
        batching={"window": 24, "max_batch_size": 4},
        prompt={"max_text_tokens": 24},
    )
    recipe = load_recipe(str(recipe_path), [])
    builder = PromptBuilder(tiny.tokenizer, recipe.prompt)
    windows = list(open_source(recipe.input, recipe.prompt).windows(recipe.batching.window))
    assert len(windows) == 3 and max(w.table.column("image").num_chunks for w in windows) > 1
    scored = 0
    for window in windows:
        new, old = plan_recipe_window(window, recipe, builder), old_plan(window, recipe, builder)
        assert new.errors == old.errors
        assert new.truncated == old.truncated
        assert new.batches == old.batches  # positions, image bytes or paths, grids, token ids, lengths
        scored += sum(len(b) for b in new.batches)
    assert scored >= 2
