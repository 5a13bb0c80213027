"""Bucketing: image grids from header sizes, length-sorted batches under a token budget, order restored."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from annotator.images import ImageRef
    from annotator.prompt import PromptBuilder, TextTokens
    from annotator.recipe import Recipe
    from annotator.sources import RowInput, Window

PATCH_SIZE = 14
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: one merged patch is 28x28 pixels
MAX_ASPECT_RATIO = 200


class ImageShapeError(ValueError):
    """The image cannot be fitted into the model's grid (aspect ratio over 200)."""


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of 28, rounded, then scaled into [min_pixels, max_pixels]."""
    if min(height, width) < 1:
        raise ImageShapeError(f"image: empty ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageShapeError(f"image: aspect ratio over {MAX_ASPECT_RATIO} ({width}x{height})")
    h_bar = round(height / FACTOR) * FACTOR
    w_bar = round(width / FACTOR) * FACTOR
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        w_bar = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / FACTOR) * FACTOR
        w_bar = math.ceil(width * beta / FACTOR) * FACTOR
    return h_bar, w_bar


def grid_thw(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
    """`image_grid_thw` of one image: (temporal, height, width) in 14-pixel patches."""
    h_bar, w_bar = smart_resize(height, width, min_pixels, max_pixels)
    return 1, h_bar // PATCH_SIZE, w_bar // PATCH_SIZE


def image_token_count(grid: Sequence[int]) -> int:
    """`<|image_pad|>` tokens for a grid: one per 2x2 merged patch."""
    t, h, w = grid
    return t * h * w // (MERGE_SIZE * MERGE_SIZE)


@dataclass(frozen=True, slots=True)
class Batch:
    """Positions (within a window) of rows scored together, and the padded length they share."""

    positions: tuple[int, ...]
    padded_length: int

    @property
    def padded_tokens(self) -> int:
        return len(self.positions) * self.padded_length


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int) -> list[Batch]:
    """Sort rows by sequence length (longest first) and cut batches whose padded size fits the budget.

    A row longer than the whole budget gets a batch of its own. Every position appears in exactly one
    batch; `restore_order` puts per-row results back in input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[Batch] = []
    current: list[int] = []
    longest = 0
    for position in order:
        length = lengths[position]
        grown = max(longest, length)
        if current and (len(current) >= max_batch_size or (len(current) + 1) * grown > max_batch_tokens):
            batches.append(Batch(tuple(current), longest))
            current, grown = [], length
        current.append(position)
        longest = grown
    if current:
        batches.append(Batch(tuple(current), longest))
    return batches


def restore_order(batches: Sequence[Batch], results: Sequence[Sequence[object]], size: int) -> list[object]:
    """Per-batch results (aligned with each batch's positions) back into input order."""
    ordered: list[object] = [None] * size
    seen = 0
    for batch, batch_results in zip(batches, results, strict=True):
        for position, result in zip(batch.positions, batch_results, strict=True):
            ordered[position] = result
            seen += 1
    if seen != size:
        raise ValueError(f"batches cover {seen} rows, expected {size}")
    return ordered


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Batch]) -> float:
    """Real tokens divided by padded tokens over the planned batches (1.0 means no padding)."""
    padded = sum(b.padded_tokens for b in batches)
    real = sum(lengths[p] for b in batches for p in b.positions)
    return real / padded if padded else 1.0


def bucket_histogram(grids: Sequence[Sequence[int]]) -> Counter[tuple[int, int, int]]:
    """How many rows share each image grid: the natural buckets of a dataset."""
    return Counter(tuple(g) for g in grids)


@dataclass(frozen=True, slots=True)
class PlannedRow:
    """A row that passed the cheap checks: where its image is, its grid, tokens and sequence length."""

    position: int
    image: ImageRef
    grid: tuple[int, int, int]
    text: TextTokens
    length: int

    @property
    def resized(self) -> tuple[int, int]:
        """The (height, width) the image is resized to: its grid in pixels."""
        return self.grid[1] * PATCH_SIZE, self.grid[2] * PATCH_SIZE


@dataclass(slots=True)
class WindowPlan:
    """A window's rows split into batches to score and errors known before decoding."""

    batches: list[list[PlannedRow]]
    errors: dict[int, str]
    truncated: int

    @property
    def real_tokens(self) -> int:
        return sum(r.length for b in self.batches for r in b)

    @property
    def padded_tokens(self) -> int:
        return sum(len(b) * max(r.length for r in b) for b in self.batches)


def plan_window(
    rows: Sequence[RowInput],
    texts: Sequence[TextTokens],
    builder: PromptBuilder,
    min_pixels: int,
    max_pixels: int,
    max_image_pixels: int,
    max_batch_tokens: int,
    max_batch_size: int,
) -> WindowPlan:
    """Header sizes -> grids -> sequence lengths -> batches; failures become row errors, not exceptions."""
    from annotator.images import ImageError, header_size

    errors: dict[int, str] = {}
    planned: list[PlannedRow] = []
    for position, (row, text) in enumerate(zip(rows, texts, strict=True)):
        error = row.error or text.error
        if error is None:
            try:
                width, height = header_size(row.image, max_image_pixels)
                grid = grid_thw(height, width, min_pixels, max_pixels)
            except (ImageError, ImageShapeError) as exc:
                error = str(exc)
        if error is not None:
            errors[position] = error
            continue
        length = builder.sequence_length(image_token_count(grid), text)
        planned.append(PlannedRow(position, row.image, grid, text, length))
    cut = plan_batches([r.length for r in planned], max_batch_tokens, max_batch_size)
    batches = [[planned[i] for i in batch.positions] for batch in cut]
    return WindowPlan(batches, errors, sum(1 for t in texts if t.truncated))


def plan_recipe_window(
    window: Window, recipe: Recipe, builder: PromptBuilder, max_batch_tokens: int | None = None
) -> WindowPlan:
    """A window of a recipe's input planned as a run plans it (a run may lower the token budget after an OOM)."""
    from annotator.sources import row_inputs

    rows = row_inputs(window, recipe.input, recipe.prompt.query, texts=recipe.uses_text)
    return plan_window(
        rows,
        builder.question_tokens([r.text for r in rows]),
        builder,
        recipe.model.min_pixels,
        recipe.model.max_pixels,
        recipe.input.max_image_pixels,
        recipe.batching.max_batch_tokens if max_batch_tokens is None else max_batch_tokens,
        recipe.batching.max_batch_size,
    )
