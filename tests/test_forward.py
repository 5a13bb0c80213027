"""The lean forward equals transformers' own, never reads a device value on the host, and costs no ops per image."""

import copy
import importlib.util

import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_position_ids

from annotator import forward, rotary
from annotator.batching import grid_thw
from annotator.forward import VisionLayout, grid_rotary_positions
from annotator.opcount import count_launch, count_ops, on_fake_tensors, qwen2_vl_2b
from annotator.prompt import PromptBuilder
from annotator.recipe import PromptConfig
from annotator.scoring import ScoreInput, Scorer

MIN_PIXELS, MAX_PIXELS = 3136, 56 * 56 * 4
SIZES = [(756, 476), (320, 240), (240, 320), (100, 900), (64, 64), (500, 500)]
TEXTS = ["a cat", "a photo of a dog on the street", "red", "a small blue car next to a tree in the city"]


def score_inputs(builder, sizes, max_pixels=MAX_PIXELS, seed=0):
    rng = np.random.default_rng(seed)
    texts = builder.question_tokens(TEXTS)
    rows = []
    for i, (width, height) in enumerate(sizes):
        grid = grid_thw(height, width, MIN_PIXELS, max_pixels)
        image = rng.integers(0, 256, (grid[1] * 14, grid[2] * 14, 3), dtype=np.uint8)
        rows.append(ScoreInput(image, grid, texts[i % len(texts)]))
    return rows


def logits(scorer, rows):
    with torch.inference_mode():
        return scorer.logits(scorer.collate(rows))


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([(756, 476)] * 5, id="one-grid"),
        pytest.param(SIZES + [(756, 476), (500, 500)], id="mixed-grids"),
        pytest.param([(756, 476), (476, 756)] * 3, id="one-area-two-grids"),
    ],
)
def test_lean_forward_equals_transformers_forward(tiny, sizes):
    builder = PromptBuilder(tiny.tokenizer, PromptConfig())
    rows = score_inputs(builder, sizes)
    lean = logits(Scorer(tiny, builder, "lean"), rows)
    reference = logits(Scorer(tiny, builder, "transformers"), rows)
    yes = builder.answer_ids[0][0]
    assert reference[:, yes].std() > 1, "answers must depend on the input, or equality proves nothing"
    # Logits reach ~10 here; padded attention over mixed grids sums in another order (float32 rounding).
    torch.testing.assert_close(lean, reference, atol=5e-5, rtol=0)
    torch.testing.assert_close(lean.softmax(-1), reference.softmax(-1), atol=1e-5, rtol=0)
    lean_scores = Scorer(tiny, builder, "lean").score(rows)
    reference_scores = Scorer(tiny, builder, "transformers").score(rows)
    np.testing.assert_allclose([s.prob for s in lean_scores], [s.prob for s in reference_scores], atol=1e-5)


def test_vision_layout_of_mixed_grids_and_frames_equals_the_vision_tower(tiny):
    """Frames of one image attend apart (t > 1, as transformers' cu_seqlens split them); padding never leaks."""
    visual = tiny.model.model.visual
    for grids in ([(1, 6, 10), (2, 4, 4), (1, 6, 10), (1, 2, 2)], [(1, 6, 10), (2, 10, 6), (1, 2, 30)]):
        patches = sum(t * h * w for t, h, w in grids)
        pixel_values = torch.randn(patches, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = visual(pixel_values, grid_thw=torch.tensor(grids)).pooler_output
            got = forward.vision_features(visual, pixel_values, VisionLayout.build(grids, torch.float32))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_vision_layout_is_built_on_the_host_and_cached_per_grid():
    one = VisionLayout.build([(1, 30, 48)] * 64, torch.float32)
    assert (one.frames, one.length) == (64, 1440) and one.gather is None and one.key_mask is None
    assert one.positions.shape == (1440, 2), "one table shared by every image of a grid"
    assert grid_rotary_positions(30, 48) is grid_rotary_positions(30, 48)
    expected = get_vision_position_ids(torch.tensor([[1, 30, 48]]), 2)
    assert torch.equal(grid_rotary_positions(30, 48), expected)

    mixed = VisionLayout.build([(1, 2, 4), (1, 4, 4), (2, 2, 2)], torch.float32)
    assert (mixed.frames, mixed.length) == (4, 16)
    packed = torch.arange(8 + 16 + 8)
    padded = packed[mixed.gather].view(4, 16)
    assert torch.equal(padded[mixed.key_mask.view(4, 16) == 0], packed), "real slots hold every patch once, in order"
    assert torch.equal(padded.view(-1)[mixed.scatter], packed), "scatter undoes gather"
    assert mixed.key_mask.isinf().sum() == 16 * 4 - 32
    assert all(t.device.type == "cpu" for t in (mixed.positions, mixed.gather, mixed.scatter, mixed.key_mask))

    # A landscape and a portrait photo: one length, so no padding, each frame with its own positions.
    turned = VisionLayout.build([(1, 30, 48), (1, 48, 30), (1, 30, 48)], torch.float32)
    assert (turned.frames, turned.length) == (3, 1440) and turned.gather is None and turned.key_mask is None
    tables = [grid_rotary_positions(30, 48), grid_rotary_positions(48, 30), grid_rotary_positions(30, 48)]
    assert torch.equal(turned.positions, torch.cat(tables))


def test_decoding_a_prefix_then_a_suffix_with_its_keys_equals_one_pass(tiny):
    """The decoder takes earlier tokens' keys/values: how shared-prefix questions will reuse one image's prefix."""
    text_model = tiny.model.model.language_model
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False  # the second row is left-padded
    positions = (valid.cumsum(-1) - 1).clamp(min=0).expand(3, 2, 12)
    with torch.inference_mode():
        embeds = text_model.embed_tokens(ids)
        tables = forward.rotary_tables(text_model, embeds, positions)
        whole, _ = forward.decode(text_model, embeds, forward.causal_mask(valid, embeds.dtype), tables)
        first_mask = forward.causal_mask(valid[:, :8], embeds.dtype)
        first_rotary = rotary.Rotary(*(t[..., :8, :] for t in tables))
        head, past = forward.decode(text_model, embeds[:, :8], first_mask, first_rotary, keep_key_values=True)
        assert len(past) == len(text_model.layers) and past[0][0].shape[2] == 8
        tail, _ = forward.decode(
            text_model,
            embeds[:, 8:],
            forward.causal_mask(valid, embeds.dtype, past=8),
            rotary.Rotary(*(t[..., 8:, :] for t in tables)),
            past=past,
        )
    # Hidden states reach ~80 in the tiny model: 1e-4 is float32 rounding of attention over 8 vs 12 keys.
    torch.testing.assert_close(torch.cat([head, tail], dim=1)[valid], whole[valid], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("questions", [1, 4])
def test_the_lean_forward_traces_as_one_graph(tiny, questions):
    """No data-dependent Python either: dynamo captures the whole forward without a break, as CUDA graphs need.

    Traced, the rotary embedding takes its plain form (`rotary.rotate`), which rounds a multiply-add twice.
    """
    builder = PromptBuilder(tiny.tokenizer, PromptConfig() if questions == 1 else FOUR_QUESTIONS)
    scorer = Scorer(tiny, builder, "lean")
    with torch.inference_mode():
        inputs = scorer.collate(score_inputs(builder, [(756, 476), (756, 476), (320, 240)]))
        traced = torch.compile(forward.lean_logits, backend="eager", fullgraph=True)(tiny.model, inputs)
        eager = forward.lean_logits(tiny.model, inputs)
        torch.testing.assert_close(traced, eager, atol=5e-5, rtol=0)
        torch.testing.assert_close(traced.softmax(-1), eager.softmax(-1), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def fake_2b():
    """Qwen2-VL-2B's full architecture on fake tensors: no memory, no compute, and reading a value raises."""
    return qwen2_vl_2b(reduced=False)


def counts(loaded, forward_kind, sizes, max_pixels=307200, prompt=None):
    builder = PromptBuilder(loaded.tokenizer, prompt or PromptConfig())
    rows = score_inputs(builder, sizes, max_pixels)
    with on_fake_tensors(loaded):
        scorer = Scorer(loaded, builder, forward_kind)
        scorer.collate(rows)  # the host's caches (rotary positions per grid) filled, as in a run after its first batch
        return count_launch(scorer, rows)


def test_no_host_sync_and_no_op_per_image_in_the_lean_forward(fake_2b):
    """Fails if a sync (`.item()`, `.tolist()`, `nonzero`...) or a per-image loop comes back into the forward.

    On fake tensors any read of a device value raises, so reaching the end proves the forward never reads one.
    """
    seed_sized = [(756, 476)]
    few, many = counts(fake_2b, "lean", seed_sized * 4), counts(fake_2b, "lean", seed_sized * 16)
    assert few.host_syncs == many.host_syncs == 0
    assert few.vision_ops == many.vision_ops, "the vision tower's ops must not grow with the images of one grid"
    assert few.forward_ops == many.forward_ops and few.collate_ops == many.collate_ops
    assert many.vision_ops / 64 <= 15, "the issue's target: <= 15 ops per image in a batch of 64 seed-sized images"

    two_grids = [(756, 476), (640, 480)]
    mixed_few, mixed_many = counts(fake_2b, "lean", two_grids * 2), counts(fake_2b, "lean", two_grids * 8)
    assert mixed_few.host_syncs == mixed_many.host_syncs == 0
    assert mixed_few.vision_ops == mixed_many.vision_ops, "mixed grids: one attention call per block too"


def test_the_lean_forward_moves_half_the_bytes_in_memory_bound_kernels():
    """On a GPU the vision tower is memory-bound outside its matrix products (half the forward's time in elementwise
    kernels on an H100). Fails if the float32 rotary over whole vectors or the three-pass QuickGELU comes back:
    Qwen2-VL-2B at full size on fake tensors in bfloat16, bytes per seed-sized image, the same at any batch size.
    (RMSNorm is counted as a CPU decomposes it, transformers' form or ours alike; on a GPU ours is one kernel.)"""
    fake = qwen2_vl_2b(reduced=False, dtype=torch.bfloat16)
    one, many = counts(fake, "lean", [(756, 476)]), counts(fake, "lean", [(756, 476)] * 8)
    assert many.vision_memory_bytes / 8 <= 4.0e9, "3.79 GB per image (10.16 GB with whole-vector float32 rotary)"
    assert many.forward_memory_bytes / 8 <= 7.0e9, "6.74 GB per image (13.19 GB before)"
    assert one.forward_memory_bytes <= 1.02 * many.forward_memory_bytes / 8, "no growth per image in small batches"
    assert not {"aten.roll", "aten.sigmoid"} & set(many.memory_ops)
    assert many.host_syncs == 0


def test_memory_bytes_count_what_a_kernel_reads_and_writes():
    """The counter itself: views and allocations move nothing, a cast reads one dtype and writes another, a
    broadcast input counts once, an `out=` argument is written, not read, and matrix products are not counted."""
    x = torch.ones(100, 64, dtype=torch.bfloat16)
    table = torch.ones(64)
    with count_ops() as count:
        view = x.view(64, 100).t()[:10]
        assert view.numel() == 640
        torch.empty(10, 10)
        x.float()  # 6,400 elements: 2 bytes read, 4 written
        x * table  # x read (12,800 bytes), the table once (256), float32 written (25,600)
        out = torch.empty(100, 64)
        torch.mul(x, table, out=out)
        x @ x.t()
        rows = torch.nn.functional.embedding(torch.tensor([3, 5]), x)  # the index and 2 rows read, 2 rows written
        x.index_copy_(0, torch.tensor([7]), rows[:1])  # the index and one row read, one row written
        out.copy_(x)  # x read, out written
    assert dict(count.memory_bytes) == {
        "aten._to_copy": 6400 * 6,
        "aten.mul": 2 * (12800 + 256 + 25600),
        "aten.embedding": 16 + 2 * 256,
        "aten.index_copy_": 8 + 2 * 128,
        "aten.copy_": 12800 + 25600,
    }


def test_rotate_is_transformers_rotary_in_halves_and_keeps_the_layout(tiny):
    """`rotate` equals transformers' `x * cos + rotate_half(x) * sin` in the tables' dtype (float32 here, the vision
    tower's), cast back; a query and key taken out of a packed projection keep its layout (no copy in attention)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(6 * 50, 3, 4, 16, generator=generator).mul(30).view(6, 50, 3, 4, 16).permute(2, 0, 3, 1, 4)
    half = torch.randn(50, 8, generator=generator)
    cos, sin = torch.cat([half.cos()] * 2, -1), torch.cat([half.sin()] * 2, -1)
    halves = rotary.Rotary.of(cos[None, None], sin[None, None])
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1.0)):  # values reach ~100: ~1 ulp
        x = qkv.to(dtype)
        query, key = rotary.rotate(x[:2], halves, dtype).unbind(0)
        for image in range(6):  # transformers' vision rotary: (length, heads, dim) per image, float32 inside
            q, k = apply_rotary_pos_emb_vision(x[0, image].transpose(0, 1), x[1, image].transpose(0, 1), cos, sin)
            torch.testing.assert_close(query[image], q.transpose(0, 1), atol=tolerance, rtol=0)
            torch.testing.assert_close(key[image], k.transpose(0, 1), atol=tolerance, rtol=0)
        assert query.dtype == dtype
        order = sorted(range(5), key=lambda dim: -x[:2].stride(dim))
        out = rotary.rotate(x[:2], halves)
        assert sorted(range(5), key=lambda dim: -out.stride(dim)) == order, "the projection's layout is kept"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotate_with_16_bit_tables_is_transformers_rotary_bit_for_bit(dtype):
    """The decoder's tables are in the model's dtype: transformers rounds each product, then the sum; a fused
    multiply-add would round once and move bfloat16 results (up to 0.023 in P on the tiny model)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 3, 16, generator=generator).mul(30).to(dtype).transpose(1, 2)  # (rows, heads, length, dim)
    half = torch.randn(50, 8, generator=generator)
    cos, sin = torch.cat([half.cos()] * 2, -1).to(dtype), torch.cat([half.sin()] * 2, -1).to(dtype)
    rotated = rotary.rotate(x, rotary.Rotary.of(cos, sin))
    torch.testing.assert_close(rotated, x * cos + rotate_half(x) * sin, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vision_mlp_and_rms_norm_equal_transformers_modules(tiny, dtype):
    """QuickGELU as one SiLU (scalings in the matrix products) equals the module up to rounding (float16: the module
    itself); RMSNorm bit for bit on a CPU."""
    generator = torch.Generator().manual_seed(0)
    mlp = copy.deepcopy(tiny.model.model.visual.blocks[0].mlp).to(dtype)
    norm = copy.deepcopy(tiny.model.model.language_model.layers[0].input_layernorm).to(dtype)
    with torch.inference_mode():
        x = torch.randn(40, mlp.fc1.in_features, generator=generator).mul(3).to(dtype)
        expected = mlp(x)
        error = (forward.vision_mlp(mlp, x) - expected).abs().max()
        assert error <= expected.abs().max() * {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 0}[dtype]
        hidden = torch.randn(2, 7, norm.weight.shape[0], generator=generator).mul(5).to(dtype)
        torch.testing.assert_close(forward.rms_normed(norm, hidden), norm(hidden), atol=0, rtol=0)


def test_vision_mlp_in_float16_survives_activations_that_1_702_times_would_overflow(tiny):
    """float16 tops out at 65,504: 1.702 h overflows above 38,486, where transformers' h * sigmoid(1.702 h) is still h.
    Scaled inside fc1, that was inf and then NaN for the whole row; float16 runs the module."""
    mlp = copy.deepcopy(tiny.model.model.visual.blocks[0].mlp).to(torch.float16)
    with torch.inference_mode():
        mlp.fc1.weight.zero_()
        mlp.fc1.bias.fill_(40000.0)
        x = torch.ones(3, mlp.fc1.in_features, dtype=torch.float16)
        got = forward.vision_mlp(mlp, x)
        assert not got.isnan().any(), "inf - inf in fc2 made NaN of the whole row"
        torch.testing.assert_close(got, mlp(x), atol=0, rtol=0)


FOUR_QUESTIONS = PromptConfig(
    questions={
        "text": 'Is the image related to "{text}"? Y or N',
        "cat": "Is there a cat? Y or N",
        "kind": {"question": "A photo (A), a drawing (B) or a chart (C)?", "answers": ["A", "B", "C"]},
        "count": {"question": "How many people: 0, 1, 2 or 3?", "answers": ["0", "1", "2", "3"]},
    }
)


def test_several_questions_add_no_host_sync_and_no_op(fake_2b):
    """The multi-question forward is the same graph: no sync, and no op per question or per image."""
    seed_sized = [(756, 476)]
    one = counts(fake_2b, "lean", seed_sized * 4)
    few = counts(fake_2b, "lean", seed_sized * 4, prompt=FOUR_QUESTIONS)
    many = counts(fake_2b, "lean", seed_sized * 16, prompt=FOUR_QUESTIONS)
    assert few.host_syncs == many.host_syncs == 0
    assert few.forward_ops == many.forward_ops == one.forward_ops, "questions cost no ops: one graph for any number"
    assert few.vision_ops == many.vision_ops == one.vision_ops
    two_grids = [(756, 476), (640, 480)] * 4
    mixed = counts(fake_2b, "lean", two_grids, prompt=FOUR_QUESTIONS)
    assert mixed.host_syncs == 0 and mixed.forward_ops == counts(fake_2b, "lean", two_grids).forward_ops


def test_one_question_mask_is_the_causal_mask():
    """With one question after the prefix, `question_mask` sees exactly what `causal_mask` sees: today's forward."""
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    segments = torch.where(valid, 0, -1)
    segments[:, 4:] = 1
    torch.testing.assert_close(
        forward.question_mask(segments, torch.float32), forward.causal_mask(valid, torch.float32), atol=0, rtol=0
    )
    segments[1, 5] = 2  # a second question: it sees the prefix and itself, not the first question
    allowed = forward.question_mask(segments, torch.float32)[1, 0] == 0
    assert allowed[5].tolist() == [True, True, True, True, False, True]
    assert allowed[4].tolist() == [True, True, True, True, True, False]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_a_kernel_that_cannot_run_leaves_the_rotary_to_pytorch(caplog):
    """Asked for a GPU the machine lacks (Triton, where installed, then fails as the check moves its tensors there):
    no error, False (so `rotate` keeps PyTorch's ops); asked again, the answer is remembered."""
    first_gpu = torch.device("cuda", 0)
    rotary.kernel_checked.cache_clear()
    assert not rotary.kernel_runs(first_gpu, 8, torch.bfloat16, torch.bfloat16)
    assert rotary.kernel_checked.cache_info().currsize == 1
    assert not rotary.kernel_runs(first_gpu, 8, torch.bfloat16, torch.bfloat16)
    assert rotary.kernel_checked.cache_info().hits == 1
    assert not rotary.kernel_runs(torch.device("cuda"), 8, torch.bfloat16, torch.bfloat16)  # no GPU to be current
    if importlib.util.find_spec("triton") is not None:
        assert "PyTorch's ops rotate instead" in caplog.text


def test_the_patch_embedding_as_a_product_equals_the_convolution(tiny):
    """On a GPU the lean forward's patch embedding is one matrix product (cuDNN's convolution took 25x as long on
    an H100): equal to the module's convolution within float32 rounding, both near float64. A CPU keeps the module;
    other convolutions are not products."""
    patch_embed = tiny.model.model.visual.patch_embed
    pixels = torch.randn(300, patch_embed.proj.weight[0].numel(), generator=torch.Generator().manual_seed(0))
    assert forward.is_patch_product(patch_embed, pixels)
    with torch.inference_mode():
        convolved = patch_embed(pixels)
        product = forward.patch_product(patch_embed.proj, pixels)
        exact = copy.deepcopy(patch_embed).double()(pixels.double())
        assert torch.equal(forward.patch_embedded(patch_embed, pixels), convolved), "a CPU runs the module"
    scale = float(exact.abs().max())
    torch.testing.assert_close(product.double(), exact, atol=1e-6 * scale, rtol=0)
    torch.testing.assert_close(convolved.double(), exact, atol=1e-5 * scale, rtol=0)

    assert not forward.is_patch_product(patch_embed, pixels[:, :-1])  # rows that are not one patch
    for change in ("bias", "stride", "padding"):
        other = copy.deepcopy(patch_embed)
        conv = other.proj
        if change == "bias":
            conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels))
        elif change == "stride":
            conv.stride = (1, 1, 1)
        else:
            conv.padding = (1, 0, 0)
        assert not forward.is_patch_product(other, pixels), change
    assert not forward.is_patch_product(torch.nn.Identity(), pixels)


def test_counting_a_forward_whose_patch_embedding_calls_no_module(tiny, monkeypatch):
    """On a GPU the patch product calls no module, which the vision count started on: the count still runs (found
    by a review: it raised KeyError) and starts at the vision tower's rotary table."""
    monkeypatch.setattr(
        forward, "patch_embedded", lambda patch_embed, pixels: forward.patch_product(patch_embed.proj, pixels)
    )
    product = counts(tiny, "lean", [(64, 64)] * 2, MAX_PIXELS)
    monkeypatch.undo()
    module = counts(tiny, "lean", [(64, 64)] * 2, MAX_PIXELS)
    assert product.host_syncs == 0 and 0 < product.vision_ops < module.vision_ops


def test_the_counter_sees_transformers_syncs_and_per_image_ops(tiny):
    """The detector itself: transformers' forward syncs in every vision block and grows with the images."""
    few, many = counts(tiny, "transformers", [(64, 64)] * 2, MAX_PIXELS), counts(tiny, "transformers", [(64, 64)] * 4)
    assert few.host_syncs > tiny.model.config.vision_config.depth
    assert few.sync_ops.get("Tensor.tolist", 0) >= tiny.model.config.vision_config.depth
    assert many.vision_ops > few.vision_ops
    with count_ops() as count:
        torch.tensor([3, 0, 1]).nonzero()
        torch.tensor(2.0).item()
    assert dict(count.syncs) == {"aten.nonzero": 1, "aten._local_scalar_dense": 1}


def test_fake_tensor_counts_equal_real_counts():
    """Counting on fake tensors (how the bench counts the full-size model) sees exactly the ops of a real forward."""
    real = qwen2_vl_2b(reduced=True)
    fake = qwen2_vl_2b(reduced=False)
    sizes = [(64, 64), (64, 64), (100, 60)]
    on_real, on_fake = counts(real, "lean", sizes, MAX_PIXELS), counts(fake, "lean", sizes, MAX_PIXELS)
    # (collate's host-side op count varies with the cache of rotary tables: which run built them first)
    assert (on_real.vision_ops, on_real.forward_ops, on_real.host_syncs) == (
        on_fake.vision_ops,
        on_fake.forward_ops,
        on_fake.host_syncs,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lean_forward_does_not_sync_a_gpu(tiny):
    from annotator.models import load_model

    loaded = load_model(tiny.name, None, "bfloat16", "cuda", "sdpa")
    builder = PromptBuilder(loaded.tokenizer, PromptConfig())
    rows = score_inputs(builder, SIZES)
    rotary.kernel_checked.cache_clear()  # (another test's scorer may have checked this model's kernel already)
    scorer = Scorer(loaded, builder, "lean")
    checked = rotary.kernel_checked.cache_info().currsize
    if importlib.util.find_spec("triton") is not None:  # the Triton rotary, built and checked as the scorer loads
        assert checked == 1
        assert rotary.kernel_runs(loaded.device, loaded.model.model.visual.blocks[0].attn.head_dim, *[loaded.dtype] * 2)
    scorer.score(rows)  # warm-up: first calls allocate and load kernels
    assert rotary.kernel_checked.cache_info().currsize == checked, "the forward's kernels were all checked at load"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        wait = scorer.launch(rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lean = np.array([s.prob for s in wait()])
    # bfloat16 is not transformers' bit pattern (QuickGELU rounds once where transformers rounds three times): both
    # are compared with float32, where the two forwards agree. (Not with cuDNN's TF32: transformers' patch
    # embedding is a convolution that cuDNN runs in TF32 by default, the lean one a float32 matrix product.)
    transformers = np.array([s.prob for s in Scorer(loaded, builder, "transformers").score(rows)])
    exact = load_model(tiny.name, None, "float32", "cuda", "sdpa")
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        full = np.array([s.prob for s in Scorer(exact, builder, "lean").score(rows)])
        reference = np.array([s.prob for s in Scorer(exact, builder, "transformers").score(rows)])
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    np.testing.assert_allclose(full, reference, atol=1e-5)
    assert np.abs(lean - full).max() <= 2 * np.abs(transformers - full).max() + 0.01
