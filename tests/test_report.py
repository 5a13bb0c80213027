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
from tests.conftest import (
    CAPTIONS,
    MIXED_SIZES,
    journals,
    jpeg_bytes,
    read_output,
    run_once,
    write_dataset,
    write_recipe,
)

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
    (journal,) = journals(partial)
    journal.write_text(journal.read_text().splitlines(keepends=True)[0])
    assert invoke("report", partial).exit_code == 0
    page = (partial / "report.html").read_text()
    assert 'data-stat="state">unfinished' in page and 'data-stat="rows" data-value="8"' in page
    assert list(RunFolder(partial).committed()) == [0]
    result = invoke("report", tmp_path)
    assert result.exit_code == 1 and "is not a run folder" in result.output


def test_report_replaces_only_a_report_it_wrote(run_with_errors, tmp_path):
    """--out never overwrites a user's file (or opens a FIFO); a report it wrote is replaced, with no temp left."""
    import os

    mine = tmp_path / "notes.html"
    mine.write_text("<p>years of work</p>")
    result = invoke("report", run_with_errors, "--out", mine)
    assert result.exit_code == 1 and "is not a report that `annotate report` wrote" in " ".join(result.output.split())
    assert mine.read_text() == "<p>years of work</p>"
    fifo = tmp_path / "pipe.html"
    os.mkfifo(fifo)
    assert invoke("report", run_with_errors, "--out", fifo).exit_code == 1, "refused from stat, never opened"
    out = tmp_path / "report.html"
    assert invoke("report", run_with_errors, "--out", out).exit_code == 0
    first = out.stat().st_mtime_ns
    assert invoke("report", run_with_errors, "--out", out).exit_code == 0, "its own report is replaced"
    assert out.stat().st_mtime_ns >= first and "annotator report" in out.read_text()[:400]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.html", "pipe.html", "report.html"], "no temp left"
    # Never into a run folder's data or journal (a stray file there makes the run damaged), this run's or another's.
    before = sorted(p.name for p in run_with_errors.rglob("*"))
    for inside in ("data/new.html", "journal/x.html", "notes.html"):
        result = invoke("report", run_with_errors, "--out", run_with_errors / inside)
        assert result.exit_code == 1 and "is inside the run folder" in " ".join(result.output.split()), inside
    assert sorted(p.name for p in run_with_errors.rglob("*")) == before
    assert invoke("report", run_with_errors).exit_code == 0, "its own report.html, the default"


BARS = "return [...document.querySelectorAll(arguments[0] + ' .linear .bar')].map(b => Number(b.dataset.count))"


def _page_numbers(browser: Chromium, questions) -> dict[str, object]:
    """What the page draws for each question: bar counts of its histograms, its answer bars, its sections."""
    shown: dict[str, object] = {}
    for q in questions:
        suffix = f"-{q.name}" if q.name else ""
        shown[q.column("answer_mass")] = browser.run(BARS, f"#mass-histogram{suffix}")
        if q.yes_no:
            shown[q.column("prob")] = browser.run(BARS, f"#prob-histogram{suffix}")
    shown["answers"] = browser.run(
        "return Object.fromEntries([...document.querySelectorAll('[data-answer]')]"
        ".map(e => [e.dataset.answer, Number(e.dataset.value)]))"
    )
    shown["sections"] = browser.run("return [...document.querySelectorAll('section[id]')].map(s => s.id)")
    return shown


def _move_slider(browser: Chromium, suffix: str, k: int) -> tuple[int, str]:
    """Set a question's threshold slider to k/100 as a user would; the rows it says it keeps and its command."""
    return browser.run(
        "const s = document.getElementById('cut' + arguments[0]); s.value = arguments[1];"
        "s.dispatchEvent(new Event('input'));"
        "return [Number(document.getElementById('cut-readout' + arguments[0]).dataset.kept),"
        " document.getElementById('cut-command' + arguments[0]).textContent]",
        suffix,
        k,
    )


def _exported_ids(command: str) -> list[int]:
    """Run an `annotate export ...` command the page proposes, as written; the row ids it exported."""
    import shlex

    words = shlex.split(command)
    assert words[:2] == ["annotate", "export"], command
    result = invoke(*words[1:])
    assert result.exit_code == 0, result.output
    target = Path(words[words.index("--to") + 1])
    return pq.read_table(target / "data", columns=["row_id"]).column("row_id").to_pylist()


def _splitting_cut(probs: list[float | None]) -> int:
    """A slider position k (threshold k/100) that keeps some scored rows and drops others, with a row in bin k
    itself (at k/100 or just above), so a slider that counts from the wrong bin is off."""
    scored = [p for p in probs if p is not None]
    kept = {int(p * 100): sum(q >= int(p * 100) / 100 for q in scored) for p in scored if 0.01 <= p < 1}
    return min(kept, key=lambda k: abs(kept[k] - len(scored) / 2))


@pytest.mark.skipif(binaries() is None, reason="needs Debian's chromium and chromium-driver")
def test_report_of_several_questions_speaks_per_question(questions_run, tmp_path):
    from annotator.recipe import load_recipe
    from annotator.scores import histogram

    questions = load_recipe(questions_run / "recipe.yaml").questions
    table = read_output(questions_run)
    scored = [r for r in table.to_pylist() if r["error"] is None]
    result = invoke("report", questions_run, "--out", tmp_path / "report.html")
    assert result.exit_code == 0, result.output
    moved: dict[str, tuple[int, int, str]] = {}
    with Chromium(tmp_path / "profile") as browser:
        browser.open((tmp_path / "report.html").resolve().as_uri())
        shown = _page_numbers(browser, questions)
        at_threshold = {q.name: _move_slider(browser, f"-{q.name}", round(q.threshold * 100)) for q in questions[::2]}
        for q in questions:
            if q.yes_no:
                k = _splitting_cut(table.column(q.column("prob")).to_pylist())
                moved[q.name] = (k, *_move_slider(browser, f"-{q.name}", k))
        browser.screenshot(tmp_path / "report.png")
        images = browser.run("return [...document.images].map(i => i.complete && i.naturalWidth > 0)")
        warning = browser.run("return document.querySelectorAll('.warning').length")
        log = browser.console()
    assert [entry for entry in log if entry["level"] in ("SEVERE", "WARNING")] == [], log
    assert [q.name for q in questions] == ["cat", "kind", "text"] and questions[0].threshold == 0.6
    sections = shown["sections"]
    for q in questions:
        grids = [f"grid-{b}_{q.name}" for b in ("positives", "threshold", "negatives")] if q.yes_no else [
            f"grid-answer{i}_{q.name}" for i in range(len(q.answers))
        ]  # fmt: skip
        assert f"question-{q.name}" in sections and set(grids) <= set(sections), (q.name, sections)
        assert shown[q.column("answer_mass")] == histogram(table.column(q.column("answer_mass")), 100)
        if q.yes_no:
            assert shown[q.column("prob")] == histogram(table.column(q.column("prob")), 100)
        else:
            counts = {f"{q.name}:{a}": sum(r[q.column("answer")] == a for r in scored) for a in q.answers}
            assert shown["answers"] == counts and sum(counts.values()) == len(scored)
    for shared in ("questions", "grid-random", "grid-errors", "errors", "model", "recipe"):
        assert sections.count(shared) == 1, shared
    assert "cut-section" not in sections and warning == 0
    assert all(images) and len(images) >= 8, "thumbnails of every question's grids"
    # Each slider starts at its own threshold, where it keeps exactly the rows the run labelled.
    for name, (kept, command) in at_threshold.items():
        positives = [r["row_id"] for r in scored if r[f"label_{name}"]]
        assert kept == len(positives) and command.endswith(
            f'--where "prob_{name} >= {0.6 if name == "cat" else 0.5:.2f}"'
        )
    # The command a moved slider proposes, run as written, exports exactly the rows the page says it keeps.
    for name, (k, kept, command) in moved.items():
        expected = [r["row_id"] for r in scored if r[f"prob_{name}"] >= k / 100]
        assert 0 < len(expected) < len(scored), "the cut must split the rows, or the test proves nothing"
        assert f'--where "prob_{name} >= {k / 100:.2f}"' in command and kept == len(expected)
        assert _exported_ids(command) == expected


@pytest.mark.skipif(binaries() is None, reason="needs Debian's chromium and chromium-driver")
def test_report_of_one_question_with_answers_speaks_per_answer(tmp_path):
    from collections import Counter

    from annotator.recipe import load_recipe
    from annotator.scores import histogram

    prompt = {"question": "Which of A, B, C or D is {text}?", "answers": ["A", "B", "C", "D"]}
    folder = write_fake_run(tmp_path / "run", rows=400, window=64, prompt=prompt, seed=5)
    (question,) = load_recipe(folder.recipe_path).questions
    table = read_output(folder.root)
    counts = Counter(a for a in table.column("answer").to_pylist() if a is not None)
    assert invoke("report", folder.root, "--out", tmp_path / "report.html", "--thumbnails", "4").exit_code == 0
    with Chromium(tmp_path / "profile") as browser:
        browser.open((tmp_path / "report.html").resolve().as_uri())
        shown = _page_numbers(browser, [question])
        command = browser.run("return document.querySelector('#question-answers code.command').textContent")
        top = browser.run("return document.querySelector('[data-stat=top_answer]').dataset.value")
        images = browser.run("return [...document.images].map(i => i.complete && i.naturalWidth > 0)")
        warning = browser.run("return document.querySelectorAll('.warning').length")
        log = browser.console()
    assert [entry for entry in log if entry["level"] in ("SEVERE", "WARNING")] == [], log
    assert shown["answers"] == {f":{a}": counts[a] for a in "ABCD"} and len(counts) == 4
    assert shown["answer_mass"] == histogram(table.column("answer_mass"), 100)
    sections = shown["sections"]
    assert {"question-answers", *(f"grid-answer{i}" for i in range(4)), "grid-random", "grid-errors"} <= set(sections)
    assert "questions" not in sections and "cut-section" not in sections and warning == 0
    errors = len(table) - table.column("error").null_count
    assert all(images) and len(images) == 4 * 5 + min(errors, 4), "four thumbnails per answer, random sample, errors"
    most = counts.most_common(1)[0][0]
    assert top == most and f"""--where "answer == '{most}'\"""" in command
    rows = table.to_pylist()
    assert _exported_ids(command) == [r["row_id"] for r in rows if r["error"] is None and r["answer"] == most]


def test_grids_of_several_questions_are_exactly_each_questions_rows(tmp_path):
    from collections import Counter

    rng = np.random.default_rng(4)
    firsts: list[float | None] = [float(v) for v in rng.choice([0.2, 0.4, 0.4, 0.5, 0.7, 0.7, 1.0], 200)]
    for i in rng.choice(200, 20, replace=False):
        firsts[i] = None
    prompt = {"questions": {"kind": {"question": "Which?", "answers": ["A", "B", "C"]}, "cat": "A cat?", "dog": "Dog?"}}
    folder = write_fake_run(tmp_path / "run", window=32, probs=firsts, prompt=prompt, thresholds={"cat": 0.3})
    facts, _ = gather(folder, k=6)
    rows = read_output(folder.root).to_pylist()
    scored = [r for r in rows if r["error"] is None]

    def best(rows, key):
        return [r["row_id"] for r in sorted(rows, key=lambda r: (key(r), r["row_id"]))[:6]]

    assert [qf.question.name for qf in facts.questions] == ["kind", "cat", "dog"]
    kind, cat, dog = facts.questions
    for qf, threshold in ((cat, 0.3), (dog, 0.5)):
        name = qf.question.name
        assert qf.question.threshold == threshold and qf.positives == sum(r[f"label_{name}"] for r in scored)
        expected = {
            "positives": best([r for r in scored if r[f"label_{name}"]], lambda r, c=f"prob_{name}": -r[c]),
            "negatives": best([r for r in scored if not r[f"label_{name}"]], lambda r, c=f"prob_{name}": r[c]),
            "threshold": best(scored, lambda r, c=f"prob_{name}", t=threshold: abs(r[c] - t)),
        }
        for base, ids in expected.items():
            assert [p.row_id for p in facts.grids[f"{base}_{name}"]] == ids, (name, base)
    assert kind.answers == {a: Counter(r["answer_kind"] for r in scored)[a] for a in "ABC"}
    for i, answer in enumerate("ABC"):
        chose = [r for r in scored if r["answer_kind"] == answer]
        ids = best(chose, lambda r, i=i: -r["probs_kind"][i])
        assert [p.row_id for p in facts.grids[f"answer{i}_kind"]] == ids and ids, answer
    assert sum(r["probs_kind"][0] == 1.0 for r in scored) > 6, "ties in answer A's grid: the lower row_id wins"
    for pick in facts.grids["answer0_kind"]:
        assert pick.scores["answer_kind"] == "A" and pick.thumbnail.startswith("data:image/jpeg;base64,")
    assert (facts.rows, facts.scored, facts.errors) == (200, 180, 20)
    assert set(facts.grids) == {f"{b}_{n}" for b in ("positives", "threshold", "negatives") for n in ("cat", "dog")} | {
        "answer0_kind", "answer1_kind", "answer2_kind", "random", "errors"
    }  # fmt: skip
