"""`annotate status`: progress, counts, label split, errors, lease and integrity of a run folder, from its journals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from annotator.errors import AnnotatorError
from annotator.folder import SET_ASIDE, problems
from annotator.lease import lease_state
from annotator.run import summarize
from annotator.sink import RUN_MARKER, RunFolder, latest_run


def run_status(output_dir: Path | None) -> dict[str, Any]:
    """What a run folder holds, never writing to it; `state`: finished, running, interrupted, damaged, not started."""
    folder = RunFolder(output_dir) if output_dir else latest_run(Path("outputs"))
    if folder is None:
        raise AnnotatorError("No run under 'outputs'. Pass the run folder: `annotate status OUTPUT_DIR`.")
    root = folder.root
    if not folder.is_ours():
        what = "does not exist" if not root.exists() else f"is not a run folder (no {RUN_MARKER})"
        raise AnnotatorError(f"{str(root)!r} {what}. Pass the output folder of a run.")
    lease = lease_state(folder.lock_path)
    live = lease is not None and lease["live"]
    damage = problems(folder) if folder.manifest_path.exists() else []
    manifest = _manifest_or_none(folder)
    summary = summarize(folder)
    total = manifest.get("total_rows") if manifest else None
    window = manifest.get("window") if manifest else None
    if live:
        state, next_step = "running", None
    elif not folder.manifest_path.exists():
        state = "not started"
        next_step = f"annotate resume {root}" if folder.recipe_path.exists() else "annotate run RECIPE"
    elif damage:
        state = "damaged"
        repairable = all(p.repairable for p in damage)
        next_step = f"annotate resume {root}" if repairable else "move the files named above out of data/"
    elif folder.finished:
        state, next_step = "finished", None
    else:
        state, next_step = "interrupted", f"annotate resume {root}"
    notes = [str(p) for p in damage]
    if (root / SET_ASIDE).is_dir() and not live:
        notes.append("an earlier run is set aside by an interrupted --overwrite; the next resume or run settles it")
    return {
        "output_dir": str(root),
        "state": state,
        "rows": f"{summary['rows']} / {total}" if total is not None else str(summary["rows"]),
        "rows_done": summary["rows"],
        "total_rows": total,
        "windows": f"{summary['windows']} / {-(-total // window)}" if total and window else str(summary["windows"]),
        "scored": summary["scored"],
        "errors": summary["errors"],
        "error_kinds": summary["error_kinds"],
        "positives": summary["positives"],
        "negatives": summary["scored"] - summary["positives"],
        "rows_per_s": _rows_per_s(folder),
        "lock": lease["describe"] if lease else "free",
        "problems": notes,
        "next": next_step,
    }


def _manifest_or_none(folder: RunFolder) -> dict[str, Any] | None:
    try:
        return folder.manifest()
    except AnnotatorError:
        return None


def _rows_per_s(folder: RunFolder) -> float | None:
    if folder.finished:
        try:
            return json.loads(folder.summary_path.read_bytes()).get("pairs_per_s")
        except (OSError, ValueError, AttributeError):
            return None
    records = sorted(folder.committed().values(), key=lambda r: r["committed_at"])
    if len(records) >= 2 and records[-1]["committed_at"] > records[0]["committed_at"]:
        rows = sum(r["rows"] for r in records[1:])
        return round(rows / (records[-1]["committed_at"] - records[0]["committed_at"]), 2)
    return None
