"""The per-arm gauges of ``/metrics``: each arm's error ratio and p99 latency over the
last interval of a rollout under way, read from the hub at scrape time."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from analysis.counts import N_BUCKETS, ArmCounts, Observation
from analysis.histogram import histogram_quantile
from canaryd.hub import StatusHub
from canaryd.kube import to_canary
from canaryd.metrics import HubCollector
from canaryd.ports import CanaryRef
from canaryd.status import CanaryStatus, Phase
from tests.conftest import NS, canary

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
ERRORS = "canaryd_arm_error_ratio"
P99 = "canaryd_arm_latency_p99_seconds"


def put(hub: StatusHub, name: str, phase: Phase, revision: str, version: int = 1) -> CanaryRef:
    obj: dict[str, Any] = copy.deepcopy(canary(name))
    obj["metadata"] |= {"resourceVersion": str(version), "uid": f"uid-{name}"}
    status = CanaryStatus(phase=phase, revision=revision, canary_weight=10)
    obj["status"] = status.to_json()
    hub.update(to_canary(obj))
    return CanaryRef(NS, name)


def buckets(requests: int, fast_share: float) -> tuple[int, ...]:
    """Cumulative buckets: ``fast_share`` of the requests at most 25 ms (edge 4), the
    rest at most 250 ms (edge 7)."""
    fast = round(requests * fast_share)
    return tuple(0 if i < 4 else fast if i < 7 else requests for i in range(N_BUCKETS))


def rounds(
    hub: StatusHub, ref: CanaryRef, revision: str, *arms: tuple[ArmCounts, ArmCounts]
) -> None:
    """One round per (canary, stable) cumulative counts, a minute apart."""
    for i, (canary_arm, stable_arm) in enumerate(arms):
        hub.round(
            ref, T0 + timedelta(minutes=i), revision=revision, weight=10, step_index=0,
            observation=Observation(stable=stable_arm, canary=canary_arm), verdict=None,
        )  # fmt: skip


def scrape(hub: StatusHub, leader: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(HubCollector(hub, lambda: leader))
    return registry


def value(registry: CollectorRegistry, metric: str, name: str, arm: str) -> float | None:
    labels = {"namespace": NS, "name": name, "arm": arm}
    return registry.get_sample_value(metric, labels)


def test_the_last_interval_of_each_arm_is_exported_in_base_units() -> None:
    hub = StatusHub()
    ref = put(hub, "checkout", Phase.PROGRESSING, "v2")
    rounds(
        hub, ref, "v2",
        (ArmCounts(100, 1, buckets(100, 0.9)), ArmCounts(1000, 5, buckets(1000, 0.9))),
        (ArmCounts(300, 5, buckets(300, 0.5)), ArmCounts(3000, 15, buckets(3000, 0.95))),
        (ArmCounts(700, 25, buckets(700, 0.5)), ArmCounts(5000, 20, buckets(5000, 0.95))),
    )  # fmt: skip
    registry = scrape(hub)
    # the last interval only: 400 canary requests with 20 errors, 2000 stable with 5
    assert value(registry, ERRORS, "checkout", "canary") == pytest.approx(20 / 400)
    assert value(registry, ERRORS, "checkout", "stable") == pytest.approx(5 / 2000)
    delta = tuple(a - b for a, b in zip(buckets(700, 0.5), buckets(300, 0.5), strict=True))
    expected_ms = histogram_quantile(0.99, delta)
    assert 25 < expected_ms <= 250
    assert value(registry, P99, "checkout", "canary") == pytest.approx(expected_ms / 1000)
    stable_p99 = value(registry, P99, "checkout", "stable")
    assert stable_p99 is not None and 0.025 < stable_p99 <= 0.25


def test_samples_are_left_out_without_a_figure_a_rollout_or_the_lead() -> None:
    hub = StatusHub()
    # no latency histogram, and a canary arm with no requests in the last interval
    cart = put(hub, "cart", Phase.WAITING_APPROVAL, "v3")
    rounds(
        hub,
        cart,
        "v3",
        (ArmCounts(50, 0), ArmCounts(500, 1)),
        (ArmCounts(50, 0), ArmCounts(900, 3)),
    )
    # one round only: no interval yet
    put(hub, "search", Phase.PROGRESSING, "v2")
    rounds(hub, CanaryRef(NS, "search"), "v2", (ArmCounts(10, 0), ArmCounts(100, 0)))
    # the rollout is over: its last interval is no longer "now"
    done = put(hub, "payments", Phase.PROGRESSING, "v7")
    rounds(
        hub,
        done,
        "v7",
        (ArmCounts(10, 0), ArmCounts(100, 0)),
        (ArmCounts(90, 9), ArmCounts(900, 1)),
    )
    registry = scrape(hub)
    assert value(registry, ERRORS, "payments", "canary") == pytest.approx(9 / 80)
    put(hub, "payments", Phase.ROLLED_BACK, "v7", version=2)

    registry = scrape(hub)
    assert value(registry, ERRORS, "cart", "canary") is None  # 0 requests
    assert value(registry, ERRORS, "cart", "stable") == pytest.approx(2 / 400)
    assert value(registry, P99, "cart", "canary") is None
    assert value(registry, P99, "cart", "stable") is None
    for name in ("search", "payments"):
        for arm in ("canary", "stable"):
            assert value(registry, ERRORS, name, arm) is None
            assert value(registry, P99, name, arm) is None
    # a standby replica does not observe: whatever it last saw is stale
    assert value(scrape(hub, leader=False), ERRORS, "cart", "stable") is None
    assert scrape(hub, leader=False).get_sample_value("canaryd_leader") == 0.0
