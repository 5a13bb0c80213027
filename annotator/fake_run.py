"""A synthetic finished run folder (scores drawn at random, small images, some errors), written without a
model: what `annotate bench-report` times report, status and export on, and what tests build exact cases on."""

from __future__ import annotations

import io
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from annotator.images import image_kind
from annotator.recipe import validate_recipe
from annotator.scores import JOURNAL_BINS, histogram
from annotator.sink import RunFolder, answer_counts, output_schema, window_table

ERRORS = ["decode: truncated image (image file is truncated)", "image: missing (null)", "text: empty"]
WORDS = ["a", "the", "cat", "dog", "photo", "of", "on", "in", "with", "red", "blue", "small", "large", "street"]


def _images(count: int, rng: np.random.Generator) -> list[bytes]:
    from PIL import Image

    images = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small, "RGB").resize((96, 64), Image.Resampling.BILINEAR).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    return images


def write_fake_run(
    root: Path,
    rows: int = 1000,
    window: int = 4096,
    probs: Sequence[float | None] | None = None,
    seed: int = 0,
    threshold: float = 0.5,
    error_share: float = 0.01,
    prompt: dict[str, Any] | None = None,
    thresholds: dict[str, float] | None = None,
) -> RunFolder:
    """A finished run of `rows` rows (or one row per entry of `probs`, None meaning an error row). `prompt` (e.g.
    `{"questions": {...}}`) asks other questions than the one Y/N question; `probs` are then its first question's
    P(first answer), the other answers and questions drawn at random."""
    rng = np.random.default_rng(seed)
    if probs is not None:
        rows = len(probs)
    recipe = validate_recipe(
        {
            "name": root.name,
            "input": {"parquet": str(root / "input-not-kept.parquet")},
            "model": {"name": "tiny"},
            "batching": {"window": window},
            "output": {"dir": str(root), "threshold": threshold, "thresholds": thresholds or {}},
            **({"prompt": prompt} if prompt else {}),
        }
    )
    questions = recipe.questions
    folder = RunFolder(root)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    source_schema = pa.schema([("image", image_type), ("caption", pa.string())])
    schema = output_schema(source_schema, "image", questions)
    card = {"license": None, "dataset": None, "split": "train"}
    manifest = {"window": window, "total_rows": rows, "limit": None, "result_fingerprint": "synthetic",
                "input_fingerprint": [], "input_card": card}  # fmt: skip
    folder.create(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), manifest)
    pool = _images(64, rng)
    started = time.time()
    for index, start in enumerate(range(0, rows, window)):
        n = min(window, rows - start)
        if probs is None:
            p = rng.beta(0.6, 0.6, n).astype(np.float32)
            failed = rng.random(n) < error_share
            chunk: list[float | None] = [None if f else float(v) for v, f in zip(p, failed, strict=True)]
        else:
            chunk = list(probs[start : start + n])
        errors = [None if v is not None else ERRORS[(start + i) % len(ERRORS)] for i, v in enumerate(chunk)]
        masses = [None if v is None else float(m) for v, m in zip(chunk, rng.uniform(0.5, 1.0, n), strict=True)]
        picks = rng.integers(0, len(pool), n)
        table = pa.table(
            {
                "image": pa.array([{"bytes": pool[i], "path": None} for i in picks], image_type),
                "caption": [" ".join(rng.choice(WORDS, 6)) for _ in range(n)],
            }
        )
        scores = _scores(chunk, masses, questions, rng)
        out = window_table(table, schema, start, scores, errors, questions)
        scored = sum(v is not None for v in chunk)
        record = {
            "start": start, "rows": n, "scored": scored, "errors": n - scored,
            "error_kinds": dict(Counter(image_kind(e) for e in errors if e)), "truncated_texts": 0,
            "real_tokens": 400 * n, "padded_tokens": 410 * n, "seconds": 1.0, "committed_at": started + index + 1,
            **answer_counts(out, questions),
            "histograms": {
                q.column("prob"): histogram(out.column(q.column("prob")), JOURNAL_BINS) for q in questions if q.yes_no
            },
            "limit": None, "session_started": started,
        }  # fmt: skip
        folder.write_window(index, out, record)
    from annotator.run import summarize

    summary = summarize(folder)
    seconds = -(-rows // window)  # one second per window, as the journal says
    summary.update({"finished": True, "output_dir": str(root), "model": "tiny", "device": "cpu", "session_rows": rows})
    summary.update({"session_seconds": seconds, "rows_per_s": round(rows / seconds, 3)})
    folder.write_summary(summary)
    return folder


def _scores(
    chunk: list[float | None], masses: list[float | None], questions: list, rng: np.random.Generator
) -> list[SimpleNamespace | None]:
    """What `scoring.Score` holds (not imported: it would import torch): the first question's P(first answer) is
    the row's value in `chunk`, every other question's answers are drawn at random."""
    n = len(chunk)
    per_question = []
    for q, question in enumerate(questions):
        first = np.array([0.0 if v is None else v for v in chunk]) if q == 0 else rng.beta(0.6, 0.6, n)
        first = first.astype(np.float32).astype(np.float64)
        others = len(question.answers) - 1
        rest = (1 - first)[:, None] * (rng.dirichlet(np.ones(others), n) if others > 1 else np.ones((n, 1)))
        per_question.append(np.column_stack([first, rest]).tolist())
    return [
        None
        if value is None
        else SimpleNamespace(probs=tuple(tuple(p[i]) for p in per_question), masses=(mass,) * len(questions))
        for i, (value, mass) in enumerate(zip(chunk, masses, strict=True))
    ]


def bench_reading(rows: int, console: Any, questions: int = 1) -> dict[str, Any]:
    """Seconds (and seconds per million rows) for status, report and export on `rows` rows asked `questions`
    questions: `export --top-fraction 0.3` of the one Y/N question, else `export --where` over two questions."""
    from annotator.export import export_run
    from annotator.report import write_report
    from annotator.status import run_status

    prompt = None
    if questions > 1:
        asked: dict[str, Any] = {f"q{i}": f"Question {i}?" for i in range(1, questions)}
        prompt = {"questions": {**asked, "kind": {"question": "Which kind?", "answers": ["A", "B", "C"]}}}
    with tempfile.TemporaryDirectory(prefix="annotate-bench-report-") as tmp:
        console.print(f"bench-report: writing a synthetic run of {rows:,} rows, {questions} question(s)...")
        folder = write_fake_run(Path(tmp) / "run", rows=rows, prompt=prompt)
        size = sum(f.stat().st_size for f in folder.data_files())
        timings = {}
        kept = Path(tmp) / "kept"
        export = (
            ("export_top_fraction", lambda: export_run(folder.root, kept, None, None, None, "", 10**4, 0.3))
            if prompt is None
            else (
                "export_where",
                lambda: export_run(
                    folder.root, kept, None, None, None, "", 10**4, None, "prob_q1 >= 0.7 and answer_kind == 'A'"
                ),
            )
        )
        steps = {
            "status": lambda: run_status(folder.root),
            "report": lambda: write_report(folder.root, Path(tmp) / "report.html"),
            export[0]: export[1],
        }
        for name, step in steps.items():
            console.print(f"bench-report: {name}...")
            started = time.perf_counter()
            step()
            timings[name] = time.perf_counter() - started
        page = (Path(tmp) / "report.html").stat().st_size
    result: dict[str, Any] = {"rows": rows, "questions": questions, "data_mb": round(size / 2**20, 1),
                              "report_kb": round(page / 2**10, 1)}  # fmt: skip
    for name, seconds in timings.items():
        result[f"{name}_s"] = round(seconds, 2)
        result[f"{name}_s_per_million_rows"] = round(seconds / rows * 1e6, 2)
    return result
