"""The run folder's life: refused unless ours, claimed, started (setting an earlier run aside recoverably), checked.

A run folder is recognised by its marker, the first thing a run writes. A run starts in this order: marker,
lease, (an earlier run set aside), recipe.yaml, data/, journal/, manifest.json. Only then does the model load.
`--overwrite` moves the earlier run's entries into `.previous-run/` with renames and deletes them only once the
new model has loaded; until the new manifest exists, `recover` puts them back. Nothing else in the folder, and
nothing outside it, is ever moved or deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from annotator.errors import AnnotatorError, is_undecoded, not_utf8_message
from annotator.sink import (
    JOURNAL_FILE,
    PART_FILE,
    PART_LEFTOVER,
    RUN_ENTRIES,
    RUN_MARKER,
    RunFolder,
    iter_entries,
    window_is_whole,
)

SET_ASIDE = ".previous-run"
DROPPING = ".previous-run.delete"
PENDING = ".pending"  # in SET_ASIDE, written before anything moves: the id of the run that replaces it
MOVED = ".moved"  # in SET_ASIDE, written once every entry has moved
SHOWN = 6  # entries named in a message
MAX_PROBLEMS = 12


def name_entries(folder: Path, names: list[str]) -> str:
    """`a.txt, b/, c.parquet and 12 more`."""
    shown = [n + ("/" if (folder / n).is_dir() else "") for n in names[:SHOWN]]
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(repr(n) for n in shown) + more


def _fs_error(action: str, path: Path, exc: OSError) -> AnnotatorError:
    return AnnotatorError(
        f"Cannot {action} {str(path)!r}: {exc.strerror or exc}. Choose an `output.dir` you can write to (or free "
        "space there), then run again."
    )


def check_target(folder: RunFolder) -> None:
    """Refuse an output path a run may not write into, before anything is written: a file, a path under a file,
    or an existing folder that is neither empty nor a run folder."""
    root = folder.root
    if is_undecoded(os.path.abspath(root)):  # the run would write it, but report and export could not read it
        raise AnnotatorError(f"`output.dir`: {not_utf8_message(os.path.abspath(root))}")
    holder = enclosing_run(root)
    if holder is not None:
        raise AnnotatorError(
            f"`output.dir` {str(root)!r} is inside the run folder {str(holder)!r}, which holds only what that run "
            "writes (a folder there would make it damaged). Set `output.dir` to a folder outside any run folder."
        )
    try:
        info = os.stat(root)
    except FileNotFoundError:
        _check_parents(root)
        return
    except NotADirectoryError:
        _check_parents(root)
        return
    except OSError as exc:
        raise _fs_error("use the output folder", root, exc) from None
    if not stat.S_ISDIR(info.st_mode):
        raise AnnotatorError(
            f"`output.dir` {str(root)!r} is a file, not a folder. Set `output.dir` to a new folder (a run writes its "
            "files inside it)."
        )
    if folder.is_ours():
        return
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise _fs_error("list the output folder", root, exc) from None
    if names:
        raise AnnotatorError(
            f"`output.dir` {str(root)!r} is not empty and is not an annotator run folder: it holds "
            f"{name_entries(root, names)}. A run writes only into a new folder, an empty one, or a folder of its own "
            f"(marked by {RUN_MARKER}), so that it never changes files it did not write. Set `output.dir` to a new "
            "folder."
        )


def enclosing_run(path: Path) -> Path | None:
    """The run folder that holds `path` (strictly inside it, symbolic links resolved), or None."""
    for parent in Path(os.path.realpath(path)).parents:
        if (parent / RUN_MARKER).exists():
            return parent
    return None


def _check_parents(root: Path) -> None:
    for parent in root.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise AnnotatorError(
                    f"`output.dir` {str(root)!r} cannot be created: {str(parent)!r} is a file, not a folder. Set "
                    "`output.dir` to a folder path."
                )
            return


@dataclass
class Claim:
    """What claiming a folder created, so that a start whose model fails to load can take it back."""

    folders: list[Path] = field(default_factory=list)
    marker: bool = False


def claim(folder: RunFolder) -> Claim:
    """Create the folder if needed and write its marker: the first thing a run writes."""
    made = Claim()
    folder.claimed = made
    missing = [p for p in [folder.root, *folder.root.parents] if not os.path.lexists(p)]
    try:
        for path in reversed(missing):
            os.mkdir(path)
            made.folders.append(path)
        fd = os.open(folder.marker_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return made  # ours already (or a racing run's: the lease decides between us)
    except OSError as exc:
        for path in reversed(made.folders):
            _rmdir(path)
        raise _fs_error("create the run folder", folder.root, exc) from None
    made.marker = True
    with os.fdopen(fd, "w") as marker:
        # Its presence is what counts; the content only says what it is.
        marker.write(json.dumps({"annotator_run": 1, "created": time.time()}) + "\n")
    return made


def _rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (someone put something there) or gone: leave it
        os.rmdir(path)


def foreign_run_entries(folder: RunFolder) -> list[str]:
    """Entries inside data/ and journal/ that a run does not write (moving the folder would take them along)."""
    found = [f"data/{n}" for n in iter_entries(folder.data_dir) if not _ours_in_data(n)]
    found += [f"journal/{n}" for n in iter_entries(folder.journal_dir) if not JOURNAL_FILE.fullmatch(n)]
    return found


def _ours_in_data(name: str) -> bool:
    return bool(PART_FILE.fullmatch(name) or PART_LEFTOVER.fullmatch(name))


def _owned(folder: RunFolder, name: str) -> bool:
    """Whether the top-level entry `name` exists and is the run's (a README.md only when it is the run's card)."""
    path = folder.root / name
    if name == "README.md":
        from annotator.card import RUN_CARD_MARKER

        try:
            return RUN_CARD_MARKER in path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return os.path.lexists(path)


def start(folder: RunFolder, recipe_yaml: str, manifest: dict) -> None:
    """Under the lease: set any earlier run aside, then write recipe, data/, journal/ and, last, the manifest."""
    try:
        recover(folder)
        present = [name for name in RUN_ENTRIES if _owned(folder, name)]
        if present:
            _set_aside(folder, present, manifest["run_id"])
        folder.write_text(folder.recipe_path, recipe_yaml)
        folder.ensure_dirs()
        folder.write_text(folder.manifest_path, json.dumps(manifest, indent=2))
    except OSError as exc:
        raise _fs_error("write the run folder", folder.root, exc) from None


def _set_aside(folder: RunFolder, names: list[str], run_id: str) -> None:
    aside = folder.root / SET_ASIDE
    aside.mkdir()
    folder.write_text(aside / PENDING, json.dumps({"run_id": run_id}))
    for name in names:
        os.rename(folder.root / name, aside / name)
    folder.write_text(aside / MOVED, "")


def recover(folder: RunFolder) -> str | None:
    """Settle a start that was cut short: the new run stands if its manifest was written, else the earlier run
    comes back. Returns what was done, or None when there was nothing to settle."""
    dropping = folder.root / DROPPING
    if dropping.exists():
        shutil.rmtree(dropping)
    for name in RUN_ENTRIES:  # the hidden files of atomic writes that were cut
        (folder.root / f".{name}.tmp").unlink(missing_ok=True)
    aside = folder.root / SET_ASIDE
    if not aside.is_dir():
        return None
    try:
        pending = json.loads((aside / PENDING).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        shutil.rmtree(aside)  # cut short before anything moved
        return None
    try:
        current = json.loads(folder.manifest_path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        current = None
    if current == pending:
        drop_previous(folder)
        return "dropped the run it replaced"
    restore_previous(folder)
    return "put the earlier run back"


def restore_previous(folder: RunFolder) -> None:
    """Put the set-aside run back. What the new start wrote goes first, its manifest first; then `.moved` goes, so
    that a restore cut short and done again never takes an entry already moved back for the new run's."""
    aside = folder.root / SET_ASIDE
    if (aside / MOVED).exists():
        for name in RUN_ENTRIES:  # every entry of ours at the top now belongs to the new run, which committed nothing
            if _owned(folder, name):
                _remove(folder.root / name)
        (aside / MOVED).unlink()
    for name in RUN_ENTRIES:
        if os.path.lexists(aside / name) and not os.path.lexists(folder.root / name):
            os.rename(aside / name, folder.root / name)
    shutil.rmtree(aside)


def drop_previous(folder: RunFolder) -> None:
    """Delete the set-aside run (the new run's model has loaded): one rename, so a cut never leaves half of it."""
    aside = folder.root / SET_ASIDE
    if aside.is_dir():
        dropping = folder.root / DROPPING
        os.rename(aside, dropping)
        shutil.rmtree(dropping)


def undo_start(folder: RunFolder, made: Claim) -> None:
    """A start that failed (its model did not load, its folder could not be written): leave the folder as it was.

    Best effort: where the filesystem refuses (read-only, gone), what is left settles at the next run (`recover`).
    """
    try:
        if (folder.root / SET_ASIDE).is_dir():
            restore_previous(folder)
        else:
            for name in RUN_ENTRIES:
                if _owned(folder, name):
                    _remove(folder.root / name)
    except OSError:
        pass
    folder.release_lock()
    if made.marker:
        folder.marker_path.unlink(missing_ok=True)
    for path in reversed(made.folders):
        _rmdir(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Problem:
    """One way a run folder does not add up; `repairable` ones `annotate resume` fixes by redoing windows."""

    message: str
    repairable: bool = False

    def __str__(self) -> str:
        return self.message


def problems(folder: RunFolder) -> list[Problem]:
    """What does not add up between data/, the journals and the manifest: missing, extra or foreign files."""
    try:
        manifest = folder.manifest()
    except AnnotatorError as exc:
        return [Problem(str(exc))]
    found = []
    if not folder.recipe_path.is_file():
        found.append(Problem(f"{str(folder.recipe_path)!r} is missing"))
    # A journaled window that is no longer whole (a pilot's last one, once grown) is redone: its file may change.
    records = {w: r for w, r in folder.journal_records().items() if window_is_whole(r, manifest)}
    files = {}
    for name in iter_entries(folder.data_dir):
        match = PART_FILE.fullmatch(name)
        if match:
            files[int(match.group(1))] = folder.data_dir / name
        elif not PART_LEFTOVER.fullmatch(name):
            found.append(Problem(f"data/{name} is not a file annotator writes (move it out of the run folder)"))
    total, window = manifest.get("total_rows"), manifest["window"]
    expected = -(-total // window) if isinstance(total, int) else None
    for index, record in sorted(records.items()):
        name = folder.window_file(index).name
        if index not in files:
            found.append(Problem(f"data/{name} is missing (window {index} is in the journal)", repairable=True))
        elif "bytes" in record and files[index].stat().st_size != record["bytes"]:
            size = files[index].stat().st_size
            found.append(
                Problem(f"data/{name} has {size} bytes, but the run wrote {record['bytes']}: not the file it wrote")
            )
    for index, path in sorted(files.items()):
        if index not in records and (folder.finished or (expected is not None and index >= expected)):
            found.append(Problem(f"data/{path.name} is not in the journal (not written by this run)"))
    if folder.finished and expected is not None:
        gaps = [i for i in range(expected) if i not in records]
        if gaps:
            found.append(
                Problem(f"{len(gaps)} window(s) missing from the journal (first: window {gaps[0]})", repairable=True)
            )
    if len(found) > MAX_PROBLEMS:
        found = [*found[:MAX_PROBLEMS], Problem(f"and {len(found) - MAX_PROBLEMS} more")]
    return found
