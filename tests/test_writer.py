"""A writer checks what it sees before it loads a model (version, the shared run folder, the input) and never
publishes a window once its coordinator no longer holds the folder."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pytest

from annotator.errors import AnnotatorError, RunInterrupted
from annotator.recipe import load_recipe
from annotator.sink import RunFolder
from annotator.sources import Window, open_source
from annotator.writer import WindowReader, WindowScorer, WriterSpec
from tests.conftest import write_recipe


@pytest.fixture
def spec(tmp_path, mixed_parquet):
    """What a coordinator holding `tmp_path/out` gives its writers."""
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", mixed_parquet, tmp_path / "out"))
    folder = RunFolder(tmp_path / "out")
    folder.create("name: test\n", {"window": 8})
    folder.acquire_lock()
    source = open_source(recipe.input, recipe.prompt)
    fingerprint = json.loads(json.dumps(source.fingerprint()))
    yield WriterSpec(recipe, str(folder.root), owner=folder.owner_token, input_fingerprint=fingerprint)
    folder.release_lock()


def refused(spec: WriterSpec) -> str:
    with pytest.raises(AnnotatorError) as error:
        WindowScorer(spec, lambda kind, value: None).load()
    return " ".join(str(error.value).split())


def test_a_writer_of_another_annotator_version_refuses_to_start(spec):
    assert "Install the same annotator version on every node" in refused(replace(spec, version="0.0.0"))


def test_a_writer_that_cannot_see_the_run_folder_says_it_must_be_on_shared_storage(spec, tmp_path):
    (tmp_path / "elsewhere").mkdir()  # another node's view: the path exists, the coordinator's files do not
    message = refused(replace(spec, root=str(tmp_path / "elsewhere")))
    assert "cannot see the run folder" in message and "storage every node sees" in message


def test_a_writer_that_reads_another_input_refuses(spec):
    assert "reads a different input" in refused(replace(spec, input_fingerprint=[{"file": "/other.parquet"}]))


def test_a_writer_never_publishes_once_its_coordinator_lost_the_folder(spec, tmp_path):
    writer = WindowScorer(spec, lambda kind, value: None)
    folder = writer.folder
    lock = json.loads(folder.lock_path.read_text())
    folder.lock_path.write_text(json.dumps({**lock, "token": "another-coordinator"}))  # a resume took the folder
    with pytest.raises(RunInterrupted, match="no longer held by the process that started it"):
        folder.write_window(0, pa.table({"x": [1]}), {"rows": 1})
    assert list(folder.data_dir.iterdir()) == [], "neither the window nor its hidden file"
    assert not folder.journal_path.exists()


class Windows:
    """A source of 10 one-row windows that records where it was opened."""

    def __init__(self, seekable: bool) -> None:
        self.seekable = seekable
        self.opened: list[int] = []

    def windows(self, size: int, first: int = 0):
        self.opened.append(first)
        return (Window(i, i, pa.table({"x": [i]}), [None]) for i in range(first, 10))


@pytest.mark.parametrize(("seekable", "opened"), [(True, [0, 5, 3, 9]), (False, [0, 3])])
def test_a_writer_reads_the_windows_it_is_handed_continuing_a_stream_where_it_can(seekable, opened):
    source = Windows(seekable)
    reader = WindowReader(source, 1)
    windows = [reader.read(index) for index in [0, 1, 2, 5, 6, 3, 9, 10, 11]]
    assert [w.index if w else None for w in windows] == [0, 1, 2, 5, 6, 3, 9, None, None]
    assert source.opened == opened, "a seekable source opens at a gap, a stream reads on (and reopens going back)"
