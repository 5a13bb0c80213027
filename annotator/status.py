"""`annotate status`: progress, ETA, counts, label split, prob histogram, errors, lease and integrity of a run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from annotator.errors import AnnotatorError
from annotator.folder import SET_ASIDE, problems
from annotator.lease import lease_state
from annotator.progress import format_duration
from annotator.recipe import read_recipe_file
from annotator.run import summarize
from annotator.scores import kept_shares
from annotator.sink import RUN_MARKER, RunFolder, latest_run


def session_rate(records: list[dict[str, Any]], running_since: float | None) -> tuple[float | None, bool]:
    """`rows_per_s` of the latest session (rows it committed per second since its model loaded), and whether it
    is the live one. A live session is measured up to now, so a stalled run shows a falling rate."""
    sessions = [r["session_started"] for r in records if r.get("session_started")]
    if not sessions:  # journals from before sessions were recorded: first to last commit
        if len(records) < 2 or records[-1]["committed_at"] <= records[0]["committed_at"]:
            return None, False
        rows = sum(r["rows"] for r in records[1:])
        return round(rows / (records[-1]["committed_at"] - records[0]["committed_at"]), 3), False
    started = max(sessions)
    live = running_since is not None and started >= running_since
    if running_since is not None and not live:
        return None, False  # the running session has committed nothing yet (loading the model, first window)
    mine = [r for r in records if r.get("session_started") == started]
    end = time.time() if live else max(r["committed_at"] for r in mine)
    return (round(sum(r["rows"] for r in mine) / (end - started), 3) if end > started else None), live


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
    holder = folder.lock_holder()
    damage = problems(folder) if folder.manifest_path.exists() else []
    manifest = _manifest_or_none(folder)
    summary = summarize(folder)
    records = sorted(folder.committed().values(), key=lambda r: r["committed_at"])
    total = manifest.get("total_rows") if manifest else None
    window = manifest.get("window") if manifest else None
    eta_s = rows_per_s = None
    if holder is not None:
        state, next_step = "running", None
    elif not folder.manifest_path.exists():
        state = "not started"
        next_step = f"annotate resume {root}" if folder.recipe_path.exists() else "annotate run RECIPE"
    elif damage:
        state = "damaged"
        next_step = f"annotate resume {root}" if all(p.repairable for p in damage) else "see the problems above"
    elif folder.finished:
        state, next_step = "finished", None
    else:
        state, next_step = "interrupted", f"annotate resume {root}"
    if state == "finished":
        finished = _json_or_empty(folder.summary_path)
        rows_per_s = finished.get("rows_per_s", finished.get("pairs_per_s"))
    elif state != "damaged":
        rows_per_s, live = session_rate(records, holder.since if holder is not None else None)
        if live and rows_per_s and total is not None:
            eta_s = round(max(0, total - summary["rows"]) / rows_per_s, 1)
    notes = [str(p) for p in damage]
    if (root / SET_ASIDE).is_dir() and holder is None:
        notes.append("an earlier run is set aside by an interrupted --overwrite; the next resume or run settles it")
    rows = summary["rows"]
    return {
        "output_dir": str(root),
        "state": state,
        "rows": f"{rows} / {total}" if total is not None else str(rows),
        "rows_done": rows,
        "total_rows": total,
        "windows": f"{summary['windows']} / {-(-total // window)}" if total and window else str(summary["windows"]),
        "scored": summary["scored"],
        "errors": summary["errors"],
        "error_kinds": summary["error_kinds"],
        "positives": summary["positives"],
        "negatives": None if summary["positives"] is None else summary["scored"] - summary["positives"],
        "threshold": _threshold(folder) if summary["positives"] is not None else None,
        "kept_share": round(summary["positives"] / rows, 4) if rows and summary["positives"] is not None else None,
        "kept_share_at": kept_shares(summary["prob_histogram"], rows) if summary["prob_histogram"] else None,
        "prob_histogram": summary["prob_histogram"],
        **{k: summary[k] for k in ("answers", "questions") if k in summary},
        "rows_per_s": rows_per_s,
        "eta_s": eta_s,
        "eta": format_duration(eta_s) if eta_s is not None else None,
        "lock": lease["describe"] if lease else "free",
        "problems": notes,
        "next": next_step,
    }


def _manifest_or_none(folder: RunFolder) -> dict[str, Any] | None:
    try:
        return folder.manifest()
    except AnnotatorError:
        return None


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _threshold(folder: RunFolder) -> float | None:
    """The run's threshold from its frozen recipe; None when that is missing or damaged (`problems` says so)."""
    try:
        threshold = read_recipe_file(folder.recipe_path)["output"]["threshold"]
    except (AnnotatorError, KeyError, TypeError):
        return None
    return threshold if isinstance(threshold, int | float) else None
