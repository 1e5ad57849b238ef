"""The e-values against brute force, and their validity by Monte Carlo (fixed seeds)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

from analysis.evalue import (
    combine_steps,
    log_betainc,
    log_evalue_upper,
    mixture_log_evalue,
    prior_params,
    ratio_for_theta,
    restart_weights,
    theta0_for_ratio,
    theta_bounds,
    theta_bounds_scalar,
)


def brute_force_log_evalue(x: int, y: int, theta0: float, concentration: float) -> float:
    """∫_{θ0}^1 θ^x (1-θ)^y π(θ) dθ / (θ0^x (1-θ0)^y), π the Beta prior cut to (θ0, 1)."""
    mpmath.mp.dps = 40
    a, b = prior_params(theta0, concentration)
    t0 = mpmath.mpf(theta0)

    def prior(t: mpmath.mpf) -> mpmath.mpf:
        return t ** (a - 1) * (1 - t) ** (b - 1)

    def lik_ratio(t: mpmath.mpf) -> mpmath.mpf:
        return (t / t0) ** x * ((1 - t) / (1 - t0)) ** y

    norm = mpmath.quad(prior, [t0, 1])
    num = mpmath.quad(lambda t: prior(t) * lik_ratio(t), [t0, (t0 + 1) / 2, 1])
    return float(mpmath.log(num / norm))


@pytest.mark.parametrize(
    ("x", "y", "theta0", "kappa"),
    [
        (0, 5, 0.1, 10),
        (3, 10, 0.1176, 10),
        (27, 25, 0.1176, 10),
        (40, 300, 0.1176, 10),
        (154, 75, 0.5455, 10),
        (12, 1000, 0.05, 10),
        (80, 920, 0.05, 20),
        (5, 0, 0.3, 2),
    ],
)
def test_evalue_matches_numerical_integration(x: int, y: int, theta0: float, kappa: float) -> None:
    assert mixture_log_evalue(x, y, theta0, kappa) == pytest.approx(
        brute_force_log_evalue(x, y, theta0, kappa), rel=1e-8, abs=1e-8
    )


@pytest.mark.parametrize(
    ("a", "b", "x"),
    # scipy underflows to 0 for the first two, is below 1e-280 for the third
    [(60_000.0, 300.0, 0.95), (40_000.0, 200.0, 0.95), (20_000.0, 100.0, 0.95), (5.0, 7.0, 0.3)],
)
def test_log_betainc_is_exact_far_into_the_tail(a: float, b: float, x: float) -> None:
    mpmath.mp.dps = 30
    expected = float(mpmath.log(mpmath.betainc(a, b, 0, x, regularized=True)))
    assert log_betainc(a, b, x) == pytest.approx(expected, rel=1e-10)


def test_evalue_is_small_when_canary_is_far_better_than_the_bound() -> None:
    # 0.5% errors against a 5% guard over 150k requests: no evidence at all
    # (a floored tail used to turn this into e^709).
    assert mixture_log_evalue(761, 149_174, 0.05, 10) < -5


def test_evalue_grows_with_canary_events_and_shrinks_with_stable_events() -> None:
    base = mixture_log_evalue(20, 100, 0.12, 10)
    assert mixture_log_evalue(30, 100, 0.12, 10) > base
    assert mixture_log_evalue(20, 150, 0.12, 10) < base
    assert mixture_log_evalue(0, 0, 0.12, 10) == 0.0


def test_evalue_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="theta0"):
        mixture_log_evalue(1, 1, 1.0, 10)
    with pytest.raises(ValueError, match="non-negative"):
        mixture_log_evalue(-1, 1, 0.5, 10)


def test_theta0_and_ratio_are_inverse() -> None:
    for w in (0.1, 0.5, 0.9):
        for r in (0.5, 1.2, 2.0, 10.0):
            assert ratio_for_theta(w, theta0_for_ratio(w, r)) == pytest.approx(r)
    # equal rates: a bad event is the canary's with probability equal to its share
    assert theta0_for_ratio(0.1, 1.0) == pytest.approx(0.1)


def test_combine_steps_is_a_convex_mixture() -> None:
    assert sum(restart_weights(3)) == pytest.approx(1.0)
    assert combine_steps([], 3) == 0.0
    # before any evidence, every term is 1
    assert combine_steps([0.0], 3) == pytest.approx(0.0)
    # a strong first step counts at the first step's weight plus the unstarted mass
    assert combine_steps([math.log(1000.0)], 3) == pytest.approx(math.log(0.8 * 1000 + 0.2))
    # ... and a weak one the unstarted mass plus what is left of it; huge ones stay finite
    assert combine_steps([-3.0], 3) == pytest.approx(math.log(0.8 * math.exp(-3.0) + 0.2))
    assert combine_steps([800.0], 3) == pytest.approx(800.0 + math.log(0.8))
    # a hopeless first step does not mask a later regression
    late = combine_steps([-50.0, math.log(1000.0)], 3)
    assert late == pytest.approx(math.log(0.1 * 1000 + 0.1 + 0.8 * math.exp(-50) * 1000))


def _false_rollback_rate(
    rng: np.random.Generator, runs: int, theta: float, theta0: float, looks: int, per_look: int
) -> float:
    """Share of runs where the e-value ever reaches 1/α at any of ``looks`` looks."""
    threshold = math.log(100.0)
    rejected = 0
    for _ in range(runs):
        events = rng.binomial(1, theta, size=looks * per_look)
        x = np.cumsum(events)[per_look - 1 :: per_look]
        n = np.arange(1, looks + 1) * per_look
        if any(
            mixture_log_evalue(int(xi), int(ni - xi), theta0, 10) >= threshold
            for xi, ni in zip(x, n, strict=True)
        ):
            rejected += 1
    return rejected / runs


def test_false_rollback_rate_at_the_null_boundary_is_below_alpha() -> None:
    """H0 at its boundary θ = θ0, looked at 60 times: Ville's inequality holds."""
    rng = np.random.default_rng(20261122)
    theta0 = theta0_for_ratio(0.1, 1.2)
    rate = _false_rollback_rate(rng, runs=2000, theta=theta0, theta0=theta0, looks=60, per_look=10)
    # α = 0.01; 2000 runs: the 99.9% upper binomial bound of 0.01 is ≈ 0.0175
    assert rate <= 0.0175, rate


def test_the_same_test_detects_a_real_regression() -> None:
    """The validity test above must not pass by never rejecting: 2× errors are caught."""
    rng = np.random.default_rng(7)
    theta0 = theta0_for_ratio(0.1, 1.2)
    theta_2x = theta0_for_ratio(0.1, 2.0)
    rate = _false_rollback_rate(rng, runs=300, theta=theta_2x, theta0=theta0, looks=60, per_look=10)
    assert rate >= 0.8


def test_restart_mixture_stays_valid_across_steps() -> None:
    """Three steps at the null boundary, combined: still at most α false rollbacks."""
    rng = np.random.default_rng(11)
    threshold = math.log(100.0)
    runs, rejected = 1500, 0
    weights = (0.1, 0.5, 0.9)
    for _ in range(runs):
        done: list[float] = []
        hit = False
        for w in weights:
            theta0 = theta0_for_ratio(w, 1.2)
            events = rng.binomial(1, theta0, size=200)
            x = np.cumsum(events)[9::10]
            for i, xi in enumerate(x):
                n = (i + 1) * 10
                step = mixture_log_evalue(int(xi), n - int(xi), theta0, 10)
                if combine_steps([*done, step], len(weights)) >= threshold:
                    hit = True
                    break
            if hit:
                break
            done.append(step)
        rejected += hit
    assert rejected / runs <= 0.019  # α = 0.01 plus the 99.9% sampling margin at 1500 runs


@pytest.mark.parametrize("stable_rate", [0.36, 0.8])
def test_comparison_stays_valid_when_bad_events_are_frequent(stable_rate: float) -> None:
    """Latency 'bad events' (slower than the p50 edge) are common, unlike errors: the
    binomial reduction of design §5 must still hold α at the null boundary."""
    rng = np.random.default_rng(3)
    tol, looks, nc, ns = 0.2, 60, 100, 900
    theta0 = theta0_for_ratio(nc / (nc + ns), 1 + tol)
    runs, rejected = 400, 0
    for _ in range(runs):
        x = np.cumsum(rng.binomial(nc, stable_rate * (1 + tol), looks))
        y = np.cumsum(rng.binomial(ns, stable_rate, looks))
        rejected += any(
            mixture_log_evalue(int(a), int(b), theta0, 10) >= math.log(100)
            for a, b in zip(x, y, strict=True)
        )
    assert rejected / runs <= 0.025


def test_confidence_sequence_covers_the_true_ratio_at_all_looks_at_once() -> None:
    """95% sequence: the true ratio is outside it at *any* of 40 looks in ≤ 5% of runs."""
    rng = np.random.default_rng(17)
    runs, looks, w, ratio, stable_rate = 600, 40, 0.1, 2.0, 0.01
    nc, ns = 200, 1800
    theta_true = theta0_for_ratio(w, ratio)
    x = np.cumsum(rng.binomial(nc, stable_rate * ratio, (runs, looks)), axis=1)
    y = np.cumsum(rng.binomial(ns, stable_rate, (runs, looks)), axis=1)
    missed = np.zeros(runs, dtype=bool)
    for look in range(looks):
        lo, hi = theta_bounds(x[:, look], y[:, look], 0.025, 10)
        missed |= (theta_true < lo) | (theta_true > hi)
    assert missed.mean() <= 0.05
    # and the sequence is informative: at the last look it excludes ratio 1
    lo, _ = theta_bounds(x[:, -1], y[:, -1], 0.025, 10)
    assert (lo > theta0_for_ratio(w, 1.0)).mean() >= 0.9


def test_scalar_and_vectorised_evalues_agree() -> None:
    xs, ys = np.array([0, 3, 27, 154, 761]), np.array([5, 10, 25, 75, 149_174])
    thetas = np.array([0.1, 0.1176, 0.1176, 0.5455, 0.05])
    vector = log_evalue_upper(xs, ys, thetas, 10)
    for x, y, t, v in zip(xs, ys, thetas, vector, strict=True):
        assert mixture_log_evalue(int(x), int(y), float(t), 10) == pytest.approx(v, rel=1e-12)
    lo_v, hi_v = theta_bounds(xs, ys, 0.025, 10)
    for x, y, lo, hi in zip(xs, ys, lo_v, hi_v, strict=True):
        assert theta_bounds_scalar(int(x), int(y), 0.025, 10) == pytest.approx((lo, hi), rel=1e-9)


def test_combine_steps_with_a_single_step_is_that_step() -> None:
    assert combine_steps([3.0], 1) == 3.0
