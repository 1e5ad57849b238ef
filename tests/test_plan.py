"""``canaryd plan``: the expected-traffic path, its predictions against Monte Carlo
runs of the random simulator, the advice it gives, the CLI, and reading a live
service's traffic from a real Prometheus (backfilled with ``promtool``)."""

from __future__ import annotations

import io
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from analysis.counts import LATENCY_EDGES_MS
from canaryd.cli import main
from canaryd.plan import TrafficProfile, make_plan, run_path
from canaryd.simulate import simulate_once
from canaryd.spec import CanarySpec, parse_spec
from simulator import BUILTIN_SCENARIOS, Behaviour, Scenario, Traffic, get_scenario
from simulator.expected import ExpectedSimulation, two_point_multiplier
from tests.services import PrometheusServer, backfilled_prometheus, istio_openmetrics

# -- the expected-traffic simulation --------------------------------------------------------


def test_expected_counts_are_the_expectations_as_whole_counters() -> None:
    scenario = get_scenario("error-regression")
    sim = ExpectedSimulation(scenario)
    sim.set_canary_weight(10)
    previous = sim.observe()
    for _ in range(30):
        sim.advance(10.0)
        now = sim.observe()
        assert now.stable is not None and now.canary is not None
        assert previous.stable is not None and previous.canary is not None
        for arm, before in ((now.stable, previous.stable), (now.canary, previous.canary)):
            assert arm.requests >= before.requests and arm.errors >= before.errors
            assert list(arm.latency_buckets) == sorted(arm.latency_buckets)
            assert arm.latency_buckets[-1] == arm.requests
        previous = now
    final = sim.observe()
    assert final.stable is not None and final.canary is not None
    assert final.canary.requests == 3000 and final.stable.requests == 27000  # 100 rps, 300 s
    assert final.canary.errors == 30 and final.stable.errors == 135  # 1.0% and 0.5%
    slow = final.canary.requests - final.canary.latency_buckets[LATENCY_EDGES_MS.index(250)]
    p_slow = 1.0 - float(
        np.cumsum(Behaviour(0.01, 40, 180).bucket_probabilities())[LATENCY_EDGES_MS.index(250)]
    )
    assert slow == round(3000 * p_slow)


@pytest.mark.parametrize("cv", [0.3, 0.5, 1.0, 2.0])
def test_the_two_point_multiplier_has_the_gammas_mean_and_variance(cv: float) -> None:
    for arm in (0, 1):
        values = np.array([two_point_multiplier(cv, k, arm) for k in range(20_000)])
        assert values.min() >= 0.0
        assert values.mean() == pytest.approx(1.0, abs=0.01)
        assert values.var() == pytest.approx(cv * cv, rel=0.03)


def test_a_fork_plays_on_exactly_as_the_original() -> None:
    scenario = get_scenario("bursty-healthy")
    sim = ExpectedSimulation.warmed_up(scenario)
    sim.set_canary_weight(50)
    sim.advance(125.0)
    twin = sim.fork(scenario)
    for each in (sim, twin):
        each.advance(300.0)
    assert twin.observe() == sim.observe()


# -- predictions against Monte Carlo --------------------------------------------------------

RUNS = 41


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _simulated(spec: CanarySpec, scenario: Scenario) -> tuple[str, float]:
    """The Monte Carlo median outcome and its median time (∞ for the other outcome)."""
    results = [simulate_once(spec, scenario, seed) for seed in range(RUNS)]
    rolled = sum(r.outcome == "rolled_back" for r in results)
    outcome = "rolled_back" if rolled > RUNS // 2 else "promoted"
    times = [r.duration_s if r.outcome == outcome else math.inf for r in results]
    return outcome, _median(times)


CASES = [(name, "1m") for name in BUILTIN_SCENARIOS] + [
    ("error-regression", "10s"),
    ("latency-tail", "10s"),
    ("gradual-degradation", "10s"),
    ("low-traffic", "10s"),
]


@pytest.mark.parametrize(("name", "interval"), CASES)
def test_the_typical_path_is_within_20_percent_of_the_simulated_median(
    name: str, interval: str
) -> None:
    spec = parse_spec({"analysis": {"interval": interval}})
    scenario = get_scenario(name)
    path = run_path(spec, scenario)
    outcome, median_s = _simulated(spec, scenario)
    if math.isinf(median_s):  # most runs ended some other way (held at the end)
        assert path.outcome not in ("rolled_back", "promoted") or path.outcome != outcome
        return
    assert path.outcome == outcome
    assert abs(path.end_s - median_s) <= 0.2 * median_s, (path.end_s, median_s)


@pytest.mark.parametrize(
    ("rps", "kind", "factor", "cv"),
    [
        (2.0, "errors", 5.0, 0.0),
        (2.0, "p99", 2.0, 0.0),
        (10.0, "errors", 2.0, 0.0),
        (20.0, "errors", 2.0, 0.0),
        (100.0, "errors", 2.0, 0.5),
    ],
)
def test_the_chance_of_catching_a_missed_regression_is_within_ten_points(
    rps: float, kind: str, factor: float, cv: float
) -> None:
    spec = parse_spec({})
    profile = TrafficProfile(rps=rps, error_rate=0.005, p50_ms=40.0, p99_ms=180.0, error_cv=cv)
    plan = make_plan(spec, profile, regressions=[("it", kind, factor)], recommend=False)
    predicted = plan.step_plans[0].detections[0]
    assert not predicted.caught and predicted.catch_probability is not None
    canary = profile.regressed(kind, factor)
    noise = {"error_cv": cv} if cv else None
    scenario = Scenario.model_validate(
        {
            "name": "it",
            "duration_s": 7200,
            "traffic": {"rps": rps},
            "stable": profile.stable().model_dump(),
            "canary": canary.model_dump(),
            "noise": noise,
        }
    )
    runs = 100
    caught = sum(
        simulate_once(spec, scenario, seed).outcome == "rolled_back" for seed in range(runs)
    )
    assert abs(predicted.catch_probability - caught / runs) <= 0.10, (
        predicted.catch_probability,
        caught,
    )


def test_the_standard_rows_order_as_the_regressions_do() -> None:
    plan = make_plan(parse_spec({}), TrafficProfile(100.0, 0.005, 40.0, 180.0))
    first = {d.label: d for d in plan.step_plans[0].detections}
    times = {label: d.time_s for label, d in first.items()}
    assert all(d.caught for d in first.values())
    assert times["errors ×5"] < times["errors ×2"] < times["errors ×1.5"]  # type: ignore[operator]
    assert times["p99 ×2"] <= times["p99 ×1.5"]  # type: ignore[operator]
    assert first["errors ×2"].caught_step == 0 and first["errors ×1.5"].caught_step == 1
    assert first["errors ×2"].checks == ("errors",)
    # a healthy rollout at 100 rps runs both steps in full, then promotes
    assert [s.how for s in plan.step_plans] == ["full step", "full step", "promotion"]
    assert plan.healthy_time_s == pytest.approx(1320.0)
    # at 100% there is no stable to compare with: only a limit catches anything
    last = {d.label: d for d in plan.step_plans[2].detections}
    assert not last["errors ×2"].caught and not last["p99 ×2"].caught


def test_low_traffic_advice_names_the_numbers_and_holds_up_in_simulation() -> None:
    spec = parse_spec({})
    profile = TrafficProfile(2.0, 0.005, 40.0, 180.0)
    plan = make_plan(spec, profile)
    text = "\n".join(plan.recommendations)
    assert "minRequests 200 takes 16m40s at 0.2 req/s on the 10% step" in text
    found = re.search(r"errors ×5 is not caught .*?stepDuration (\S+) catches it", text)
    assert found, text
    longer = parse_spec({"analysis": {"stepDuration": found.group(1)}})
    canary = profile.regressed("errors", 5.0)
    scenario = Scenario(
        name="x5",
        duration_s=4 * 3600,
        traffic=Traffic(rps=2.0),
        stable=profile.stable(),
        canary=canary,
    )
    caught = sum(simulate_once(longer, scenario, s).outcome == "rolled_back" for s in range(RUNS))
    assert caught > RUNS // 2  # the advice works on the typical rollout


# -- the CLI --------------------------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_plan_prints_the_healthy_rollout_the_table_and_advice() -> None:
    code, out, err = run_cli("plan", "--rps", "2")
    assert code == 0 and err == ""
    assert "canaryd plan · 2 req/s · errors 0.5% · p50 40 ms · p99 180 ms" in out
    assert "healthy rollout: promoted after" in out
    assert re.search(r"errors ×2\s+missed", out)
    assert "recommendations:" in out and "minRequests 200 takes 16m40s" in out


def test_plan_json_is_one_object_with_every_step_and_regression() -> None:
    code, out, _ = run_cli("plan", "--scenario", "error-regression", "--json")
    assert code == 0
    data = json.loads(out)
    assert (
        data["profile"]["rps"] == 100 and data["profile"]["source"] == "scenario error-regression"
    )
    assert [s["weight"] for s in data["steps"]] == [10, 50, 100]
    labels = [d["regression"] for d in data["steps"][0]["detections"]]
    assert labels == ["errors ×1.5", "errors ×2", "errors ×5", "p99 ×1.5", "p99 ×2"]
    assert data["scenario"]["outcome"] == "rolled_back"
    assert data["scenario"]["detection"]["caught"] is True
    assert data["healthy"]["false_rollback_bound"] == 0.01


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "say what the traffic looks like"),
        (["--rps", "5", "--scenario", "healthy"], "give one source of traffic"),
        (["--p99-ms", "300"], "--p99-ms describe traffic given by hand: add --rps N"),
        (["--rps", "5", "--namespace", "shop"], "--namespace goes with --from-prometheus"),
        (["--from-prometheus", "http://127.0.0.1:9"], "needs --namespace"),
        (["--rps", "0"], "--rps: must be a number, more than 0"),
        (["--rps", "5", "--p50-ms", "500", "--p99-ms", "100"], "p50"),
        (["--scenario", "healthyy"], "did you mean 'healthy'"),
        (["--rps", "5", "--spec", "/nonexistent.yaml"], "--spec"),
    ],
)
def test_plan_usage_errors_are_one_line(argv: list[str], says: str) -> None:
    code, out, err = run_cli("plan", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and says in err, err


def checkout_spec(directory: Path) -> Path:
    """A spec file naming the checkout Deployments (the arms the queries look for)."""
    spec = directory / "canary.yaml"
    spec.write_text("stable: {deployment: checkout}\ncanary: {deployment: checkout-canary}\n")
    return spec


def test_an_unreachable_prometheus_is_one_line(tmp_path: Path) -> None:
    spec = checkout_spec(tmp_path)
    code, _, err = run_cli(
        "plan",
        "--spec",
        str(spec),
        "--from-prometheus",
        "http://127.0.0.1:9",
        "--namespace",
        "shop",
        "--prometheus-timeout",
        "2s",
    )
    assert code == 2 and err.count("\n") == 1
    assert "--from-prometheus: Prometheus at http://127.0.0.1:9 is unreachable" in err


# -- traffic from a live service ------------------------------------------------------------

WINDOW_S = 1800
STEP_S = 15


def _openmetrics(now: int, rng: np.random.Generator) -> str:
    """Half an hour of stable's Istio series: 50 req/s, 1% errors whose rate varies
    from minute to minute (Gamma CV 0.5), latency p50 40 ms and p99 180 ms."""
    behaviour = Behaviour(0.01, 40.0, 180.0)
    cdf = np.cumsum(behaviour.bucket_probabilities())
    labels = (
        'reporter="destination",destination_workload="checkout",'
        'destination_workload_namespace="shop",pod="checkout-1"'
    )
    ok, bad, buckets = [], [], []
    total_ok = total_bad = 0.0
    total_buckets = np.zeros(len(LATENCY_EDGES_MS))
    multiplier = 1.0
    for i in range(WINDOW_S // STEP_S + 1):
        t = now - WINDOW_S + i * STEP_S
        if i % (60 // STEP_S) == 0:
            multiplier = float(rng.gamma(4.0, 0.25))
        if i:
            n = 50 * STEP_S
            errors = int(rng.poisson(n * 0.01 * multiplier))
            total_bad += errors
            total_ok += n - errors
            total_buckets += n * cdf[: len(LATENCY_EDGES_MS)]
        ok.append(f'istio_requests_total{{{labels},response_code="200"}} {total_ok:.0f} {t}')
        bad.append(f'istio_requests_total{{{labels},response_code="503"}} {total_bad:.0f} {t}')
        for edge, value in zip(LATENCY_EDGES_MS, total_buckets, strict=True):
            buckets.append(
                f'istio_request_duration_milliseconds_bucket{{{labels},le="{edge:g}"}} '
                f"{value:.0f} {t}"
            )
        total = total_ok + total_bad
        buckets.append(
            f'istio_request_duration_milliseconds_bucket{{{labels},le="+Inf"}} {total:.0f} {t}'
        )
    by_series: dict[str, list[str]] = {}
    for line in buckets:
        by_series.setdefault(line.rsplit(" ", 2)[0], []).append(line)
    return istio_openmetrics([*ok, *bad], [ln for series in by_series.values() for ln in series])


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    workdir = tmp_path_factory.mktemp("prometheus-plan")
    text = _openmetrics(int(time.time()), np.random.default_rng(5))
    with backfilled_prometheus(workdir, text) as server:
        yield server


def test_from_prometheus_reads_the_live_stables_traffic(
    backfilled: PrometheusServer, tmp_path: Path
) -> None:
    spec = checkout_spec(tmp_path)
    code, out, err = run_cli(
        "plan",
        "--spec",
        str(spec),
        "--from-prometheus",
        backfilled.url,
        "--namespace",
        "shop",
        "--window",
        "25m",
        "--json",
    )
    assert code == 0, err
    profile = json.loads(out)["profile"]
    assert profile["rps"] == pytest.approx(50.0, rel=0.02)
    assert profile["error_pct"] == pytest.approx(1.0, rel=0.15)
    # Prometheus interpolates within Istio's buckets: the true p50 40 ms and p99 180 ms
    # lie in (25, 50] and (100, 250]
    assert 25 < profile["p50_ms"] <= 50 and 100 < profile["p99_ms"] <= 250
    assert 0.3 <= profile["error_cv"] <= 0.75  # the minute-to-minute drift, beyond chance
    assert "namespace shop" in profile["source"]


def test_from_prometheus_without_traffic_there_says_where_it_looked(
    backfilled: PrometheusServer, tmp_path: Path
) -> None:
    spec = checkout_spec(tmp_path)
    code, _, err = run_cli(
        "plan", "--spec", str(spec), "--from-prometheus", backfilled.url, "--namespace", "other"
    )
    assert code == 2 and err.count("\n") == 1
    assert "no requests to checkout in namespace other" in err
