"""A/B tests (``strategy: abTest``): the cohort that matches ``match`` goes to the canary
for one analysed step, then the canary is promoted.  The spec's rules, the cohort route
canaryd adds to a VirtualService or HTTPRoute (and nothing else), the emulator's and
the simulator's split, and whole rollouts by the daemon on the API double."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest

from canaryd import gatewayapi, istio
from canaryd.cli import main
from canaryd.rollout import CommandKind
from canaryd.spec import CanarySpec, SpecError, parse_spec
from kubedouble.apiserver import KubeApiServer
from simulator import get_scenario
from simulator.serve import canary_share_pct, routing_of
from tests.conftest import NS, VIRTUAL_SERVICE, canary
from tests.test_daemon import Harness, canary_obj, phase
from tests.test_gatewayapi import HTTP_ROUTE

Obj = dict[str, Any]
COHORT = {"headers": {"x-canary": {"exact": "insider"}}}
ISTIO = {
    "istio": {
        "virtualService": {"name": "checkout", "routes": ["http-primary"]},
        "destinationRule": {"name": "checkout"},
    }
}
GATEWAY = {"gatewayAPI": {"httpRoute": "checkout", "rules": ["api"]}}


def ab_spec(routing: Obj = ISTIO, **more: Any) -> CanarySpec:
    return parse_spec(
        {"service": "checkout", "strategy": "abTest", "match": [COHORT], "trafficRouting": routing}
        | more
    )


# -- the spec --------------------------------------------------------------------------


def test_an_ab_test_has_one_step_for_the_cohort() -> None:
    spec = ab_spec()
    assert spec.steps == [100]
    assert spec.match[0].headers["x-canary"].kind_value() == ("exact", "insider")
    assert spec.traffic_share_pct(100, 10) == 10 and spec.traffic_share_pct(0, 10) == 0
    assert spec.step_traffic(0) == (
        "the A/B cohort (x-canary: insider) on the canary, everyone else on stable"
    )
    assert parse_spec({}).traffic_share_pct(50, 10) == 50  # a canary's weight is its share
    # a spec dumped and read back is the same spec
    assert parse_spec(spec.model_dump(by_alias=True, exclude_none=True)) == spec


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"strategy": "abTest"}, "strategy abTest needs match"),
        ({"strategy": "abTest", "match": [COHORT], "steps": [10, 100]}, "remove steps"),
        ({"match": [COHORT]}, "match applies only to strategy abTest"),
        (
            {"strategy": "abTest", "match": [COHORT], "promotion": {"mode": "weights-only"}},
            "weights-only",
        ),
        (
            {
                "strategy": "abTest",
                "match": [{"headers": {"x-canary": {"prefix": "in"}}}],
                "trafficRouting": GATEWAY,
            },
            "HTTPRoute header matches are exact or regex, not prefix (header x-canary)",
        ),
        (
            {"strategy": "abTest", "match": [{"headers": {"x canary": {"exact": "a"}}}]},
            "is not an HTTP header name",
        ),
        (
            {"strategy": "abTest", "match": [{"headers": {"x": {"exact": "a", "regex": "b"}}}]},
            "set exactly one of exact, prefix and regex (got exact, regex)",
        ),
        ({"strategy": "abTest", "match": [{"headers": {"x": {"regex": "("}}}]}, "does not compile"),
        ({"strategy": "abTest", "match": [{"headers": {}}]}, "headers"),
        ({"strategy": "redBlack"}, "strategy"),
    ],
)
def test_impossible_ab_tests_are_refused_with_a_clear_message(spec: Obj, says: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert says in str(err.value)


def test_canaryd_validate_refuses_an_ab_test_with_weight_steps(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "canary.yaml"
    body = canary()
    body["spec"] |= {"strategy": "abTest", "match": [COHORT]}
    path.write_text(json.dumps(body))
    assert main(["validate", str(path)]) != 0
    err = capsys.readouterr()
    assert "remove steps" in err.out + err.err
    del body["spec"]["steps"]
    path.write_text(json.dumps(body))
    assert main(["validate", str(path)]) == 0
    said = capsys.readouterr().out
    assert "valid; the A/B cohort (x-canary: insider) on the canary" in said, said


# -- the routes: a cohort route next to each managed one, nothing else ---------------------


def test_istio_the_cohort_route_goes_ahead_of_the_managed_one_and_is_removed_at_0() -> None:
    spec = ab_spec()
    vs = copy.deepcopy(VIRTUAL_SERVICE)
    vs["spec"]["http"][0]["match"] = [{"uri": {"prefix": "/api"}}, {"uri": {"prefix": "/v2"}}]
    assert istio.route_weights_of(vs, spec) == (0,)
    on = istio.with_weights(vs, spec, 100)
    http = on["spec"]["http"]
    assert [r["name"] for r in http] == ["http-primary-canaryd-ab", "http-primary", "admin"]
    cohort, managed = http[0], http[1]
    assert managed == vs["spec"]["http"][0]  # the user's route is untouched
    assert http[2] == vs["spec"]["http"][1]
    assert cohort["match"] == [  # each of the route's own matches, and the cohort's header
        {"uri": {"prefix": "/api"}, "headers": {"x-canary": {"exact": "insider"}}},
        {"uri": {"prefix": "/v2"}, "headers": {"x-canary": {"exact": "insider"}}},
    ]
    assert [d["weight"] for d in cohort["route"]] == [0, 100]
    assert cohort["retries"] == managed["retries"] and cohort["fault"] == managed["fault"]
    assert {k: v for k, v in on.items() if k != "spec"} == {
        k: v for k, v in vs.items() if k != "spec"
    }
    assert istio.route_weights_of(on, spec) == (100,)
    assert istio.with_weights(on, spec, 100) == on  # applied twice: no change
    assert istio.with_weights(on, spec, 0) == vs  # the cohort back on stable: as written


def test_istio_routes_chosen_by_destination_never_include_the_cohort_route() -> None:
    spec = parse_spec(
        {
            "service": "checkout",
            "strategy": "abTest",
            "match": [COHORT],
            "trafficRouting": {
                "istio": {"virtualService": {"name": "checkout"}, "destinationRule": {"name": "c"}}
            },
        }
    )
    on = istio.with_weights(copy.deepcopy(VIRTUAL_SERVICE), spec, 100)
    again = istio.with_weights(on, spec, 100)
    assert [r["name"] for r in again["spec"]["http"]] == [
        "http-primary-canaryd-ab",
        "http-primary",
        "admin",
    ]


def test_httproute_the_cohort_rule_matches_the_header_and_is_removed_at_0() -> None:
    spec = ab_spec(GATEWAY)
    route = copy.deepcopy(HTTP_ROUTE)
    assert gatewayapi.route_weights_of(route, spec) == (0,)
    on = gatewayapi.with_weights(route, spec, 100)
    rules = on["spec"]["rules"]
    assert [r["name"] for r in rules] == ["api-canaryd-ab", "api", "admin"]
    assert rules[1:] == route["spec"]["rules"]
    assert rules[0]["matches"] == [
        {
            "path": {"type": "PathPrefix", "value": "/api"},
            "headers": [{"type": "Exact", "name": "x-canary", "value": "insider"}],
        }
    ]
    assert [b["weight"] for b in rules[0]["backendRefs"]] == [0, 100]
    assert rules[0]["filters"] == route["spec"]["rules"][0]["filters"]
    assert on["spec"]["parentRefs"] == route["spec"]["parentRefs"]
    assert gatewayapi.route_weights_of(on, spec) == (100,)
    assert gatewayapi.with_weights(on, spec, 100) == on
    assert gatewayapi.with_weights(on, spec, 0) == route
    regex = parse_spec(
        {
            "service": "checkout",
            "strategy": "abTest",
            "match": [{"headers": {"cookie": {"regex": "(^|;\\s*)user=insider(;|$)"}}}],
            "trafficRouting": GATEWAY,
        }
    )
    headers = gatewayapi.with_weights(route, regex, 100)["spec"]["rules"][0]["matches"][0]
    assert headers["headers"] == [
        {"type": "RegularExpression", "name": "cookie", "value": "(^|;\\s*)user=insider(;|$)"}
    ]


# -- the emulator and the simulator serve the cohort's share ------------------------------


def test_the_emulator_sends_the_cohort_by_its_route_and_everyone_else_by_the_main_one() -> None:
    body = canary()
    body["spec"] |= {"strategy": "abTest", "match": [COHORT]}
    del body["spec"]["steps"]
    routing = routing_of(body)
    spec = ab_spec()
    on = istio.with_weights(copy.deepcopy(VIRTUAL_SERVICE), spec, 100)
    assert canary_share_pct(on["spec"], routing, cohort_pct=10) == 10
    assert canary_share_pct(on["spec"], routing, cohort_pct=25) == 25
    assert canary_share_pct(VIRTUAL_SERVICE["spec"], routing, cohort_pct=10) == 0
    body["spec"]["trafficRouting"] = GATEWAY
    routing = routing_of(body)
    on = gatewayapi.with_weights(copy.deepcopy(HTTP_ROUTE), ab_spec(GATEWAY), 100)
    assert canary_share_pct(on["spec"], routing, cohort_pct=10) == 10
    assert canary_share_pct(HTTP_ROUTE["spec"], routing, cohort_pct=10) == 0


def test_canaryd_simulate_ab_scenarios_promote_a_healthy_cohort_and_roll_back_a_bad_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runs = {}
    for name in ("abtest-healthy", "abtest-regression"):
        assert main(["simulate", "--scenario", name, "--runs", "20", "--json"]) == 0
        runs[name] = json.loads(capsys.readouterr().out)
    assert runs["abtest-healthy"]["outcomes"]["promoted"] == 20
    assert runs["abtest-regression"]["outcomes"]["rolled_back"] >= 18
    for result in runs["abtest-healthy"]["results"]:
        # the canary served the cohort only: ~10% of 100 req/s over its step
        per_s = result["canary_requests"] / result["duration_s"]
        assert 7 <= per_s <= 13, result


# -- whole rollouts by the daemon on the API double -----------------------------------------


def cohort_route(server: KubeApiServer) -> Obj | None:
    vs = server.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
    assert vs is not None
    return next((r for r in vs["spec"]["http"] if r["name"].endswith("-canaryd-ab")), None)


def test_a_daemon_ab_test_sends_the_cohort_to_the_canary_then_promotes(
    cluster: KubeApiServer,
) -> None:
    obj = canary_obj(cluster)
    del obj["spec"]["steps"]
    obj["spec"] |= {"strategy": "abTest", "match": [COHORT]}
    cluster.put_raw("canaryd.io", "v1alpha1", "canaries", obj)
    seen: list[int | None] = []
    everyone_else: set[int] = set()  # the managed route's canary weight, all along

    async def scenario() -> Obj:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")

            def done(o: Obj) -> bool:
                route = cohort_route(cluster)
                weight = None if route is None else route["route"][1]["weight"]
                if not seen or seen[-1] != weight:
                    seen.append(weight)
                vs = cluster.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
                assert vs is not None
                managed = next(r for r in vs["spec"]["http"] if r["name"] == "http-primary")
                everyone_else.add(managed["route"][1]["weight"])
                return phase(o) == "Succeeded" and route is None

            return await h.until(done)

    final = asyncio.run(scenario())
    assert [s["weight"] for s in final["status"]["history"]] == [100]
    assert final["status"]["history"][0]["verdict"] == "pass"
    # judged against stable (everyone else), not only against the limits of a 100% step
    checks = {c["name"]: c for c in final["status"]["lastVerdict"]["checks"]}
    assert "errors" in checks, list(checks)
    stats = checks["errors"]["stats"]
    assert stats["canary_requests"] < stats["stable_requests"] / 5  # the cohort: ~10%
    assert 100 in seen and seen[-1] is None  # the cohort on the canary, then the route gone
    assert everyone_else == {0}  # everyone else stayed on stable throughout
    vs = cluster.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
    assert vs is not None and vs["spec"] == VIRTUAL_SERVICE["spec"]  # as the user wrote it
    stable = cluster.get("apps", "v1", "deployments", NS, "checkout")
    assert stable is not None
    assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/checkout:2"
