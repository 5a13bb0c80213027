"""`annotate status`: progress, counts, label split, errors and lock of a run folder, from its journals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from annotator.errors import AnnotatorError
from annotator.run import summarize
from annotator.sink import RunFolder, latest_run


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
    rows_per_s = None
    if folder.finished:
        rows_per_s = json.loads(folder.summary_path.read_text()).get("pairs_per_s")
    elif len(records) >= 2 and records[-1]["committed_at"] > records[0]["committed_at"]:
        rows = sum(r["rows"] for r in records[1:])
        rows_per_s = round(rows / (records[-1]["committed_at"] - records[0]["committed_at"]), 2)
    holder = folder.lock_holder()
    total = manifest.get("total_rows")
    if folder.finished:
        state, next_step = "finished", None
    elif holder is not None:
        state, next_step = "running", None
    else:
        state, next_step = "interrupted", f"annotate resume {root}"
    window = manifest["window"]
    return {
        "output_dir": str(root),
        "state": state,
        "rows": f"{summary['rows']} / {total}" if total is not None else str(summary["rows"]),
        "rows_done": summary["rows"],
        "total_rows": total,
        "windows": f"{summary['windows']} / {-(-total // window)}" if total else str(summary["windows"]),
        "scored": summary["scored"],
        "errors": summary["errors"],
        "error_kinds": summary["error_kinds"],
        "positives": summary["positives"],
        "negatives": None if summary["positives"] is None else summary["scored"] - summary["positives"],
        **{k: summary[k] for k in ("answers", "questions") if k in summary},
        "rows_per_s": rows_per_s,
        "lock": f"held by pid {holder['pid']} on {holder['host']}" if holder else "free",
        "next": next_step,
    }
