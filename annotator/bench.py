"""`annotate bench`: the real pipeline's throughput on synthetic images, the preprocessing rate, the naive baseline."""

from __future__ import annotations

import io
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from annotator.errors import AnnotatorError
from annotator.recipe import SEED_QUESTION

# A realistic mix for web image-text data (width, height, weight): mostly 0.3-2 megapixel web images in
# 4:3, 16:9, 3:2 and square shapes, plus full-size camera photos, which dominate decoding time, and the
# seed's own 756x476. Weights are in sixteenths of the rows.
DEFAULT_MIX: tuple[tuple[int, int, int], ...] = (
    (756, 476, 2),
    (640, 480, 2),
    (500, 375, 1),
    (512, 512, 1),
    (800, 600, 1),
    (1024, 768, 2),
    (1280, 720, 2),
    (600, 800, 1),
    (1200, 800, 1),
    (1920, 1080, 1),
    (4000, 3000, 2),
)
CAPTION_WORDS = (
    "a the of in on with and at near photo picture image view close-up cat dog man woman child people group street "
    "city road car bus bike tree trees grass field mountain beach sea water river sky clouds sunset night snow house "
    "building room kitchen table chair window door food plate cup coffee pizza cake red blue green white black small "
    "large old new young happy wooden bright dark sitting standing walking holding looking playing"
)
# Dense bf16/fp16 tensor-core peaks (NVIDIA datasheets), by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
# `--questions K` asks the first K of these (the seed's own question first): what a cleaning run asks of an image.
BENCH_QUESTIONS = (
    ("text", SEED_QUESTION),
    ("watermark", 'Answer with one word, "Y" or "N": is there a watermark or a logo on this image?'),
    ("screenshot", 'Answer with one word, "Y" or "N": is this image a screenshot of a screen or a document?'),
    ("photo", 'Answer with one word, "Y" or "N": is this a photograph, not a drawing, a render or a chart?'),
    ("people", 'Answer with one word, "Y" or "N": does this image show a person?'),
    ("writing", 'Answer with one word, "Y" or "N": is there written text in this image?'),
    ("animal", 'Answer with one word, "Y" or "N": does this image show an animal?'),
    ("style", 'Answer with one word, "Y" or "N": does "{text}" describe the style of this image?'),
)
CAPTION_COUNT = 251  # prime: the caption cycle never lines up with the image cycle
ROW_GROUP = 100  # rows per parquet row group, as `datasets` writes image datasets
REPEATS = 3  # timings on shared machines are noisy: every preprocessing stage is the best of this many


@dataclass(frozen=True)
class BenchConfig:
    """What `annotate bench` measures; the fields are its command-line options."""

    model: str = "tiny"
    sizes: str = ""
    image_format: str = "jpeg"
    pairs: int = 256
    max_pixels: int = 307200
    max_batch_tokens: int = 32768
    max_batch_size: int = 64
    workers: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    baseline: bool = False
    baseline_pairs: int = 32
    attn_implementation: str = "sdpa"
    forward: str = "lean"
    cuda_graphs: str = "auto"
    compile: str = "auto"
    count_images: int = 64
    devices: str = ""  # several: the scaling benchmark (`bench_scaling.py`) instead
    window: int = 0  # rows per window of the scaling benchmark; 0: several windows per writer
    ray: bool = False  # the scaling benchmark also on Ray actors
    host: bool = True
    questions: int = 1


@dataclass(frozen=True)
class SyntheticImage:
    """One encoded synthetic photo of the mix, and how often it occurs there."""

    width: int
    height: int
    weight: int
    data: bytes

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


def parse_sizes(spec: str) -> list[tuple[int, int, int]]:
    """`4000x3000,756x476` -> [(4000, 3000, 1), (756, 476, 1)]; empty -> the default mix."""
    if not spec.strip():
        return list(DEFAULT_MIX)
    sizes = []
    for part in spec.split(","):
        width, sep, height = part.strip().lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
            raise AnnotatorError(f"--sizes {spec!r}: {part.strip()!r} is not WIDTHxHEIGHT. Use e.g. 4000x3000,756x476.")
        sizes.append((int(width), int(height), 1))
    return sizes


def image_format(name: str) -> str:
    """The PIL format name for `--format`."""
    formats = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}
    if name.lower() not in formats:
        raise AnnotatorError(f"--format {name!r} is not supported; use jpeg or png.")
    return formats[name.lower()]


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A synthetic photo: 1/f-like colour clouds, hard-edged shapes and sensor grain.

    Decoding cost and draft-mode error depend on content; flat or pure-noise images would flatter or
    punish JPEG alike, so this mixes smooth regions, edges and fine grain (about 1.4 MB at 12 MP, q90).
    """
    rng = np.random.default_rng(seed)
    # Clouds and shapes are drawn at about 1 MP and upscaled: detail above that comes from the grain.
    scale = max(1, max(width, height) // 1024)
    w, h = -(-width // scale), -(-height // scale)
    canvas = np.zeros((h, w, 3), np.float32)
    amplitude, cells = 90.0, 3
    while cells < max(w, h) // 2:
        grid = rng.normal(0, 1, (max(2, cells * h // max(w, h)), max(2, cells * w // max(w, h)), 3))
        for c in range(3):
            layer = Image.fromarray(grid[..., c].astype(np.float32), "F").resize((w, h), Image.Resampling.BICUBIC)
            canvas[..., c] += amplitude * np.asarray(layer)
        amplitude, cells = amplitude * 0.55, cells * 2
    image = Image.fromarray(np.clip(canvas + 128, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        dx, dy = int(rng.integers(w // 20, w // 4 + 1)), int(rng.integers(h // 20, h // 4 + 1))
        draw.ellipse((x, y, x + dx, y + dy), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    # A tiled grain patch: odd tile sizes hide the repetition, and it costs far less than full-size noise.
    tile = rng.normal(0, 3.0, (257, 263, 3)).round().astype(np.int16)
    grain = np.tile(tile, (-(-height // 257), -(-width // 263), 1))[:height, :width]
    pixels = np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def synthetic_images(sizes: Sequence[tuple[int, int, int]], fmt: str) -> list[SyntheticImage]:
    return [SyntheticImage(w, h, n, encode(photo_like(w, h, seed=i), fmt)) for i, (w, h, n) in enumerate(sizes)]


def mix_order(images: Sequence[SyntheticImage]) -> list[int]:
    """Image indices in row order: each image `weight` times per cycle, interleaved as a real dataset would be."""
    slots = sorted((k / image.weight, i) for i, image in enumerate(images) for k in range(image.weight))
    return [i for _, i in slots]


def synthetic_captions(count: int = CAPTION_COUNT, seed: int = 0) -> list[str]:
    """Captions of web-like lengths (mostly 4-20 words, a tail to 60), so text lengths vary as in real data."""
    rng = np.random.default_rng(seed)
    words = CAPTION_WORDS.split()
    lengths = np.clip(np.rint(rng.lognormal(np.log(10), 0.6, count)), 1, 60).astype(int)
    return [" ".join(rng.choice(words, n)) for n in lengths]


@dataclass
class SyntheticPairs:
    """Row r's image and caption: images interleaved by weight, captions cycling independently."""

    images: list[SyntheticImage]
    captions: list[str]

    def __post_init__(self) -> None:
        self.order = mix_order(self.images)

    def __getitem__(self, row: int) -> tuple[SyntheticImage, str]:
        return self.images[self.order[row % len(self.order)]], self.captions[row % len(self.captions)]


def write_pairs(path: Path, synthetic: SyntheticPairs, pairs: int) -> None:
    """A parquet file of `pairs` rows (HF Image struct + caption), written a row group at a time (flat memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for start in range(0, pairs, ROW_GROUP):
            rows = range(start, min(pairs, start + ROW_GROUP))
            chosen = [synthetic[r] for r in rows]
            structs = [{"bytes": image.data, "path": None} for image, _ in chosen]
            captions = [caption for _, caption in chosen]
            writer.write_table(pa.table({"image": pa.array(structs, image_type), "caption": captions}, schema=schema))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def best_time(work: Callable[[], Any]) -> tuple[float, Any]:
    """The fastest of `REPEATS` runs, in seconds, and the last result."""
    best, result = float("inf"), None
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure_preprocessing(
    synthetic: SyntheticPairs, builder: Any, mean: Any, std: Any, min_pixels: int, max_pixels: int
) -> dict[str, Any]:
    """Single-thread CPU cost per image of header read + decode/resize + patchify + tokens, with and without draft.

    Rates are weighted by the mix. Patchify runs on the scoring device in a GPU run; timing it on the CPU
    here makes the rate a lower bound. `psnr_db` compares the draft and the full decode (null: identical,
    draft does not apply to that size or format).
    """
    import torch

    from annotator.batching import PATCH_SIZE, grid_thw
    from annotator.images import ImageRef, header_size
    from annotator.preprocess import ImageJob, prepare_image
    from annotator.scoring import patchify

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a rate per core: PIL decodes on one thread, and so must patchify here
    try:
        text_s = best_time(lambda: builder.question_tokens(synthetic.captions))[0] / len(synthetic.captions)
        by_size, stages = {}, []
        for image in synthetic.images:
            ref = ImageRef(data=image.data)
            header_s, (width, height) = best_time(lambda ref=ref: header_size(ref, 10**9))
            _, grid_h, grid_w = grid_thw(height, width, min_pixels, max_pixels)
            size = (grid_h * PATCH_SIZE, grid_w * PATCH_SIZE)
            draft_s, drafted = best_time(lambda ref=ref, size=size: prepare_image(ImageJob(ref, size, 10**9)))
            full_s, full = best_time(lambda ref=ref, size=size: prepare_image(ImageJob(ref, size, 10**9, draft=False)))
            pixels = torch.from_numpy(drafted)
            patch_s = best_time(lambda pixels=pixels: patchify(pixels, mean, std))[0]
            other_s = header_s + patch_s + text_s
            quality = psnr(drafted, full)
            by_size[image.name] = {
                "draft_per_s": round(1 / (other_s + draft_s), 1),
                "full_per_s": round(1 / (other_s + full_s), 1),
                "psnr_db": round(quality, 1) if quality != float("inf") else None,
            }
            stages.append((image.weight, header_s, draft_s, full_s, patch_s))
    finally:
        torch.set_num_threads(threads)
    total = sum(s[0] for s in stages)
    header_ms, draft_ms, full_ms, patch_ms = (1000 * sum(s[0] * s[k] for s in stages) / total for k in range(1, 5))
    text_ms = 1000 * text_s
    qualities = [v["psnr_db"] for v in by_size.values() if v["psnr_db"] is not None]
    return {
        "preprocess_images_per_s_per_core": round(1000 / (header_ms + draft_ms + patch_ms + text_ms), 1),
        "preprocess_images_per_s_per_core_no_draft": round(1000 / (header_ms + full_ms + patch_ms + text_ms), 1),
        "preprocess_ms": {
            "header": round(header_ms, 3),
            "decode_resize_draft": round(draft_ms, 2),
            "decode_resize_full": round(full_ms, 2),
            "patchify_cpu": round(patch_ms, 2),
            "tokens": round(text_ms, 3),
        },
        "preprocess_by_size": by_size,
        "draft_min_psnr_db": min(qualities, default=None),
    }


def _timed_annotator():
    from annotator.run import Annotator

    class TimedAnnotator(Annotator):
        """The real pipeline, noting when each batch's rows are done, for the steady-state rate."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.marks: list[tuple[float, int]] = []

        def _advance(self, scored: int, errors: int) -> None:
            super()._advance(scored, errors)
            if scored:
                self.marks.append((time.perf_counter(), self.rows_done))

    return TimedAnnotator


def steady_rate(marks: Sequence[tuple[float, int]]) -> float | None:
    """Rows per second after the first batch (worker start-up and pipeline fill excluded); None under 3 batches.

    On a CPU a batch is computed when it is launched, before the previous one is marked done, so this
    can overstate by up to one batch there: use many batches.
    """
    if len(marks) < 3:
        return None
    (t0, r0), (t1, r1) = marks[0], marks[-1]
    return (r1 - r0) / (t1 - t0) if t1 > t0 else None


def planned_rows(recipe: Any, builder: Any) -> Iterator[Any]:
    """Every scorable row of the input as the run plans it (grid and sequence length), without decoding."""
    from annotator.batching import plan_recipe_window
    from annotator.sources import open_source

    source = open_source(recipe.input, recipe.prompt)
    for window in source.windows(recipe.batching.window, columns=[recipe.input.image_column, recipe.input.text_column]):
        plan = plan_recipe_window(window, recipe, builder)
        for batch in plan.batches:
            yield from batch


def peak_flops(device: Any, dtype: Any) -> float | None:
    """The GPU's dense half-precision peak, or None where MFU would mislead (CPU, fp32, unknown GPU)."""
    import torch

    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({len(os.sched_getaffinity(0))} cores)"


def naive_inputs(loaded: Any, processor: Any, prompt: Any, data: bytes, caption: str) -> dict[str, Any]:
    """The seed's way, one pair: full decode, transformers' image processor, the chat text through the tokenizer."""
    pixels = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
    image_tokens = int(pixels["image_grid_thw"].prod()) // 4
    question = prompt.question.replace("{text}", caption)
    text = (
        f"<|im_start|>system\n{prompt.system}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        f"{'<|image_pad|>' * image_tokens}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    tokens = loaded.tokenizer(text, return_tensors="pt")
    image_pad = loaded.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "mm_token_type_ids": (tokens["input_ids"] == image_pad).long(),
        "pixel_values": pixels["pixel_values"],
        "image_grid_thw": pixels["image_grid_thw"],
    }


def image_processor(loaded: Any, min_pixels: int, max_pixels: int) -> Any:
    """transformers' torchvision image processor where torchvision exists (the seed's), else the PIL one."""
    kwargs = {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "image_mean": list(loaded.image_mean),
        "image_std": list(loaded.image_std),
    }
    try:
        import torchvision  # noqa: F401
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(**kwargs)
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(**kwargs)


def run_baseline(loaded: Any, recipe: Any, synthetic: SyntheticPairs, pairs: int) -> float:
    """Pairs/s of the naive loop: one pair at a time, a full forward (logits at every position, the model's own
    positions), a sync per pair. One untimed warm-up pair goes first; the pipeline's rate keeps its start-up in,
    so the speed-up is conservative.
    """
    import torch

    processor = image_processor(loaded, recipe.model.min_pixels, recipe.model.max_pixels)
    answers = [loaded.tokenizer.convert_tokens_to_ids(a) for a in (recipe.prompt.positive, recipe.prompt.negative)]

    def one_pair(row: int) -> float:
        image, caption = synthetic[row]
        inputs = naive_inputs(loaded, processor, recipe.prompt, image.data, caption)
        inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        with torch.no_grad():
            probs = loaded.model(**inputs).logits[0, -1].float().softmax(-1)[answers]
        return (probs[0] / probs.sum()).item()

    one_pair(0)
    start = time.perf_counter()
    for row in range(1, pairs + 1):
        one_pair(row)
    return pairs / (time.perf_counter() - start)


def bench_recipe(config: BenchConfig, parquet: Path, output_dir: Path, devices: str = "auto") -> Any:
    from annotator.recipe import validate_recipe

    workers: int | str = int(config.workers) if config.workers.isdigit() else config.workers
    return validate_recipe(
        {
            "name": "bench",
            "input": {"parquet": str(parquet), "image_column": "image", "text_column": "caption"},
            "model": {
                "name": config.model,
                "dtype": config.dtype,
                "device": config.device,
                "max_pixels": config.max_pixels,
                "attn_implementation": config.attn_implementation,
                "forward": config.forward,
                "cuda_graphs": config.cuda_graphs,
                "compile": config.compile,
            },
            "batching": {
                "max_batch_tokens": config.max_batch_tokens,
                "max_batch_size": config.max_batch_size,
                "workers": workers,
            },
            "output": {"dir": str(output_dir)},
            "engine": {"devices": devices},
            **({"prompt": {"questions": dict(BENCH_QUESTIONS[: config.questions])}} if config.questions > 1 else {}),
        },
        source="annotate bench options",
    )


def run_bench(config: BenchConfig, console: Any) -> dict[str, Any]:
    """Write synthetic pairs, run the real pipeline on them, then measure preprocessing and the naive loop."""
    sizes = parse_sizes(config.sizes)
    fmt = image_format(config.image_format)
    if config.pairs < 1 or config.baseline_pairs < 1:
        raise AnnotatorError("--pairs and --baseline-pairs must be at least 1.")
    if config.count_images < 0:
        raise AnnotatorError("--count-images must be 0 (no op counts) or more.")
    if not 1 <= config.questions <= len(BENCH_QUESTIONS):
        raise AnnotatorError(f"--questions must be from 1 to {len(BENCH_QUESTIONS)} (the bench's own questions).")
    with tempfile.TemporaryDirectory(prefix="annotate-bench-") as tmp:
        console.print(f"bench: encoding {len(sizes)} synthetic {fmt} photos, writing {config.pairs} pairs...")
        synthetic = SyntheticPairs(synthetic_images(sizes, fmt), synthetic_captions())
        parquet = Path(tmp) / "pairs.parquet"
        write_pairs(parquet, synthetic, config.pairs)
        if config.devices:
            from annotator.bench_scaling import run_scaling
            from annotator.executors import resolve_devices

            devices = resolve_devices(bench_recipe(config, parquet, Path(tmp) / "out", config.devices))
            return {"model": config.model, **run_scaling(config, parquet, devices, console)}
        recipe = bench_recipe(config, parquet, Path(tmp) / "out")
        console.print(f"bench: scoring {config.pairs} pairs with {config.model} (the real pipeline)...")
        result, annotator = run_pipeline(recipe, console)
        writer = annotator.executor.writer  # one device: the writer ran in this process
        graphs = writer.scorer.graphs
        result["graph_batches"] = dict(graphs.counts) if graphs is not None else None
        if config.host:
            result.update(host_figures(recipe, Path(tmp), synthetic, writer.builder, console, config.pairs))
        result["question_cost"] = None
        if config.questions > 1:
            console.print(f"bench: {config.questions} questions against one, on the same images (best of {REPEATS})...")
            one = bench_recipe(replace(config, questions=1), parquet, Path(tmp) / "out")
            result["question_cost"] = measure_question_cost(writer.scorer.loaded, one, recipe)
    loaded, m = writer.scorer.loaded, recipe.model
    console.print("bench: preprocessing rate per core (best of 3)...")
    mean, std = writer.scorer.mean.cpu(), writer.scorer.std.cpu()
    result.update(measure_preprocessing(synthetic, writer.builder, mean, std, m.min_pixels, m.max_pixels))
    baseline = None
    if config.baseline:
        console.print(f"bench: naive loop, {config.baseline_pairs} pairs one at a time...")
        baseline = run_baseline(loaded, recipe, synthetic, config.baseline_pairs)
    result["baseline_pairs_per_s"] = round(baseline, 3) if baseline else None
    result["speedup_vs_baseline"] = round(result["pairs_per_s"] / baseline, 2) if baseline else None
    steady = result.get("steady_pairs_per_s")
    result["steady_speedup_vs_baseline"] = round(steady / baseline, 2) if baseline and steady else None
    result["op_counts"] = None
    if config.count_images:
        console.print(f"bench: ATen ops and host syncs of a batch of {config.count_images} seed-sized images...")
        result["op_counts"] = measure_forward_ops(config.count_images, m.min_pixels, config.max_pixels)
    return {
        "model": config.model,
        "device": str(loaded.device),
        "device_name": device_name(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "attn_implementation": recipe.model.attn_implementation,
        "forward": recipe.model.forward,
        "cuda_graphs": recipe.model.cuda_graphs,
        "compile": recipe.model.compile,
        "questions": len(recipe.questions),
        "sizes": [f"{i.name}:{i.weight}" for i in synthetic.images],
        "image_format": fmt.lower(),
        "max_pixels": config.max_pixels,
        **result,
    }


def host_figures(
    recipe: Any, tmp: Path, synthetic: SyntheticPairs, builder: Any, console: Any, pairs: int
) -> dict[str, Any]:
    """Main-process CPU per pair (shared memory and pipes), worker CPU and bytes per image, the planner's stall."""
    from annotator.bench_host import measure_host, planner_stall, worker_malloc

    console.print("bench: host CPU, bytes per image through shared memory and through pipes (two more runs)...")
    figures = measure_host(recipe, tmp, console)
    figures.update(planner_stall(recipe, builder))
    if figures["host"].get("pipes"):
        console.print("bench: worker CPU per image with glibc's malloc defaults and tuned...")
        figures.update(worker_malloc(synthetic.images, recipe.model.max_pixels, min(128, max(16, pairs))))
    return figures


def measure_forward_ops(images: int, min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """ATen ops and host syncs of one batch of `images` seed-sized pairs (756x476, "a cat"), lean vs transformers,
    and the bytes the lean forward's memory-bound kernels move per image.

    Counted on Qwen2-VL-2B's architecture (`opcount.qwen2_vl_2b`): the lean forward at full size on fake tensors in
    bfloat16 (a GPU's dtype: bytes depend on widths and dtypes), transformers' own forward, which must read values,
    at reduced width with the same depth (ops depend on the depth and the code path, not on widths; its bytes are
    not comparable, so not given).
    """
    import torch

    from annotator.batching import grid_thw
    from annotator.opcount import count_launch, on_fake_tensors, qwen2_vl_2b
    from annotator.prompt import PromptBuilder
    from annotator.recipe import PromptConfig
    from annotator.scoring import ScoreInput, Scorer

    grid = grid_thw(476, 756, min_pixels, max_pixels)
    counts: dict[str, Any] = {"images": images, "grid": list(grid)}
    for forward, reduced in (("lean", False), ("transformers", True)):
        loaded = qwen2_vl_2b(reduced, torch.float32 if reduced else torch.bfloat16)
        builder = PromptBuilder(loaded.tokenizer, PromptConfig())
        rows = [ScoreInput.blank(grid, builder.question_tokens(["a cat"])[0])] * images
        with on_fake_tensors(loaded):
            scorer = Scorer(loaded, builder, forward, compile="off")  # the eager forward's ops, whatever `auto` does
            counts[forward] = {"model": loaded.name, **count_launch(scorer, rows, memory=not reduced).summary()}
    return counts


def run_pipeline(recipe: Any, console: Any) -> tuple[dict[str, Any], Any]:
    """Run `annotate run` on the bench's input: rates after model load, padding, FLOPs, MFU and memory peaks."""
    import torch

    from annotator.plan import Architecture, forward_flops
    from annotator.preprocess import resolve_workers
    from annotator.start import prepare_run

    folder, source = prepare_run(recipe, overwrite=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    annotator = _timed_annotator()(recipe, folder, source, console, progress=False, fresh=True)
    summary = annotator.run()
    finished = time.perf_counter()
    writer = annotator.executor.writer
    loaded = writer.scorer.loaded
    on_gpu = loaded.device.type == "cuda"
    peak_mem = round(torch.cuda.max_memory_allocated(loaded.device) / 2**30, 2) if on_gpu else None
    loop_start = finished - summary["session_seconds"]

    arch = Architecture.from_config(loaded.model.config)
    questions = len(recipe.questions)
    rows = planned_rows(recipe, writer.builder)
    flops = [forward_flops(r.grid, r.length, arch, questions)["total"] for r in rows]
    flops_per_pair = statistics.fmean(flops) if flops else None
    real_tokens = sum(r["real_tokens"] for r in folder.committed().values())
    pairs, pairs_per_s = summary["scored"], summary["rows_per_s"]
    steady = steady_rate(annotator.marks)
    peak = peak_flops(loaded.device, loaded.dtype)
    result = {
        "pairs": pairs,
        "errors": summary["errors"],
        "workers": resolve_workers(recipe.batching.workers),
        "pairs_per_s": pairs_per_s,
        "steady_pairs_per_s": round(steady, 3) if steady else None,
        "first_batch_s": round(annotator.marks[0][0] - loop_start, 2) if annotator.marks else None,
        # Start to a loaded model: with `model.compile: on`, its compile (the warm-up) too.
        "model_load_s": round(annotator.coordinator.loaded_at[0] - annotator.coordinator.started_at, 2),
        "tokens_per_s": round(pairs_per_s * real_tokens / pairs, 1) if pairs else None,
        "padding_efficiency": summary["padding_efficiency"],
        "mean_tokens_per_pair": round(real_tokens / pairs, 1) if pairs else None,
        "tflop_per_pair": round(flops_per_pair / 1e12, 4) if flops_per_pair else None,
        "achieved_tflop_per_s": round(pairs_per_s * flops_per_pair / 1e12, 3) if flops_per_pair else None,
        "peak_tflop_per_s": peak / 1e12 if peak else None,
        "mfu": round(pairs_per_s * flops_per_pair / peak, 4) if peak and flops_per_pair else None,
        "peak_gpu_mem_gb": peak_mem,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # KiB on Linux
    }
    return result, annotator


def measure_question_cost(loaded: Any, one: Any, many: Any) -> dict[str, Any]:
    """Seconds to score the same decoded images with one question (`one`'s recipe) and with several (`many`'s), each
    batched as its run would batch it, in turns, best of `REPEATS`; and the ratio the FLOP count predicts.

    Only the forward passes are timed (collate, transfer, forward, reading the results): reading and decoding
    the images is the same work for any number of questions. On a CPU the process's CPU time is measured too:
    on a shared machine other processes stretch wall time by whole factors, CPU time by far less.
    """
    from annotator.batching import plan_recipe_window
    from annotator.plan import Architecture, forward_flops
    from annotator.preprocess import ImageJob, prepare_image
    from annotator.prompt import PromptBuilder
    from annotator.scoring import ScoreInput, Scorer
    from annotator.sources import open_source

    arch = Architecture.from_config(loaded.model.config)
    images: dict[tuple[int, int], np.ndarray] = {}
    runs = {}
    for key, recipe in (("one", one), ("all", many)):
        builder = PromptBuilder(loaded.tokenizer, recipe.prompt, recipe.questions)
        source = open_source(recipe.input, recipe.prompt)
        batches, flops, tokens = [], 0, 0
        for window in source.windows(recipe.batching.window):
            for batch in plan_recipe_window(window, recipe, builder).batches:
                inputs = []
                for row in batch:
                    where = (window.index, row.position)
                    if where not in images:
                        images[where] = prepare_image(ImageJob(row.image, row.resized, recipe.input.max_image_pixels))
                    inputs.append(ScoreInput(images[where], row.grid, row.text))
                    flops += forward_flops(row.grid, row.length, arch, len(recipe.questions))["total"]
                    tokens += row.length
                batches.append(inputs)
        runs[key] = {
            "scorer": Scorer(loaded, builder, recipe.model.forward, compile=recipe.model.compile),
            "batches": batches,
            "flops": flops,
            "tokens": tokens,
            "seconds": float("inf"),
            "cpu_seconds": float("inf"),
        }
    for _ in range(REPEATS):
        for run in runs.values():
            start, cpu_start = time.perf_counter(), time.process_time()
            for batch in run["batches"]:
                run["scorer"].score(batch)
            run["seconds"] = min(run["seconds"], time.perf_counter() - start)
            run["cpu_seconds"] = min(run["cpu_seconds"], time.process_time() - cpu_start)
    pairs = len(images)
    single, several = runs["one"], runs["all"]
    on_cpu = loaded.device.type == "cpu"
    return {
        "questions": [q.name for q in many.questions],
        "pairs": pairs,
        "batches": {"one": len(single["batches"]), "all": len(several["batches"])},
        "tokens_per_pair": {"one": round(single["tokens"] / pairs, 1), "all": round(several["tokens"] / pairs, 1)},
        "seconds": {key: round(run["seconds"], 3) for key, run in runs.items()},
        "measured_ratio": round(several["seconds"] / single["seconds"], 3),
        "cpu_seconds": {key: round(run["cpu_seconds"], 3) for key, run in runs.items()} if on_cpu else None,
        "cpu_time_ratio": round(several["cpu_seconds"] / single["cpu_seconds"], 3) if on_cpu else None,
        "flop_ratio": round(several["flops"] / single["flops"], 3),
        "tflop_per_pair": {key: round(run["flops"] / pairs / 1e12, 4) for key, run in runs.items()},
    }
