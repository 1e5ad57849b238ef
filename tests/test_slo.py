"""Error budgets from a real Prometheus: a day of synthetic history backfilled with
``promtool``, for services at 80%, 30%, 10% and −5% of their budget and one burning
fast; the figures, the tiers, the ``slo_*`` metrics and the API's answer."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import kubernetes.client as k8s
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from analysis.budget import Tier
from canaryd.api import ApiSettings, bind, create_app, serve_threaded
from canaryd.cli import main
from canaryd.daemon import Daemon
from canaryd.hub import StatusHub
from canaryd.kube import CanaryObject
from canaryd.metrics import HubCollector
from canaryd.ports import CanaryRef
from canaryd.prometheus import PrometheusMetrics, PrometheusSettings
from canaryd.slo import SloMonitor, slo_services
from canaryd.spec import parse_spec
from canaryd.status import CanaryStatus
from kubedouble.apiserver import KubeApiServer
from tests.services import PrometheusServer, backfilled_prometheus, istio_openmetrics

DAY_S = 86400
STEP_S = 60
pytestmark = pytest.mark.anyio

RPS = 10.0  # per service: 9 on stable, 1 on the canary
#: error ratio per service: a budget of 1% (objective 99%) → 80%, 30%, 10%, −5% left;
#: "fast" is clean for 23 h and at 15% errors for the last hour (15× the budget's rate)
ERRORS = {"a80": 0.002, "b30": 0.007, "c10": 0.009, "dneg": 0.0105, "fast": 0.0}
FAST_ERRORS, FAST_S = 0.15, 3600
#: a80 also has a latency objective: 99% within 250 ms, met by 99.6% (60% left)
FAST_SHARE = 0.996


def _labels(service: str, arm: str, code: str | None = None, le: str | None = None) -> str:
    parts = [
        'reporter="destination"',
        f'destination_workload="{service}{arm}"',
        'destination_workload_namespace="shop"',
        f'pod="{service}{arm}-1"',
    ]
    if code is not None:
        parts.append(f'response_code="{code}"')
    if le is not None:
        parts.append(f'le="{le}"')
    return ",".join(parts)


def openmetrics(now: int) -> str:
    requests: list[str] = []
    buckets: list[str] = []
    for service, ratio in ERRORS.items():
        for arm, share in (("", 0.9), ("-canary", 0.1)):
            ok = bad = 0.0
            ok_lines, bad_lines, le_lines, inf_lines = [], [], [], []
            for i in range(DAY_S // STEP_S + 61):  # a day and an hour
                t = now - DAY_S - 3600 + i * STEP_S
                if i:
                    n = RPS * share * STEP_S
                    r = FAST_ERRORS if service == "fast" and t > now - FAST_S else ratio
                    bad += n * r
                    ok += n * (1 - r)
                ok_lines.append(
                    f"istio_requests_total{{{_labels(service, arm, '200')}}} {ok:.3f} {t}"
                )
                bad_lines.append(
                    f"istio_requests_total{{{_labels(service, arm, '503')}}} {bad:.3f} {t}"
                )
                if service == "a80":
                    total = ok + bad
                    le_lines.append(
                        "istio_request_duration_milliseconds_bucket"
                        f"{{{_labels(service, arm, le='250')}}} {total * FAST_SHARE:.3f} {t}"
                    )
                    inf_lines.append(
                        "istio_request_duration_milliseconds_bucket"
                        f"{{{_labels(service, arm, le='+Inf')}}} {total:.3f} {t}"
                    )
            requests += ok_lines + bad_lines
            buckets += le_lines + inf_lines
    return istio_openmetrics(requests, buckets)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    workdir = tmp_path_factory.mktemp("prometheus-slo")
    with backfilled_prometheus(workdir, openmetrics(int(time.time()))) as server:
        yield server


def canary(service: str) -> CanaryObject:
    slo: dict[str, object] = {"availabilityPct": 99, "window": "1d", "budgetPolicy": {}}
    if service == "a80":
        slo["latency"] = {"thresholdMs": 250, "targetPct": 99}
    spec = parse_spec(
        {
            "service": service,
            "stable": {"deployment": service},
            "canary": {"deployment": f"{service}-canary"},
            "analysis": {"slo": slo},
        }
    )
    return CanaryObject(
        ref=CanaryRef("shop", service),
        spec=spec,
        spec_error=None,
        status=CanaryStatus(),
        commands=(),
        resource_version="1",
        generation=1,
        uid=f"u-{service}",
        raw={},
    )


@pytest.fixture
def hub() -> StatusHub:
    hub = StatusHub()
    for service in ERRORS:
        hub.update(canary(service))
    return hub


async def test_budgets_tiers_and_metrics_from_history(
    prometheus: PrometheusServer, hub: StatusHub
) -> None:
    source = PrometheusMetrics(PrometheusSettings(url=prometheus.url, timeout_s=20.0))
    try:
        monitor = SloMonitor(source, hub, timeout_s=30.0)
        slos = {s.service: s for s in await monitor.refresh()}
    finally:
        source.close()
    assert set(slos) == set(ERRORS) and monitor.failures == 0
    expected = {
        "a80": (0.8, Tier.NORMAL),
        "b30": (0.3, Tier.APPROVAL),
        "c10": (0.1, Tier.OVERRIDE),
        "dneg": (-0.05, Tier.FROZEN),
        "fast": (1 - 15 / 24, Tier.FROZEN),
    }
    for service, (remaining, tier) in expected.items():
        availability = slos[service].objectives["availability"]
        assert availability.budget_remaining == pytest.approx(remaining, abs=0.02), service
        assert slos[service].decision.tier is tier, (service, slos[service].decision.reason)
    fast = slos["fast"].objectives["availability"]
    assert fast.burn_rates[3600.0] == pytest.approx(15.0, rel=0.05)
    assert fast.burn_rates[300.0] == pytest.approx(15.0, rel=0.05)
    assert [p.label for p in fast.firing] == ["1h&5m"]
    assert "fast burn 1h&5m" in slos["fast"].decision.reason
    assert "budget exhausted" in slos["dneg"].decision.reason
    latency = slos["a80"].objectives["latency"]
    assert latency.budget_remaining == pytest.approx(0.6, abs=0.03)

    registry = CollectorRegistry()
    registry.register(HubCollector(hub, lambda: True))
    text = generate_latest(registry).decode()
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("slo_error_budget_remaining{")
        and 'service="c10"' in ln
        and 'objective="availability"' in ln
    )
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(0.1, abs=0.02)
    assert (
        'slo_error_budget_burn_rate{namespace="shop",objective="availability",service="fast",window="1h"}'
        in text
    )
    assert 'canaryd_slo_policy_tier{namespace="shop",service="fast",tier="frozen"} 1.0' in text
    assert 'slo_availability{namespace="shop",objective="latency",service="a80"}' in text

    app = create_app(hub, lambda *_: None, ApiSettings())  # type: ignore[arg-type]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as http:
        rows = (await http.get("/api/v1/slos", params={"namespace": "shop"})).json()
    assert [r["service"] for r in rows] == sorted(ERRORS)
    by_service = {r["service"]: r for r in rows}
    assert by_service["b30"]["tier"] == "approval" and by_service["b30"]["enforced"] is True
    assert by_service["fast"]["objectives"]["availability"]["firing"] == ["1h&5m"]


async def test_a_failed_read_keeps_the_last_figures(hub: StatusHub) -> None:
    source = PrometheusMetrics(PrometheusSettings(url="http://127.0.0.1:9", timeout_s=1.0))
    try:
        monitor = SloMonitor(source, hub, timeout_s=2.0)
        assert await monitor.refresh() == []
    finally:
        source.close()
    assert monitor.failures == 1 and hub.slos == {}


async def test_a_new_service_is_read_at_once_not_at_the_next_refresh(
    prometheus: PrometheusServer,
) -> None:
    hub = StatusHub()
    source = PrometheusMetrics(PrometheusSettings(url=prometheus.url, timeout_s=20.0))
    monitor = SloMonitor(source, hub, refresh_s=3600.0, timeout_s=30.0, check_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    try:
        await asyncio.sleep(0.2)  # the first read found no services
        assert hub.slos == {}
        hub.update(canary("b30"))
        async with asyncio.timeout(10):
            while ("shop", "b30") not in hub.slos:
                await asyncio.sleep(0.02)
        assert monitor.unread() == []
    finally:
        stop.set()
        await task
        source.close()
    assert hub.slos["shop", "b30"].decision.tier is Tier.APPROVAL


async def test_early_reads_back_off_while_prometheus_fails(hub: StatusHub) -> None:
    source = PrometheusMetrics(PrometheusSettings(url="http://127.0.0.1:9", timeout_s=1.0))
    monitor = SloMonitor(source, hub, refresh_s=0.8, timeout_s=2.0, check_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    try:
        await asyncio.sleep(1.6)
    finally:
        stop.set()
        await task
        source.close()
    # every 50 ms would be ~30 reads; doubling from 0.1 s to 0.8 s is 0, .1, .3, .7, 1.5
    # (fewer on a loaded machine, where each failed read's own retries take longer)
    assert 1 <= monitor.failures <= 6, monitor.failures
    assert monitor.last_error is not None


def test_unknown_figures_gate_a_rollout_as_the_override_tier(hub: StatusHub) -> None:
    source = PrometheusMetrics(PrometheusSettings(url="http://127.0.0.1:9", timeout_s=1.0))
    none: Any = None
    try:
        daemon = Daemon(none, source, none, none, hub=hub)
        spec = canary("b30").spec
        assert spec is not None and daemon.slo_monitor is not None
        ref = CanaryRef("shop", "b30")
        gate = daemon._budget(ref, spec)
        assert gate is not None and gate.tier is Tier.OVERRIDE
        assert gate.reason == "b30's error budget is unknown: not read yet"
        daemon.slo_monitor.last_error = "Prometheus unreachable"
        gate = daemon._budget(ref, spec)
        assert gate is not None and "reading them failed: Prometheus unreachable" in gate.reason
        without = Daemon(none, cast(Any, object()), none, none, hub=hub)
        gate = without._budget(ref, spec)
        assert gate is not None and "cannot read error budgets" in gate.reason
    finally:
        source.close()
    no_policy = parse_spec({"service": "b30", "analysis": {"slo": {"availabilityPct": 99}}})
    assert daemon._budget(ref, no_policy) is None


def test_canaries_of_one_service_share_its_objectives(tmp_path: Path) -> None:
    first, second = canary("b30"), canary("b30")
    second = CanaryObject(
        ref=CanaryRef("shop", "b30-second"),
        spec=second.spec,
        spec_error=None,
        status=CanaryStatus(),
        commands=(),
        resource_version="1",
        generation=1,
        uid="u2",
        raw={},
    )
    services = slo_services([second, first, canary("a80")])
    assert [(s.namespace, s.service) for s in services] == [("shop", "a80"), ("shop", "b30")]
    assert services[1].arms == ("b30", "b30-canary")


# -- canaryd slo ---------------------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def canary_resource(service: str) -> dict[str, object]:
    spec = canary(service).spec
    assert spec is not None
    return {
        "apiVersion": "canaryd.io/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": service, "namespace": "shop"},
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def test_canaryd_slo_reads_the_clusters_services_from_prometheus(
    prometheus: PrometheusServer, kubeapi: KubeApiServer, tmp_path: Path
) -> None:
    api = kubeapi.api_client()
    try:
        objects = k8s.CustomObjectsApi(api)
        for service in ERRORS:
            objects.create_namespaced_custom_object(
                "canaryd.io", "v1alpha1", "shop", "canaries", canary_resource(service)
            )
    finally:
        api.close()
    kubeconfig = kubeapi.write_kubeconfig(tmp_path / "kubeconfig", namespace="shop")
    flags = ["--kubeconfig", str(kubeconfig), "--prometheus-url", prometheus.url]
    code, out, err = run_cli("slo", *flags, "--json")
    assert code == 0, err
    rows = {r["service"]: r for r in json.loads(out)}
    assert set(rows) == set(ERRORS)
    assert rows["c10"]["tier"] == "override"
    budget = rows["dneg"]["objectives"]["availability"]["error_budget_remaining"]
    assert budget == pytest.approx(-0.05, abs=0.02)
    code, out, err = run_cli("slo", *flags, "-v")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAMESPACE", "SERVICE", "OBJECTIVE"]
    fast = next(line for line in lines if line.startswith("shop") and " fast " in line)
    assert "1h&5m" in fast and fast.rstrip().endswith("frozen")
    assert any(line.startswith("shop/b30: availability SLO 99%") for line in lines)
    code, _, err = run_cli("slo", "--kubeconfig", str(kubeconfig))
    assert code == 2 and "give --prometheus-url" in err and err.count("\n") == 1

    # canaryd status shows each Canary's budget beside it, and every figure for one
    code, out, err = run_cli("status", *flags)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("shop/c10 "))
    assert "budget 10% left (override)" in line or "budget 9." in line, line
    code, out, err = run_cli("status", "b30", *flags)
    assert code == 0, err
    assert "  error budget of b30: tier approval (enforced)" in out
    availability = next(ln for ln in out.splitlines() if ln.startswith("    availability: "))
    assert "(objective 99%)" in availability and "of the budget left; burn 5m" in availability
    assert "policy: availability SLO 99%" in out
    code, out, err = run_cli("status", "fast", *flags, "--json")
    assert code == 0, err
    [row] = json.loads(out)
    assert row["slo"]["tier"] == "frozen"
    assert row["slo"]["objectives"]["availability"]["firing"] == ["1h&5m"]
    # without a source the Canaries are still shown, with one line saying how to see more
    code, out, err = run_cli("status", "--kubeconfig", str(kubeconfig))
    assert code == 0, err
    assert "shop/b30 " in out and "budget" not in out.split("(")[0]
    assert out.rstrip().endswith(
        "(error budgets: give --prometheus-url URL (or --server URL) to show them)"
    )
    code, out, err = run_cli(
        "status", "--kubeconfig", str(kubeconfig), "--prometheus-url", "http://127.0.0.1:9",
        "--request-timeout", "2s",
    )  # fmt: skip
    assert code == 0, err
    assert "(error budgets not read: the SLO figures could not be read: Prometheus" in out
    code, _, err = run_cli(
        "slo", "--kubeconfig", str(kubeconfig), "--prometheus-url", "http://127.0.0.1:9",
        "--request-timeout", "2s",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "the SLO figures could not be read: Prometheus at http://127.0.0.1:9" in err


async def test_canaryd_slo_asks_a_running_canaryd_with_server(
    prometheus: PrometheusServer, hub: StatusHub
) -> None:
    source = PrometheusMetrics(PrometheusSettings(url=prometheus.url, timeout_s=20.0))
    try:
        await SloMonitor(source, hub, timeout_s=30.0).refresh()
    finally:
        source.close()
    app = create_app(hub, lambda *_: None, ApiSettings())  # type: ignore[arg-type]
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.create_task(serve_threaded(app, sock, stop, lambda: None))
    try:
        code, out, err = await asyncio.to_thread(
            run_cli, "slo", "--server", f"http://127.0.0.1:{port}", "-n", "shop", "--json"
        )
        status = await asyncio.to_thread(
            run_cli, "status", "--server", f"http://127.0.0.1:{port}", "-n", "shop"
        )
    finally:
        stop.set()
        await server
    assert code == 0, err
    rows = json.loads(out)
    assert [r["service"] for r in rows] == sorted(ERRORS)
    assert {r["service"]: r["tier"] for r in rows}["b30"] == "approval"
    code, out, err = status
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("shop/b30 "))
    assert "budget 3" in line and "% left (approval)" in line, line
