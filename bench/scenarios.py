"""The detection benchmark's scenario suite, built in code.

Every scenario starts from the same base: stable and canary both at 0.5 % errors,
p50 40 ms, p99 180 ms, 100 requests/s, 3600 s; each one changes one thing.  A
:class:`BenchScenario` adds what the benchmark needs to know about it: whether the canary
is healthy (a rollback is then a false rollback) and what counts as a bad request
(errors, or for latency scenarios requests slower than the bucket edge at or above the
stable's true latency quantile).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from statistics import NormalDist

from analysis.counts import LATENCY_EDGES_MS, ArmCounts
from simulator import Event, Latency, Scenario, Traffic, VersionSpec, get_scenario
from simulator.scenario import VersionName
from simulator.traffic import Behaviour

BASE_ERROR_RATE = 0.005
BASE_P50_MS = 40.0
BASE_P99_MS = 180.0
BASE_RPS = 100.0
DURATION_S = 3600.0


@dataclass(frozen=True, slots=True)
class BenchScenario:
    """A scenario of the suite and how the benchmark scores it.

    Attributes:
        key: short name, used on the command line (``--scenarios``).
        title: how tables and charts name it.
        scenario: what the simulator plays.
        healthy: True when the canary is not at fault (a rollback is a false rollback).
        latency_quantile: for latency scenarios, the quantile (0.99 or 0.5) whose stable
            value, rounded up to a bucket edge, separates slow (bad) requests; ``None``
            when bad requests are errors only.
    """

    key: str
    title: str
    scenario: Scenario
    healthy: bool
    latency_quantile: float | None = None
    #: Index in ``LATENCY_EDGES_MS`` of the edge at or above the stable's true quantile
    #: at 0 s, or ``None`` when bad requests are errors (derived, not passed).
    slow_edge_index: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = None
        if self.latency_quantile is not None:
            stable = self.scenario.behaviour_at("stable", 0.0)
            index = slow_edge_index(stable, self.latency_quantile)
        object.__setattr__(self, "slow_edge_index", index)

    @property
    def slow_edge_ms(self) -> float | None:
        """The slow-request threshold in ms, or ``None`` when bad requests are errors."""
        index = self.slow_edge_index
        return None if index is None else LATENCY_EDGES_MS[index]

    def bad_events(self, counts: ArmCounts) -> int:
        """The oracle's bad events in ``counts``: slow requests, or errors."""
        index = self.slow_edge_index
        if index is None:
            return counts.errors
        return slow_requests(counts, index)

    def bad_requests(self, counts: ArmCounts) -> int:
        """Requests the benchmark counts as harm: errors, plus slow ones in latency scenarios."""
        index = self.slow_edge_index
        if index is None:
            return counts.errors
        return counts.errors + slow_requests(counts, index)

    def bad_rate(self, version: VersionName, t_s: float) -> float:
        """True probability that a request of ``version`` at ``t_s`` is a bad event."""
        behaviour = self.scenario.behaviour_at(version, t_s)
        index = self.slow_edge_index
        if index is None:
            return behaviour.error_rate
        return float(behaviour.bucket_probabilities()[index + 1 :].sum())

    def bad_ratio(self, t_s: float) -> float:
        """True canary/stable bad-event rate ratio at ``t_s`` (``inf`` if stable's is 0)."""
        stable = self.bad_rate("stable", t_s)
        canary = self.bad_rate("canary", t_s)
        if stable <= 0.0:
            return math.inf if canary > 0.0 else 1.0
        return canary / stable


def slow_edge_index(behaviour: Behaviour, quantile: float) -> int:
    """Index of the first bucket edge at or above ``behaviour``'s true ``quantile``."""
    mu, sigma = behaviour.lognormal_params()
    value_ms = math.exp(mu + sigma * NormalDist().inv_cdf(quantile))
    # Guard against the log-normal round trip landing a hair above an exact edge.
    value_ms *= 1.0 - 1e-12
    index = bisect.bisect_left(LATENCY_EDGES_MS, value_ms)
    if index >= len(LATENCY_EDGES_MS):
        raise ValueError(f"the {quantile} quantile ({value_ms:g} ms) is above every bucket edge")
    return index


def slow_requests(counts: ArmCounts, edge_index: int) -> int:
    """Requests in ``counts`` slower than ``LATENCY_EDGES_MS[edge_index]``."""
    if not counts.latency_buckets:
        return 0
    return counts.latency_buckets[-1] - counts.latency_buckets[edge_index]


def _version(
    error_rate: float = BASE_ERROR_RATE, p50_ms: float = BASE_P50_MS, p99_ms: float = BASE_P99_MS
) -> VersionSpec:
    return VersionSpec(error_rate=error_rate, latency_ms=Latency(p50=p50_ms, p99=p99_ms))


def _scenario(
    name: str,
    description: str,
    *,
    canary: VersionSpec | None = None,
    rps: float = BASE_RPS,
    events: tuple[Event, ...] = (),
) -> Scenario:
    return Scenario(
        name=name,
        description=description,
        duration_s=DURATION_S,
        traffic=Traffic(rps=rps),
        stable=_version(),
        canary=_version() if canary is None else canary,
        events=events,
    )


def _healthy(rps: float) -> BenchScenario:
    key = f"healthy-{rps:g}rps"
    return BenchScenario(
        key, f"healthy, {rps:g} rps", _scenario(key, "canary identical to stable", rps=rps), True
    )


def _errors(factor: float, rps: float = BASE_RPS) -> BenchScenario:
    key = f"errors-x{factor:g}" + ("" if rps == BASE_RPS else f"-{rps:g}rps")
    rate = BASE_ERROR_RATE * factor
    title = f"errors ×{factor:g}" + ("" if rps == BASE_RPS else f", {rps:g} rps")
    description = f"canary errors {rate:.2%} vs stable {BASE_ERROR_RATE:.2%}"
    return BenchScenario(
        key, title, _scenario(key, description, canary=_version(error_rate=rate), rps=rps), False
    )


def _build_suite() -> tuple[BenchScenario, ...]:
    shared = _scenario(
        "shared-incident",
        "both versions' errors jump to 8% from 300 s to 900 s (not the canary's fault)",
        events=(
            Event(at_s=300.0, version="both", error_rate=0.08),
            Event(at_s=900.0, version="both", error_rate=BASE_ERROR_RATE),
        ),
    )
    p99_15 = _scenario(
        "p99-x1.5", "canary p99 270 ms vs 180 ms", canary=_version(p99_ms=BASE_P99_MS * 1.5)
    )
    p99_2 = _scenario(
        "p99-x2", "canary p99 360 ms vs 180 ms", canary=_version(p99_ms=BASE_P99_MS * 2)
    )
    p50_13 = _scenario(
        "p50-x1.3",
        "canary p50 52 ms vs 40 ms, p99 unchanged",
        canary=_version(p50_ms=BASE_P50_MS * 1.3),
    )
    low = _scenario("low-traffic", "canary identical to stable at only 2 rps", rps=2.0)
    gradual = get_scenario("gradual-degradation")
    return (
        _healthy(10.0),
        _healthy(100.0),
        _healthy(1000.0),
        BenchScenario("low-traffic", "healthy, 2 rps (low traffic)", low, True),
        BenchScenario("shared-incident", "shared incident (both 8%)", shared, True),
        _errors(1.5),
        _errors(2.0),
        _errors(5.0),
        _errors(10.0),
        _errors(2.0, rps=1000.0),
        BenchScenario("p99-x1.5", "latency p99 ×1.5", p99_15, False, latency_quantile=0.99),
        BenchScenario("p99-x2", "latency p99 ×2", p99_2, False, latency_quantile=0.99),
        BenchScenario("p50-x1.3", "latency p50 ×1.3", p50_13, False, latency_quantile=0.5),
        BenchScenario("gradual-degradation", "gradual degradation", gradual, False),
        # Overdispersed errors (issue 15): the built-ins, on the same base.
        BenchScenario(
            "bursty-healthy",
            "healthy, bursty errors (CV 0.5)",
            get_scenario("bursty-healthy"),
            True,
        ),
        BenchScenario(
            "client-bursts", "healthy, client bursts", get_scenario("client-bursts"), True
        ),
        BenchScenario(
            "bursty-x2", "errors ×2, bursty (CV 0.5)", get_scenario("bursty-regression"), False
        ),
    )


#: The suite, in the order tables list it.
SUITE: tuple[BenchScenario, ...] = _build_suite()
#: The suite by key.
BY_KEY: dict[str, BenchScenario] = {bench.key: bench for bench in SUITE}
