"""`annotate status`: progress, ETA, counts, label split, prob histogram, errors, lock and writers of a run (journals
and heartbeats only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from annotator.errors import AnnotatorError
from annotator.progress import format_duration
from annotator.run import summarize
from annotator.scores import kept_shares
from annotator.sink import RunFolder, latest_run


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
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found[path.name.removesuffix(".heartbeat.json")] = {"beat": beat, "records": []}
    for path in folder.journal_dir.glob("*.jsonl"):
        entry = found.setdefault(path.stem, {"beat": {}, "records": []})
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry["records"].append(json.loads(line))
            except ValueError:
                continue
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
                "device": beat.get("device") or (records[-1].get("device") if records else None) or "-",
                "windows": len(records),
                "rows": rows,
                "rows_per_s": round(rows / (end - start), 3) if start and end and end > start and rows else None,
                "heartbeat_s_ago": round(now - last_beat, 1) if last_beat else None,
                "state": state if fresh or state not in ("scoring", "ready") else "gone",
                "started": beat.get("started") or start or 0,
            }
        )
    return sorted(writers, key=lambda w: w["started"])


def _session_of(entry: dict[str, Any]) -> float:
    """The session a writer worked for: its heartbeat says, else its journal records do."""
    records = entry["records"]
    return entry["beat"].get("session_started") or max((r.get("session_started") or 0 for r in records), default=0)


def run_status(output_dir: Path | None) -> dict[str, Any]:
    folder = RunFolder(output_dir) if output_dir else latest_run(Path("outputs"))
    if folder is None:
        raise AnnotatorError("No run under 'outputs'. Pass the run folder: `annotate status OUTPUT_DIR`.")
    root = folder.root
    if not folder.exists():
        raise AnnotatorError(f"{str(root)!r} is not a run folder (no manifest.json).")
    manifest = folder.manifest()
    summary = summarize(folder)
    records = sorted(folder.committed().values(), key=lambda r: r["committed_at"])
    holder = folder.lock_holder()
    total = manifest.get("total_rows")
    eta_s = None
    if folder.finished:
        state, next_step = "finished", None
        finished = json.loads(folder.summary_path.read_text())
        rows_per_s = finished.get("rows_per_s", finished.get("pairs_per_s"))
    else:
        running = holder is not None
        state, next_step = ("running", None) if running else ("interrupted", f"annotate resume {root}")
        since = (holder.get("since") or 0.0) if running else None
        rows_per_s, live = session_rate(records, since)
        if live and rows_per_s and total is not None:
            eta_s = round(max(0, total - summary["rows"]) / rows_per_s, 1)
    window = manifest["window"]
    threshold = yaml.safe_load(folder.recipe_path.read_text(encoding="utf-8"))["output"]["threshold"]
    rows = summary["rows"]
    return {
        "output_dir": str(root),
        "state": state,
        "rows": f"{rows} / {total}" if total is not None else str(rows),
        "rows_done": rows,
        "total_rows": total,
        "windows": f"{summary['windows']} / {-(-total // window)}" if total else str(summary["windows"]),
        "scored": summary["scored"],
        "errors": summary["errors"],
        "error_kinds": summary["error_kinds"],
        "positives": summary["positives"],
        "negatives": summary["scored"] - summary["positives"],
        "threshold": threshold,
        "kept_share": round(summary["positives"] / rows, 4) if rows else None,
        "kept_share_at": kept_shares(summary["prob_histogram"], rows),
        "prob_histogram": summary["prob_histogram"],
        "rows_per_s": rows_per_s,
        "eta_s": eta_s,
        "eta": format_duration(eta_s) if eta_s is not None else None,
        "lock": f"held by pid {holder['pid']} on {holder['host']}" if holder else "free",
        "next": next_step,
        "writers": writers_status(folder, live=state == "running"),
    }
