"""The Grafana dashboard in manifests/grafana: a well-formed, provisioning-ready
dashboard whose every query asks only for series canaryd exports, with labels they
carry, checked against a live ``/metrics`` (the playground: the real daemon and API).

The PromQL check is lexical, not a parser: strings, ranges and label matchers are cut
out, then every identifier that is not a PromQL function, aggregation or keyword is a
metric name.  That is enough for the queries a dashboard holds; ``promtool`` checks
their syntax on top.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from analysis.budget import BURN_WINDOWS_S, Events
from canaryd.playground import Playground, Sample
from canaryd.ports import SloService
from canaryd.slo import ServiceSlo, service_slo
from canaryd.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "manifests" / "grafana" / "canaryd.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ROWS = ["Rollouts", "Canary $canary", "Error budgets", "Controller"]
#: labels Prometheus adds to every scraped series (legends may name them)
TARGET_LABELS = frozenset({"instance", "job", "pod"})

AGGREGATIONS = frozenset((
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio"
))  # fmt: skip
FUNCTIONS = AGGREGATIONS | frozenset((
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atan2",
    "atanh", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos",
    "cosh", "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month",
    "deg", "delta", "deriv", "double_exponential_smoothing", "exp", "floor", "group_over_time",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta",
    "increase", "info", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10",
    "log2", "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi",
    "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc",
    "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh",
    "time", "timestamp", "vector", "year"
))  # fmt: skip
GROUPING_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = GROUPING_WORDS | {"and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end"}

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
RANGE = re.compile(r"\[[^\]]*\]")
VARIABLE = re.compile(r"\$\{?[A-Za-z_]\w*\}?")
SELECTOR = re.compile(r"(?P<metric>[A-Za-z_:][A-Za-z0-9_:]*)?\s*\{(?P<matchers>[^{}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
TOKEN = re.compile(r"[A-Za-z0-9_:.]+")
IDENTIFIER = re.compile(r"^[A-Za-z_:][A-Za-z0-9_:]*$")
LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


# -- reading the dashboard ---------------------------------------------------------------------


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and those inside collapsed rows."""
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])


@dataclass(frozen=True)
class Query:
    where: str
    expr: str
    legend: str = ""


def queries(doc: dict[str, Any]) -> list[Query]:
    """Every PromQL expression: the panels' targets and the annotations."""
    found = [
        Query(
            f"panel {p['id']} {p['title']!r} target {t['refId']}",
            t["expr"],
            t.get("legendFormat", ""),
        )
        for p in panels(doc)
        for t in p.get("targets", [])
    ]
    found += [
        Query(f"annotation {a['name']!r}", a["expr"], a.get("textFormat", ""))
        for a in doc["annotations"]["list"]
        if "expr" in a
    ]
    return found


def variable(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in doc["templating"]["list"] if v["name"] == name]
    assert len(found) == 1, name
    return found[0]


def query_variables(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in doc["templating"]["list"] if v["type"] == "query"]


# -- the lexical PromQL check ------------------------------------------------------------------


@dataclass
class Analysis:
    metrics: set[str] = field(default_factory=set)
    #: (metric, labels its matchers name)
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)
    #: (clause, labels, metrics the clause applies to)
    groupings: list[tuple[str, set[str], set[str]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def analyse(expr: str) -> Analysis:
    out = Analysis()
    text = STRING.sub('""', expr)
    text = RANGE.sub("", text)  # ranges, subqueries: $__rate_interval, 5m:1m
    text = VARIABLE.sub("", text)

    def selector(match: re.Match[str]) -> str:
        metric = match["metric"]
        if metric is None or metric in KEYWORDS:
            braces = match[0][match[0].index("{") :]
            out.problems.append(f"a selector without a metric name: {braces!r}")
            return match[0].replace("{", "(").replace("}", ")")
        out.selectors.append((metric, set(MATCHER.findall(match["matchers"]))))
        return metric

    text = SELECTOR.sub(selector, text)
    groupings = list(GROUPING.finditer(text))
    # label lists blanked (same length), so that they are not taken for metrics
    blank = GROUPING.sub(lambda m: m[1] + " " * (len(m[0]) - len(m[1])), text)
    for token in TOKEN.finditer(blank):
        name = token[0]
        if not IDENTIFIER.match(name) or name in KEYWORDS or name in FUNCTIONS:
            continue
        if blank[token.end() :].lstrip().startswith("("):
            out.problems.append(f"{name}(): not a PromQL function")
            continue
        out.metrics.add(name)
    for g in groupings:
        labels = {label.strip() for label in g[2].split(",") if label.strip()}
        scope = out.metrics
        if g[1] in {"by", "without"}:
            scope = metrics_in(aggregated(blank, g.start(), g.end()))
        out.groupings.append((g[1], labels, scope))
    return out


def aggregated(text: str, start: int, end: int) -> str:
    """The argument of the aggregation whose ``by (...)`` spans ``text[start:end]``:
    the parentheses after it (``sum by (x) (...)``) or before it (``sum (...) by (x)``)."""
    after = len(text) - len(text[end:].lstrip())
    if after < len(text) and text[after] == "(":
        return balanced(text, after, +1)
    before = len(text[:start].rstrip()) - 1
    assert before >= 0 and text[before] == ")", f"no aggregation around {text[start:end]!r}"
    return balanced(text, before, -1)


def balanced(text: str, at: int, step: int) -> str:
    depth, i = 0, at
    while 0 <= i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0) * step
        if depth == 0:
            return text[min(at, i) : max(at, i) + 1]
        i += step
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def metrics_in(text: str) -> set[str]:
    names = set()
    for token in TOKEN.finditer(text):
        name = token[0]
        if IDENTIFIER.match(name) and name not in KEYWORDS and name not in FUNCTIONS:
            names.add(name)
    return names


# -- the live /metrics -----------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    family: str
    labels: frozenset[str]
    sampled: bool


def exported_series(text: str) -> dict[str, Series]:
    """Each series name the exposition offers (``x_total``, ``x_bucket``, ...), with the
    labels of its samples; a family with no sample yet still names its series."""
    found: dict[str, Series] = {}
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"),
    }
    for family in text_string_to_metric_families(text):
        sampled: dict[str, set[str]] = {}
        for sample in family.samples:
            sampled.setdefault(sample.name, set()).update(sample.labels)
        names = {family.name + s for s in suffixes.get(family.type, ("",))} | sampled.keys()
        for name in names:
            found[name] = Series(family.name, frozenset(sampled.get(name, ())), name in sampled)
    return found


def check(doc: dict[str, Any], exported: dict[str, Series]) -> list[str]:
    """What is wrong with the dashboard's queries against these series (empty: none)."""
    problems: list[str] = []

    def known(where: str, metric: str) -> Series | None:
        series = exported.get(metric)
        if series is None:
            problems.append(f"{where}: {metric} is not a series canaryd exports")
        elif not series.sampled:
            problems.append(f"{where}: {metric} has no sample in the live scrape (labels unknown)")
            return None
        return series

    def has_labels(where: str, metric: str, labels: set[str], what: str) -> None:
        series = known(where, metric)
        if series is None:
            return
        for label in sorted(labels - series.labels):
            problems.append(f"{where}: {what} label {label!r}, which {metric} does not carry")

    for query in queries(doc):
        result = analyse(query.expr)
        problems += [f"{query.where}: {p}" for p in result.problems]
        if not result.metrics:
            problems.append(f"{query.where}: queries no metric")
        for metric in sorted(result.metrics):
            known(query.where, metric)
        for metric, labels in result.selectors:
            has_labels(query.where, metric, labels, "matches on")
        for clause, labels, scope in result.groupings:
            for metric in sorted(scope):
                has_labels(query.where, metric, labels, f"{clause} (...) names")
        if not all(m in exported and exported[m].sampled for m in result.metrics):
            continue  # said above; the legend's labels cannot be told
        carried = TARGET_LABELS.union(*(exported[m].labels for m in result.metrics))
        for label in sorted(set(LEGEND_LABEL.findall(query.legend)) - carried):
            problems.append(f"{query.where}: the legend names {label!r}, which no series has")
    for var in query_variables(doc):
        where = f"variable {var['name']}"
        match = LABEL_VALUES.match(var["query"])
        if match is None or match["selector"] is None:
            problems.append(f"{where}: expected label_values(<metric>, <label>)")
            continue
        result = analyse(match["selector"])
        problems += [f"{where}: {p}" for p in result.problems]
        if len(result.metrics) != 1:
            problems.append(f"{where}: expected one metric, got {sorted(result.metrics)}")
        for metric in result.metrics:
            has_labels(where, metric, {match["label"]}, "lists values of")
        for metric, labels in result.selectors:
            has_labels(where, metric, labels, "matches on")
    return list(dict.fromkeys(problems))  # once each, in order


def budget(service: str, bad_ratio: float, recent_burn: float) -> ServiceSlo:
    """``service``'s figures at 99.9% over 30 days, ``bad_ratio`` of its requests failed,
    burning ``recent_burn``× the budget lately, as the SLO monitor reads them."""
    slo: dict[str, Any] = {"availabilityPct": 99.9, "budgetPolicy": {}}
    spec = parse_spec({"service": service, "analysis": {"slo": slo}})
    window_s = 30 * 86400.0
    availability = {window_s: Events(1e8 * (1 - bad_ratio), 1e8)}
    for w in BURN_WINDOWS_S:
        availability[w] = Events(1e5 * (1 - recent_burn * 0.001), 1e5)
    service_ref = SloService("shop", service, (service, f"{service}-canary"), spec)
    return service_slo(service_ref, {"availability": availability}, datetime.now(UTC))


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5.0) as resp:  # a local test server
        body: bytes = resp.read()
        return body


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


@pytest.fixture(scope="module")
def scrape() -> Iterator[str]:
    """``/metrics`` of the playground once a canary is mid-rollout with series points
    and another has rolled back (so every family the dashboard reads has samples)."""
    samples = (Sample("checkout", "healthy", "x"), Sample("payments", "error-spike", "x"))
    pg = Playground(
        host="127.0.0.1", port=0, speed=60, interval_s=1.0, restart_after_s=5.0, samples=samples
    )
    pg.hub.set_slos([budget("checkout", 0.0002, 0.5), budget("payments", 0.0009, 3.0)])
    loop_box: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    failure: list[BaseException] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop_box.append((asyncio.get_running_loop(), stop))
        await pg.run(stop)

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the fixture
            failure.append(exc)

    thread = threading.Thread(target=target, name="playground", daemon=True)
    thread.start()
    box: list[str] = []

    def ready() -> bool:
        try:
            text = get(pg.url + "metrics").decode()
        except OSError:
            return False
        box[:] = [text]
        seen = {
            (s.name, s.labels.get("name"), s.labels.get("arm") or s.labels.get("outcome"))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        return {
            ("canaryd_arm_latency_p99_seconds", "checkout", "canary"),
            ("canaryd_arm_error_ratio", "checkout", "stable"),
            ("canaryd_rollouts_total", "payments", "RolledBack"),
        } <= seen and any(name == "canaryd_analysis_evalue" for name, _, _ in seen)

    try:
        wait_until(ready, 20.0, "a canary mid-rollout and a rollback on /metrics")
        yield box[0]
    finally:
        if loop_box:
            loop, stop = loop_box[0]
            loop.call_soon_threadsafe(stop.set)
        thread.join(15.0)
        assert not failure, f"the playground failed: {failure[0]!r}"


def replace_once(text: str, *edits: tuple[str, str]) -> str:
    """``text`` (JSON) with the first occurrence of each old string made new."""
    for old, new in edits:
        old_json, new_json = json.dumps(old)[1:-1], json.dumps(new)[1:-1]
        assert old_json in text, old
        text = text.replace(old_json, new_json, 1)
    return text


def selector_of(var: dict[str, Any]) -> str:
    match = LABEL_VALUES.match(var["query"])
    assert match is not None and match["selector"], var["query"]
    return match["selector"]


# -- the tests -------------------------------------------------------------------------------


def test_the_dashboard_is_provisioning_ready() -> None:
    doc = load()
    assert doc["uid"] == "canaryd" and doc["title"] == "canaryd"
    assert doc["schemaVersion"] == 39
    assert "__inputs" not in doc and "id" not in doc  # provisioned as is, not imported
    ds = variable(doc, "datasource")
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    # every datasource reference is the variable: no uid of anyone's Prometheus
    text = DASHBOARD.read_text()
    assert "${DS_" not in text
    stack: list[Any] = [doc]
    references = 0
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "datasource" in node:
                assert node["datasource"] == DATASOURCE, node
                references += 1
            if node is not doc:
                assert node.get("uid", "${datasource}") == "${datasource}", node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    assert references > 20
    for name in ("namespace", "canary", "service"):
        var = variable(doc, name)
        assert var["type"] == "query" and var["datasource"] == DATASOURCE
        assert var["definition"] == var["query"]
        assert LABEL_VALUES.match(var["query"]), var["query"]
    assert variable(doc, "canary")["multi"] is False  # one canary against its stable


def test_every_panel_has_an_id_a_title_and_a_place_of_its_own() -> None:
    doc = load()
    every = list(panels(doc))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    assert [p["title"] for p in every if p["type"] == "row"] == ROWS
    cells: dict[tuple[int, int], str] = {}
    for p in every:
        assert p["title"].strip(), p["id"]
        pos = p["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys(), p["title"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "state-timeline", "stat", "table", "bargauge"}
        assert p["datasource"] == DATASOURCE and p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() and t["datasource"] == DATASOURCE for t in p["targets"])


def test_the_dashboard_covers_the_contract() -> None:
    """Weight and phase per canary, decisions and rollbacks, canary vs stable error rate
    and p99, budgets and burn rates and tier, and the controller's own health."""
    doc = load()
    by_row: dict[str, set[str]] = {}
    row = ""
    for p in sorted(panels(doc), key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if p["type"] == "row":
            row = p["title"]
            continue
        for t in p["targets"]:
            by_row.setdefault(row, set()).update(analyse(t["expr"]).metrics)
    assert {
        "canaryd_canary_weight", "canaryd_canary_phase", "canaryd_decisions_total",
        "canaryd_rollouts_total",
    } <= by_row["Rollouts"]  # fmt: skip
    assert {"canaryd_arm_error_ratio", "canaryd_arm_latency_p99_seconds"} <= by_row[ROWS[1]]
    assert {
        "slo_error_budget_remaining", "slo_error_budget_burn_rate", "canaryd_slo_policy_tier",
    } <= by_row["Error budgets"]  # fmt: skip
    assert {
        "canaryd_reconcile_duration_seconds_bucket", "canaryd_metric_queries_total",
        "canaryd_kube_requests_total", "canaryd_leader",
    } <= by_row["Controller"]  # fmt: skip
    exprs = " ".join(q.expr for q in queries(doc))
    assert (
        "increase(canaryd_rollouts_total" in exprs and "increase(canaryd_decisions_total" in exprs
    )
    assert "histogram_quantile(0.99, sum by (le) (rate(canaryd_reconcile_duration" in exprs
    for p in panels(doc):
        if any("canaryd_arm_" in t["expr"] for t in p.get("targets", [])):
            assert all('name="$canary"' in t["expr"] for t in p["targets"]), p["title"]


def test_every_query_reads_series_canaryd_exports_with_their_labels(scrape: str) -> None:
    exported = exported_series(scrape)
    doc = load()
    assert check(doc, exported) == []
    # and the check does catch what it is for
    broken = doc | {
        "panels": json.loads(
            replace_once(
                json.dumps(doc["panels"]),
                ("(canaryd_canary_weight{", "(canaryd_canary_weigth{"),
                ("sum by (result)", "sum by (reslt)"),
                ('decision="rollback"', 'decisoin="rollback"'),
                ("canaryd_decisions_total{", "canaryd_decisions{"),
                ("{{verb}} {{code}}", "{{verb}} {{status}}"),
            )
        )
    }
    found = "\n".join(check(broken, exported))
    assert "canaryd_canary_weigth is not a series canaryd exports" in found
    assert "by (...) names label 'reslt', which canaryd_metric_queries_total" in found
    assert "matches on label 'decisoin', which canaryd_decisions_total" in found
    assert "canaryd_decisions is not a series canaryd exports" in found  # not _total
    assert "the legend names 'status'" in found
    assert len(found.splitlines()) == 5, found


def test_the_lexical_check_reads_promql_as_meant() -> None:
    result = analyse(
        'histogram_quantile(0.99, sum by (le, arm) (rate(a_bucket{x=~"$v", y!="}"}'
        "[$__rate_interval]))) / on (arm) group_left sum(b_total offset 5m) by (arm)"
        " + 1e3 * scalar(c) > bool 0.5"
    )
    assert result.metrics == {"a_bucket", "b_total", "c"} and result.problems == []
    assert result.selectors == [("a_bucket", {"x", "y"})]
    assert result.groupings == [
        ("by", {"le", "arm"}, {"a_bucket"}),
        ("on", {"arm"}, {"a_bucket", "b_total", "c"}),
        ("by", {"arm"}, {"b_total"}),
    ]
    assert analyse('sum(rated(x)) + {__name__="y"}').problems == [
        "a selector without a metric name: '{__name__=\"\"}'",
        "rated(): not a PromQL function",
    ]


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """``promtool check rules`` parses each expression (Grafana's variables replaced)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make test` (apt-get install -y prometheus)")
    doc = load()
    exprs = [q.expr for q in queries(doc)] + [selector_of(v) for v in query_variables(doc)]
    grafana = {"$__rate_interval": "2m", "$__interval": "1m", "$__range": "6h"}

    def substitute(expr: str) -> str:
        for name, value in grafana.items():
            expr = expr.replace(name, value)
        assert "$__" not in expr, expr
        return VARIABLE.sub("x", expr)

    rules = [{"record": f"grafana:query{i}", "expr": substitute(e)} for i, e in enumerate(exprs)]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_kustomization_packs_the_dashboard_for_the_grafana_sidecar() -> None:
    doc = yaml.safe_load((DASHBOARD.parent / "kustomization.yaml").read_text())
    [generator] = doc["configMapGenerator"]
    assert generator["files"] == [DASHBOARD.name]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"
    assert DASHBOARD.stat().st_size < 512 * 1024  # far below a ConfigMap's 1 MiB
