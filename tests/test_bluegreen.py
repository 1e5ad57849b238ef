"""Blue/green (``strategy: blueGreen``): a warm-up with no user traffic (judged on a
mirror of it), an optional approval, the switch of all traffic in one step, and the old
version kept running for ``scaleDownDelay`` so that a rollback is one weight write."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from canaryd.cli import main
from canaryd.rollout import CommandKind
from canaryd.spec import SpecError, parse_spec
from kubedouble.apiserver import KubeApiServer
from simulator import get_scenario
from tests.conftest import NS
from tests.test_daemon import Harness, canary_obj, canary_weight, phase

Obj = dict[str, Any]


def test_blue_green_plans_a_mirrored_warm_up_then_the_switch() -> None:
    spec = parse_spec(
        {
            "strategy": "blueGreen",
            "blueGreen": {"mirrorPercent": 100, "approval": True, "scaleDownDelay": "5m"},
        }
    )
    assert spec.steps == [0, 100] and spec.mirror_pct(0) == 100
    assert spec.approvals.before == [100]  # the switch waits for an approval
    assert spec.own_step_duration_s(0) is None and spec.own_step_duration_s(1) == 300.0
    # what status messages and events say of each step
    assert "a 100% mirror of the rest" in spec.step_traffic(0)
    assert "users stay on stable" in spec.step_traffic(0)
    assert spec.step_traffic(1) == "100% of traffic on the canary"
    assert parse_spec(spec.model_dump(by_alias=True, exclude_none=True)) == spec
    bare = parse_spec({"strategy": "blueGreen"})  # no mirror: the switch once pods are ready
    assert bare.steps == [100] and bare.own_step_duration_s(0) == 600.0


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"strategy": "blueGreen", "steps": [10, 100]}, "plans its own steps"),
        ({"blueGreen": {"mirrorPercent": 50}}, "blueGreen applies only to strategy blueGreen"),
        ({"strategy": "blueGreen", "blueGreen": {"mirrorPercent": 0}}, "mirrorPercent"),
        ({"strategy": "blueGreen", "blueGreen": {"scaleDownDelay": "soon"}}, "scaleDownDelay"),
        (
            {"strategy": "blueGreen", "match": [{"headers": {"x": {"exact": "y"}}}]},
            "match applies only to strategy abTest",
        ),
    ],
)
def test_impossible_blue_greens_are_refused(spec: Obj, says: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert says in str(err.value)


def simulate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Obj]:
    code = main(["simulate", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_the_switch_is_judged_for_scale_down_delay_and_a_bad_warm_up_never_reaches_users(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, good = simulate(capsys, "--scenario", "bluegreen-healthy")
    assert code == 0 and [s["weight"] for s in good["steps"]] == [0, 100]
    switch = good["steps"][1]
    assert switch["ended_s"] - switch["started_s"] >= 600.0  # never passed early
    code, bad = simulate(capsys, "--scenario", "bluegreen-regression")
    assert code == 1 and [(s["weight"], s["verdict"]) for s in bad["steps"]] == [(0, "rollback")]


def test_a_regression_after_the_switch_goes_back_to_the_old_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "late.yaml"
    scenario.write_text(
        "name: late\nduration_s: 3600\ntraffic: {rps: 100}\n"
        "stable: {error_rate: 0.005, latency_ms: {p50: 40, p99: 180}}\n"
        "canary: {error_rate: 0.005, latency_ms: {p50: 40, p99: 180}}\n"
        "events: [{at_s: 400, version: canary, error_rate: 0.05}]\n"
    )
    spec = tmp_path / "bg.yaml"
    spec.write_text(json.dumps({"strategy": "blueGreen", "blueGreen": {"mirrorPercent": 100}}))
    code, out = simulate(capsys, "--scenario-file", str(scenario), "--spec", str(spec))
    assert code == 1, out
    assert [(s["weight"], s["verdict"]) for s in out["steps"]] == [(0, "pass"), (100, "rollback")]


def test_a_daemon_blue_green_waits_for_approval_keeps_the_old_version_then_promotes(
    cluster: KubeApiServer,
) -> None:
    obj = canary_obj(cluster)
    del obj["spec"]["steps"]
    obj["spec"] |= {
        "strategy": "blueGreen",
        "blueGreen": {"mirrorPercent": 100, "approval": True, "scaleDownDelay": "2s"},
    }
    cluster.put_raw("canaryd.io", "v1alpha1", "canaries", obj)
    images_at_100: set[str] = set()

    def stable_image() -> str:
        stable = cluster.get("apps", "v1", "deployments", NS, "checkout")
        assert stable is not None
        return str(stable["spec"]["template"]["spec"]["containers"][0]["image"])

    async def scenario() -> Obj:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            waiting = await h.until(lambda o: phase(o) == "WaitingApproval")
            assert canary_weight(cluster) == 0  # warmed up on copies: no user on it yet
            assert waiting["status"]["history"][0]["weight"] == 0
            await h.command(CommandKind.APPROVE)

            def done(o: Obj) -> bool:
                if canary_weight(cluster) == 100 and phase(o) == "Progressing":
                    images_at_100.add(stable_image())  # (promotion then rolls stable out)
                return phase(o) == "Succeeded"

            return await h.until(done)

    final = asyncio.run(scenario())
    assert [s["weight"] for s in final["status"]["history"]] == [0, 100]
    # all traffic on the new version while the old one still ran as stable: a rollback
    # then was one weight write back to it
    assert images_at_100 == {"shop/checkout:1"}
    assert stable_image() == "shop/checkout:2" and canary_weight(cluster) == 0
