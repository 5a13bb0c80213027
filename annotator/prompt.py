"""The Qwen2-VL chat prompt as token ids, built from the tokenizer alone (no processor, no torchvision)."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import normalizers

from annotator.batching import MERGE_SIZE
from annotator.errors import AnnotatorError
from annotator.recipe import PromptConfig

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


@dataclass(frozen=True, slots=True)
class TextTokens:
    """The question's tokens for one row, or why there are none."""

    ids: tuple[int, ...] = ()
    truncated: bool = False
    error: str | None = None


class PromptBuilder:
    """Builds `system, user(image + question), assistant` sequences exactly as the chat template does.

    The template's special tokens split the text, so the sequence is a fixed prefix, one
    `<|image_pad|>` per merged patch, `<|vision_end|>`, the question's tokens and a fixed tail.
    """

    def __init__(self, tokenizer, prompt: PromptConfig) -> None:
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer
        self.prompt = prompt
        self.image_pad_id = self._special_id(IMAGE_PAD)
        self.vision_end_id = self._special_id(VISION_END)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.prefix_ids = self._encode(
            f"<|im_start|>system\n{prompt.system}<|im_end|>\n<|im_start|>user\n{VISION_START}"
        )
        self.tail_ids = self._encode("<|im_end|>\n<|im_start|>assistant\n")
        self.positive_id = self._answer_id(prompt.positive, "prompt.positive")
        self.negative_id = self._answer_id(prompt.negative, "prompt.negative")
        self.question_head, self.question_rest = prompt.question.split("{text}", 1)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise AnnotatorError(f"The tokenizer has no {token} token: this is not a Qwen2-VL tokenizer.")
        return token_id

    def _answer_id(self, answer: str, key: str) -> int:
        ids = self._encode(answer)
        if len(ids) != 1:
            raise AnnotatorError(
                f"`{key}` = {answer!r} is {len(ids)} tokens for this tokenizer; the score is read from one "
                f"token, so choose an answer that is a single token (the default Y/N are)."
            )
        return ids[0]

    def question_tokens(self, texts: Sequence[str | None]) -> list[TextTokens]:
        """Tokenize the question for each row's text, truncating the text to `max_text_tokens`.

        Each question is tokenized whole, in one batch call: the template's head and tail cannot be tokenized
        apart from the text, since the pre-tokenizer joins the seed's `"` with the caption's first word. A text is
        also tokenized alone, to truncate it, only when it is long enough to reach the limit.
        """
        limit = self.prompt.max_text_tokens
        results = [TextTokens(error="text: missing (null)" if t is None else "text: empty") for t in texts]
        usable = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        long = [i for i in usable if self._most_tokens(texts[i]) > limit]
        cut = {
            i: self.tokenizer.decode(ids[:limit])
            for i, ids in zip(long, self._encode_many([texts[i] for i in long]), strict=True)
            if len(ids) > limit
        }
        # Literal substitution: braces in captions are text, never template fields.
        questions = [self.question_head + cut.get(i, texts[i]) + self.question_rest for i in usable]
        for i, ids in zip(usable, self._encode_many(questions), strict=True):
            results[i] = TextTokens(ids=tuple(ids), truncated=i in cut)
        return results

    def _most_tokens(self, text: str) -> int:
        """An upper bound of the text's token count: every token holds at least one byte of the normalized
        text, and a pre-tokenizer may add one prefix space."""
        normalizer = self.backend.normalizer
        if isinstance(normalizer, normalizers.NFC):
            text = text if text.isascii() else unicodedata.normalize("NFC", text)
        elif normalizer is not None:
            text = normalizer.normalize_str(text)
        return len(text.encode("utf-8")) + 1

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids as `tokenizer(texts, add_special_tokens=False, split_special_tokens=True)` gives them.

        The Rust tokenizer is called directly: it encodes the batch in parallel without the GIL, and transformers'
        per-row Python conversion (offsets, masks, a dict per row) is skipped.
        split_special_tokens: "<|image_pad|>" written in a caption is text; as a real token it would not match the
        image features and fail the whole batch's forward pass.
        """
        if not texts:
            return []
        backend = self.backend
        if backend.padding is not None:
            backend.no_padding()
        if backend.truncation is not None:
            backend.no_truncation()
        backend.encode_special_tokens = True
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def sequence_length(self, image_tokens: int, text: TextTokens) -> int:
        return len(self.prefix_ids) + image_tokens + 1 + len(text.ids) + len(self.tail_ids)

    def sequence(self, image_tokens: int, text: TextTokens) -> list[int]:
        """The full token ids of one row."""
        return [
            *self.prefix_ids,
            *([self.image_pad_id] * image_tokens),
            self.vision_end_id,
            *text.ids,
            *self.tail_ids,
        ]


def rope_positions(prefix_len: int, grid: Sequence[int], suffix_len: int) -> np.ndarray:
    """Qwen2-VL's 3-D (temporal, height, width) positions of `prefix, image, suffix`, shape (3, length).

    Text advances all three axes together; the image's merged patches take (t, row, column) offsets
    from the text before it, and the text after the image resumes at max(rows, columns) past its start.
    """
    t, h, w = grid[0], grid[1] // MERGE_SIZE, grid[2] // MERGE_SIZE
    prefix = np.broadcast_to(np.arange(prefix_len), (3, prefix_len))
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + prefix_len
    start = prefix_len + max(h, w)
    suffix = np.broadcast_to(np.arange(start, start + suffix_len), (3, suffix_len))
    return np.concatenate([prefix, image, suffix], axis=1).astype(np.int64)
