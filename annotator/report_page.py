"""The report page: HTML, CSS, inline SVG charts and a little inline JS, in one file that needs no network."""

from __future__ import annotations

import html
import json
import math
import time
from typing import Any

from annotator import __version__
from annotator.progress import format_duration
from annotator.report import GRIDS, HISTOGRAM_BINS, Pick, RunFacts
from annotator.sink import RunFolder

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
"""

SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const slider = document.getElementById("cut");
  const readout = document.getElementById("cut-readout");
  const command = document.getElementById("cut-command");
  const marker = document.getElementById("cut-marker");
  const curveMarker = document.getElementById("curve-marker");
  const curveDot = document.getElementById("curve-dot");
  const bars = document.querySelectorAll("#prob-histogram .bar");
  const bins = data.prob_histogram.length;
  function update() {
    const k = Number(slider.value), t = k / 100;
    let kept = 0;
    for (let i = Math.round(t * bins); i < bins; i++) kept += data.prob_histogram[i];
    if (k === 100) kept = data.ones;
    const share = data.rows ? kept / data.rows : 0;
    readout.innerHTML = "prob &ge; " + t.toFixed(2) + " keeps <b>" + (100 * share).toFixed(1) + "%</b> of all rows (" +
      kept.toLocaleString("en-US") + " of " + data.rows.toLocaleString("en-US") + ")";
    command.textContent = "annotate export " + data.run + " --to " + data.name + "_kept --min-prob " + t.toFixed(2);
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


def histogram_svg(counts: list[int], element_id: str, threshold: float | None, what: str) -> str:
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
                f'<rect class="bar {kind}" data-bin="{k}" x="{x:.2f}" y="{y:.2f}" width="{max(width - 1, 0.5):.2f}" '
                f'height="{h:.2f}"><title>{what} {k / bins:.2f}-{(k + 1) / bins:.2f}: {count:,} rows</title></rect>'
            )
        groups[scale] = (bars, y_top)
    parts = [f'<svg id="{element_id}" class="linear-scale" viewBox="0 0 {W} {H}" role="img">']
    parts += [f'<g class="linear">{"".join(_frame(groups["linear"][1], "rows", PROB_TICKS))}</g>']
    parts += ['<g class="log">' + "".join(_frame(groups["log"][1], "rows (log)", PROB_TICKS)) + "</g>"]
    parts += ['<g class="linear">', *groups["linear"][0], "</g>", '<g class="log">', *groups["log"][0], "</g>"]
    if threshold is not None:
        x = LEFT + plot_w * threshold
        parts.append(f'<line id="cut-marker" class="cut" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>')
    parts.append("</svg>")
    return "".join(parts)


def line_svg(points: list[tuple[float, float]], css: str, y_label: str, x_ticks: list[tuple[float, str]],
             x_max: float, marker: tuple[float, float] | None = None) -> str:  # fmt: skip
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    y_top = _nice_top(max((y for _, y in points), default=0))
    coords = " ".join(
        f"{LEFT + plot_w * x / x_max:.1f},{TOP + plot_h * (1 - y / y_top):.1f}" for x, y in points if x_max
    )
    parts = [f'<svg viewBox="0 0 {W} {H}" role="img">', *_frame(y_top, y_label, x_ticks)]
    parts.append(f'<polyline class="{css}" points="{coords}"/>')
    if marker is not None:
        x, y = LEFT + plot_w * marker[0] / x_max, TOP + plot_h * (1 - marker[1] / y_top)
        parts.append(f'<line id="curve-marker" class="cut" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>')
        parts.append(f'<circle id="curve-dot" class="dot" cx="{x:.1f}" cy="{y:.1f}" r="4"/>')
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


def card(pick: Pick) -> str:
    if pick.thumbnail:
        frame = f'<img src="{pick.thumbnail}" alt="row {pick.row_id}">'
    else:
        frame = '<div class="noimage">no image to show<br>(none, or it cannot be decoded)</div>'
    if pick.prob is None:
        badge, meter = '<span class="prob err">error</span>', ""
    else:
        badge = f'<span class="prob {"pos" if pick.label else "neg"}">{pick.prob:.3f}</span>'
        meter = f'<div class="meter"><span style="width:{100 * pick.prob:.1f}%"></span></div>'
    error = f'<div class="error-text">{esc(pick.error)}</div>' if pick.error else ""
    return (
        f'<figure data-row="{pick.row_id}"><div class="frame">{frame}</div><figcaption>{meter}'
        f'<div class="meta">{badge}<span class="rid">row {pick.row_id:,}</span></div>'
        f'<div class="text" title="{esc(pick.text or "")}">{esc(pick.text or "")}</div>{error}</figcaption></figure>'
    )


def _grid_lead(name: str, threshold: float) -> str:
    return {
        "positives": "The highest prob among rows labelled positive: are these what you want to keep?",
        "threshold": f"The rows whose prob is closest to the threshold {threshold:g}: where the cut decides.",
        "negatives": "The lowest prob: are these really unrelated?",
        "random": "A fixed random sample of all rows (the same on every report of this run).",
        "errors": "One row of each error kind first. These rows are never kept.",
    }[name]


def render(folder: RunFolder, recipe: dict[str, Any], facts: RunFacts, speed: dict[str, Any]) -> str:
    """The whole page as one string."""
    summary = json.loads(folder.summary_path.read_text()) if folder.finished else None
    manifest = folder.manifest()
    threshold, prompt, model = recipe["output"]["threshold"], recipe["prompt"], recipe["model"]
    total = manifest.get("total_rows")
    rate = summary.get("rows_per_s") if summary else None
    kept_share = facts.positives / facts.rows if facts.rows else 0.0
    text = f"the fixed text “{prompt['query']}”" if prompt.get("query") else f"its {recipe['input']['text_column']}"
    state = "finished" if summary else "unfinished"
    stats = [
        stat("rows", "Rows", facts.rows, f"{facts.rows:,}", f"of {total:,} in the input" if total else ""),
        stat("scored", "Scored", facts.scored, f"{facts.scored:,}", f"{facts.scored / max(facts.rows, 1):.1%}"),
        stat("errors", "Errors", facts.errors, f"{facts.errors:,}", f"{len(facts.error_kinds)} kinds", "errors"),
        stat("positives", "Kept (label)", facts.positives, f"{facts.positives:,}", f"prob ≥ {threshold:g}", "kept"),
        stat("kept_share", "Kept share", round(kept_share, 4), f"{kept_share:.1%}", "of all rows", "kept"),
        stat("rows_per_s", "rows_per_s", rate if rate is not None else "", f"{rate:,.1f}" if rate else "–",
             f"{speed['sessions']} session(s)"),
    ]  # fmt: skip
    warning = ""
    if summary and any(summary.get(key) != getattr(facts, key) for key in ("rows", "scored", "errors", "positives")):
        warning = '<div class="warning">The data files and summary.json disagree: the run folder was changed.</div>'
    kept_from = [*(sum(facts.prob_histogram[k:]) for k in range(HISTOGRAM_BINS)), facts.ones]
    curve = [(k / HISTOGRAM_BINS, kept / max(facts.rows, 1)) for k, kept in enumerate(kept_from)]
    marker = (threshold, facts.positives / max(facts.rows, 1))  # the run's own cut, exact from its labels
    geometry = {"x0": LEFT, "width": W - LEFT - RIGHT, "y0": TOP, "height": H - TOP - BOTTOM}
    data = {"prob_histogram": facts.prob_histogram, "ones": facts.ones, "rows": facts.rows, "run": str(folder.root),
            "name": recipe["name"], **geometry}  # fmt: skip
    grids = []
    for name, title in GRIDS.items():
        picks = facts.grids.get(name, [])
        cards = "".join(card(p) for p in picks) or '<p class="lead">No such row.</p>'
        grids.append(
            f'<section id="grid-{name}"><h2>{esc(title)}</h2><p class="lead">{esc(_grid_lead(name, threshold))}</p>'
            f'<div class="grid-cards">{cards}</div></section>'
        )
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
    recipe_rows = [
        ("model", f"{model['name']}" + (f" @ {model['revision']}" if model.get("revision") else "")),
        ("dtype / pixels", f"{model['dtype']}, {model['min_pixels']:,} to {model['max_pixels']:,} pixels"),
        ("system", prompt["system"]),
        ("question", prompt["question"]),
        ("text", prompt["query"] or f"column {recipe['input']['text_column']}"),
        ("answers", f"{prompt['positive']} / {prompt['negative']}"),
        ("threshold", f"label = prob >= {threshold:g}"),
        ("input", recipe["input"].get("parquet") or recipe["input"]["hf"]["path"]),
    ]
    made = time.strftime("%Y-%m-%d %H:%M")
    return "".join(
        [
            '<!doctype html><html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">',
            f"<title>{esc(recipe['name'])}: annotator report</title><style>{STYLE}</style></head><body><main>",
            f'<header><h1>{esc(recipe["name"])}</h1><span class="badge {state}" data-stat="state">{state}</span>'
            "</header>",
            f'<p class="subtitle">Is the image related to {esc(text)}? asked <code>{esc(model["name"])}</code> '
            f"for every row of <code>{esc(recipe['input'].get('parquet') or recipe['input']['hf']['path'])}</code>. "
            f"Run folder <code>{esc(folder.root)}</code>, report of {esc(made)}.</p>",
            warning,
            f'<div class="stats">{"".join(stats)}</div>',
            '<nav class="toc">',
            " · ".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title in NAV),
            "</nav>",
            '<section id="cut-section"><h2>Where to cut</h2><p class="lead">prob is P(“'
            f"{esc(prompt['positive'])}”) over the two answers. Move the threshold to see what it keeps; the run "
            f'labelled with {threshold:g}.</p><div class="charts"><div>',
            histogram_svg(facts.prob_histogram, "prob-histogram", threshold, "prob"),
            '<div class="controls"><label><input type="checkbox" data-log="prob-histogram"> log scale</label>'
            f'<input id="cut" type="range" min="0" max="100" step="1" value="{round(threshold * 100)}" '
            'aria-label="threshold"><span id="cut-readout" class="readout"></span></div>',
            '<code class="command" id="cut-command"></code></div><div>',
            line_svg(curve, "curve", "share of all rows kept", PROB_TICKS, 1.0, marker),
            '<p class="lead">Share of all rows with prob ≥ x (rows with an error are never kept). '
            "<code>annotate export --top-fraction F</code> keeps exactly the top F instead.</p></div></div></section>",
            *grids,
            f'<section id="errors"><h2>Errors</h2><p class="lead">GROUP BY error_kind; the message keeps the '
            f"detail.</p>{errors}</section>",
            '<section id="model"><div class="charts"><div><h2>answer_mass</h2><p class="lead">P(positive) + '
            "P(negative) under the full softmax: how much the model answered the question at all.</p>",
            histogram_svg(facts.mass_histogram, "mass-histogram", None, "answer_mass"),
            '<div class="controls"><label><input type="checkbox" data-log="mass-histogram"> log scale</label></div>'
            '</div><div id="throughput"><h2>Throughput</h2><p class="lead">rows_per_s: rows committed (errors '
            f"included) per second since the model loaded, through each session; {speed['sessions']} session(s), "
            f"{format_duration(speed['seconds'])} of scoring.</p>",
            line_svg(speed["points"], "rate", "rows_per_s", ticks, seconds) if speed["points"] else "",
            "</div></div></section>",
            '<section id="recipe"><h2>Recipe</h2><dl>',
            "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in recipe_rows),
            "</dl><details><summary>recipe.yaml</summary><pre>",
            esc(folder.recipe_path.read_text(encoding="utf-8")),
            "</pre></details></section>",
            f"<footer>annotator {__version__} · prob histogram of {HISTOGRAM_BINS} bins · read in "
            f"{facts.seconds.get('scores', 0):.1f} s (scores) + {facts.seconds.get('thumbnails', 0):.1f} s "
            "(thumbnails)</footer></main>",
            f'<script type="application/json" id="report-data">{_script_json(data)}</script>',
            f"<script>{SCRIPT}</script></body></html>",
        ]
    )
