"""Hostile inputs, as a careless user or a broken machine makes them: one parametrised table of cases.

Every case runs `annotate ...` and asserts its exit code, that no traceback is printed and the message is short,
that a run holds every input row exactly once, and that no file outside the run folder changed (the test's folder
and the model cache are snapshotted before and after: paths, sizes, modification times, content hashes).

Full and read-only filesystems are simulated in-process (`FaultyFS`: writes under a folder fail with ENOSPC past a
byte budget, or with EROFS), since a small tmpfs cannot be mounted in CI; one case uses a real kernel limit instead
(RLIMIT_FSIZE makes writes past a size fail with EFBIG). Signals and the real exit of a process run in subprocesses.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from annotator.cli import app
from tests.conftest import REPO, jpeg_bytes, read_output, write_recipe

ROWS = 6
WINDOW = 4
MAX_OUTPUT = 6000  # characters: messages are bounded, a case never floods the terminal
runner = CliRunner()


# --- the world a case runs in ---------------------------------------------------------------------------------


def image_struct(seed: int, size: tuple[int, int] = (64, 48)) -> dict:
    return {"bytes": jpeg_bytes(*size, seed=seed), "path": None}


def table(rows: int = ROWS, seed: int = 0, **columns) -> pa.Table:
    images = pa.array([image_struct(seed + i) for i in range(rows)], IMAGE)
    data = {"image": images, "caption": pa.array([f"caption {seed + i}" for i in range(rows)])}
    data.update(columns)
    return pa.table(data)


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def parquet(path: Path, data: pa.Table | None = None, **write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table() if data is None else data, path, **write)
    return path


def recipe(path: Path, input_path: Path | str, out: Path | str, **sections) -> Path:
    sections.setdefault("batching", {})
    sections["batching"] = {"window": WINDOW, "max_batch_size": 4, "workers": 0, **sections["batching"]}
    return write_recipe(path, input_path, out, **sections)


def run_args(recipe_path: Path, *extra: str) -> list[str]:
    return ["run", str(recipe_path), "--no-progress", *extra]


@dataclass
class Expect:
    """What a case runs and what must hold afterwards."""

    args: list[str]
    exit: int
    says: tuple[str, ...] = ()
    rows: int | None = None  # rows the run folder must hold, each exactly once, in order
    run: Path | None = None  # the run folder, which may change; None: nothing at all may change
    then: Callable[[], None] | None = None  # checks after the snapshot comparison (a resume, an export)
    fault: FaultyFS | None = None
    spawn: Callable[[], tuple[int, str]] | None = None  # a subprocess instead of the in-process command line


CASES: list = []


def case(category: str, slow: bool = False):
    """Register a case: `build(folder)` makes its world in `folder` and says what to run and expect."""

    def register(build: Callable[[Path], Expect]) -> Callable[[Path], Expect]:
        name = f"{category}:{build.__name__.replace('_', '-')}"
        CASES.append(pytest.param(name, build, id=name, marks=[pytest.mark.slow] if slow else []))
        return build

    return register


def cli(*args: object, exit: int = 0, says: str = "") -> str:
    """Run a follow-up command of a case, with the same checks."""
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == exit, result.output
    assert "Traceback" not in result.output and len(result.output) < MAX_OUTPUT
    assert says in " ".join(result.output.split()), result.output
    return result.output


def assert_rows(run: Path, rows: int) -> None:
    output = read_output(run) if rows else None
    row_ids = output.column("row_id").to_pylist() if output is not None else []
    assert row_ids == list(range(rows)), "every input row exactly once, in order"
    if rows:
        assert not [p for p in (run / "data").iterdir() if p.name.startswith(".")], "no hidden leftovers"


# --- simulated filesystems ------------------------------------------------------------------------------------


class FaultyFS:
    """Writes under `root` fail: every one with EROFS (a read-only mount), or with ENOSPC past `budget` bytes."""

    def __init__(self, root: Path, error: int = errno.ENOSPC, budget: int = 0, only: str | None = None) -> None:
        self.root = str(root)
        self.error = error
        self.budget = budget
        self.only = only  # fail only paths whose name contains this

    def _hits(self, path) -> bool:
        if isinstance(path, int):
            return False
        path = os.path.abspath(os.fsdecode(path))
        under = path == self.root or path.startswith(self.root + os.sep)
        return under and (self.only is None or self.only in os.path.basename(path))

    def _fail(self, path) -> None:
        raise OSError(self.error, os.strerror(self.error), os.fsdecode(path))

    def spend(self, size: int, path) -> None:
        if self.error != errno.ENOSPC or self.budget < size:
            self.budget = 0
            self._fail(path)
        self.budget -= size

    def install(self, monkeypatch) -> None:
        fs = self
        real_open, real_os_open = builtins.open, os.open

        class Full:
            """A file whose writes spend the budget."""

            def __init__(self, inner, path) -> None:
                self.inner, self.path = inner, path

            def write(self, data) -> int:
                fs.spend(len(data), self.path)
                return self.inner.write(data)

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self.inner.close()

        def exhausted() -> bool:
            return fs.error != errno.ENOSPC or fs.budget <= 0

        def faulty_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and fs._hits(file):
                if exhausted():
                    fs._fail(file)
                return Full(real_open(file, mode, *args, **kwargs), file)
            return real_open(file, mode, *args, **kwargs)

        def faulty_os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and fs._hits(path) and exhausted():
                fs._fail(path)
            return real_os_open(path, flags, *args, **kwargs)

        def guard(real, takes_space: bool):
            def guarded(*args, **kwargs):
                paths = [a for a in args[:2] if isinstance(a, str | bytes | os.PathLike)]
                # A full disk still renames and deletes; a read-only one refuses everything.
                if any(fs._hits(p) for p in paths) and (fs.error != errno.ENOSPC or (takes_space and exhausted())):
                    fs._fail(paths[0])
                return real(*args, **kwargs)

            return guarded

        monkeypatch.setattr(builtins, "open", faulty_open)
        monkeypatch.setattr(io, "open", faulty_open)
        monkeypatch.setattr(os, "open", faulty_os_open)
        for name, takes_space in (("mkdir", True), ("link", True), ("rename", False), ("replace", False)):
            monkeypatch.setattr(os, name, guard(getattr(os, name), takes_space))
        for name in ("unlink", "rmdir"):
            monkeypatch.setattr(os, name, guard(getattr(os, name), False))


# --- the suite ------------------------------------------------------------------------------------------------


def snapshot(*roots: Path, skip: Path | None) -> dict[str, tuple]:
    """Every path under `roots` (symbolic links not followed) with its kind, size, mtime and content hash.

    Folders keep their mtime too (it moves when an entry is created or deleted in them), except the folders
    holding `skip`, the run folder, which a run may create.
    """
    seen: dict[str, tuple] = {}
    skipped = os.path.realpath(skip) if skip is not None else None
    holders = {os.path.realpath(p) for p in Path(skipped).parents} if skipped else set()
    for root in roots:
        for folder, dirs, files in os.walk(root):
            if skipped is not None:
                dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(folder, d)) != skipped]
            for name in [*dirs, *files]:
                path = os.path.join(folder, name)
                if skipped is not None and os.path.realpath(path) == skipped:
                    continue
                info = os.lstat(path)
                if os.path.islink(path):
                    seen[path] = ("link", os.readlink(path))
                elif os.path.isdir(path):
                    seen[path] = ("dir", None if os.path.realpath(path) in holders else info.st_mtime_ns)
                elif os.path.isfile(path):
                    small = info.st_size <= 32 << 20  # a sparse gigabyte is compared by size and time
                    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if small else None
                    seen[path] = ("file", info.st_size, info.st_mtime_ns, digest)
                else:
                    seen[path] = ("special", info.st_mode)
            if os.path.realpath(folder) not in holders:
                seen[folder] = ("dir", os.stat(folder).st_mtime_ns)
    return seen


class Hung(Exception):
    pass


def _alarm(signum, frame):
    raise Hung("the command hung")


@pytest.mark.parametrize(("name", "build"), CASES)
def test_hostile_case(name, build, tmp_path, tiny_model_cache, finished, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # `~` of the cases is inside their folder
    FINISHED["run"] = finished
    expect = build(tmp_path)
    before = snapshot(tmp_path, tiny_model_cache, skip=expect.run)
    if expect.spawn is not None:
        code, output = expect.spawn()
    else:
        faults = pytest.MonkeyPatch()
        if expect.fault is not None:
            expect.fault.install(faults)
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(60)
        try:
            result = runner.invoke(app, expect.args, catch_exceptions=False)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            faults.undo()
        code, output = result.exit_code, result.output
    flat = " ".join(output.split())
    assert code == expect.exit, output
    assert "Traceback" not in output, output
    assert len(output) < MAX_OUTPUT, f"{len(output)} characters of output"
    for words in expect.says:
        assert words in flat, flat
    assert snapshot(tmp_path, tiny_model_cache, skip=expect.run) == before, "files outside the run folder changed"
    if expect.rows is not None:
        assert_rows(expect.run, expect.rows)
    if expect.then is not None:
        expect.then()


def test_the_table_holds_at_least_60_cases_in_every_category():
    categories = {case.values[0].split(":")[0] for case in CASES}
    assert len(CASES) >= 60
    assert categories == {"inputs", "images", "texts", "recipes", "command-line", "filesystems", "damaged", "signals"}


# --- inputs: files, folders, globs, schemas ---------------------------------------------------------------------


def plain_run(w: Path, input_path: Path | str, rows: int, **sections) -> Expect:
    out = w / "out"
    return Expect(run_args(recipe(w / "r.yaml", input_path, out, **sections)), 0, rows=rows, run=out)


def refused_run(w: Path, input_path: Path | str, *says: str, out: Path | None = None, **sections) -> Expect:
    out = out or w / "out"
    return Expect(run_args(recipe(w / "r.yaml", input_path, out, **sections)), 1, says)


@case("inputs")
def empty_input_file(w):
    return plain_run(w, parquet(w / "in" / "empty.parquet", table(0)), 0)


@case("inputs")
def folder_with_symlink_loops(w):
    parquet(w / "in" / "a.parquet", table(3))
    parquet(w / "in" / "sub" / "b.parquet", table(3, seed=3))
    os.symlink("..", w / "in" / "sub" / "up")
    os.symlink(".", w / "in" / "sub" / "self")
    return plain_run(w, w / "in", ROWS)


@case("inputs")
def recursive_glob_with_symlink_loops(w):
    parquet(w / "in" / "a.parquet", table(3))
    parquet(w / "in" / "sub" / "b.parquet", table(3, seed=3))
    for name in ("loop1", "loop2", "loop3"):  # glob.glob would walk 3^40 paths here
        os.symlink(w / "in", w / "in" / "sub" / name)
    return plain_run(w, f"{w}/in/**/*.parquet", ROWS)


@case("inputs")
def the_same_file_twice_through_a_symlink(w):
    parquet(w / "in" / "a.parquet")
    os.symlink("a.parquet", w / "in" / "b.parquet")
    return plain_run(w, w / "in", ROWS)


@case("inputs")
def a_folder_named_like_a_parquet_file(w):
    parquet(w / "in" / "a.parquet")
    (w / "in" / "b.parquet").mkdir()
    return plain_run(w, f"{w}/in/*.parquet", ROWS)


@case("inputs")
def a_fifo_in_the_input_folder(w):
    parquet(w / "in" / "a.parquet")
    os.mkfifo(w / "in" / "pipe.parquet")
    return refused_run(w, w / "in", "is a FIFO, not a parquet file", "pipe.parquet")


@case("inputs")
def the_input_is_a_fifo(w):
    os.mkfifo(w / "input.parquet")
    return refused_run(w, w / "input.parquet", "is a FIFO")


@case("inputs")
def a_text_file_named_parquet(w):
    (w / "in").mkdir()
    (w / "in" / "data.parquet").write_text("id,caption\n1,a cat\n")
    return refused_run(w, w / "in" / "data.parquet", "Cannot read parquet input", "Is it a parquet file?")


@case("inputs")
def files_whose_column_types_differ(w):
    parquet(w / "in" / "a.parquet")
    parquet(w / "in" / "b.parquet", table().set_column(1, "caption", pa.array(range(ROWS))))
    return refused_run(w, w / "in", "b.parquet", "its column 'caption' is int64, not string")


@case("inputs")
def a_file_without_a_column(w):
    parquet(w / "in" / "a.parquet", table(extra=pa.array(range(ROWS))))
    parquet(w / "in" / "b.parquet")
    return refused_run(w, w / "in", "it has no column 'extra'")


@case("inputs")
def pandas_categorical_captions(w):
    captions = pa.array(["a cat", "a dog"] * 3).dictionary_encode()
    return plain_run(w, parquet(w / "in" / "a.parquet", table().set_column(1, "caption", captions)), ROWS)


@case("inputs")
def dictionary_encoded_image_bytes(w):
    images = pa.array([jpeg_bytes(64, 48, seed=i % 2) for i in range(ROWS)]).dictionary_encode()
    return plain_run(w, parquet(w / "in" / "a.parquet", table().set_column(0, "image", images)), ROWS)


@case("inputs")
def categoricals_whose_index_width_differs_between_files(w):
    narrow = pa.array(["a cat"] * 3).dictionary_encode()
    wide = pa.DictionaryArray.from_arrays(pa.array([0, 1, 0], pa.int32()), pa.array(["a dog", "a car"]))
    parquet(w / "in" / "a.parquet", table(3).set_column(1, "caption", narrow))
    parquet(w / "in" / "b.parquet", table(3, seed=3).set_column(1, "caption", wide))
    return plain_run(w, w / "in", ROWS)


@case("inputs")
def duplicate_column_names(w):
    data = pa.Table.from_arrays(
        [table().column(0), table().column(1), table().column(1)], ["image", "caption", "caption"]
    )
    return refused_run(w, parquet(w / "in" / "a.parquet", data), "more than one column named 'caption'")


@case("inputs")
def unreadable_huggingface_metadata(w):
    data = table().replace_schema_metadata({b"huggingface": b"{not json"})
    return plain_run(w, parquet(w / "in" / "a.parquet", data), ROWS)


@case("inputs")
def huggingface_metadata_about_other_columns(w):
    features = {"info": {"features": {"text": {"dtype": "string", "_type": "Value"}}}}
    data = table().replace_schema_metadata({b"huggingface": json.dumps(features).encode()})
    return plain_run(w, parquet(w / "in" / "a.parquet", data), ROWS)


@case("inputs")
def a_column_type_datasets_cannot_describe(w):
    tags = pa.array([[("k", i)] for i in range(ROWS)], pa.map_(pa.string(), pa.int64()))
    return refused_run(w, parquet(w / "in" / "a.parquet", table(tags=tags)), "'tags' has type map", "cannot describe")


@case("inputs")
def image_struct_fields_of_other_types(w):
    images = pa.array([{"bytes": "text", "path": i} for i in range(ROWS)])
    data = table().set_column(0, "image", images)
    return refused_run(w, parquet(w / "in" / "a.parquet", data), "field `bytes` has type string")


@case("inputs")
def an_input_that_already_has_output_columns(w):
    data = table(prob=pa.array([0.5] * ROWS))
    return refused_run(w, parquet(w / "in" / "a.parquet", data), "already has column(s) prob")


@case("inputs")
def one_row_per_file_in_many_files(w):
    for i in range(ROWS):
        parquet(w / "in" / f"part-{i}.parquet", table(1, seed=i))
    return plain_run(w, w / "in", ROWS)


@case("inputs")
def a_tilde_in_the_input_path(w):
    parquet(w / "home" / "data" / "a.parquet")
    return plain_run(w, "~/data/a.parquet", ROWS)


@case("inputs")
def the_output_folder_inside_the_input_folder(w):
    parquet(w / "in" / "a.parquet")
    return refused_run(w, w / "in", "lies where the input", out=w / "in" / "out")


@case("inputs")
def the_output_folder_holding_the_input(w):
    cli("run", recipe(w / "first.yaml", parquet(w / "in" / "a.parquet"), w / "run"), "--no-progress")
    parquet(w / "run" / "in.parquet")  # the user drops the input into a run folder, then overwrites that run
    expect = refused_run(w, w / "run" / "in.parquet", "holds the input file", out=w / "run")
    expect.args.append("--overwrite")
    return expect


@case("inputs")
def an_input_glob_that_reaches_the_output(w):
    parquet(w / "data" / "a.parquet")
    return refused_run(w, f"{w}/data/**/*.parquet", "lies where the input", out=w / "data" / "out")


@case("inputs")
def an_output_folder_reached_through_a_symlink_in_the_input(w):
    parquet(w / "data" / "a.parquet")
    os.symlink(w, w / "data" / "everything")  # the glob reaches the whole case folder, the output included
    return refused_run(w, f"{w}/data/**/*.parquet", "lies where the input", out=w / "out")


@case("inputs")
def an_output_folder_beside_the_files_of_a_flat_glob(w):
    parquet(w / "data" / "a.parquet")
    expect = plain_run(w, f"{w}/data/*.parquet", ROWS)  # data/out/data/part-*.parquet is not matched: allowed
    expect.args = run_args(recipe(w / "r.yaml", f"{w}/data/*.parquet", w / "data" / "out"))
    expect.run = w / "data" / "out"
    return expect


# --- image content --------------------------------------------------------------------------------------------


def paths_run(w: Path, paths: list[str], error: str) -> Expect:
    """The first rows point at hostile image `paths`, the rest are fine: all rows come out, the first with `error`."""
    (w / "in").mkdir(exist_ok=True)
    good = [{"bytes": jpeg_bytes(64, 48, seed=i), "path": None} for i in range(ROWS - len(paths))]
    images = pa.array([{"bytes": None, "path": p} for p in paths] + good, IMAGE)
    data = pa.table({"image": images, "caption": [f"c{i}" for i in range(ROWS)]})
    expect = plain_run(w, parquet(w / "in" / "a.parquet", data), ROWS)

    def errors_named() -> None:
        errors = read_output(expect.run).column("error").to_pylist()
        assert all(e is not None and e.startswith(error) and len(e) <= 200 for e in errors[: len(paths)]), errors
        assert errors[len(paths) :] == [None] * (ROWS - len(paths))

    expect.then = errors_named
    return expect


@case("images")
def an_image_path_that_is_a_fifo(w):
    os.mkfifo(w / "pipe.jpg")
    return paths_run(w, [str(w / "pipe.jpg")], "image: not a regular file (FIFO")


@case("images")
def an_image_path_that_is_a_device(w):
    return paths_run(w, ["/dev/zero", "/dev/tty"], "image: not a regular file (device")


@case("images")
def an_image_path_that_is_a_socket(w):
    server = socket.socket(socket.AF_UNIX)
    server.bind("sock.jpg")  # relative: socket paths are short
    server.close()
    return paths_run(w, [str(w / "sock.jpg")], "image: not a regular file (socket")


@case("images")
def an_image_path_in_a_symlink_loop(w):
    os.symlink("loop.jpg", w / "loop.jpg")
    return paths_run(w, [str(w / "loop.jpg")], "image: unreadable file")


@case("images")
def an_image_path_with_a_nul_character(w):
    return paths_run(w, ["a\x00b.jpg"], "image: unreadable file")


@case("images")
def an_image_path_that_is_not_utf8(w):
    (w / "in").mkdir()
    paths = pa.Array.from_buffers(pa.string(), 1, pa.array([b"\xff\xfe.jpg"]).buffers())
    images = pa.StructArray.from_arrays([pa.nulls(1, pa.binary()), paths], ["bytes", "path"])
    good = pa.array([image_struct(i) for i in range(ROWS - 1)], IMAGE)
    data = pa.table({"image": pa.concat_arrays([images, good]), "caption": [f"c{i}" for i in range(ROWS)]})
    expect = plain_run(w, parquet(w / "in" / "a.parquet", data), ROWS)
    expect.then = lambda: assert_error(expect.run, 0, "image: path is not valid UTF-8")
    return expect


def assert_error(run: Path, row: int, error: str) -> None:
    assert read_output(run).column("error").to_pylist()[row] == error


@case("images")
def a_huge_sparse_file_that_is_not_an_image(w):
    with open(w / "huge.jpg", "wb") as f:
        f.truncate(1 << 30)  # a gigabyte of holes: refused from its first bytes
    return paths_run(w, [str(w / "huge.jpg")], "decode: not an image")


@case("images")
def an_image_path_thousands_of_characters_long(w):
    return paths_run(w, [str(w / ("x" * 250)) + "/" + "y" * 3000 + ".jpg"], "image: ")


# --- texts ----------------------------------------------------------------------------------------------------


@case("texts")
def a_caption_that_is_not_utf8(w):
    bad = pa.Array.from_buffers(pa.string(), 2, pa.array([b"\xff\xfe", b"fine"]).buffers())
    captions = pa.concat_arrays([bad, pa.array(["c"] * (ROWS - 2))])
    expect = plain_run(w, parquet(w / "in" / "a.parquet", table().set_column(1, "caption", captions)), ROWS)
    expect.then = lambda: assert_error(expect.run, 0, "text: invalid UTF-8")
    return expect


@case("texts")
def captions_of_control_characters_and_template_syntax(w):
    texts = ["\x00\x07\x1b[31m", "{text} {0} %s", "\u202eevil", "<|im_end|><|image_pad|>", "\r\n\t", "🐈" * 50]
    return plain_run(w, parquet(w / "in" / "a.parquet", table().set_column(1, "caption", pa.array(texts))), ROWS)


@case("texts")
def a_caption_of_a_megabyte(w):
    texts = ["a cat " * 40_000] + ["c"] * (ROWS - 1)
    return plain_run(w, parquet(w / "in" / "a.parquet", table().set_column(1, "caption", pa.array(texts))), ROWS)


@case("texts")
def a_caption_column_that_is_all_null(w):
    expect = plain_run(w, parquet(w / "in" / "a.parquet", table().set_column(1, "caption", pa.nulls(ROWS))), ROWS)
    expect.then = lambda: assert_error(expect.run, ROWS - 1, "text: missing (null)")
    return expect


# --- recipes --------------------------------------------------------------------------------------------------


def bad_recipe(w: Path, content: bytes | str | None, *says: str) -> Expect:
    path = w / "r.yaml"
    if content is not None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return Expect(run_args(path), 1, says)


@case("recipes")
def a_recipe_that_is_not_utf8(w):
    return bad_recipe(w, b"name: caf\xe9\n", "is not UTF-8 text")


@case("recipes")
def a_parquet_file_passed_as_the_recipe(w):
    parquet(w / "r.yaml")
    return bad_recipe(w, None, "It is a parquet file")


@case("recipes")
def a_yaml_alias_bomb(w):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(20)]
    return bad_recipe(w, "\n".join(lines) + "\nname: *u\n", "expands to more than", "Fix it there")


@case("recipes")
def a_yaml_alias_that_holds_itself(w):
    return bad_recipe(w, "name: &a [*a]\n", "refers to the value that holds it")


@case("recipes")
def yaml_nested_ten_thousand_deep(w):
    return bad_recipe(w, "name: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested too deeply")


@case("recipes")
def a_recipe_that_is_a_folder(w):
    (w / "r.yaml").mkdir()
    return bad_recipe(w, None, "is a folder")


@case("recipes")
def a_recipe_that_is_a_fifo(w):
    os.mkfifo(w / "r.yaml")
    return bad_recipe(w, None, "not a regular file")


@case("recipes")
def a_recipe_of_many_megabytes(w):
    return bad_recipe(w, "# " + "x" * (2 << 20) + "\n", "a recipe is a small YAML file")


@case("recipes")
def a_recipe_that_is_a_list(w):
    return bad_recipe(w, "- name: x\n", "must be a YAML mapping")


@case("recipes")
def an_empty_recipe(w):
    return bad_recipe(w, "", "must be a YAML mapping")


def bad_setting(w: Path, section: str, values: dict, *says: str, out: Path | None = None) -> Expect:
    data = parquet(w / "in" / "a.parquet")
    return Expect(run_args(recipe(w / "r.yaml", data, out or w / "out", **{section: values})), 1, says)


@case("recipes")
def a_gpu_that_does_not_exist(w):
    return bad_setting(w, "model", {"device": "cuda:7"}, "`model.device` = 'cuda:7'", "no GPU is visible")


@case("recipes")
def a_device_that_is_not_a_device(w):
    return bad_setting(w, "model", {"device": "banana"}, "is not a device annotator can use")


@case("recipes")
def the_meta_device(w):
    return bad_setting(w, "model", {"device": "meta"}, "is not a device annotator can use")


@case("recipes")
def flash_attention_without_flash_attn(w):
    return bad_setting(w, "model", {"attn_implementation": "flash_attention_2"}, "flash-attn package")


@case("recipes")
def negative_workers(w):
    return bad_setting(w, "batching", {"workers": -1}, "`batching.workers`")


@case("recipes")
def an_answer_that_is_not_one_token(w):
    return bad_setting(w, "prompt", {"positive": "Absolutely yes"}, "`prompt.positive`", "single token")


@case("recipes")
def an_empty_output_path(w):
    return bad_setting(w, "output", {"dir": ""}, "`output.dir` is empty")


@case("recipes")
def an_empty_input_path(w):
    return bad_setting(w, "input", {"parquet": " "}, "`input.parquet` is empty")


@case("recipes")
def a_model_folder_that_does_not_exist(w):
    return bad_setting(w, "model", {"name": "./models/qwen"}, "neither a folder here nor a Hugging Face Hub id")


@case("recipes")
def a_model_name_the_hub_cannot_hold(w):
    """`foo bar` or `{tiny}`: not a folder, and characters no Hub id has (huggingface_hub raised a traceback)."""
    return bad_setting(w, "model", {"name": "{tiny} 2"}, "neither a folder here nor a Hugging Face Hub id")


@case("recipes")
def an_output_path_that_is_a_file(w):
    (w / "out").write_text("my notes")
    return bad_setting(w, "model", {}, "is a file, not a folder")


@case("recipes")
def an_output_path_under_a_file(w):
    (w / "notes.txt").write_text("my notes")
    return bad_setting(w, "model", {}, "notes.txt' is a file, not a folder", out=w / "notes.txt" / "out")


# --- command lines and folders a careless user points at --------------------------------------------------------


@case("command-line")
def output_dir_dot_in_a_folder_full_of_files(w):
    for i in range(9):
        (w / f"photo-{i}.jpg").write_bytes(b"x")
    return bad_setting(w, "model", {}, "is not empty and is not an annotator run folder", "and ", out=Path("."))


@case("command-line")
def an_output_folder_holding_other_things(w):
    (w / "out" / "data").mkdir(parents=True)
    (w / "out" / "data" / "mine.parquet").write_bytes(b"precious")
    (w / "out" / "journal").mkdir()
    return bad_setting(w, "model", {}, "'data/', 'journal/'", "Set `output.dir` to a new folder")


@case("command-line")
def a_tilde_in_the_output_path(w):
    (w / "home").mkdir()
    expect = plain_run(w, parquet(w / "in" / "a.parquet"), ROWS, output={"dir": "~/out"})
    expect.run = w / "home" / "out"
    return expect


@case("command-line")
def make_tiny_model_into_the_current_folder(w):
    (w / "thesis.tex").write_text("years of work")
    return Expect(["make-tiny-model", "."], 1, ("is not empty", "thesis.tex", "nothing in it is replaced"))


@case("command-line")
def make_tiny_model_into_a_file(w):
    (w / "model").write_text("x")
    return Expect(["make-tiny-model", str(w / "model")], 1, ("is a file",))


@case("command-line")
def set_without_an_equals_sign(w):
    return Expect(run_args(recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), w / "out"), "--set", "model"), 1)


@case("command-line")
def set_an_unknown_key(w):
    args = run_args(recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), w / "out"), "--set", "model.nmae=x")
    return Expect(args, 1, ("`model.nmae` (from --set) is not a recipe key", "Did you mean `model.name`?"))


@case("command-line")
def set_a_value_of_a_megabyte(w):
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), w / "out")
    return Expect(run_args(r, "--set", "batching.window=" + "x" * 1_000_000), 1, ("`batching.window`",))


@case("command-line")
def a_tilde_in_report_out(w):
    """`report --out ~/r.html` writes into the home folder, as `~` does in every other path (it was taken literally)."""
    home = w / "home"
    home.mkdir()
    run = copy_of_run(w)

    def written() -> None:
        assert "annotator report" in (home / "r.html").read_text()

    return Expect(["report", str(run), "--out", "~/r.html"], 0, ("report ->",), run=home, then=written)


@case("command-line")
def export_to_a_file(w):
    """The fix offered was "empty this one first", which a file has no way to follow."""
    photo = parquet(w / "in" / "a.parquet")
    return Expect(["export", str(copy_of_run(w)), "--to", str(photo)], 1, ("is a file, not a folder",))


@case("command-line")
def export_to_a_folder_under_a_file(w):
    """It failed after starting, with "free space or fix permissions", which would not help."""
    photo = parquet(w / "in" / "a.parquet")
    to = photo / "kept"
    return Expect(["export", str(copy_of_run(w)), "--to", str(to)], 1, ("a.parquet', which is a file, not a folder",))


LONG_NAME = "d" * 300  # one name past the 255 bytes a file system allows
LONG_PATH = "/".join(["d" * 200] * 25)  # names that fit, a path past 4,096 bytes


@case("command-line")
def status_of_a_path_too_long_for_the_file_system(w):
    """Every command that stats a path the user named met ENAMETOOLONG first somewhere else: a traceback each."""
    return Expect(["status", str(w / LONG_PATH)], 1, ("cannot be used: it is too long", "give a shorter one"))


@case("command-line")
def export_to_a_name_too_long_for_the_file_system(w):
    args = ["export", str(copy_of_run(w)), "--to", str(w / LONG_NAME)]
    return Expect(args, 1, ("cannot be used: it is too long",))


@case("command-line")
def a_model_name_too_long_to_be_a_path(w):
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), w / "out")
    return Expect(run_args(r, "--set", f"model.name={LONG_NAME}"), 1, ("cannot be used: it is too long",))


@case("command-line")
def export_to_a_dangling_symbolic_link(w):
    """It failed with "File exists ... free space or fix permissions"; the link is left as it is."""
    os.symlink(w / "gone", w / "kept")
    args = ["export", str(copy_of_run(w)), "--to", str(w / "kept")]
    return Expect(args, 1, ("is a symbolic link to", "which does not exist"))


@case("command-line")
def export_rejected_into_a_symbolic_link_loop(w):
    """Path.resolve raised RuntimeError("Symlink loop") at the --to/--rejected overlap check."""
    os.symlink(w / "loop2", w / "loop1")
    os.symlink(w / "loop1", w / "loop2")
    args = ["export", str(copy_of_run(w)), "--to", str(w / "kept"), "--rejected", str(w / "loop1")]
    return Expect(args, 1, ("--rejected", "is a symbolic link to"))


@case("command-line")
def an_output_folder_whose_name_is_not_utf8(w):
    """The run crashed writing its card (UTF-8 cannot hold those bytes) and left a half-made folder; report and
    export could never read such a folder (pyarrow opens UTF-8 paths only): refused before anything is written."""
    out = os.fsdecode(os.fsencode(str(w)) + b"/caf\xe9")
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), out)
    return Expect(run_args(r), 1, ("`output.dir`", "bytes that are not UTF-8", "caf\ufffd"))


@case("command-line")
def an_input_path_that_is_not_utf8(w):
    folder = Path(os.fsdecode(os.fsencode(str(w)) + b"/caf\xe9"))
    folder.mkdir()
    with open(folder / "a.parquet", "wb") as file:  # pyarrow cannot write to that path either
        pq.write_table(table(), file)
    return Expect(run_args(recipe(w / "r.yaml", folder, w / "out")), 1, ("bytes that are not UTF-8",))


@case("command-line")
def export_to_a_folder_whose_name_is_not_utf8(w):
    """pyarrow refused the name half-way, after the folder was made, and left it behind."""
    to = os.fsdecode(os.fsencode(str(w)) + b"/kept\xe9")
    return Expect(["export", str(copy_of_run(w)), "--to", to], 1, ("--to", "bytes that are not UTF-8"))


@case("command-line")
def a_path_holding_an_emoji_code(w):
    """rich printed `:cat:` in a message as a picture of a cat."""
    return Expect(["status", str(w / ":cat:" / "run:b:")], 1, (":cat:/run:b:' does not exist",))


@case("command-line")
def resume_with_another_output_dir(w):
    """`--set output.dir` was silently ignored: the run went on in its folder, not where the user asked."""
    run = copy_of_run(w, keep_windows=1)
    args = ["resume", str(run), "--no-progress", "--set", f"output.dir={w / 'elsewhere'}"]
    return Expect(args, 1, ("--set output.dir does not apply to resume", "move the folder"), run=run)


@case("command-line")
def devices_that_are_not_devices(w):
    """The message blamed the recipe file ("Invalid recipe 'r.yaml': `engine.devices`"), which names no device."""
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), w / "out")
    return Expect(run_args(r, "--devices", "mps,cpu"), 1, ("--devices 'mps,cpu': 'mps' is not cpu, cuda or cuda:N",))


@case("command-line")
def bench_report_of_no_rows(w):
    """`bench-report --rows 0` (or -1) divided by zero after writing its synthetic run."""
    return Expect(["bench-report", "--rows", "0"], 1, ("--rows",))


@case("command-line")
def an_unknown_option(w):
    return Expect(["run", "r.yaml", "--overwirte"], 1, ("No such option",))


@case("command-line")
def a_negative_limit(w):
    args = run_args(recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), w / "out"), "--limit", "-3")
    return Expect(args, 1, ("`input.limit`",))


@case("command-line")
def resume_a_folder_that_is_not_a_run(w):
    (w / "photos").mkdir()
    (w / "photos" / "a.jpg").write_bytes(b"x")
    return Expect(["resume", str(w / "photos")], 1, ("is not a run folder",))


@case("command-line")
def resume_a_folder_that_does_not_exist(w):
    return Expect(["resume", str(w / "nowhere")], 1, ("does not exist",))


@case("command-line")
def status_of_a_folder_that_is_not_a_run(w):
    (w / "photos").mkdir()
    return Expect(["status", str(w / "photos")], 1, ("is not a run folder",))


@case("command-line")
def export_a_folder_that_is_not_a_run(w):
    (w / "photos").mkdir()
    return Expect(["export", str(w / "photos"), "--to", str(w / "kept")], 1, ("is not a run folder",))


# --- run folders: replacing, damaged, leases --------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_cache) -> Path:
    """A finished run of ROWS rows in two windows, made once; cases copy it."""
    folder = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANNOTATOR_CACHE", str(tiny_model_cache))
        data = parquet(folder / "in.parquet")
        result = runner.invoke(app, run_args(recipe(folder / "r.yaml", data, folder / "run")), catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return folder / "run"


FINISHED: dict[str, Path] = {}


def copy_of_run(w: Path, keep_windows: int | None = None) -> Path:
    """The module's finished run copied into the case's folder; with `keep_windows`, turned into an unfinished one."""
    from tests.test_resume import interrupted_copy

    if keep_windows is not None:
        return interrupted_copy(FINISHED["run"], w / "run", keep_windows)
    shutil.copytree(FINISHED["run"], w / "run")
    return w / "run"


def unchanged_after(w: Path, args: list[str], *says: str) -> Expect:
    """A command on a run folder that must change nothing anywhere (the folder included)."""
    return Expect(args, 1, says)


@case("damaged")
def overwrite_with_an_answer_that_is_not_one_token(w):
    run = copy_of_run(w)
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), run, prompt={"negative": "Not at all"})
    return unchanged_after(w, run_args(r, "--overwrite"), "`prompt.negative`")


@case("damaged")
def overwrite_with_a_column_the_output_cannot_hold(w):
    run = copy_of_run(w)
    tags = pa.array([[("k", 1)]] * ROWS, pa.map_(pa.string(), pa.int64()))
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet", table(tags=tags)), run)
    return unchanged_after(w, run_args(r, "--overwrite"), "cannot describe")


@case("damaged")
def overwrite_with_a_bad_worker_count(w):
    run = copy_of_run(w)
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), run, batching={"workers": -4})
    return unchanged_after(w, run_args(r, "--overwrite"), "`batching.workers`")


@case("damaged")
def overwrite_a_run_whose_data_holds_a_foreign_file(w):
    run = copy_of_run(w)
    (run / "data" / "notes.txt").write_text("mine")
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), run)
    return unchanged_after(w, run_args(r, "--overwrite"), "data/notes.txt", "which annotator did not write")


@case("damaged")
def overwrite_with_a_model_that_cannot_load(w):
    """The old run is set aside while the model loads (its folder's entries move), then put back file for file."""
    run = copy_of_run(w)
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), run, model={"name": "nobody/no-such-model"})
    files = {k: v for k, v in snapshot(run, skip=None).items() if v[0] != "dir"}
    expect = Expect(run_args(r, "--overwrite"), 1, ("Could not load model",), run=run)

    def put_back() -> None:
        assert {k: v for k, v in snapshot(run, skip=None).items() if v[0] != "dir"} == files
        assert_rows(run, ROWS)

    expect.then = put_back
    return expect


@case("damaged")
def overwrite_keeps_what_the_user_put_beside_the_run(w):
    run = copy_of_run(w)
    (run / "NOTES.md").write_text("how I made this")
    data = parquet(w / "in" / "a.parquet", table(3))
    expect = Expect(run_args(recipe(w / "r.yaml", data, run), "--overwrite"), 0, rows=3, run=run)

    def kept() -> None:
        assert (run / "NOTES.md").read_text() == "how I made this"
        assert not (run / ".previous-run").exists()

    expect.then = kept
    return expect


@case("damaged")
def run_into_a_finished_run_without_overwrite(w):
    run = copy_of_run(w)
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), run)
    return unchanged_after(w, run_args(r), "already holds a finished run")


@case("damaged")
def a_new_run_inside_another_runs_data(w):
    run = copy_of_run(w)
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), run / "data" / "nested")
    return unchanged_after(w, run_args(r), "is inside the run folder")


@case("damaged")
def an_export_into_another_runs_journal(w):
    run, other = copy_of_run(w), w / "other"
    shutil.copytree(run, other)
    return unchanged_after(w, ["export", str(run), "--to", str(other / "journal" / "kept")], "is inside the run folder")


def resume_of(run: Path, exit: int = 0, *says: str, rows: int | None = ROWS) -> Expect:
    return Expect(["resume", str(run), "--no-progress"], exit, says, rows=rows if exit == 0 else None, run=run)


@case("damaged")
def an_empty_manifest(w):
    run = copy_of_run(w, keep_windows=1)
    (run / "manifest.json").write_text("")
    expect = resume_of(run, 1, "manifest.json", "is damaged")
    expect.then = lambda: cli("status", run, says="damaged")
    return expect


@case("damaged")
def a_missing_manifest_with_committed_windows(w):
    run = copy_of_run(w, keep_windows=1)
    (run / "manifest.json").unlink()
    return resume_of(run, 1, "manifest.json", "is missing")


@case("damaged")
def a_missing_recipe(w):
    run = copy_of_run(w, keep_windows=1)
    (run / "recipe.yaml").unlink()
    return resume_of(run, 1, "recipe.yaml is missing or damaged")


@case("damaged")
def a_recipe_that_is_not_utf8_any_more(w):
    run = copy_of_run(w, keep_windows=1)
    (run / "recipe.yaml").write_bytes(b"\xff\xfe garbage")
    return resume_of(run, 1, "not UTF-8")


@case("damaged")
def garbage_lines_in_the_journal(w):
    run = copy_of_run(w, keep_windows=1)
    with open(run / "journal" / "main.jsonl", "ab") as journal:
        journal.write(b'[]\n{"window": "0"}\n\xff\xfe\n{"window": 1, "rows": -4}\n')
    return resume_of(run)


@case("damaged")
def a_deleted_data_folder(w):
    run = copy_of_run(w, keep_windows=1)
    shutil.rmtree(run / "data")
    return resume_of(run)


@case("damaged")
def a_deleted_journal_folder(w):
    run = copy_of_run(w, keep_windows=1)
    shutil.rmtree(run / "journal")
    return resume_of(run)


@case("damaged")
def a_finished_run_missing_a_part_file(w):
    run = copy_of_run(w)
    (run / "data" / "part-000001.parquet").unlink()
    expect = Expect(["export", str(run), "--to", str(w / "kept")], 1, ("data/part-000001.parquet is missing",))

    def repaired() -> None:
        assert json.loads(cli("status", run, "--json"))["state"] == "damaged"
        cli("resume", run, "--no-progress")
        assert_rows(run, ROWS)
        cli("export", run, "--to", w / "kept")

    expect.then = repaired
    return expect


@case("damaged")
def a_finished_run_with_an_extra_part_file(w):
    run = copy_of_run(w)
    shutil.copy(run / "data" / "part-000001.parquet", run / "data" / "part-000002.parquet")
    expect = Expect(
        ["export", str(run), "--to", str(w / "kept")], 1, ("data/part-000002.parquet is not in the journal",)
    )
    expect.then = lambda: cli("status", run, says="damaged")
    return expect


@case("damaged")
def a_finished_run_with_a_foreign_part_file(w):
    run = copy_of_run(w)
    parquet(run / "data" / "part-000000.parquet", table(9))
    expect = Expect(["export", str(run), "--to", str(w / "kept")], 1, ("not the file it wrote",))
    expect.then = lambda: cli("resume", run, exit=1, says="never overwrites files it did not write")
    return expect


@case("damaged")
def a_finished_run_with_a_stray_file_in_data(w):
    run = copy_of_run(w)
    parquet(run / "data" / "extra.parquet")
    expect = Expect(["status", str(run), "--json"], 0, ('"state": "damaged"', "data/extra.parquet"))
    expect.then = lambda: cli("export", run, "--to", w / "kept", exit=1, says="data/extra.parquet")
    return expect


@case("damaged")
def an_empty_lock_file_left_long_ago(w):
    run = copy_of_run(w, keep_windows=1)
    (run / "lock").write_text("")
    os.utime(run / "lock", (time.time() - 3600,) * 2)
    return resume_of(run)


@case("damaged")
def a_live_lease_of_another_host(w):
    from tests.test_lease import write_holder

    run = copy_of_run(w, keep_windows=1)
    write_holder(run / "lock", host="node-17", pid=4242, expires=time.time() + 600)
    expect = resume_of(run, 1, "held by pid 4242 on node-17 until", "expires by itself")
    expect.then = lambda: cli("status", run, says="held by pid 4242 on node-17 until")
    return expect


@case("damaged")
def an_expired_lease_of_another_host(w):
    from tests.test_lease import write_holder

    run = copy_of_run(w, keep_windows=1)
    write_holder(run / "lock", host="node-17", pid=4242, expires=time.time() - 5)
    return resume_of(run)


def overwrite_cut_short(w: Path, manifest_written: bool) -> Path:
    """An unfinished run, and an --overwrite of it killed before (or after) it wrote its new manifest."""
    run = copy_of_run(w, keep_windows=1)
    aside = run / ".previous-run"
    aside.mkdir()
    (aside / ".pending").write_text(json.dumps({"run_id": "new-run"}))
    for name in ("recipe.yaml", "manifest.json", "data", "journal"):
        os.rename(run / name, aside / name)
    (aside / ".moved").write_text("")
    shutil.copy(aside / "recipe.yaml", run / "recipe.yaml")
    (run / "data").mkdir()
    (run / "journal").mkdir()
    if manifest_written:
        manifest = json.loads((aside / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**manifest, "run_id": "new-run"}))
    return run


@case("damaged")
def an_overwrite_killed_before_its_manifest(w):
    run = overwrite_cut_short(w, manifest_written=False)
    expect = resume_of(run)  # the earlier run comes back and finishes

    expect.then = lambda: assert_no_set_aside(run)
    return expect


@case("damaged")
def an_overwrite_killed_after_its_manifest(w):
    run = overwrite_cut_short(w, manifest_written=True)
    expect = resume_of(run)  # the new run stands: it is done from the start
    expect.then = lambda: assert_no_set_aside(run)
    return expect


def assert_no_set_aside(run: Path) -> None:
    assert not (run / ".previous-run").exists() and not (run / ".previous-run.delete").exists()


@case("damaged")
def a_run_killed_before_its_recipe(w):
    (w / "run").mkdir()
    (w / "run" / ".annotator-run").write_text("")
    expect = resume_of(w / "run", 1, "stopped before it wrote its recipe")
    data = parquet(w / "in" / "a.parquet")
    expect.then = lambda: (
        cli("run", recipe(w / "r.yaml", data, w / "run"), "--no-progress"),
        assert_rows(w / "run", ROWS),
    )
    return expect


@case("damaged")
def export_into_the_run_folder(w):
    run = copy_of_run(w)
    return Expect(["export", str(run), "--to", str(run / "data" / "kept")], 1, ("Export into a separate folder",))


# --- filesystems ----------------------------------------------------------------------------------------------


@case("filesystems")
def an_output_folder_on_a_read_only_filesystem(w):
    (w / "ro").mkdir()
    expect = bad_setting(w, "model", {}, "Read-only file system", out=w / "ro" / "out")
    expect.fault = FaultyFS(w / "ro", errno.EROFS)
    return expect


@case("filesystems")
def resume_on_a_read_only_filesystem(w):
    run = copy_of_run(w, keep_windows=1)
    expect = Expect(["resume", str(run), "--no-progress"], 1, ("Read-only file system",))
    expect.fault = FaultyFS(run, errno.EROFS)
    return expect


@case("filesystems")
def status_on_a_read_only_filesystem(w):
    run = copy_of_run(w, keep_windows=1)
    expect = Expect(["status", str(run)], 0, ("interrupted",))
    expect.fault = FaultyFS(run, errno.EROFS)
    return expect


@case("filesystems")
def a_full_disk_before_the_run_starts(w):
    data = parquet(w / "in" / "a.parquet")
    expect = Expect(run_args(recipe(w / "r.yaml", data, w / "out")), 1, ("No space left on device",), run=w / "out")
    expect.fault = FaultyFS(w / "out", budget=0)

    def space_freed() -> None:
        cli("run", w / "r.yaml", "--no-progress")
        assert_rows(w / "out", ROWS)

    expect.then = space_freed
    return expect


@case("filesystems")
def a_full_disk_at_the_first_window(w):
    data = parquet(w / "in" / "a.parquet")
    out = w / "out"
    expect = Expect(run_args(recipe(w / "r.yaml", data, out)), 2, ("No space left on device", "annotate resume"))
    expect.run = out
    expect.fault = FaultyFS(out, budget=4000, only="part-")

    def space_freed() -> None:
        cli("resume", out, "--no-progress")
        assert_rows(out, ROWS)

    expect.then = space_freed
    return expect


@case("filesystems")
def a_full_disk_at_the_summary(w):
    out = w / "out"
    expect = Expect(run_args(recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), out)), 2, ("summary.json",))
    expect.run = out
    expect.fault = FaultyFS(out, only="summary")

    def space_freed() -> None:
        cli("resume", out, "--no-progress")
        assert_rows(out, ROWS)
        assert json.loads((out / "summary.json").read_text())["rows"] == ROWS

    expect.then = space_freed
    return expect


@case("filesystems")
def a_full_disk_at_the_end_of_an_export(w):
    run = copy_of_run(w)
    expect = Expect(["export", str(run), "--to", str(w / "kept")], 1, ("No space left on device",), run=w / "kept")
    expect.fault = FaultyFS(w / "kept", only="README")
    expect.then = lambda: not (w / "kept").exists() or pytest.fail("the failed export left files behind")
    return expect


@case("filesystems")
def export_onto_a_read_only_filesystem(w):
    run = copy_of_run(w)
    expect = Expect(["export", str(run), "--to", str(w / "kept")], 1, ("Read-only file system",))
    expect.fault = FaultyFS(w, errno.EROFS)
    return expect


def annotate_process(*args: object, env: dict | None = None, **popen) -> subprocess.Popen:
    command = [sys.executable, "-c", "from annotator.cli import main; main()", *map(str, args)]
    environment = {**os.environ, "PYTHONPATH": f"{HOOKS}{os.pathsep}{REPO}", **(env or {})}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, **popen
    )


@case("filesystems", slow=True)
def a_real_file_size_limit_mid_run(w):
    """RLIMIT_FSIZE: the kernel fails every write past 40 kB with EFBIG, pyarrow's own included."""
    import resource

    big = pa.array([image_struct(i, size=(640, 480)) for i in range(ROWS)], IMAGE)
    out = w / "out"
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet", table().set_column(0, "image", big)), out)

    def spawn() -> tuple[int, str]:
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # noqa: E731
        process = annotate_process(*run_args(r), preexec_fn=limit)
        return process.wait(timeout=120), process.stdout.read()

    def limit_lifted() -> None:
        cli("resume", out, "--no-progress")
        assert_rows(out, ROWS)

    return Expect([], 2, ("File too large", "annotate resume"), run=out, spawn=spawn, then=limit_lifted)


# --- signals --------------------------------------------------------------------------------------------------

HOOKS = Path(__file__).resolve().parent / "hooks"


def signalled(
    w: Path,
    send: Callable[[subprocess.Popen, Path], str | None],
    env: dict,
    exit: int = 2,
    extra: tuple[str, ...] = (),
    **batching,
) -> Expect:
    """A run started in a process; `send` signals it (and returns what it read of its output, if it read some)."""
    out = w / "out"
    r = recipe(w / "r.yaml", parquet(w / "in" / "a.parquet"), out, batching={"workers": 0, **batching})

    def spawn() -> tuple[int, str]:
        flags = Path(tempfile.mkdtemp(prefix="hostile-flags-"))  # outside the case's folder, which must not change
        process = annotate_process(*run_args(r, *extra), env={**env, "HOSTILE_FLAGS": str(flags)})
        try:
            seen = send(process, flags) or ""
            process.wait(timeout=60)
        finally:
            process.kill()
            shutil.rmtree(flags)
        return process.returncode, seen + process.stdout.read()

    def resumable() -> None:
        assert json.loads(cli("status", out, "--json"))["state"] == "interrupted"
        cli("resume", out, "--no-progress")
        assert_rows(out, ROWS)

    says = ("annotate resume",) if exit == 2 else ()
    return Expect([], exit, says, run=out, spawn=spawn, then=resumable)


def read_until(process: subprocess.Popen, text: str, timeout: float = 60) -> str:
    """The process's output up to and including `text` (read off its pipe unbuffered: the rest stays for later)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        assert time.monotonic() < deadline, f"{text!r} not printed within {timeout}s: {seen.decode()}"
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"the process ended before printing {text!r}: {seen.decode()}"
            seen += chunk
    return seen.decode()


def wait_for(flags: Path, name: str, timeout: float = 90) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(flags.glob(name))
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"no {name} flag within {timeout}s")


@case("signals", slow=True)
def sigterm_while_the_model_loads(w):
    def send(process, flags):
        wait_for(flags, "loading")
        process.send_signal(signal.SIGTERM)

    return signalled(w, send, {"HOSTILE_SLOW_LOAD": "1"})


@case("signals", slow=True)
def ctrl_c_while_the_model_loads(w):
    def send(process, flags):
        wait_for(flags, "loading")
        process.send_signal(signal.SIGINT)

    return signalled(w, send, {"HOSTILE_SLOW_LOAD": "1"})


# What the first Ctrl-C (or SIGTERM) prints once handled; the second is sent only then: two signals that arrive
# before the handler ran are one (a busy or loaded machine can take that long to schedule it).
STOPPING = "stopping after the current batch"


@case("signals", slow=True)
def ctrl_c_twice_during_a_forward_pass_with_workers_stuck(w):
    """The first Ctrl-C lands while the main thread computes (it asks to stop after the batch); the second quits at
    once, and must take the worker processes (stuck on the next batch's images) with it."""
    workers: list[int] = []

    def send(process, flags):
        wait_for(flags, "scoring")
        workers.extend(int(p.name.split("-")[1]) for p in wait_for(flags, "decoding-*"))
        process.send_signal(signal.SIGINT)
        seen = read_until(process, STOPPING)
        time.sleep(0.3)
        assert process.poll() is None, "the first Ctrl-C waits for the batch"
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)  # at once, whatever the workers do
        deadline = time.monotonic() + 10  # SIGKILLed: gone as soon as the kernel runs them, reaped by init
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
            time.sleep(0.05)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
        assert not alive, f"worker processes {alive} outlived the second Ctrl-C"
        return seen

    # One window of three batches of 2 images, all sent to the workers before the first batch is scored (a batch is
    # spread over the workers in chunks): the first two batches decode, the third's images never do.
    env = {"HOSTILE_STUCK_AFTER": "4", "HOSTILE_SLOW_SCORE": "1"}
    return signalled(w, send, env, workers=2, max_batch_size=2, window=6)


@case("signals", slow=True)
def ctrl_c_twice_with_json_logs(w):
    """--log-format json: a machine reads stderr, so what the two Ctrl-C print is JSON lines too (they were text)."""

    def send(process, flags):
        wait_for(flags, "scoring")
        process.send_signal(signal.SIGINT)
        seen = read_until(process, STOPPING)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)
        lines = (seen + process.stdout.read()).splitlines()
        events = [json.loads(line)["event"] for line in lines]  # every line is JSON, no blank one
        assert events[-2:] == ["stopping", "error"], lines
        return "\n".join(lines)

    return signalled(w, send, {"HOSTILE_SLOW_SCORE": "1"}, extra=("--log-format", "json"))


@case("signals", slow=True)
def one_ctrl_c_with_a_decoder_stuck(w):
    """A stop must not wait for an image's timeout (`batching.image_timeout_s`, 10 minutes here): the writer that waits
    on it is told to stop, and a wait it cannot finish is given up within a second."""

    def send(process, flags):
        wait_for(flags, "decoding-*")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)

    return signalled(w, send, {"HOSTILE_STUCK_AFTER": "0"}, workers=2, image_timeout_s=600)


@case("signals", slow=True)
def kill_9_with_workers_busy(w):
    """Nothing can stop the workers of a process killed with -9: they leave by themselves when they see it gone."""

    def send(process, flags):
        workers = [int(p.name.split("-")[1]) for p in wait_for(flags, "decoding-*")]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=15)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
            time.sleep(0.1)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
        for pid in alive:  # do not leave them behind even when the test fails
            os.kill(pid, signal.SIGKILL)
        assert not alive, f"worker processes {alive} outlived their parent"

    return signalled(w, send, {"HOSTILE_STUCK_AFTER": "0"}, exit=-signal.SIGKILL, workers=2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
