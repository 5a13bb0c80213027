"""The Qwen2-VL chat prompt as token ids, built from the tokenizer alone (no processor, no torchvision)."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import normalizers

from annotator.batching import MERGE_SIZE
from annotator.errors import AnnotatorError
from annotator.questions import Question, resolve_questions
from annotator.recipe import PromptConfig, Recipe

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


@dataclass(frozen=True, slots=True)
class TextTokens:
    """Each question's tokens for one row, in the recipe's order (the row's text put in), or why there are none."""

    ids: tuple[tuple[int, ...], ...] = ()
    truncated: bool = False
    error: str | None = None


class PromptBuilder:
    """Builds `system, user(image + question), assistant` sequences exactly as the chat template does.

    The template's special tokens split the text, so a row's sequence is a fixed prefix, one `<|image_pad|>` per
    merged patch, `<|vision_end|>`, the question's tokens and a fixed tail. With several questions the image and
    everything before it are shared: the row's sequence is that prefix followed by each question and its tail in
    turn, and the questions attend to the prefix but not to each other (`forward.question_mask`).
    """

    def __init__(
        self,
        tokenizer,
        prompt: PromptConfig,
        questions: Sequence[Question] | None = None,
        check_answers: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer
        self.prompt = prompt
        self.questions = list(questions if questions is not None else resolve_questions(prompt))
        self.image_pad_id = self._special_id(IMAGE_PAD)
        self.vision_end_id = self._special_id(VISION_END)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.prefix_ids = self._encode(
            f"<|im_start|>system\n{prompt.system}<|im_end|>\n<|im_start|>user\n{VISION_START}"
        )
        self.tail_ids = self._encode("<|im_end|>\n<|im_start|>assistant\n")
        # Unchecked (and unknown) only where `annotate plan` counts tokens with a stand-in tokenizer.
        self.answer_ids = [self._answer_ids(q) for q in self.questions] if check_answers else []
        # (head, rest) around `{text}` for questions that use the text; the ids of those that do not, once.
        self.templates = [tuple(q.text.split("{text}", 1)) if "{text}" in q.text else None for q in self.questions]
        self.uses_text = any(t is not None for t in self.templates)
        fixed = [q.text for q, t in zip(self.questions, self.templates, strict=True) if t is None]
        encoded = iter(self._encode_many(fixed))
        self.fixed_ids = [tuple(next(encoded)) if t is None else None for t in self.templates]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise AnnotatorError(f"The tokenizer has no {token} token: this is not a Qwen2-VL tokenizer.")
        return token_id

    def _answer_ids(self, question: Question) -> tuple[int, ...]:
        ids = []
        for index, answer in enumerate(question.answers):
            tokens = self._encode(answer)
            if len(tokens) != 1:
                raise AnnotatorError(
                    f"`{answer_key(self.prompt, question, index)}` = {answer!r} is {len(tokens)} tokens for this "
                    "tokenizer; the score is read from one token, so choose an answer that is a single token (the "
                    "default Y/N are; so are most single letters and digits)."
                )
            ids.append(tokens[0])
        if len(set(ids)) < len(ids):
            raise AnnotatorError(
                f"The answers {list(question.answers)!r} of `{question_key(question)}` are not all different tokens "
                "for this tokenizer, so their probabilities cannot be told apart. Choose answers that differ."
            )
        return tuple(ids)

    def question_tokens(self, texts: Sequence[str | None]) -> list[TextTokens]:
        """Tokenize every question for each row's text, truncating the text to `max_text_tokens`.

        Each question is tokenized whole, all in one batch call: the template's head and tail cannot be tokenized
        apart from the text, since the pre-tokenizer joins the seed's `"` with the caption's first word. A text is
        also tokenized alone, to truncate it, only when it is long enough to reach the limit. Questions without
        `{text}` are tokenized once; when no question uses the text, a row needs none.
        """
        if not self.uses_text:
            return [TextTokens(ids=tuple(self.fixed_ids))] * len(texts)
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
        templates = [t for t in self.templates if t is not None]
        encoded = iter(self._encode_many([h + cut.get(i, texts[i]) + r for i in usable for h, r in templates]))
        for i in usable:
            ids = tuple(tuple(next(encoded)) if fixed is None else fixed for fixed in self.fixed_ids)
            results[i] = TextTokens(ids=ids, truncated=i in cut)
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

    def shared_length(self, image_tokens: int) -> int:
        """Tokens every question of a row shares: the prefix, the image and `<|vision_end|>`."""
        return len(self.prefix_ids) + image_tokens + 1

    def suffix_lengths(self, text: TextTokens) -> list[int]:
        """Tokens of each question after the shared part: the question and the assistant tail."""
        return [len(ids) + len(self.tail_ids) for ids in text.ids]

    def sequence_length(self, image_tokens: int, text: TextTokens) -> int:
        """Tokens of a row's sequence: what one forward over it computes (the prefix once, each question once)."""
        return self.shared_length(image_tokens) + sum(self.suffix_lengths(text))

    def sequence(self, image_tokens: int, text: TextTokens, question: int | None = None) -> list[int]:
        """The token ids of one row: every question after the shared prefix, or only `question`'s (a plain prompt)."""
        questions = text.ids if question is None else [text.ids[question]]
        return [
            *self.prefix_ids,
            *([self.image_pad_id] * image_tokens),
            self.vision_end_id,
            *(token for ids in questions for token in (*ids, *self.tail_ids)),
        ]


def check_prompt(recipe: Recipe) -> PromptBuilder | None:
    """Build the recipe's prompt with the model's tokenizer alone, before any model loads: an answer that is not
    one token is an `AnnotatorError` now, not after minutes of loading. None when the tokenizer cannot be had
    without downloading the model (loading the model then says why)."""
    from annotator.models import load_tokenizer

    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision)
    return None if tokenizer is None else PromptBuilder(tokenizer, recipe.prompt, recipe.questions)


def question_key(question: Question) -> str:
    """Where the recipe sets a question: `prompt.question` or `prompt.questions.<name>`."""
    return f"prompt.questions.{question.name}" if question.name else "prompt.question"


def answer_key(prompt: PromptConfig, question: Question, index: int) -> str:
    """The recipe key that sets a question's `index`-th answer."""
    entry = (prompt.questions or {}).get(question.name)
    own = entry is not None
    if not question.yes_no:
        return f"{question_key(question)}.answers" if own and entry.answers is not None else "prompt.answers"
    field = ("positive", "negative")[index]
    return f"{question_key(question)}.{field}" if own and getattr(entry, field) is not None else f"prompt.{field}"


def rope_positions(prefix_len: int, grid: Sequence[int], suffix_len: int, branches: Sequence[int] = ()) -> np.ndarray:
    """Qwen2-VL's 3-D (temporal, height, width) positions of `prefix, image, suffix, branches...`, shape (3, length).

    Text advances all three axes together; the image's merged patches take (t, row, column) offsets
    from the text before it, and the text after the image resumes at max(rows, columns) past its start.
    Each of `branches` (the questions sharing one prefix) continues from the end of the suffix, each as if it
    were the only one: its positions are those it would have in a sequence of its own.
    """
    t, h, w = grid[0], grid[1] // MERGE_SIZE, grid[2] // MERGE_SIZE
    prefix = np.broadcast_to(np.arange(prefix_len), (3, prefix_len))
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + prefix_len
    start = prefix_len + max(h, w)
    suffix = np.broadcast_to(np.arange(start, start + suffix_len), (3, suffix_len))
    end = start + suffix_len
    after = [np.broadcast_to(np.arange(end, end + n), (3, n)) for n in branches]
    return np.concatenate([prefix, image, suffix, *after], axis=1).astype(np.int64)
