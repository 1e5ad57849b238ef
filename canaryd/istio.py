"""Istio traffic routing: the weights of named HTTP routes of a user-owned VirtualService.

What it hides: the VirtualService's shape.  canaryd never creates or owns the
VirtualService; it changes only the ``weight`` of the stable and canary destinations
in the HTTP routes the Canary names (all routes to the service's host when it names
none), and leaves every other field — retries, fault injection, other routes,
headers — exactly as the user wrote it.  Destinations are told apart by
DestinationRule subsets (``stableSubset`` / ``canarySubset``) or, without a
DestinationRule, by host (the ``canary`` workload's Service is ``<service>-canary``).

Every write is a read-modify-write carrying the resourceVersion it read (a 409 means
someone else changed the VirtualService: read again and retry; see
:class:`~canaryd.routes.ObjectRouter`).  :meth:`IstioRouter.check` says exactly what is
missing before any traffic moves.
"""

from __future__ import annotations

import copy
from typing import Any

from canaryd.ports import CanaryRef, NotFoundError, RoutingError
from canaryd.routes import ObjectRouter, is_cohort, strategy_weights, with_strategy_weights
from canaryd.spec import CanarySpec, IstioRouting

GROUP = "networking.istio.io"
VERSION = "v1"


def _istio(spec: CanarySpec) -> IstioRouting:
    routing = spec.traffic_routing
    if routing is None or routing.istio is None:
        raise RoutingError("spec.trafficRouting.istio is not set: no VirtualService to shift")
    return routing.istio


def _names(spec: CanarySpec) -> tuple[str, list[str]]:
    vs = _istio(spec).virtual_service
    return vs.name, list(vs.routes)


def _arms(spec: CanarySpec) -> tuple[str, str, str]:
    """(field, stable value, canary value): how destinations are told apart."""
    rule = _istio(spec).destination_rule
    if rule is not None:
        return "subset", rule.stable_subset, rule.canary_subset
    service = spec.service or ""
    return "host", service, f"{service}-canary"


def _routes(vs: dict[str, Any], spec: CanarySpec) -> list[dict[str, Any]]:
    """The HTTP routes this Canary shifts, or RoutingError naming what is missing."""
    name, wanted = _names(spec)
    http = (vs.get("spec") or {}).get("http") or []
    if wanted:
        by_name = {r.get("name"): r for r in http}
        missing = [w for w in wanted if w not in by_name]
        if missing:
            have = ", ".join(str(r.get("name")) for r in http if r.get("name")) or "none named"
            raise RoutingError(
                f"VirtualService {name} has no HTTP route named {', '.join(missing)} "
                f"(routes: {have})"
            )
        return [by_name[w] for w in wanted]
    field, stable, canary = _arms(spec)
    chosen = [
        r
        for r in http
        if not is_cohort(r)
        and {d.get("destination", {}).get(field) for d in r.get("route") or []} >= {stable, canary}
    ]
    if not chosen:
        raise RoutingError(
            f"VirtualService {name} has no HTTP route with both {field}s {stable!r} and "
            f"{canary!r} among its destinations"
        )
    return chosen


def _destinations(route: dict[str, Any], spec: CanarySpec) -> tuple[dict[str, Any], dict[str, Any]]:
    field, stable, canary = _arms(spec)
    name, _ = _names(spec)
    found: dict[str, dict[str, Any]] = {}
    for dest in route.get("route") or []:
        value = (dest.get("destination") or {}).get(field)
        if value in (stable, canary):
            found[value] = dest
    missing = [v for v in (stable, canary) if v not in found]
    if missing:
        raise RoutingError(
            f"route {route.get('name') or '(unnamed)'} of VirtualService {name} has no "
            f"destination with {field} {', '.join(map(repr, missing))}"
        )
    return found[stable], found[canary]


def _canary_weight(route: dict[str, Any], spec: CanarySpec) -> int:
    return int(_destinations(route, spec)[1].get("weight") or 0)


def route_weights_of(vs: dict[str, Any], spec: CanarySpec) -> tuple[int, ...]:
    """The canary weight of every route this Canary manages, in order (under abTest,
    of the cohort's route ahead of each: 0 where there is none)."""
    return strategy_weights(vs, spec, "http", _routes(vs, spec), lambda r: _canary_weight(r, spec))


def cohort_matches(route: dict[str, Any], spec: CanarySpec) -> list[dict[str, Any]]:
    """Istio ``match`` entries for the cohort on ``route``: each of the route's own
    matches (all requests when it has none) with the cohort's headers added."""
    cohort = [
        {name: dict([how.kind_value()]) for name, how in m.headers.items()} for m in spec.match
    ]
    own = [m for m in route.get("match") or [] if isinstance(m, dict)] or [{}]
    return [
        {**m, "headers": {**(m.get("headers") or {}), **headers}} for m in own for headers in cohort
    ]


def mirrors_of(vs: dict[str, Any], spec: CanarySpec) -> tuple[int, ...]:
    """The mirror percent to the canary of every managed route (0: no mirror to it)."""
    return tuple(_mirror_pct(r, spec) for r in _routes(vs, spec))


def _mirror_pct(route: dict[str, Any], spec: CanarySpec) -> int:
    mirror = route.get("mirror")
    if not isinstance(mirror, dict):
        return 0
    field, _, canary = _arms(spec)
    if mirror.get(field) != canary:
        return 0  # someone else's mirror: not canaryd's
    pct = (route.get("mirrorPercentage") or {}).get("value", 100)  # Istio's default: all
    return round(pct) if isinstance(pct, int | float) else 0


def _with_mirror(route: dict[str, Any], spec: CanarySpec, mirror_pct: int) -> None:
    """Set (or, at 0, remove) the route's mirror to the canary, in place: Istio's
    ``mirror`` (the canary destination) and ``mirrorPercentage``."""
    if mirror_pct <= 0:
        if _mirror_pct(route, spec):
            route.pop("mirror", None)
            route.pop("mirrorPercentage", None)
        return
    canary = _destinations(route, spec)[1]
    route["mirror"] = copy.deepcopy(canary.get("destination") or {})
    route["mirrorPercentage"] = {"value": float(mirror_pct)}


def with_weights(
    vs: dict[str, Any], spec: CanarySpec, canary_pct: int, mirror_pct: int = 0
) -> dict[str, Any]:
    """A copy of the VirtualService with the named routes at ``canary_pct`` (sum 100).

    Only the two destinations' ``weight`` fields change, and with ``mirror_pct`` (or a
    mirror canaryd set before) the route's ``mirror`` and ``mirrorPercentage``.  Under
    abTest the managed routes are left alone and the cohort's route ahead of each (a
    copy of it matching the cohort's headers too) carries ``canary_pct``; at 0 it is
    removed.
    """
    return with_strategy_weights(
        vs, spec, canary_pct, mirror_pct,
        items_key="http",
        match_key="match",
        managed=lambda obj: _routes(obj, spec),
        pair=lambda item: _destinations(item, spec),
        cohort_matches=lambda item: cohort_matches(item, spec),
        with_mirror=lambda item, pct: _with_mirror(item, spec, pct),
    )  # fmt: skip


class IstioRouter(ObjectRouter):
    """The ``TrafficRouter`` port on an Istio VirtualService."""

    group, version, plural, kind = GROUP, VERSION, "virtualservices", "VirtualService"

    def object_name(self, spec: CanarySpec) -> str:
        return _names(spec)[0]

    def weights_of(self, obj: dict[str, Any], spec: CanarySpec) -> tuple[int, ...]:
        return route_weights_of(obj, spec)

    def with_weights(
        self, obj: dict[str, Any], spec: CanarySpec, canary_pct: int, mirror_pct: int = 0
    ) -> dict[str, Any]:
        return with_weights(obj, spec, canary_pct, mirror_pct)

    def mirrors_of(self, obj: dict[str, Any], spec: CanarySpec) -> tuple[int, ...]:
        return mirrors_of(obj, spec)

    async def check_more(self, ref: CanaryRef, spec: CanarySpec, obj: dict[str, Any]) -> None:
        """The DestinationRule and its two subsets, when the Canary names one."""
        istio = spec.traffic_routing.istio if spec.traffic_routing else None
        rule = istio.destination_rule if istio else None
        if rule is None:
            return
        try:
            dr = await self.kube.call(
                self.kube.custom.get_namespaced_custom_object,
                GROUP, VERSION, ref.namespace, "destinationrules", rule.name,
            )  # fmt: skip
        except NotFoundError as exc:
            raise RoutingError(f"DestinationRule {ref.namespace}/{rule.name} not found") from exc
        dr_spec = (dr.get("spec") if isinstance(dr, dict) else None) or {}
        subsets = {s.get("name") for s in dr_spec.get("subsets") or []}
        missing = [s for s in (rule.stable_subset, rule.canary_subset) if s not in subsets]
        if missing:
            raise RoutingError(
                f"DestinationRule {rule.name} has no subset {', '.join(map(repr, missing))}"
                f" (subsets: {', '.join(sorted(map(str, subsets))) or 'none'})"
            )
