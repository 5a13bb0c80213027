"""The report page: HTML, CSS, inline SVG charts and a little inline JS, in one file that needs no network."""

from __future__ import annotations

import html
import json
import math
import shlex
import time
from typing import Any

from annotator import __version__
from annotator.progress import format_duration
from annotator.questions import Question
from annotator.report import GRIDS, HISTOGRAM_BINS, SHARED_GRIDS, Pick, QuestionFacts, RunFacts
from annotator.sink import RunFolder

# Marks a page as `annotate report`'s: only such a file is ever replaced by another report.
REPORT_MARKER = '<meta name="generator" content="annotator report">'

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
STYLE = """
:root { color-scheme: light; --ink: #0f172a; --muted: #64748b; --line: #e2e8f0; --kept: #0f766e;
  --dropped: #cbd5e1; --error: #dc2626; --accent: #4f46e5; }
* { box-sizing: border-box; }
body { margin: 0; background: #f8fafc; color: var(--ink);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 48px; }
h1 { font-size: 26px; margin: 0; letter-spacing: -0.01em; }
h2 { font-size: 17px; margin: 0 0 4px; }
.lead { color: var(--muted); margin: 0 0 14px; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 12px; }
.badge { font-size: 12px; font-weight: 600; padding: 2px 10px; border-radius: 999px; background: #dcfce7;
  color: #166534; }
.badge.unfinished { background: #fef3c7; color: #92400e; }
.subtitle { color: var(--muted); margin: 6px 0 22px; }
.subtitle code { background: #eef2ff; padding: 1px 6px; border-radius: 4px; }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; margin-bottom: 22px; }
.stat, section { background: #fff; border: 1px solid var(--line); border-radius: 12px; }
.stat { padding: 12px 16px; }
.stat .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
.stat .value { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; }
.stat .note { color: var(--muted); font-size: 12px; }
.stat.kept .value { color: var(--kept); } .stat.errors .value { color: var(--error); }
section { padding: 18px 20px; margin-bottom: 18px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 18px; }
svg { width: 100%; height: auto; display: block; }
svg text { fill: var(--muted); font-size: 11px; }
.axis { stroke: #94a3b8; } .grid { stroke: var(--line); }
.bar.kept { fill: var(--kept); } .bar.dropped { fill: var(--dropped); } .bar.mass { fill: var(--accent); }
.cut { stroke: var(--ink); stroke-dasharray: 4 3; }
.curve { fill: none; stroke: var(--kept); stroke-width: 2; } .dot { fill: var(--kept); }
.rate { fill: none; stroke: var(--accent); stroke-width: 2; }
.log .linear, .linear-scale .log { display: none; }
.controls { display: flex; flex-wrap: wrap; align-items: center; gap: 14px; margin: 10px 0 0; }
.controls input[type=range] { width: 260px; accent-color: var(--kept); }
.readout { font-variant-numeric: tabular-nums; }
.readout b { color: var(--kept); }
code.command { display: block; margin-top: 8px; background: #0f172a; color: #e2e8f0; padding: 8px 12px;
  border-radius: 8px; font-size: 12.5px; white-space: pre-wrap; overflow-wrap: anywhere; }
.grid-cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(168px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 10px; overflow: hidden; background: #fff; }
.frame { height: 150px; display: flex; align-items: center; justify-content: center; background: #f1f5f9; }
.frame img { width: 100%; height: 150px; object-fit: contain; display: block; }
.noimage { color: var(--muted); font-size: 12px; text-align: center; padding: 8px; }
figcaption { padding: 8px 10px 10px; font-size: 12.5px; }
.meta { display: flex; justify-content: space-between; align-items: center; margin-bottom: 4px; }
.prob { font-weight: 650; font-variant-numeric: tabular-nums; padding: 0 6px; border-radius: 4px; color: #fff; }
.prob.pos { background: var(--kept); } .prob.neg { background: #64748b; } .prob.err { background: var(--error); }
.rid { color: var(--muted); font-variant-numeric: tabular-nums; }
.text { display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical; overflow: hidden; }
.error-text { color: var(--error); font-size: 11.5px; margin-top: 4px; word-break: break-word; }
.meter { height: 4px; background: var(--line); border-radius: 2px; margin-bottom: 6px; }
.meter span { display: block; height: 4px; border-radius: 2px; background: var(--kept); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
td.num { font-variant-numeric: tabular-nums; text-align: right; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 6px 18px; margin: 0; }
dt { color: var(--muted); } dd { margin: 0; white-space: pre-wrap; word-break: break-word; }
pre { background: #f1f5f9; padding: 12px; border-radius: 8px; overflow-x: auto; font-size: 12px; }
.warning { background: #fef2f2; border: 1px solid #fecaca; color: #991b1b; padding: 10px 14px; border-radius: 10px;
  margin-bottom: 18px; }
footer { color: var(--muted); font-size: 12px; margin-top: 8px; }
nav.toc { margin: -6px 0 18px; color: var(--muted); font-size: 13px; }
nav.toc a { color: var(--accent); text-decoration: none; } nav.toc a:hover { text-decoration: underline; }
.meta { gap: 2px 6px; flex-wrap: wrap; } .prob, .rid { white-space: nowrap; }
.kind { font-size: 11px; font-weight: 600; padding: 2px 8px; border-radius: 999px; background: #eef2ff;
  color: var(--accent); vertical-align: middle; margin-left: 6px; text-transform: uppercase; letter-spacing: .04em; }
.ask { font-size: 15px; margin: 4px 0 2px; }
.answers { display: grid; grid-template-columns: max-content minmax(120px, 1fr) max-content max-content max-content;
  gap: 8px 14px; align-items: center; margin: 10px 0 4px; }
.answer-row { display: contents; }
.answer-name { font-weight: 600; }
.answer-bar { height: 14px; background: var(--line); border-radius: 4px; overflow: hidden; }
.answer-bar span { display: block; height: 14px; background: var(--accent); }
.answers .num { font-variant-numeric: tabular-nums; text-align: right; }
.answers .share { color: var(--muted); }
.answers code { font-size: 12px; color: var(--muted); }
.chips { display: flex; flex-wrap: wrap; gap: 4px; margin-bottom: 4px; }
.chip { font-size: 11.5px; padding: 0 6px; border-radius: 4px; background: #f1f5f9; white-space: nowrap;
  font-variant-numeric: tabular-nums; }
.chip.pos { background: #ccfbf1; color: #115e59; } .chip.pick { background: #eef2ff; color: #3730a3; }
"""

SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  data.cuts.forEach(function (cut) {
    const byId = function (base) { return document.getElementById(base + cut.suffix); };
    const slider = byId("cut"), readout = byId("cut-readout"), command = byId("cut-command");
    const marker = byId("cut-marker"), curveMarker = byId("curve-marker"), curveDot = byId("curve-dot");
    const bars = document.querySelectorAll("#prob-histogram" + cut.suffix + " .bar");
    const bins = cut.histogram.length;
    function update() {
      const k = Number(slider.value), t = k / 100, shown = t.toFixed(2);
      let kept = 0;
      for (let i = Math.round(t * bins); i < bins; i++) kept += cut.histogram[i];
      if (k === 100) kept = cut.ones;
      const share = data.rows ? kept / data.rows : 0;
      readout.dataset.kept = kept;
      readout.innerHTML = cut.column + " &ge; " + shown + " keeps <b>" + (100 * share).toFixed(1) +
        "%</b> of all rows (" + kept.toLocaleString("en-US") + " of " + data.rows.toLocaleString("en-US") + ")";
      command.textContent = cut.command +
        (cut.where ? ' --where "' + cut.column + " >= " + shown + '"' : " --min-prob " + shown);
      const x = data.x0 + data.width * t, y = data.y0 + data.height * (1 - share);
      [marker, curveMarker].forEach(function (line) { line.setAttribute("x1", x); line.setAttribute("x2", x); });
      curveDot.setAttribute("cx", x);
      curveDot.setAttribute("cy", y);
      bars.forEach(function (bar) {
        const kept = Number(bar.dataset.bin) >= Math.round(t * bins);
        bar.classList.toggle("kept", kept);
        bar.classList.toggle("dropped", !kept);
      });
    }
    slider.addEventListener("input", update);
    update();
  });
  document.querySelectorAll("input[data-log]").forEach(function (box) {
    box.addEventListener("change", function () {
      document.getElementById(box.dataset.log).classList.toggle("log", box.checked);
      document.getElementById(box.dataset.log).classList.toggle("linear-scale", !box.checked);
    });
  });
})();
"""

W, H, LEFT, RIGHT, TOP, BOTTOM = 600, 230, 52, 14, 12, 30
NAV = [("cut-section", "Where to cut"), *((f"grid-{name}", title) for name, title in GRIDS.items()),
       ("errors", "Errors"), ("model", "answer_mass & throughput"), ("recipe", "Recipe")]  # fmt: skip
SHARED_NAV = [*((f"grid-{name}", title) for name, title in SHARED_GRIDS.items()), *NAV[-3:]]


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _nice_top(value: float) -> float:
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value)


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.2g}"


def _frame(y_top: float, y_label: str, x_ticks: list[tuple[float, str]]) -> list[str]:
    """Gridlines, y ticks (0, half, top) and x ticks at fractions of the plot width."""
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    parts = []
    for fraction in (0, 0.5, 1):
        y = TOP + plot_h * (1 - fraction)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_number(y_top * fraction)}</text>')
    for fraction, label in x_ticks:
        x = LEFT + plot_w * fraction
        anchor = "start" if fraction == 0 else "end" if fraction == 1 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{H - 10}" text-anchor="{anchor}">{esc(label)}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{W - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}"/>')
    parts.append(f'<text x="12" y="{TOP + plot_h / 2:.1f}" transform="rotate(-90 12 {TOP + plot_h / 2:.1f})" '
                 f'text-anchor="middle">{esc(y_label)}</text>')  # fmt: skip
    return parts


PROB_TICKS = [(f, f"{f:g}") for f in (0, 0.25, 0.5, 0.75, 1)]


def histogram_svg(counts: list[int], element_id: str, threshold: float | None, what: str, suffix: str = "") -> str:
    """Bars over [0, 1], linear and log heights (a checkbox switches), kept bins coloured when a cut is given."""
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    bins, top = len(counts), max(counts, default=0)
    width = plot_w / bins
    groups = {}
    for scale, height_of, y_top in (
        ("linear", lambda c: c / _nice_top(top), _nice_top(top)),
        ("log", lambda c: math.log10(1 + c) / math.log10(1 + _nice_top(top)), _nice_top(top)),
    ):
        bars = []
        for k, count in enumerate(counts):
            h = plot_h * height_of(count) if count else 0
            kind = "mass" if threshold is None else ("kept" if k >= round(threshold * bins) else "dropped")
            x, y = LEFT + k * width + 0.5, TOP + plot_h - h
            bars.append(
                f'<rect class="bar {kind}" data-bin="{k}" data-count="{count}" x="{x:.2f}" y="{y:.2f}" '
                f'width="{max(width - 1, 0.5):.2f}" '
                f'height="{h:.2f}"><title>{what} {k / bins:.2f}-{(k + 1) / bins:.2f}: {count:,} rows</title></rect>'
            )
        groups[scale] = (bars, y_top)
    parts = [f'<svg id="{element_id}" class="linear-scale" viewBox="0 0 {W} {H}" role="img">']
    parts += [f'<g class="linear">{"".join(_frame(groups["linear"][1], "rows", PROB_TICKS))}</g>']
    parts += ['<g class="log">' + "".join(_frame(groups["log"][1], "rows (log)", PROB_TICKS)) + "</g>"]
    parts += ['<g class="linear">', *groups["linear"][0], "</g>", '<g class="log">', *groups["log"][0], "</g>"]
    if threshold is not None:
        x = LEFT + plot_w * threshold
        parts.append(
            f'<line id="cut-marker{suffix}" class="cut" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _cut_line(element_id: str, x: float, plot_h: float) -> str:
    return f'<line id="{element_id}" class="cut" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'


def line_svg(points: list[tuple[float, float]], css: str, y_label: str, x_ticks: list[tuple[float, str]],
             x_max: float, marker: tuple[float, float] | None = None, suffix: str = "") -> str:  # fmt: skip
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    y_top = _nice_top(max((y for _, y in points), default=0))
    coords = " ".join(
        f"{LEFT + plot_w * x / x_max:.1f},{TOP + plot_h * (1 - y / y_top):.1f}" for x, y in points if x_max
    )
    parts = [f'<svg viewBox="0 0 {W} {H}" role="img">', *_frame(y_top, y_label, x_ticks)]
    parts.append(f'<polyline class="{css}" points="{coords}"/>')
    if marker is not None:
        x, y = LEFT + plot_w * marker[0] / x_max, TOP + plot_h * (1 - marker[1] / y_top)
        parts.append(
            f'<line id="curve-marker{suffix}" class="cut" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
        )
        parts.append(f'<circle id="curve-dot{suffix}" class="dot" cx="{x:.1f}" cy="{y:.1f}" r="4"/>')
    parts.append("</svg>")
    return "".join(parts)


def _script_json(data: dict[str, Any]) -> str:
    """JSON that cannot end the <script> element it sits in."""
    return json.dumps(data).replace("</", "<\\/")


def stat(key: str, label: str, value: Any, shown: str, note: str = "", css: str = "") -> str:
    return (
        f'<div class="stat {css}"><div class="label">{esc(label)}</div>'
        f'<div class="value" data-stat="{key}" data-value="{esc(value)}">{esc(shown)}</div>'
        f'<div class="note">{esc(note)}</div></div>'
    )


def _suffix(question: Question) -> str:
    """What a named question's element ids end with ("-cat"); nothing for the single unnamed question."""
    return f"-{question.name}" if question.name else ""


def _title(question: Question) -> str:
    return question.name or "Answers"


def _shell(word: str) -> str:
    """A shell word: as is when safe, in double quotes when that suffices, else single-quoted."""
    if word and all(c.isalnum() or c in "-_./=:@,+%" for c in word):
        return word
    return f'"{word}"' if not any(c in word for c in '"$`\\!') else shlex.quote(word)


def _answer_where(question: Question, answer: str) -> str:
    quote = "'" if "'" not in answer else '"'
    return f"{question.column('answer')} == {quote}{answer}{quote}"


def _decided(question: Question, negate: bool = False) -> str:
    """A --where term over a question's decision: its label (or not), or its first answer."""
    if question.yes_no:
        return f"not {question.column('label')}" if negate else question.column("label")
    return _answer_where(question, question.answers[0])


def _badge(pick: Pick, question: Question) -> tuple[str, float | None]:
    """The badge of a row for one question, and the probability its meter shows (None: no score)."""
    first, decided, _ = question.columns
    if pick.scores.get(first) is None:
        return '<span class="prob err">error</span>', None
    if question.yes_no:
        prob = pick.scores[first]
        return f'<span class="prob {"pos" if pick.scores[decided] else "neg"}">{prob:.3f}</span>', prob
    answer = pick.scores[decided]
    prob = pick.scores[first][question.answers.index(answer)] if answer in question.answers else 0.0
    return f'<span class="prob pos">{esc(answer)} · {prob:.3f}</span>', prob


def _chips(pick: Pick, questions: list[Question]) -> str:
    """Every question's value of a row, small: `cat 0.82` (coloured when labelled true), `kind B`."""
    chips = []
    for question in questions:
        first, decided, _ = question.columns
        value = pick.scores.get(first)
        if value is None:
            continue
        if question.yes_no:
            css, shown = ("pos" if pick.scores[decided] else ""), f"{value:.2f}"
        else:
            css, shown = "pick", esc(pick.scores[decided])
        chips.append(f'<span class="chip {css}" title="{esc(first)}">{esc(_title(question))} {shown}</span>')
    return f'<div class="chips">{"".join(chips)}</div>' if chips else ""


def card(pick: Pick, question: Question | None = None, questions: list[Question] = ()) -> str:
    """A thumbnail with its row's score for `question` (badge and meter), or every question's (chips) without one."""
    if pick.thumbnail:
        frame = f'<img src="{pick.thumbnail}" alt="row {pick.row_id}">'
    else:
        frame = '<div class="noimage">no image to show<br>(none, or it cannot be decoded)</div>'
    chips = ""
    if question is not None:
        badge, prob = _badge(pick, question)
    elif pick.error is not None:
        badge, prob = '<span class="prob err">error</span>', None
    else:
        badge, prob, chips = "", None, _chips(pick, questions)
    meter = "" if prob is None else f'<div class="meter"><span style="width:{100 * prob:.1f}%"></span></div>'
    error = f'<div class="error-text">{esc(pick.error)}</div>' if pick.error else ""
    return (
        f'<figure data-row="{pick.row_id}"><div class="frame">{frame}</div><figcaption>{meter}'
        f'<div class="meta">{badge}<span class="rid">row {pick.row_id:,}</span></div>{chips}'
        f'<div class="text" title="{esc(pick.text or "")}">{esc(pick.text or "")}</div>{error}</figcaption></figure>'
    )


def _grid_lead(name: str, question: Question | None) -> str:
    prob = question.column("prob") if question is not None else "prob"
    return {
        "positives": f"The highest {prob} among rows labelled positive: are these what you want to keep?",
        "threshold": f"The rows whose {prob} is closest to the threshold "
        f"{question.threshold if question else 0:g}: where the cut decides.",
        "negatives": f"The lowest {prob}: are these really unrelated?",
        "random": "A fixed random sample of all rows (the same on every report of this run).",
        "errors": "One row of each error kind first. These rows are never kept.",
    }[name]


def grid_section(key: str, title: str, lead: str, picks: list[Pick], question: Question | None,
                 questions: list[Question]) -> str:  # fmt: skip
    cards = "".join(card(p, question, questions) for p in picks) or '<p class="lead">No such row.</p>'
    return (
        f'<section id="grid-{esc(key)}"><h2>{esc(title)}</h2><p class="lead">{esc(lead)}</p>'
        f'<div class="grid-cards">{cards}</div></section>'
    )


def question_grids(qf: QuestionFacts, grids: dict[str, list[Pick]], single: bool) -> list[str]:
    """The thumbnail grids of one question, titled with its name unless it is the run's single question."""
    question, sections = qf.question, []
    for i, (key, title) in enumerate(qf.grids().items()):
        if question.yes_no:
            base = next(b for b in ("positives", "threshold", "negatives") if question.column(b) == key)
            lead, focus = _grid_lead(base, question), question
        else:
            answer = question.answers[i]
            lead = (
                f"The rows that answered {answer!r} most surely (highest P({answer!r})); "
                f"--where {_shell(_answer_where(question, answer))} keeps them all."
            )
            focus = question
        shown = title if single else f"{_title(question)} · {title}"
        sections.append(grid_section(key, shown, lead, grids.get(key, []), focus, []))
    return sections


def yes_no_section(
    qf: QuestionFacts, rows: int, single: bool, command: str, others: list[Question]
) -> tuple[str, dict[str, Any]]:
    """A Y/N question's histogram with its threshold slider, kept share against the threshold and the export
    command the slider proposes; and the data the page's script moves them with."""
    question, suffix = qf.question, _suffix(qf.question)
    prob, label = question.column("prob"), question.column("label")
    threshold = question.threshold
    combined = " and ".join([label, *(_decided(q, negate=True) for q in others[:1])])
    kept_from = [*(sum(qf.prob_histogram[k:]) for k in range(HISTOGRAM_BINS)), qf.ones]
    curve = [(k / HISTOGRAM_BINS, kept / max(rows, 1)) for k, kept in enumerate(kept_from)]
    marker = (threshold, qf.positives / max(rows, 1))  # the run's own cut, exact from its labels
    to = command + (f"_{question.name}" if question.name else "") + "_kept"
    cut = {"suffix": suffix, "column": prob, "histogram": qf.prob_histogram, "ones": qf.ones, "where": not single,
           "command": to}  # fmt: skip
    if single:
        head = (
            '<section id="cut-section"><h2>Where to cut</h2><p class="lead">prob is P(“'
            f"{esc(question.answers[0])}”) over the two answers. Move the threshold to see what it keeps; the run "
            f"labelled with {threshold:g}.</p>"
        )
        note = "<code>annotate export --top-fraction F</code> keeps exactly the top F instead."
    else:
        head = (
            f'<section id="question-{question.name}" class="question"><h2>{esc(question.name)} '
            f'<span class="kind">yes / no</span></h2><p class="ask">“{esc(question.text)}”</p><p class="lead">'
            f"{esc(prob)} is P(“{esc(question.answers[0])}”) over “{esc(question.answers[0])}” / "
            f"“{esc(question.answers[1])}”; the run set {esc(label)} = {esc(prob)} ≥ {threshold:g} "
            f'(<span data-positives="{question.name}" data-value="{qf.positives}">{qf.positives:,}</span> rows). '
            "Move the threshold to see what it keeps.</p>"
        )
        note = (
            f"Combine questions with --where, e.g. <code>--where {esc(_shell(combined))}</code>."
            if others
            else "--where also takes <code>and</code>, <code>or</code>, <code>not</code> and the other columns."
        )
    html_ = "".join(
        [
            head,
            '<div class="charts"><div>',
            histogram_svg(qf.prob_histogram, f"prob-histogram{suffix}", threshold, prob, suffix),
            f'<div class="controls"><label><input type="checkbox" data-log="prob-histogram{suffix}"> log scale</label>'
            f'<input id="cut{suffix}" type="range" min="0" max="100" step="1" value="{round(threshold * 100)}" '
            f'aria-label="threshold of {esc(prob)}"><span id="cut-readout{suffix}" class="readout"></span></div>',
            f'<code class="command" id="cut-command{suffix}"></code></div><div>',
            line_svg(curve, "curve", "share of all rows kept", PROB_TICKS, 1.0, marker, suffix),
            f'<p class="lead">Share of all rows with {esc(prob)} ≥ x (rows with an error are never kept). {note}</p>'
            "</div></div></section>",
        ]
    )
    return html_, cut


def answers_section(qf: QuestionFacts, rows: int, command: str) -> str:
    """A question with answers: a bar per answer (rows that chose it, share of all rows) and how to export them."""
    question, top = qf.question, max(qf.answers.values(), default=0) or 1
    bars = []
    for answer, count in qf.answers.items():
        where = _answer_where(question, answer)
        bars.append(
            f'<div class="answer-row"><span class="answer-name">{esc(answer)}</span>'
            f'<div class="answer-bar"><span style="width:{100 * count / top:.1f}%"></span></div>'
            f'<span class="num" data-answer="{esc(question.name)}:{esc(answer)}" data-value="{count}">{count:,}</span>'
            f'<span class="num share">{count / max(rows, 1):.1%}</span><code>--where {esc(_shell(where))}</code></div>'
        )
    most = max(qf.answers, key=lambda a: qf.answers[a]) if qf.answers else question.answers[0]
    name = f"_{question.name}" if question.name else ""
    example = f"{command}{name}_{most} --where {_shell(_answer_where(question, most))}"
    return (
        f'<section id="question-{question.name or "answers"}" class="question"><h2>{esc(_title(question))} '
        f'<span class="kind">{len(question.answers)} answers</span></h2><p class="ask">“{esc(question.text)}”</p>'
        f'<p class="lead">{esc(question.column("answer"))} is the most likely of '
        f"{' / '.join(f'“{esc(a)}”' for a in question.answers)} ({esc(question.column('probs'))} holds each one's "
        "probability, renormalised over them). Rows that chose each answer, of all rows:</p>"
        f'<div class="answers">{"".join(bars)}</div><code class="command">{esc(example)}</code></section>'
    )


def questions_table(facts: RunFacts) -> str:
    """One line per question: its text, its answers, what the run decided."""
    lines = []
    for qf in facts.questions:
        question = qf.question
        if question.yes_no:
            label = question.column("label")
            decided = f"{label}: {qf.positives:,} rows ({qf.positives / max(facts.rows, 1):.1%}), threshold " + (
                f"{question.threshold:g}"
            )
        else:
            decided = " · ".join(f"{esc(a)} {n:,}" for a, n in qf.answers.items())
        anchor = f"question-{question.name or 'answers'}"
        lines.append(
            f'<tr><td><a href="#{anchor}">{esc(_title(question))}</a></td><td>{esc(question.text)}</td>'
            f"<td>{' / '.join(esc(a) for a in question.answers)}</td><td>{esc(decided)}</td></tr>"
        )
    return (
        '<section id="questions"><h2>Questions</h2><p class="lead">Asked of every image in one pass. Keep rows by '
        "any expression over the columns, e.g. "
        f"<code>annotate export RUN --to DIR --where {esc(_shell(_example_where(facts.questions)))}</code>.</p>"
        "<table><tr><th>name</th><th>question</th><th>answers</th><th>decided</th></tr>"
        f"{''.join(lines)}</table></section>"
    )


def _example_where(questions: list[QuestionFacts]) -> str:
    return " and ".join(_decided(qf.question) for qf in questions[:2])


def _coarse(counts: list[int], bins: int) -> list[int]:
    step = len(counts) // bins
    return [sum(counts[k * step : (k + 1) * step]) for k in range(bins)]


def disagrees(summary: dict[str, Any], facts: RunFacts) -> bool:
    """Whether the data files and summary.json (summed from the journals) count differently."""
    if any(summary.get(key) != getattr(facts, key) for key in ("rows", "scored", "errors")):
        return True
    for qf in facts.questions:
        question = qf.question
        counts = summary.get("questions", {}).get(question.name, {}) if question.name else summary
        if question.yes_no:
            journal = counts.get("prob_histogram")
            if counts.get("positives") != qf.positives:
                return True
            if journal and HISTOGRAM_BINS % len(journal) == 0 and journal != _coarse(qf.prob_histogram, len(journal)):
                return True
        elif counts.get("answers") != qf.answers:
            return True
    return False


def _stats(facts: RunFacts, total: int | None, rate: float | None, sessions: int) -> list[str]:
    stats = [
        stat("rows", "Rows", facts.rows, f"{facts.rows:,}", f"of {total:,} in the input" if total else ""),
        stat("scored", "Scored", facts.scored, f"{facts.scored:,}", f"{facts.scored / max(facts.rows, 1):.1%}"),
        stat("errors", "Errors", facts.errors, f"{facts.errors:,}", f"{len(facts.error_kinds)} kinds", "errors"),
    ]
    single = facts.single
    if single is not None:
        kept_share = single.positives / facts.rows if facts.rows else 0.0
        stats += [
            stat("positives", "Kept (label)", single.positives, f"{single.positives:,}",
                 f"prob ≥ {single.question.threshold:g}", "kept"),
            stat("kept_share", "Kept share", round(kept_share, 4), f"{kept_share:.1%}", "of all rows", "kept"),
        ]  # fmt: skip
    elif not facts.questions[0].question.name:  # one question with answers: its most common answer
        answers = facts.questions[0].answers
        most = max(answers, key=lambda a: answers[a])
        share = f"{answers[most] / max(facts.rows, 1):.1%} of all rows"
        stats.append(stat("top_answer", "Most common answer", most, most, share, "kept"))
    else:
        stats.append(stat("questions", "Questions", len(facts.questions), str(len(facts.questions)), "per image"))
    stats.append(
        stat("rows_per_s", "rows_per_s", rate if rate is not None else "", f"{rate:,.1f}" if rate else "–",
             f"{sessions} session(s)")
    )  # fmt: skip
    return stats


def render(folder: RunFolder, recipe: dict[str, Any], facts: RunFacts, speed: dict[str, Any]) -> str:
    """The whole page as one string."""
    summary = json.loads(folder.summary_path.read_text()) if folder.finished else None
    manifest = folder.manifest()
    prompt, model = recipe["prompt"], recipe["model"]
    questions = [qf.question for qf in facts.questions]
    single = facts.single
    unnamed = not questions[0].name  # the recipe's one `prompt.question`: its titles need no name
    source = recipe["input"].get("parquet") or recipe["input"]["hf"]["path"]
    rate = summary.get("rows_per_s") if summary else None
    state = "finished" if summary else "unfinished"
    warning = ""
    if summary and disagrees(summary, facts):
        warning = '<div class="warning">The data files and summary.json disagree: the run folder was changed.</div>'
    geometry = {"x0": LEFT, "width": W - LEFT - RIGHT, "y0": TOP, "height": H - TOP - BOTTOM}
    command = f"annotate export {_shell(str(folder.root))} --to {_shell(recipe['name'])}"
    cuts, sections = [], []
    for qf in facts.questions:
        if qf.question.yes_no:
            others = [q for q in questions if q is not qf.question]
            section, cut = yes_no_section(qf, facts.rows, single is not None, command, others)
            cuts.append(cut)
        else:
            section = answers_section(qf, facts.rows, command)
        sections.append(section)
        sections += question_grids(qf, facts.grids, unnamed)
    data = {"rows": facts.rows, "cuts": cuts, **geometry}
    shared_question = questions[0] if unnamed else None
    sections += [
        grid_section(name, title, _grid_lead(name, shared_question), facts.grids.get(name, []),
                     shared_question if name == "random" else None, questions)
        for name, title in SHARED_GRIDS.items()
    ]  # fmt: skip
    error_rows = "".join(
        f'<tr><td>{esc(kind)}</td><td class="num" data-error-kind="{esc(kind)}" data-value="{count}">{count:,}</td>'
        f'<td class="num">{count / facts.rows:.2%}</td><td class="num">{facts.error_samples[kind].row_id:,}</td>'
        f"<td>{esc(facts.error_samples[kind].error)}<br><small>{esc(facts.error_samples[kind].text or '')}</small>"
        "</td></tr>"
        for kind, count in facts.error_kinds.most_common()
    )
    errors = (
        f"<table><tr><th>kind (error_kind)</th><th>rows</th><th>share</th><th>example row</th><th>message</th></tr>"
        f"{error_rows}</table>"
        if error_rows
        else '<p class="lead">No row failed.</p>'
    )
    seconds = max(speed["seconds"], 1e-9)
    ticks = [(f, format_duration(seconds * f)) for f in (0, 0.25, 0.5, 0.75, 1)]
    masses = []
    for qf in facts.questions:
        question, suffix = qf.question, _suffix(qf.question)
        mass = question.column("answer_mass")
        what = (
            "P(positive) + P(negative)"
            if question.yes_no and single is not None
            else f"the total probability of {' / '.join(question.answers)}"
        )
        masses.append(
            f'<div><h2>{esc(mass)}</h2><p class="lead">{esc(what)} under the full softmax: how much the model '
            "answered the question at all.</p>"
            + histogram_svg(qf.mass_histogram, f"mass-histogram{suffix}", None, mass)
            + f'<div class="controls"><label><input type="checkbox" data-log="mass-histogram{suffix}"> log scale'
            "</label></div></div>"
        )
    recipe_rows = [
        ("model", f"{model['name']}" + (f" @ {model['revision']}" if model.get("revision") else "")),
        ("dtype / pixels", f"{model['dtype']}, {model['min_pixels']:,} to {model['max_pixels']:,} pixels"),
        ("system", prompt["system"]),
    ]
    if single is not None:
        recipe_rows += [
            ("question", prompt["question"]),
            ("text", prompt["query"] or f"column {recipe['input']['text_column']}"),
            ("answers", f"{prompt['positive']} / {prompt['negative']}"),
            ("threshold", f"label = prob >= {single.question.threshold:g}"),
        ]
    else:
        for question in questions:
            decides = (
                f"{question.column('label')} = {question.column('prob')} >= {question.threshold:g}"
                if question.yes_no
                else f"{question.column('answer')} = the most likely"
            )
            recipe_rows.append(
                (f"question {question.name}".strip(), f"{question.text}\n{' / '.join(question.answers)}; {decides}")
            )
        if any("{text}" in q.text for q in questions):
            recipe_rows.append(("text", prompt["query"] or f"column {recipe['input']['text_column']}"))
    recipe_rows.append(("input", source))
    if single is not None:
        text = f"the fixed text “{prompt['query']}”" if prompt.get("query") else f"its {recipe['input']['text_column']}"
        asked = f"Is the image related to {esc(text)}? asked <code>{esc(model['name'])}</code>"
        nav = NAV
    elif unnamed:
        asked = f"“{esc(questions[0].text)}” asked <code>{esc(model['name'])}</code>"
        nav = [("question-answers", "Answers"), *SHARED_NAV]
    else:
        several = f"{len(questions)} questions" if len(questions) > 1 else "one question"
        asked = f"{several} asked of <code>{esc(model['name'])}</code> in one pass"
        nav = [("questions", "Questions"), *((f"question-{q.name}", q.name) for q in questions), *SHARED_NAV]
    made = time.strftime("%Y-%m-%d %H:%M")
    return "".join(
        [
            f'<!doctype html><html lang="en"><head><meta charset="utf-8">{REPORT_MARKER}',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">',
            f"<title>{esc(recipe['name'])}: annotator report</title><style>{STYLE}</style></head><body><main>",
            f'<header><h1>{esc(recipe["name"])}</h1><span class="badge {state}" data-stat="state">{state}</span>'
            "</header>",
            f'<p class="subtitle">{asked} for every row of <code>{esc(source)}</code>. '
            f"Run folder <code>{esc(folder.root)}</code>, report of {esc(made)}.</p>",
            warning,
            f'<div class="stats">{"".join(_stats(facts, manifest.get("total_rows"), rate, speed["sessions"]))}</div>',
            '<nav class="toc">',
            " · ".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title in nav),
            "</nav>",
            "" if unnamed else questions_table(facts),
            *sections,
            f'<section id="errors"><h2>Errors</h2><p class="lead">GROUP BY error_kind; the message keeps the '
            f"detail.</p>{errors}</section>",
            '<section id="model"><div class="charts">',
            *masses,
            '<div id="throughput"><h2>Throughput</h2><p class="lead">rows_per_s: rows committed (errors '
            f"included) per second since the model loaded, through each session; {speed['sessions']} session(s), "
            f"{format_duration(speed['seconds'])} of scoring.</p>",
            line_svg(speed["points"], "rate", "rows_per_s", ticks, seconds) if speed["points"] else "",
            "</div></div></section>",
            '<section id="recipe"><h2>Recipe</h2><dl>',
            "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in recipe_rows),
            "</dl><details><summary>recipe.yaml</summary><pre>",
            esc(folder.recipe_path.read_text(encoding="utf-8")),
            "</pre></details></section>",
            f"<footer>annotator {__version__} · prob histograms of {HISTOGRAM_BINS} bins · read in "
            f"{facts.seconds.get('scores', 0):.1f} s (scores) + {facts.seconds.get('thumbnails', 0):.1f} s "
            "(thumbnails)</footer></main>",
            f'<script type="application/json" id="report-data">{_script_json(data)}</script>',
            f"<script>{SCRIPT}</script></body></html>",
        ]
    )
