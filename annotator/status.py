"""`annotate status`: progress, ETA, counts, label split, prob histogram, errors, lease, integrity and writers of a
run."""

from __future__ import annotations

import contextlib
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
from annotator.sink import RUN_MARKER, RunFolder, latest_run, read_journal


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


def writers_status(folder: RunFolder, live: bool, now: float | None = None) -> list[dict[str, Any]]:
    """Each writer of the latest session (host, device, windows, rows, rows/s, last heartbeat), from its journal and
    heartbeat file; oldest first. `live`: the run is running, so a writer with a recent heartbeat is `scoring`."""
    from annotator.writer import HEARTBEAT_S

    now = time.time() if now is None else now
    found: dict[str, dict[str, Any]] = {}
    for path in folder.journal_dir.glob("*.heartbeat.json"):
        found[path.name.removesuffix(".heartbeat.json")] = {"beat": _heartbeat(path), "records": []}
    for path in folder.journal_dir.glob("*.jsonl"):
        entry = found.setdefault(path.stem, {"beat": {}, "records": []})
        with contextlib.suppress(OSError):
            entry["records"] = read_journal(path)
    sessions = [_session_of(entry) for entry in found.values()]
    latest = max(sessions, default=0)
    writers = []
    for (name, entry), session in zip(found.items(), sessions, strict=True):
        if session != latest:
            continue
        beat, records = entry["beat"], entry["records"]
        rows = sum(r.get("rows", 0) for r in records)
        start = max(filter(None, [beat.get("loaded_at"), session]), default=None)
        last_beat = beat.get("beat")
        fresh = live and last_beat is not None and now - last_beat < 3 * HEARTBEAT_S
        end = now if fresh else max((r["committed_at"] for r in records), default=None)
        state = beat.get("state", "-")
        writers.append(
            {
                "writer": name,
                "host": beat.get("host") or name.rsplit("-", 2)[0],
                "device": beat.get("device") or (str(records[-1].get("device") or "") if records else "") or "-",
                "windows": len(records),
                "rows": rows,
                "rows_per_s": round(rows / (end - start), 3) if start and end and end > start and rows else None,
                "heartbeat_s_ago": round(now - last_beat, 1) if last_beat else None,
                "state": state if fresh or state not in ("scoring", "ready") else "gone",
                "started": beat.get("started") or start or 0,
            }
        )
    return sorted(writers, key=lambda w: w["started"])


# The fields of a heartbeat file `status` reads, by type: anything else (a damaged file) is left out.
HEARTBEAT_TEXT = ("host", "device", "state")
HEARTBEAT_TIMES = ("beat", "started", "loaded_at", "session_started")


def _time(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _heartbeat(path: Path) -> dict[str, Any]:
    """A writer's heartbeat file, its fields of the right types only; {} when it cannot be read."""
    try:
        beat = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(beat, dict):
        return {}
    kept = {key: beat[key] for key in HEARTBEAT_TEXT if isinstance(beat.get(key), str)}
    kept.update({key: _time(beat.get(key)) for key in HEARTBEAT_TIMES if _time(beat.get(key)) is not None})
    return kept


def _session_of(entry: dict[str, Any]) -> float:
    """The session a writer worked for: its heartbeat says, else its journal records do."""
    recorded = (_time(r.get("session_started")) or 0 for r in entry["records"])
    return entry["beat"].get("session_started") or max(recorded, default=0)


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
        "writers": writers_status(folder, live=state == "running"),
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
