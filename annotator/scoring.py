"""Scoring: collate left-padded batches, one forward pass, P(positive) from the last position only."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from annotator.batching import MERGE_SIZE, PATCH_SIZE, image_token_count
from annotator.compiling import compile_failed, use_compile
from annotator.forward import LeanInputs, Regions, VisionLayout, compiled_regions, image_token_index, lean_logits
from annotator.graphs import LENGTH_STEP, GraphedForward, use_graphs
from annotator.models import LoadedModel
from annotator.prompt import PromptBuilder, TextTokens, rope_positions
from annotator.rotary import prepare_kernels

TEMPORAL_PATCH_SIZE = 2


@dataclass(slots=True)
class ScoreInput:
    """One row ready for the model: its resized RGB image, grid and question tokens."""

    image: np.ndarray  # uint8 (h, w, 3), h and w multiples of 28
    grid: tuple[int, int, int]
    text: TextTokens

    @classmethod
    def blank(cls, grid: tuple[int, int, int], text: TextTokens) -> ScoreInput:
        """A black image of `grid`'s size: for compiling or counting ops, where pixels do not matter."""
        return cls(np.zeros((grid[1] * PATCH_SIZE, grid[2] * PATCH_SIZE, 3), np.uint8), grid, text)


@dataclass(frozen=True, slots=True)
class Score:
    """One row's answers: for each question, in the recipe's order, P(answer) renormalised over its answers (in
    their order) and the answers' total probability under the full softmax."""

    probs: tuple[tuple[float, ...], ...]
    masses: tuple[float, ...]

    @property
    def prob(self) -> float:
        """The first question's P(first answer): P(positive) of a Y/N question."""
        return self.probs[0][0]

    @property
    def answer_mass(self) -> float:
        return self.masses[0]


def patchify(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (h, w, 3), or (n, h, w, 3) of one size -> normalised patches (n * grid_h * grid_w, 3 * 2 * 14 * 14).

    Laid out as Qwen2-VL's processor does, image after image: patches by 2x2 merge group, then within the
    group, each repeated over the two temporal slots, which a still image fills with the same frame.
    """
    batch = images if images.dim() == 4 else images.unsqueeze(0)
    pixels = (batch.permute(0, 3, 1, 2).float() / 255.0 - mean[:, None, None]) / std[:, None, None]
    count, channels, height, width = pixels.shape
    grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
    patches = pixels.reshape(
        count, channels, grid_h // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, grid_w // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE
    ).permute(0, 2, 5, 3, 6, 1, 4, 7)
    patches = patches.unsqueeze(6).expand(*patches.shape[:6], TEMPORAL_PATCH_SIZE, *patches.shape[6:])
    return patches.reshape(count * grid_h * grid_w, channels * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE)


FORWARDS = ("lean", "transformers")


class Scorer:
    """Turns batches of `ScoreInput` into `Score`s with one forward pass each.

    `forward` is `lean` (`annotator.forward`: no host sync, one attention call per layer; with several questions,
    one vision pass per image and one pass over the shared prefix, each question after it) or `transformers` (the
    model's own `forward`, over a plain sequence per row and question: the reference); both use the same weights
    and give the same scores. `cuda_graphs` (auto, on, off: `annotator.graphs`) replays the lean forward from CUDA
    graphs on a GPU; then batches are left padded to a multiple of `LENGTH_STEP` tokens, so that their shapes recur.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        builder: PromptBuilder,
        forward: str = "lean",
        cuda_graphs: str = "auto",
        compile: str = "auto",
    ) -> None:
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {FORWARDS}, not {forward!r}")
        self.loaded = loaded
        self.builder = builder
        self.forward = forward
        self.device = loaded.device
        self.pin = self.device.type == "cuda"
        self.mean = torch.tensor(loaded.image_mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(loaded.image_std, dtype=torch.float32, device=self.device)
        # Each question's answer ids, padded to the longest set (with its first id, masked out of the softmax).
        answers = builder.answer_ids
        widest = max(len(ids) for ids in answers)
        padded = [[*ids, *[ids[0]] * (widest - len(ids))] for ids in answers]
        self.answer_ids = torch.tensor(padded, device=self.device)  # (questions, answers)
        padding = [[i >= len(ids) for i in range(widest)] for ids in answers]
        self.answer_padding = torch.tensor(padding, device=self.device)
        self.forward_hook: Callable[[int], None] | None = None  # tests use it to simulate OOM
        self.regions: Regions | None = None  # the lean forward's blocks and layers compiled, or eager (None)
        self.graphs: GraphedForward | None = None
        self.length_step = 1
        if use_compile(compile, forward, self.device.type):
            self.regions = compiled_regions()
            try:
                self.warm_up()
            except Exception as exc:  # the eager forward runs these batches: what failed is compiling them
                raise compile_failed(exc, self.device) from exc
        elif use_graphs(cuda_graphs, forward, self.device):
            self.graphs = GraphedForward(functools.partial(lean_logits, loaded.model), self.device)
            self.length_step = LENGTH_STEP
        if forward == "lean" and self.regions is None:
            prepare_kernels(loaded.model, self.device, loaded.dtype)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile now, not in the first window: a forward of each variant the compiled code specialises on (one
        row and frame; several rows of one grid; grids of one area; of several), on small blank images. Sizes are
        dynamic, so the run's batches reuse what these compile."""
        text = self.builder.question_tokens(["warm up"])[0]
        small, wide, tall = (1, 4, 4), (1, 4, 6), (1, 6, 4)
        for grids in ([small], [small, small], [wide, tall], [small, wide]):
            self.logits(self.collate([ScoreInput.blank(grid, text) for grid in grids])).float().cpu()

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.pin_memory() if self.pin else tensor).to(self.device, non_blocking=True)

    def collate(self, rows: Sequence[ScoreInput]) -> LeanInputs | dict[str, torch.Tensor]:
        """Left-padded ids and 3-D positions, plus patches and where they go; built on the host.

        The lean forward sees each row once (its shared prefix, then every question, `PromptBuilder.sequence`) and
        the images grouped by grid (one patchify and one attention layout per grid). The transformers forward sees
        a plain sequence per row and question, in row order, with the image-token types and grids it asks for.
        """
        if self.forward == "lean":
            return self._collate_lean(rows)
        builder = self.builder
        plain = [(row, q) for row in rows for q in range(len(builder.questions))]
        sequences = [builder.sequence(image_token_count(row.grid), row.text, q) for row, q in plain]
        input_ids, valid, position_ids = self._left_padded(
            sequences, [(row.grid, [builder.suffix_lengths(row.text)[q]]) for row, q in plain]
        )
        host = {
            "input_ids": torch.from_numpy(input_ids),
            "position_ids": torch.from_numpy(position_ids),
            "attention_mask": torch.from_numpy(valid.astype(np.int64)),
            "image_grid_thw": torch.tensor([row.grid for row, _ in plain], dtype=torch.int64),
        }
        host["mm_token_type_ids"] = (host["input_ids"] == builder.image_pad_id).to(torch.int64)
        pixel_values = self._patches([row for row, _ in plain])
        return {**{k: self._to_device(v) for k, v in host.items()}, "pixel_values": pixel_values}

    def _collate_lean(self, rows: Sequence[ScoreInput]) -> LeanInputs:
        builder = self.builder
        sequences = [builder.sequence(image_token_count(row.grid), row.text) for row in rows]
        suffixes = [builder.suffix_lengths(row.text) for row in rows]
        layouts = [(row.grid, lengths) for row, lengths in zip(rows, suffixes, strict=True)]
        input_ids, valid, position_ids = self._left_padded(sequences, layouts)
        length = input_ids.shape[1]
        segments = np.where(valid, 0, -1)
        answer_index = np.zeros((len(rows), len(builder.questions)), dtype=np.int64)
        for i, lengths in enumerate(suffixes):
            end = length  # each row ends with its last question; the one before ends where that one starts
            for q in reversed(range(len(lengths))):
                segments[i, end - lengths[q] : end] = q + 1
                answer_index[i, q] = i * length + end - 1
                end -= lengths[q]
        order = sorted(range(len(rows)), key=lambda i: rows[i].grid)
        prefix = len(builder.prefix_ids)
        placements = [(i, length - len(sequences[i]) + prefix, image_token_count(rows[i].grid)) for i in order]
        return LeanInputs(
            input_ids=self._to_device(torch.from_numpy(input_ids)),
            segments=self._to_device(torch.from_numpy(segments)),
            position_ids=self._to_device(torch.from_numpy(position_ids)),
            pixel_values=self._patches([rows[i] for i in order]),
            vision=VisionLayout.build([rows[i].grid for i in order], self.loaded.dtype).to(self.device, self.pin),
            image_index=self._to_device(torch.from_numpy(image_token_index(placements, length))),
            answer_index=self._to_device(torch.from_numpy(answer_index.ravel())),
        )

    def _left_padded(
        self, sequences: Sequence[Sequence[int]], layouts: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids, real-token mask and 3-D positions of sequences left padded to the longest; `layouts` gives each
        one's grid and the lengths of its questions (with their tails) after the shared `<|vision_end|>`."""
        length = -(-max(len(s) for s in sequences) // self.length_step) * self.length_step
        input_ids = np.full((len(sequences), length), self.builder.pad_id, dtype=np.int64)
        valid = np.zeros((len(sequences), length), dtype=bool)
        position_ids = np.zeros((3, len(sequences), length), dtype=np.int64)
        prefix = len(self.builder.prefix_ids)
        for i, (ids, (grid, questions)) in enumerate(zip(sequences, layouts, strict=True)):
            start = length - len(ids)
            input_ids[i, start:] = ids
            valid[i, start:] = True
            position_ids[:, i, start:] = rope_positions(prefix, grid, 1, questions)
        return input_ids, valid, position_ids

    def _patches(self, rows: Sequence[ScoreInput]) -> torch.Tensor:
        """Every image's patches, in the order given, with one copy to the device and one patchify per run of a grid."""
        patches = [
            patchify(self._to_device(torch.from_numpy(np.stack([row.image for row in run]))), self.mean, self.std)
            for _, run in itertools.groupby(rows, key=lambda row: row.grid)
        ]
        return (patches[0] if len(patches) == 1 else torch.cat(patches)).to(self.loaded.dtype)

    def logits(self, batch: LeanInputs | dict[str, torch.Tensor]) -> torch.Tensor:
        """Last-position logits (rows, vocabulary) of a collated batch, by the chosen forward."""
        if isinstance(batch, LeanInputs):
            return lean_logits(self.loaded.model, batch, self.regions) if self.graphs is None else self.graphs(batch)
        return self.loaded.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1, :]

    @torch.inference_mode()
    def launch(self, rows: Sequence[ScoreInput]) -> Callable[[], list[Score]]:
        """Queue one forward pass; the returned function waits for it and gives the scores.

        On a GPU the pass runs while the caller prepares the next batch: reading results is the only sync.
        """
        if self.forward_hook is not None:
            self.forward_hook(len(rows))
        questions, widest = self.answer_ids.shape
        logits = self.logits(self.collate(rows)).float().view(len(rows), questions, -1)
        # log P(answer) under the full softmax, for each question's answers; padding answers get no probability.
        answers = logits.gather(-1, self.answer_ids.expand(len(rows), -1, -1)) - logits.logsumexp(-1, keepdim=True)
        answers = answers.masked_fill(self.answer_padding, float("-inf"))
        results = torch.cat([answers.softmax(-1), answers.exp().sum(-1, keepdim=True)], dim=-1)
        host = results.to("cpu", non_blocking=True)  # (rows, questions, answers + 1)
        done = torch.cuda.Event() if results.is_cuda else None
        if done is not None:
            done.record()
        counts = [len(ids) for ids in self.builder.answer_ids]

        def wait() -> list[Score]:
            if done is not None:
                done.synchronize()
            return [
                Score(tuple(tuple(q[:n]) for q, n in zip(row, counts, strict=True)), tuple(q[-1] for q in row))
                for row in host.tolist()
            ]

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
