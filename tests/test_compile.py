"""`model.compile: on`: the lean forward's blocks and layers through torch.compile give transformers' scores, compile
once at load for every batch shape a run meets, and a setting that cannot work is a user error before any load."""

import copy
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from typer.testing import CliRunner

from annotator import compiling, forward
from annotator.cli import app
from annotator.prompt import PromptBuilder
from annotator.recipe import PromptConfig
from annotator.scoring import Scorer, patchify
from tests.conftest import REPO, read_output, write_recipe
from tests.test_forward import FOUR_QUESTIONS, SIZES, logits, score_inputs

runner = CliRunner()
needs_compiler = pytest.mark.skipif(
    shutil.which(compiling.cpp_compiler()) is None, reason="inductor needs a C++ compiler on a CPU"
)


@pytest.fixture(scope="module")
def compiled(tiny):
    """A compiling scorer (its warm-up compiles here, once per test process) and an eager one, Y/N."""
    builder = PromptBuilder(tiny.tokenizer, PromptConfig())
    return Scorer(tiny, builder, "lean", compile="on"), Scorer(tiny, builder, "lean", compile="off"), builder


@needs_compiler
@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([(756, 476)] * 5, id="one-grid"),
        pytest.param(SIZES + [(756, 476), (500, 500)], id="mixed-grids"),
        pytest.param([(756, 476), (476, 756)] * 3, id="one-area-two-grids"),
        pytest.param([(500, 500)], id="one-row"),
    ],
)
def test_the_compiled_forward_equals_transformers_forward(tiny, compiled, sizes):
    scorer, eager, builder = compiled
    assert scorer.regions is not None and eager.regions is None
    rows = score_inputs(builder, sizes)
    got, reference = logits(scorer, rows), logits(Scorer(tiny, builder, "transformers"), rows)
    if len(rows) > 1:
        assert reference[:, builder.answer_ids[0][0]].std() > 1, "answers must depend on the input"
    torch.testing.assert_close(got, reference, atol=5e-5, rtol=0)
    torch.testing.assert_close(got.softmax(-1), reference.softmax(-1), atol=1e-5, rtol=0)
    np.testing.assert_allclose([s.prob for s in scorer.score(rows)], [s.prob for s in eager.score(rows)], atol=1e-5)


@needs_compiler
def test_several_questions_and_answers_compiled_equal_eager(tiny, compiled):
    builder = PromptBuilder(tiny.tokenizer, FOUR_QUESTIONS)
    scorer, eager = Scorer(tiny, builder, "lean", compile="on"), Scorer(tiny, builder, "lean", compile="off")
    rows = score_inputs(builder, SIZES)
    torch.testing.assert_close(logits(scorer, rows).softmax(-1), logits(eager, rows).softmax(-1), atol=1e-5, rtol=0)


@needs_compiler
def test_the_warm_up_compiles_every_variant_a_run_meets(tiny, compiled):
    """After load, batches of any rows, grids and lengths reuse what the warm-up compiled: no compile mid-run."""
    _, eager, builder = compiled
    torch._dynamo.reset()  # forget what other tests compiled: only the warm-up compiles from here
    scorer = Scorer(tiny, builder, "lean", compile="on")
    graphs = counters["stats"]["unique_graphs"]
    rng = random.Random(0)
    for seed in range(12):
        count = rng.randint(1, 9)
        one_grid = rng.random() < 0.5
        sizes = [rng.choice(SIZES)] * count if one_grid else [rng.choice(SIZES) for _ in range(count)]
        rows = score_inputs(builder, sizes, seed=seed)
        torch.testing.assert_close(logits(scorer, rows).softmax(-1), logits(eager, rows).softmax(-1), atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs, "a batch shape recompiled"


@needs_compiler
@pytest.mark.slow
def test_writer_processes_each_compile_and_write_what_an_eager_run_writes(tmp_path, mixed_parquet, tiny_model_cache):
    """`--devices cpu,cpu` with `model.compile: on`: each writer process compiles (its own recompile log) and the run
    equals an eager one; the command, run as a user runs it, prints no traceback and no warning of leaked
    semaphores (a writer ends with os._exit, and compiling makes tqdm create a multiprocessing lock)."""
    probs = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        recipe = write_recipe(tmp_path / f"{setting}.yaml", mixed_parquet, out, model={"compile": setting})
        if setting == "off":
            result = runner.invoke(app, ["run", str(recipe), "--no-progress"], catch_exceptions=False)
            assert result.exit_code == 0, result.output
        else:
            env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_LOGS": "recompiles"}
            command = [sys.executable, "-c", "from annotator.cli import main; main()", "run", str(recipe)]
            done = subprocess.run(
                [*command, "--no-progress", "--devices", "cpu,cpu"], capture_output=True, text=True, env=env
            )
            said = done.stdout + done.stderr
            assert done.returncode == 0, said
            assert "Traceback" not in said and "leaked" not in said, said
            compiling_writers = {
                line.split()[2] for line in done.stderr.splitlines() if "Recompiling function vision_block" in line
            }
            assert len(compiling_writers) == 2, "each writer process compiles its own"
        table = read_output(out)
        probs[setting] = np.array(table.column("prob").to_pylist(), dtype=np.float64)
        assert table.column("error").null_count == len(table), "every row scored"
    np.testing.assert_allclose(probs["on"], probs["off"], atol=1e-5)
    assert np.ptp(probs["off"]) > 0.01, "rows differ, so must probs"


@needs_compiler
def test_compiling_leaves_torch_settings_as_they_were_and_compiles_another_dtype(tiny, compiled):
    """The settings compiling needs (no duck shapes, room for variants) hold only while the pieces run: none is left
    changed for the rest of the process. And a process that already compiled float32 (its vision-block variants)
    compiles bfloat16 too, even where PyTorch's own limit is used up (its default 8 with fullgraph raised an error
    at the third dtype or device)."""
    from torch._dynamo import config as dynamo_config
    from torch.fx.experimental import _config as fx_config

    scorer, _, builder = compiled
    assert fx_config.use_duck_shape, "compiling must not leave duck shapes off for every later compile"
    assert dynamo_config.recompile_limit == 8
    visual = copy.deepcopy(tiny.model.model.visual).to(torch.bfloat16)
    (row,) = score_inputs(builder, [(500, 500)])
    pixels = patchify(torch.from_numpy(row.image), scorer.mean, scorer.std).to(torch.bfloat16)
    layout = forward.VisionLayout.build([row.grid], torch.bfloat16)
    with torch.inference_mode(), dynamo_config.patch(recompile_limit=3):  # as if other models had used it up
        got = forward.vision_features(visual, pixels, layout, scorer.regions)
        want = forward.vision_features(visual, pixels, layout)
        assert dynamo_config.recompile_limit == 3
    got, want = got.float(), want.float()
    assert float((got - want).norm() / want.norm()) < 0.02, "bfloat16 rounding (0.6%), fused or not"
    assert fx_config.use_duck_shape and dynamo_config.recompile_limit == 8


def script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def on_a_gpu(monkeypatch, triton: bool) -> None:
    """This machine as one with a GPU (the run's devices resolve to cuda:0), with or without Triton installed."""
    monkeypatch.setattr("annotator.executors._cuda_count", lambda: 1)
    monkeypatch.setattr(compiling, "triton_installed", lambda: triton)


BROKEN = {  # each: how the machine is broken (tmp_path, monkeypatch), what the error names
    "transformers-forward": (lambda t, m: None, "`model.forward: lean`"),
    "with-cuda-graphs": (lambda t, m: None, "cannot be combined"),
    "no-compiler": (lambda t, m: m.setenv("CXX", str(t / "no-such-c++")), "C++ compiler"),
    "not-a-compiler": (lambda t, m: m.setenv("CXX", script(t / "true", "exit 0")), "without writing the library"),
    "failing-compiler": (
        lambda t, m: m.setenv("CXX", script(t / "g++", 'echo "g++: fatal error: killed" >&2; exit 4')),
        "g++: fatal error: killed",
    ),
    "gpu-without-triton": (lambda t, m: on_a_gpu(m, triton=False), "needs Triton"),
    "gpu-without-a-c-compiler": (
        lambda t, m: (on_a_gpu(m, triton=True), m.setenv("CC", str(t / "no-such-cc"))),
        "C compiler and Python's headers",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_compile_on_that_cannot_work_is_refused_before_anything_loads(tmp_path, mixed_parquet, monkeypatch, case):
    """From the recipe file or from --set: exit 1, one paragraph, no traceback, no model loaded, nothing written."""
    breaks, says = BROKEN[case]
    breaks(tmp_path, monkeypatch)
    monkeypatch.setattr("annotator.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    model = {"compile": True}  # as YAML reads a bare `compile: on`
    if case == "transformers-forward":
        model["forward"] = "transformers"
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, out, model=model)
    sets = ["--set", "model.cuda_graphs=on"] if case == "with-cuda-graphs" else []
    for command in ("plan", "run"):
        quiet = ["--no-progress"] if command == "run" else []
        result = runner.invoke(app, [command, str(recipe), *sets, *quiet])
        assert result.exit_code == 1, result.output
        text = " ".join(result.output.split())
        assert says in text and "Traceback" not in result.output and "\n\n" not in result.output.strip()
        assert "model.compile: off" in text
    assert not out.exists(), "nothing written"


@pytest.mark.parametrize("compile", ["on", "off"])
def test_a_torch_cache_folder_that_cannot_be_made_is_refused_before_anything_loads(
    tmp_path, mixed_parquet, monkeypatch, compile
):
    """PyTorch creates $TORCHINDUCTOR_CACHE_DIR when the model's code loads, compiling or not (a traceback before)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(mixed_parquet / "cache"))  # below a file
    monkeypatch.setattr("annotator.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, out, model={"compile": compile})
    result = runner.invoke(app, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "TORCHINDUCTOR_CACHE_DIR" in result.output and "is a file" in " ".join(result.output.split())
    assert not out.exists()


def test_a_torch_cache_folder_starting_with_a_tilde_is_refused_not_made_in_the_current_folder(
    tmp_path, mixed_parquet, monkeypatch
):
    """PyTorch does not expand `~` (an .env file or a quoted value leaves it): it made a folder named `~` here."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "~/inductor")
    monkeypatch.setattr("annotator.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out")
    result = runner.invoke(app, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == 1 and "PyTorch does not expand `~`" in result.output, result.output
    assert not (tmp_path / "~").exists() and not (tmp_path / "out").exists()


def test_a_compile_that_fails_as_the_model_loads_is_a_user_error(tmp_path, mixed_parquet, monkeypatch):
    """What no check foresees (a header missing, a GPU Triton does not support) fails in the warm-up, at load: one
    paragraph naming the way out, exit 1, nothing written; not PyTorch's traceback."""

    def fails(*args):
        raise RuntimeError(
            "CppCompileError: C++ compile error\n\nOutput:\nomp.h: No such file\n\nSet TORCHDYNAMO_VERBOSE=1"
        )

    monkeypatch.setattr("annotator.scoring.compiled_regions", lambda: forward.Regions(fails, fails))
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", mixed_parquet, out, model={"compile": "on"})
    result = runner.invoke(app, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert "could not compile the forward on cpu (RuntimeError: CppCompileError: C++ compile error)" in text
    assert "`model.compile: off`" in text and "\n\n" not in result.output.strip()
    assert not out.exists(), "nothing written"


def test_compile_auto_compiles_only_where_measured_to_win_and_the_machine_can(monkeypatch):
    assert not compiling.use_compile("auto", "lean", "cpu") and compiling.use_compile("on", "lean", "cpu")
    assert not compiling.use_compile("on", "transformers", "cuda") and not compiling.use_compile("off", "lean", "cuda")
    monkeypatch.setitem(compiling.COMPILE_WINS, "cuda", True)
    on_a_gpu(monkeypatch, triton=False)
    assert not compiling.use_compile("auto", "lean", "cuda"), "auto never stops a run: no Triton, no compile"
    on_a_gpu(monkeypatch, triton=True)
    monkeypatch.setattr(compiling, "_probe", lambda *args: None)  # a C compiler that works
    assert compiling.use_compile("auto", "lean", "cuda") and not compiling.use_compile("auto", "lean", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_compiled_forward_on_a_gpu_equals_eager_and_never_syncs(dtype):
    from annotator.models import load_model

    loaded = load_model("tiny", None, dtype, "cuda", "sdpa")  # the session's tiny model (ANNOTATOR_CACHE)
    builder = PromptBuilder(loaded.tokenizer, PromptConfig())
    scorer, eager = Scorer(loaded, builder, "lean", compile="on"), Scorer(loaded, builder, "lean", compile="off")
    batches = [
        score_inputs(builder, sizes, seed=seed) for seed, sizes in enumerate([SIZES, [(756, 476)] * 6, SIZES[:1]])
    ]
    expected = [[s.prob for s in eager.score(rows)] for rows in batches]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        waits = [scorer.launch(rows) for rows in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = [[s.prob for s in wait()] for wait in waits]
    for ours, reference in zip(got, expected, strict=True):
        if dtype == "float32":
            np.testing.assert_allclose(ours, reference, atol=1e-5)
        else:  # fused kernels round to bfloat16 less often than eager ops do
            assert np.abs(np.subtract(ours, reference)).mean() < 0.02
