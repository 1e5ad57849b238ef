"""Traffic mirroring on a step (``{weight: 0, mirror: {percent: N}}``): the canary serves
copies of stable's requests whose answers users never see, and the step is judged on
them.  The spec, the VirtualService's ``mirror`` fields (and nothing else), the
simulator's and the emulator's copies, and a whole rollout by the daemon."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from canaryd import gatewayapi, istio
from canaryd.cli import main
from canaryd.converger import mirror_pct
from canaryd.rollout import CommandKind
from canaryd.spec import parse_spec
from canaryd.status import CanaryStatus, Phase
from kubedouble.apiserver import KubeApiServer
from simulator import Simulation, get_scenario
from simulator.serve import canary_mirror_pct, routing_of
from tests.conftest import NS, VIRTUAL_SERVICE, canary
from tests.test_daemon import Harness, canary_obj, phase
from tests.test_gatewayapi import HTTP_ROUTE

Obj = dict[str, Any]
MIRROR_STEPS = [{"weight": 0, "mirror": {"percent": 50}}, 10, 50, 100]
ISTIO = {
    "istio": {
        "virtualService": {"name": "checkout", "routes": ["http-primary"]},
        "destinationRule": {"name": "checkout"},
    }
}


def test_a_step_written_as_a_mapping_keeps_its_mirror_and_reads_back_the_same() -> None:
    spec = parse_spec({"steps": MIRROR_STEPS})
    assert spec.steps == [0, 10, 50, 100] and spec.mirrors
    assert [spec.mirror_pct(i) for i in range(5)] == [50, 0, 0, 0, 0]
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    assert dumped["steps"] == MIRROR_STEPS
    assert parse_spec(dumped) == spec
    assert not parse_spec({}).mirrors and parse_spec({}).mirror_pct(0) == 0


def test_the_mirror_follows_the_status_step_while_the_rollout_is_under_way() -> None:
    spec = parse_spec({"steps": MIRROR_STEPS})

    def at(phase: Phase, index: int) -> int:
        return mirror_pct(spec, CanaryStatus(phase=phase, step_index=index))

    assert at(Phase.PROGRESSING, 0) == 50 and at(Phase.HOLDING, 0) == 50
    assert at(Phase.PROGRESSING, 1) == 0
    assert at(Phase.ROLLED_BACK, 0) == 0 and at(Phase.FAILED, 0) == 0  # ended: no copies
    assert at(Phase.IDLE, 0) == 0


def test_istio_mirror_fields_are_set_on_the_managed_route_and_removed_after() -> None:
    spec = parse_spec({"service": "checkout", "steps": MIRROR_STEPS, "trafficRouting": ISTIO})
    vs = copy.deepcopy(VIRTUAL_SERVICE)
    assert istio.mirrors_of(vs, spec) == (0,)
    on = istio.with_weights(vs, spec, 0, 50)
    route = on["spec"]["http"][0]
    assert route["mirror"] == {"host": "checkout", "subset": "canary"}
    assert route["mirrorPercentage"] == {"value": 50.0}
    assert [d["weight"] for d in route["route"]] == [100, 0]  # users: all on stable
    untouched = {k: v for k, v in route.items() if k not in ("mirror", "mirrorPercentage")}
    assert untouched == vs["spec"]["http"][0] and on["spec"]["http"][1] == vs["spec"]["http"][1]
    assert istio.mirrors_of(on, spec) == (50,)
    assert istio.with_weights(on, spec, 0, 50) == on  # applied twice: no change
    assert istio.with_weights(on, spec, 0, 0) == vs  # removed: as the user wrote it
    # someone else's mirror (to another host) is theirs: never removed
    theirs = copy.deepcopy(vs)
    theirs["spec"]["http"][0]["mirror"] = {"host": "recorder"}
    assert istio.mirrors_of(theirs, spec) == (0,)
    assert istio.with_weights(theirs, spec, 10, 0)["spec"]["http"][0]["mirror"] == {
        "host": "recorder"
    }


def test_httproute_a_request_mirror_filter_to_the_canary_is_added_and_removed_after() -> None:
    gateway = {"gatewayAPI": {"httpRoute": "checkout", "rules": ["api"]}}
    spec = parse_spec({"service": "checkout", "steps": MIRROR_STEPS, "trafficRouting": gateway})
    route = copy.deepcopy(HTTP_ROUTE)
    assert gatewayapi.mirrors_of(route, spec) == (0,)
    on = gatewayapi.with_weights(route, spec, 0, 50)
    rule = on["spec"]["rules"][0]
    assert rule["filters"] == [
        *route["spec"]["rules"][0]["filters"],  # the user's filters, first and untouched
        {
            "type": "RequestMirror",
            "requestMirror": {"backendRef": {"name": "checkout-canary", "port": 80}, "percent": 50},
        },
    ]
    assert [b["weight"] for b in rule["backendRefs"]] == [100, 0]
    assert on["spec"]["rules"][1] == route["spec"]["rules"][1]
    assert gatewayapi.mirrors_of(on, spec) == (50,)
    assert gatewayapi.with_weights(on, spec, 0, 50) == on
    assert gatewayapi.with_weights(on, spec, 0, 0) == route
    every = gatewayapi.with_weights(route, spec, 0, 100)["spec"]["rules"][0]["filters"][-1]
    assert "percent" not in every["requestMirror"]  # 100%: the filter's default, any version
    body = canary()
    body["spec"] |= {"steps": MIRROR_STEPS, "trafficRouting": gateway}
    assert canary_mirror_pct(on["spec"], routing_of(body)) == 50
    assert canary_mirror_pct(route["spec"], routing_of(body)) == 0


def test_the_emulator_reads_the_mirror_envoy_would_apply() -> None:
    body = canary()
    body["spec"]["steps"] = MIRROR_STEPS
    routing = routing_of(body)
    spec = parse_spec({"service": "checkout", "steps": MIRROR_STEPS, "trafficRouting": ISTIO})
    vs = copy.deepcopy(VIRTUAL_SERVICE)
    assert canary_mirror_pct(vs["spec"], routing) == 0
    assert canary_mirror_pct(istio.with_weights(vs, spec, 0, 30)["spec"], routing) == 30
    vs["spec"]["http"][0]["mirror"] = {"host": "checkout", "subset": "canary"}
    assert canary_mirror_pct(vs["spec"], routing) == 100  # Istio's default: every request


def test_mirrored_requests_are_served_by_the_canary_and_stable_serves_them_all() -> None:
    sim = Simulation(get_scenario("error-spike"), seed=4)
    sim.set_mirror(50)
    sim.advance(600.0)
    seen = sim.observe()
    assert seen.stable is not None and seen.canary is not None
    assert 59_000 < seen.stable.requests < 61_000  # 100 rps, every one on stable
    assert 0.47 < seen.canary.requests / seen.stable.requests < 0.53
    assert seen.canary.errors / seen.canary.requests > 0.04  # the canary's own 5% errors


def test_canaryd_simulate_catches_a_bad_canary_on_mirrored_traffic_before_any_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "mirror.yaml"
    spec.write_text(json.dumps({"steps": MIRROR_STEPS}))
    assert main(["simulate", "--scenario", "error-spike", "--spec", str(spec), "--json"]) == 1
    bad = json.loads(capsys.readouterr().out)
    assert bad["outcome"] == "rolled_back"
    assert [(s["weight"], s["verdict"]) for s in bad["steps"]] == [(0, "rollback")]  # no user
    assert bad["canary_requests"] > 0  # judged on the copies
    assert main(["simulate", "--scenario", "healthy", "--spec", str(spec), "--json"]) == 0
    good = json.loads(capsys.readouterr().out)
    assert [s["weight"] for s in good["steps"]] == [0, 10, 50, 100]


def test_a_daemon_rollout_mirrors_at_its_first_step_then_shifts_weights(
    cluster: KubeApiServer,
) -> None:
    obj = canary_obj(cluster)
    obj["spec"]["steps"] = [MIRROR_STEPS[0], 100]  # two steps: the test's time
    cluster.put_raw("canaryd.io", "v1alpha1", "canaries", obj)
    seen: list[tuple[int, float | None]] = []  # (canary weight, mirror percent)

    async def scenario() -> Obj:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")

            def done(o: Obj) -> bool:
                vs = cluster.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
                assert vs is not None
                route = vs["spec"]["http"][0]
                state = (
                    route["route"][1]["weight"],
                    (route.get("mirrorPercentage") or {}).get("value"),
                )
                if not seen or seen[-1] != state:
                    seen.append(state)
                return phase(o) == "Succeeded"

            return await h.until(done)

    final = asyncio.run(scenario())
    assert [s["weight"] for s in final["status"]["history"]] == [0, 100]
    assert (0, 50.0) in seen  # the first step: copies only
    assert all(m is None for w, m in seen if w > 0)  # no mirror once users reach it
    first = final["status"]["history"][0]
    assert first["verdict"] == "pass"
    vs = cluster.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
    assert vs is not None and vs["spec"] == VIRTUAL_SERVICE["spec"]


def test_canaryd_plan_counts_the_copies_and_the_cohort_as_the_canarys_traffic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plans = {}
    for name, spec in {
        "mirror": {"strategy": "blueGreen", "blueGreen": {"mirrorPercent": 50}},
        "cohort": {"strategy": "abTest", "match": [{"headers": {"x-canary": {"exact": "in"}}}]},
    }.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(spec))
        assert main(["plan", "--spec", str(path), "--rps", "100", "--json"]) == 0
        plans[name] = json.loads(capsys.readouterr().out)
    mirror = plans["mirror"]["steps"]
    assert [(s["weight"], s["canary_rps"]) for s in mirror] == [(0, 50.0), (100, 100.0)]
    assert plans["mirror"]["healthy"]["outcome"] == "promoted"  # the copies are judged
    caught_on_copies = [d for d in mirror[0]["detections"] if d["caught_step"] == 0]
    assert caught_on_copies and all(d["bad_requests"] == 0 for d in caught_on_copies)
    assert all(d["canary_requests"] > 0 for d in caught_on_copies)  # no user got one
    assert [(s["weight"], s["canary_rps"]) for s in plans["cohort"]["steps"]] == [(100, 10.0)]


def test_canaryd_validate_names_each_steps_mirror(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mirror.yaml"
    path.write_text(json.dumps({"steps": MIRROR_STEPS}))
    assert main(["validate", str(path)]) == 0
    assert "valid; steps 0% + 50% mirror → 10% → 50% → 100%" in capsys.readouterr().out
    path.write_text(json.dumps({"strategy": "blueGreen", "blueGreen": {"mirrorPercent": 20}}))
    assert main(["validate", str(path)]) == 0
    assert "valid; blue/green, steps 0% + 20% mirror → 100%" in capsys.readouterr().out
