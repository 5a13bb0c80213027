"""Starting a run: every check first, then the run folder claimed and written in order; what resume refuses."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from annotator import __version__
from annotator.card import input_card
from annotator.checks import check_run
from annotator.errors import AlreadyFinished, AnnotatorError
from annotator.folder import Claim, claim, foreign_run_entries, name_entries, problems, recover, start, undo_start
from annotator.recipe import Recipe, frozen_recipe_yaml, merge, parse_overrides, read_recipe_file, validate_recipe
from annotator.sink import RUN_MARKER, RunFolder, latest_run

RESULT_KEYS_HINT = "model, prompt, questions, pixels, answers, input columns, thresholds"


def find_latest_unfinished(root: Path = Path("outputs")) -> Path:
    folder = latest_run(root, unfinished=True)
    if folder is None:
        raise AnnotatorError(
            f"No unfinished run under {str(root)!r}. Pass the run folder: `annotate resume OUTPUT_DIR`."
        )
    return folder.root


def prepare_run(recipe: Recipe, overwrite: bool) -> tuple[RunFolder, Any]:
    """Check everything that can fail (no model yet), then start the run folder: marker, lease, recipe, manifest.

    A run already there is set aside, not deleted: it is put back if the new model cannot load (`Annotator`).
    """
    checked = check_run(recipe)
    folder = RunFolder(recipe.output_dir)
    _refuse_to_replace(folder, overwrite)
    claim(folder)
    folder.acquire_lock()  # held by another process: the marker stays, the folder is theirs to use
    try:
        recover(folder)
        _refuse_to_replace(folder, overwrite)  # again, under the lease: another process may have run meanwhile
        start(folder, frozen_recipe_yaml(recipe), _manifest(recipe, checked.source))
    except AnnotatorError:
        undo_start(folder, folder.claimed)
        raise
    except BaseException:
        folder.release_lock()  # a signal: what was written settles at the next run or resume (`recover`)
        raise
    return folder, checked.source


def _refuse_to_replace(folder: RunFolder, overwrite: bool) -> None:
    """A run folder holding committed work is replaced only with --overwrite, and never with foreign files in it."""
    if not folder.is_ours():
        return
    foreign = foreign_run_entries(folder)
    if foreign:
        raise AnnotatorError(
            f"The run folder {str(folder.root)!r} holds {name_entries(folder.root, foreign)}, which annotator did "
            "not write; starting a run there would move them away with the old run. Move them out of the run "
            "folder first."
        )
    if overwrite:
        return
    if folder.finished:
        raise AnnotatorError(
            f"{str(folder.root)!r} already holds a finished run. Use another `output.dir`, or add "
            "--overwrite to replace it."
        )
    if folder.committed():
        raise AnnotatorError(
            f"{str(folder.root)!r} holds an unfinished run. Continue it with `annotate resume {folder.root}`, "
            "or add --overwrite to start again from scratch."
        )
    # A run that committed nothing (stopped while its model loaded) has nothing to lose: it is started again.


def _manifest(recipe: Recipe, source: Any) -> dict[str, Any]:
    return {
        "annotator_version": __version__,
        "run_id": secrets.token_hex(8),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "result_fingerprint": recipe.result_fingerprint(),
        "input_fingerprint": source.fingerprint(),
        "window": recipe.batching.window,
        "total_rows": source.total_rows,
        "limit": recipe.input.limit,
        "input_card": input_card(recipe.model_dump(mode="json"), source),
    }


def prepare_resume(output_dir: Path, overrides: list[str]) -> tuple[Recipe, RunFolder, Any]:
    """Take the lease, settle an interrupted start, reload the frozen recipe, refuse changed input or results.

    A run stopped before its manifest was written (nothing committed) starts again from its frozen recipe.
    """
    folder = RunFolder(output_dir)
    if not folder.is_ours():
        what = "does not exist" if not folder.root.exists() else f"is not a run folder (no {RUN_MARKER})"
        raise AnnotatorError(f"{str(folder.root)!r} {what}. Start a run with `annotate run RECIPE`.")
    folder.acquire_lock()
    try:
        recover(folder)
        recipe = _frozen_recipe(folder, overrides)
        starting = not folder.manifest_path.exists() and not folder.journal_records()
        if not starting:
            grows = _check_settings(folder, recipe, overrides)
        checked = check_run(recipe)
        if starting:
            folder.claimed = Claim()  # nothing created: a failed load puts the old recipe back
            start(folder, frozen_recipe_yaml(recipe), _manifest(recipe, checked.source))
            return recipe, folder, checked.source
        _check_input(folder, recipe, checked.source, grows)
    except BaseException:
        folder.release_lock()
        raise
    return recipe, folder, checked.source


def _frozen_recipe(folder: RunFolder, overrides: list[str]) -> Recipe:
    if not folder.recipe_path.exists() and not folder.manifest_path.exists():
        raise AnnotatorError(
            f"The run in {str(folder.root)!r} was stopped before it wrote its recipe, so nothing was done. Start it "
            "again with `annotate run RECIPE`."
        )
    try:
        frozen = read_recipe_file(folder.recipe_path)
    except AnnotatorError as exc:
        raise AnnotatorError(
            f"The run folder's recipe.yaml is missing or damaged ({exc}). Start the run again with "
            "`annotate run RECIPE --overwrite`."
        ) from None
    if folder.manifest_path.exists():
        # The manifest's limit is the run's: growing a pilot writes it last (see `grow`), recipe.yaml's before.
        limit = folder.manifest().get("limit")
        section = frozen.setdefault("input", {})
        if isinstance(section, dict):
            section["limit"] = limit
    changes = parse_overrides(overrides)
    output = changes.get("output")
    if isinstance(output, dict) and "dir" in output:  # never taken: the run goes on where it is
        raise AnnotatorError(
            f"--set output.dir does not apply to resume: a run goes on in its own folder, {str(folder.root)!r}. To "
            "have it elsewhere, move the folder there and resume that, or start a new run with `annotate run`."
        )
    engine, ran_on = changes.get("engine"), frozen.get("engine")
    if isinstance(engine, dict) and "kind" in engine and isinstance(ran_on, dict):
        # Another engine finishes the run (engines never change results): the devices or Ray settings of the one
        # it ran on do not apply to it; what this resume sets does.
        frozen["engine"] = {k: v for k, v in ran_on.items() if k not in ("devices", "ray")}
    recipe = validate_recipe(merge(frozen, changes), source=str(folder.recipe_path), changes=changes)
    recipe.output.dir = str(folder.root)  # the folder may have been moved since: it is where it is now
    return recipe


def _check_settings(folder: RunFolder, recipe: Recipe, overrides: list[str]) -> bool:
    """What resume refuses in the folder and the recipe alone; returns whether the run grows (a larger limit)."""
    manifest = folder.manifest()
    damage = problems(folder)
    repairable = [p for p in damage if p.repairable]
    if len(damage) > len(repairable):
        raise AnnotatorError(
            f"The run folder {str(folder.root)!r} is damaged: {'; '.join(str(p) for p in damage if not p.repairable)}."
            " Resume never overwrites files it did not write: move those out of data/, then resume."
        )
    grows = recipe.input.limit != manifest.get("limit")
    if grows:
        check_growth(manifest.get("limit"), recipe.input.limit)
    if recipe.result_fingerprint() != manifest.get("result_fingerprint"):
        fingerprint = manifest.get("result_fingerprint")
        if _frozen_recipe(folder, []).result_fingerprint() != fingerprint:
            started_by = manifest.get("annotator_version")
            other = f", or annotator {started_by} started the run and this one is {__version__}"
            raise AnnotatorError(
                f"The settings in the run folder's recipe.yaml that change results ({RESULT_KEYS_HINT}) are not those "
                f"the run started with: the file was edited since{other if started_by != __version__ else ''}. "
                "Resuming would mix two settings: put the file back as it was, or start a new run with "
                "`annotate run ... --overwrite`."
            )
        changing = _result_changing(folder, overrides, fingerprint)
        raise AnnotatorError(
            f"{', '.join(f'--set {key}' for key in changing)} would change results ({RESULT_KEYS_HINT}), so the "
            "resumed output would mix two settings. Resume without them, or start a new run with "
            "`annotate run ... --overwrite`."
        )
    if recipe.batching.window != manifest["window"]:
        raise AnnotatorError(
            f"`batching.window` cannot change on resume (the run uses {manifest['window']}): windows are the unit "
            "of resume. Drop that --set."
        )
    if not grows and folder.finished and not repairable:  # last: a --set it would refuse is refused, not ignored
        raise AlreadyFinished(
            f"The run in {str(folder.root)!r} is already finished: nothing to resume. See `annotate status "
            f"{folder.root}`. To annotate more rows of its input, grow it: `annotate resume {folder.root} --set "
            "input.limit=M` (or =null for all)."
        )
    return grows


def _result_changing(folder: RunFolder, overrides: list[str], fingerprint: Any) -> list[str]:
    """The --set keys that, each alone on the frozen recipe, change results (or make it invalid); all of them where
    only several together do."""
    changing = []
    for pair in overrides:
        try:
            changed = _frozen_recipe(folder, [pair]).result_fingerprint() != fingerprint
        except AnnotatorError:
            changed = True
        if changed:
            changing.append(pair)
    return [pair.partition("=")[0].strip() for pair in changing or overrides]


def _check_input(folder: RunFolder, recipe: Recipe, source: Any, grows: bool) -> None:
    """The input must be the one the run started with; a finished run with missing windows is reopened."""
    manifest = folder.manifest()
    changed = _input_change(manifest.get("input_fingerprint"), source.fingerprint())
    if changed:
        raise AnnotatorError(
            f"The input has changed since this run started: {changed}. Resuming would mix results of two inputs; "
            "start a new run with --overwrite instead."
        )
    if not grows and source.total_rows != manifest.get("total_rows"):
        raise AnnotatorError(
            f"The input has changed since this run started: it has {source.total_rows} rows now, "
            f"{manifest.get('total_rows')} then. Resuming would mix results of two inputs; start a new run with "
            "--overwrite instead."
        )
    if folder.finished and not grows:
        folder.summary_path.unlink()  # missing windows are redone: the run is unfinished until they are back


def _input_change(recorded: Any, current: Any) -> str | None:
    """What differs between the manifest's input fingerprint and the input now, in words; None if nothing."""
    if not (isinstance(recorded, list) and isinstance(current, list)):
        return None if recorded == current else "the dataset's files or revision differ"
    if len(recorded) != len(current):
        return f"{len(current)} input files now, {len(recorded)} when it started"
    for was, now in zip(recorded, current, strict=True):
        if not isinstance(was, dict) or was.get("file") != now["file"]:
            return f"the files differ ({now['file']!r} is new)"
        for key, what in (("size", "its size"), ("footer_sha256", "its parquet footer"), ("mtime_ns", "its time")):
            if key in was and was[key] != now[key]:
                hint = ""
                if key == "mtime_ns":
                    seconds = was[key] / 1e9
                    hint = (
                        f" (size and footer are the same: an edit in place, or a copy that did not keep times; if "
                        f"its content is really unchanged, `touch -d @{seconds:.9f} {now['file']}` restores the time)"
                    )
                return f"{now['file']!r} was modified ({what} changed){hint}"
    return None


def check_growth(old_limit: int | None, new_limit: int | None) -> None:
    """A resumed run's `input.limit` may only grow: committed rows are never dropped."""
    keep_fewer = (
        "To keep fewer rows, export them (`annotate export RUN_DIR --to DIR ...`), or start a new run with --overwrite."
    )
    if old_limit is None:
        raise AnnotatorError(
            f"`input.limit` can only grow on resume, and this run covers the whole input already: --set "
            f"input.limit={new_limit} has nothing to add. Resume without it. {keep_fewer}"
        )
    if new_limit is not None and new_limit < old_limit:
        raise AnnotatorError(
            f"`input.limit` can only grow on resume: this run covers the first {old_limit} rows, and --set "
            f"input.limit={new_limit} would drop rows it has. {keep_fewer}"
        )


def grow(folder: RunFolder, recipe: Recipe, total_rows: int | None) -> None:
    """Extend a pilot to `recipe.input.limit` (checked by `prepare_resume`, done once the model has loaded).

    Each step leaves a run that `annotate resume` finishes exactly: without summary.json the pilot is only
    unfinished; the manifest (written atomically, and whose limit resume trusts over recipe.yaml's) then makes
    it the grown run, in which the pilot's last window, if short, no longer counts as committed (`committed`).
    """
    manifest = folder.manifest()
    folder.summary_path.unlink(missing_ok=True)
    folder.write_text(folder.recipe_path, frozen_recipe_yaml(recipe))
    grown = {**manifest, "limit": recipe.input.limit, "total_rows": total_rows}
    folder.write_text(folder.manifest_path, json.dumps(grown, indent=2))
