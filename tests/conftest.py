"""Shared fixtures: an isolated cache and output folder per test, the tiny model built once per session."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

# huggingface_hub reads these when it is first imported: set them before any test module imports it, so
# nothing ever waits on a network that is not there.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "data" / "demo.parquet"


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory) -> Path:
    """A cache folder holding the tiny model, built once for the whole session."""
    cache = tmp_path_factory.mktemp("annotator-cache")
    from annotator.models import TINY_VERSION, make_tiny_model

    make_tiny_model(cache / f"tiny-qwen2-vl-{TINY_VERSION}")
    return cache


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch, tiny_model_cache) -> None:
    """Every test runs in its own folder, with the shared tiny model and no network."""
    monkeypatch.setenv("ANNOTATOR_CACHE", str(tiny_model_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny(tiny_model_cache):
    """The tiny model loaded once (float32, CPU), from its folder."""
    from annotator.models import TINY_VERSION, load_model

    return load_model(str(tiny_model_cache / f"tiny-qwen2-vl-{TINY_VERSION}"), None, "float32", "cpu", "sdpa")


def jpeg_bytes(width: int, height: int, seed: int = 0, mode: str = "RGB", fmt: str = "JPEG", **save) -> bytes:
    """A noisy but smooth synthetic photo, so resizing and decoding differences show up."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def write_dataset(path: Path, images: list, captions: list, **extra_columns) -> Path:
    """A parquet file with an HF Image struct column `image` and a `caption` column."""
    structs = [
        None if img is None else (img if isinstance(img, dict) else {"bytes": img, "path": None}) for img in images
    ]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {"image": pa.array(structs, image_type), "caption": pa.array(captions, pa.string())}
    columns.update({k: pa.array(v) for k, v in extra_columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def write_recipe(path: Path, parquet: Path | str, output_dir: Path | str, **sections) -> Path:
    """A recipe using the tiny model on `parquet`; `sections` override whole sections' keys."""
    import yaml

    recipe = {
        "name": "test",
        "input": {"parquet": str(parquet), "image_column": "image", "text_column": "caption"},
        "model": {"name": "tiny", "min_pixels": 3136, "max_pixels": 56 * 56 * 4},
        "batching": {"window": 8, "max_batch_size": 4, "workers": 0},
        "output": {"dir": str(output_dir)},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def read_output(output_dir: Path) -> pa.Table:
    files = sorted((Path(output_dir) / "data").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


MIXED_SIZES = [(756, 476), (320, 240), (240, 320), (100, 900), (64, 64), (500, 500), (1000, 200), (30, 30)]
CAPTIONS = [
    "a cat",
    "a photo of a dog on the street",
    "red",
    "a small blue car parked next to a large green tree in the city",
    "coffee",
    "an astronaut in space with a rocket",
    "grass",
    "a black and white photo of a man with a camera on a table",
]


@pytest.fixture
def mixed_parquet(tmp_path) -> Path:
    """Sixteen rows of different image sizes and caption lengths."""
    images = [jpeg_bytes(w, h, seed=i) for i, (w, h) in enumerate(MIXED_SIZES * 2)]
    captions = CAPTIONS + CAPTIONS[::-1]
    return write_dataset(tmp_path / "in" / "mixed.parquet", images, captions, idx=list(range(16)))


def journals(output_dir: Path) -> list[Path]:
    """The run folder's journals: one per writer incarnation."""
    return sorted((Path(output_dir) / "journal").glob("*.jsonl"))


def journal_lines(output_dir: Path) -> int:
    """Journal lines over every writer of a run folder: the windows committed so far (and any torn line)."""
    return sum(len(path.read_text().splitlines()) for path in journals(output_dir))


def keep_first_windows(output_dir: Path, keep: int) -> None:
    """Make a finished one-writer run look interrupted after its first `keep` windows (journal lines and files)."""
    (journal,) = journals(output_dir)
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:keep]))
    for path in sorted((Path(output_dir) / "data").glob("part-*.parquet"))[keep:]:
        path.unlink()


def run_once(root: Path, recipe: Path, tiny_model_cache: Path, *args: str) -> Path:
    """`annotate run RECIPE --no-progress ARGS` from `root`, for a module-scoped fixture; returns `root`."""
    from typer.testing import CliRunner

    from annotator.cli import app

    with pytest.MonkeyPatch.context() as env:
        env.setenv("ANNOTATOR_CACHE", str(tiny_model_cache))
        env.chdir(root)
        result = CliRunner().invoke(app, ["run", str(recipe), "--no-progress", *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return root


WRITER_HOOKS = REPO / "tests" / "scaleout_hooks"


def use_writer_hooks(env: pytest.MonkeyPatch, **settings: str) -> None:
    """Writers started from now on load tests/scaleout_hooks (a thread of an `annotate` subprocess, a writer process,
    a Ray actor of a Ray started after this), with `settings` (SCALEOUT_...=value) in their environment."""
    env.setenv("PYTHONPATH", os.pathsep.join([str(WRITER_HOOKS), os.environ.get("PYTHONPATH", "")]))
    for name, value in settings.items():
        env.setenv(name, value)


class Pause:
    """Writers stop before committing window `window` while the pause is held (tests/scaleout_hooks): a run can
    neither end nor pass that commit before the test has acted, however fast or slow the machine. A stop (Ctrl-C,
    SIGTERM) ends the wait as it would end a real commit: the commit completes, then the writer stops."""

    def __init__(self, env: pytest.MonkeyPatch, folder: Path, window: int) -> None:
        self.path, self.pid_path = folder / "pause", folder / "pause.pid"
        use_writer_hooks(env, SCALEOUT_PAUSE=str(self.path), SCALEOUT_PAUSE_WINDOW=str(window))

    def hold(self) -> Pause:
        self.pid_path.unlink(missing_ok=True)  # a writer paused by an earlier hold is not this one's
        self.path.touch()
        return self

    def writer(self, run=None, timeout: float = 180) -> int:
        """The pid of the (first) writer paused, once one is; fails at once if `run` (a Popen) ends before."""
        deadline = time.monotonic() + timeout
        while not self.pid_path.exists():
            assert run is None or run.poll() is None, "the run ended before any writer reached the pause"
            assert time.monotonic() < deadline, f"no writer reached the pause within {timeout} s"
            time.sleep(0.02)
        return int(self.pid_path.read_text())

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


SCALEOUT_ROWS, SCALEOUT_WINDOW = 72, 6


def scaleout_recipe(folder: Path, parquet: Path, name: str, **sections) -> Path:
    """The recipe of the scale-out tests: windows of 6 rows, large enough images that a window can be killed in."""
    return write_recipe(
        folder / f"{name}.yaml",
        parquet,
        folder / name,
        model={"max_pixels": 28 * 28 * 64},
        batching={"window": SCALEOUT_WINDOW, "max_batch_size": 4, "workers": 0},
        **sections,
    )


@pytest.fixture(scope="session")
def scaleout_input(tmp_path_factory) -> Path:
    """72 rows for the scale-out tests (tests/test_scaleout.py, tests/test_ray_engine.py)."""
    sizes = [(320, 240), (240, 320), (400, 120), (280, 280)]
    images = [jpeg_bytes(*sizes[i % len(sizes)], seed=i) for i in range(SCALEOUT_ROWS)]
    captions = [f"caption {i} " + "word " * (i % 5) for i in range(SCALEOUT_ROWS)]
    return write_dataset(tmp_path_factory.mktemp("scaleout-input") / "in.parquet", images, captions)


@pytest.fixture(scope="session")
def scaleout_reference(tmp_path_factory, scaleout_input, tiny_model_cache) -> Path:
    """The scale-out input annotated by one writer in one process, uninterrupted: what every engine must write."""
    folder = tmp_path_factory.mktemp("scaleout-reference")
    return run_once(folder, scaleout_recipe(folder, scaleout_input, "reference"), tiny_model_cache) / "reference"


@pytest.fixture(scope="session")
def questions_run(tmp_path_factory, tiny_model_cache) -> Path:
    """A finished run asking three questions (about the text, not about it, one of three answers), 9 rows, 1 error.

    Tests only read it.
    """
    root = tmp_path_factory.mktemp("questions-run")
    images = [jpeg_bytes(w, h, seed=i) for i, (w, h) in enumerate(MIXED_SIZES)] + [b"broken"]
    parquet = write_dataset(root / "in.parquet", images, CAPTIONS + ["x"])
    kind = {"question": "Which?", "answers": ["A", "B", "C"]}
    prompt = {"questions": {"text": "Related to {text}?", "cat": "A cat?", "kind": kind}}
    recipe = write_recipe(root / "r.yaml", parquet, root / "run", prompt=prompt, output={"thresholds": {"cat": 0.6}})
    run_once(root, recipe, tiny_model_cache)
    return root / "run"


def counting_planned_rows(monkeypatch) -> list[int]:
    """The number of rows of every window planned from now on (a list that grows as windows are planned)."""
    import annotator.batching

    seen: list[int] = []
    original = annotator.batching.plan_window

    def counting(rows, *args, **kwargs):
        seen.append(len(rows))
        return original(rows, *args, **kwargs)

    monkeypatch.setattr(annotator.batching, "plan_window", counting)
    return seen
