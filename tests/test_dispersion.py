"""Overdispersion: the block sums, the estimates, the widening, and the rollouts it
keeps within α (Monte Carlo with fixed seeds)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from analysis.counts import ArmCounts
from analysis.dispersion import (
    BLOCK_S,
    PRIOR_V,
    Blocks,
    Moments,
    arm_dispersion,
    error_inflation,
    extra_variance,
    inflation,
)
from analysis.engine import ERRORS, ERRORS_LIMIT, Settings, StepData, evaluate
from analysis.verdict import CheckStatus, Decision
from canaryd.simulate import simulate_once
from canaryd.spec import parse_spec
from simulator import Event, Scenario, Traffic, VersionSpec, get_scenario


def blocks_of(rng: np.random.Generator, n: int, rate: float, v: float, k: int) -> Moments:
    """``k`` blocks of ``n`` requests with a Gamma(mean 1, variance v) rate multiplier."""
    m = Moments()
    for _ in range(k):
        g = rng.gamma(1.0 / v, v) if v > 0 else 1.0
        m = m.add(n, int(rng.poisson(n * rate * g)))
    return m


def test_moments_add_up_and_round_trip() -> None:
    m = Moments().add(100, 3).add(200, 1)
    c = m.current
    assert (c.blocks, c.n, c.n2, c.n3, c.b, c.b2, c.bn) == (2, 300, 50_000, 9_000_000, 4, 10, 500)
    assert Moments.from_list(m.as_list()) == m
    assert Moments.from_list([1.0, 2.0]) == Moments()  # a damaged record: start again


def test_independent_requests_show_a_dispersion_of_one() -> None:
    rng = np.random.default_rng(1)
    d_hats = [blocks_of(rng, 6000, 0.005, 0.0, 30).pearson() for _ in range(200)]
    assert all(d is not None for d in d_hats)
    mean = float(np.mean([d[0] for d in d_hats if d is not None]))
    assert mean == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("v", [0.05, 0.25])
def test_the_multiplier_variance_is_recovered(v: float) -> None:
    rng = np.random.default_rng(2)
    # stable 27 and canary 3 errors a block, as at 10% of 100 req/s with 0.5% errors
    stable = blocks_of(rng, 5400, 0.005, v, 400)
    canary = blocks_of(rng, 600, 0.005, v, 400)
    num_s, den_s = stable.excess()
    num_c, den_c = canary.excess()
    assert (num_s + num_c) / (den_s + den_c) == pytest.approx(v, rel=0.25)
    # what the test uses is raised by 1.5 relative standard errors (7% with 400 blocks)
    assert extra_variance(stable, canary) > (num_s + num_c) / (den_s + den_c)
    d_hat, _ = stable.pearson() or (0.0, 0.0)
    assert d_hat == pytest.approx(1 + v * 27, rel=0.25)


def test_no_blocks_yet_means_the_prior() -> None:
    assert extra_variance(Moments(), Moments()) == PRIOR_V
    one = Moments().add(6000, 30)
    assert extra_variance(one, one) == PRIOR_V


def test_an_arms_own_bursts_raise_its_dispersion_beyond_the_shared_drift() -> None:
    calm = Moments()
    for b in (3, 2, 4, 3, 3, 2, 4, 3):
        calm = calm.add(600, b)
    burst = calm.add(600, 35)
    assert arm_dispersion(calm, 0.0, 3.0) == pytest.approx(1.0)
    assert arm_dispersion(burst, 0.0, 3.0) > 10.0
    assert arm_dispersion(calm, 0.25, 3.0) == pytest.approx(1.75)


def test_inflation_matches_the_simulated_variance_of_the_canary_share() -> None:
    """φ is the variance of the canary's share of bad events over the binomial's."""
    rng = np.random.default_rng(3)
    v, k, mu_c, mu_s = 0.25, 10, 3.0, 27.0  # per block
    theta = mu_c / (mu_c + mu_s)
    gc = rng.gamma(1 / v, v, size=(20_000, k))
    gs = rng.gamma(1 / v, v, size=(20_000, k))
    x = rng.poisson(mu_c * gc).sum(axis=1)
    y = rng.poisson(mu_s * gs).sum(axis=1)
    share_var = np.var(x - theta * (x + y))
    xb, yb = rng.poisson(mu_c * k, 20_000), rng.poisson(mu_s * k, 20_000)
    binomial_var = np.var(xb - theta * (xb + yb))
    phi = inflation(theta, mu_c * k, mu_s * k, 1 + v * mu_c, 1 + v * mu_s)
    assert phi == pytest.approx(share_var / binomial_var, rel=0.1)
    assert inflation(theta, mu_c * k, mu_s * k, 1.0, 1.0) == 1.0


def test_error_inflation_uses_the_windows_block_length() -> None:
    rng = np.random.default_rng(4)
    stable = blocks_of(rng, 5400, 0.005, 0.25, 30)
    canary = blocks_of(rng, 600, 0.005, 0.25, 30)
    theta = 0.1
    short = error_inflation(theta, 5400, 600, 30, BLOCK_S, stable, canary)
    # ten blocks' worth of requests in ten blocks: the same per-block level, same φ
    long = error_inflation(theta, 54000, 6000, 300, 10 * BLOCK_S, stable, canary)
    assert short == pytest.approx(long)
    # ten blocks' worth of requests in one block: ten times the level, more drift
    dense = error_inflation(theta, 54000, 6000, 300, BLOCK_S, stable, canary)
    assert dense > 3 * short
    assert error_inflation(theta, 5400, 600, 0, BLOCK_S, stable, canary) == 1.0


def test_blocks_close_after_a_minute_and_a_repeated_reading_changes_nothing() -> None:
    b = Blocks(0.0, (0, 0), (0, 0))
    assert b.advance(30.0, (3000, 15), (300, 1)) is b
    closed = b.advance(60.0, (6000, 30), (600, 3))
    assert closed.stable == Moments().add(6000, 30)
    assert closed.canary == Moments().add(600, 3)
    assert (closed.started_s, closed.stable_at, closed.canary_at) == (60.0, (6000, 30), (600, 3))
    assert closed.advance(60.0, (6000, 30), (600, 3)) is closed
    # the open block counts, so that a burst is dispersion as soon as it is evidence
    s, c = closed.including((9000, 45), (900, 40))
    assert s == closed.stable.add(3000, 15)
    assert c == closed.canary.add(300, 37)
    # a counter reset: the block starts again, nothing added
    reset = closed.advance(130.0, (100, 1), (10, 0))
    assert reset.stable == closed.stable and reset.started_s == 130.0


def data(
    canary: tuple[int, int],
    stable: tuple[int, int],
    blocks: tuple[Moments, Moments] | None,
    elapsed_s: float = 600.0,
) -> StepData:
    return StepData(
        steps=(10, 50, 100),
        step_index=0,
        elapsed_s=elapsed_s,
        canary=ArmCounts(*canary),
        stable=ArmCounts(*stable),
        prior_log_e={},
        error_blocks=blocks,
    )


def test_the_error_comparison_is_widened_by_the_dispersion_the_blocks_show() -> None:
    rng = np.random.default_rng(5)
    bursty = (blocks_of(rng, 5400, 0.005, 0.25, 10), blocks_of(rng, 600, 0.005, 0.25, 10))
    calm = (blocks_of(rng, 5400, 0.005, 0.0, 10), blocks_of(rng, 600, 0.005, 0.0, 10))
    counts = ((6000, 60), (54000, 270))  # canary at 2× stable
    plain = evaluate(Settings(), data(*counts, None))
    widened = evaluate(Settings(), data(*counts, bursty))
    quiet = evaluate(Settings(), data(*counts, calm))
    p, w, q = (next(c for c in v.checks if c.name == ERRORS) for v in (plain, widened, quiet))
    assert p.status is CheckStatus.BREACH
    assert w.status is CheckStatus.OK  # 2× is within what the noise explains
    assert "overdispersed" in w.reason
    assert w.stats["dispersion_factor"] > 2.0
    assert q.stats["dispersion_factor"] == pytest.approx(1.0, abs=0.15)
    assert q.status is CheckStatus.BREACH


def test_a_shared_incident_is_still_seen_when_the_limit_is_widened() -> None:
    calm = Moments()
    for _ in range(5):
        calm = calm.add(600, 3)
    stable_calm = Moments()
    for _ in range(5):
        stable_calm = stable_calm.add(5400, 27)
    # both arms at 20% errors in the open block: dispersion, and a shared incident
    blocks = (stable_calm.add(5400, 1080), calm.add(600, 120))
    verdict = evaluate(Settings(), data((600, 120), (5400, 1080), blocks, elapsed_s=60))
    limit = next(c for c in verdict.checks if c.name == ERRORS_LIMIT)
    assert limit.status is CheckStatus.SHARED
    assert verdict.decision is Decision.HOLD


def rollbacks(name: str, runs: int) -> int:
    spec = parse_spec({"analysis": {"interval": "10s"}})
    scenario = get_scenario(name)
    return sum(simulate_once(spec, scenario, seed).outcome == "rolled_back" for seed in range(runs))


def test_overdispersed_healthy_canaries_stay_within_alpha() -> None:
    """Without the widening, 16% of these rollouts (CV 0.5 a minute, per arm) are rolled
    back; with it about 0.5% (bench/README.md has the 1,000-run figures)."""
    assert rollbacks("bursty-healthy", 60) <= 2


def test_a_clients_bursts_do_not_roll_a_healthy_canary_back() -> None:
    assert rollbacks("client-bursts", 40) <= 2


def test_independent_requests_keep_their_detection() -> None:
    assert rollbacks("error-regression", 20) == 20


def test_the_rollout_keeps_its_blocks_in_status() -> None:
    from canaryd.status import CanaryStatus

    spec = parse_spec({"analysis": {"interval": "10s"}})
    seen: list[CanaryStatus] = []
    simulate_once(spec, get_scenario("healthy"), 0, on_sample=lambda _s, st: seen.append(st))
    with_blocks = [st for st in seen if st.blocks is not None]
    assert with_blocks
    last = with_blocks[-1].blocks
    assert last is not None
    # the last step's blocks, with the earlier steps' figures folded in
    assert Moments.from_list(last.stable).dof >= 15
    for st in with_blocks:
        window = st.blocks.window_started_at if st.blocks else None
        assert window is not None and st.step_started_at is not None
        assert window <= st.step_started_at
    # a block is never older than a minute and a reading
    for st in with_blocks:
        assert st.blocks is not None and st.step_started_at is not None
        assert st.blocks.started_at >= st.step_started_at - timedelta(seconds=1)
    assert isinstance(last.started_at, datetime) and last.started_at.tzinfo is UTC


def test_a_change_of_rate_between_steps_is_not_dispersion() -> None:
    """Each step's blocks are measured around that step's own rates: a canary whose
    errors jump ×5 when its 50% step begins is caught within three minutes, not held
    back by a dispersion estimate that takes the jump for noise (it was, before steps
    were told apart: φ ≈ 9 and four minutes)."""
    spec = parse_spec({})
    jump = Scenario(
        name="jump",
        duration_s=3600,
        traffic=Traffic(rps=100),
        stable=VersionSpec(),
        canary=VersionSpec(),
        events=(Event(at_s=600, version="canary", error_rate=0.025),),
    )
    times = []
    for seed in range(10):
        result = simulate_once(spec, jump, seed)
        assert result.outcome == "rolled_back"
        times.append(result.duration_s - 600)
    assert sorted(times)[5] <= 180


def test_folding_a_step_keeps_its_figures_and_starts_a_new_one() -> None:
    rng = np.random.default_rng(3)
    first = blocks_of(rng, 3000, 0.005, 0.0, 10)
    folded = first.fold()
    assert folded.current.blocks == 0 and folded.current.n == 0
    assert folded.excess() == first.excess() and folded.pearson() == first.pearson()
    assert folded.dof == first.dof == 9
    # a second step at another rate: pooled, not one rate for both
    second = folded
    for _ in range(10):
        second = second.add(3000, int(rng.poisson(75)))
    d_hat, _ = second.pearson() or (0.0, 0.0)
    assert d_hat < 2.0  # one rate over both steps would see D ≈ 20
    assert Moments.from_list(second.as_list()) == second
