"""The controller's own Prometheus metrics (``/metrics`` on the API port).

Two sources, one exposition:

* process-wide instruments in :data:`REGISTRY` (reconcile durations, metric queries,
  Kubernetes requests, rollout durations): bounded label sets, no per-Canary labels;
* per-Canary series from the :class:`~canaryd.hub.StatusHub`, computed at scrape time by
  :class:`HubCollector` (weight, phase, step, e-values, decision and rollout counters,
  and each arm's error ratio and p99 latency over the last interval of a rollout under
  way): a deleted Canary leaves the hub, so its series leave ``/metrics`` with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from analysis.budget import Tier, window_label
from analysis.counts import ArmCounts
from analysis.histogram import histogram_quantile
from canaryd.status import Phase

if TYPE_CHECKING:
    from canaryd.hub import StatusHub

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILE_SECONDS = Histogram(
    "canaryd_reconcile_duration_seconds",
    "Wall time of one reconcile of one Canary (reads, analysis, writes).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
ROLLOUT_SECONDS = Histogram(
    "canaryd_rollout_duration_seconds",
    "From the first step to the end of a rollout, by outcome.",
    ["outcome"],
    buckets=(60, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400),
    registry=REGISTRY,
)
METRIC_QUERIES = Counter(
    "canaryd_metric_queries",
    "Observations asked of the metrics source, by result (ok, error, timeout).",
    ["result"],
    registry=REGISTRY,
)
KUBE_REQUESTS = Counter(
    "canaryd_kube_requests",
    "Kubernetes API calls by verb and HTTP status (0: no answer).",
    ["verb", "code"],
    registry=REGISTRY,
)

_PHASES = tuple(Phase)


class HubCollector(Collector):
    """Per-Canary metrics, read from the hub at scrape time."""

    def __init__(self, hub: StatusHub, leader: Callable[[], bool]) -> None:
        self.hub = hub
        self.leader = leader

    def collect(self) -> Iterator[Metric]:
        labels = ["namespace", "name"]
        weight = GaugeMetricFamily(
            "canaryd_canary_weight", "Canary traffic, percent (status.canaryWeight).", labels=labels
        )
        phase = GaugeMetricFamily(
            "canaryd_canary_phase", "1 for the Canary's phase, 0 for the others.",
            labels=[*labels, "phase"],
        )  # fmt: skip
        step = GaugeMetricFamily(
            "canaryd_canary_step", "Index of the current step (0-based).", labels=labels
        )
        evalue = GaugeMetricFamily(
            "canaryd_analysis_evalue",
            "E-value of each check in the last verdict (evidence against the canary).",
            labels=[*labels, "check"],
        )
        decisions = CounterMetricFamily(
            "canaryd_decisions",
            "Verdicts made by this replica, by decision and deciding check.",
            labels=[*labels, "decision", "check"],
        )
        rollouts = CounterMetricFamily(
            "canaryd_rollouts",
            "Rollouts ended by this replica, by outcome (Succeeded, RolledBack, Failed).",
            labels=[*labels, "outcome"],
        )
        error_ratio = GaugeMetricFamily(
            "canaryd_arm_error_ratio",
            "Errors / requests of each arm (canary, stable) over the last interval of the "
            "rollout under way; absent with no requests.",
            labels=[*labels, "arm"],
        )
        p99 = GaugeMetricFamily(
            "canaryd_arm_latency_p99_seconds",
            "99th-percentile latency of each arm (canary, stable) over the last interval of "
            "the rollout under way, from its histogram; absent with no latency data.",
            labels=[*labels, "arm"],
        )
        acting = self.leader()
        with self.hub.lock:  # the daemon's loop writes meanwhile
            # only the acting replica observes: another's last interval would be stale
            for ref, canary_arm, stable_arm in self.hub.latest_intervals() if acting else ():
                for arm, arm_counts in (("canary", canary_arm), ("stable", stable_arm)):
                    key = [ref.namespace, ref.name, arm]
                    ratio, latency = _error_ratio(arm_counts), _p99_seconds(arm_counts)
                    if ratio is not None:
                        error_ratio.add_metric(key, ratio)
                    if latency is not None:
                        p99.add_metric(key, latency)
            for summary in self.hub.summaries():
                key = [summary.namespace, summary.name]
                weight.add_metric(key, summary.canary_weight)
                step.add_metric(key, summary.step_index)
                for p in _PHASES:
                    phase.add_metric([*key, str(p)], 1.0 if summary.phase is p else 0.0)
            for ref in self.hub.refs():
                canary = self.hub.get(ref)
                verdict = canary.status.last_verdict if canary else None
                for check in verdict.checks if verdict else ():
                    if check.e_value is not None:
                        evalue.add_metric([ref.namespace, ref.name, check.name], check.e_value)
            for ref, counts in self.hub.decisions.items():
                for (decision, deciding), n in counts.items():
                    decisions.add_metric([ref.namespace, ref.name, decision, deciding], n)
            for ref, outcomes in self.hub.rollouts.items():
                for outcome, n in outcomes.items():
                    rollouts.add_metric([ref.namespace, ref.name, outcome], n)
        yield from self._slo()
        leader = GaugeMetricFamily(
            "canaryd_leader", "1 when this replica acts (leads, or runs alone), else 0."
        )
        leader.add_metric([], 1.0 if acting else 0.0)
        dropped = CounterMetricFamily(
            "canaryd_api_events_dropped",
            "Events not delivered to stream subscribers that fell behind (they resume).",
        )
        dropped.add_metric([], self.hub.dropped)
        subscribers = GaugeMetricFamily(
            "canaryd_api_event_subscribers", "Open /api/v1/events streams."
        )
        subscribers.add_metric([], self.hub.subscribers)
        yield from (weight, phase, step, evalue, decisions, rollouts, error_ratio, p99)
        yield from (leader, dropped, subscribers)

    def _slo(self) -> Iterator[Metric]:
        """Every service's SLO figures (``canaryd.slo``), by service and objective."""
        labels = ["namespace", "service", "objective"]
        availability = GaugeMetricFamily(
            "slo_availability",
            "Good / total events over the SLO's compliance window.",
            labels=labels,
        )
        remaining = GaugeMetricFamily(
            "slo_error_budget_remaining",
            "Fraction of the error budget left over the compliance window (negative: overspent).",
            labels=labels,
        )
        burn = GaugeMetricFamily(
            "slo_error_budget_burn_rate",
            "Bad-event ratio over the window, in units of the budget's (1: spends it exactly).",
            labels=[*labels, "window"],
        )
        objective = GaugeMetricFamily(
            "slo_objective", "The objective, as a fraction of good events.", labels=labels
        )
        tier = GaugeMetricFamily(
            "canaryd_slo_policy_tier",
            "1 for the release-policy tier the error budget puts the service in.",
            labels=["namespace", "service", "tier"],
        )
        with self.hub.lock:
            slos = list(self.hub.slos.values())
        for slo in slos:
            for name, figures in slo.objectives.items():
                key = [slo.namespace, slo.service, name]
                objective.add_metric(key, figures.objective)
                if figures.availability is not None:
                    availability.add_metric(key, figures.availability)
                if figures.budget_remaining is not None:
                    remaining.add_metric(key, figures.budget_remaining)
                for window_s, rate in figures.burn_rates.items():
                    if rate is not None:
                        burn.add_metric([*key, window_label(window_s)], rate)
            for t in Tier:
                tier.add_metric(
                    [slo.namespace, slo.service, str(t)], 1.0 if slo.decision.tier is t else 0.0
                )
        yield from (availability, remaining, burn, objective, tier)


def _error_ratio(counts: ArmCounts) -> float | None:
    """Errors / requests of an interval's counts; None with no requests."""
    if counts.requests <= 0:
        return None
    ratio = counts.errors / counts.requests
    return ratio if math.isfinite(ratio) else None


def _p99_seconds(counts: ArmCounts) -> float | None:
    """The p99 latency of an interval's counts, seconds; None without latency data."""
    if not counts.latency_buckets:
        return None
    ms = histogram_quantile(0.99, counts.latency_buckets)
    return ms / 1000.0 if math.isfinite(ms) else None


def exposition(hub_registry: CollectorRegistry) -> bytes:
    """The text exposition of the process-wide and the per-Canary metrics."""
    return generate_latest(REGISTRY) + generate_latest(hub_registry)


def kube_verb(method_name: str) -> str:
    """The Kubernetes verb of a client method (``patch_namespaced_...`` → ``patch``)."""
    head = method_name.split("_", 1)[0]
    return {"replace": "update", "read": "get"}.get(head, head)
