"""A ``MetricsSource`` backed by the simulator: the fake of Prometheus and the mesh.

For ``canaryd run`` against a cluster without real traffic (a dry run) and for the
daemon's tests: each Canary gets a :class:`simulator.Simulation` of its scenario,
advanced in wall-clock time (times ``speed``) at the canary weight its VirtualService
routes *now*, read through the router like a mesh would.  What the daemon sees is
what the Prometheus source will give it: both arms' cumulative counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from analysis.counts import Observation
from canaryd.ports import CanaryRef, KubeError, MetricsError, RoutingError, TrafficRouter
from canaryd.spec import CanarySpec
from simulator import Scenario, Simulation


class SimulatedMetrics:
    """The ``MetricsSource`` port on simulated traffic.

    Args:
        scenarios: the scenario of each Canary, or one for all.
        router: reads the canary weight the mesh routes now.
        speed: virtual seconds per wall-clock second.
        seed: seed of the first Canary's simulation (the next get seed+1, ...).
        clock: wall clock in seconds (monotonic).
    """

    def __init__(
        self,
        scenarios: Scenario | Mapping[CanaryRef, Scenario],
        router: TrafficRouter,
        *,
        speed: float = 1.0,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scenarios = scenarios
        self.router = router
        self.speed = speed
        self.seed = seed
        self.clock = clock
        self._sims: dict[CanaryRef, tuple[Simulation, float]] = {}
        #: a Canary listed here gets MetricsError, as if Prometheus were down for it
        self.down: set[CanaryRef] = set()

    def simulation(self, ref: CanaryRef) -> Simulation | None:
        """The Canary's simulation, once it has been observed."""
        entry = self._sims.get(ref)
        return entry[0] if entry else None

    def _scenario(self, ref: CanaryRef) -> Scenario:
        if isinstance(self.scenarios, Scenario):
            return self.scenarios
        try:
            return self.scenarios[ref]
        except KeyError:
            raise MetricsError(f"no simulated traffic for {ref}") from None

    async def observe(self, ref: CanaryRef, spec: CanarySpec) -> Observation:
        if ref in self.down:
            raise MetricsError("simulated outage: the metrics source is down")
        entry = self._sims.get(ref)
        if entry is None:
            sim = Simulation.warmed_up(self._scenario(ref), self.seed + len(self._sims))
            entry = self._sims[ref] = (sim, self.clock())
        sim, started = entry
        target_s = (self.clock() - started) * self.speed
        if target_s > sim.now_s:
            sim.advance(target_s - sim.now_s)  # at the weight routed since the last look
        try:
            weight = min(await self.router.route_weights(ref, spec), default=0)
        except (RoutingError, KubeError) as exc:
            raise MetricsError(f"cannot read the mesh's weights: {exc}") from exc
        sim.set_canary_weight(spec.traffic_share_pct(weight, sim.scenario.traffic.cohort_pct))
        mirrors = getattr(self.router, "route_mirrors", None)  # a router that can mirror
        if spec.mirrors and mirrors is not None:
            try:
                sim.set_mirror(min(await mirrors(ref, spec), default=0))
            except (RoutingError, KubeError) as exc:
                raise MetricsError(f"cannot read the mesh's mirrors: {exc}") from exc
        return sim.observe()
