"""The Gateway API router: the backendRefs weights of named rules of a user-owned
HTTPRoute, and nothing else in it; through the real client against the API double
(409 on a stale resourceVersion), and whole rollouts by the daemon, drift included."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from canaryd.gatewayapi import GatewayAPIRouter, route_weights_of, with_weights
from canaryd.kube import Kube
from canaryd.ports import CanaryRef, RoutingError
from canaryd.rollout import CommandKind
from canaryd.spec import CanarySpec, parse_spec
from kubedouble.apiserver import KubeApiServer
from simulator import get_scenario
from tests.conftest import NS
from tests.test_daemon import Harness, canary_obj, condition, phase

Obj = dict[str, Any]
GROUP, VERSION, PLURAL = "gateway.networking.k8s.io", "v1", "httproutes"
REF = CanaryRef(NS, "checkout")

HTTP_ROUTE: Obj = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "HTTPRoute",
    "metadata": {"name": "checkout", "namespace": NS},
    "spec": {
        "parentRefs": [{"name": "public", "namespace": "gateways"}],
        "hostnames": ["checkout.example.com"],
        "rules": [
            {
                "name": "api",
                "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                "timeouts": {"request": "10s"},
                "filters": [
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {"add": [{"name": "x-via", "value": "gw"}]},
                    }
                ],
                "backendRefs": [
                    {"name": "checkout", "port": 80, "weight": 100},
                    {"name": "checkout-canary", "port": 80, "weight": 0},
                ],
            },
            {
                "name": "admin",
                "matches": [{"path": {"type": "PathPrefix", "value": "/admin"}}],
                "backendRefs": [{"name": "checkout-admin", "port": 80}],
            },
        ],
    },
}


def spec(**gateway: Any) -> CanarySpec:
    return parse_spec(
        {
            "service": "checkout",
            "stable": {"deployment": "checkout"},
            "canary": {"deployment": "checkout-canary"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "checkout"} | gateway},
        }
    )


def without_weights(route: Obj) -> Obj:
    out = copy.deepcopy(route)
    for rule in out["spec"]["rules"]:
        for ref in rule.get("backendRefs") or []:
            ref.pop("weight", None)
    return out


# -- the route's shape ---------------------------------------------------------------------


def test_only_the_two_backend_weights_of_the_named_rules_change() -> None:
    for s in (spec(rules=["api"]), spec()):  # named, or found by its two backends
        out = with_weights(HTTP_ROUTE, s, 30)
        assert route_weights_of(out, s) == (30,)
        api = out["spec"]["rules"][0]["backendRefs"]
        assert [(b["name"], b["weight"]) for b in api] == [
            ("checkout", 70),
            ("checkout-canary", 30),
        ]
        assert without_weights(out) == without_weights(HTTP_ROUTE)
        assert out["spec"]["rules"][1] == HTTP_ROUTE["spec"]["rules"][1]  # untouched
    assert HTTP_ROUTE["spec"]["rules"][0]["backendRefs"][1]["weight"] == 0  # a copy


def test_weights_are_relative_and_default_to_one() -> None:
    route = copy.deepcopy(HTTP_ROUTE)
    refs = route["spec"]["rules"][0]["backendRefs"]
    for ref in refs:
        del ref["weight"]
    assert route_weights_of(route, spec()) == (50,)  # 1 and 1
    refs[0]["weight"], refs[1]["weight"] = 3, 1
    assert route_weights_of(route, spec()) == (25,)
    refs[0]["weight"] = refs[1]["weight"] = 0
    assert route_weights_of(route, spec()) == (0,)


def test_services_can_be_named_and_other_kinds_are_not_backends() -> None:
    route = copy.deepcopy(HTTP_ROUTE)
    refs = route["spec"]["rules"][0]["backendRefs"]
    refs[0]["name"], refs[1]["name"] = "checkout-v1", "checkout-v2"
    named = spec(stableService="checkout-v1", canaryService="checkout-v2")
    assert route_weights_of(with_weights(route, named, 10), named) == (10,)
    refs[1]["kind"], refs[1]["group"] = "ServiceImport", "multicluster.x-k8s.io"
    named_rule = spec(rules=["api"], stableService="checkout-v1", canaryService="checkout-v2")
    with pytest.raises(RoutingError, match="no backendRef to Service 'checkout-v2'"):
        route_weights_of(route, named_rule)


@pytest.mark.parametrize(
    ("gateway", "edit", "message"),
    [
        ({"rules": ["web"]}, None, "HTTPRoute checkout has no rule named web (rules: admin, api)"),
        ({}, "drop-canary", "no rule with both Services 'checkout' and 'checkout-canary'"),
        ({"rules": ["api"]}, "drop-canary", "rule api of HTTPRoute checkout has no backendRef"),
        ({"rules": ["api"]}, "twice", "lists Service 'checkout' twice"),
    ],
)
def test_what_is_missing_is_named(gateway: Obj, edit: str | None, message: str) -> None:
    route = copy.deepcopy(HTTP_ROUTE)
    refs = route["spec"]["rules"][0]["backendRefs"]
    if edit == "drop-canary":
        refs.pop()
    elif edit == "twice":
        refs.append({"name": "checkout", "port": 8080})
    with pytest.raises(RoutingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        with_weights(route, spec(**gateway), 10)


def test_exactly_one_router_is_named() -> None:
    with pytest.raises(ValueError, match="set exactly one of istio and gatewayAPI"):
        parse_spec({"trafficRouting": {}})
    with pytest.raises(ValueError, match="both are set"):
        parse_spec(
            {
                "trafficRouting": {
                    "istio": {"virtualService": {"name": "checkout"}},
                    "gatewayAPI": {"httpRoute": "checkout"},
                }
            }
        )


# -- through the real client, against the API double ---------------------------------------


def test_check_and_set_weights_through_the_api_and_a_conflict_is_retried(
    kubeapi: KubeApiServer,
) -> None:
    kubeapi.put_raw(GROUP, VERSION, PLURAL, copy.deepcopy(HTTP_ROUTE))

    async def scenario() -> tuple[tuple[int, ...], tuple[int, ...]]:
        api = kubeapi.api_client()
        try:
            router = GatewayAPIRouter(Kube(api, timeout_s=5.0), attempts=3)
            with pytest.raises(RoutingError, match="HTTPRoute shop/missing not found"):
                await router.check(REF, spec(httpRoute="missing"))
            await router.check(REF, spec(rules=["api"]))
            before = await router.route_weights(REF, spec(rules=["api"]))
            # someone else changes the route between canaryd's read and its write
            other = kubeapi.get(GROUP, VERSION, PLURAL, NS, "checkout")
            assert other is not None
            other["spec"]["hostnames"].append("shop.example.com")
            kubeapi.put_raw(GROUP, VERSION, PLURAL, other)
            after = await router.set_weights(REF, spec(rules=["api"]), 10)
            return before, after
        finally:
            api.close()

    before, after = asyncio.run(scenario())
    assert before == (0,) and after == (10,)
    stored = kubeapi.get(GROUP, VERSION, PLURAL, NS, "checkout")
    assert stored is not None
    assert stored["spec"]["hostnames"] == ["checkout.example.com", "shop.example.com"]  # kept
    refs = stored["spec"]["rules"][0]["backendRefs"]
    assert [b["weight"] for b in refs] == [90, 10]
    conflicts = [r for r in kubeapi.requests if r.method == "PUT" and PLURAL in r.path]
    assert len(conflicts) == 2, "the first write was stale (409) and was retried once"


# -- whole rollouts by the daemon ------------------------------------------------------------


def on_gateway_api(server: KubeApiServer, **analysis: Any) -> None:
    """The cluster's Canary routed by the HTTPRoute instead of the VirtualService."""
    server.put_raw(GROUP, VERSION, PLURAL, copy.deepcopy(HTTP_ROUTE))
    obj = canary_obj(server)
    obj["spec"]["trafficRouting"] = {"gatewayAPI": {"httpRoute": "checkout", "rules": ["api"]}}
    obj["spec"]["analysis"] |= analysis
    server.put_raw("canaryd.io", "v1alpha1", "canaries", obj)


def route_weight(server: KubeApiServer) -> int:
    route = server.get(GROUP, VERSION, PLURAL, NS, "checkout")
    assert route is not None
    refs = {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}
    assert refs["checkout"] + refs["checkout-canary"] == 100
    return int(refs["checkout-canary"])


def test_a_healthy_canary_is_promoted_on_an_httproute(cluster: KubeApiServer) -> None:
    on_gateway_api(cluster, stepDuration="3s", minStepDuration="1s")
    seen: list[int] = []

    async def scenario() -> Obj:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")

            def done(obj: Obj) -> bool:
                weight = route_weight(cluster)
                if not seen or seen[-1] != weight:
                    seen.append(weight)
                # promoted: stable runs v2 and the route gives it all the traffic again
                return phase(obj) == "Succeeded" and weight == 0

            return await h.until(done)

    obj = asyncio.run(scenario())
    assert [s["weight"] for s in obj["status"]["history"]] == [10, 50, 100]
    assert 10 in seen and 50 in seen and seen[-1] == 0  # stable runs v2 and takes it all
    assert seen[:-1] == sorted(seen[:-1]), f"weights went backwards: {seen}"
    route = cluster.get(GROUP, VERSION, PLURAL, NS, "checkout")
    assert (
        route is not None and without_weights(route)["spec"] == without_weights(HTTP_ROUTE)["spec"]
    )
    vs = cluster.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
    assert vs is not None  # the VirtualService of the other tests is not touched
    assert vs["spec"]["http"][0]["route"][1]["weight"] == 0


def test_an_httproute_edited_by_someone_else_holds_the_rollout(cluster: KubeApiServer) -> None:
    on_gateway_api(cluster, stepDuration="10m")

    async def scenario() -> tuple[Obj, int]:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            await h.until(lambda o: (o.get("status") or {}).get("verifiedCanaryPct") == 10)
            route = cluster.get(GROUP, VERSION, PLURAL, NS, "checkout")
            assert route is not None
            refs = route["spec"]["rules"][0]["backendRefs"]
            refs[0]["weight"], refs[1]["weight"] = 60, 40  # kubectl edit
            cluster.put_raw(GROUP, VERSION, PLURAL, route)
            held = await h.until(
                lambda o: phase(o) == "Holding" and condition(o, "TrafficDrift") != {}
            )
            await asyncio.sleep(2.0)
            weight = route_weight(cluster)
            await h.command(CommandKind.ABORT)
            await h.until(lambda o: phase(o) == "RolledBack")
            return held, weight

    held, weight = asyncio.run(scenario())
    drift = condition(held, "TrafficDrift")
    assert drift["status"] == "True" and "40%" in drift["message"], drift
    assert weight == 40, "canaryd overwrote a person's weights under onDrift: hold"
    assert route_weight(cluster) == 0  # the abort restored all traffic to stable
