"""The API of a running daemon (the playground: the Kubernetes API double, simulated
traffic, compressed real time): /metrics after real rollouts, probes, and the
OpenAPI schema fuzzed by schemathesis."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from canaryd.api import ApiSettings, Identity, Role, TokenStore, create_app
from canaryd.hub import StatusHub
from canaryd.kube import to_canary
from canaryd.playground import NAMESPACE, Playground, Sample
from canaryd.ports import CanaryRef
from canaryd.status import Phase
from tests.test_api import OPERATOR, Recorder, raw, waiting

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


SAMPLES = (
    Sample("checkout", "healthy", "healthy"),
    Sample("payments", "error-spike", "errors"),
)


async def _until(predicate: Callable[[], bool], timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)


def _value(text: str, metric: str, **labels: str) -> float:
    """The sample of ``metric`` whose labels include ``labels`` (NaN when none)."""
    for line in text.splitlines():
        if not line.startswith(metric + "{") and not line.startswith(metric + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return math.nan


async def test_metrics_after_simulated_rollouts_and_a_deleted_canary_leaves_them() -> None:
    pg = Playground(
        host="127.0.0.1",
        port=0,
        speed=60,
        interval_s=1.0,
        restart_after_s=3600,
        step_intervals=3,
        samples=SAMPLES,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(pg.run(stop))
    try:

        def phase(name: str) -> Phase | None:
            canary = pg.hub.get(CanaryRefOf(name))
            return canary.status.phase if canary else None

        await _until(
            lambda: phase("checkout") is Phase.SUCCEEDED and phase("payments") is Phase.ROLLED_BACK,
            60,
        )
        async with httpx.AsyncClient(base_url=pg.url, timeout=10) as http:
            text = (await http.get("/metrics")).text
            ns = NAMESPACE
            # promoted by copying to stable: all traffic back on the (new) stable
            assert _value(text, "canaryd_canary_weight", namespace=ns, name="checkout") == 0
            assert _value(text, "canaryd_canary_weight", namespace=ns, name="payments") == 0
            assert _value(text, "canaryd_canary_phase", name="payments", phase="RolledBack") == 1
            assert _value(text, "canaryd_canary_phase", name="payments", phase="Progressing") == 0
            assert _value(text, "canaryd_canary_step", namespace=ns, name="checkout") == 2
            assert _value(text, "canaryd_analysis_evalue", name="payments", check="errors") > 1
            assert _value(text, "canaryd_decisions_total", name="payments", decision="rollback",
                          check="errors") == 1  # fmt: skip
            assert _value(text, "canaryd_decisions_total", name="checkout", decision="pass") >= 3
            assert _value(text, "canaryd_rollouts_total", name="checkout", outcome="Succeeded") == 1
            assert (
                _value(text, "canaryd_rollouts_total", name="payments", outcome="RolledBack") == 1
            )
            assert _value(text, "canaryd_rollout_duration_seconds_count", outcome="Succeeded") >= 1
            assert _value(text, "canaryd_reconcile_duration_seconds_count") > 10
            assert _value(text, "canaryd_metric_queries_total", result="ok") > 10
            assert _value(text, "canaryd_kube_requests_total", verb="update", code="200") > 5
            assert _value(text, "canaryd_leader") == 1
            ready = await http.get("/readyz")
            assert ready.status_code == 200
            assert ready.json() | {"canaries": 2} == {
                "ready": True, "role": "single", "kubernetes": "reachable", "canaries": 2,
            }  # fmt: skip
            series = (await http.get(f"/api/v1/canaries/{ns}/checkout/series")).json()
            weights = [p["canaryWeight"] for p in series["points"]]
            assert weights == sorted(weights) and {10, 50, 100} <= set(weights)
            assert all(p["canary"]["requests"] >= 0 for p in series["points"])
            # deleted: its series leave /metrics
            pg.server.delete_raw("canaryd.io", "v1alpha1", "canaries", ns, "payments")
            await _until(lambda: phase("payments") is None, 10)
            text = (await http.get("/metrics")).text
            assert 'name="payments"' not in text
            assert _value(text, "canaryd_canary_weight", name="checkout") == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def CanaryRefOf(name: str) -> CanaryRef:  # noqa: N802 - reads like the type

    return CanaryRef(NAMESPACE, name)


# -- the OpenAPI schema, fuzzed ---------------------------------------------------------------


def _app() -> object:
    hub = StatusHub()
    hub.update(to_canary(raw("cart", waiting())))
    tokens = TokenStore.of((OPERATOR, Identity("alice", Role.OPERATOR)))
    return create_app(hub, Recorder(), ApiSettings(tokens=tokens))


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.exclude(path="/api/v1/events").parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_schema_and_none_is_a_5xx(case: Any) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {OPERATOR}"})
