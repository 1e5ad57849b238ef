"""A self-contained HTML report of a simulated rollout (``canaryd simulate --report``).

:func:`render_report` turns a :class:`~canaryd.simulate.RunResult` (and optionally the
:class:`~canaryd.simulate.MonteCarlo` it came from) into one HTML5 document that needs
no network: CSS is inline and the three charts (traffic weight, error rate, latency)
are inline SVG drawn here, with ``<title>`` tooltips instead of JavaScript.  Every
chart marks the state machine's decisions (``result.events``) as vertical lines on a
shared time axis, so a reader can see what the controller saw when it acted.

:func:`write_report` writes the document atomically, so a half-written report is never
left where a browser or a CI artifact upload might pick it up.
"""

from __future__ import annotations

import html
import math
import os
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis.verdict import format_duration
from canaryd.simulate import Event, MonteCarlo, RunResult, Sample
from canaryd.spec import CanarySpec

__all__ = ["CANARY_COLOR", "STABLE_COLOR", "decision_kind", "render_report", "write_report"]

#: The canary's colour in every chart and legend.
CANARY_COLOR = "#7b3fc4"
#: The stable version's colour in every chart and legend.
STABLE_COLOR = "#1f77b4"

_RED = "#d62728"
_GREEN = "#2a9d3a"
_AMBER = "#d99000"
_GREY = "#8c8c8c"

_KIND_COLORS = {"rollback": _RED, "promotion": _GREEN, "hold": _AMBER, "other": _GREY}
_OUTCOME_COLORS = {
    "promoted": _GREEN,
    "rolled_back": _RED,
    "failed": _RED,
    "held": _AMBER,
    "waiting_approval": _AMBER,
}
_ROLLBACK_REASONS = frozenset({"RolledBack", "PromotionFailed"})
_PROMOTION_REASONS = frozenset({"Promoting", "Promoted"})
_HOLD_REASONS = frozenset({"Holding", "Paused", "WaitingApproval"})

# Chart geometry, in SVG user units (the SVG scales to the page width).
# From the top: the legend, a band for decision labels, the plot, the time axis.
_WIDTH = 900
_HEIGHT = 290
_LEFT = 64
_RIGHT = 18
_LEGEND_Y = 13
_LABEL_ROWS = 4
_LABEL_ROW_H = 11
_LABEL_CHAR_W = 5.4
_BAND_TOP = 24
_TOP = _BAND_TOP + _LABEL_ROWS * _LABEL_ROW_H + 4
_BOTTOM = 44
_PLOT_W = _WIDTH - _LEFT - _RIGHT
_PLOT_H = _HEIGHT - _TOP - _BOTTOM


def decision_kind(reason: str) -> str:
    """How an event's ``reason`` is drawn: ``rollback``, ``promotion``, ``hold`` or ``other``."""
    if reason in _ROLLBACK_REASONS:
        return "rollback"
    if reason in _PROMOTION_REASONS:
        return "promotion"
    if reason in _HOLD_REASONS:
        return "hold"
    return "other"


def _e(text: object) -> str:
    """``text`` escaped for HTML/SVG text and attribute values."""
    return html.escape(str(text), quote=True)


def _num(value: float) -> str:
    """A coordinate with one decimal, without a trailing ``.0``."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _at(t_s: float) -> str:
    return f"t={format_duration(t_s)}"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "n/a"


def _ms(value: float) -> str:
    if not math.isfinite(value):
        return "no data"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


# -- the SVG line chart ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Series:
    """One line: ``points`` are (seconds, value); a NaN value breaks the line."""

    key: str
    label: str
    color: str
    points: tuple[tuple[float, float], ...]
    dashed: bool = False
    step: bool = False


@dataclass(frozen=True, slots=True)
class _Chart:
    """What one chart shows; :func:`_svg_chart` draws it."""

    key: str
    title: str
    y_label: str
    y_unit: str
    series: tuple[_Series, ...]
    hover: tuple[tuple[float, str], ...] = ()
    refs: tuple[tuple[float, str], ...] = ()
    y_top: float | None = None
    y_min_top: float = 1.0


def _nice_step(span: float, target: int) -> float:
    """A 1/2/2.5/5×10ⁿ tick step giving about ``target`` ticks over ``span``."""
    if not span > 0 or not math.isfinite(span):
        return 1.0
    raw = span / target
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * magnitude >= raw * (1 - 1e-9):
            return m * magnitude
    return 10.0 * magnitude  # pragma: no cover - the loop always returns


def _ticks(top: float, step: float) -> list[float]:
    count = round(top / step)
    return [round(i * step, 10) for i in range(count + 1) if i * step <= top * (1 + 1e-9)]


def _segments(points: Sequence[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive finite points; non-finite values split the runs."""
    runs: list[list[tuple[float, float]]] = []
    current: list[tuple[float, float]] = []
    for x, y in points:
        if math.isfinite(x) and math.isfinite(y):
            current.append((x, y))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _decision_markers(events: Sequence[Event], x_of: dict[float, float]) -> list[str]:
    """One ``<g class="decision">`` per event, labels stacked so they rarely overlap."""
    row_ends = [-math.inf] * _LABEL_ROWS
    plot_right = _LEFT + _PLOT_W
    out: list[str] = []
    for event in events:
        x = x_of[event.t_s]
        kind = decision_kind(event.reason)
        color = _KIND_COLORS[kind]
        width = _LABEL_CHAR_W * len(event.reason) + 4
        anchor_end = x + 3 + width > plot_right
        start, end = (x - 3 - width, x - 3) if anchor_end else (x + 3, x + 3 + width)
        free = [i for i, row_end in enumerate(row_ends) if row_end < start]
        row = free[0] if free else min(range(_LABEL_ROWS), key=row_ends.__getitem__)
        row_ends[row] = end
        label_x = x - 3 if anchor_end else x + 3
        row_top = _BAND_TOP + row * _LABEL_ROW_H
        label_y = row_top + 9
        anchor = ' text-anchor="end"' if anchor_end else ""
        tip = f"{_at(event.t_s)} {event.reason}: {event.message}"
        out.append(
            f'<g class="decision" data-reason="{_e(event.reason)}" data-kind="{kind}" '
            f'data-t="{event.t_s:g}" stroke="{color}">'
            f"<title>{_e(tip)}</title>"
            f'<line x1="{_num(x)}" y1="{row_top}" x2="{_num(x)}" y2="{_TOP + _PLOT_H}" '
            f'stroke-width="1.5" stroke-opacity="0.8"/>'
            f'<line class="hit" x1="{_num(x)}" y1="{row_top}" x2="{_num(x)}" '
            f'y2="{_TOP + _PLOT_H}" stroke="transparent" stroke-width="9"/>'
            f'<text x="{_num(label_x)}" y="{label_y}" fill="{color}" stroke="none" '
            f'class="label"{anchor}>'
            f"{_e(event.reason)}</text></g>"
        )
    return out


def _series_svg(series: _Series, sx: dict[float, float], sy_top: float) -> list[str]:
    """The path (and dots for isolated points) of one series."""

    def sy(v: float) -> float:
        return _TOP + _PLOT_H - min(v, sy_top) / sy_top * _PLOT_H

    commands: list[str] = []
    dots: list[str] = []
    for run in _segments(series.points):
        (x0, y0), rest = run[0], run[1:]
        if not rest:
            dots.append(
                f'<circle cx="{_num(sx[x0])}" cy="{_num(sy(y0))}" r="2.5" fill="{series.color}"/>'
            )
            continue
        parts = [f"M{_num(sx[x0])} {_num(sy(y0))}"]
        for x, y in rest:
            if series.step:
                parts.append(f"H{_num(sx[x])} V{_num(sy(y))}")
            else:
                parts.append(f"L{_num(sx[x])} {_num(sy(y))}")
        commands.append(" ".join(parts))
    dash = ' stroke-dasharray="6 4"' if series.dashed else ""
    out = [f'<g class="series" data-series="{_e(series.key)}"><title>{_e(series.label)}</title>']
    if commands:
        out.append(
            f'<path d="{" ".join(commands)}" fill="none" stroke="{series.color}" '
            f'stroke-width="1.8" stroke-linejoin="round"{dash}/>'
        )
    out += dots
    out.append("</g>")
    return out


def _svg_chart(chart: _Chart, x_max: float, events: Sequence[Event]) -> str:
    """An inline SVG line chart of ``chart`` over time [0, ``x_max``] s, with decisions."""
    x_max = x_max if x_max > 0 else 1.0
    xs = {x for s in chart.series for x, _ in s.points} | {t for t, _ in chart.hover}
    xs |= {e.t_s for e in events}
    sx = {x: _LEFT + min(max(x, 0.0), x_max) / x_max * _PLOT_W for x in xs}

    if chart.y_top is not None:
        y_top = chart.y_top
        y_step = _nice_step(y_top, 5)
    else:
        finite = [y for s in chart.series for _, y in s.points if math.isfinite(y)]
        data_max = max([chart.y_min_top, *finite])
        y_step = _nice_step(data_max, 5)
        y_top = y_step * math.ceil(data_max / y_step - 1e-9)

    def sy(v: float) -> float:
        return _TOP + _PLOT_H - v / y_top * _PLOT_H

    bottom = _TOP + _PLOT_H
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" data-chart="{_e(chart.key)}" '
        f'data-x-max="{x_max:g}" viewBox="0 0 {_WIDTH} {_HEIGHT}" '
        f'role="img" aria-label="{_e(chart.title)}">',
        f"<title>{_e(chart.title)}</title>",
    ]
    # Grid and y axis.
    for v in _ticks(y_top, y_step):
        y = _num(sy(v))
        out.append(
            f'<line class="grid" x1="{_LEFT}" y1="{y}" x2="{_LEFT + _PLOT_W}" y2="{y}"/>'
            f'<text class="tick" x="{_LEFT - 6}" y="{y}" text-anchor="end" '
            f'dominant-baseline="middle">{_e(f"{v:g}{chart.y_unit}")}</text>'
        )
    out.append(
        f'<text class="axis-label" transform="translate(14 {_TOP + _PLOT_H / 2:g}) rotate(-90)" '
        f'text-anchor="middle">{_e(chart.y_label)}</text>'
    )
    # Time axis, in minutes.
    minutes = x_max / 60
    x_step = _nice_step(minutes, 8)
    for m in _ticks(minutes, x_step):
        x = _num(_LEFT + m * 60 / x_max * _PLOT_W)
        out.append(
            f'<line class="axis" x1="{x}" y1="{bottom}" x2="{x}" y2="{bottom + 5}"/>'
            f'<text class="tick" x="{x}" y="{bottom + 17}" text-anchor="middle">{m:g}</text>'
        )
    out.append(
        f'<line class="axis" x1="{_LEFT}" y1="{bottom}" x2="{_LEFT + _PLOT_W}" y2="{bottom}"/>'
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{bottom}"/>'
        f'<text class="axis-label" x="{_LEFT + _PLOT_W / 2:g}" y="{_HEIGHT - 6}" '
        f'text-anchor="middle">time (minutes)</text>'
    )
    # Hover bands: one per sample, between the midpoints to its neighbours.
    hover = sorted(chart.hover)
    for i, (t, text) in enumerate(hover):
        left = _LEFT if i == 0 else (sx[hover[i - 1][0]] + sx[t]) / 2
        right = _LEFT + _PLOT_W if i == len(hover) - 1 else (sx[t] + sx[hover[i + 1][0]]) / 2
        out.append(
            f'<rect class="hover" x="{_num(left)}" y="{_TOP}" width="{_num(max(right - left, 1))}"'
            f' height="{_PLOT_H}"><title>{_e(text)}</title></rect>'
        )
    # Reference lines (limits), when they fall inside the plotted range.
    for value, label in chart.refs:
        if 0 < value <= y_top:
            y = _num(sy(value))
            text_y = sy(value) - 4 if sy(value) - 4 > _TOP + 10 else sy(value) + 12
            out.append(
                f'<g class="ref"><line x1="{_LEFT}" y1="{y}" x2="{_LEFT + _PLOT_W}" y2="{y}"/>'
                f'<text x="{_LEFT + _PLOT_W - 4}" y="{_num(text_y)}" '
                f'text-anchor="end">{_e(label)}</text></g>'
            )
    for series in chart.series:
        out += _series_svg(series, sx, y_top)
    out += _decision_markers(events, sx)
    # Legend, above the plot.
    legend_x = float(_LEFT)
    for series in chart.series:
        dash = ' stroke-dasharray="6 4"' if series.dashed else ""
        out.append(
            f'<g class="legend"><line x1="{_num(legend_x)}" y1="{_LEGEND_Y}" '
            f'x2="{_num(legend_x + 22)}" y2="{_LEGEND_Y}" stroke="{series.color}" '
            f'stroke-width="2.2"{dash}/>'
            f'<text x="{_num(legend_x + 27)}" y="{_LEGEND_Y}" dominant-baseline="middle">'
            f"{_e(series.label)}</text></g>"
        )
        legend_x += 40 + 6.5 * len(series.label)
    out.append("</svg>")
    return "\n".join(out)


# -- the three charts --------------------------------------------------------------------


def _error_pct(requests: int, errors: int) -> float:
    return 100 * errors / requests if requests > 0 else math.nan


def _weight_chart(samples: Sequence[Sample]) -> _Chart:
    points = tuple((s.t_s, float(s.canary_weight_pct)) for s in samples)
    hover = tuple(
        (
            s.t_s,
            f"{_at(s.t_s)}: canary {s.canary_weight_pct}%, {s.phase}"
            + (f", decision {s.decision}" if s.decision else ""),
        )
        for s in samples
    )
    series = _Series("canary", "canary weight", CANARY_COLOR, points, step=True)
    return _Chart("weight", "Traffic weight", "canary weight", "%", (series,), hover, y_top=100)


def _errors_chart(samples: Sequence[Sample], spec: CanarySpec) -> _Chart:
    def arm_text(name: str, requests: int, errors: int) -> str:
        if requests <= 0:
            return f"{name}: no requests"
        return f"{name} {_pct(errors, requests)} ({errors}/{requests})"

    series = tuple(
        _Series(
            arm,
            arm,
            color,
            tuple(
                (s.t_s, _error_pct(getattr(s, arm).requests, getattr(s, arm).errors))
                for s in samples
            ),
        )
        for arm, color in (("canary", CANARY_COLOR), ("stable", STABLE_COLOR))
    )
    hover = tuple(
        (
            s.t_s,
            f"{_at(s.t_s)}: {arm_text('canary', s.canary.requests, s.canary.errors)}; "
            f"{arm_text('stable', s.stable.requests, s.stable.errors)}",
        )
        for s in samples
    )
    max_pct = spec.analysis.error_rate.max_pct
    refs = ((max_pct, f"maxPct {max_pct:g}%"),) if max_pct is not None else ()
    return _Chart(
        "errors", "Error rate", "errors per interval", "%", series, hover, refs, y_min_top=1.0
    )


def _latency_chart(samples: Sequence[Sample], spec: CanarySpec) -> _Chart:
    series: list[_Series] = []
    for arm, color in (("canary", CANARY_COLOR), ("stable", STABLE_COLOR)):
        for q, name, dashed in ((0.99, "p99", False), (0.5, "p50", True)):
            points = tuple((s.t_s, s.latency_ms(arm, q)) for s in samples)
            series.append(_Series(f"{arm}-{name}", f"{arm} {name}", color, points, dashed))
    hover = tuple(
        (
            s.t_s,
            f"{_at(s.t_s)}: canary p50 {_ms(s.latency_ms('canary', 0.5))}, "
            f"p99 {_ms(s.latency_ms('canary', 0.99))}; "
            f"stable p50 {_ms(s.latency_ms('stable', 0.5))}, "
            f"p99 {_ms(s.latency_ms('stable', 0.99))}",
        )
        for s in samples
    )
    refs = tuple(
        (check.max_ms, f"p{check.percentile:g} max {check.max_ms:g} ms")
        for check in spec.analysis.latency
        if check.max_ms is not None
    )
    return _Chart(
        "latency",
        "Latency",
        "latency per interval",
        " ms",
        tuple(series),
        hover,
        refs,
        y_min_top=10.0,
    )


# -- the HTML sections -------------------------------------------------------------------

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial,
  sans-serif; color: #1d1d1f; background: #fff; margin: 0 auto; padding: 24px 20px 48px;
  max-width: 980px; }
h1 { font-size: 22px; margin: 0 0 10px; }
h2 { font-size: 17px; margin: 28px 0 10px; border-bottom: 1px solid #e3e3e3;
  padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 4px; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.outcome { display: inline-block; color: #fff; font-weight: 600; padding: 2px 12px;
  border-radius: 12px; font-size: 15px; vertical-align: middle; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 18px;
  margin: 12px 0; }
dl.facts dt { color: #555; }
dl.facts dd { margin: 0; font-variant-numeric: tabular-nums; }
ul.reasons { margin: 4px 0; padding-left: 20px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #ececec;
  vertical-align: top; }
th { background: #f6f6f7; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td ul { margin: 0; padding-left: 16px; }
.dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%;
  margin-right: 6px; vertical-align: baseline; }
.bar { display: inline-block; height: 9px; border-radius: 2px; vertical-align: baseline; }
.note { color: #555; }
figure { margin: 8px 0 18px; }
figure svg { width: 100%; height: auto; display: block; }
svg { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
svg .grid { stroke: #ececec; }
svg .axis { stroke: #888; }
svg .tick { fill: #555; }
svg .axis-label { fill: #333; }
svg .legend text { fill: #333; }
svg .hover { fill: #000; fill-opacity: 0; }
svg .hover:hover { fill-opacity: 0.05; }
svg .series { pointer-events: none; }
svg .ref line { stroke: #b33; stroke-dasharray: 2 3; }
svg .ref text { fill: #b33; font-size: 10px; }
svg .decision .label { font-size: 9.5px; paint-order: stroke; stroke: #fff;
  stroke-width: 3px; stroke-linejoin: round; }
svg .decision:hover line:not(.hit) { stroke-width: 3; }
.key { display: flex; flex-wrap: wrap; gap: 4px 16px; color: #444; margin: 4px 0; }
"""


def _outcome_badge(outcome: str) -> str:
    color = _OUTCOME_COLORS.get(outcome, _GREY)
    return (
        f'<span class="outcome" data-outcome="{_e(outcome)}" style="background:{color}">'
        f"{_e(outcome.replace('_', ' '))}</span>"
    )


def _header(result: RunResult) -> str:
    reasons = (
        '<ul class="reasons">' + "".join(f"<li>{_e(r)}</li>" for r in result.reasons) + "</ul>"
        if result.reasons
        else '<p class="note">No reasons recorded.</p>'
    )
    facts = [
        ("scenario", f"<code>{_e(result.scenario)}</code>"),
        ("seed", _e(result.seed)),
        ("duration", _e(format_duration(result.duration_s))),
        ("canary requests", _e(f"{result.canary_requests:,}")),
        (
            "canary errors",
            _e(f"{result.canary_errors:,} ({_pct(result.canary_errors, result.canary_requests)})"),
        ),
    ]
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in facts)
    return (
        f"<header><h1>Canary rollout report: {_e(result.scenario)} "
        f"{_outcome_badge(result.outcome)}</h1>"
        f'<dl class="facts">{rows}</dl><h3>Reasons</h3>{reasons}</header>'
    )


def _monte_carlo(mc: MonteCarlo, result: RunResult) -> str:
    runs = len(mc.runs)
    rows = []
    for outcome, count in mc.outcomes.items():
        share = count / runs if runs else 0.0
        color = _OUTCOME_COLORS.get(outcome, _GREY)
        rows.append(
            f'<tr data-outcome="{_e(outcome)}"><td><span class="dot" '
            f'style="background:{color}"></span>{_e(outcome.replace("_", " "))}</td>'
            f'<td class="num" data-count="{count}">{count}</td>'
            f'<td class="num">{share:.0%}</td>'
            f'<td style="width:45%"><span class="bar" '
            f'style="width:{100 * share:.1f}%;background:{color}"></span></td></tr>'
        )
    if runs:
        median_duration = format_duration(statistics.median(r.duration_s for r in mc.runs))
        median_errors = f"{statistics.median(r.canary_errors for r in mc.runs):g}"
        seeds = sorted(r.seed for r in mc.runs)
        seed_text = f"{seeds[0]}" if runs == 1 else f"{seeds[0]}–{seeds[-1]}"
    else:
        median_duration = median_errors = seed_text = "n/a"
    first = mc.runs[0].seed if mc.runs else None
    which = "the first run" if first == result.seed else "one run"
    facts = [
        ("runs", str(runs)),
        ("seeds", seed_text),
        ("median duration", median_duration),
        ("median canary errors", median_errors),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    return (
        f'<section id="monte-carlo" data-runs="{runs}"><h2>Monte Carlo: {runs} runs of '
        f"{_e(mc.scenario)}</h2>"
        f'<dl class="facts">{dl}</dl>'
        '<table class="outcomes"><thead><tr><th>outcome</th><th class="num">runs</th>'
        '<th class="num">share</th><th></th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table>"
        f'<p class="note">The charts and tables below show {which} '
        f"(seed {_e(result.seed)}).</p></section>"
    )


def _charts(result: RunResult, spec: CanarySpec) -> str:
    samples = result.samples
    charts = (
        _weight_chart(samples),
        _errors_chart(samples, spec),
        _latency_chart(samples, spec),
    )
    kinds = "".join(
        f'<span><span class="dot" style="background:{color}"></span>{kind}</span>'
        for kind, color in _KIND_COLORS.items()
    )
    figures = "".join(
        f'<figure id="chart-{c.key}"><h3>{_e(c.title)}</h3>'
        f"{_svg_chart(c, result.duration_s, result.events)}</figure>"
        for c in charts
    )
    return (
        '<section id="charts"><h2>Charts</h2>'
        f'<div class="key"><span>decisions:</span>{kinds}'
        "<span>(hover a line or the chart for details)</span></div>"
        f"{figures}</section>"
    )


def _steps(result: RunResult) -> str:
    rows = []
    for i, step in enumerate(result.steps, 1):
        ended = format_duration(step.ended_s) if step.ended_s is not None else "—"
        reasons = (
            "<ul>" + "".join(f"<li>{_e(r)}</li>" for r in step.reasons) + "</ul>"
            if step.reasons
            else ""
        )
        rows.append(
            f'<tr class="step"><td class="num">{i}</td><td class="num">{step.weight}%</td>'
            f'<td class="num">{_e(format_duration(step.started_s))}</td>'
            f'<td class="num">{_e(ended)}</td><td>{_e(step.verdict or "—")}</td>'
            f"<td>{reasons}</td></tr>"
        )
    body = "".join(rows) or '<tr><td colspan="6" class="note">No step started.</td></tr>'
    return (
        '<section id="steps"><h2>Steps</h2><table><thead><tr><th class="num">#</th>'
        '<th class="num">weight</th><th class="num">started</th><th class="num">ended</th>'
        f"<th>verdict</th><th>reasons</th></tr></thead><tbody>{body}</tbody></table></section>"
    )


def _events(result: RunResult) -> str:
    rows = "".join(
        f'<tr class="event" data-reason="{_e(ev.reason)}"><td class="num">'
        f'{_e(format_duration(ev.t_s))}</td><td><span class="dot" '
        f'style="background:{_KIND_COLORS[decision_kind(ev.reason)]}"></span>{_e(ev.reason)}'
        f"</td><td>{_e(ev.message)}</td></tr>"
        for ev in result.events
    )
    body = rows or '<tr><td colspan="3" class="note">No events.</td></tr>'
    return (
        '<section id="events"><h2>Events</h2><table><thead><tr><th class="num">time</th>'
        f"<th>reason</th><th>message</th></tr></thead><tbody>{body}</tbody></table></section>"
    )


def _spec(spec: CanarySpec) -> str:
    a = spec.analysis
    max_pct = f"{a.error_rate.max_pct:g}%" if a.error_rate.max_pct is not None else "none"
    latency = "; ".join(
        f"p{c.percentile:g}: +{100 * c.relative_tolerance:g}%"
        + (f", max {c.max_ms:g} ms" if c.max_ms is not None else "")
        for c in a.latency
    )
    items = [
        ("steps", " → ".join(f"{w}%" for w in spec.steps)),
        ("interval", format_duration(a.interval)),
        ("stepDuration", format_duration(a.step_duration)),
        ("minStepDuration", format_duration(a.min_step_duration)),
        ("minRequests", f"{a.min_requests:,}"),
        ("alpha", f"{a.alpha:g}"),
        (
            "errorRate.relativeTolerance",
            f"{100 * a.error_rate.relative_tolerance:g}% "
            f"(canary up to {1 + a.error_rate.relative_tolerance:g}× stable's error rate)",
        ),
        ("errorRate.maxPct", max_pct),
        ("latency", latency or "none"),
        (
            "slo",
            f"{a.slo.availability_pct:g}% availability, burn limit {a.slo.burn_rate_limit:g}×"
            if a.slo
            else "none",
        ),
        (
            "earlyPassRatio",
            f"{a.early_pass_ratio:g}" if a.early_pass_ratio is not None else "off",
        ),
    ]
    rows = "".join(f"<dt><code>{_e(k)}</code></dt><dd>{_e(v)}</dd>" for k, v in items)
    return f'<section id="spec"><h2>Spec</h2><dl class="facts">{rows}</dl></section>'


def render_report(
    result: RunResult, spec: CanarySpec, monte_carlo: MonteCarlo | None = None
) -> str:
    """The report of ``result`` (run with ``spec``) as one self-contained HTML5 document.

    Args:
        result: the rollout to show; its samples and events feed the charts.
        spec: the spec the rollout ran with (shown in the Spec section, and its limits
            drawn on the charts when they fall in range).
        monte_carlo: when given, a summary of all its runs comes first; the charts and
            tables still show ``result`` (normally its first run).

    Returns:
        The document: inline CSS and SVG, no scripts, nothing fetched from anywhere.
    """
    title = f"canaryd report: {result.scenario} (seed {result.seed}) {result.outcome}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        _header(result),
    ]
    if monte_carlo is not None:
        parts.append(_monte_carlo(monte_carlo, result))
    parts += [
        _charts(result, spec),
        _steps(result),
        _events(result),
        _spec(spec),
        '<footer class="note"><p>Generated by canaryd simulate. Time is virtual: '
        "seconds since the rollout started.</p></footer>",
        "</body></html>",
        "",
    ]
    return "\n".join(parts)


def write_report(
    path: str | os.PathLike[str],
    result: RunResult,
    spec: CanarySpec,
    monte_carlo: MonteCarlo | None = None,
) -> None:
    """Write :func:`render_report`'s document to ``path`` atomically, in UTF-8.

    The document goes to a temporary file in the same directory, which then replaces
    ``path``; on any failure the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    document = render_report(result, spec, monte_carlo).encode("utf-8")
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(document)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
