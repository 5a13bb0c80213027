"""`annotate plan`: what a run would do (rows, buckets, padding, tokens, FLOPs) without loading a model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from annotator.batching import MERGE_SIZE, image_token_count, plan_recipe_window
from annotator.images import image_kind
from annotator.questions import reads_text_column
from annotator.recipe import Recipe


@dataclass(frozen=True)
class Architecture:
    """The sizes that set a Qwen2-VL forward pass's cost."""

    text_hidden: int = 1536
    text_layers: int = 28
    text_heads: int = 12
    text_kv_heads: int = 2
    text_intermediate: int = 8960
    vocab: int = 151936
    vision_depth: int = 32
    vision_dim: int = 1280
    vision_mlp_ratio: int = 4
    patch_dim: int = 3 * 2 * 14 * 14

    @classmethod
    def from_config(cls, config: Any) -> Architecture:
        text, vision = config.text_config, config.vision_config
        return cls(
            text.hidden_size,
            text.num_hidden_layers,
            text.num_attention_heads,
            text.num_key_value_heads,
            text.intermediate_size,
            text.vocab_size,
            vision.depth,
            vision.embed_dim,
            vision.mlp_ratio,
        )


QWEN2_VL_2B = Architecture()


def forward_flops(
    grid: tuple[int, int, int], sequence_length: int, arch: Architecture = QWEN2_VL_2B, questions: int = 1
) -> dict:
    """Matmul FLOPs (2 per multiply-add) of one scoring forward: vision tower + language model over the row's
    `sequence_length` tokens (with several questions: the shared prefix once and each question after it), and the
    head at each question's last token. Attention counts every query-key pair, as a masked kernel computes them."""
    patches = grid[0] * grid[1] * grid[2]
    d = arch.vision_dim
    vision_block = 2 * patches * (4 * d * d + 2 * arch.vision_mlp_ratio * d * d) + 4 * patches * patches * d
    merged_dim = d * MERGE_SIZE**2
    merger = 2 * (patches // MERGE_SIZE**2) * (merged_dim * merged_dim + merged_dim * arch.text_hidden)
    vision = 2 * patches * arch.patch_dim * d + arch.vision_depth * vision_block + merger
    h, n = arch.text_hidden, sequence_length
    kv = h // arch.text_heads * arch.text_kv_heads
    text_layer = 2 * n * (2 * h * h + 2 * h * kv + 3 * h * arch.text_intermediate) + 4 * n * n * h
    text = arch.text_layers * text_layer + 2 * h * arch.vocab * questions
    return {"vision": vision, "text": text, "total": vision + text}


def question_flops(grid: tuple[int, int, int], shared: int, suffixes: list[int], arch: Architecture = QWEN2_VL_2B):
    """Per question: FLOPs of a run asking it alone (`alone`), and what it adds to the shared forward (`added`)."""
    together = forward_flops(grid, shared + sum(suffixes), arch, len(suffixes))["total"]
    return [
        {
            "alone": forward_flops(grid, shared + suffix, arch)["total"],
            "added": together - forward_flops(grid, shared + sum(suffixes) - suffix, arch, len(suffixes) - 1)["total"],
        }
        for suffix in suffixes
    ]


def plan_recipe(recipe: Recipe, max_rows: int | None = None) -> dict[str, Any]:
    """Run the checks `annotate run` makes, read the input's headers and texts, plan every window, add it all up."""
    from annotator.checks import check_run
    from annotator.prompt import PromptBuilder

    checked = check_run(recipe, loads_model=False)
    source, tokenizer, why = checked.source, checked.tokenizer, checked.tokenizer_note
    if tokenizer is None:
        from annotator.models import build_tiny_tokenizer

        builder = PromptBuilder(build_tiny_tokenizer(), recipe.prompt, recipe.questions, check_answers=False)
        tokenizer_note = (
            f"tokenizer of {recipe.model.name!r} unavailable ({why}): text lengths approximate, answers unchecked"
        )
    else:
        builder, tokenizer_note = PromptBuilder(tokenizer, recipe.prompt, recipe.questions), None
    columns = [recipe.input.image_column] + ([recipe.input.text_column] if reads_text_column(recipe.prompt) else [])
    grids: Counter[tuple[int, int, int]] = Counter()
    errors: Counter[str] = Counter()
    rows = real = padded = batches = 0
    flops = {"vision": 0, "text": 0, "total": 0}
    questions = recipe.questions
    per_question = [{"name": q.name, "tokens": 0, "flops_alone": 0, "flops_added": 0} for q in questions]
    for window in source.windows(recipe.batching.window, columns=columns):
        plan = plan_recipe_window(window, recipe, builder)
        rows += window.rows
        errors.update(image_kind(e) for e in plan.errors.values())
        real += plan.real_tokens
        padded += plan.padded_tokens
        batches += len(plan.batches)
        for batch in plan.batches:
            for row in batch:
                grids[row.grid] += 1
                for part, value in forward_flops(row.grid, row.length, questions=len(questions)).items():
                    flops[part] += value
                suffixes = builder.suffix_lengths(row.text)
                shared = builder.shared_length(image_token_count(row.grid))
                for total, suffix, cost in zip(
                    per_question, suffixes, question_flops(row.grid, shared, suffixes), strict=True
                ):
                    total["tokens"] += suffix
                    total["flops_alone"] += cost["alone"]
                    total["flops_added"] += cost["added"]
        if max_rows is not None and rows >= max_rows:
            break
    scorable = sum(grids.values())
    return {
        "rows": rows,
        "total_rows": source.total_rows,
        "scorable": scorable,
        "errors": dict(errors.most_common()),
        "batches": batches,
        "buckets": [{"grid": list(g), "image_tokens": image_token_count(g), "rows": n} for g, n in grids.most_common()],
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_efficiency": round(real / padded, 4) if padded else None,
        "flops": flops,
        "flops_per_pair": flops["total"] / scorable if scorable else None,
        **(_sharing(flops["total"], per_question) if len(questions) > 1 else {}),
        "note": tokenizer_note,
    }


def _sharing(total: int, per_question: list[dict[str, Any]]) -> dict[str, Any]:
    """What sharing the image and prefix saves: the questions together against a run per question."""
    separate = sum(q["flops_alone"] for q in per_question)
    return {
        "questions": per_question,
        "flops_separate_runs": separate,
        # The cost of asking every question, in runs of one question (of the average one): 1 + what they add.
        "cost_in_single_runs": round(total * len(per_question) / separate, 3) if separate else None,
    }
