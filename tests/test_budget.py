"""Error-budget arithmetic and the policy tiers, against hand-computed cases."""

from __future__ import annotations

import pytest

from analysis.budget import (
    BURN_WINDOWS_S,
    Events,
    PolicyTiers,
    Tier,
    decide,
    decide_all,
    figures,
    window_label,
)

MILLION = 1_000_000.0


def quiet() -> dict[float, Events]:
    """Every burn window at a tenth of the budget's rate (0.01% bad at 99.9%)."""
    return {w: Events(MILLION - 100, MILLION) for w in BURN_WINDOWS_S}


@pytest.mark.parametrize(
    ("bad", "remaining", "tier"),
    [
        (0.0, 1.0, Tier.NORMAL),
        (200.0, 0.8, Tier.NORMAL),
        (500.0, 0.5, Tier.NORMAL),  # exactly half left: not below 50%
        (700.0, 0.3, Tier.APPROVAL),
        (900.0, 0.1, Tier.OVERRIDE),
        (1000.0, 0.0, Tier.FROZEN),  # exactly spent
        (1050.0, -0.05, Tier.FROZEN),  # overspent: negative
    ],
)
def test_budget_remaining_and_its_tier(bad: float, remaining: float, tier: Tier) -> None:
    slo = figures(0.999, Events(MILLION - bad, MILLION), quiet())
    assert slo.availability == pytest.approx(1 - bad / MILLION)
    assert slo.budget_remaining == pytest.approx(remaining)
    decision = decide("availability", slo)
    assert decision.tier is tier
    assert f"error budget {100 * remaining:.3g}% remaining" in decision.reason


def test_burn_rates_are_the_bad_ratio_over_the_budgets() -> None:
    windows = quiet() | {3600.0: Events(98_000, 100_000), 300.0: Events(9_840, 10_000)}
    slo = figures(0.999, Events(MILLION - 200, MILLION), windows)
    assert slo.burn_rates[3600.0] == pytest.approx(20.0)  # 2% bad over a 0.1% budget
    assert slo.burn_rates[300.0] == pytest.approx(16.0)
    assert slo.burn_rates[86400.0] == pytest.approx(0.1)
    assert [p.label for p in slo.firing] == ["1h&5m"]
    decision = decide("availability", slo)
    assert decision.tier is Tier.FROZEN  # 80% left, but burning fast
    assert "fast burn 1h&5m at 20×/16× (> 14.4×)" in decision.reason


def test_a_pair_fires_only_when_both_windows_burn() -> None:
    # the last hour burned hard, but the last five minutes are calm: it is over
    windows = quiet() | {3600.0: Events(98_000, 100_000)}
    slo = figures(0.999, Events(MILLION - 200, MILLION), windows)
    assert not slo.firing and decide("availability", slo).tier is Tier.NORMAL


def test_a_slow_burn_does_not_freeze_releases() -> None:
    windows = quiet() | {86400.0: Events(99_600, 100_000), 7200.0: Events(99_600, 100_000)}
    slo = figures(0.999, Events(MILLION - 200, MILLION), windows)
    assert [p.label for p in slo.firing] == ["1d&2h"]  # 4× > 3×
    assert decide("availability", slo).tier is Tier.NORMAL
    strict = PolicyTiers(fast_burn_factor=3.0)
    assert decide("availability", slo, strict).tier is Tier.FROZEN


def test_no_events_leave_the_budget_unknown_and_releases_normal() -> None:
    slo = figures(0.999, Events(0, 0), {})
    assert slo.availability is None and slo.budget_remaining is None
    assert all(rate is None for rate in slo.burn_rates.values())
    decision = decide("availability", slo)
    assert decision.tier is Tier.NORMAL and "unknown" in decision.reason


def test_the_strictest_objective_wins_and_every_reason_is_kept() -> None:
    ok = figures(0.999, Events(MILLION - 100, MILLION), quiet())
    slow = figures(0.99, Events(MILLION - 9_000, MILLION), quiet())  # latency: 10% left
    decision = decide_all({"availability": ok, "latency": slow})
    assert decision.tier is Tier.OVERRIDE
    assert decision.reason.startswith("availability SLO 99.9%")
    assert "latency SLO 99%" in decision.reason and "needs an override" in decision.reason


def test_configured_tiers_move_the_thresholds() -> None:
    slo = figures(0.999, Events(MILLION - 600, MILLION), quiet())  # 40% left
    assert decide("availability", slo).tier is Tier.APPROVAL
    assert decide("availability", slo, PolicyTiers(0.3, 0.1)).tier is Tier.NORMAL
    assert decide("availability", slo, PolicyTiers(0.9, 0.5)).tier is Tier.OVERRIDE
    with pytest.raises(ValueError, match="overrideBelow ≤ approvalBelow"):
        PolicyTiers(0.2, 0.5)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        figures(1.0, Events(1, 1), {})


@pytest.mark.parametrize(
    ("seconds", "label"),
    [(300, "5m"), (1800, "30m"), (3600, "1h"), (7200, "2h"), (86400, "1d"), (30 * 86400, "30d")],
)
def test_window_labels(seconds: float, label: str) -> None:
    assert window_label(seconds) == label
