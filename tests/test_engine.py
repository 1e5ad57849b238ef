"""The verdict rules of analysis.engine, check by check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.counts import LATENCY_EDGES_MS, N_BUCKETS, ArmCounts
from analysis.engine import (
    ERRORS,
    ERRORS_LIMIT,
    LatencySettings,
    Settings,
    StepData,
    evaluate,
    evaluate_many,
    latency_edge_index,
    plan_checks,
)
from analysis.verdict import CheckResult, CheckStatus, Decision, fmt_e, format_duration

SETTINGS = Settings()  # errors comparison + errors.limit (maxPct 5%)
FULL = Settings(
    latency=(LatencySettings(99, 0.2, 1000), LatencySettings(50, 0.2)),
    slo_availability_pct=99.9,
)


def histogram(requests: int, p50_ms: float, p99_ms: float) -> tuple[int, ...]:
    """Cumulative buckets of a log-normal latency, rounded (deterministic)."""
    from scipy.stats import norm

    sigma = (math.log(p99_ms) - math.log(p50_ms)) / norm.ppf(0.99)
    cdf = norm.cdf((np.log(LATENCY_EDGES_MS) - math.log(p50_ms)) / sigma)
    return (*(round(float(requests * p)) for p in cdf), requests)


def arm(requests: int, errors: int, p50: float = 40, p99: float = 180) -> ArmCounts:
    return ArmCounts(requests, errors, histogram(requests, p50, p99))


def step(
    canary: ArmCounts | tuple[int, int],
    stable: ArmCounts | tuple[int, int],
    elapsed_s: float = 300.0,
    steps: tuple[int, ...] = (10, 50, 100),
    index: int = 0,
    prior: dict[str, list[float]] | None = None,
    reference: ArmCounts | None = None,
) -> StepData:
    return StepData(
        steps=steps,
        step_index=index,
        elapsed_s=elapsed_s,
        canary=canary if isinstance(canary, ArmCounts) else ArmCounts(*canary),
        stable=stable if isinstance(stable, ArmCounts) else ArmCounts(*stable),
        prior_log_e=prior or {},
        stable_reference=reference,
    )


def check(checks: tuple[CheckResult, ...], name: str) -> CheckResult:
    return next(c for c in checks if c.name == name)


# -- plan and α --------------------------------------------------------------------------------


def test_alpha_is_split_over_the_planned_checks_by_fixed_weights() -> None:
    plans = plan_checks(FULL, (10, 50, 100))
    assert [p.name for p in plans] == [
        "errors", "latency.p99", "latency.p50", "errors.limit", "latency.p99.max",
    ]  # fmt: skip
    assert sum(p.alpha for p in plans) == pytest.approx(FULL.alpha)
    # errors 0.4·α, latency comparisons 0.2·α each, limits 0.1·α each
    assert [p.threshold for p in plans] == pytest.approx([250.0, 500.0, 500.0, 1000.0, 1000.0])
    only_full = plan_checks(FULL, (100,))
    assert [p.name for p in only_full] == ["errors.limit", "latency.p99.max"]


def test_the_error_limit_is_the_tighter_of_max_pct_and_slo_burn() -> None:
    limit = FULL.error_limit()
    assert limit is not None
    assert limit[0] == pytest.approx(0.0144)
    assert "SLO burn limit 1.44%" in limit[1]
    loose = Settings(slo_availability_pct=99.0, slo_burn_rate_limit=10).error_limit()
    assert loose == (0.05, "maxPct 5%")
    assert Settings(error_max_pct=None).error_limit() is None


def test_early_pass_ratio_must_leave_an_indifference_zone() -> None:
    with pytest.raises(ValueError, match="early_pass_ratio"):
        Settings(error_tolerance=0.5, early_pass_ratio=1.4)


# -- errors ------------------------------------------------------------------------------------


def test_ten_times_the_errors_rolls_back_with_numbers_and_interval_in_the_reason() -> None:
    verdict = evaluate(SETTINGS, step(canary=(600, 30), stable=(5400, 27)))
    assert verdict.decision is Decision.ROLLBACK
    reason = verdict.reasons[0]
    assert reason.startswith("errors: canary 5.00% (30/600) vs stable 0.50% (27/5400), ratio 10.00")
    assert "(95% CS " in reason
    assert reason.endswith("≥ 125")  # errors' share of α = 0.01 is 4/5 beside errors.limit
    errors = check(verdict.checks, ERRORS)
    assert errors.status is CheckStatus.BREACH
    assert errors.stats["cs_low"] < 10 < errors.stats["cs_high"]
    assert errors.e_value >= errors.threshold == pytest.approx(125)


def test_equal_error_rates_do_not_roll_back() -> None:
    verdict = evaluate(SETTINGS, step(canary=(6000, 30), stable=(54000, 270)))
    assert verdict.decision is not Decision.ROLLBACK
    assert all(c.status is CheckStatus.OK for c in verdict.checks)


def test_too_few_canary_requests_continue_then_hold_after_the_step_duration() -> None:
    early = evaluate(SETTINGS, step(canary=(120, 0), stable=(1080, 5), elapsed_s=300))
    assert early.decision is Decision.CONTINUE
    assert early.reasons[0] == "collecting data: 120 of 200 canary requests needed after 5m"
    late = evaluate(SETTINGS, step(canary=(120, 0), stable=(1080, 5), elapsed_s=600))
    assert late.decision is Decision.HOLD
    assert late.reasons[0].startswith("insufficient data: 120 of 200")


def test_evidence_rolls_back_even_before_min_requests() -> None:
    verdict = evaluate(SETTINGS, step(canary=(150, 40), stable=(1350, 6), elapsed_s=60))
    assert verdict.decision is Decision.ROLLBACK


def test_step_passes_at_step_duration_without_early_pass() -> None:
    settings = Settings(early_pass_ratio=None)
    healthy = ((6000, 30), (54000, 270))
    assert evaluate(settings, step(*healthy, elapsed_s=599)).decision is Decision.CONTINUE
    passed = evaluate(settings, step(*healthy, elapsed_s=600))
    assert passed.decision is Decision.PASS
    assert passed.reasons[0] == "step passed: 10m with no evidence of regression"


def test_evidence_from_earlier_steps_counts() -> None:
    alone = evaluate(SETTINGS, step(canary=(15000, 140), stable=(15000, 85), index=1))
    with_history = evaluate(
        SETTINGS, step(canary=(15000, 140), stable=(15000, 85), index=1, prior={ERRORS: [4.0]})
    )
    assert check(with_history.checks, ERRORS).log_e > check(alone.checks, ERRORS).log_e


# -- early pass --------------------------------------------------------------------------------


def test_early_pass_needs_tight_evidence_and_the_minimum_duration() -> None:
    # 1,000 rps at 10% for 2 minutes, canary identical to stable
    canary, stable = arm(12_000, 60), arm(108_000, 540)
    ref = arm(600_000, 3000)
    before_min = evaluate(FULL, step(canary, stable, elapsed_s=119, reference=ref))
    assert before_min.decision is Decision.CONTINUE
    tight = evaluate(
        FULL, step(arm(60_000, 300), arm(540_000, 2700), elapsed_s=600 - 1, reference=ref)
    )
    assert tight.decision is Decision.PASS
    assert tight.reasons[0].startswith("step passed early after 9m59s")
    # thin data: the confidence sequence is still wide, so no early pass
    thin = evaluate(FULL, step(arm(600, 3), arm(5400, 27), elapsed_s=300, reference=ref))
    assert thin.decision is Decision.CONTINUE
    assert "or early once" in thin.reasons[0]


def test_a_canary_at_twice_the_errors_never_passes_early() -> None:
    canary, stable = arm(60_000, 600), arm(540_000, 2700)
    verdict = evaluate(FULL, step(canary, stable, elapsed_s=300, reference=arm(600_000, 3000)))
    assert verdict.decision is Decision.ROLLBACK


def test_early_pass_can_be_disabled() -> None:
    settings = Settings(early_pass_ratio=None)
    verdict = evaluate(settings, step(arm(60_000, 300), arm(540_000, 2700), elapsed_s=500))
    assert verdict.decision is Decision.CONTINUE


# -- latency -----------------------------------------------------------------------------------


def test_latency_threshold_is_the_edge_at_or_above_the_stable_percentile() -> None:
    ref = arm(100_000, 0, p50=40, p99=180)
    assert LATENCY_EDGES_MS[latency_edge_index(ref, 99) or 0] == 250
    assert LATENCY_EDGES_MS[latency_edge_index(ref, 50) or 0] == 50
    assert latency_edge_index(ArmCounts(0, 0, (0,) * N_BUCKETS), 99) is None


def test_a_slower_tail_rolls_back_on_the_latency_check() -> None:
    ref = arm(60_000, 300)
    verdict = evaluate(
        FULL, step(arm(3000, 15, p99=360), arm(27_000, 135), elapsed_s=300, reference=ref)
    )
    assert verdict.decision is Decision.ROLLBACK
    assert verdict.reasons[0].startswith("latency.p99 (slower than 250 ms): canary")
    assert check(verdict.checks, "latency.p50").status is CheckStatus.OK


def test_latency_needs_stable_history_before_the_window() -> None:
    verdict = evaluate(FULL, step(arm(3000, 15, p99=360), arm(27_000, 135), reference=None))
    p99 = check(verdict.checks, "latency.p99")
    assert p99.status is CheckStatus.NOT_APPLICABLE
    assert "needed to fix the p99 threshold" in p99.reason


def test_latency_max_ms_limit_fires_without_a_stable_arm() -> None:
    verdict = evaluate(
        FULL, step(arm(20_000, 20, p50=400, p99=2000), ArmCounts(), steps=(100,), index=0)
    )
    assert verdict.decision is Decision.ROLLBACK
    assert verdict.reasons[0].startswith("latency.p99.max: canary requests slower than 1000 ms")


# -- limits and shared incidents -----------------------------------------------------------------


def test_error_limit_fires_without_a_stable_arm() -> None:
    verdict = evaluate(SETTINGS, step(canary=(20000, 2000), stable=(0, 0), index=2))
    assert verdict.decision is Decision.ROLLBACK
    assert check(verdict.checks, ERRORS_LIMIT).status is CheckStatus.BREACH
    errors = check(verdict.checks, ERRORS)
    assert errors.status is CheckStatus.NOT_APPLICABLE
    assert "no stable traffic" in errors.reason


def test_error_limit_is_not_tripped_by_one_noisy_window() -> None:
    # 3 errors in 20 requests is 15% but proves nothing about a 5% limit
    verdict = evaluate(Settings(min_requests=1), step(canary=(20, 3), stable=(0, 0), index=2))
    assert check(verdict.checks, ERRORS_LIMIT).status is CheckStatus.OK


def test_slo_burn_fires_on_the_canary_alone() -> None:
    # 3% errors: under maxPct 5% but burning a 99.9% SLO 30× over
    verdict = evaluate(FULL, step(arm(20_000, 600), ArmCounts(), steps=(100,), index=0))
    assert verdict.decision is Decision.ROLLBACK
    assert "SLO burn limit 1.44%" in verdict.reasons[0]


def test_a_shared_incident_holds_instead_of_blaming_the_canary() -> None:
    verdict = evaluate(SETTINGS, step(canary=(30000, 2400), stable=(30000, 2400), index=1))
    assert verdict.decision is Decision.HOLD
    assert verdict.shared_incident
    assert check(verdict.checks, ERRORS_LIMIT).status is CheckStatus.SHARED
    assert "shared incident" in verdict.reasons[0]


def test_canary_worse_than_stable_during_an_incident_still_rolls_back() -> None:
    verdict = evaluate(SETTINGS, step(canary=(30000, 6000), stable=(30000, 2400), index=1))
    assert verdict.decision is Decision.ROLLBACK
    assert verdict.reasons[0].startswith("errors: canary 20.00%")


# -- batch -------------------------------------------------------------------------------------


def test_batch_and_single_evaluation_agree() -> None:
    rng = np.random.default_rng(5)
    ref = arm(600_000, 3000)
    batch = []
    for _ in range(40):
        n = int(rng.integers(100, 50_000))
        ce = int(rng.binomial(n, rng.choice([0.005, 0.01, 0.05])))
        batch.append(
            step(
                arm(n, ce, p99=float(rng.choice([180, 300]))),
                arm(9 * n, int(rng.binomial(9 * n, 0.005))),
                elapsed_s=float(rng.choice([60, 300, 600])),
                reference=ref,
            )
        )
    many = evaluate_many(FULL, batch)
    for data, verdict in zip(batch, many, strict=True):
        single = evaluate(FULL, data)
        assert verdict.decision is single.decision
        assert verdict.reasons == single.reasons
        for a, b in zip(verdict.checks, single.checks, strict=True):
            assert a.log_e == pytest.approx(b.log_e, rel=1e-9, abs=1e-9)


def test_formatting_helpers() -> None:
    assert format_duration(3725) == "1h2m5s"
    assert format_duration(0) == "0s"
    assert format_duration(90.5) == "1m30.5s"  # exact: spec values parse back to the same
    assert format_duration(299.9999) == "5m"  # to the millisecond: never "4m60s"
    assert format_duration(0.25) == "0.25s"
    assert fmt_e(152.4) == "152"
    assert fmt_e(3.2e9) == "3.20e+09"


def test_a_restarted_window_carries_the_steps_earlier_evidence() -> None:
    data = step(canary=(6000, 30), stable=(54000, 270))
    fresh = check(evaluate(SETTINGS, data).checks, ERRORS)
    carried = evaluate(
        SETTINGS,
        StepData(
            steps=data.steps,
            step_index=0,
            elapsed_s=data.elapsed_s,
            canary=data.canary,
            stable=data.stable,
            prior_log_e={},
            window_carry_log_e={ERRORS: -3.0},
        ),
    )
    errors = check(carried.checks, ERRORS)
    assert errors.step_log_e == pytest.approx(fresh.step_log_e - 3.0)
    assert carried.step_log_es()[ERRORS] == pytest.approx(fresh.step_log_e - 3.0)


def test_carried_evidence_survives_a_window_where_the_check_cannot_run() -> None:
    verdict = evaluate(
        SETTINGS,
        StepData(
            steps=(10, 50, 100),
            step_index=0,
            elapsed_s=60,
            canary=ArmCounts(),
            stable=ArmCounts(100, 1),
            prior_log_e={},
            window_carry_log_e={ERRORS: -2.5},
        ),
    )
    assert check(verdict.checks, ERRORS).status is CheckStatus.NOT_APPLICABLE
    assert verdict.step_log_es()[ERRORS] == -2.5
