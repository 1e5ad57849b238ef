"""The expected-traffic path: a scenario played with no randomness at all.

:class:`ExpectedSimulation` serves every interval's *expected* requests, errors and
latency buckets (cumulative counters rounded to the nearest whole request, so they stay
monotonic integers as Prometheus counters are) instead of drawing them.  Driven by the
real state machine and analysis, it traces the rollout a typical run follows: the
fluid approximation ``canaryd plan`` predicts from (its medians are checked against
Monte Carlo runs of :class:`~simulator.engine.Simulation` in the test suite).

Noise keeps its first two moments, deterministically, so the engine's dispersion
estimate sees what it would see on average:

* each arm's error-rate multiplier takes two values with mean 1 and variance
  ``error_cv²`` (``1 ± cv`` in alternate periods, the arms in opposite phase; for
  ``cv > 1``, 0 in a share ``cv²/(1+cv²)`` of periods and ``1 + cv²`` in the others);
* a client's bursts arrive at their mean rate with their mean size, each on the arm
  whose share of bursts is furthest behind its traffic share.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import numpy.typing as npt

from simulator.engine import Simulation
from simulator.scenario import Scenario
from simulator.traffic import Behaviour

FloatArray = npt.NDArray[np.float64]

_STABLE, _CANARY = 0, 1


def two_point_multiplier(cv: float, period: int, arm: int) -> float:
    """A deterministic stand-in for a Gamma(mean 1, CV ``cv``) draw: over many periods
    its values have mean 1 and variance ``cv²`` exactly."""
    if cv <= 0.0:
        return 1.0
    if cv <= 1.0:
        return 1.0 + cv if (period + arm) % 2 == 0 else 1.0 - cv
    zero_share = cv * cv / (1.0 + cv * cv)
    # a low-discrepancy sequence: the zero periods spread evenly, different per arm
    position = (period * 0.6180339887498949 + 0.5 * arm) % 1.0
    return 0.0 if position < zero_share else 1.0 + cv * cv


class ExpectedSimulation(Simulation):
    """:class:`Simulation` with every draw replaced by its expectation (see module)."""

    def __init__(
        self, scenario: Scenario, seed: int | np.random.Generator = 0, start_s: float = 0.0
    ) -> None:
        super().__init__(scenario, seed, start_s)  # the seed draws nothing here
        self._requests_f: FloatArray = np.zeros(2)
        self._errors_f: FloatArray = np.zeros(2)
        self._buckets_f: FloatArray = np.zeros_like(self._buckets, dtype=np.float64)
        self._bursts_due = 0.0  # expected bursts not yet served
        self._burst_share = np.zeros(2)  # bursts served per arm, and their traffic share

    def fork(self, scenario: Scenario) -> ExpectedSimulation:
        """A copy of this simulation, now and with all it has served, that plays
        ``scenario`` from here on (the same traffic and noise, with other events)."""
        twin = copy.deepcopy(self)
        twin.scenario = scenario
        twin._change_points = scenario.change_points()
        twin._behaviours = {}
        return twin

    def _serve(self, start_s: float, end_s: float) -> None:
        expected = self.scenario.expected_requests(start_s, end_s)
        if expected <= 0.0:
            return
        weight = self.mesh.canary_weight_pct / 100.0
        mirrored = expected * (1.0 - weight) * self.mesh.mirror_pct / 100.0  # copies
        served = np.array([expected * (1.0 - weight), expected * weight + mirrored])
        behaviours = (
            self._behaviour_at(self.stable_runs, start_s),
            self._behaviour_at("canary", start_s),
        )
        rates = np.array([b.error_rate for b in behaviours])
        noise = self._noise
        if noise is not None and noise.error_cv > 0:
            period = math.floor(start_s / noise.period_s)
            factors = [two_point_multiplier(noise.error_cv, period, arm) for arm in (0, 1)]
            rates = np.minimum(rates * np.array(factors), 1.0)
        self._add(served, served * rates, behaviours)
        if noise is not None and noise.bursts_per_hour > 0:
            self._expected_bursts(start_s, end_s, weight, behaviours)
        self._round()

    def _add(
        self, served: FloatArray, errors: FloatArray, behaviours: tuple[Behaviour, ...]
    ) -> None:
        self._requests_f += served
        self._errors_f += errors
        for arm, behaviour in ((_STABLE, behaviours[0]), (_CANARY, behaviours[1])):
            if served[arm] > 0:
                self._buckets_f[arm] += np.cumsum(behaviour.bucket_probabilities()) * served[arm]

    def _expected_bursts(
        self, start_s: float, end_s: float, weight: float, behaviours: tuple[Behaviour, ...]
    ) -> None:
        noise = self._noise
        assert noise is not None
        self._bursts_due += noise.bursts_per_hour * (end_s - start_s) / 3600.0
        while self._bursts_due >= 1.0:
            self._bursts_due -= 1.0
            shares = np.array([1.0 - weight, weight])
            self._burst_share += shares
            arm = int(np.argmax(self._burst_share))  # the arm furthest behind its share
            self._burst_share[arm] -= 1.0
            size = np.zeros(2)
            size[arm] = noise.burst_errors
            self._add(size, size, behaviours)

    def _round(self) -> None:
        """Integer counters: the float sums rounded (monotonic, as the sums are)."""
        self._requests = np.rint(self._requests_f).astype(np.int64)
        self._errors = np.minimum(np.rint(self._errors_f).astype(np.int64), self._requests)
        buckets = np.rint(self._buckets_f).astype(np.int64)
        buckets[:, -1] = self._requests
        self._buckets = np.minimum(buckets, self._requests[:, None])
