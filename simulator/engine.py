"""The simulation engine: synthetic traffic, drawn per interval, never per request.

Each call to :meth:`Simulation.advance` covers ``[now_s, now_s + dt_s)`` at the current
traffic split, cut into sub-intervals at the scenario's change points so that every
event takes effect exactly at its ``at_s``.  For each sub-interval ``[a, b)``:

* total requests ~ Poisson(expected requests in ``[a, b)``);
* canary requests ~ Binomial(total, canary_weight_pct / 100), the rest go to stable;
* 5xx errors per arm ~ Binomial(arm requests, arm error rate);
* latency bucket counts per arm ~ Multinomial(arm requests, bucket probabilities),
  drawn independently of the errors;
* with the scenario's ``noise``: each arm's error rate times its own Gamma multiplier
  (mean 1, CV ``error_cv``) for the ``period_s`` it falls in, and Poisson-many bursts of
  failed requests from one client, each on the canary with the canary's weight as
  probability.  The noise has its own random stream, so a scenario without noise draws
  exactly what it drew before noise existed.

Counters accumulate like Prometheus counters: requests, errors and the cumulative
latency histogram (entry ``i`` counts requests at or below ``LATENCY_EDGES_MS[i]``; the
last, ``+Inf``, equals requests).
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Self

import numpy as np
import numpy.typing as npt

from analysis.counts import N_BUCKETS, ArmCounts, Observation
from simulator.clock import VirtualClock
from simulator.mesh import Mesh
from simulator.scenario import Scenario, VersionName
from simulator.traffic import Behaviour

IntArray = npt.NDArray[np.int64]

_STABLE = 0
_CANARY = 1


#: Seconds of stable-only traffic before a rollout starts at t=0 (see ``warmed_up``).
WARMUP_S: float = 600.0


class Simulation:
    """A scenario played in virtual time: the fake of Prometheus and of the mesh.

    Args:
        scenario: what the versions do and how much traffic arrives.
        seed: seed for ``numpy.random.default_rng`` (PCG64), or a ready generator.
        start_s: where the clock starts; negative for a warm-up before the scenario's
            0 s, served with the behaviour and traffic in force at 0 s (a stable that has
            been running before the rollout).

    Attributes:
        scenario: the scenario being played.
        clock: the virtual clock; it starts at ``start_s`` and moves only in :meth:`advance`.
        mesh: the traffic split; the canary weight starts at 0 %.
    """

    def __init__(
        self, scenario: Scenario, seed: int | np.random.Generator = 0, start_s: float = 0.0
    ) -> None:
        self.scenario = scenario
        self.clock = VirtualClock(start_s)
        self.mesh = Mesh()
        self._rng = np.random.default_rng(seed)
        noise = scenario.noise if scenario.noise is not None and scenario.noise.active else None
        self._noise = noise
        self._noise_rng = (
            seed if isinstance(seed, np.random.Generator) else np.random.default_rng((seed, 1))
        )
        # Gamma multipliers per (arm, period index), drawn when first needed.
        self._multipliers: dict[tuple[int, int], float] = {}
        self._stable_runs: VersionName = "stable"
        self._change_points = scenario.change_points()
        # Behaviour per (version, segment between change points): constant within a segment.
        self._behaviours: dict[tuple[VersionName, int], Behaviour] = {}
        # Rows: stable, canary.  Cumulative counters, as Prometheus would report them.
        self._requests: IntArray = np.zeros(2, dtype=np.int64)
        self._errors: IntArray = np.zeros(2, dtype=np.int64)
        self._buckets: IntArray = np.zeros((2, N_BUCKETS), dtype=np.int64)

    @classmethod
    def warmed_up(
        cls, scenario: Scenario, seed: int | np.random.Generator = 0, warmup_s: float = WARMUP_S
    ) -> Self:
        """A simulation at t=0 whose stable has already served ``warmup_s`` seconds alone,
        as a real stable has before a rollout: the latency checks fix their thresholds
        from that history.  Every driver (simulate, the daemon's simulated source, the
        benchmark's baselines) starts this way, so they see the same traffic."""
        sim = cls(scenario, seed, start_s=-warmup_s)
        sim.advance(warmup_s)
        return sim

    @property
    def now_s(self) -> float:
        """Current virtual time, in seconds since the scenario started."""
        return self.clock.now_s

    @property
    def stable_runs(self) -> VersionName:
        """Which version's behaviour the stable arm runs: ``"canary"`` after promotion."""
        return self._stable_runs

    def set_canary_weight(self, pct: int) -> None:
        """Route ``pct`` percent (0..100) of requests to the canary from now on."""
        self.mesh.set_canary_weight(pct)

    def set_mirror(self, pct: int) -> None:
        """Copy ``pct`` percent (0..100) of stable's requests to the canary from now on:
        the canary serves the copies (its counters count them), stable is unchanged."""
        self.mesh.set_mirror(pct)

    def promote_stable(self) -> None:
        """Copy the canary's pod template to stable.

        From now on the stable arm behaves as the canary version does, including the
        canary's later events.  Weights are left as they are.
        """
        self._stable_runs = "canary"

    def advance(self, dt_s: float) -> None:
        """Serve traffic for ``dt_s`` seconds at the current weights, then move the clock.

        Raises:
            ValueError: if ``dt_s`` is negative or not finite.
        """
        if not math.isfinite(dt_s) or dt_s < 0:
            raise ValueError(f"dt_s must be a finite number >= 0, got {dt_s!r}")
        start_s = self.clock.now_s
        end_s = start_s + dt_s
        if end_s > start_s:
            cuts = [t for t in self._change_points if start_s < t < end_s]
            if self._noise is not None and self._noise.error_cv > 0:
                period_s = self._noise.period_s
                first = math.floor(start_s / period_s) + 1
                cuts += [k * period_s for k in range(first, math.ceil(end_s / period_s))]
                cuts = sorted(set(cuts))
            bounds = [start_s, *cuts, end_s]
            for sub_start_s, sub_end_s in itertools.pairwise(bounds):
                self._serve(sub_start_s, sub_end_s)
        self.clock.advance(dt_s)

    def _serve(self, start_s: float, end_s: float) -> None:
        """Draw and add the traffic of ``[start_s, end_s)``, where nothing changes."""
        rng = self._rng
        expected = self.scenario.expected_requests(start_s, end_s)
        total = int(rng.poisson(expected))
        if total == 0:
            return
        canary = int(rng.binomial(total, self.mesh.canary_weight_pct / 100.0))
        mirrored = (
            int(rng.binomial(total - canary, self.mesh.mirror_pct / 100.0))
            if self.mesh.mirror_pct
            else 0
        )
        served = np.array([total - canary, canary + mirrored], dtype=np.int64)
        stable_behaviour = self._behaviour_at(self._stable_runs, start_s)
        canary_behaviour = self._behaviour_at("canary", start_s)
        error_rates = np.array([stable_behaviour.error_rate, canary_behaviour.error_rate])
        errors = rng.binomial(served, self._noisy(error_rates, start_s)).astype(np.int64)
        self._requests += served
        self._errors += errors
        for arm, behaviour in ((_STABLE, stable_behaviour), (_CANARY, canary_behaviour)):
            if served[arm]:
                counts = rng.multinomial(int(served[arm]), behaviour.bucket_probabilities())
                self._buckets[arm] += np.cumsum(counts, dtype=np.int64)
        if self._noise is not None and self._noise.bursts_per_hour > 0:
            self._bursts(start_s, end_s, (stable_behaviour, canary_behaviour))

    def _noisy(self, error_rates: npt.NDArray[np.float64], t_s: float) -> npt.NDArray[np.float64]:
        """The arms' error rates times their Gamma multipliers for the period of ``t_s``."""
        noise = self._noise
        if noise is None or noise.error_cv <= 0:
            return error_rates
        period = math.floor(t_s / noise.period_s)
        shape = 1.0 / noise.error_cv**2
        factors = []
        for arm in (_STABLE, _CANARY):
            factor = self._multipliers.get((arm, period))
            if factor is None:
                factor = float(self._noise_rng.gamma(shape, 1.0 / shape))
                self._multipliers[arm, period] = factor
            factors.append(factor)
        if len(self._multipliers) > 64:  # only the current period is ever asked for again
            for key in [k for k in self._multipliers if k[1] < period]:
                del self._multipliers[key]
        return np.asarray(np.minimum(error_rates * np.array(factors), 1.0), dtype=np.float64)

    def _bursts(
        self, start_s: float, end_s: float, behaviours: tuple[Behaviour, Behaviour]
    ) -> None:
        """One client's bursts of failed requests in ``[start_s, end_s)``: each lands
        whole on one arm (a client's connections go to one version's pods)."""
        noise, rng = self._noise, self._noise_rng
        assert noise is not None
        n = int(rng.poisson(noise.bursts_per_hour * (end_s - start_s) / 3600.0))
        weight = self.mesh.canary_weight_pct / 100.0
        for _ in range(n):
            arm = _CANARY if rng.random() < weight else _STABLE
            size = int(rng.geometric(1.0 / noise.burst_errors))
            self._requests[arm] += size
            self._errors[arm] += size
            counts = rng.multinomial(size, behaviours[arm].bucket_probabilities())
            self._buckets[arm] += np.cumsum(counts, dtype=np.int64)

    def _behaviour_at(self, version: VersionName, t_s: float) -> Behaviour:
        """``scenario.behaviour_at(version, t_s)``, memoised per segment."""
        key = (version, bisect.bisect_right(self._change_points, t_s))
        behaviour = self._behaviours.get(key)
        if behaviour is None:
            behaviour = self._behaviours[key] = self.scenario.behaviour_at(version, t_s)
        return behaviour

    def observe(self) -> Observation:
        """Both arms' cumulative counters now, as the Prometheus source reports them."""
        requests = self._requests.tolist()
        errors = self._errors.tolist()
        buckets = self._buckets.tolist()
        return Observation(
            stable=ArmCounts(requests[_STABLE], errors[_STABLE], tuple(buckets[_STABLE])),
            canary=ArmCounts(requests[_CANARY], errors[_CANARY], tuple(buckets[_CANARY])),
        )

    def __repr__(self) -> str:
        return (
            f"Simulation(scenario={self.scenario.name!r}, now_s={self.now_s!r}, "
            f"canary_weight_pct={self.mesh.canary_weight_pct})"
        )
