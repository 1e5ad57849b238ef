"""VirtualService weight logic (pure): subsets or hosts, named routes, clear errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from canaryd.istio import route_weights_of, with_weights
from canaryd.ports import RoutingError
from canaryd.spec import parse_spec
from kubedouble.apiserver import KubeApiServer
from tests.conftest import NS, VIRTUAL_SERVICE

SUBSETS = parse_spec(
    {
        "service": "checkout",
        "trafficRouting": {
            "istio": {
                "virtualService": {"name": "checkout", "routes": ["http-primary"]},
                "destinationRule": {"name": "checkout"},
            }
        },
    }
)
HOSTS = parse_spec(
    {"service": "checkout", "trafficRouting": {"istio": {"virtualService": {"name": "checkout"}}}}
)


def host_vs() -> dict[str, Any]:
    return {
        "spec": {
            "http": [
                {"name": "a", "route": [
                    {"destination": {"host": "checkout"}, "weight": 100},
                    {"destination": {"host": "checkout-canary"}, "weight": 0},
                ]},
                {"name": "b", "route": [
                    {"destination": {"host": "checkout"}, "weight": 100},
                    {"destination": {"host": "checkout-canary"}, "weight": 0},
                ]},
                {"name": "other", "route": [{"destination": {"host": "payments"}, "weight": 100}]},
            ]
        }
    }  # fmt: skip


def test_subset_routing_changes_only_the_named_routes_weights() -> None:
    out = with_weights(VIRTUAL_SERVICE, SUBSETS, 30)
    assert set(route_weights_of(out, SUBSETS)) == {30}
    route = out["spec"]["http"][0]
    assert [d["weight"] for d in route["route"]] == [70, 30]
    expected = copy.deepcopy(VIRTUAL_SERVICE)
    expected["spec"]["http"][0]["route"][0]["weight"] = 70
    expected["spec"]["http"][0]["route"][1]["weight"] = 30
    assert out == expected
    assert VIRTUAL_SERVICE["spec"]["http"][0]["route"][1]["weight"] == 0  # input not mutated


def test_host_routing_without_named_routes_shifts_every_route_with_both_hosts() -> None:
    out = with_weights(host_vs(), HOSTS, 50)
    assert [[d["weight"] for d in r["route"]] for r in out["spec"]["http"]] == [
        [50, 50], [50, 50], [100],
    ]  # fmt: skip


def test_missing_route_and_destination_are_named() -> None:
    with pytest.raises(RoutingError, match="no HTTP route named http-primary"):
        route_weights_of(host_vs(), SUBSETS)
    vs = copy.deepcopy(VIRTUAL_SERVICE)
    vs["spec"]["http"][0]["route"].pop()
    with pytest.raises(RoutingError, match="no destination with subset 'canary'"):
        with_weights(vs, SUBSETS, 10)
    only_other = {"spec": {"http": [host_vs()["spec"]["http"][2]]}}
    with pytest.raises(RoutingError, match="no HTTP route with both hosts"):
        route_weights_of(only_other, HOSTS)


def test_weights_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match=r"0\.\.100"):
        with_weights(VIRTUAL_SERVICE, SUBSETS, 101)


def test_set_weights_retries_conflicts_and_reads_every_route_back(cluster: KubeApiServer) -> None:
    import asyncio

    from canaryd.istio import IstioRouter
    from canaryd.kube import Kube
    from canaryd.ports import CanaryRef, KubeError

    ref = CanaryRef(NS, "checkout")

    async def run(times: int, pct: int) -> None:
        api = cluster.api_client()
        try:
            cluster.inject(verb="PUT", path_contains="/virtualservices/", status=409, times=times)
            await IstioRouter(Kube(api), attempts=3).set_weights(ref, SUBSETS, pct)
        finally:
            cluster.clear_faults()
            api.close()

    asyncio.run(run(2, 40))
    vs = cluster.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
    assert vs is not None and set(route_weights_of(vs, SUBSETS)) == {40}
    with pytest.raises(KubeError, match="could not set canary weight to 60% after 3 attempts"):
        asyncio.run(run(10, 60))
