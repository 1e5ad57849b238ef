"""The simulator: a fake of Prometheus and of the service mesh, in virtual time.

It plays a :class:`Scenario` (traffic, how the stable and canary versions behave, and
timed events) and produces exactly what the Prometheus metrics source produces:
monotonic per-arm counters of requests, 5xx errors and the cumulative latency histogram
on Istio/Envoy's default bucket edges.  Its :class:`Mesh` stands in for the traffic
router.  Traffic is drawn per interval with numpy (Poisson, binomial, multinomial), never
per request, so a 30-minute rollout at 1,000 requests/s runs in milliseconds.

A driver loops: ``obs = sim.observe()``; decide; ``sim.set_canary_weight(pct)``;
``sim.advance(interval_s)``.  This package may import ``analysis`` but never ``canaryd``.
"""

from simulator.clock import VirtualClock
from simulator.engine import WARMUP_S, Simulation
from simulator.mesh import Mesh
from simulator.scenario import (
    BUILTIN_SCENARIOS,
    Event,
    Latency,
    Noise,
    PartialLatency,
    Scenario,
    ScenarioError,
    Traffic,
    VersionSpec,
    get_scenario,
    load_scenario_file,
    load_scenario_text,
)
from simulator.traffic import Z99, Behaviour, daily_factor, daily_factor_mean

__all__ = [
    "BUILTIN_SCENARIOS",
    "WARMUP_S",
    "Z99",
    "Behaviour",
    "Event",
    "Latency",
    "Mesh",
    "Noise",
    "PartialLatency",
    "Scenario",
    "ScenarioError",
    "Simulation",
    "Traffic",
    "VersionSpec",
    "VirtualClock",
    "daily_factor",
    "daily_factor_mean",
    "get_scenario",
    "load_scenario_file",
    "load_scenario_text",
]
