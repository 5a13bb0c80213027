"""The lean forward alone on one collated batch of seed-sized pairs: eager vs CUDA graphs, a profile, torch.compile.

    python -m annotator.bench_forward graphs [--batches 64,16,4]   # ms per batch, eager vs graph replay
    python -m annotator.bench_forward profile [--compile]          # vision / decoder split, top kernels (batch 64)
    python -m annotator.bench_forward compile [--dtype float32]    # eager vs model.compile vs a whole-graph compile
    python -m annotator.bench_forward elementwise                  # the lean forms vs transformers' (rotary, MLP, norm)

`annotate bench` measures the pipeline; this isolates the model: the batch is collated once and stays on the
device, so pairs/s here is the forward's own ceiling. qwen2-vl-2b-random in bfloat16 on a GPU, the tiny model
in float32 on a CPU (to check the script, not to time anything).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from annotator import forward, rotary
from annotator.batching import grid_thw
from annotator.cli import guard_standard_streams
from annotator.errors import AnnotatorError
from annotator.graphs import LENGTH_STEP
from annotator.models import load_model
from annotator.prompt import PromptBuilder
from annotator.recipe import PromptConfig
from annotator.scoring import ScoreInput, Scorer

ON_GPU = torch.cuda.is_available()
CAPTION = "a photo of a cat sitting on a wooden table near the window"


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def seed_rows(builder: PromptBuilder, count: int) -> list[ScoreInput]:
    """`count` pairs of random 756x476-sized images (grid 1x30x48 at max_pixels 307200) and one caption."""
    grid = grid_thw(476, 756, 3136, 307200)
    rng = np.random.default_rng(0)
    text = builder.question_tokens([CAPTION])[0]
    shape = (grid[1] * 14, grid[2] * 14, 3)
    return [ScoreInput(rng.integers(0, 256, shape, dtype=np.uint8), grid, text) for _ in range(count)]


def timed(run, repeats: int) -> tuple[float, float, float]:
    """Median, min and max seconds of `run()` to the end of its device work."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def describe(batch: int, seconds: tuple[float, float, float]) -> str:
    median, low, high = seconds
    return f"{1000 * median:.1f} ms/batch ({1000 * low:.1f}-{1000 * high:.1f}), {batch / median:.1f} pairs/s"


def graphs(loaded, builder, batches: list[int]) -> None:
    """Eager vs replayed graphs, both on batches padded to LENGTH_STEP: three warm-up calls, median of 10."""
    for batch in batches:
        rows = seed_rows(builder, batch)
        line = {}
        for setting in ("off", "on"):
            scorer = Scorer(loaded, builder, "lean", setting)
            scorer.length_step = LENGTH_STEP
            inputs = scorer.collate(rows)
            for _ in range(3):  # eager, then (graphs on) eager again and capture
                scorer.logits(inputs)
            line[setting] = describe(batch, timed(lambda s=scorer, i=inputs: s.logits(i), 10))
            if scorer.graphs is not None:
                line[setting] += f" {dict(scorer.graphs.counts)}"
        print(f"forward alone, batch {batch}: {line}", flush=True)


def profile(loaded, builder, compile_regions: bool = False) -> None:
    """GPU ms of the vision tower, embeddings + decoder and head (CUDA events), then the top kernels; with
    `compile_regions`, of the forward `model.compile: on` runs (its blocks and layers compiled at load)."""
    model, text_model = loaded.model, loaded.model.model.language_model
    scorer = Scorer(loaded, builder, "lean", "off", "on" if compile_regions else "off")
    regions = scorer.regions
    inputs = scorer.collate(seed_rows(builder, 64 if ON_GPU else 2))

    def stages() -> list[float] | None:
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if ON_GPU else []

        def mark(stage: int) -> None:
            if marks:
                marks[stage].record()

        mark(0)
        features = forward.vision_features(model.model.visual, inputs.pixel_values, inputs.vision, regions)
        mark(1)
        embeds = forward.embed(text_model, inputs.input_ids, inputs.image_index, features)
        tables = forward.rotary_tables(text_model, embeds, inputs.position_ids)
        mask = forward.question_mask(inputs.segments, embeds.dtype)
        hidden, _ = forward.decode(text_model, embeds, mask, tables, regions=regions)
        mark(2)
        forward.head(model, hidden, inputs.answer_index)
        mark(3)
        sync()
        return [round(marks[i].elapsed_time(marks[i + 1]), 1) for i in range(3)] if marks else None

    for _ in range(3):
        stages()
    for _ in range(3):
        print("GPU ms: vision tower, embeddings + decoder, head:", stages(), flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if ON_GPU:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        stages()
    sort = "self_cuda_time_total" if ON_GPU else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=90))


def compiled(loaded, builder) -> None:
    """Eager vs `model.compile: on` (each vision block and decoder layer through torch.compile, dynamic shapes,
    compiled at load) vs one static compile of the whole forward; and how far P(Y) moves from eager."""
    scorer = Scorer(loaded, builder, "lean", "off", "off")
    batch = 64 if ON_GPU else 2
    inputs = scorer.collate(seed_rows(builder, batch))
    answers = list(builder.answer_ids[0])  # Y, N
    eager = forward.lean_logits(loaded.model, inputs)
    p_eager = eager.float()[:, answers].softmax(-1)[:, 0]
    print("eager:", describe(batch, timed(lambda: forward.lean_logits(loaded.model, inputs), 5)), flush=True)

    start = time.perf_counter()
    regions = Scorer(loaded, builder, "lean", "off", "on").regions  # its warm-up compiles
    print(f"model.compile: on, warm-up at load: {time.perf_counter() - start:.1f} s", flush=True)
    variants = {
        "model.compile: on (per block/layer, dynamic shapes)": lambda: forward.lean_logits(
            loaded.model, inputs, regions
        )
    }
    whole = torch.compile(forward.lean_logits, fullgraph=True, dynamic=False)
    variants["whole forward, static shapes"] = lambda: whole(loaded.model, inputs)
    for name, run in variants.items():
        start = time.perf_counter()
        out = run()
        sync()
        print(f"{name}: first call {time.perf_counter() - start:.1f} s", flush=True)
        print(f"{name}:", describe(batch, timed(run, 10)), flush=True)
        moved = float((p_eager - out.float()[:, answers].softmax(-1)[:, 0]).abs().max())
        print(f"{name}: max |P(Y) eager - compiled| {moved:.2e}, P(Y) std {float(p_eager.std()):.4f}", flush=True)


def elementwise(loaded, builder) -> None:
    """The pieces the lean forward rewrites, each timed against transformers' own on a batch's real shapes: the
    vision rotary (the Triton kernel where it runs, and PyTorch's ops), the vision MLP (QuickGELU as one SiLU), the
    patch embedding (a matrix product on a GPU), the decoder's RMSNorm.
    Where the bytes saved (`annotate bench`'s `memory_mb_per_image_by_op`) do not buy time, this shows it."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    model = loaded.model
    visual, text_model = model.model.visual, model.model.language_model
    scorer = Scorer(loaded, builder, "lean", "off", "off")
    batch = 64 if ON_GPU else 2
    inputs = scorer.collate(seed_rows(builder, batch))
    block, layer = visual.blocks[0], text_model.layers[0]
    hidden = forward.patch_embedded(visual.patch_embed, inputs.pixel_values)
    length = inputs.vision.length
    halves = forward.vision_rotary(visual, hidden, inputs.vision)
    cos, sin = visual.rotary_pos_emb(hidden, inputs.vision.positions)  # transformers' tables, for its own rotary
    attn = block.attn
    qkv = attn.qkv(block.norm1(hidden))
    packed = qkv.view(-1, 3, attn.num_heads, attn.head_dim)  # transformers' layout: (patches, 3, heads, dim)
    ours = qkv.view(-1, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    tables = (
        (cos.repeat(inputs.vision.frames, 1), sin.repeat(inputs.vision.frames, 1))
        if cos.shape[0] == length
        else (cos, sin)
    )
    embeds = forward.embed(text_model, inputs.input_ids, inputs.image_index, visual.merger(hidden))

    def transformers_rotary() -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary_pos_emb_vision(packed[:, 0], packed[:, 1], *tables)

    pieces = {
        "vision rotary (q and k)": (lambda: rotary.rotate(ours[:2], halves, qkv.dtype), transformers_rotary),
        "vision rotary, PyTorch's ops": (
            lambda: rotary.rotate_with_ops(ours[:2], halves, qkv.dtype),
            transformers_rotary,
        ),
        "vision MLP": (lambda: forward.vision_mlp(block.mlp, hidden), lambda: block.mlp(hidden)),
        "patch embedding": (
            lambda: forward.patch_embedded(visual.patch_embed, inputs.pixel_values),
            lambda: visual.patch_embed(inputs.pixel_values),
        ),
        "decoder RMSNorm": (
            lambda: forward.rms_normed(layer.input_layernorm, embeds),
            lambda: layer.input_layernorm(embeds),
        ),
    }
    print(f"batch {batch}, {hidden.shape[0]} patches, {embeds.shape[0]}x{embeds.shape[1]} tokens, {loaded.dtype}")
    fused = rotary.kernel_runs(hidden.device, attn.head_dim, qkv.dtype, qkv.dtype)
    print(f"vision rotary through the Triton kernel: {fused}")
    per_forward = {"vision": len(visual.blocks), "decoder": 2 * len(text_model.layers), "patch": 1}
    for name, (lean, reference) in pieces.items():
        for run in (lean, reference):
            run()
        lean_s, reference_s = timed(lean, 20)[0], timed(reference, 20)[0]
        print(
            f"{name}: lean {1000 * lean_s:.2f} ms, transformers {1000 * reference_s:.2f} ms per batch "
            f"({reference_s / lean_s:.2f}x); x {per_forward[name.split()[0]]} per forward",
            flush=True,
        )


def batch_sizes(text: str) -> list[int]:
    """`--batches 64,16,4`: positive whole numbers, else a usage error (before the model loads)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of batch sizes; give positive numbers, e.g. 64,16,4")
    return [int(part) for part in parts]


class Parser(argparse.ArgumentParser):
    """A usage mistake exits 1 (a user error), as `annotate`'s do: 2 means a run that can be resumed."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def main() -> None:
    guard_standard_streams()  # `... | head` must not end in a traceback either
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["graphs", "profile", "compile", "elementwise"])
    parser.add_argument("--batches", type=batch_sizes, default="64,16,4", help="batch sizes for `graphs`")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model dtype (auto: bfloat16 on a GPU, float32 on a CPU)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="`profile`: the forward with model.compile's regions (compiled first)"
    )
    parser.add_argument(
        "--model", default="auto", help="auto: qwen2-vl-2b-random on a GPU, tiny on a CPU (to check the script)"
    )
    args = parser.parse_args()
    if args.compile and args.what != "profile":
        parser.error(f"--compile applies to `profile` only (`{args.what}` has its own variants)")
    name = args.model if args.model != "auto" else "qwen2-vl-2b-random" if ON_GPU else "tiny"
    try:
        loaded = load_model(name, None, args.dtype, "auto", "sdpa")
    except AnnotatorError as exc:  # a model that is not there: annotate's one paragraph, exit 1
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    builder = PromptBuilder(loaded.tokenizer, PromptConfig())
    with torch.inference_mode():
        if args.what == "graphs":
            graphs(loaded, builder, args.batches)
        elif args.what == "profile":
            profile(loaded, builder, args.compile)
        elif args.what == "elementwise":
            elementwise(loaded, builder)
        else:
            compiled(loaded, builder)
    if ON_GPU:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GB")


if __name__ == "__main__":
    main()
