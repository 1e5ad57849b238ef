"""The mesh emulator (``python -m simulator serve``), over real HTTP against the API double.

Traffic is simulated at ``speed`` virtual seconds per wall-clock second, so a fraction of
a second of waiting gives hundreds of requests.  Nothing is mocked: the emulator talks to
``KubeApiServer`` through the real kubernetes client, and ``/metrics`` is scraped over
HTTP and parsed with prometheus_client's parser.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from analysis.counts import LATENCY_EDGES_MS
from kubedouble.apiserver import KubeApiServer
from simulator import get_scenario
from simulator.__main__ import main
from simulator.serve import (
    EXPOSITIONS,
    CanaryId,
    Exposition,
    MeshEmulator,
    RouteError,
    Routing,
    canary_share_pct,
    routing_of,
)
from tests.conftest import NS, VIRTUAL_SERVICE, canary

ROOT = Path(__file__).resolve().parent.parent
ISTIO = ("networking.istio.io", "v1")
REF = CanaryId(NS, "checkout")
STABLE, CANARY = "checkout", "checkout-canary"

Start = Callable[..., MeshEmulator]


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def start(cluster: KubeApiServer) -> Iterator[Start]:
    """Start emulators on the cluster fixture; each is stopped and its client closed."""
    running: list[tuple[MeshEmulator, k8s.ApiClient]] = []

    def _start(scenario: str = "healthy", **kwargs: Any) -> MeshEmulator:
        api = cluster.api_client()
        emulator = MeshEmulator(api, get_scenario(scenario), **kwargs)
        running.append((emulator, api))
        return emulator.start()

    yield _start
    for emulator, api in running:
        emulator.stop()
        api.close()
    assert cluster.internal_errors == []


def parse(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def scrape(url: str) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse(response.read().decode())


def arm(samples: list[Sample], name: str, workload: str, **labels: str) -> list[Sample]:
    """The samples called ``name`` of one Deployment, with the given labels."""
    return [
        s
        for s in samples
        if s.name == name
        and s.labels["destination_workload"] == workload
        and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def requests_of(samples: list[Sample], workload: str) -> float:
    return sum(s.value for s in arm(samples, "istio_requests_total", workload))


def set_canary_weight(cluster: KubeApiServer, pct: int, name: str = "checkout") -> None:
    """Write the weights as canaryd would: read, change the two weights, replace."""
    api = cluster.api_client()
    try:
        custom = k8s.CustomObjectsApi(api)
        vs: Any = custom.get_namespaced_custom_object(*ISTIO, NS, "virtualservices", name)
        stable, canary_dest = vs["spec"]["http"][0]["route"]
        stable["weight"], canary_dest["weight"] = 100 - pct, pct
        custom.replace_namespaced_custom_object(*ISTIO, NS, "virtualservices", name, vs)
    finally:
        api.close()


def wait_for(condition: Callable[[], bool], timeout_s: float) -> float:
    """Poll every 5 ms; the seconds it took, or AssertionError after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not true after {timeout_s} s")
        time.sleep(0.005)
    return time.monotonic() - started


def routed(emulator: MeshEmulator, pct: int) -> Callable[[], bool]:
    """Whether the emulator splits the checkout Canary's traffic at ``pct`` % now."""
    return lambda: emulator.weights == {REF: pct}


# -- routing, read as Envoy would --------------------------------------------------------


def test_reads_the_canary_share_from_the_named_route() -> None:
    routing = routing_of(canary())
    assert canary_share_pct(VIRTUAL_SERVICE["spec"], routing) == 0
    spec = copy.deepcopy(VIRTUAL_SERVICE["spec"])
    spec["http"][0]["route"][0]["weight"], spec["http"][0]["route"][1]["weight"] = 70, 30
    assert canary_share_pct(spec, routing) == 30
    spec["http"][0]["route"][0]["weight"] = 90  # Envoy splits by relative weight
    assert canary_share_pct(spec, routing) == 25
    del spec["http"][0]["route"][0]  # the only destination takes everything
    del spec["http"][0]["route"][0]["weight"]
    assert canary_share_pct(spec, routing) == 100


def test_host_based_routing_matches_short_and_qualified_hosts() -> None:
    obj = canary()
    del obj["spec"]["trafficRouting"]["istio"]["destinationRule"]
    obj["spec"]["trafficRouting"]["istio"]["virtualService"]["routes"] = []
    routing = routing_of(obj)
    fqdn = f"checkout-canary.{NS}.svc.cluster.local"
    spec = {
        "http": [
            {"route": [{"destination": {"host": "other"}}]},
            {
                "route": [
                    {"destination": {"host": "checkout"}, "weight": 80},
                    {"destination": {"host": fqdn}, "weight": 20},
                ]
            },
        ]
    }
    assert canary_share_pct(spec, routing) == 20


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (None, "VirtualService shop/checkout not found"),
        ({"http": [{"name": "admin", "route": []}]}, "no HTTP route named 'http-primary'"),
        (
            {"http": [{"name": "http-primary", "route": [{"destination": {"subset": "stable"}}]}]},
            "no destination with subset 'canary'",
        ),
        (
            {
                "http": [
                    {
                        "name": "http-primary",
                        "route": [{"destination": {"subset": "canary"}, "weight": "half"}],
                    }
                ]
            },
            "weight 'half' is not a whole number",
        ),
    ],
)
def test_an_unreadable_route_says_why(spec: dict[str, Any] | None, message: str) -> None:
    with pytest.raises(RouteError, match=message):
        canary_share_pct(spec, routing_of(canary()))


def test_a_canary_without_both_deployments_is_not_emulated(
    cluster: KubeApiServer, start: Start
) -> None:
    broken = canary("broken")
    broken["spec"]["stable"] = "checkout"  # not {deployment: ...}
    with pytest.raises(ValueError, match=r"spec\.stable\.deployment and spec\.canary\."):
        routing_of(broken)
    cluster.put_raw("canaryd.io", "v1alpha1", "canaries", broken)
    emulator = start()
    assert emulator.weights == {REF: 0}
    assert list(emulator.problems) == [CanaryId(NS, "broken")]


# -- the emulator, in-process ------------------------------------------------------------


def test_at_weight_zero_only_stable_serves(start: Start) -> None:
    emulator = start(speed=20)
    assert emulator.weights == {REF: 0}
    time.sleep(0.2)
    samples = scrape(emulator.metrics_url)
    # the stable has served its 600 s warm-up at ~100 rps, and goes on serving
    assert requests_of(samples, STABLE) > 50_000
    assert not [s for s in samples if s.labels.get("destination_workload") == CANARY]
    assert requests_of(scrape(emulator.metrics_url), STABLE) > requests_of(samples, STABLE)


def test_follows_weight_changes_within_one_second(cluster: KubeApiServer, start: Start) -> None:
    emulator = start(speed=20)
    for pct in (50, 10, 100):
        set_canary_weight(cluster, pct)
        assert wait_for(routed(emulator, pct), timeout_s=1.0) < 1.0
        if pct == 50:
            time.sleep(0.3)
            first = requests_of(scrape(emulator.metrics_url), CANARY)
            assert first > 100  # 0.3 s × 20 × 100 rps × 50 % ≈ 300
            time.sleep(0.3)
            assert requests_of(scrape(emulator.metrics_url), CANARY) > first
    # at 100 % the stable's counters stand still
    time.sleep(0.1)
    before = scrape(emulator.metrics_url)
    time.sleep(0.3)
    after = scrape(emulator.metrics_url)
    assert requests_of(after, STABLE) == requests_of(before, STABLE)
    assert requests_of(after, CANARY) > requests_of(before, CANARY)


@pytest.mark.parametrize("exposition", EXPOSITIONS)
def test_series_carry_istio_destination_labels(
    cluster: KubeApiServer, start: Start, exposition: Exposition
) -> None:
    emulator = start(speed=20, exposition=exposition)
    set_canary_weight(cluster, 50)
    wait_for(routed(emulator, 50), timeout_s=1.0)
    time.sleep(0.2)
    samples = scrape(emulator.metrics_url)
    for workload in (STABLE, CANARY):
        expected = {
            "reporter": "destination",
            "source_workload": "istio-ingressgateway",
            "destination_workload": workload,
            "destination_workload_namespace": NS,
            "destination_service": "checkout.shop.svc.cluster.local",
            "destination_service_name": "checkout",
            "destination_canonical_service": "checkout",
            "request_protocol": "http",
            "pod": f"{workload}-0",
        }
        counters = arm(samples, "istio_requests_total", workload)
        assert {s.labels["response_code"] for s in counters} <= {"200", "503"}
        assert "200" in {s.labels["response_code"] for s in counters}
        for s in counters:
            assert s.labels == expected | {"response_code": s.labels["response_code"]}
        for suffix in ("_count", "_sum"):
            (sample,) = arm(samples, f"istio_request_duration_milliseconds{suffix}", workload)
            assert sample.labels == expected
        for s in arm(samples, "istio_request_duration_milliseconds_bucket", workload):
            assert s.labels == expected | {"le": s.labels["le"]}
    names = {s.name for s in samples}
    assert names == {
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_duration_milliseconds_count",
        "istio_request_duration_milliseconds_sum",
    }


@pytest.mark.parametrize("exposition", EXPOSITIONS)
def test_histograms_are_cumulative_and_agree_with_the_request_counters(
    cluster: KubeApiServer, start: Start, exposition: Exposition
) -> None:
    emulator = start("latency-tail", speed=20, exposition=exposition)
    set_canary_weight(cluster, 50)
    wait_for(routed(emulator, 50), timeout_s=1.0)
    time.sleep(0.2)
    samples = scrape(emulator.metrics_url)
    for workload in (STABLE, CANARY):
        buckets = arm(samples, "istio_request_duration_milliseconds_bucket", workload)
        edges = [float(s.labels["le"]) for s in buckets]
        assert edges == [*LATENCY_EDGES_MS, math.inf]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts)
        assert 0 < counts[LATENCY_EDGES_MS.index(100)] < counts[-1]  # p50 40 ms, p99 > 100
        (count,) = arm(samples, "istio_request_duration_milliseconds_count", workload)
        (total,) = arm(samples, "istio_request_duration_milliseconds_sum", workload)
        assert counts[-1] == count.value == requests_of(samples, workload)
        # p50 40 ms: the mean is tens of ms, whatever the bucket midpoints make of it
        assert 20 < total.value / count.value < 200


def test_both_expositions_serve_the_same_series(cluster: KubeApiServer, start: Start) -> None:
    now_s = [1000.0]  # a clock that stands still: both see the same counters
    emulator = start("error-spike", exposition="fast", clock=lambda: now_s[0])
    set_canary_weight(cluster, 30)
    wait_for(routed(emulator, 30), timeout_s=1.0)
    now_s[0] += 60.0

    def key(samples: list[Sample]) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {(s.name, tuple(sorted(s.labels.items())), s.value) for s in samples}

    fast = key(parse(emulator.render_text().decode()))
    assert fast == key(parse(generate_latest(emulator.registry).decode()))
    assert fast == key(scrape(emulator.metrics_url))
    assert len(fast) == 2 * (2 + 20 + 2)  # two arms: 200 and 503, 20 buckets, count, sum


def test_an_erring_canary_shows_503s(cluster: KubeApiServer, start: Start) -> None:
    emulator = start("error-spike", speed=20)
    set_canary_weight(cluster, 50)
    wait_for(routed(emulator, 50), timeout_s=1.0)
    time.sleep(0.5)  # ≈ 500 canary requests at 5 % errors
    samples = scrape(emulator.metrics_url)
    (errors,) = arm(samples, "istio_requests_total", CANARY, response_code="503")
    (ok,) = arm(samples, "istio_requests_total", CANARY, response_code="200")
    assert 0.01 < errors.value / (errors.value + ok.value) < 0.15


def test_picks_up_new_canaries_and_drops_deleted_ones(cluster: KubeApiServer, start: Start) -> None:
    emulator = start(speed=20)
    # a second service routed by host, with no DestinationRule and no route names
    vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "cart", "namespace": NS},
        "spec": {
            "hosts": ["cart"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "cart"}, "weight": 75},
                        {"destination": {"host": "cart-canary"}, "weight": 25},
                    ]
                }
            ],
        },
    }
    cart = canary("cart")
    cart["spec"].update(service="cart", stable={"deployment": "cart"})
    cart["spec"]["canary"] = {"deployment": "cart-canary"}
    cart["spec"]["trafficRouting"] = {"istio": {"virtualService": {"name": "cart"}}}
    api = cluster.api_client()
    try:
        custom = k8s.CustomObjectsApi(api)
        custom.create_namespaced_custom_object(*ISTIO, NS, "virtualservices", vs)
        custom.create_namespaced_custom_object("canaryd.io", "v1alpha1", NS, "canaries", cart)
        wait_for(lambda: emulator.weights == {REF: 0, CanaryId(NS, "cart"): 25}, timeout_s=3.0)
        time.sleep(0.2)
        assert requests_of(scrape(emulator.metrics_url), "cart-canary") > 0
        custom.delete_namespaced_custom_object("canaryd.io", "v1alpha1", NS, "canaries", "cart")
        wait_for(lambda: emulator.weights == {REF: 0}, timeout_s=3.0)
        assert requests_of(scrape(emulator.metrics_url), "cart") == 0
    finally:
        api.close()


def test_a_missing_virtual_service_routes_nothing_until_it_appears(
    cluster: KubeApiServer, start: Start
) -> None:
    cluster.delete_raw(*ISTIO, "virtualservices", NS, "checkout")
    emulator = start(speed=20)
    assert emulator.weights == {REF: 0}
    assert emulator.problems == {REF: "VirtualService shop/checkout not found"}
    vs = copy.deepcopy(VIRTUAL_SERVICE)
    vs["spec"]["http"][0]["route"][0]["weight"], vs["spec"]["http"][0]["route"][1]["weight"] = (
        70,
        30,
    )
    cluster.put_raw(*ISTIO, "virtualservices", vs)
    wait_for(lambda: emulator.weights == {REF: 30}, timeout_s=1.0)
    assert emulator.problems == {}


def test_a_watch_that_expires_is_resumed_from_a_fresh_list(
    cluster: KubeApiServer, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="simulator")
    emulator = start(speed=20, watch_timeout_s=1)
    # a write neither watch sees, then compaction: their next watches, from the last
    # version they saw, get 410 Expired
    lease = {"metadata": {"name": "other", "namespace": NS}, "spec": {}}
    cluster.put_raw("coordination.k8s.io", "v1", "leases", lease)
    cluster.compact()
    expired = "watch of virtualservices in all namespaces expired; relisting"
    wait_for(lambda: expired in [r.getMessage() for r in caplog.records], timeout_s=2.0)
    set_canary_weight(cluster, 40)
    wait_for(routed(emulator, 40), timeout_s=1.0)
    # (urllib3 may warn that it retried on a kept-alive connection the server had closed)
    ours = [r for r in caplog.records if r.name.startswith("simulator.")]
    assert not [r for r in ours if r.levelno >= logging.WARNING]


def test_a_failed_watch_is_retried(cluster: KubeApiServer, start: Start) -> None:
    emulator = start(speed=20, watch_timeout_s=1)
    cluster.inject(verb="watch", path_contains="virtualservices", status=500, times=2)
    time.sleep(1.2)  # the watch is renewed, and fails twice: back off, list, watch again
    set_canary_weight(cluster, 20)
    wait_for(routed(emulator, 20), timeout_s=5.0)
    assert emulator.problems == {}


# -- the command line ---------------------------------------------------------------------


def test_serve_prints_its_address_serves_and_exits_0_on_sigterm(
    cluster: KubeApiServer, kubeconfig: Path
) -> None:
    argv = [sys.executable, "-m", "simulator", "serve", "--kubeconfig", str(kubeconfig)]
    argv += ["--namespace", NS, "--port", "0", "--speed", "10", "--seed", "3"]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "no JSON line within 15 s"
        announced = json.loads(proc.stdout.readline())
        port = announced["port"]
        assert announced == {"metrics_url": f"http://127.0.0.1:{port}/metrics", "port": port}
        samples = scrape(announced["metrics_url"])
        assert requests_of(samples, STABLE) > 0
        assert requests_of(samples, CANARY) == 0
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == ""  # nothing after the JSON line
    assert "Traceback" not in err


def test_a_bad_scenario_is_one_line_and_exit_2(
    kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "--kubeconfig", str(kubeconfig), "--scenario", "healthyy"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("canaryd-sim: error: unknown scenario 'healthyy'")
    assert "did you mean 'healthy'" in err


def test_a_bad_scenario_file_or_kubeconfig_is_exit_2(
    tmp_path: Path, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    assert main(["serve", "--kubeconfig", str(kubeconfig), "--scenario-file", str(missing)]) == 2
    assert capsys.readouterr().err == f"canaryd-sim: error: scenario file not found: {missing}\n"
    garbage = tmp_path / "kubeconfig"
    garbage.write_text("- not: a kubeconfig\n")
    assert main(["serve", "--kubeconfig", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"canaryd-sim: error: cannot use kubeconfig {garbage}")
    assert err.count("\n") == 1
    assert main(["serve", "--kubeconfig", str(tmp_path / "nope")]) == 2
    assert "cannot read kubeconfig" in capsys.readouterr().err


def test_help_teaches_and_no_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "serve" in capsys.readouterr().out
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "canaryd-sim serve --kubeconfig" in out
    assert "--scenario-file" in out
    assert main(["serve", "--speed", "0"]) == 2


# -- Gateway API: the split read from an HTTPRoute ----------------------------------------


def on_http_route(cluster: KubeApiServer, canary_pct: int = 0, **gateway: Any) -> None:
    """The Canary routed by an HTTPRoute (rule ``web``, Services checkout and
    checkout-canary) at ``canary_pct``, instead of the VirtualService."""
    import copy

    from tests.test_gatewayapi import HTTP_ROUTE

    route = copy.deepcopy(HTTP_ROUTE)
    refs = route["spec"]["rules"][0]["backendRefs"]
    refs[0]["weight"], refs[1]["weight"] = 100 - canary_pct, canary_pct
    cluster.put_raw("gateway.networking.k8s.io", "v1", "httproutes", route)
    obj = cluster.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout")
    assert obj is not None
    obj["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": "checkout"} | gateway}
    cluster.put_raw("canaryd.io", "v1alpha1", "canaries", obj)


def test_reads_the_canary_share_of_an_http_route_rule() -> None:
    from tests.test_gatewayapi import HTTP_ROUTE

    obj = canary()
    obj["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": "checkout", "rules": ["api"]}}
    routing = routing_of(obj)
    assert routing.vs_key == ("httproutes", NS, "checkout")
    spec = json.loads(json.dumps(HTTP_ROUTE["spec"]))
    assert canary_share_pct(spec, routing) == 0
    refs = spec["rules"][0]["backendRefs"]
    refs[0]["weight"], refs[1]["weight"] = 3, 1
    assert canary_share_pct(spec, routing) == 25
    del refs[0]["weight"], refs[1]["weight"]  # both weigh 1
    assert canary_share_pct(spec, routing) == 50

    def routed_by(**gateway: Any) -> Routing:
        other = canary()
        other["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": "checkout"} | gateway}
        return routing_of(other)

    assert canary_share_pct(spec, routed_by()) == 50  # the rule with both Services
    with pytest.raises(RouteError, match="no rule named 'web'"):
        canary_share_pct(spec, routed_by(rules=["web"]))
    with pytest.raises(RouteError, match="HTTPRoute shop/checkout not found"):
        canary_share_pct(None, routing)


def test_follows_an_http_route_and_ignores_the_virtual_service(
    cluster: KubeApiServer, start: Start
) -> None:
    on_http_route(cluster, 20)
    emulator = start(speed=20)
    assert wait_for(routed(emulator, 20), timeout_s=2.0) < 2.0
    set_canary_weight(cluster, 70)  # the VirtualService is not this Canary's route
    time.sleep(0.3)
    assert emulator.weights == {REF: 20}
    api = cluster.api_client()
    try:
        custom = k8s.CustomObjectsApi(api)
        route: Any = custom.get_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", NS, "httproutes", "checkout"
        )
        stable, canary_ref = route["spec"]["rules"][0]["backendRefs"]
        stable["weight"], canary_ref["weight"] = 40, 60
        custom.replace_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", NS, "httproutes", "checkout", route
        )
    finally:
        api.close()
    assert wait_for(routed(emulator, 60), timeout_s=1.0) < 1.0
    time.sleep(0.3)
    assert requests_of(scrape(emulator.metrics_url), CANARY) > 0
