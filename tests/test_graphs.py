"""CUDA graphs of the lean forward: off on a CPU, padding to a length step changes no score, replays equal eager."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from annotator import graphs, scoring
from annotator.cli import app
from annotator.forward import LeanInputs
from annotator.graphs import shape_key, tensors, use_graphs, with_tensors
from annotator.prompt import PromptBuilder
from annotator.recipe import PromptConfig
from annotator.scoring import Scorer
from tests.conftest import CAPTIONS, jpeg_bytes, read_output, write_dataset, write_recipe
from tests.test_forward import score_inputs

ON_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
ONE_GRID = [(756, 476)] * 3
MIXED = [(756, 476), (320, 240), (100, 900), (500, 500)]


@pytest.mark.parametrize(
    ("setting", "forward", "device", "expected"),
    [
        ("on", "lean", "cpu", False),
        ("auto", "lean", "cpu", False),
        ("on", "transformers", "cuda", False),
        ("off", "lean", "cuda", False),
        ("on", "lean", "cuda", True),
        ("auto", "lean", "cuda", graphs.GRAPHS_WIN),
    ],
)
def test_graphs_apply_to_the_lean_forward_on_a_gpu_only(setting, forward, device, expected):
    assert use_graphs(setting, forward, torch.device(device)) is expected


def test_a_cpu_scorer_ignores_cuda_graphs(tiny):
    builder = PromptBuilder(tiny.tokenizer, PromptConfig())
    scorer = Scorer(tiny, builder, "lean", "on")
    assert scorer.graphs is None and scorer.length_step == 1
    rows = score_inputs(builder, MIXED)
    assert scorer.collate(rows).input_ids.shape == Scorer(tiny, builder, "lean", "off").collate(rows).input_ids.shape


def test_tensors_of_a_batch_round_trip_and_key_its_shapes(tiny):
    builder = PromptBuilder(tiny.tokenizer, PromptConfig())
    batch = Scorer(tiny, builder).collate(score_inputs(builder, MIXED))
    found = tensors(batch)
    assert all(isinstance(t, torch.Tensor) for t in found), "mixed grids: gather, scatter, key mask are set"
    copies = [t.clone() for t in found]
    rebuilt = with_tensors(batch, list(copies))
    assert isinstance(rebuilt, LeanInputs) and all(a is b for a, b in zip(tensors(rebuilt), copies, strict=True))
    assert rebuilt.vision.frames == batch.vision.frames and shape_key(rebuilt) == shape_key(batch)
    one_grid = Scorer(tiny, builder).collate(score_inputs(builder, ONE_GRID))
    assert len(tensors(one_grid)) == len(found) and sum(t is None for t in tensors(one_grid)) == 3
    assert shape_key(one_grid) != shape_key(batch)
    fewer = Scorer(tiny, builder).collate(score_inputs(builder, ONE_GRID[:2]))
    assert shape_key(fewer) != shape_key(one_grid), "rows are part of the shape"


@pytest.mark.parametrize("sizes", [ONE_GRID, MIXED], ids=["one-grid", "mixed-grids"])
def test_padding_batches_to_a_length_step_changes_no_score(tiny, sizes):
    """Graphs pad every batch to a multiple of LENGTH_STEP tokens; the extra left padding is invisible."""
    builder = PromptBuilder(tiny.tokenizer, PromptConfig())
    rows = score_inputs(builder, sizes)
    plain, padded = Scorer(tiny, builder), Scorer(tiny, builder)
    padded.length_step = graphs.LENGTH_STEP
    with torch.inference_mode():
        short, long = plain.collate(rows), padded.collate(rows)
        assert long.input_ids.shape[1] % graphs.LENGTH_STEP == 0 and long.input_ids.shape[1] > short.input_ids.shape[1]
        expected, got = plain.logits(short), padded.logits(long)
    assert expected[:, builder.answer_ids[0][0]].std() > 0.3, "answers must depend on the input"
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)


def _cuda_scorer(cuda_graphs: str, max_graphs: int = graphs.MAX_GRAPHS):
    from annotator.models import load_model

    loaded = load_model("tiny", None, "float32", "cuda", "sdpa")  # the session's tiny model (ANNOTATOR_CACHE)
    builder = PromptBuilder(loaded.tokenizer, PromptConfig())
    scorer = Scorer(loaded, builder, "lean", cuda_graphs)
    if scorer.graphs is not None:
        scorer.graphs.max_graphs = max_graphs
    return scorer, builder


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("sizes", [ONE_GRID, MIXED], ids=["one-grid", "mixed-grids"])
def test_replayed_graphs_equal_the_eager_forward_and_never_sync(sizes):
    scorer, builder = _cuda_scorer("on")
    eager = Scorer(scorer.loaded, builder, "lean", "off")
    eager.length_step = graphs.LENGTH_STEP  # the same shapes, run eagerly
    batches = [score_inputs(builder, sizes, seed=seed) for seed in range(4)]
    expected = [eager.score(rows) for rows in batches]
    got = [scorer.score(batches[0]), scorer.score(batches[1])]  # eager, then captured
    assert dict(scorer.graphs.counts) == {"eager": 1, "captured": 1, "replayed": 0}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        waits = [scorer.launch(rows) for rows in batches[2:]]  # replays: copies into static inputs, one launch
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got += [wait() for wait in waits]
    assert scorer.graphs.counts["replayed"] == 2
    for ours, reference in zip(got, expected, strict=True):
        np.testing.assert_allclose([s.prob for s in ours], [s.prob for s in reference], atol=1e-5)
    assert len({round(s.prob, 6) for scores in got for s in scores}) > len(sizes), "inputs differ, so must scores"


@pytest.mark.gpu
@needs_gpu
def test_shapes_beyond_the_graph_cap_run_eagerly():
    scorer, builder = _cuda_scorer("on", max_graphs=1)
    for sizes in (ONE_GRID, ONE_GRID, MIXED, MIXED, MIXED, ONE_GRID):
        scorer.score(score_inputs(builder, sizes))
    assert len(scorer.graphs.graphs) == 1
    assert dict(scorer.graphs.counts) == {"eager": 4, "captured": 1, "replayed": 1}


@pytest.mark.gpu
@needs_gpu
def test_a_run_with_graphs_equals_one_without(tmp_path, monkeypatch):
    """Same-sized images, so batch shapes recur and the run replays graphs; scores as without them."""
    made = []

    class Recorded(graphs.GraphedForward):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(scoring, "GraphedForward", Recorded)
    images = [jpeg_bytes(756, 476, seed=i) for i in range(32)]
    parquet = write_dataset(tmp_path / "in" / "same.parquet", images, CAPTIONS * 4)
    probs = {}
    for setting in ("on", "off"):
        out = tmp_path / setting
        model = {"device": "cuda", "dtype": "float32", "cuda_graphs": setting}
        recipe = write_recipe(tmp_path / f"{setting}.yaml", parquet, out, model=model, batching={"window": 32})
        result = CliRunner().invoke(app, ["run", str(recipe), "--no-progress"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        probs[setting] = np.array(read_output(out).column("prob").to_pylist(), dtype=np.float64)
    assert len(made) == 1 and made[0].counts["replayed"] >= 1, dict(made[0].counts)
    np.testing.assert_allclose(probs["on"], probs["off"], atol=1e-5)
