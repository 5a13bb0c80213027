"""Scoring: collate left-padded batches, one forward pass, P(positive) from the last position only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from annotator.batching import MERGE_SIZE, PATCH_SIZE, image_token_count
from annotator.models import LoadedModel
from annotator.prompt import PromptBuilder, TextTokens, rope_positions

TEMPORAL_PATCH_SIZE = 2


@dataclass(slots=True)
class ScoreInput:
    """One row ready for the model: its resized RGB image, grid and question tokens."""

    image: np.ndarray  # uint8 (h, w, 3), h and w multiples of 28
    grid: tuple[int, int, int]
    text: TextTokens


@dataclass(frozen=True, slots=True)
class Score:
    prob: float
    answer_mass: float


def patchify(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (h, w, 3) -> normalised patches (grid_h * grid_w, 3 * 2 * 14 * 14), as Qwen2-VL's processor lays them out.

    Patches are ordered by 2x2 merge group, then within the group, and each is repeated over the
    two temporal slots, which a still image fills with the same frame.
    """
    pixels = (image.permute(2, 0, 1).float() / 255.0 - mean[:, None, None]) / std[:, None, None]
    channels, height, width = pixels.shape
    grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
    patches = pixels.reshape(
        channels, grid_h // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, grid_w // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE
    ).permute(1, 4, 2, 5, 0, 3, 6)
    patches = patches.unsqueeze(5).expand(*patches.shape[:5], TEMPORAL_PATCH_SIZE, *patches.shape[5:])
    return patches.reshape(grid_h * grid_w, channels * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE)


class Scorer:
    """Turns batches of `ScoreInput` into `Score`s with one forward pass each."""

    def __init__(self, loaded: LoadedModel, builder: PromptBuilder) -> None:
        self.loaded = loaded
        self.builder = builder
        self.device = loaded.device
        self.mean = torch.tensor(loaded.image_mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(loaded.image_std, dtype=torch.float32, device=self.device)
        self.answer_ids = torch.tensor([builder.positive_id, builder.negative_id], device=self.device)
        self.forward_hook: Callable[[int], None] | None = None  # tests use it to simulate OOM

    def collate(self, rows: Sequence[ScoreInput]) -> dict[str, torch.Tensor]:
        """Left-padded ids, mask, image-token types and 3-D positions, plus patches and grids."""
        builder = self.builder
        sequences = []
        positions = []
        prefix = len(builder.prefix_ids)
        for row in rows:
            image_tokens = image_token_count(row.grid)
            ids = builder.sequence(image_tokens, row.text)
            sequences.append(ids)
            positions.append(rope_positions(prefix, row.grid, len(ids) - prefix - image_tokens))
        length = max(len(s) for s in sequences)
        input_ids = np.full((len(rows), length), builder.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        position_ids = np.zeros((3, len(rows), length), dtype=np.int64)
        for i, (ids, pos) in enumerate(zip(sequences, positions, strict=True)):
            input_ids[i, length - len(ids) :] = ids
            attention_mask[i, length - len(ids) :] = 1
            position_ids[:, i, length - len(ids) :] = pos
        input_ids_t = torch.from_numpy(input_ids)
        pin = self.device.type == "cuda"
        host = {
            "input_ids": input_ids_t,
            "attention_mask": torch.from_numpy(attention_mask),
            "mm_token_type_ids": (input_ids_t == builder.image_pad_id).to(torch.int64),
            "position_ids": torch.from_numpy(position_ids),
            "image_grid_thw": torch.tensor([row.grid for row in rows], dtype=torch.int64),
        }
        batch = {k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True) for k, v in host.items()}
        images = [torch.from_numpy(row.image) for row in rows]
        if pin:
            images = [image.pin_memory() for image in images]
        patches = [patchify(image.to(self.device, non_blocking=True), self.mean, self.std) for image in images]
        batch["pixel_values"] = torch.cat(patches).to(self.loaded.dtype)
        return batch

    @torch.inference_mode()
    def launch(self, rows: Sequence[ScoreInput]) -> Callable[[], list[Score]]:
        """Queue one forward pass; the returned function waits for it and gives the scores.

        On a GPU the pass runs while the caller prepares the next batch: reading results is the only sync.
        """
        if self.forward_hook is not None:
            self.forward_hook(len(rows))
        batch = self.collate(rows)
        output = self.loaded.model(**batch, use_cache=False, logits_to_keep=1)
        log_probs = output.logits[:, -1, :].float().log_softmax(-1)
        answers = log_probs.index_select(-1, self.answer_ids)
        results = torch.stack([answers.softmax(-1)[:, 0], answers.exp().sum(-1)], dim=1)
        host = results.to("cpu", non_blocking=True)
        done = torch.cuda.Event() if results.is_cuda else None
        if done is not None:
            done.record()

        def wait() -> list[Score]:
            if done is not None:
                done.synchronize()
            return [Score(p, m) for p, m in host.tolist()]

        return wait

    def score(self, rows: Sequence[ScoreInput]) -> list[Score]:
        return self.launch(rows)()


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def launch_splitting_on_oom(
    scorer: Scorer, rows: Sequence[ScoreInput], on_split: Callable[[], None]
) -> Callable[[], list[Score]]:
    """Launch `rows`; on out-of-memory, halve the batch and launch each half, down to single rows."""
    try:
        return scorer.launch(rows)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc) or len(rows) == 1:
            raise
        if scorer.device.type == "cuda":
            torch.cuda.empty_cache()
        on_split()
        half = len(rows) // 2
        first = launch_splitting_on_oom(scorer, rows[:half], on_split)
        second = launch_splitting_on_oom(scorer, rows[half:], on_split)
        return lambda: first() + second()
