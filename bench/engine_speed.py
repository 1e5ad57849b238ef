"""Engine cost: judging every check of N canaries in one evaluation round.

Run: ``python bench/engine_speed.py [--canaries N] [--repeats R]``.  Judges N canaries
with the default spec's five checks (errors, latency p99 and p50, the error limit, the
p99 maxMs limit) in two kinds of round: *realistic*, step data recorded from simulated
rollouts as a daemon's round sees them; *worst case*, every canary at a decision.
Times:

* ``evaluate_many`` — the batch path the daemon uses (one vectorised e-value call per
  check), with confidence sequences for rollback/pass verdicts only (the default);
* the same with confidence sequences for every verdict;
* ``evaluate`` one canary at a time.

Times are CPU seconds of this process (one core), the best of the repeats (as
``timeit`` reports: the least disturbed by other work on the machine).
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable

import numpy as np

from analysis.counts import LATENCY_EDGES_MS, ArmCounts
from analysis.engine import Settings, StepData, evaluate, evaluate_many
from analysis.verdict import Verdict
from canaryd import rollout
from canaryd.rollout import analysis_settings
from canaryd.simulate import simulate_once
from canaryd.spec import parse_spec
from simulator import get_scenario


def _histogram(rng: np.random.Generator, n: int, p50: float, p99: float) -> tuple[int, ...]:
    sigma = (math.log(p99) - math.log(p50)) / 2.3263478740408408
    if n == 0:
        return (0,) * (len(LATENCY_EDGES_MS) + 1)
    samples = rng.lognormal(math.log(p50), sigma, size=min(n, 2000))
    cdf = np.searchsorted(np.sort(samples), LATENCY_EDGES_MS, side="right") / len(samples)
    return (*(int(n * p) for p in cdf), n)


def recorded_rounds(count: int, seed: int = 1) -> list[StepData]:
    """``count`` step data as a live daemon's round sees them.

    Records the ``StepData`` the state machine builds at every evaluation of simulated
    rollouts (healthy and regressed canaries at 10, 100 and 1,000 requests/s), then
    draws ``count`` of them: the mix of evaluations per round a daemon would judge,
    most of them mid-step, some at a decision.
    """
    recorded: list[StepData] = []
    original = evaluate

    def record(settings: Settings, data: StepData, *, intervals: bool | None = None) -> Verdict:
        recorded.append(data)
        return original(settings, data, intervals=intervals)

    vars(rollout)["evaluate"] = record  # canaryd.rollout judges through this name
    try:
        spec = parse_spec({})
        for i, (name, rps) in enumerate(
            (name, rps)
            for name in ("healthy", "healthy", "healthy", "error-regression", "latency-tail")
            for rps in (10.0, 100.0, 1000.0)
        ):
            base = get_scenario(name)
            scenario = base.model_copy(
                update={"traffic": base.traffic.model_copy(update={"rps": rps})}
            )
            simulate_once(spec, scenario, seed + i)
    finally:
        vars(rollout)["evaluate"] = original
    rng = np.random.default_rng(seed)
    return [recorded[i] for i in rng.integers(0, len(recorded), size=count)]


def worst_case(count: int, seed: int = 1) -> list[StepData]:
    """Every canary at a decision: half regressed, the rest at the end of their step."""
    rng = np.random.default_rng(seed)
    reference = ArmCounts(600_000, 3000, _histogram(rng, 600_000, 40, 180))
    batch = []
    for i in range(count):
        weight = (10, 50)[i % 2]
        total = int(float(rng.choice([10.0, 100.0, 1000.0])) * 600)
        canary_n = total * weight // 100
        stable_n = total - canary_n
        regressed = i % 4 < 2
        ratio = 5.0 if regressed else 1.0
        batch.append(
            StepData(
                steps=(10, 50, 100),
                step_index=i % 2,
                elapsed_s=600.0,
                canary=ArmCounts(
                    canary_n,
                    int(rng.binomial(canary_n, 0.005 * ratio)),
                    _histogram(rng, canary_n, 40, 180),
                ),
                stable=ArmCounts(
                    stable_n, int(rng.binomial(stable_n, 0.005)), _histogram(rng, stable_n, 40, 180)
                ),
                prior_log_e={},
                stable_reference=reference,
            )
        )
    return batch


def _one_by_one(settings: Settings, batch: list[StepData]) -> list[Verdict]:
    return [evaluate(settings, data) for data in batch]


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    settings = analysis_settings(parse_spec({}))
    n = args.canaries
    print(f"{n} canaries, 5 checks each (errors, latency p99/p50, error limit, p99 maxMs)")
    print(f"{'round':<11} {'path':<32} {'ms / round':>10} {'µs / canary':>12}  decisions")
    for label, make in (("realistic", recorded_rounds), ("worst case", worst_case)):
        batch = make(n)
        decisions = [str(v.decision) for v in evaluate_many(settings, batch)]
        summary = ", ".join(f"{d} {decisions.count(d)}" for d in sorted(set(decisions)))
        rows: list[tuple[str, Callable[[], object]]] = [
            ("evaluate_many (batch)", functools.partial(evaluate_many, settings, batch)),
            ("evaluate, one canary at a time", functools.partial(_one_by_one, settings, batch)),
        ]
        for name, fn in rows:
            seconds = cpu_seconds(fn, args.repeats)
            print(
                f"{label:<11} {name:<32} {1e3 * seconds:>10.1f} {1e6 * seconds / n:>12.1f}  "
                f"{summary}"
            )


if __name__ == "__main__":
    main()
