"""The token sequence, 3-D positions and pixel patches equal what transformers' own Qwen2-VL code builds."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from annotator.batching import grid_thw, image_token_count
from annotator.images import ImageRef, decode_resized, header_size
from annotator.prompt import PromptBuilder
from annotator.recipe import SEED_QUESTION, PromptConfig
from annotator.scoring import ScoreInput, Scorer, patchify
from tests.conftest import jpeg_bytes


def test_seed_question_is_exact():
    assert SEED_QUESTION == ('请回答以下问题，务必只能回复一个词 "Y"或 "N"：\n' + " " * 24 + '图片和"{text}"是否相关？')
    assert PromptConfig().question == SEED_QUESTION


def test_sequence_follows_the_chat_layout(tiny):
    builder = PromptBuilder(tiny.tokenizer, PromptConfig())
    grid = grid_thw(476, 756, 3136, 307200)
    text = builder.question_tokens(["a cat"])[0]
    ids = builder.sequence(image_token_count(grid), text)
    decoded = tiny.tokenizer.decode(ids)
    pad = "<|image_pad|>"
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|>{pad * 360}<|vision_end|>"
        + SEED_QUESTION.replace("{text}", "a cat")
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert decoded == expected
    assert ids.count(builder.image_pad_id) == 360 == 30 * 48 // 4
    assert len(ids) == builder.sequence_length(360, text)
    # The template's special tokens split the text, so the whole string tokenizes to the same ids.
    assert ids == tiny.tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_text_is_substituted_literally(tiny):
    builder = PromptBuilder(tiny.tokenizer, PromptConfig())
    braces, empty, blank, null = builder.question_tokens(["{text} {0} {", "", "  \n", None])
    assert tiny.tokenizer.decode(braces.ids) == SEED_QUESTION.replace("{text}", "{text} {0} {")
    assert not braces.truncated
    assert (empty.error, blank.error, null.error) == ("text: empty", "text: empty", "text: missing (null)")


def test_long_text_is_truncated_to_max_text_tokens(tiny):
    builder = PromptBuilder(tiny.tokenizer, PromptConfig(max_text_tokens=5))
    text = "caption " * 50
    (long,) = builder.question_tokens([text])
    kept = tiny.tokenizer.decode(tiny.tokenizer(text, add_special_tokens=False)["input_ids"][:5])
    assert long.truncated
    assert tiny.tokenizer.decode(long.ids) == SEED_QUESTION.replace("{text}", kept)


def test_multi_token_answer_is_rejected_at_start(tiny):
    from annotator.errors import AnnotatorError

    with pytest.raises(AnnotatorError, match="prompt.positive"):
        PromptBuilder(tiny.tokenizer, PromptConfig(positive="Yes, absolutely"))


@pytest.mark.parametrize(("width", "height"), [(756, 476), (97, 311), (1, 1), (640, 28)])
def test_header_grid_and_patches_equal_the_image_processor(width, height):
    data = jpeg_bytes(width, height, seed=width)
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=307200)
    expected = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="np")
    w, h = header_size(ImageRef(data=data), 10**9)
    grid = grid_thw(h, w, 3136, 307200)
    assert list(grid) == expected["image_grid_thw"][0].tolist()
    resized = decode_resized(ImageRef(data=data), (grid[1] * 14, grid[2] * 14), 10**9, draft=False)
    mean = torch.tensor(processor.image_mean)
    std = torch.tensor(processor.image_std)
    patches = patchify(torch.from_numpy(resized), mean, std).numpy()
    np.testing.assert_allclose(patches, expected["pixel_values"], atol=1e-5)


def test_positions_equal_get_rope_index_with_left_padding(tiny):
    builder = PromptBuilder(tiny.tokenizer, PromptConfig())
    scorer = Scorer(tiny, builder, "transformers")  # its batch is the kwargs of transformers' forward
    rows = []
    for (w, h), text in [
        ((756, 476), "a cat"),
        ((64, 300), "a much longer caption about many things"),
        ((30, 30), "x"),
    ]:
        grid = grid_thw(h, w, 3136, 56 * 56 * 4)
        image = np.zeros((grid[1] * 14, grid[2] * 14, 3), dtype=np.uint8)
        rows.append(ScoreInput(image, grid, builder.question_tokens([text])[0]))
    batch = scorer.collate(rows)
    assert (batch["attention_mask"][:, 0] == 0).any(), "rows of different lengths must be left padded"
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == builder.image_pad_id)
    expected, _ = tiny.model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert torch.equal(batch["position_ids"], expected)
