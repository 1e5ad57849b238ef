"""Tests of the simulator: the fake of Prometheus and of the mesh.

Every random draw uses a fixed seed, so each test is deterministic; statistical
assertions still use bounds of a few standard deviations, so they would fail on a
wrong model rather than on an unlucky seed.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from analysis.counts import LATENCY_EDGES_MS, N_BUCKETS, ArmCounts, Observation
from simulator import (
    BUILTIN_SCENARIOS,
    Z99,
    Behaviour,
    Event,
    Latency,
    Mesh,
    Scenario,
    ScenarioError,
    Simulation,
    Traffic,
    VersionSpec,
    VirtualClock,
    daily_factor,
    daily_factor_mean,
    get_scenario,
    load_scenario_file,
    load_scenario_text,
)
from simulator.traffic import MIN_SIGMA

EXAMPLE_YAML = """\
name: checkout-2x-errors
description: optional free text
duration_s: 3600                     # optional, default 3600; virtual run length
traffic: {rps: 100}                  # total requests per second; optional daily: true, start_hour: 9
stable: {error_rate: 0.005, latency_ms: {p50: 40, p99: 180}}
canary: {error_rate: 0.010, latency_ms: {p50: 40, p99: 180}}
events:                              # optional; each changes one version from at_s on
  - {at_s: 300, version: canary, error_rate: 0.05}
  - {at_s: 600, version: both, latency_ms: {p99: 400}}   # version: stable | canary | both
"""  # noqa: E501 - the example from the design brief, verbatim

BUILTIN_NAMES = (
    "healthy",
    "error-spike",
    "error-regression",
    "latency-regression",
    "latency-tail",
    "gradual-degradation",
    "low-traffic",
    "bursty-healthy",
    "bursty-regression",
    "client-bursts",
    "stable-incident",
    "abtest-healthy",
    "abtest-regression",
    "bluegreen-healthy",
    "bluegreen-regression",
)


def make_scenario(
    *,
    rps: float = 100.0,
    stable_error: float = 0.005,
    canary_error: float = 0.005,
    stable_latency: tuple[float, float] = (40.0, 180.0),
    canary_latency: tuple[float, float] = (40.0, 180.0),
    events: tuple[Event, ...] = (),
    daily: bool = False,
    start_hour: float = 9.0,
) -> Scenario:
    return Scenario(
        name="test",
        traffic=Traffic(rps=rps, daily=daily, start_hour=start_hour),
        stable=VersionSpec(
            error_rate=stable_error,
            latency_ms=Latency(p50=stable_latency[0], p99=stable_latency[1]),
        ),
        canary=VersionSpec(
            error_rate=canary_error,
            latency_ms=Latency(p50=canary_latency[0], p99=canary_latency[1]),
        ),
        events=events,
    )


def assert_within_sd(observed: float, expected: float, sd: float, k: float = 4.0) -> None:
    assert abs(observed - expected) <= k * sd, (observed, expected, sd)


def bucket_index(latency_ms: float) -> int:
    """Index of the histogram bucket (edge i-1, edge i] holding ``latency_ms``."""
    for i, edge in enumerate(LATENCY_EDGES_MS):
        if latency_ms <= edge:
            return i
    return len(LATENCY_EDGES_MS)


def median_bucket(arm: ArmCounts) -> int:
    """Index of the bucket holding the histogram-implied median."""
    return next(i for i, c in enumerate(arm.latency_buckets) if 2 * c >= arm.requests)


def arms(obs: Observation) -> tuple[ArmCounts, ArmCounts]:
    assert obs.stable is not None
    assert obs.canary is not None
    return obs.stable, obs.canary


# --------------------------------------------------------------------------- traffic.py


@pytest.mark.parametrize(("p50", "p99"), [(40.0, 180.0), (60.0, 270.0), (3.0, 2000.0)])
def test_lognormal_fit_reproduces_quantiles(p50: float, p99: float) -> None:
    mu, sigma = Behaviour(0.0, p50, p99).lognormal_params()
    assert mu == pytest.approx(math.log(p50))
    assert sigma == pytest.approx((math.log(p99) - math.log(p50)) / Z99)
    samples = np.random.default_rng(12345).lognormal(mu, sigma, 200_000)
    assert np.median(samples) == pytest.approx(p50, rel=0.02)
    assert np.quantile(samples, 0.99) == pytest.approx(p99, rel=0.02)


def test_z99_is_the_normal_99th_percentile() -> None:
    assert math.isclose(Z99, float(stats.norm.ppf(0.99)), rel_tol=1e-12)


@pytest.mark.parametrize(("p50", "p99"), [(40.0, 180.0), (60.0, 270.0), (0.7, 0.9), (5e4, 4e6)])
def test_bucket_probabilities_match_scipy_lognorm(p50: float, p99: float) -> None:
    behaviour = Behaviour(0.01, p50, p99)
    probs = behaviour.bucket_probabilities()
    mu, sigma = behaviour.lognormal_params()
    cdf = stats.lognorm(s=sigma, scale=math.exp(mu)).cdf(np.array(LATENCY_EDGES_MS))
    expected = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    assert probs.shape == (N_BUCKETS,)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs, expected, atol=1e-12)


def test_bucket_probabilities_are_cached_and_read_only() -> None:
    first = Behaviour(0.0, 41.0, 190.0).bucket_probabilities()
    second = Behaviour(0.5, 41.0, 190.0).bucket_probabilities()
    assert first is second
    with pytest.raises(ValueError, match="read-only"):
        first[0] = 1.0


def test_equal_p50_and_p99_uses_a_minimal_sigma() -> None:
    behaviour = Behaviour(0.0, 70.0, 70.0)
    _, sigma = behaviour.lognormal_params()
    assert sigma == MIN_SIGMA
    probs = behaviour.bucket_probabilities()
    assert probs[bucket_index(70.0)] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("error_rate", "p50", "p99"),
    [(-0.1, 40.0, 180.0), (1.1, 40.0, 180.0), (0.0, 0.0, 180.0), (0.0, 50.0, 40.0)],
)
def test_behaviour_rejects_invalid_values(error_rate: float, p50: float, p99: float) -> None:
    with pytest.raises(ValueError):
        Behaviour(error_rate, p50, p99)


def test_daily_factor_shape() -> None:
    t_s = np.arange(0.0, 86400.0, 10.0)
    values = np.array([daily_factor(t, 0.0) for t in t_s])
    assert values.mean() == pytest.approx(1.0, abs=1e-9)
    assert values.min() == pytest.approx(0.5)
    assert values.max() == pytest.approx(1.5)
    assert t_s[values.argmin()] == 3 * 3600.0
    assert t_s[values.argmax()] == 15 * 3600.0
    # Starting at 09:00, 03:00 comes 18 h later and 15:00 after 6 h.
    assert daily_factor(18 * 3600.0, 9.0) == pytest.approx(0.5)
    assert daily_factor(6 * 3600.0, 9.0) == pytest.approx(1.5)
    assert daily_factor(0.0, 9.0) == pytest.approx(1.0)
    assert daily_factor(86400.0 + 123.0, 9.0) == pytest.approx(daily_factor(123.0, 9.0))


@pytest.mark.parametrize(("t0_s", "t1_s"), [(0.0, 10.0), (100.0, 7300.0), (5000.0, 95000.0)])
def test_daily_factor_mean_is_the_exact_average(t0_s: float, t1_s: float) -> None:
    grid = np.linspace(t0_s, t1_s, 20_001)
    values = np.array([daily_factor(t, 13.5) for t in grid])
    numeric = np.trapezoid(values, grid) / (t1_s - t0_s)
    assert daily_factor_mean(t0_s, t1_s, 13.5) == pytest.approx(numeric, rel=1e-7)
    assert daily_factor_mean(0.0, 86400.0, 13.5) == pytest.approx(1.0, abs=1e-12)
    assert daily_factor_mean(50.0, 50.0, 13.5) == daily_factor(50.0, 13.5)


# --------------------------------------------------------------------------- clock, mesh


def test_virtual_clock() -> None:
    clock = VirtualClock(5.0)
    assert clock.now_s == 5.0
    clock.advance(2.5)
    clock.advance(0.0)
    assert clock.now_s == 7.5
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    assert clock.now_s == 7.5
    assert VirtualClock().now_s == 0.0


def test_mesh_weights_sum_to_100() -> None:
    mesh = Mesh()
    assert (mesh.stable_weight_pct, mesh.canary_weight_pct) == (100, 0)
    for pct in (0, 10, 50, 100):
        mesh.set_canary_weight(pct)
        assert mesh.canary_weight_pct == pct
        assert mesh.stable_weight_pct + mesh.canary_weight_pct == 100
    for bad in (-1, 101):
        with pytest.raises(ValueError):
            mesh.set_canary_weight(bad)
    with pytest.raises(TypeError):
        mesh.set_canary_weight(12.5)  # type: ignore[arg-type]
    assert mesh.canary_weight_pct == 100


# --------------------------------------------------------------------------- engine


def test_long_run_matches_configuration() -> None:
    rps, weight, duration_s = 100.0, 30, 3600.0
    scenario = make_scenario(
        rps=rps, stable_error=0.01, canary_error=0.03, canary_latency=(80.0, 400.0)
    )
    sim = Simulation(scenario, seed=7)
    sim.set_canary_weight(weight)
    for _ in range(60):
        sim.advance(60.0)
    assert sim.now_s == duration_s
    stable, canary = arms(sim.observe())
    total = stable.requests + canary.requests
    expected_total = rps * duration_s
    assert_within_sd(total, expected_total, math.sqrt(expected_total))
    w = weight / 100
    assert_within_sd(canary.requests / total, w, math.sqrt(w * (1 - w) / total))
    for arm, rate in ((stable, 0.01), (canary, 0.03)):
        assert_within_sd(arm.error_ratio, rate, math.sqrt(rate * (1 - rate) / arm.requests))
    assert median_bucket(stable) == bucket_index(40.0)
    assert median_bucket(canary) == bucket_index(80.0)
    assert median_bucket(stable) != median_bucket(canary)


def test_histogram_tail_matches_p99() -> None:
    # p99 = 500 ms sits on an edge: exactly 1% of requests must be slower than it.
    sim = Simulation(make_scenario(rps=1000.0, stable_latency=(40.0, 500.0)), seed=3)
    sim.advance(600.0)
    stable, _ = arms(sim.observe())
    slow = stable.requests - stable.latency_buckets[LATENCY_EDGES_MS.index(500)]
    assert_within_sd(slow / stable.requests, 0.01, math.sqrt(0.0099 / stable.requests))


def test_daily_traffic_over_a_day_averages_the_base_rate() -> None:
    scenario = make_scenario(rps=20.0, daily=True, start_hour=0.0)
    sim = Simulation(scenario, seed=11)
    hourly = []
    for _ in range(24):
        before = sum(a.requests for a in arms(sim.observe()))
        sim.advance(3600.0)
        hourly.append(sum(a.requests for a in arms(sim.observe())) - before)
    expected = 20.0 * 86400.0
    assert_within_sd(sum(hourly), expected, math.sqrt(expected))
    assert int(np.argmin(hourly)) in (2, 3)  # the hour around 03:00
    assert int(np.argmax(hourly)) in (14, 15)  # the hour around 15:00


def test_one_long_advance_integrates_the_daily_curve() -> None:
    # From the 03:00 trough, the mean factor over the next 6 h is 1 - 1/pi (not the
    # 0.5 at the start nor the 0.646 at the midpoint).
    scenario = make_scenario(rps=10.0, daily=True, start_hour=3.0)
    expected = 10.0 * 6 * 3600.0 * (1.0 - 1.0 / math.pi)
    assert scenario.expected_requests(0.0, 6 * 3600.0) == pytest.approx(expected, rel=1e-12)
    assert scenario.rps_at(0.0) == pytest.approx(5.0)
    assert scenario.rps_at(12 * 3600.0) == pytest.approx(15.0)
    sim = Simulation(scenario, seed=17)
    sim.advance(6 * 3600.0)
    total = sum(a.requests for a in arms(sim.observe()))
    assert_within_sd(total, expected, math.sqrt(expected))


def test_weights_route_all_traffic() -> None:
    sim = Simulation(make_scenario(), seed=1)
    sim.advance(60.0)
    stable, canary = arms(sim.observe())
    assert stable.requests > 0
    assert canary == ArmCounts(0, 0, (0,) * N_BUCKETS)
    sim.set_canary_weight(100)
    sim.advance(60.0)
    stable_after, canary_after = arms(sim.observe())
    assert stable_after == stable
    assert canary_after.requests > 0


def check_invariants(previous: Observation, current: Observation) -> None:
    for before, after in zip(arms(previous), arms(current), strict=True):
        assert type(after.requests) is int
        assert type(after.errors) is int
        assert all(type(c) is int for c in after.latency_buckets)
        assert len(after.latency_buckets) == N_BUCKETS
        assert 0 <= after.errors <= after.requests
        assert after.latency_buckets[-1] == after.requests
        assert all(a <= b for a, b in itertools.pairwise(after.latency_buckets))
        assert after.requests >= before.requests
        assert after.errors >= before.errors
        if before.latency_buckets:
            assert all(
                a <= b for a, b in zip(before.latency_buckets, after.latency_buckets, strict=True)
            )
        delta = after - before
        assert 0 <= delta.errors <= delta.requests


def test_counters_are_monotonic_and_histograms_cumulative() -> None:
    sim = Simulation(get_scenario("stable-incident"), seed=5)
    rng = np.random.default_rng(99)
    previous = sim.observe()
    assert arms(previous) == (ArmCounts(0, 0, (0,) * N_BUCKETS),) * 2
    for _ in range(200):
        sim.set_canary_weight(int(rng.integers(0, 101)))
        sim.advance(float(rng.uniform(0.0, 30.0)))
        current = sim.observe()
        check_invariants(previous, current)
        previous = current
    stable, canary = arms(previous)
    assert stable.requests > 0
    assert canary.requests > 0


@settings(max_examples=40, derandomize=True, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    steps=st.lists(
        st.tuples(st.integers(0, 100), st.floats(0.0, 400.0, allow_nan=False)),
        min_size=1,
        max_size=15,
    ),
    name=st.sampled_from(BUILTIN_NAMES),
)
def test_invariants_hold_for_any_schedule(
    seed: int, steps: list[tuple[int, float]], name: str
) -> None:
    sim = Simulation(get_scenario(name), seed=seed)
    previous = sim.observe()
    elapsed_s = 0.0
    for weight, dt_s in steps:
        sim.set_canary_weight(weight)
        sim.advance(dt_s)
        elapsed_s += dt_s
        current = sim.observe()
        check_invariants(previous, current)
        previous = current
    assert sim.now_s == pytest.approx(elapsed_s)


def test_advance_rejects_negative_and_zero_is_a_no_op() -> None:
    sim = Simulation(make_scenario(), seed=0)
    sim.set_canary_weight(50)
    sim.advance(10.0)
    before = sim.observe()
    sim.advance(0.0)
    assert sim.observe() == before
    assert sim.now_s == 10.0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            sim.advance(bad)
    assert sim.now_s == 10.0
    with pytest.raises(ValueError):
        sim.set_canary_weight(101)


SWITCH_AT_300 = (Event(at_s=300.0, version="canary", error_rate=1.0),)


def test_event_splits_a_straddling_interval() -> None:
    scenario = make_scenario(stable_error=0.0, canary_error=0.0, events=SWITCH_AT_300)
    sim = Simulation(scenario, seed=21)
    sim.set_canary_weight(50)
    sim.advance(600.0)  # one call straddling the event
    stable, canary = arms(sim.observe())
    assert stable.errors == 0
    # Half of the canary's requests arrive after 300 s, and exactly those fail.
    assert_within_sd(canary.errors / canary.requests, 0.5, math.sqrt(0.25 / canary.requests))
    assert 0.48 < canary.errors / canary.requests < 0.52


def test_event_takes_effect_exactly_at_at_s() -> None:
    scenario = make_scenario(stable_error=0.0, canary_error=0.0, events=SWITCH_AT_300)
    sim = Simulation(scenario, seed=8)
    sim.set_canary_weight(50)
    sim.advance(299.5)
    before = arms(sim.observe())[1]
    assert before.requests > 0
    assert before.errors == 0
    sim.advance(0.5)  # now exactly 300 s
    at_300 = arms(sim.observe())[1]
    assert at_300.errors == 0
    sim.advance(100.0)
    after = arms(sim.observe())[1] - at_300
    assert after.requests > 0
    assert after.errors == after.requests


def test_splitting_at_a_change_point_equals_stopping_there() -> None:
    scenario = make_scenario(stable_error=0.0, canary_error=0.0, events=SWITCH_AT_300)
    straddling = Simulation(scenario, seed=4)
    stopping = Simulation(scenario, seed=4)
    for sim in (straddling, stopping):
        sim.set_canary_weight(40)
        sim.advance(250.0)
    straddling.advance(100.0)
    stopping.advance(50.0)
    at_300 = arms(stopping.observe())[1]
    stopping.advance(50.0)
    assert straddling.observe() == stopping.observe()
    # The straddling interval's canary errors are exactly the requests after 300 s.
    canary = arms(straddling.observe())[1]
    assert canary.errors == canary.requests - at_300.requests
    assert 0 < canary.errors < canary.requests


def test_rps_event_changes_total_traffic() -> None:
    scenario = make_scenario(rps=10.0, events=(Event(at_s=600.0, rps=100.0),))
    assert scenario.rps_at(599.0) == 10.0
    assert scenario.rps_at(600.0) == 100.0
    assert scenario.expected_requests(0.0, 1200.0) == pytest.approx(66_000.0)
    sim = Simulation(scenario, seed=2)
    sim.advance(600.0)
    first = sum(a.requests for a in arms(sim.observe()))
    sim.advance(600.0)
    second = sum(a.requests for a in arms(sim.observe())) - first
    assert_within_sd(first, 6_000.0, math.sqrt(6_000.0))
    assert_within_sd(second, 60_000.0, math.sqrt(60_000.0))


def test_promote_stable_makes_stable_follow_the_canary() -> None:
    scenario = make_scenario(
        stable_error=0.0,
        canary_error=1.0,
        canary_latency=(700.0, 700.0),
        events=(Event(at_s=300.0, version="canary", error_rate=0.0),),
    )
    sim = Simulation(scenario, seed=13)
    sim.advance(100.0)
    start = arms(sim.observe())[0]
    assert start.requests > 0
    assert start.errors == 0
    assert start.latency_buckets[bucket_index(700.0) - 1] == start.requests
    runs_before: str = sim.stable_runs
    sim.promote_stable()
    runs_after: str = sim.stable_runs
    assert (runs_before, runs_after) == ("stable", "canary")
    sim.advance(100.0)  # 100..200 s: stable now runs the canary version
    promoted = arms(sim.observe())[0] - start
    assert promoted.requests > 0
    assert promoted.errors == promoted.requests
    below_700 = promoted.latency_buckets[bucket_index(700.0) - 1]
    assert below_700 == 0
    assert promoted.latency_buckets[bucket_index(700.0)] == promoted.requests
    mid = arms(sim.observe())[0]
    sim.advance(200.0)  # 200..400 s: the canary's event at 300 s applies to stable too
    later = arms(sim.observe())[0] - mid
    assert 0 < later.errors < later.requests


def test_same_seed_same_observations_different_seed_different() -> None:
    def run(seed: int | np.random.Generator) -> list[Observation]:
        sim = Simulation(get_scenario("gradual-degradation"), seed=seed)
        observations = []
        for i, weight in enumerate((10, 10, 50, 50, 100)):
            sim.set_canary_weight(weight)
            sim.advance(10.0 * (i + 1))
            observations.append(sim.observe())
        return observations

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert run(np.random.default_rng(42)) == run(42)


# --------------------------------------------------------------------------- scenario


def test_example_yaml_loads() -> None:
    scenario = load_scenario_text(EXAMPLE_YAML)
    assert scenario.name == "checkout-2x-errors"
    assert scenario.duration_s == 3600.0
    assert scenario.traffic == Traffic(rps=100.0)
    assert scenario.canary.error_rate == 0.010
    assert scenario.change_points() == (300.0, 600.0)
    assert scenario.behaviour_at("canary", 299.9) == Behaviour(0.010, 40.0, 180.0)
    assert scenario.behaviour_at("canary", 300.0) == Behaviour(0.05, 40.0, 180.0)
    assert scenario.behaviour_at("canary", 600.0) == Behaviour(0.05, 40.0, 400.0)
    assert scenario.behaviour_at("stable", 600.0) == Behaviour(0.005, 40.0, 400.0)
    assert scenario.behaviour_at("stable", 599.0) == Behaviour(0.005, 40.0, 180.0)
    assert load_scenario_text(scenario.to_yaml()) == scenario


def test_defaults_apply() -> None:
    scenario = load_scenario_text("name: x\ntraffic: {rps: 5}\nstable: {}\ncanary: {}\n")
    assert scenario.duration_s == 3600.0
    assert scenario.description == ""
    assert scenario.events == ()
    assert scenario.traffic.daily is False
    assert scenario.traffic.start_hour == 9.0
    assert scenario.stable == VersionSpec(error_rate=0.005, latency_ms=Latency(p50=40, p99=180))


def test_events_apply_in_order_of_at_s() -> None:
    scenario = make_scenario(
        events=(
            Event(at_s=200.0, version="canary", error_rate=0.2),
            Event(at_s=100.0, version="canary", error_rate=0.1),
            Event(at_s=200.0, version="canary", error_rate=0.3),
        )
    )
    assert scenario.change_points() == (100.0, 200.0)
    assert scenario.behaviour_at("canary", 99.0).error_rate == 0.005
    assert scenario.behaviour_at("canary", 150.0).error_rate == 0.1
    assert scenario.behaviour_at("canary", 200.0).error_rate == 0.3  # same time: as written
    assert scenario.behaviour_at("stable", 500.0).error_rate == 0.005


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_scenario_round_trips(name: str) -> None:
    scenario = get_scenario(name)
    assert scenario.name == name
    assert any(ch.isdigit() for ch in scenario.description)
    assert "\n" not in scenario.description
    assert scenario.duration_s == 3600.0
    text = scenario.to_yaml()
    assert load_scenario_text(text) == scenario
    assert load_scenario_text(text).to_yaml() == text


def test_builtin_scenarios_have_the_documented_numbers() -> None:
    assert tuple(BUILTIN_SCENARIOS) == BUILTIN_NAMES
    baseline = Behaviour(0.005, 40.0, 180.0)
    for scenario in BUILTIN_SCENARIOS.values():
        assert scenario.behaviour_at("stable", 0.0) == baseline
        rps = 2.0 if scenario.name == "low-traffic" else 100.0
        assert scenario.rps_at(0.0) == rps

    def canary(name: str, t_s: float = 0.0) -> Behaviour:
        return get_scenario(name).behaviour_at("canary", t_s)

    assert canary("healthy") == baseline
    assert canary("low-traffic") == baseline
    assert canary("error-spike") == Behaviour(0.05, 40.0, 180.0)
    assert canary("error-regression") == Behaviour(0.010, 40.0, 180.0)
    assert canary("latency-regression") == Behaviour(0.005, 60.0, 270.0)
    assert canary("latency-tail") == Behaviour(0.005, 40.0, 360.0)
    assert canary("abtest-healthy") == baseline
    assert canary("abtest-regression") == Behaviour(0.025, 40.0, 180.0)
    assert canary("bluegreen-healthy") == baseline
    assert canary("bluegreen-regression") == Behaviour(0.025, 40.0, 180.0)
    assert {n for n, s in BUILTIN_SCENARIOS.items() if s.strategy == "abTest"} == {
        "abtest-healthy",
        "abtest-regression",
    }
    assert all(s.traffic.cohort_pct == 10 for s in BUILTIN_SCENARIOS.values())

    gradual = get_scenario("gradual-degradation")
    assert canary("gradual-degradation", 359.0) == baseline
    assert canary("gradual-degradation", 1800.0).error_rate == pytest.approx(0.05)
    assert canary("gradual-degradation", 3599.0).error_rate == pytest.approx(0.05)
    points = gradual.change_points()
    assert all(b - a == 60.0 for a, b in itertools.pairwise(points))
    assert points[0] <= 360.0
    assert points[-1] == 1800.0
    rates = [canary("gradual-degradation", t).error_rate for t in points]
    assert all(a < b for a, b in itertools.pairwise(rates))
    for t, rate in zip(points, rates, strict=True):  # linear in time
        assert rate == pytest.approx(0.005 + 0.045 * (t - 300.0) / 1500.0, abs=1e-6)
    assert all(e.version == "canary" for e in gradual.events)

    incident = get_scenario("stable-incident")
    for version in ("stable", "canary"):
        assert incident.behaviour_at(version, 299.0).error_rate == 0.005
        assert incident.behaviour_at(version, 300.0).error_rate == 0.08
        assert incident.behaviour_at(version, 899.0).error_rate == 0.08
        assert incident.behaviour_at(version, 900.0).error_rate == 0.005


def test_to_yaml_round_trips_every_feature() -> None:
    scenario = Scenario(
        name="everything",
        description="two lines:\nsecond line with 'quotes' and a: colon",
        duration_s=1234.5,
        traffic=Traffic(rps=12.25, daily=True, start_hour=22.5),
        stable=VersionSpec(error_rate=0.0, latency_ms=Latency(p50=1.5, p99=1.5)),
        canary=VersionSpec(error_rate=1.0, latency_ms=Latency(p50=3.0, p99=9000.0)),
        events=(
            Event(at_s=10.0, rps=30.0),
            Event(at_s=5.0, version="both", latency_ms={"p50": 2.0, "p99": 9000.0}),
            Event(at_s=20.0, version="stable", error_rate=0.125, rps=1.0),
        ),
    )
    assert load_scenario_text(scenario.to_yaml()) == scenario


def test_rps_only_event_needs_no_version_but_behaviour_events_do() -> None:
    assert Event(at_s=1.0, rps=5.0).targets == ()
    assert Event(at_s=1.0, version="both", error_rate=0.5).targets == ("stable", "canary")
    with pytest.raises(ScenarioError, match=r"events\[0\].*version"):
        load_scenario_text(
            "name: x\ntraffic: {rps: 1}\nstable: {}\ncanary: {}\n"
            "events: [{at_s: 3, error_rate: 0.1}]\n"
        )


@pytest.mark.parametrize(
    "event", ["{at_s: 3, version: canary}", "{at_s: 3, version: both, latency_ms: {}}"]
)
def test_event_must_change_something(event: str) -> None:
    text = f"name: x\ntraffic: {{rps: 1}}\nstable: {{}}\ncanary: {{}}\nevents: [{event}]\n"
    with pytest.raises(ScenarioError, match="events\\[0\\]: an event must change at least one"):
        load_scenario_text(text)


VALID_HEAD = "name: x\ntraffic: {rps: 1}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            VALID_HEAD + "stable: {}\ncanary: {eror_rate: 0.1}\n",
            "unknown field 'canary.eror_rate'; did you mean 'canary.error_rate'?",
        ),
        (
            VALID_HEAD + "stable: {}\ncanary: {latency_ms: {p50: 40, p90: 100}}\n",
            "did you mean 'canary.latency_ms.p99'?",
        ),
        (VALID_HEAD + "stable: {}\ncanary: {}\nevnets: []\n", "did you mean 'events'?"),
        (
            VALID_HEAD + "stable: {}\ncanary: {}\nevents: [{at_s: 1, version: both, rsp: 5}]\n",
            "unknown field 'events[0].rsp'; did you mean 'events[0].rps'?",
        ),
        (VALID_HEAD + "stable: {}\ncanary: {error_rate: 1.5}\n", "canary.error_rate"),
        (VALID_HEAD + "stable: {error_rate: -0.5}\ncanary: {}\n", "stable.error_rate"),
        ("name: x\ntraffic: {rps: 0}\nstable: {}\ncanary: {}\n", "traffic.rps"),
        (VALID_HEAD + "stable: {}\n", "missing required field 'canary'"),
        (
            VALID_HEAD + "stable: {latency_ms: {p50: 50, p99: 10}}\ncanary: {}\n",
            "stable.latency_ms: p99 (10 ms) must be >= p50 (50 ms)",
        ),
        (
            VALID_HEAD
            + "stable: {}\ncanary: {}\nevents:\n  - {at_s: 60, version: canary, error_rate: 0.1}\n"
            "  - {at_s: 600, version: canary, latency_ms: {p50: 500}}\n",
            "events[1] (at_s=600) leaves canary latency p99 180 ms below p50 500 ms",
        ),
        ("- just\n- a list\n", "expected a mapping"),
        ("", "empty"),
    ],
)
def test_scenario_error_messages(text: str, expected: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        load_scenario_text(text, source="my.yaml")
    message = str(caught.value)
    assert message.startswith("my.yaml: ")
    assert expected in message
    assert "pydantic" not in message


def test_scenario_error_chains_the_cause() -> None:
    with pytest.raises(ScenarioError) as caught:
        load_scenario_text(VALID_HEAD + "stable: {}\ncanary: {error_rate: 2}\n")
    assert caught.value.__cause__ is not None


def test_yaml_syntax_error_names_the_line() -> None:
    text = "name: x\ntraffic: {rps: 1\nstable: {}\ncanary: {}\n"
    with pytest.raises(ScenarioError, match=r"my\.yaml: YAML syntax error at line 3\b"):
        load_scenario_text(text, source="my.yaml")


def test_duplicate_keys_are_rejected_with_their_line() -> None:
    text = "name: x\ntraffic: {rps: 1}\nstable: {}\ncanary: {}\ncanary: {error_rate: 0.5}\n"
    with pytest.raises(ScenarioError, match=r"line 5.*duplicate key 'canary'"):
        load_scenario_text(text)


def test_load_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(EXAMPLE_YAML, encoding="utf-8")
    assert load_scenario_file(path) == load_scenario_text(EXAMPLE_YAML)
    assert load_scenario_file(str(path)).name == "checkout-2x-errors"

    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID_HEAD + "stable: {}\ncanary: {error_rate: 3}\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"bad\.yaml: canary\.error_rate"):
        load_scenario_file(bad)

    missing = tmp_path / "missing.yaml"
    with pytest.raises(ScenarioError, match=r"not found.*missing\.yaml") as caught:
        load_scenario_file(missing)
    assert isinstance(caught.value.__cause__, FileNotFoundError)

    with pytest.raises(ScenarioError, match="directory"):
        load_scenario_file(tmp_path)


def test_get_scenario_unknown_name() -> None:
    with pytest.raises(ScenarioError) as caught:
        get_scenario("helthy")
    message = str(caught.value)
    assert message.startswith("unknown scenario 'helthy'; built-in scenarios: healthy, ")
    assert ", ".join(BUILTIN_NAMES) in message
    assert "did you mean 'healthy'?" in message
    with pytest.raises(ScenarioError, match="unknown scenario 'zzz'") as caught:
        get_scenario("zzz")
    assert "did you mean" not in str(caught.value)


def test_scenario_models_are_frozen_and_strict() -> None:
    scenario = get_scenario("healthy")
    with pytest.raises(ValueError):
        scenario.name = "other"
    assert hash(scenario) == hash(load_scenario_text(scenario.to_yaml()))
    with pytest.raises(ScenarioError, match="start_hour"):
        load_scenario_text("name: x\ntraffic: {rps: 1, start_hour: 24}\nstable: {}\ncanary: {}\n")


def test_warmed_up_starts_at_zero_with_stable_history_only() -> None:
    from simulator import WARMUP_S, Simulation, get_scenario

    sim = Simulation.warmed_up(get_scenario("healthy"), seed=4)
    obs = sim.observe()
    assert sim.now_s == 0.0
    assert obs.canary is not None and obs.canary.requests == 0
    assert obs.stable is not None
    assert abs(obs.stable.requests - 100 * WARMUP_S) < 4 * (100 * WARMUP_S) ** 0.5


def _minute_errors(name: str, seed: int, minutes: int = 120) -> list[int]:
    sim = Simulation(get_scenario(name), seed=seed)
    sim.set_canary_weight(50)
    counts, previous = [], sim.observe()
    for _ in range(minutes):
        sim.advance(60.0)
        now = sim.observe()
        assert now.stable is not None and previous.stable is not None
        counts.append(now.stable.errors - previous.stable.errors)
        previous = now
    return counts


@pytest.mark.parametrize(
    ("name", "low", "high"),
    # stable serves ~3000 requests a minute at 0.5%: mean ~15 errors a minute.
    # Binomial: variance/mean ≈ 1.  Gamma CV 0.5: 1 + 15·0.25 ≈ 4.75.  Bursts of ~30
    # failed requests 12 times an hour, half on stable: ≈ 1 + 6·(2·30²−30)/(60·15) ≈ 6.8.
    [("healthy", 0.6, 1.5), ("bursty-healthy", 3.0, 7.0), ("client-bursts", 3.0, 12.0)],
)
def test_noise_makes_error_counts_overdispersed(name: str, low: float, high: float) -> None:
    counts = _minute_errors(name, seed=3)
    mean = sum(counts) / len(counts)
    variance = sum((c - mean) ** 2 for c in counts) / (len(counts) - 1)
    assert 12.0 < mean < (30.0 if name == "client-bursts" else 18.0)
    assert low < variance / mean < high
