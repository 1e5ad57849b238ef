"""Time a simulated 30-minute rollout at 1,000 requests/s with 10 s intervals.

Each interval the driver observes and advances; the canary weight goes 10 -> 50 -> 100
every 10 minutes.  The rollout is repeated and the median and maximum wall time are
printed in milliseconds.  Run from the repository root::

    python bench/simulator_speed.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulator import Simulation, load_scenario_text

SCENARIO_YAML = """\
name: bench-1000rps
description: 1,000 rps, canary 2x errors, for timing the simulator
duration_s: 1800
traffic: {rps: 1000}
stable: {error_rate: 0.005, latency_ms: {p50: 40, p99: 180}}
canary: {error_rate: 0.010, latency_ms: {p50: 40, p99: 180}}
"""

DURATION_S = 30 * 60
INTERVAL_S = 10.0
STEP_S = 10 * 60
WEIGHTS_PCT = (10, 50, 100)
REPEATS = 20


def rollout(seed: int) -> int:
    """Play one rollout; return the total requests served (so the work is not elided)."""
    sim = Simulation(load_scenario_text(SCENARIO_YAML), seed=seed)
    for i in range(int(DURATION_S / INTERVAL_S)):
        sim.observe()
        sim.set_canary_weight(WEIGHTS_PCT[min(int(i * INTERVAL_S) // STEP_S, 2)])
        sim.advance(INTERVAL_S)
    obs = sim.observe()
    assert obs.stable is not None and obs.canary is not None
    return obs.stable.requests + obs.canary.requests


def main() -> None:
    rollout(seed=12345)  # warm up imports and caches
    times_ms = []
    served = 0
    for seed in range(REPEATS):
        start = time.perf_counter()
        served = rollout(seed)
        times_ms.append((time.perf_counter() - start) * 1000.0)
    print(
        f"30-min rollout, 1,000 rps, {INTERVAL_S:g} s intervals, {REPEATS} runs "
        f"(~{served:,} requests each): median {statistics.median(times_ms):.1f} ms, "
        f"max {max(times_ms):.1f} ms"
    )


if __name__ == "__main__":
    main()
