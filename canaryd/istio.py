"""Istio traffic routing: the weights of named HTTP routes of a user-owned VirtualService.

What it hides: the VirtualService's shape.  canaryd never creates or owns the
VirtualService; it changes only the ``weight`` of the stable and canary destinations
in the HTTP routes the Canary names (all routes to the service's host when it names
none), and leaves every other field — retries, fault injection, other routes,
headers — exactly as the user wrote it.  Destinations are told apart by
DestinationRule subsets (``stableSubset`` / ``canarySubset``) or, without a
DestinationRule, by host (the ``canary`` workload's Service is ``<service>-canary``).

Every write is a read-modify-write carrying the resourceVersion it read (a 409 means
someone else changed the VirtualService: read again and retry), and the weights are
read back after each write.  :meth:`IstioRouter.check` says exactly what is missing
before any traffic moves.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from canaryd.kube import Kube
from canaryd.ports import CanaryRef, ConflictError, KubeError, NotFoundError, RoutingError
from canaryd.spec import CanarySpec

GROUP = "networking.istio.io"
VERSION = "v1"


def _names(spec: CanarySpec) -> tuple[str, list[str]]:
    if spec.traffic_routing is None:
        raise RoutingError("spec.trafficRouting is not set: no VirtualService to shift")
    vs = spec.traffic_routing.istio.virtual_service
    return vs.name, list(vs.routes)


def _arms(spec: CanarySpec) -> tuple[str, str, str]:
    """(field, stable value, canary value): how destinations are told apart."""
    assert spec.traffic_routing is not None
    rule = spec.traffic_routing.istio.destination_rule
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
        if {d.get("destination", {}).get(field) for d in r.get("route") or []} >= {stable, canary}
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


def route_weights_of(vs: dict[str, Any], spec: CanarySpec) -> tuple[int, ...]:
    """The canary weight of every route this Canary manages, in order."""
    return tuple(int(_destinations(r, spec)[1].get("weight") or 0) for r in _routes(vs, spec))


def with_weights(vs: dict[str, Any], spec: CanarySpec, canary_pct: int) -> dict[str, Any]:
    """A copy of the VirtualService with the named routes at ``canary_pct`` (sum 100).

    Only the two destinations' ``weight`` fields change.
    """
    if not 0 <= canary_pct <= 100:
        raise ValueError(f"canary weight must be 0..100, got {canary_pct}")
    out = copy.deepcopy(vs)
    for route in _routes(out, spec):
        stable, canary = _destinations(route, spec)
        stable["weight"] = 100 - canary_pct
        canary["weight"] = canary_pct
    return out


class IstioRouter:
    """The ``TrafficRouter`` port on an Istio VirtualService."""

    def __init__(self, kube: Kube, attempts: int = 5) -> None:
        self.kube = kube
        self.attempts = attempts
        #: the VirtualService each (namespace, name) was last read as by route_weights,
        #: until set_weights uses it
        self._read: dict[tuple[str, str], dict[str, Any]] = {}

    async def _get(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            raw = await self.kube.call(
                self.kube.custom.get_namespaced_custom_object,
                GROUP, VERSION, namespace, "virtualservices", name,
            )  # fmt: skip
        except NotFoundError as exc:
            raise RoutingError(f"VirtualService {namespace}/{name} not found") from exc
        if not isinstance(raw, dict):
            raise RoutingError(f"VirtualService {namespace}/{name}: unexpected answer")
        return raw

    async def check(self, ref: CanaryRef, spec: CanarySpec) -> None:
        """Raise RoutingError naming what is missing (VirtualService, route, subset)."""
        name, _ = _names(spec)
        vs = await self._get(ref.namespace, name)
        for route in _routes(vs, spec):
            _destinations(route, spec)
        rule = spec.traffic_routing.istio.destination_rule if spec.traffic_routing else None
        if rule is not None:
            try:
                dr = await self.kube.call(
                    self.kube.custom.get_namespaced_custom_object,
                    GROUP, VERSION, ref.namespace, "destinationrules", rule.name,
                )  # fmt: skip
            except NotFoundError as exc:
                raise RoutingError(
                    f"DestinationRule {ref.namespace}/{rule.name} not found"
                ) from exc
            dr_spec = (dr.get("spec") if isinstance(dr, dict) else None) or {}
            subsets = {s.get("name") for s in dr_spec.get("subsets") or []}
            missing = [s for s in (rule.stable_subset, rule.canary_subset) if s not in subsets]
            if missing:
                raise RoutingError(
                    f"DestinationRule {rule.name} has no subset {', '.join(map(repr, missing))}"
                    f" (subsets: {', '.join(sorted(map(str, subsets))) or 'none'})"
                )

    async def route_weights(self, ref: CanaryRef, spec: CanarySpec) -> tuple[int, ...]:
        """The canary weight of every managed route, in spec order (one read)."""
        name, _ = _names(spec)
        vs = await self._get(ref.namespace, name)
        self._read[(ref.namespace, name)] = vs  # the next set_weights writes on it
        return route_weights_of(vs, spec)

    async def set_weights(
        self, ref: CanaryRef, spec: CanarySpec, canary_pct: int
    ) -> tuple[int, ...]:
        """Route ``canary_pct`` % to the canary on every managed route; returns every
        route's weight as the API server stored it (the write's answer: no read back).
        A conflict reads afresh and retries; a write already done is not repeated."""
        name, _ = _names(spec)
        for attempt in range(self.attempts + 1):
            # the copy route_weights just read, once: no second read of the same object
            # (if it is stale the write gets 409 and the next attempt reads afresh)
            vs = self._read.pop((ref.namespace, name), None) or await self._get(ref.namespace, name)
            weights = route_weights_of(vs, spec)
            if all(w == canary_pct for w in weights):
                return weights
            if attempt == self.attempts:
                break
            try:
                stored = await self.kube.call(
                    self.kube.custom.replace_namespaced_custom_object,
                    GROUP, VERSION, ref.namespace, "virtualservices", name,
                    with_weights(vs, spec, canary_pct),
                )  # fmt: skip
            except ConflictError:
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            if not isinstance(stored, dict):
                raise RoutingError(f"VirtualService {ref.namespace}/{name}: unexpected answer")
            return route_weights_of(stored, spec)
        raise KubeError(
            f"VirtualService {ref.namespace}/{name}: could not set canary weight to "
            f"{canary_pct}% after {self.attempts} attempts (conflicting writers?)"
        )
