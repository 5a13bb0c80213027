"""Scoring: batched and bucketed results equal one-at-a-time results, and both equal the model's own path."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from annotator.batching import grid_thw, plan_window
from annotator.images import ImageRef, decode_resized
from annotator.prompt import PromptBuilder
from annotator.recipe import PromptConfig
from annotator.scoring import ScoreInput, Scorer, launch_splitting_on_oom
from annotator.sources import RowInput
from tests.conftest import CAPTIONS, MIXED_SIZES, jpeg_bytes

MIN_PIXELS, MAX_PIXELS = 3136, 56 * 56 * 4
# Three kinds of question: one about the row's text, one without it, one choosing between three answers.
QUESTIONS = {
    "text": 'Is the image related to "{text}"? Answer Y or N.',
    "cat": "Is there a cat in this image? Answer Y or N.",
    "kind": {"question": "Is this a photo (A), a drawing (B) or a chart (C)?", "answers": ["A", "B", "C"]},
}
COLUMNS = {
    "text": ("prob_text", "label_text", "answer_mass_text"),
    "cat": ("prob_cat", "label_cat", "answer_mass_cat"),
    "kind": ("probs_kind", "answer_kind", "answer_mass_kind"),
}


@pytest.fixture(scope="module")
def rows():
    images = [jpeg_bytes(w, h, seed=i) for i, (w, h) in enumerate(MIXED_SIZES * 2)]
    return [RowInput(ImageRef(data=d), c, None) for d, c in zip(images, CAPTIONS + CAPTIONS[::-1], strict=True)]


def score_rows(tiny, rows, max_batch_tokens, max_batch_size):
    builder = PromptBuilder(tiny.tokenizer, PromptConfig())
    scorer = Scorer(tiny, builder)
    texts = builder.question_tokens([r.text for r in rows])
    plan = plan_window(rows, texts, builder, MIN_PIXELS, MAX_PIXELS, 10**9, max_batch_tokens, max_batch_size)
    probs, masses = [None] * len(rows), [None] * len(rows)
    for batch in plan.batches:
        inputs = [ScoreInput(decode_resized(r.image, r.resized, 10**9), r.grid, r.text) for r in batch]
        for row, score in zip(batch, scorer.score(inputs), strict=True):
            probs[row.position], masses[row.position] = score.prob, score.answer_mass
    return np.array(probs), np.array(masses), plan


def test_batched_equals_one_at_a_time(tiny, rows):
    single_p, single_m, single_plan = score_rows(tiny, rows, max_batch_tokens=10**6, max_batch_size=1)
    batched_p, batched_m, batched_plan = score_rows(tiny, rows, max_batch_tokens=2000, max_batch_size=8)
    assert len(single_plan.batches) == len(rows)
    assert any(len(b) > 1 for b in batched_plan.batches), "the batched run must really batch"
    assert len({len(r.text.ids[0]) for b in batched_plan.batches for r in b}) > 1, "texts of several lengths"
    assert len({r.grid for b in batched_plan.batches for r in b}) > 3, "images of several sizes"
    assert single_p.std() > 0.05, "the tiny model's answers must depend on the input, or equality proves nothing"
    np.testing.assert_allclose(batched_p, single_p, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched_m, single_m, atol=1e-6, rtol=1e-4)
    assert ((batched_p >= 0) & (batched_p <= 1)).all()
    assert ((batched_m > 0) & (batched_m <= 1)).all()


def test_score_equals_the_models_own_processor_and_rope_path(tiny):
    """Reference: transformers' image processor, the model's own 3-D positions, full logits."""
    builder = PromptBuilder(tiny.tokenizer, PromptConfig())
    data = jpeg_bytes(756, 476, seed=3)
    text = builder.question_tokens(["a cat"])[0]
    grid = grid_thw(476, 756, MIN_PIXELS, MAX_PIXELS)
    ours = Scorer(tiny, builder).score(
        [ScoreInput(decode_resized(ImageRef(data=data), (grid[1] * 14, grid[2] * 14), 10**9, draft=False), grid, text)]
    )[0]

    processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    pixels = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
    ids = torch.tensor([builder.sequence(grid[1] * grid[2] // 4, text)])
    with torch.no_grad():
        logits = tiny.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == builder.image_pad_id).long(),
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            use_cache=False,
        ).logits[0, -1]
    probs = logits.softmax(-1)
    y, n = (probs[i].item() for i in builder.answer_ids[0])
    assert ours.prob == pytest.approx(y / (y + n), abs=1e-5)
    assert ours.answer_mass == pytest.approx(y + n, rel=1e-4)


@pytest.mark.parametrize("prompt", [PromptConfig(), PromptConfig(questions=QUESTIONS)], ids=["one", "several"])
def test_out_of_memory_splits_the_batch_and_keeps_every_row(tiny, rows, prompt):
    builder = PromptBuilder(tiny.tokenizer, prompt)
    scorer = Scorer(tiny, builder)
    texts = builder.question_tokens([r.text for r in rows[:6]])
    plan = plan_window(rows[:6], texts, builder, MIN_PIXELS, MAX_PIXELS, 10**9, 10**6, 6)
    (batch,) = plan.batches
    inputs = [ScoreInput(decode_resized(r.image, r.resized, 10**9), r.grid, r.text) for r in batch]
    expected = scorer.score(inputs)

    def fail_when_large(batch_size: int) -> None:
        if batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    scorer.forward_hook = fail_when_large
    splits = []
    got = launch_splitting_on_oom(scorer, inputs, lambda: splits.append(1))()
    assert len(got) == len(inputs) and splits
    for q in range(len(builder.questions)):
        np.testing.assert_allclose([s.probs[q] for s in got], [s.probs[q] for s in expected], atol=1e-5)


def test_a_run_with_out_of_memory_batches_keeps_every_row(tmp_path, mixed_parquet, monkeypatch):
    from typer.testing import CliRunner

    from annotator.cli import app
    from annotator.scoring import Scorer
    from tests.conftest import read_output, write_recipe

    def run(name: str):
        recipe = write_recipe(tmp_path / f"{name}.yaml", mixed_parquet, tmp_path / name, batching={"window": 16})
        result = CliRunner().invoke(app, ["run", str(recipe), "--no-progress"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return read_output(tmp_path / name)

    expected = run("normal")
    original = Scorer.collate

    def collate_with_little_memory(self, rows):
        if len(rows) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, rows)

    monkeypatch.setattr(Scorer, "collate", collate_with_little_memory)
    got = run("oom")
    assert got.column("row_id").to_pylist() == list(range(16))
    assert got.column("error").null_count == 16
    np.testing.assert_allclose(got.column("prob").to_pylist(), expected.column("prob").to_pylist(), atol=1e-5)


def test_jpeg_draft_off_scores_the_full_decode(tmp_path, tiny):
    """`model.jpeg_draft: false` gives exactly the score of a full decode; the default draft path is close."""
    from typer.testing import CliRunner

    from annotator.cli import app
    from tests.conftest import read_output, write_dataset, write_recipe

    images = [jpeg_bytes(1600, 1200, seed=s) for s in range(3)]
    parquet = write_dataset(tmp_path / "big.parquet", images, ["a cat", "a dog", "coffee"])
    probs = {}
    for draft in (True, False):
        out = tmp_path / f"draft-{draft}"
        recipe = write_recipe(tmp_path / f"{draft}.yaml", parquet, out, model={"jpeg_draft": draft})
        assert CliRunner().invoke(app, ["run", str(recipe), "--no-progress"]).exit_code == 0
        probs[draft] = np.array(read_output(out).column("prob").to_pylist())

    builder = PromptBuilder(tiny.tokenizer, PromptConfig())
    texts = builder.question_tokens(["a cat", "a dog", "coffee"])
    grid = grid_thw(1200, 1600, MIN_PIXELS, MAX_PIXELS)
    full = [
        ScoreInput(decode_resized(ImageRef(data=d), (grid[1] * 14, grid[2] * 14), 10**9, draft=False), grid, t)
        for d, t in zip(images, texts, strict=True)
    ]
    expected = np.array([Scorer(tiny, builder).score([row])[0].prob for row in full])
    np.testing.assert_allclose(probs[False], expected, atol=1e-5)
    assert not np.array_equal(probs[True], probs[False]), "the default decodes large JPEGs in draft mode"
    np.testing.assert_allclose(probs[True], probs[False], atol=0.1)


def test_a_lean_run_equals_a_transformers_run(tmp_path, mixed_parquet):
    """`model.forward` changes how the forward runs, not what it gives; so resume may switch it."""
    import json

    from typer.testing import CliRunner

    from annotator.cli import app
    from tests.conftest import read_output, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out", batching={"max_batch_size": 8})
    outputs, fingerprints = {}, set()
    for forward in ("lean", "transformers"):
        out = tmp_path / forward
        args = ["run", str(recipe), "--no-progress", "--set", f"model.forward={forward}", "--set", f"output.dir={out}"]
        result = CliRunner().invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs[forward] = read_output(out)
        fingerprints.add(json.loads((out / "manifest.json").read_text())["result_fingerprint"])
    lean, reference = outputs["lean"], outputs["transformers"]
    assert lean.column("error").null_count == reference.column("error").null_count == 16
    assert np.std(reference.column("prob").to_pylist()) > 0.05, "answers must vary, or equality proves nothing"
    for column in ("prob", "answer_mass"):
        np.testing.assert_allclose(lean.column(column).to_pylist(), reference.column(column).to_pylist(), atol=1e-5)
    assert len(fingerprints) == 1


def test_each_question_of_a_run_equals_its_own_single_question_run(tmp_path, mixed_parquet):
    """`annotate run` with three questions, and once per question: mixed image sizes, batched and bucketed."""
    import json

    from typer.testing import CliRunner

    from annotator.cli import app
    from tests.conftest import journals, read_output, write_recipe

    def run(name: str, prompt: dict, output: dict | None = None):
        batching = {"window": 16, "max_batch_size": 5, "max_batch_tokens": 1200}
        path = write_recipe(
            tmp_path / f"{name}.yaml",
            mixed_parquet,
            tmp_path / name,
            prompt=prompt,
            batching=batching,
            output=output or {},
        )
        result = CliRunner().invoke(app, ["run", str(path), "--no-progress"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        journal = [line for path in journals(tmp_path / name) for line in path.read_text().splitlines()]
        padded = sum(json.loads(line)["padded_tokens"] > json.loads(line)["real_tokens"] for line in journal)
        assert padded, "rows of several lengths must share batches"
        return read_output(tmp_path / name)

    together = run("together", {"questions": QUESTIONS}, {"thresholds": {"cat": 0.7}})
    assert together.column("error").null_count == 16
    for name, entry in QUESTIONS.items():
        alone = run(name, {"questions": {name: entry}}, {"thresholds": {"cat": 0.7}} if name == "cat" else {})
        first, decided, mass = COLUMNS[name]
        got, want = np.array(together.column(first).to_pylist()), np.array(alone.column(first).to_pylist())
        assert got.std() > 0.05, f"{name}: answers must vary, or equality proves nothing"
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(together.column(mass).to_pylist(), alone.column(mass).to_pylist(), rtol=1e-4)
        assert together.column(decided).to_pylist() == alone.column(decided).to_pylist()
    labels = np.array(together.column("prob_cat").to_pylist()) >= 0.7
    assert together.column("label_cat").to_pylist() == labels.tolist(), "each question has its own threshold"
    answers = np.array(["A", "B", "C"])[np.argmax(together.column("probs_kind").to_pylist(), axis=1)]
    assert together.column("answer_kind").to_pylist() == answers.tolist()

    # The question about the text, asked alone the way every run asked it before: today's columns, same values.
    plain = run("plain", {"question": QUESTIONS["text"]})
    np.testing.assert_allclose(together.column("prob_text").to_pylist(), plain.column("prob").to_pylist(), atol=1e-5)
    assert plain.column_names[-5:] == ["prob", "label", "answer_mass", "error", "error_kind"]


def test_k_answer_probs_are_the_softmax_of_those_tokens_logits_in_a_plain_forward(tiny, rows):
    """Per question and row: softmax over its answers' logits of transformers' own forward on a plain sequence."""
    questions = {**QUESTIONS, "digit": {"question": "Pick one: 1, 2, 3 or 4", "answers": ["1", "2", "3", "4"]}}
    builder = PromptBuilder(tiny.tokenizer, PromptConfig(questions=questions))
    texts = builder.question_tokens([r.text for r in rows[:5]])
    inputs = []
    for row, text in zip(rows[:5], texts, strict=True):
        grid = grid_thw(*reversed(Image.open(io.BytesIO(row.image.data)).size), MIN_PIXELS, MAX_PIXELS)
        inputs.append(ScoreInput(decode_resized(row.image, (grid[1] * 14, grid[2] * 14), 10**9), grid, text))
    lean = Scorer(tiny, builder, "lean").score(inputs)
    reference = Scorer(tiny, builder, "transformers").score(inputs)
    from annotator.scoring import patchify

    mean, std = torch.tensor(tiny.image_mean), torch.tensor(tiny.image_std)
    for row, got, via_scorer in zip(inputs, lean, reference, strict=True):
        pixels = patchify(torch.from_numpy(row.image), mean, std)
        for q, answer_ids in enumerate(builder.answer_ids):
            ids = torch.tensor([builder.sequence(row.grid[1] * row.grid[2] // 4, row.text, q)])
            with torch.no_grad():
                logits = tiny.model(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    mm_token_type_ids=(ids == builder.image_pad_id).long(),
                    pixel_values=pixels,
                    image_grid_thw=torch.tensor([row.grid]),
                    use_cache=False,
                ).logits[0, -1]
            chosen = logits[list(answer_ids)]
            np.testing.assert_allclose(got.probs[q], chosen.softmax(-1).numpy(), atol=1e-5)
            np.testing.assert_allclose(via_scorer.probs[q], chosen.softmax(-1).numpy(), atol=1e-5)
            mass = logits.softmax(-1)[list(answer_ids)].sum().item()
            assert got.masses[q] == pytest.approx(mass, rel=1e-4)
            assert len(got.probs[q]) == len(answer_ids)
    assert np.std([s.probs[3][0] for s in lean]) > 0.01, "answers must vary, or equality proves nothing"
