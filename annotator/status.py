"""`annotate status`: progress, ETA, counts, label split, prob histogram, errors and lock of a run (journals only)."""

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
    }
