"""Tests of the detection benchmark's baselines (bench/baselines.py) and its table builder.

The bench scripts are not a package: their directory goes on ``sys.path`` here, as it
does when ``python bench/detection.py`` runs.  Every simulation uses fixed seeds.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import detection
from baselines import (
    FlaggerJudge,
    Interval,
    KayentaJudge,
    OracleSprtJudge,
    RunRecord,
    Verdict,
    flagger_check_passes,
    kayenta_metric_fails,
    run_rollout,
    sprt_interval_llr,
)
from scenarios import BY_KEY

from analysis.counts import LATENCY_EDGES_MS, ArmCounts


def arm(
    requests: int, errors: int = 0, *, slow: int = 0, slow_edge_ms: float = 1000.0
) -> ArmCounts:
    """Counts with every request at most 50 ms, except ``slow`` ones in the bucket
    ending at ``slow_edge_ms``."""
    buckets = tuple(
        (requests - slow if edge >= 50.0 else 0) + (slow if edge >= slow_edge_ms else 0)
        for edge in LATENCY_EDGES_MS
    )
    return ArmCounts(requests, errors, (*buckets, requests))


def interval(
    canary: ArmCounts, stable: ArmCounts | None = None, n: int = 1, weight_pct: int = 10
) -> Interval:
    """The ``n``-th 1-minute interval of the first step."""
    stable = ArmCounts(0, 0, (0,) * (len(LATENCY_EDGES_MS) + 1)) if stable is None else stable
    return Interval(60.0 * (n - 1), 60.0 * n, 0, weight_pct, n, stable, canary)


# --------------------------------------------------------------------------- Flagger


def test_flagger_check_fails_below_99_percent_success_and_not_at_or_above() -> None:
    assert not flagger_check_passes(arm(600, 7))  # 98.8 %
    assert flagger_check_passes(arm(600, 6))  # exactly 99 %
    assert flagger_check_passes(arm(600, 0))


def test_flagger_check_fails_on_p99_above_500_ms() -> None:
    assert not flagger_check_passes(arm(1000, slow=20, slow_edge_ms=1000.0))  # p99 in 500..1000
    assert flagger_check_passes(arm(1000, slow=5, slow_edge_ms=1000.0))  # p99 under 50 ms


def test_flagger_threshold_1_rolls_back_on_the_first_failed_window() -> None:
    judge = FlaggerJudge(1)
    assert judge.judge(interval(arm(600, 3), n=1), step_end=False) == "continue"
    assert judge.judge(interval(arm(600, 7), n=2), step_end=False) == "rollback"


def test_flagger_threshold_5_needs_five_failures_and_never_resets() -> None:
    judge = FlaggerJudge(5)
    windows = [7, 0, 7, 7, 0, 7, 0, 7]  # errors per 600 requests: 7 fails, 0 passes
    verdicts: list[Verdict] = []
    for n, errors in enumerate(windows, start=1):
        verdicts.append(judge.judge(interval(arm(600, errors), n=n), step_end=False))
        judge.start_step(0, 10)  # a new step does not reset failedChecks either
    assert verdicts == ["continue"] * 7 + ["rollback"]
    assert judge.failed_checks == 5


def test_flagger_window_without_canary_requests_is_a_failed_check() -> None:
    assert not flagger_check_passes(ArmCounts())
    assert not flagger_check_passes(arm(0))
    assert FlaggerJudge(1).judge(interval(arm(0)), step_end=False) == "rollback"


# --------------------------------------------------------------------------- Kayenta


def test_kayenta_metric_fails_a_clearly_worse_canary_and_passes_an_identical_one() -> None:
    stable = [0.005, 0.004, 0.006, 0.0055, 0.0045]
    worse = [0.020, 0.022, 0.018, 0.025, 0.021]
    assert kayenta_metric_fails(worse, stable) is True
    assert kayenta_metric_fails(list(stable), stable) is False
    # Significant (no overlap) but under the 1.2× effect-size gate: passes.
    assert kayenta_metric_fails([x * 1.1 for x in stable], stable) is False
    # Stable median 0: fails only if the canary's median is above 0.5 pp.
    zeros = [0.0] * 5
    assert kayenta_metric_fails([0.01] * 5, zeros, zero_stable_floor=0.005) is True
    assert kayenta_metric_fails([0.004] * 5, zeros, zero_stable_floor=0.005) is False
    assert kayenta_metric_fails([], stable) is None


def test_kayenta_judge_rolls_back_a_worse_canary_once_the_test_can_reject() -> None:
    judge = KayentaJudge()
    canary_errors = [30, 33, 28, 31]  # of 600: about 5 %
    stable_errors = [27, 25, 30, 26]  # of 5,400: about 0.5 %
    verdicts = [
        judge.judge(interval(arm(600, c), arm(5400, s), n=n), step_end=False)
        for n, (c, s) in enumerate(zip(canary_errors, stable_errors, strict=True), start=1)
    ]
    # Nothing before 3 intervals; with 3 vs 3 values the exact one-sided p-value is at
    # least 1/20 = 0.05, so the first rejection (p = 1/70) comes with the 4th interval.
    assert verdicts == ["continue", "continue", "continue", "rollback"]
    assert judge.last_score == 50.0  # error rate fails, p99 (identical) passes


def test_kayenta_judge_passes_an_identical_canary_through_the_step() -> None:
    judge = KayentaJudge()
    canary_errors = [3, 2, 4, 3, 3, 2, 4, 3, 3, 3]
    stable_errors = [27, 26, 28, 27, 25, 29, 27, 27, 28, 26]
    verdicts = [
        judge.judge(interval(arm(600, c), arm(5400, s), n=n), step_end=n == 10)
        for n, (c, s) in enumerate(zip(canary_errors, stable_errors, strict=True), start=1)
    ]
    assert verdicts == ["continue"] * 10
    assert judge.last_score == 100.0


# --------------------------------------------------------------------------- oracle


def test_sprt_interval_llr_by_hand() -> None:
    # w = 0.1, r = 2: θ0 = 0.1, θ1 = 0.2 / 1.1; 10 canary and 50 stable bad events:
    # 10 ln(θ1/θ0) + 50 ln((1-θ1)/(1-θ0)) = 10 ln(20/11) + 50 ln(10/11) = 1.2128610...
    assert sprt_interval_llr(10, 50, 0.1, 2.0) == pytest.approx(1.2128610173, abs=1e-9)
    assert sprt_interval_llr(10, 50, 1.0, 2.0) == 0.0  # no stable traffic: no information


def test_oracle_judge_uses_the_realized_share_and_walds_boundaries() -> None:
    judge = OracleSprtJudge(BY_KEY["errors-x2"])
    assert judge.upper == pytest.approx(math.log(95.0))
    assert judge.lower == pytest.approx(math.log(0.05 / 0.99))
    verdicts = []
    for n in range(1, 5):  # 600 of 6,000 requests are the canary's: w = 0.1
        verdicts.append(judge.judge(interval(arm(600, 10), arm(5400, 50), n=n), step_end=False))
        if n == 1:
            assert judge.llr == pytest.approx(1.2128610173, abs=1e-9)
    assert verdicts == ["continue", "continue", "continue", "rollback"]  # 4 × 1.213 > 4.554


def test_oracle_accepts_h0_and_stops_testing() -> None:
    judge = OracleSprtJudge(BY_KEY["healthy-100rps"])  # H1: r = 2
    assert judge.judge(interval(arm(600, 0), arm(5400, 150)), step_end=False) == "continue"
    assert judge.accepted
    assert judge.judge(interval(arm(600, 600), arm(5400, 0), n=2), step_end=False) == "continue"


def test_oracle_median_requests_to_rollback_matches_design_section_5() -> None:
    # Stable 0.5 %, canary 1.0 %, w = 10 %: about 136 error events, 24.7k requests.
    # 10-second intervals (1,000 requests) so the interval granularity does not dominate.
    bench = BY_KEY["errors-x2"]
    runs = [
        run_rollout(bench, OracleSprtJudge(bench), seed, interval_s=10.0) for seed in range(100)
    ]
    assert sum(r.outcome == "rolled_back" for r in runs) >= 95
    median = statistics.median(r.requests for r in runs)
    assert 24_700 * 0.8 <= median <= 24_700 * 1.2


# --------------------------------------------------------------------------- driver


def test_rollout_promotes_after_three_ten_minute_steps() -> None:
    record = run_rollout(BY_KEY["healthy-100rps"], FlaggerJudge(1000), seed=3)
    assert record.outcome == "promoted"
    assert record.end_s == 1800.0
    assert record.reached_100_s == 1200.0
    # 100 rps for 30 minutes, about a tenth, half and all of it to the canary.
    assert 170_000 < record.requests < 190_000
    expected_canary = 100 * 600 * (0.1 + 0.5 + 1.0)
    assert abs(record.canary_requests - expected_canary) < 0.03 * expected_canary


def test_run_benchmark_does_not_depend_on_jobs_or_chunks() -> None:
    args = (["errors-x5"], ["flagger-1", "oracle-sprt"], 4)
    serial = detection.run_benchmark(*args, base_seed=7, jobs=1, chunk=3)
    parallel = detection.run_benchmark(*args, base_seed=7, jobs=2, chunk=1)
    assert serial == parallel
    assert [r.seed for r in serial["errors-x5", "oracle-sprt"]] == [7, 8, 9, 10]


# --------------------------------------------------------------------------- table


def record(seed: int, outcome: str, end_s: float, requests: int = 0, bad: int = 0) -> RunRecord:
    assert outcome in ("promoted", "rolled_back")
    return RunRecord(
        seed=seed,
        outcome="promoted" if outcome == "promoted" else "rolled_back",
        end_s=end_s,
        reached_100_s=1200.0 if end_s > 1200.0 else None,
        requests=requests,
        canary_requests=requests // 10,
        bad_canary_requests=bad,
    )


def test_table_builder_on_a_tiny_fake_result_set() -> None:
    results = {
        ("healthy-100rps", "flagger-1"): [
            record(0, "rolled_back", 300.0, 30_000),
            record(1, "promoted", 1800.0, 180_000),
        ],
        ("errors-x2", "kayenta"): [
            record(0, "rolled_back", 240.0, 24_000, 30),
            record(1, "rolled_back", 300.0, 30_000, 40),
            record(2, "promoted", 1800.0, 180_000, 900),
        ],
    }
    summaries = detection.summarize_all(results)
    assert [s.scenario for s in summaries] == ["healthy-100rps", "errors-x2"]  # suite order
    healthy = "\n".join(detection.healthy_table(summaries))
    assert (
        "| healthy, 100 rps | flagger-1 | 50.0% (1/2) | 50.0% (1/2) | 0.0% (0/2) "
        "| 20 min | 30 min | — |" in healthy
    )
    assert "errors" not in healthy
    regressions = "\n".join(detection.regression_table(summaries))
    # Nearest-rank over all runs, the unrolled-back run counting as ∞.
    assert (
        "| errors ×2 | kayenta | 66.7% (2/3) | 5 min | 30.0k / ∞ | 3.0k / ∞ | 40 / ∞ "
        "| 0.0% (0/3) |" in regressions
    )
    report = detection.markdown_report(summaries, runs=3, base_seed=0)
    assert healthy in report
    assert regressions in report
    assert "## Targets" not in report  # their cells were not run
