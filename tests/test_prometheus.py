"""The Prometheus metrics source against a real Prometheus scraping a test exporter.

The exporter serves whatever series a test sets (counters that reset, pods that come
and go, NaN), so each property of the source is checked through the real server, the
real HTTP API and the real ``prometheus-api-client``.  One Prometheus serves the
module; a ``generation`` gauge tells when it has scraped a test's latest values.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector, CollectorRegistry
from structlog.testing import capture_logs

from analysis.counts import LATENCY_EDGES_MS, N_BUCKETS
from canaryd.ports import CanaryRef, MetricsError
from canaryd.prometheus import PrometheusMetrics, PrometheusSettings, _regex, promql_string
from canaryd.spec import CanarySpec, parse_spec
from tests.services import PrometheusServer, require_prometheus

Labels = tuple[tuple[str, str], ...]


class Exporter(Collector):
    """Serves the series a test sets: {(metric, labels): value}."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, Labels], float] = {}
        self.generation = 0
        self.lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            series = dict(self.series)
            generation = self.generation
        by_metric: dict[str, list[tuple[Labels, float]]] = {}
        for (metric, labels), value in sorted(series.items()):
            by_metric.setdefault(metric, []).append((labels, value))
        for metric, items in by_metric.items():
            names = [k for k, _ in items[0][0]]
            family: Metric
            if metric.endswith("_bucket"):
                family = GaugeMetricFamily(metric, "test", labels=names)  # raw bucket series
            else:
                family = CounterMetricFamily(metric.removesuffix("_total"), "test", labels=names)
            for labels, value in items:
                family.add_metric([v for _, v in labels], value)
            yield family
        yield GaugeMetricFamily("exporter_generation", "test", value=generation)

    def set(self, values: Mapping[tuple[str, Labels], float]) -> int:
        with self.lock:
            self.series = dict(values)
            self.generation += 1
            return self.generation


def istio(ns: str, workload: str, pod: str, code: str = "200") -> Labels:
    return (
        ("destination_workload", workload),
        ("destination_workload_namespace", ns),
        ("pod", pod),
        ("reporter", "destination"),
        ("response_code", code),
    )


def requests_series(
    ns: str, workload: str, pod: str, ok: float, errors: float = 0
) -> dict[Any, float]:
    out = {("istio_requests_total", istio(ns, workload, pod)): ok}
    if errors:
        out[("istio_requests_total", istio(ns, workload, pod, "503"))] = errors
    return out


def bucket_series(
    ns: str, workload: str, pod: str, counts: Mapping[str, float]
) -> dict[Any, float]:
    return {
        (
            "istio_request_duration_milliseconds_bucket",
            (*istio(ns, workload, pod)[:4], ("le", le)),
        ): value
        for le, value in counts.items()
    }


@pytest.fixture(scope="module")
def exporter() -> Iterator[tuple[Exporter, str]]:
    registry = CollectorRegistry()
    collector = Exporter()
    registry.register(collector)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield collector, f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def prometheus(exporter: tuple[Exporter, str]) -> Iterator[PrometheusServer]:
    require_prometheus()
    with PrometheusServer([exporter[1]], scrape_interval_s=1.0) as server:
        yield server


def publish(prom: PrometheusServer, exporter: Exporter, values: Mapping[Any, float]) -> None:
    generation = exporter.set(values)
    prom.wait_for(
        "exporter_generation",
        lambda result: bool(result) and float(result[0]["value"][1]) >= generation,
        timeout_s=15,
    )


def spec(name: str = "checkout", **metrics: Any) -> CanarySpec:
    return parse_spec(
        {
            "stable": {"deployment": name},
            "canary": {"deployment": f"{name}-canary"},
            "analysis": {"interval": "10s", "latency": []},
            "metrics": metrics,
        }
    )


def source(prom: PrometheusServer, **settings: Any) -> PrometheusMetrics:
    return PrometheusMetrics(PrometheusSettings(url=prom.url, **settings))


# -- counts ------------------------------------------------------------------------------


def test_one_fetch_of_three_queries_serves_every_canary(
    prometheus: PrometheusServer, exporter: tuple[Exporter, str]
) -> None:
    values: dict[Any, float] = {}
    names = [f"svc{i}" for i in range(30)]
    for i, name in enumerate(names):
        values |= requests_series("shop", name, f"{name}-a", 1000 + i, errors=i)
        values |= requests_series("shop", f"{name}-canary", f"{name}-c", 100 + i, errors=2 * i)
    values |= requests_series("other", "svc0", "x", 5)  # same workload, another namespace
    publish(prometheus, exporter[0], values)
    src = source(prometheus)
    specs = {CanaryRef("shop", n): spec(n) for n in names}

    async def round_() -> list[Any]:
        return await asyncio.gather(*(src.observe(r, s) for r, s in specs.items()))

    observations = asyncio.run(round_())
    assert src.stats["fetches"] == 1
    assert src.stats["queries"] == 3  # requests, errors, latency: not 3 per canary
    for i, obs in enumerate(observations):
        assert obs.stable is not None and obs.canary is not None
        assert (obs.stable.requests, obs.stable.errors) == (1000 + 2 * i, i)
        assert (obs.canary.requests, obs.canary.errors) == (100 + 3 * i, 2 * i)
    src.close()


def test_a_snapshot_is_reused_within_its_age_and_refetched_after(
    prometheus: PrometheusServer, exporter: tuple[Exporter, str]
) -> None:
    publish(prometheus, exporter[0], requests_series("shop", "checkout", "p", 10))
    now = [0.0]
    src = PrometheusMetrics(
        PrometheusSettings(url=prometheus.url, max_age_s=2.0), clock=lambda: now[0]
    )
    ref, s = CanaryRef("shop", "checkout"), spec()

    asyncio.run(src.observe(ref, s))
    now[0] = 1.5
    asyncio.run(src.observe(ref, s))
    assert src.stats["fetches"] == 1
    now[0] = 2.6
    asyncio.run(src.observe(ref, s))
    assert src.stats["fetches"] == 2
    src.close()


def test_counter_resets_and_pods_that_come_and_go_lose_nothing(
    prometheus: PrometheusServer, exporter: tuple[Exporter, str]
) -> None:
    ex = exporter[0]
    now = [0.0]
    src = PrometheusMetrics(
        PrometheusSettings(url=prometheus.url, max_age_s=1.0), clock=lambda: now[0]
    )
    ref, s = CanaryRef("shop", "checkout"), spec()
    canary = requests_series("shop", "checkout-canary", "c1", 50)

    def observe(values: dict[Any, float]) -> tuple[int, int]:
        publish(prometheus, ex, values | canary)
        now[0] += 10
        obs = asyncio.run(src.observe(ref, s))
        assert obs.stable is not None
        return obs.stable.requests, obs.stable.errors

    assert observe(requests_series("shop", "checkout", "a", 100, 4)
                   | requests_series("shop", "checkout", "b", 200)) == (304, 4)  # fmt: skip
    # pod a restarted: its counter starts again from 0 and has counted 7 since
    assert observe(requests_series("shop", "checkout", "a", 7)
                   | requests_series("shop", "checkout", "b", 230)) == (341, 4)  # fmt: skip
    # pod b is gone (stable scaled down) and pod d is new; pod a's error series reset
    # with the pod and shows its first new error
    assert observe(requests_series("shop", "checkout", "a", 17, 1)
                   | requests_series("shop", "checkout", "d", 3)) == (355, 5)  # fmt: skip
    src.close()


def test_a_canary_without_series_yet_has_served_nothing(
    prometheus: PrometheusServer, exporter: tuple[Exporter, str]
) -> None:
    publish(prometheus, exporter[0], requests_series("shop", "checkout", "a", 100))
    src = source(prometheus)
    obs = asyncio.run(src.observe(CanaryRef("shop", "checkout"), spec()))
    assert obs.stable is not None and obs.stable.requests == 100
    assert obs.canary is not None and (obs.canary.requests, obs.canary.errors) == (0, 0)
    with pytest.raises(MetricsError, match=r"no request series .*'nothing'"):
        asyncio.run(src.observe(CanaryRef("shop", "nothing"), spec("nothing")))
    src.close()


def test_latency_buckets_on_istio_edges_and_on_other_edges_in_seconds(
    prometheus: PrometheusServer, exporter: tuple[Exporter, str]
) -> None:
    istio_counts = {f"{e:g}": 10.0 * (i + 1) for i, e in enumerate(LATENCY_EDGES_MS)}
    istio_counts["+Inf"] = 10.0 * N_BUCKETS
    seconds = {"0.005": 3.0, "0.1": 8.0, "1": 9.0, "+Inf": 10.0}
    values = (
        requests_series("shop", "checkout", "a", 10.0 * N_BUCKETS)
        | bucket_series("shop", "checkout", "a", istio_counts)
        | {("http_requests_total", (("app", "web"), ("pod", "w"), ("version", "v1"))): 10.0}
        | {("http_requests_total", (("app", "web"), ("pod", "w2"), ("version", "v2"))): 4.0}
    )
    for le, value in seconds.items():
        labels = (("app", "web"), ("le", le), ("pod", "w"), ("version", "v1"))
        values[("http_duration_seconds_bucket", labels)] = value
        labels = (("app", "web"), ("le", le), ("pod", "w2"), ("version", "v2"))
        values[("http_duration_seconds_bucket", labels)] = min(value, 4.0)
    publish(prometheus, exporter[0], values)
    src = source(prometheus)
    with_latency = parse_spec({"stable": {"deployment": "checkout"},
                               "canary": {"deployment": "checkout-canary"}})  # fmt: skip
    obs = asyncio.run(src.observe(CanaryRef("shop", "checkout"), with_latency))
    assert obs.stable is not None and obs.canary is not None
    assert obs.stable.latency_buckets == tuple(10 * (i + 1) for i in range(N_BUCKETS))
    assert obs.canary.latency_buckets == (0,) * N_BUCKETS

    custom = parse_spec({
        "stable": {"deployment": "x"}, "canary": {"deployment": "y"},
        "metrics": {
            "armLabel": "version", "stableValue": "v1", "canaryValue": "v2",
            "namespaceLabel": None, "selector": 'app="web"',
            "queries": {
                "requests": "sum by ($by) (http_requests_total{$selector})",
                "errors": 'sum by ($by) (http_requests_total{code=~"5..",$selector})',
                "latency": "sum by ($by, le) (http_duration_seconds_bucket{$selector})",
                "latencyUnit": "s",
            },
        },
    })  # fmt: skip
    obs = asyncio.run(src.observe(CanaryRef("shop", "web"), custom))
    assert obs.stable is not None and obs.canary is not None
    assert (obs.stable.requests, obs.stable.errors, obs.canary.requests) == (10, 0, 4)
    edges = dict(zip((*LATENCY_EDGES_MS, math.inf), obs.stable.latency_buckets, strict=True))
    # 5 ms edge exact; 10-50 ms hold the 5 ms count (no finer edge); 100 ms..500 ms: 8
    assert (edges[1], edges[5], edges[50], edges[100], edges[500]) == (0, 3, 3, 8, 8)
    assert (edges[1000], edges[math.inf]) == (9, 10)
    assert src.stats["queries"] == 6  # two shapes, three queries each
    src.close()


def test_nan_holds_only_the_canary_it_belongs_to(
    prometheus: PrometheusServer, exporter: tuple[Exporter, str]
) -> None:
    values = requests_series("shop", "good", "a", 10) | requests_series(
        "shop", "bad", "b", math.nan
    )
    publish(prometheus, exporter[0], values)
    src = source(prometheus)

    async def both() -> list[Any]:
        return list(
            await asyncio.gather(
                src.observe(CanaryRef("shop", "good"), spec("good")),
                src.observe(CanaryRef("shop", "bad"), spec("bad")),
                return_exceptions=True,
            )
        )

    good, bad = asyncio.run(both())
    assert not isinstance(good, BaseException) and good.stable.requests == 10
    assert isinstance(bad, MetricsError) and "NaN" in str(bad), bad
    src.close()


# -- failures ----------------------------------------------------------------------------


def test_a_bad_query_fails_at_once_with_prometheus_reason(prometheus: PrometheusServer) -> None:
    src = source(prometheus)
    broken = spec(
        queries={"requests": "sum by ($by) (rate(x{$selector}))", "errors": "x{$selector} $by"}
    )
    with pytest.raises(MetricsError, match=r"400.*bad_data"):
        asyncio.run(src.observe(CanaryRef("shop", "checkout"), broken))
    assert src.stats["queries"] <= 2  # not retried: a bad query does not heal
    src.close()


def test_unreachable_prometheus_is_retried_then_reported() -> None:
    # bound but not listening: connections are refused, and no other test (or server
    # started beside this one) can take the port meanwhile
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        src = PrometheusMetrics(
            PrometheusSettings(
                url=f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01, timeout_s=30
            )
        )
        with capture_logs() as logs, pytest.raises(MetricsError, match="unreachable: conn"):
            asyncio.run(src.observe(CanaryRef("shop", "checkout"), spec()))
        retries = [
            e["attempt"] for e in logs if e["event"] == "prometheus query failed; will retry"
        ]
        # the query that gave up first tried three times (first try, two retries); once it
        # gave up, its two siblings (tried at least once) were cancelled wherever they were
        assert "2/2" in retries and set(retries) <= {"1/2", "2/2"}, retries
        assert 3 + 2 <= src.stats["queries"] <= 3 * 3
        sent = src.stats["queries"]
        # the failure is remembered: a thousand canaries do not each retry it
        with pytest.raises(MetricsError, match="unreachable"):
            asyncio.run(src.observe(CanaryRef("shop", "cart"), spec("cart")))
        assert src.stats["fetches"] == 1 and src.stats["queries"] == sent
        src.close()


def test_a_silent_server_times_out_within_the_deadline() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # accepts connections, never answers
        port = listener.getsockname()[1]
        src = PrometheusMetrics(
            PrometheusSettings(url=f"http://127.0.0.1:{port}", timeout_s=1.0, backoff_s=0.05)
        )
        started = time.monotonic()
        with pytest.raises(MetricsError, match=r"timed out|within 1s"):
            asyncio.run(src.observe(CanaryRef("shop", "checkout"), spec()))
        assert time.monotonic() - started < 2.5
        src.close()


def test_an_answer_that_is_not_prometheus_api_is_an_error(exporter: tuple[Exporter, str]) -> None:
    # the exporter answers every path with its metrics text, not JSON
    src = PrometheusMetrics(PrometheusSettings(url=f"http://{exporter[1]}", retries=0))
    with pytest.raises(MetricsError, match="not its API"):
        asyncio.run(src.observe(CanaryRef("shop", "checkout"), spec()))
    src.close()


def test_one_callers_deadline_does_not_cancel_the_shared_fetch(
    prometheus: PrometheusServer, exporter: tuple[Exporter, str]
) -> None:
    publish(prometheus, exporter[0], requests_series("shop", "checkout", "a", 42))
    src = source(prometheus)

    async def run() -> int:
        impatient = asyncio.create_task(src.observe(CanaryRef("shop", "checkout"), spec()))
        await asyncio.sleep(0)
        patient = asyncio.create_task(src.observe(CanaryRef("shop", "checkout"), spec()))
        await asyncio.sleep(0.001)
        impatient.cancel()
        obs = await patient
        assert obs.stable is not None
        return obs.stable.requests

    assert asyncio.run(run()) == 42
    assert src.stats["fetches"] == 1
    src.close()


def test_arms_that_cannot_be_told_apart_are_a_clear_error(prometheus: PrometheusServer) -> None:
    src = source(prometheus)
    with pytest.raises(MetricsError, match="cannot tell the arms apart"):
        asyncio.run(src.observe(CanaryRef("shop", "x"), parse_spec({})))
    src.close()


def test_a_bearer_token_file_is_sent_and_reread_on_each_fetch(tmp_path: Path) -> None:
    """Prometheus itself checks no bearer tokens, so a recording HTTP peer stands in
    for the proxy in front of a hosted one: it checks what arrives on the wire."""
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    token = tmp_path / "token"
    token.write_text("first\n")
    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        now = [0.0]
        src = PrometheusMetrics(
            PrometheusSettings(
                url=f"http://127.0.0.1:{server.server_port}",
                bearer_token_file=str(token),
                headers={"X-Scope-OrgID": "team-a"},
            ),
            clock=lambda: now[0],
        )
        with pytest.raises(MetricsError, match="no request series"):
            asyncio.run(src.observe(CanaryRef("shop", "checkout"), spec()))
        token.write_text("second\n")  # rotated
        now[0] = 100.0
        with pytest.raises(MetricsError, match="no request series"):
            asyncio.run(src.observe(CanaryRef("shop", "checkout"), spec()))
        src.close()
        server.shutdown()
        thread.join(5)
    assert seen == ["Bearer first"] * 3 + ["Bearer second"] * 3


# -- label values inside PromQL: regex in a string literal --------------------------------

_LABEL_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)


@pytest.fixture(scope="module")
def bare_prometheus() -> Iterator[PrometheusServer]:
    require_prometheus()
    with PrometheusServer([], scrape_interval_s=60.0) as server:
        yield server


@given(values=st.sets(_LABEL_TEXT, min_size=1, max_size=3), other=_LABEL_TEXT, pick=st.booleans())
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_arm_values_match_exactly_in_a_real_prometheus(
    bare_prometheus: PrometheusServer, values: set[str], other: str, pick: bool
) -> None:
    """Any Unicode value, backslashes, quotes and newlines included, is matched exactly:
    the query parses, the value matches itself, and nothing else matches."""
    probe = sorted(values)[0] if pick else other
    replacement = probe.replace("$", "$$")  # label_replace expands $1 in its replacement
    expr = (
        f'label_replace(label_replace(vector(1), "v", "{promql_string(replacement)}", "", ""),'
        f' "m", "yes", "v", "{_regex(values)}")'
    )
    result = bare_prometheus.query(expr)  # a bad escape would be a PrometheusQueryError
    assert len(result) == 1
    labels = result[0]["metric"]
    assert labels["v"] == probe
    assert (labels.get("m") == "yes") == (probe in values), (probe, values, expr)


def test_a_trailing_backslash_in_one_canary_leaves_the_shared_query_valid(
    bare_prometheus: PrometheusServer,
) -> None:
    for value in ["v1\\", 'a"b', "line\nbreak", "(.*)", "ü\\\\"]:
        bare_prometheus.query(f'up{{version=~"{_regex({value, "v2"})}"}}')


@pytest.mark.parametrize("value", ["", " v1", "v1\n", "a\tb", "x" * 254])
def test_arm_values_that_no_label_holds_are_rejected(value: str) -> None:
    with pytest.raises(ValueError, match=r"stableValue|stable_value"):
        spec(stableValue=value)


# -- fault isolation: one Canary's input never fails another's ------------------------------


def test_a_query_rejected_for_one_canary_is_charged_to_that_canary_alone(
    prometheus: PrometheusServer, exporter: tuple[Exporter, str]
) -> None:
    """A value no validation caught (a lone surrogate, which PromQL refuses to unquote)
    breaks the shared batched query; the source splits the batch by halves, so the other
    Canaries, in this namespace and others, still get their counts, and the error names
    neither their namespaces nor their workloads."""
    values: dict[Any, float] = {}
    names = [f"svc{i}" for i in range(6)]
    for i, name in enumerate(names):
        values |= requests_series(f"team{i}", name, f"{name}-a", 1000 + i, errors=i)
        values |= requests_series(f"team{i}", f"{name}-canary", f"{name}-c", 100 + i)
    publish(prometheus, exporter[0], values)
    src = source(prometheus)
    specs = {CanaryRef(f"team{i}", n): spec(n) for i, n in enumerate(names)}
    good = spec("bad")
    hostile = good.model_copy(
        update={"metrics": good.metrics.model_copy(update={"stable_value": "v1\ud800"})}
    )
    bad = CanaryRef("hostile", "bad")

    async def round_() -> list[Any]:
        calls = [src.observe(r, s) for r, s in specs.items()] + [src.observe(bad, hostile)]
        return await asyncio.gather(*calls, return_exceptions=True)

    *observations, failure = asyncio.run(round_())
    assert isinstance(failure, MetricsError), failure
    assert "this Canary's query only" in str(failure)
    for other in ("team", "svc"):
        assert other not in str(failure)
    assert src.stats["splits"] == 1
    for i, obs in enumerate(observations):
        assert not isinstance(obs, BaseException), obs
        assert obs.stable is not None and obs.canary is not None
        assert (obs.stable.requests, obs.stable.errors) == (1000 + 2 * i, i)
    src.close()
