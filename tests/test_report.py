"""`annotate report`: the page renders in headless Chromium with every image and no console error, its numbers
are the run's summary, its grids are exactly the right rows, and it reads images only of the rows it shows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from annotator.cli import app
from annotator.fake_run import write_fake_run
from annotator.report import gather, spread_hash
from annotator.sink import RunFolder
from tests.chromium import Chromium, binaries
from tests.conftest import CAPTIONS, MIXED_SIZES, jpeg_bytes, read_output, run_once, write_dataset, write_recipe

runner = CliRunner()
HOSTILE = '<img src=x onerror="console.error(1)"></div><script>console.error("injected")</script>'


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run_with_errors(tmp_path_factory, tiny_model_cache) -> Path:
    """20 rows of the tiny model: 16 photos, a caption that is HTML, and 3 rows that fail in different ways."""
    root = tmp_path_factory.mktemp("report-run")
    images = [jpeg_bytes(w, h, seed=i) for i, (w, h) in enumerate(MIXED_SIZES * 2)]
    images += [b"not an image", None, jpeg_bytes(64, 64, seed=99)[:300], jpeg_bytes(80, 60, seed=98)]
    captions = CAPTIONS + CAPTIONS[::-1] + ["broken", "missing", "truncated", HOSTILE]
    parquet = write_dataset(root / "in.parquet", images, captions)
    return run_once(root, write_recipe(root / "r.yaml", parquet, root / "run"), tiny_model_cache) / "run"


@pytest.mark.skipif(binaries() is None, reason="needs Debian's chromium and chromium-driver")
def test_report_renders_in_chromium_with_the_summary_numbers(run_with_errors, tmp_path):
    summary = json.loads((run_with_errors / "summary.json").read_text())
    assert summary["errors"] == 3 and len(summary["error_kinds"]) == 3
    result = invoke("report", run_with_errors, "--out", tmp_path / "report.html")
    assert result.exit_code == 0, result.output
    with Chromium(tmp_path / "profile") as browser:
        browser.open((tmp_path / "report.html").resolve().as_uri())
        shown = browser.run(
            "return Object.fromEntries([...document.querySelectorAll('[data-stat]')]"
            ".map(e => [e.dataset.stat, e.dataset.value || e.textContent]))"
        )
        kinds = browser.run(
            "return Object.fromEntries([...document.querySelectorAll('[data-error-kind]')]"
            ".map(e => [e.dataset.errorKind, Number(e.dataset.value)]))"
        )
        browser.screenshot(tmp_path / "report.png")  # the page as it opens
        images = browser.run("return [...document.images].map(i => [i.complete, i.naturalWidth, i.alt])")
        scripts = browser.run("return document.scripts.length")
        hostile_shown = browser.run(f"return document.body.innerText.includes({json.dumps(HOSTILE)})")
        readout = browser.run(
            "const s = document.getElementById('cut'); s.value = 0; s.dispatchEvent(new Event('input'));"
            "return document.getElementById('cut-readout').textContent"
        )
        log = browser.console()
    assert [entry for entry in log if entry["level"] in ("SEVERE", "WARNING")] == [], log
    assert {key: int(shown[key]) for key in ("rows", "scored", "errors", "positives")} == {
        key: summary[key] for key in ("rows", "scored", "errors", "positives")
    }
    assert float(shown["kept_share"]) == round(summary["positives"] / summary["rows"], 4)
    assert float(shown["rows_per_s"]) == summary["rows_per_s"] and shown["state"] == "finished"
    assert kinds == summary["error_kinds"]
    assert len(images) >= 5 * 4 and all(complete and width > 0 for complete, width, _ in images), images
    assert scripts == 2 and hostile_shown, "a caption is shown as text, never run"
    share = summary["scored"] / summary["rows"]  # threshold 0 keeps every scored row
    assert f"{100 * share:.1f}% of all rows ({summary['scored']} of {summary['rows']})" in readout
    assert (tmp_path / "report.png").stat().st_size > 50_000


def test_grids_are_exactly_the_right_rows_with_ties_to_the_lower_row_id(tmp_path):
    rng = np.random.default_rng(3)
    probs: list[float | None] = [float(v) for v in rng.choice([0.0, 0.25, 0.5, 0.5001, 0.75, 1.0], 300)]
    for i in rng.choice(300, 30, replace=False):
        probs[i] = None
    folder = write_fake_run(tmp_path / "run", window=32, probs=probs, threshold=0.6)
    facts, _ = gather(folder, k=7)
    table = read_output(folder.root).to_pylist()
    scored = [r for r in table if r["prob"] is not None]

    def best(rows, key):
        return [r["row_id"] for r in sorted(rows, key=lambda r: (key(r), r["row_id"]))[:7]]

    expected = {
        "positives": best([r for r in scored if r["label"]], lambda r: -r["prob"]),
        "negatives": best([r for r in scored if not r["label"]], lambda r: r["prob"]),
        "threshold": best(scored, lambda r: abs(r["prob"] - 0.6)),
        "random": best(table, lambda r: int(spread_hash(np.array([r["row_id"]]))[0])),
    }
    for name, ids in expected.items():
        assert [p.row_id for p in facts.grids[name]] == ids, name
    first_of_kind = {}
    for r in table:
        if r["error"] is not None:
            first_of_kind.setdefault(r["error_kind"], r["row_id"])
    assert [p.row_id for p in facts.grids["errors"]][: len(first_of_kind)] == sorted(first_of_kind.values())
    assert (facts.rows, facts.scored, facts.errors) == (300, 270, 30)
    assert sum(facts.prob_histogram) == 270 and sum(facts.error_kinds.values()) == 30
    for pick in facts.grids["threshold"]:
        assert pick.thumbnail.startswith("data:image/jpeg;base64,") and pick.text


def test_report_reads_images_only_of_the_files_it_shows(tmp_path, monkeypatch):
    folder = write_fake_run(tmp_path / "run", rows=2000, window=50)
    reads: list[tuple[str, tuple[str, ...]]] = []
    original = pq.ParquetFile.iter_batches

    def recording(self, *args, columns=None, **kwargs):
        reads.append((Path(self._path).name, tuple(columns or ())))
        return original(self, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "__init__", _remember_path(pq.ParquetFile.__init__))
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    facts, _ = gather(folder, k=2)
    with_images = {name for name, columns in reads if "image" in columns}
    shown = {f"part-{(p.row_id // 50):06d}.parquet" for grid in facts.grids.values() for p in grid}
    shown |= {f"part-{(p.row_id // 50):06d}.parquet" for p in facts.error_samples.values()}
    assert with_images == shown and len(with_images) < 20, "pass 2 opens only files holding a shown row"
    assert all("caption" not in columns for name, columns in reads if "image" not in columns), "pass 1: scores only"
    assert len([1 for _, columns in reads if "image" not in columns]) == 40, "pass 1 reads every file once"


def _remember_path(init):
    def remembering(self, source, *args, **kwargs):
        self._path = str(source)
        return init(self, source, *args, **kwargs)

    return remembering


def test_report_of_an_unfinished_run_and_refusals(run_with_errors, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(run_with_errors, partial)
    (partial / "summary.json").unlink()
    journal = partial / "journal" / "main.jsonl"
    journal.write_text(journal.read_text().splitlines(keepends=True)[0])
    assert invoke("report", partial).exit_code == 0
    page = (partial / "report.html").read_text()
    assert 'data-stat="state">unfinished' in page and 'data-stat="rows" data-value="8"' in page
    assert list(RunFolder(partial).committed()) == [0]
    result = invoke("report", tmp_path)
    assert result.exit_code == 1 and "is not a run folder" in result.output
