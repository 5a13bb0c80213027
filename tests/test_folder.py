"""The run folder's life: an --overwrite cut at any step leaves the earlier run or the new one, never a mix."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path

import pytest

from annotator.folder import SET_ASIDE, claim, recover, restore_previous, start
from annotator.sink import RunFolder


class Killed(BaseException):
    """The process died here."""


def old_run(root: Path) -> RunFolder:
    folder = RunFolder(root)
    claim(folder)
    (root / "recipe.yaml").write_text("name: old\n")
    (root / "manifest.json").write_text(json.dumps({"run_id": "old", "window": 4}))
    (root / "summary.json").write_text("{}")
    (root / "data").mkdir()
    (root / "data" / "part-000000.parquet").write_bytes(b"old rows")
    (root / "journal").mkdir()
    (root / "journal" / "main.jsonl").write_text('{"window": 0}\n')
    (root / "NOTES.md").write_text("mine")
    return folder


def contents(root: Path) -> dict[str, bytes | None]:
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            found[os.path.relpath(os.path.join(folder, name), root)] = Path(folder, name).read_bytes()
    return found


NEW_MANIFEST = {"run_id": "new", "window": 4}


def the_new_run(root: Path) -> dict[str, bytes | None]:
    return {
        ".annotator-run": (root / ".annotator-run").read_bytes(),
        "NOTES.md": b"mine",
        "recipe.yaml": b"name: new\n",
        "manifest.json": json.dumps(NEW_MANIFEST, indent=2).encode(),
        "data": None,
        "journal": None,
    }


def dying_at(step: int, monkeypatch) -> list[str]:
    """Every filesystem change from now on counts as a step; the process dies before step `step`."""
    done: list[str] = []

    def counted(name, real):
        def change(*args, **kwargs):
            if name != "open" or any(c in (args[1] if len(args) > 1 else kwargs.get("mode", "r")) for c in "wax+"):
                if len(done) == step:
                    raise Killed(name)
                done.append(name)
            return real(*args, **kwargs)

        return change

    for name in ("rename", "replace", "mkdir", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, counted(name, getattr(os, name)))
    monkeypatch.setattr(builtins, "open", counted("open", builtins.open))
    return done


def test_an_overwrite_cut_at_any_step_leaves_the_earlier_run_or_the_new_one(tmp_path):
    steps = None
    step = 0
    while steps is None or step <= steps:
        root = tmp_path / f"cut-{step}"
        folder = old_run(root)
        before = contents(root)
        with pytest.MonkeyPatch.context() as patch:
            done = dying_at(step, patch)
            try:
                start(folder, "name: new\n", NEW_MANIFEST)
                steps = len(done)  # the first uncut start counts the steps
            except Killed:
                pass
        recover(folder)
        after = contents(root)
        assert after in (before, the_new_run(root)), f"cut before step {step}: {sorted(after)}"
        step += 1
    assert steps > 10


def test_a_failed_load_puts_the_earlier_run_back_even_when_cut_while_doing_so(tmp_path):
    """Its first step deletes the new manifest: cut before it, the new run stands (as if cut during the load)."""
    for step in range(40):
        root = tmp_path / f"cut-{step}"
        folder = old_run(root)
        before = contents(root)
        start(folder, "name: new\n", NEW_MANIFEST)
        with pytest.MonkeyPatch.context() as patch:
            dying_at(step, patch)
            try:
                restore_previous(folder)
                finished = True
            except Killed:
                finished = False
        recover(folder)
        allowed = [before, the_new_run(root)] if step == 0 else [before]
        assert contents(root) in allowed, f"cut before step {step}"
        if finished:
            break
    else:
        pytest.fail("the restore never finished")


def test_recover_deletes_a_set_aside_run_whose_deletion_was_cut(tmp_path):
    folder = old_run(tmp_path / "run")
    start(folder, "name: new\n", NEW_MANIFEST)
    os.rename(tmp_path / "run" / SET_ASIDE, tmp_path / "run" / ".previous-run.delete")
    shutil.rmtree(tmp_path / "run" / ".previous-run.delete" / "journal")  # half deleted
    recover(folder)
    assert contents(tmp_path / "run") == the_new_run(tmp_path / "run")
