"""Engine cost: judging every check of N canaries in one evaluation round.

Run: ``python bench/engine_speed.py [--canaries N] [--repeats R]``.  Builds N canaries'
step data (the default spec's checks: errors, latency p99 and p50, the error limit and
the p99 maxMs limit; varied traffic and error rates, some regressed), then times:

* ``evaluate_many`` — the batch path the daemon uses (one vectorised e-value call per
  check), with confidence sequences for rollback/pass verdicts only (the default);
* the same with confidence sequences for every verdict;
* ``evaluate`` one canary at a time.

Times are CPU seconds of this process (one core), median over the repeats.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from collections.abc import Callable

import numpy as np

from analysis.counts import LATENCY_EDGES_MS, ArmCounts
from analysis.engine import Settings, StepData, evaluate, evaluate_many
from analysis.verdict import Verdict
from canaryd.rollout import analysis_settings
from canaryd.spec import parse_spec


def _histogram(rng: np.random.Generator, n: int, p50: float, p99: float) -> tuple[int, ...]:
    sigma = (math.log(p99) - math.log(p50)) / 2.3263478740408408
    if n == 0:
        return (0,) * (len(LATENCY_EDGES_MS) + 1)
    samples = rng.lognormal(math.log(p50), sigma, size=min(n, 2000))
    cdf = np.searchsorted(np.sort(samples), LATENCY_EDGES_MS, side="right") / len(samples)
    return (*(int(n * p) for p in cdf), n)


def make_batch(count: int, seed: int = 1, *, worst_case: bool = False) -> list[StepData]:
    """N canaries' step data.

    Realistic (default): each canary is somewhere in its step (1 to 10 minutes in,
    uniformly), 10% of them regressed.  Worst case: every canary at a decision (half
    regressed, the rest at the end of their step), so every verdict gets its
    confidence sequences computed.
    """
    rng = np.random.default_rng(seed)
    reference = ArmCounts(600_000, 3000, _histogram(rng, 600_000, 40, 180))
    batch = []
    for i in range(count):
        weight = (10, 50, 100)[i % 3]
        total = int(rng.integers(1_000, 200_000))
        canary_n = total * weight // 100
        stable_n = total - canary_n
        regressed = rng.random() < (0.5 if worst_case else 0.1)
        ratio = float(rng.choice([2.0, 5.0])) if regressed else 1.0
        p99 = 270.0 if regressed and rng.random() < 0.5 else 180.0
        elapsed = 600.0 if worst_case else float(rng.integers(1, 11) * 60)
        batch.append(
            StepData(
                steps=(10, 50, 100),
                step_index=i % 3,
                elapsed_s=elapsed,
                canary=ArmCounts(
                    canary_n,
                    int(rng.binomial(canary_n, 0.005 * ratio)),
                    _histogram(rng, canary_n, 40, p99),
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
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    settings = analysis_settings(parse_spec({}))
    n = args.canaries
    print(f"{n} canaries, 5 checks each (errors, latency p99/p50, error limit, p99 maxMs)")
    print(f"{'round':<11} {'path':<32} {'ms / round':>10} {'µs / canary':>12}  decisions")
    for label, worst in (("realistic", False), ("worst case", True)):
        batch = make_batch(n, worst_case=worst)
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
