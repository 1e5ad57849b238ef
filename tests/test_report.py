"""Tests of the HTML report: well formed, self-contained, and faithful to the run it shows.

The documents are parsed into a small element tree (``html.parser`` with a check that
every element closes in order), so assertions look at elements and attributes rather
than at incidental formatting.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from html.parser import HTMLParser
from pathlib import Path

import pytest

from analysis.counts import ArmCounts
from analysis.verdict import format_duration
from canaryd.report import (
    CANARY_COLOR,
    STABLE_COLOR,
    decision_kind,
    render_report,
    write_report,
)
from canaryd.simulate import (
    Event,
    MonteCarlo,
    RunResult,
    Sample,
    StepOutcome,
    simulate_many,
    simulate_once,
)
from canaryd.spec import CanarySpec, parse_spec
from simulator import get_scenario

SVG_NS = 'xmlns="http://www.w3.org/2000/svg"'
CHARTS = ["weight", "errors", "latency"]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


# -- a strict little DOM -----------------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """All text inside, in document order (approximately: own text first)."""
        return "".join(self.texts) + "".join(c.text for c in self.children)

    def iter(self) -> list[Node]:
        out = [self]
        for child in self.children:
            out += child.iter()
        return out

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag)
            and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def find(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        assert tag not in VOID, f"end tag for void element <{tag}>"
        open_tag = self.stack[-1].tag
        assert open_tag == tag, f"</{tag}> closes <{open_tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].texts.append(data)


def parse(document: str) -> Node:
    """The element tree of ``document``; fails on unclosed or misnested elements."""
    builder = _TreeBuilder()
    builder.feed(document)
    builder.close()
    assert builder.doctype.lower() == "doctype html"
    assert len(builder.stack) == 1, f"unclosed: {[n.tag for n in builder.stack[1:]]}"
    return builder.root


def charts(root: Node) -> dict[str, Node]:
    return {n.attrs["data-chart"]: n for n in root.find_all("svg") if "data-chart" in n.attrs}


def markers(chart: Node) -> list[Node]:
    return [n for n in chart.iter() if n.attrs.get("class") == "decision"]


def definitions(node: Node) -> dict[str, str]:
    """The ``<dt>`` → ``<dd>`` texts of the definition lists inside ``node``."""
    terms = [dt.text for dt in node.find_all("dt")]
    return dict(zip(terms, [dd.text for dd in node.find_all("dd")], strict=True))


def rgb(color: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})", color.lower())
    assert match, color
    r, g, b = (int(x, 16) for x in match.groups())
    return r, g, b


def is_red(color: str) -> bool:
    r, g, b = rgb(color)
    return r > 170 and g < 90 and b < 90


def is_green(color: str) -> bool:
    r, g, b = rgb(color)
    return g > 120 and r < 100 and b < 100


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> CanarySpec:
    return parse_spec({"analysis": {"interval": "30s"}})


@pytest.fixture(scope="module")
def spike(spec: CanarySpec) -> RunResult:
    return simulate_once(spec, get_scenario("error-spike"), seed=1)


@pytest.fixture(scope="module")
def healthy(spec: CanarySpec) -> RunResult:
    return simulate_once(spec, get_scenario("healthy"), seed=1)


@pytest.fixture(scope="module")
def monte_carlo(spec: CanarySpec) -> MonteCarlo:
    return simulate_many(spec, get_scenario("error-spike"), seed=1, runs=5)


@pytest.fixture(params=["spike", "healthy"])
def run(request: pytest.FixtureRequest) -> RunResult:
    result: RunResult = request.getfixturevalue(request.param)
    return result


def _arm(requests: int, errors: int) -> ArmCounts:
    return ArmCounts(requests, errors, ())


def _synthetic() -> RunResult:
    """A hand-made run: canary requests drop to 0 at 0s and 60s; no latency histograms."""
    counts = [(0, 0), (100, 1), (0, 0), (100, 2), (100, 3)]
    samples = tuple(
        Sample(
            t_s=30.0 * i,
            phase="Progressing",
            step_index=0,
            canary_weight_pct=10,
            decision="continue" if i else "",
            reasons=(),
            stable=_arm(1000, 5),
            canary=_arm(req, err),
        )
        for i, (req, err) in enumerate(counts)
    )
    events = (
        Event(0.0, "StepStarted", "step 1/3: canary at 10%", False),
        Event(60.0, "Holding", "no metrics: <b>prometheus</b> & co down", True),
        Event(90.0, "Resumed", "metrics are back", False),
    )
    return RunResult(
        scenario="synthetic",
        seed=7,
        outcome="held",
        duration_s=120.0,
        canary_requests=300,
        canary_errors=6,
        steps=(StepOutcome(10, 0.0, None, "hold", ("holding",)),),
        reasons=("holding",),
        samples=samples,
        events=events,
    )


# -- tests -------------------------------------------------------------------------------


def test_document_is_well_formed_html5(run: RunResult, spec: CanarySpec) -> None:
    document = render_report(run, spec)
    assert document.startswith("<!DOCTYPE html>")
    root = parse(document)
    (html_node,) = root.find_all("html")
    assert html_node.attrs["lang"] == "en"
    assert root.find("meta", charset="utf-8")
    head = root.find("head")
    assert run.scenario in head.find("title").text
    assert head.find("style").text.strip()


def test_no_external_resources(run: RunResult, spec: CanarySpec) -> None:
    document = render_report(run, spec)
    # The SVG namespace is an identifier, never fetched: the one allowed URL.
    assert document.count(SVG_NS) == len(CHARTS)
    stripped = document.replace(SVG_NS, "")
    for forbidden in ("http://", "https://", "src=", "href=", "<link", "<script", "@import"):
        assert forbidden not in stripped.lower(), forbidden
    assert re.search(r"url\(\s*['\"]?(?!#)", stripped) is None
    for node in parse(document).iter():
        for name, value in node.attrs.items():
            if name != "xmlns":
                assert "://" not in value, (node.tag, name, value)


def test_exactly_three_charts_on_one_time_axis(run: RunResult, spec: CanarySpec) -> None:
    found = charts(parse(render_report(run, spec)))
    assert list(found) == CHARTS
    for chart in found.values():
        assert float(chart.attrs["data-x-max"]) == run.duration_s
        assert chart.attrs["viewbox"].startswith("0 0 ")
        # Time ticks are minutes, from 0 across the whole run.
        ticks = [
            float(t.text)
            for t in chart.find_all("text", **{"class": "tick", "text-anchor": "middle"})
        ]
        minutes = run.duration_s / 60
        assert ticks[0] == 0 and ticks == sorted(ticks) and len(ticks) >= 3
        assert minutes / 2 <= ticks[-1] <= minutes + 1e-9


def test_every_chart_marks_every_decision(run: RunResult, spec: CanarySpec) -> None:
    assert run.events
    for key, chart in charts(parse(render_report(run, spec))).items():
        found = markers(chart)
        assert len(found) == len(run.events), key
        assert [m.attrs["data-reason"] for m in found] == [e.reason for e in run.events]
        assert [float(m.attrs["data-t"]) for m in found] == [e.t_s for e in run.events]
        for marker, event in zip(found, run.events, strict=True):
            assert event.message in marker.find("title").text
            assert marker.find("text").text == event.reason
            assert marker.attrs["data-kind"] == decision_kind(event.reason)


def test_marker_positions_agree_across_charts(healthy: RunResult, spec: CanarySpec) -> None:
    found = charts(parse(render_report(healthy, spec)))
    xs = {
        key: [float(m.find_all("line")[0].attrs["x1"]) for m in markers(chart)]
        for key, chart in found.items()
    }
    assert xs["weight"] == xs["errors"] == xs["latency"]
    assert xs["weight"] == sorted(xs["weight"])
    assert len(set(xs["weight"])) > 1


def test_rollback_marker_is_red_and_carries_the_message(spike: RunResult, spec: CanarySpec) -> None:
    assert spike.outcome == "rolled_back"
    (rolled_back,) = [e for e in spike.events if e.reason == "RolledBack"]
    for key, chart in charts(parse(render_report(spike, spec))).items():
        (marker,) = [m for m in markers(chart) if m.attrs["data-reason"] == "RolledBack"]
        assert is_red(marker.attrs["stroke"]), key
        assert rolled_back.message in marker.find("title").text
        others = [m for m in markers(chart) if m.attrs["data-reason"] != "RolledBack"]
        assert others and not any(is_red(m.attrs["stroke"]) for m in others)


def test_marker_colours_follow_the_decision(spec: CanarySpec) -> None:
    events = (
        Event(0.0, "StepStarted", "step 1/3: canary at 10%", False),
        Event(30.0, "Holding", "holding: not enough requests", True),
        Event(60.0, "Promoting", "copying revision canary to the stable workload", False),
        Event(90.0, "Promoted", "revision canary promoted", False),
    )
    result = replace(_synthetic(), events=events, outcome="promoted")
    root = parse(render_report(result, spec))
    for chart in charts(root).values():
        strokes = {m.attrs["data-reason"]: m.attrs["stroke"] for m in markers(chart)}
        assert is_green(strokes["Promoting"]) and is_green(strokes["Promoted"])
        r, g, b = rgb(strokes["Holding"])
        assert r > 180 and 100 < g < 200 and b < 60  # amber
        r, g, b = rgb(strokes["StepStarted"])
        assert max(r, g, b) - min(r, g, b) < 30  # grey
    badge = root.find("header").find_all("span", **{"data-outcome": "promoted"})[0]
    assert is_green(badge.attrs["style"].removeprefix("background:"))


def test_outcome_is_shown_and_coloured(run: RunResult, spec: CanarySpec) -> None:
    root = parse(render_report(run, spec))
    header = root.find("header")
    badges = header.find_all("span", **{"data-outcome": run.outcome})
    assert badges
    assert badges[0].text == run.outcome.replace("_", " ")
    colour = re.search(r"background:(#[0-9a-f]{6})", badges[0].attrs["style"])
    assert colour
    if run.outcome == "rolled_back":
        assert is_red(colour.group(1))
    if run.outcome == "promoted":
        assert is_green(colour.group(1))


def test_header_facts_and_reasons(spike: RunResult, spec: CanarySpec) -> None:
    header = parse(render_report(spike, spec)).find("header")
    facts = definitions(header)
    assert facts["seed"] == str(spike.seed)
    assert facts["duration"] == format_duration(spike.duration_s)
    assert facts["canary requests"] == f"{spike.canary_requests:,}"
    assert facts["canary errors"].startswith(f"{spike.canary_errors:,} (")
    reasons = [li.text for li in header.find("ul").find_all("li")]
    assert reasons == list(spike.reasons)


def test_step_table_has_one_row_per_step(run: RunResult, spec: CanarySpec) -> None:
    rows = (
        parse(render_report(run, spec))
        .find("section", id="steps")
        .find_all("tr", **{"class": "step"})
    )
    assert len(rows) == len(run.steps)
    for row, step in zip(rows, run.steps, strict=True):
        cells = [td.text for td in row.find_all("td")]
        assert cells[1] == f"{step.weight}%"
        assert cells[4] == (step.verdict or "—")
        assert [li.text for li in row.find_all("li")] == list(step.reasons)


def test_event_table_lists_every_event(run: RunResult, spec: CanarySpec) -> None:
    section = parse(render_report(run, spec)).find("section", id="events")
    rows = section.find_all("tr", **{"class": "event"})
    assert [r.attrs["data-reason"] for r in rows] == [e.reason for e in run.events]
    assert [r.find_all("td")[2].text for r in rows] == [e.message for e in run.events]


def test_monte_carlo_summary(monte_carlo: MonteCarlo, spec: CanarySpec) -> None:
    first = monte_carlo.runs[0]
    document = render_report(first, spec, monte_carlo)
    root = parse(document)
    summary = root.find("section", id="monte-carlo")
    assert summary.attrs["data-runs"] == "5"
    rows = [row for row in summary.find_all("tr") if "data-outcome" in row.attrs]
    counts = {}
    for row in rows:
        cells = row.find_all("td")
        counts[row.attrs["data-outcome"]] = int(cells[1].text)
        assert cells[1].attrs["data-count"] == cells[1].text
        assert cells[2].text == f"{int(cells[1].text) / 5:.0%}"
    assert counts == monte_carlo.outcomes
    assert sum(counts.values()) == 5
    assert counts["rolled_back"] >= 1
    assert "first run (seed 1)" in summary.text
    assert document.index('id="monte-carlo"') < document.index("<svg")
    # Without a Monte Carlo there is no summary.
    assert 'id="monte-carlo"' not in render_report(first, spec)


def test_spec_section(spec: CanarySpec, spike: RunResult) -> None:
    section = parse(render_report(spike, spec)).find("section", id="spec")
    values = definitions(section)
    assert values["steps"] == "10% → 50% → 100%"
    assert values["interval"] == "30s"
    assert values["stepDuration"] == "10m"
    assert values["minStepDuration"] == "2m"
    assert values["minRequests"] == "200"
    assert values["alpha"] == "0.01"
    assert values["errorRate.relativeTolerance"].startswith("0%")
    assert values["errorRate.maxPct"] == "5%"
    assert values["slo"] == "99.9% availability, burn limit 14.4×"
    assert values["earlyPassRatio"] == "1.5"


def test_latency_chart_has_four_series_styled_consistently(
    healthy: RunResult, spec: CanarySpec
) -> None:
    found = charts(parse(render_report(healthy, spec)))
    series = {
        g.attrs["data-series"]: g.find("path")
        for g in found["latency"].find_all("g", **{"class": "series"})
    }
    assert sorted(series) == ["canary-p50", "canary-p99", "stable-p50", "stable-p99"]
    for key, path in series.items():
        assert ("stroke-dasharray" in path.attrs) == key.endswith("p50"), key
        expected = CANARY_COLOR if key.startswith("canary") else STABLE_COLOR
        assert path.attrs["stroke"] == expected
    errors = {
        g.attrs["data-series"]: g.find("path").attrs["stroke"]
        for g in found["errors"].find_all("g", **{"class": "series"})
    }
    assert errors == {"canary": CANARY_COLOR, "stable": STABLE_COLOR}
    assert CANARY_COLOR != STABLE_COLOR
    weight = found["weight"].find("g", **{"class": "series"}).find("path")
    assert weight.attrs["stroke"] == CANARY_COLOR
    assert "H" in weight.attrs["d"] and "V" in weight.attrs["d"]  # a step function


def test_lines_break_where_there_is_no_data(spec: CanarySpec) -> None:
    result = _synthetic()
    root = parse(render_report(result, spec))
    found = charts(root)
    errors = {
        g.attrs["data-series"]: g for g in found["errors"].find_all("g", **{"class": "series"})
    }
    canary = errors["canary"]
    # Canary points at 30s alone (a dot), then 90s-120s (one line); none at 0s or 60s.
    assert len(canary.find_all("circle")) == 1
    (path,) = canary.find_all("path")
    assert path.attrs["d"].count("M") == 1
    assert path.attrs["d"].count("L") == 1
    stable = errors["stable"].find("path").attrs["d"]
    assert stable.count("M") == 1 and stable.count("L") == len(result.samples) - 1
    # No histograms: no latency drawn at all, and never a NaN coordinate anywhere.
    for g in found["latency"].find_all("g", **{"class": "series"}):
        assert not g.find_all("path") and not g.find_all("circle")
    for node in root.iter():
        for name in ("d", "x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "width"):
            assert "nan" not in node.attrs.get(name, "").lower(), (node.tag, name)
    assert len(markers(found["latency"])) == len(result.events)


def test_text_is_escaped(spec: CanarySpec) -> None:
    nasty = '<script>alert("x")</script>'
    result = replace(_synthetic(), scenario=nasty, reasons=(nasty,))
    document = render_report(result, spec)
    assert "<script" not in document
    assert "&lt;script&gt;" in document
    root = parse(document)
    assert nasty in root.find("h1").text
    holding = [m for m in markers(charts(root)["errors"]) if m.attrs["data-reason"] == "Holding"]
    assert "<b>prometheus</b> & co down" in holding[0].find("title").text


def test_decision_kinds() -> None:
    assert decision_kind("RolledBack") == "rollback"
    assert decision_kind("Promoted") == decision_kind("Promoting") == "promotion"
    assert decision_kind("Holding") == decision_kind("Paused") == "hold"
    assert decision_kind("WaitingApproval") == "hold"
    assert decision_kind("StepStarted") == decision_kind("Approved") == "other"


def test_write_report_is_atomic(
    tmp_path: Path, spike: RunResult, spec: CanarySpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.html"
    write_report(target, spike, spec)
    assert target.read_text(encoding="utf-8") == render_report(spike, spec)
    assert "≥" in target.read_text(encoding="utf-8")  # non-ASCII survives as UTF-8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]

    # Overwriting works through a str path too, and leaves nothing behind.
    write_report(str(target), replace(spike, seed=99), spec)
    assert "(seed 99)" in target.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]

    # A failure before the rename leaves the old report and no temporary file.
    before = target.read_bytes()

    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(target, spike, spec)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
