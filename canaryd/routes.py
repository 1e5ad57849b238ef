"""What every Kubernetes traffic router shares, and the one that picks by spec.

A router changes the stable and canary weights inside one user-owned object (an Istio
VirtualService, a Gateway API HTTPRoute) and nothing else in it.  :class:`ObjectRouter`
holds the part that does not depend on the object's shape: the read (a missing object
is a :class:`~canaryd.ports.RoutingError` naming it), the read-modify-write carrying
the resourceVersion it read (409: read afresh and retry, a write already done is not
repeated), and reusing the copy :meth:`route_weights` just read so that a round costs
one read.  Subclasses say where the object is and how its weights are read and set.

:class:`KubeRouter` is the ``TrafficRouter`` the daemon uses: each Canary's
``spec.trafficRouting`` names its router (``istio`` or ``gatewayAPI``).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Sequence
from typing import Any

from canaryd.kube import Kube
from canaryd.ports import CanaryRef, ConflictError, KubeError, NotFoundError, RoutingError
from canaryd.spec import CanarySpec

Pair = tuple[dict[str, Any], dict[str, Any]]


def with_pair_weights(
    obj: dict[str, Any],
    pairs: Callable[[dict[str, Any]], Sequence[Pair]],
    canary_pct: int,
) -> dict[str, Any]:
    """A copy of ``obj`` in which every (stable, canary) pair ``pairs`` finds in it has
    ``weight`` 100 − ``canary_pct`` and ``canary_pct``; nothing else changes."""
    if not 0 <= canary_pct <= 100:
        raise ValueError(f"canary weight must be 0..100, got {canary_pct}")
    out = copy.deepcopy(obj)
    for stable, canary in pairs(out):
        stable["weight"] = 100 - canary_pct
        canary["weight"] = canary_pct
    return out


#: The name suffix of the route (Istio) or rule (HTTPRoute) canaryd adds for an A/B
#: test's cohort, next to each managed route: the only thing canaryd ever adds to a
#: user's object, and removed when the cohort goes back to stable (weight 0).
COHORT_SUFFIX = "-canaryd-ab"


def cohort_name(managed: dict[str, Any], index: int) -> str:
    """The name of the cohort route canaryd keeps ahead of managed route ``managed``
    (the ``index``-th managed route, for an unnamed one)."""
    return f"{managed.get('name') or f'route{index}'}{COHORT_SUFFIX}"


def is_cohort(route: dict[str, Any]) -> bool:
    """Whether ``route`` is a cohort route canaryd added (never itself a managed one)."""
    return str(route.get("name") or "").endswith(COHORT_SUFFIX)


def with_cohorts(
    items: list[dict[str, Any]],
    managed: Sequence[dict[str, Any]],
    cohort_of: Callable[[dict[str, Any], str], dict[str, Any]],
    canary_pct: int,
) -> list[dict[str, Any]]:
    """``items`` (a VirtualService's ``http`` or an HTTPRoute's ``rules``) without
    canaryd's cohort routes and, when ``canary_pct`` > 0, with a fresh one
    (``cohort_of(managed route, name)``) just ahead of each managed route.  The managed
    routes and every other item are left as they are."""
    names = {id(r): cohort_name(r, i) for i, r in enumerate(managed)}
    out: list[dict[str, Any]] = []
    for item in items:
        if is_cohort(item):
            continue
        if canary_pct > 0 and id(item) in names:
            out.append(cohort_of(item, names[id(item)]))
        out.append(item)
    return out


def strategy_weights(
    obj: dict[str, Any],
    spec: CanarySpec,
    items_key: str,
    managed: Sequence[dict[str, Any]],
    weight_of: Callable[[dict[str, Any]], int],
) -> tuple[int, ...]:
    """The canary weight of every managed route of ``obj`` (its ``items_key`` list), in
    order: its own, or under abTest its cohort route's (:func:`cohort_weights`)."""
    if spec.strategy == "abTest":
        return cohort_weights((obj.get("spec") or {}).get(items_key) or [], managed, weight_of)
    return tuple(weight_of(r) for r in managed)


def cohort_weights(
    items: Sequence[dict[str, Any]],
    managed: Sequence[dict[str, Any]],
    weight_of: Callable[[dict[str, Any]], int],
) -> tuple[int, ...]:
    """The cohort's canary weight ahead of each managed route: its cohort route's, or
    0 where there is none (the cohort then follows the managed route: stable)."""
    by_name = {r.get("name"): r for r in items if is_cohort(r)}
    return tuple(
        weight_of(by_name[name]) if (name := cohort_name(r, i)) in by_name else 0
        for i, r in enumerate(managed)
    )


def with_strategy_weights(
    obj: dict[str, Any],
    spec: CanarySpec,
    canary_pct: int,
    mirror_pct: int,
    *,
    items_key: str,
    match_key: str,
    managed: Callable[[dict[str, Any]], list[dict[str, Any]]],
    pair: Callable[[dict[str, Any]], Pair],
    cohort_matches: Callable[[dict[str, Any]], list[dict[str, Any]]],
    with_mirror: Callable[[dict[str, Any], int], None],
) -> dict[str, Any]:
    """A copy of ``obj`` (a VirtualService or an HTTPRoute) at ``canary_pct``, whatever
    the strategy; the shape of the object is in the callables.

    * canary and blueGreen: each managed route's (stable, canary) ``pair`` weighted,
      and its mirror to the canary set to ``mirror_pct`` (``with_mirror``, in place);
    * abTest: the managed routes left alone, and next to each the cohort's route (a
      copy of it named by :func:`cohort_name`, whose ``match_key`` is
      ``cohort_matches`` of it) carrying ``canary_pct``, or none at 0.

    ``items_key`` names the object's list of routes (``http``, ``rules``)."""
    if spec.strategy != "abTest":
        out = with_pair_weights(obj, lambda o: [pair(r) for r in managed(o)], canary_pct)
        for item in managed(out):
            with_mirror(item, mirror_pct)
        return out
    if not 0 <= canary_pct <= 100:
        raise ValueError(f"canary weight must be 0..100, got {canary_pct}")
    out = copy.deepcopy(obj)

    def cohort_of(item: dict[str, Any], name: str) -> dict[str, Any]:
        cohort = {**copy.deepcopy(item), "name": name, match_key: cohort_matches(item)}
        stable, canary = pair(cohort)
        stable["weight"], canary["weight"] = 100 - canary_pct, canary_pct
        return cohort

    out_spec = out.setdefault("spec", {})
    out_spec[items_key] = with_cohorts(
        out_spec.get(items_key) or [], managed(out), cohort_of, canary_pct
    )
    return out


class ObjectRouter:
    """The ``TrafficRouter`` port on one custom object per Canary (see the module)."""

    group: str
    version: str
    plural: str
    kind: str

    def __init__(self, kube: Kube, attempts: int = 5) -> None:
        self.kube = kube
        self.attempts = attempts
        #: the object each (namespace, name) was last read as by route_weights, until
        #: set_weights uses it
        self._read: dict[tuple[str, str], dict[str, Any]] = {}

    # -- what a subclass says ------------------------------------------------------------

    def object_name(self, spec: CanarySpec) -> str:
        """The name of the object this Canary's weights live in (RoutingError if unset)."""
        raise NotImplementedError

    def weights_of(self, obj: dict[str, Any], spec: CanarySpec) -> tuple[int, ...]:
        """The canary percent of every managed route of ``obj``, in spec order."""
        raise NotImplementedError

    def with_weights(
        self, obj: dict[str, Any], spec: CanarySpec, canary_pct: int, mirror_pct: int = 0
    ) -> dict[str, Any]:
        """A copy of ``obj`` with every managed route at ``canary_pct`` (and mirroring
        ``mirror_pct`` % to the canary)."""
        raise NotImplementedError

    def mirrors_of(self, obj: dict[str, Any], spec: CanarySpec) -> tuple[int, ...]:
        """The mirror percent canaryd set on every managed route (0: none)."""
        return ()

    async def check_more(self, ref: CanaryRef, spec: CanarySpec, obj: dict[str, Any]) -> None:
        """Further checks before traffic moves (e.g. a DestinationRule's subsets)."""
        return None

    # -- the port ------------------------------------------------------------------------

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            raw = await self.kube.call(
                self.kube.custom.get_namespaced_custom_object,
                self.group, self.version, namespace, self.plural, name,
            )  # fmt: skip
        except NotFoundError as exc:
            raise RoutingError(f"{self.kind} {namespace}/{name} not found") from exc
        if not isinstance(raw, dict):
            raise RoutingError(f"{self.kind} {namespace}/{name}: unexpected answer")
        return raw

    async def check(self, ref: CanaryRef, spec: CanarySpec) -> None:
        """Raise RoutingError naming what is missing (the object, a route, a backend)."""
        obj = await self.get(ref.namespace, self.object_name(spec))
        self.weights_of(obj, spec)
        await self.check_more(ref, spec, obj)

    async def route_weights(self, ref: CanaryRef, spec: CanarySpec) -> tuple[int, ...]:
        """The canary weight of every managed route, in spec order (one read)."""
        name = self.object_name(spec)
        obj = await self.get(ref.namespace, name)
        self._read[(ref.namespace, name)] = obj  # the next set_weights writes on it
        return self.weights_of(obj, spec)

    async def route_mirrors(self, ref: CanaryRef, spec: CanarySpec) -> tuple[int, ...]:
        """The mirror percent of every managed route (the simulated metrics source
        follows it); reads the object."""
        return self.mirrors_of(await self.get(ref.namespace, self.object_name(spec)), spec)

    async def set_weights(
        self, ref: CanaryRef, spec: CanarySpec, canary_pct: int, mirror_pct: int = 0
    ) -> tuple[int, ...]:
        """Route ``canary_pct`` % to the canary on every managed route (mirroring
        ``mirror_pct`` % to it); returns every route's weight as the API server stored
        it (the write's answer: no read back).  A conflict reads afresh and retries; a
        write already done is not repeated."""
        name = self.object_name(spec)
        for attempt in range(self.attempts + 1):
            # the copy route_weights just read, once: no second read of the same object
            # (if it is stale the write gets 409 and the next attempt reads afresh)
            obj = self._read.pop((ref.namespace, name), None) or await self.get(ref.namespace, name)
            weights = self.weights_of(obj, spec)
            if all(w == canary_pct for w in weights) and all(
                m == mirror_pct for m in self.mirrors_of(obj, spec)
            ):
                return weights
            if attempt == self.attempts:
                break
            try:
                stored = await self.kube.call(
                    self.kube.custom.replace_namespaced_custom_object,
                    self.group, self.version, ref.namespace, self.plural, name,
                    self.with_weights(obj, spec, canary_pct, mirror_pct),
                )  # fmt: skip
            except ConflictError:
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            if not isinstance(stored, dict):
                raise RoutingError(f"{self.kind} {ref.namespace}/{name}: unexpected answer")
            return self.weights_of(stored, spec)
        raise KubeError(
            f"{self.kind} {ref.namespace}/{name}: could not set canary weight to "
            f"{canary_pct}% after {self.attempts} attempts (conflicting writers?)"
        )


class KubeRouter:
    """The ``TrafficRouter`` for a cluster: Istio or the Gateway API, as each Canary's
    ``spec.trafficRouting`` says."""

    def __init__(self, kube: Kube) -> None:
        from canaryd.gatewayapi import GatewayAPIRouter  # noqa: PLC0415
        from canaryd.istio import IstioRouter  # noqa: PLC0415

        self.istio = IstioRouter(kube)
        self.gateway_api = GatewayAPIRouter(kube)

    def _for(self, spec: CanarySpec) -> ObjectRouter:
        routing = spec.traffic_routing
        if routing is None:
            raise RoutingError("spec.trafficRouting is not set: no VirtualService or HTTPRoute")
        return self.gateway_api if routing.gateway_api is not None else self.istio

    async def check(self, ref: CanaryRef, spec: CanarySpec) -> None:
        await self._for(spec).check(ref, spec)

    async def route_weights(self, ref: CanaryRef, spec: CanarySpec) -> tuple[int, ...]:
        return await self._for(spec).route_weights(ref, spec)

    async def set_weights(
        self, ref: CanaryRef, spec: CanarySpec, canary_pct: int, mirror_pct: int = 0
    ) -> tuple[int, ...]:
        return await self._for(spec).set_weights(ref, spec, canary_pct, mirror_pct)

    async def route_mirrors(self, ref: CanaryRef, spec: CanarySpec) -> tuple[int, ...]:
        return await self._for(spec).route_mirrors(ref, spec)
