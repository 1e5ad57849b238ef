"""The verdict rules of analysis.engine, one by one."""

from __future__ import annotations

import pytest

from analysis.counts import ArmCounts
from analysis.engine import ERRORS, ERRORS_MAX, Settings, StepData, evaluate
from analysis.verdict import CheckStatus, Decision, fmt_duration, fmt_e

SETTINGS = Settings()


def step(
    canary: tuple[int, int],
    stable: tuple[int, int],
    elapsed_s: float = 300.0,
    steps: tuple[int, ...] = (10, 50, 100),
    index: int = 0,
    prior: dict[str, list[float]] | None = None,
) -> StepData:
    return StepData(
        steps=steps,
        step_index=index,
        elapsed_s=elapsed_s,
        canary=ArmCounts(*canary),
        stable=ArmCounts(*stable),
        prior_log_e=prior or {},
    )


def check(verdict_checks: tuple[object, ...], name: str) -> object:
    return next(c for c in verdict_checks if getattr(c, "name", None) == name)


def test_ten_times_the_errors_rolls_back_with_numbers_in_the_reason() -> None:
    verdict = evaluate(SETTINGS, step(canary=(600, 30), stable=(5400, 27)))
    assert verdict.decision is Decision.ROLLBACK
    assert verdict.reasons[0].startswith("errors: canary 5.00% (30/600) vs stable 0.50% (27/5400)")
    assert "≥ 200" in verdict.reasons[0]  # α = 0.01 split over two checks
    errors = next(c for c in verdict.checks if c.name == ERRORS)
    assert errors.status is CheckStatus.BREACH
    assert errors.stats["ratio"] == pytest.approx(10.0)
    assert errors.e_value >= errors.threshold == 200


def test_equal_error_rates_do_not_roll_back() -> None:
    verdict = evaluate(SETTINGS, step(canary=(6000, 30), stable=(54000, 270)))
    assert verdict.decision is Decision.CONTINUE
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


def test_step_passes_at_step_duration_not_before() -> None:
    healthy = ((6000, 30), (54000, 270))
    assert evaluate(SETTINGS, step(*healthy, elapsed_s=599)).decision is Decision.CONTINUE
    passed = evaluate(SETTINGS, step(*healthy, elapsed_s=600))
    assert passed.decision is Decision.PASS
    assert passed.reasons[0] == "step passed: 10m with no evidence of regression"


def test_max_pct_guard_fires_without_a_stable_arm() -> None:
    # the 100% step: no stable traffic, so only the absolute guard can judge
    verdict = evaluate(SETTINGS, step(canary=(20000, 2000), stable=(0, 0), index=2))
    assert verdict.decision is Decision.ROLLBACK
    guard = next(c for c in verdict.checks if c.name == ERRORS_MAX)
    assert guard.status is CheckStatus.BREACH
    errors = next(c for c in verdict.checks if c.name == ERRORS)
    assert errors.status is CheckStatus.NOT_APPLICABLE
    assert "no stable traffic" in errors.reason


def test_max_pct_guard_is_not_tripped_by_one_noisy_window() -> None:
    # 3 errors in 20 requests is 15% but proves nothing about a 5% limit
    verdict = evaluate(Settings(min_requests=1), step(canary=(20, 3), stable=(0, 0), index=2))
    guard = next(c for c in verdict.checks if c.name == ERRORS_MAX)
    assert guard.status is CheckStatus.OK


def test_a_shared_incident_holds_instead_of_blaming_the_canary() -> None:
    # both arms at 8% against a 5% limit, equal to each other
    verdict = evaluate(SETTINGS, step(canary=(30000, 2400), stable=(30000, 2400), index=1))
    assert verdict.decision is Decision.HOLD
    guard = next(c for c in verdict.checks if c.name == ERRORS_MAX)
    assert guard.status is CheckStatus.SHARED
    assert "shared incident" in verdict.reasons[0]


def test_canary_worse_than_stable_during_an_incident_still_rolls_back() -> None:
    verdict = evaluate(SETTINGS, step(canary=(30000, 6000), stable=(30000, 2400), index=1))
    assert verdict.decision is Decision.ROLLBACK
    assert verdict.reasons[0].startswith("errors: canary 20.00%")


def test_evidence_from_earlier_steps_counts() -> None:
    borderline = step(canary=(15000, 140), stable=(15000, 85), index=1)
    alone = evaluate(SETTINGS, borderline)
    with_history = evaluate(
        SETTINGS,
        step(canary=(15000, 140), stable=(15000, 85), index=1, prior={ERRORS: [4.0]}),
    )
    e_alone = next(c for c in alone.checks if c.name == ERRORS).log_e
    e_hist = next(c for c in with_history.checks if c.name == ERRORS).log_e
    assert e_hist > e_alone


def test_alpha_is_split_over_the_rollback_checks() -> None:
    verdict = evaluate(Settings(alpha=0.05), step(canary=(100, 0), stable=(900, 1)))
    assert {c.threshold for c in verdict.checks} == {40.0}
    only_errors = evaluate(Settings(alpha=0.05, error_max_pct=None), step((100, 0), (900, 1)))
    assert [c.threshold for c in only_errors.checks] == [20.0]


def test_formatting_helpers() -> None:
    assert fmt_duration(3725) == "1h2m5s"
    assert fmt_duration(0) == "0s"
    assert fmt_e(152.4) == "152"
    assert fmt_e(3.2e9) == "3.20e+09"
