"""Gateway API traffic routing: the ``backendRefs`` weights of named rules of a
user-owned ``gateway.networking.k8s.io/v1`` HTTPRoute.

What it hides: the HTTPRoute's shape.  canaryd never creates or owns the HTTPRoute; it
changes only the ``weight`` of the stable and canary ``backendRefs`` in the rules the
Canary names (``spec.trafficRouting.gatewayAPI.rules``, matched on each rule's
``name``; every rule whose backends include both Services when it names none) and
leaves every other field — matches, filters, timeouts, other rules, parentRefs —
exactly as the user wrote it.  Backends are told apart by their Service name:
``stableService`` (default ``spec.service``) and ``canaryService`` (default
``<service>-canary``); a backendRef of another kind (not a core Service) is not one of
them.

Gateway API weights are relative (a backendRef without one weighs 1), so the canary's
share of a rule is ``canary / (stable + canary)``, rounded to a percent; canaryd
writes weights that sum to 100, as it does on Istio.  Reads, conflicts and retries are
:class:`~canaryd.routes.ObjectRouter`'s, so the same guarantees and drift handling
hold as for a VirtualService.
"""

from __future__ import annotations

import copy
from typing import Any

from canaryd.ports import RoutingError
from canaryd.routes import ObjectRouter, is_cohort, strategy_weights, with_strategy_weights
from canaryd.spec import CanarySpec, GatewayAPIRouting

GROUP = "gateway.networking.k8s.io"
VERSION = "v1"


def _routing(spec: CanarySpec) -> GatewayAPIRouting:
    routing = spec.traffic_routing
    if routing is None or routing.gateway_api is None:
        raise RoutingError("spec.trafficRouting.gatewayAPI is not set: no HTTPRoute to shift")
    return routing.gateway_api


def services(spec: CanarySpec) -> tuple[str, str]:
    """(stable, canary) Service names of the backendRefs."""
    routing = _routing(spec)
    service = spec.service or ""
    return routing.stable_service or service, routing.canary_service or f"{service}-canary"


def _is_service(ref: dict[str, Any]) -> bool:
    return ref.get("group", "") in ("", None) and ref.get("kind", "Service") == "Service"


def _rules(route: dict[str, Any], spec: CanarySpec) -> list[dict[str, Any]]:
    """The rules this Canary shifts, or RoutingError naming what is missing."""
    routing = _routing(spec)
    rules = (route.get("spec") or {}).get("rules") or []
    if routing.rules:
        by_name = {r.get("name"): r for r in rules if r.get("name")}
        missing = [w for w in routing.rules if w not in by_name]
        if missing:
            have = ", ".join(sorted(map(str, by_name))) or "none named"
            raise RoutingError(
                f"HTTPRoute {routing.http_route} has no rule named {', '.join(missing)} "
                f"(rules: {have})"
            )
        return [by_name[w] for w in routing.rules]
    stable, canary = services(spec)
    chosen = [
        r
        for r in rules
        if not is_cohort(r)
        and {b.get("name") for b in r.get("backendRefs") or [] if _is_service(b)}
        >= {stable, canary}
    ]
    if not chosen:
        raise RoutingError(
            f"HTTPRoute {routing.http_route} has no rule with both Services {stable!r} and "
            f"{canary!r} among its backendRefs"
        )
    return chosen


def _backends(rule: dict[str, Any], spec: CanarySpec) -> tuple[dict[str, Any], dict[str, Any]]:
    stable, canary = services(spec)
    found: dict[str, dict[str, Any]] = {}
    for ref in rule.get("backendRefs") or []:
        if _is_service(ref) and ref.get("name") in (stable, canary):
            if ref["name"] in found:
                raise RoutingError(
                    f"rule {rule.get('name') or '(unnamed)'} of HTTPRoute "
                    f"{_routing(spec).http_route} lists Service {ref['name']!r} twice"
                )
            found[ref["name"]] = ref
    missing = [v for v in (stable, canary) if v not in found]
    if missing:
        raise RoutingError(
            f"rule {rule.get('name') or '(unnamed)'} of HTTPRoute {_routing(spec).http_route} "
            f"has no backendRef to Service {', '.join(map(repr, missing))}"
        )
    return found[stable], found[canary]


def _weight(ref: dict[str, Any]) -> int:
    value = ref.get("weight", 1)  # the Gateway API's default
    return int(value) if isinstance(value, int) and value >= 0 else 1


def _canary_pct(rule: dict[str, Any], spec: CanarySpec) -> int:
    stable, canary = (_weight(b) for b in _backends(rule, spec))
    return 0 if stable + canary == 0 else round(100 * canary / (stable + canary))


def route_weights_of(route: dict[str, Any], spec: CanarySpec) -> tuple[int, ...]:
    """The canary percent of every rule this Canary manages, in order (under abTest, of
    the cohort's rule next to each: 0 where there is none)."""
    return strategy_weights(
        route, spec, "rules", _rules(route, spec), lambda r: _canary_pct(r, spec)
    )


#: The Gateway API's names for Istio's string match kinds (``prefix`` is refused by
#: the spec's validation: HTTPRoute header matches have no prefix type).
_MATCH_TYPES = {"exact": "Exact", "regex": "RegularExpression"}


def cohort_matches(rule: dict[str, Any], spec: CanarySpec) -> list[dict[str, Any]]:
    """HTTPRoute ``matches`` for the cohort on ``rule``: each of the rule's own matches
    (``/`` when it has none) with the cohort's header matches added.  A match with more
    header matches takes precedence over the rule's own (Gateway API precedence)."""
    cohort = []
    for m in spec.match:
        headers = []
        for name, how in m.headers.items():
            kind, value = how.kind_value()
            headers.append({"type": _MATCH_TYPES[kind], "name": name, "value": value})
        cohort.append(headers)
    own = [m for m in rule.get("matches") or [] if isinstance(m, dict)] or [{}]
    return [{**m, "headers": [*(m.get("headers") or []), *h]} for m in own for h in cohort]


def _is_mirror_to_canary(flt: Any, spec: CanarySpec) -> bool:
    """Whether ``flt`` is a RequestMirror filter to the canary's Service (canaryd's)."""
    if not isinstance(flt, dict) or flt.get("type") != "RequestMirror":
        return False
    ref = (flt.get("requestMirror") or {}).get("backendRef") or {}
    return _is_service(ref) and ref.get("name") == services(spec)[1]


def _mirror_pct(rule: dict[str, Any], spec: CanarySpec) -> int:
    for flt in rule.get("filters") or []:
        if _is_mirror_to_canary(flt, spec):
            mirror = flt.get("requestMirror") or {}
            percent = mirror.get("percent")
            if isinstance(percent, int):
                return percent
            fraction = mirror.get("fraction") or {}
            numerator, denominator = fraction.get("numerator"), fraction.get("denominator")
            if isinstance(numerator, int):
                return round(
                    100
                    * numerator
                    / (denominator if isinstance(denominator, int) and denominator else 100)
                )
            return 100  # the Gateway API's default: every request
    return 0


def mirrors_of(route: dict[str, Any], spec: CanarySpec) -> tuple[int, ...]:
    """The mirror percent to the canary of every managed rule (0: no mirror to it)."""
    return tuple(_mirror_pct(r, spec) for r in _rules(route, spec))


def _with_mirror(rule: dict[str, Any], spec: CanarySpec, mirror_pct: int) -> None:
    """Set (or, at 0, remove) the rule's RequestMirror filter to the canary, in place.
    Other filters, a mirror to anything else included, are left as they are.  Below
    100% the filter carries ``percent`` (Gateway API v1.2 and later; check that your
    gateway implements it)."""
    filters = [f for f in rule.get("filters") or [] if not _is_mirror_to_canary(f, spec)]
    if mirror_pct > 0:
        canary = _backends(rule, spec)[1]
        ref = {k: copy.deepcopy(v) for k, v in canary.items() if k not in {"weight", "filters"}}
        mirror: dict[str, Any] = {"backendRef": ref}
        if mirror_pct < 100:
            mirror["percent"] = mirror_pct
        filters.append({"type": "RequestMirror", "requestMirror": mirror})
    if filters:
        rule["filters"] = filters
    else:
        rule.pop("filters", None)


def with_weights(
    route: dict[str, Any], spec: CanarySpec, canary_pct: int, mirror_pct: int = 0
) -> dict[str, Any]:
    """A copy of the HTTPRoute with the managed rules at ``canary_pct`` (weights sum to
    100).  Only the two backendRefs' ``weight`` fields change, and with ``mirror_pct``
    (or a mirror canaryd set before) the rule's RequestMirror filter to the canary.
    Under abTest the managed rules are left alone and the cohort's rule next to each
    (a copy of it matching the cohort's headers too) carries ``canary_pct``; at 0 it is
    removed."""
    return with_strategy_weights(
        route, spec, canary_pct, mirror_pct,
        items_key="rules",
        match_key="matches",
        managed=lambda obj: _rules(obj, spec),
        pair=lambda item: _backends(item, spec),
        cohort_matches=lambda item: cohort_matches(item, spec),
        with_mirror=lambda item, pct: _with_mirror(item, spec, pct),
    )  # fmt: skip


class GatewayAPIRouter(ObjectRouter):
    """The ``TrafficRouter`` port on a Gateway API HTTPRoute."""

    group, version, plural, kind = GROUP, VERSION, "httproutes", "HTTPRoute"

    def object_name(self, spec: CanarySpec) -> str:
        return _routing(spec).http_route

    def weights_of(self, obj: dict[str, Any], spec: CanarySpec) -> tuple[int, ...]:
        return route_weights_of(obj, spec)

    def with_weights(
        self, obj: dict[str, Any], spec: CanarySpec, canary_pct: int, mirror_pct: int = 0
    ) -> dict[str, Any]:
        return with_weights(obj, spec, canary_pct, mirror_pct)

    def mirrors_of(self, obj: dict[str, Any], spec: CanarySpec) -> tuple[int, ...]:
        return mirrors_of(obj, spec)
