"""The mesh emulator: Istio's metrics for a real Prometheus, on traffic that follows the cluster.

``python -m simulator serve`` (or ``canaryd-sim serve``) stands in for an Istio mesh with
live traffic.  It finds the Canary custom resources of a cluster, plays one
:class:`~simulator.engine.Simulation` per Canary, and serves the counters on
``/metrics`` under Istio's standard metric names and labels (destination reporter), for
a real Prometheus to scrape and canaryd to query.  The traffic split follows the
VirtualService weights canaryd writes, as Envoy would::

    Canary ──(spec)──> which VirtualService, route, subsets, workloads
    VirtualService ──(watch)──> canary weight ──> Simulation.set_canary_weight
    Prometheus ──(scrape)──> collect(): advance every Simulation to now, emit counters

What it hides:

* **Discovery.**  Canaries (``canaryd.io/v1alpha1``) and VirtualServices
  (``networking.istio.io/v1``) are each kept in a local cache by an informer: one list
  (paginated), then a watch from the list's ``resourceVersion``; a watch that ends is
  renewed from the last version seen, and an expired one (410) or any error means a
  fresh list (after an error, with a back-off from 0.5 s doubling up to 5 s).  So a
  weight change reaches the emulator within milliseconds, a new or deleted Canary too,
  and the cost does not grow with polling: 5,000 VirtualServices are one list and one
  open watch per namespace (or one for the cluster).
* **Time.**  Each Canary's simulation starts warmed up (``Simulation.warmed_up``: the
  stable arm has served alone for 600 virtual seconds) when the Canary is discovered,
  and is advanced lazily in wall-clock time × ``speed``: on every scrape, and on every
  weight change (first to now at the old weight, then the new weight applies), so each
  request is served at the weight routed when it arrived.
* **Routing, as Envoy reads it** (:func:`canary_share_pct`): the route is the first of
  ``spec.trafficRouting.istio.virtualService.routes`` when routes are named, else the
  first HTTP route holding both destinations.  Destinations are told apart by the
  DestinationRule's subsets (``stableSubset`` / ``canarySubset``, default ``stable`` /
  ``canary``) or, without a DestinationRule, by host (``<service>`` and
  ``<service>-canary``, short or fully qualified).  The canary's share is its weight
  over the sum of the route's weights (the weight itself when they sum to 100, as Istio
  requires).  With ``spec.trafficRouting.gatewayAPI`` the split is read from the
  HTTPRoute instead (also kept by informers): the first named rule, else the first rule
  whose backendRefs include both Services (``stableService`` / ``canaryService``,
  default ``<service>`` / ``<service>-canary``), the canary's weight over the rule's
  total (a backendRef without a weight weighs 1).  A missing VirtualService or
  HTTPRoute, or an unreadable route, routes nothing to the canary (weight 0) and is
  logged once, until it changes.

Metrics (labels as Istio's destination reporter uses them; ``pod`` as Prometheus'
Kubernetes discovery adds it)::

    istio_requests_total{reporter="destination", source_workload="istio-ingressgateway",
        destination_workload, destination_workload_namespace, destination_service,
        destination_service_name, destination_canonical_service, request_protocol="http",
        pod="<workload>-0", response_code="200" | "503"}
    istio_request_duration_milliseconds_bucket / _count / _sum{... same, no response_code}

A series appears with its first request, as in Istio: an arm that never served a
request (a canary kept at weight 0) has no series, and a ``503`` series appears with
the first error.  The histogram carries no ``response_code``: the simulation draws
latency independently of errors, so splitting it by code would invent data.

Cost: a scrape advances every simulation (tens of µs each: a few numpy draws per
interval, never per request) under one lock, then builds the families outside it; the
``_sum`` of all histograms is one matrix product over the stacked bucket counts.
Weight changes wait for that lock only while simulations advance, never during encoding.
Measured at 5,000 Canaries, half of them with a serving canary (7,500 arms, ~178,000
samples, 64 MB of text): ``collect()`` takes ~0.5 s, of which ~0.2 s is simulation;
prometheus_client's text encoder then takes ~3 s more, because it validates and escapes
every label of every sample.  ``exposition="fast"`` (``--exposition fast``) writes the
same series from label blocks rendered once per Canary: ~0.5 s a scrape in all.
Responses are not gzipped: scrapes come over loopback, where compressing tens of MB
would cost more CPU than it saves.

This module must not import ``canaryd``: it reads the Canary and VirtualService
objects as plain JSON, on its own.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal, NamedTuple, Self, TextIO, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import numpy as np
import numpy.typing as npt
from kubernetes import client as k8s
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, ThreadingWSGIServer
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample

from analysis.counts import LATENCY_EDGES_MS, N_BUCKETS
from simulator.engine import Simulation
from simulator.informer import Informer, custom_list_fn
from simulator.scenario import Scenario, ScenarioError, get_scenario, load_scenario_file

__all__ = [
    "CANARY_GROUP",
    "CANARY_PLURAL",
    "CANARY_VERSION",
    "COUNTER_LABELS",
    "EXPOSITIONS",
    "GATEWAY_GROUP",
    "GATEWAY_VERSION",
    "HISTOGRAM_LABELS",
    "HTTPROUTE_PLURAL",
    "ISTIO_GROUP",
    "ISTIO_VERSION",
    "CanaryId",
    "Exposition",
    "MeshEmulator",
    "RouteError",
    "Routing",
    "Split",
    "canary_mirror_pct",
    "canary_share_pct",
    "routing_of",
    "split_of",
]

log = logging.getLogger(__name__)

Obj = dict[str, Any]

CANARY_GROUP = "canaryd.io"
CANARY_VERSION = "v1alpha1"
CANARY_PLURAL = "canaries"
ISTIO_GROUP = "networking.istio.io"
ISTIO_VERSION = "v1"
VS_PLURAL = "virtualservices"
GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_VERSION = "v1"
HTTPROUTE_PLURAL = "httproutes"

#: Who writes ``/metrics`` (see :class:`MeshEmulator`).
Exposition = Literal["prometheus_client", "fast"]
EXPOSITIONS: tuple[Exposition, ...] = ("prometheus_client", "fast")

#: The workload Istio names as the source of ingress traffic.
SOURCE_WORKLOAD = "istio-ingressgateway"
#: Labels of ``istio_request_duration_milliseconds`` series, in this order.
HISTOGRAM_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "destination_service_name",
    "destination_canonical_service",
    "request_protocol",
    "pod",
)
#: Labels of ``istio_requests_total`` series: the histogram's and ``response_code``.
COUNTER_LABELS: tuple[str, ...] = (*HISTOGRAM_LABELS, "response_code")

#: ``le`` label values, formatted as Envoy and Go's Prometheus client do (1, 1.8e+06).
_LE: tuple[str, ...] = (*(format(edge, "g") for edge in LATENCY_EDGES_MS), "+Inf")
#: A representative latency per bucket, in ms, to estimate ``_sum``: the bucket's
#: midpoint (the first bucket's is edge/2), and the last finite edge for ``+Inf``.
_MIDPOINTS_MS: npt.NDArray[np.float64] = np.array(
    [
        (low + high) / 2
        for low, high in zip((0.0, *LATENCY_EDGES_MS[:-1]), LATENCY_EDGES_MS, strict=True)
    ]
    + [LATENCY_EDGES_MS[-1]],
    dtype=np.float64,
)
assert len(_LE) == len(_MIDPOINTS_MS) == N_BUCKETS
_REQUESTS = "istio_requests_total"
_REQUESTS_HELP = "Requests served, by the destination's sidecar (simulated by canaryd-sim)"
_DURATION = "istio_request_duration_milliseconds"
_DURATION_HELP = (
    "Request duration in milliseconds (simulated by canaryd-sim; _sum estimated from "
    "bucket midpoints)"
)
_BUCKET = f"{_DURATION}_bucket"
_COUNT = f"{_DURATION}_count"
_SUM = f"{_DURATION}_sum"
_OK = {"response_code": "200"}
_ERROR = {"response_code": "503"}


# --------------------------------------------------------------------------- routing


class CanaryId(NamedTuple):
    """A Canary custom resource, by namespace and name."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class RouteError(Exception):
    """The VirtualService cannot be read as a split between stable and canary."""


@dataclass(frozen=True, slots=True)
class Routing:
    """What the emulator needs of one Canary's spec.

    Attributes:
        canary: the Canary resource.
        service: the Istio service name (``spec.service``; the stable Deployment when unset).
        stable_workload: the stable Deployment (``spec.stable.deployment``).
        canary_workload: the canary Deployment (``spec.canary.deployment``).
        virtual_service: the routing object's name (a VirtualService, or an HTTPRoute
            with ``spec.trafficRouting.gatewayAPI``), in the Canary's namespace; empty
            when ``spec.trafficRouting`` is missing (then nothing is routed to the canary).
        routes: the named HTTP routes (HTTPRoute rules); empty for "the first route with
            both destinations".
        match_by: ``subset`` (a DestinationRule is named), ``host``, or ``service`` (an
            HTTPRoute's backendRefs, by Service name).
        stable_destination: the stable destination's subset, host or Service.
        canary_destination: the canary destination's subset, host or Service.
        plural: the routing object's resource: ``virtualservices`` or ``httproutes``.
    """

    canary: CanaryId
    service: str
    stable_workload: str
    canary_workload: str
    virtual_service: str
    routes: tuple[str, ...]
    match_by: Literal["subset", "host", "service"]
    stable_destination: str
    canary_destination: str
    plural: str = VS_PLURAL

    @property
    def vs_key(self) -> tuple[str, str, str]:
        """(resource, namespace, name) of the routing object."""
        return self.plural, self.canary.namespace, self.virtual_service

    @property
    def workloads(self) -> tuple[str, str, str]:
        """What the metric series are named after; a change means new series."""
        return self.service, self.stable_workload, self.canary_workload


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def routing_of(canary: Mapping[str, Any]) -> Routing:
    """Read a Canary custom resource (a JSON object) as a :class:`Routing`.

    Raises:
        ValueError: when the Canary does not name both Deployments.
    """
    meta = _dict(canary.get("metadata"))
    ref = CanaryId(_text(meta.get("namespace")), _text(meta.get("name")))
    spec = _dict(canary.get("spec"))
    stable = _text(_dict(spec.get("stable")).get("deployment"))
    canary_workload = _text(_dict(spec.get("canary")).get("deployment"))
    if not stable or not canary_workload:
        raise ValueError(
            f"Canary {ref}: spec.stable.deployment and spec.canary.deployment must both be set"
        )
    service = _text(spec.get("service")) or stable
    gateway = _dict(_dict(spec.get("trafficRouting")).get("gatewayAPI"))
    if gateway:
        rules = gateway.get("rules")
        return Routing(
            canary=ref,
            service=service,
            stable_workload=stable,
            canary_workload=canary_workload,
            virtual_service=_text(gateway.get("httpRoute")),
            routes=tuple(str(r) for r in rules) if isinstance(rules, list) else (),
            match_by="service",
            stable_destination=_text(gateway.get("stableService")) or service,
            canary_destination=_text(gateway.get("canaryService")) or f"{service}-canary",
            plural=HTTPROUTE_PLURAL,
        )
    istio = _dict(_dict(spec.get("trafficRouting")).get("istio"))
    vs = _dict(istio.get("virtualService"))
    routes = vs.get("routes")
    rule = istio.get("destinationRule")
    if isinstance(rule, dict):
        match_by: Literal["subset", "host"] = "subset"
        stable_dest = _text(rule.get("stableSubset")) or "stable"
        canary_dest = _text(rule.get("canarySubset")) or "canary"
    else:
        match_by, stable_dest, canary_dest = "host", service, f"{service}-canary"
    return Routing(
        canary=ref,
        service=service,
        stable_workload=stable,
        canary_workload=canary_workload,
        virtual_service=_text(vs.get("name")),
        routes=tuple(str(r) for r in routes) if isinstance(routes, list) else (),
        match_by=match_by,
        stable_destination=stable_dest,
        canary_destination=canary_dest,
    )


def _is(destination: Any, routing: Routing, wanted: str) -> bool:
    """Whether a route destination (``{"destination": {...}, "weight": n}``) is ``wanted``."""
    target = destination.get("destination") if isinstance(destination, dict) else None
    if not isinstance(target, dict):
        return False
    if routing.match_by == "subset":
        return target.get("subset") == wanted
    host, ns = target.get("host"), routing.canary.namespace
    return host in (
        wanted,
        f"{wanted}.{ns}",
        f"{wanted}.{ns}.svc",
        f"{wanted}.{ns}.svc.cluster.local",
    )


def _weight(destination: Mapping[str, Any], alone: bool, where: str) -> int:
    """A destination's weight: as written, 100 when it is the route's only one, else 0."""
    weight = destination.get("weight")
    if weight is None:
        return 100 if alone else 0
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        raise RouteError(f"{where}: weight {weight!r} is not a whole number >= 0")
    return weight


class Split(NamedTuple):
    """How Envoy splits one Canary's requests, as the routing object reads.

    Attributes:
        main_pct: the canary's share of the main route (everyone's).
        cohort_pct: the canary's share of the route an A/B test's cohort takes, or None
            when there is none.
        mirror_pct: the share of the main route's requests also copied to the canary.
    """

    main_pct: int
    cohort_pct: int | None
    mirror_pct: int

    def share_pct(self, cohort_pct: int) -> int:
        """The canary's share of all requests, ``cohort_pct`` of them in the cohort."""
        if self.cohort_pct is None or cohort_pct <= 0:
            return self.main_pct
        return round((cohort_pct * self.cohort_pct + (100 - cohort_pct) * self.main_pct) / 100)


def split_of(vs_spec: Mapping[str, Any] | None, routing: Routing) -> Split:
    """How the routing object (a VirtualService's or HTTPRoute's ``spec``, ``None``
    when it does not exist) splits requests: the main route's share, the cohort's
    route (Istio: the first with a header match ahead of the main route; an HTTPRoute:
    the rule with header matches, which takes precedence) and the mirror to the canary
    (Istio's ``mirror`` to the canary destination at ``mirrorPercentage``; an HTTPRoute
    rule's RequestMirror filter to the canary's Service at its ``percent``; all requests
    when unset; 0 for a mirror to anything else).

    Raises:
        RouteError: saying what is missing or unreadable.
    """
    if routing.plural == HTTPROUTE_PLURAL:
        return _httproute_split(vs_spec, routing)
    name, route, cohort = _vs_routes(vs_spec, routing)
    mirror, pct = route.get("mirror"), 0
    if isinstance(mirror, dict) and _is(
        {"destination": mirror}, routing, routing.canary_destination
    ):
        pct = _dict(route.get("mirrorPercentage")).get("value", 100)
        if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 <= pct <= 100:
            raise RouteError(f"mirrorPercentage {pct!r} is not a percentage")
    return Split(
        _route_share_pct(route, routing, name),
        None if cohort is None else _route_share_pct(cohort, routing, name),
        round(pct),
    )


def canary_share_pct(
    vs_spec: Mapping[str, Any] | None, routing: Routing, cohort_pct: int = 0
) -> int:
    """The percentage of requests the routing object sends to the canary, 0..100,
    ``cohort_pct`` of them in an A/B test's cohort (the scenario's
    ``traffic.cohort_pct``); see :func:`split_of`.

    Raises:
        RouteError: saying what is missing or unreadable.
    """
    return split_of(vs_spec, routing).share_pct(cohort_pct)


def canary_mirror_pct(vs_spec: Mapping[str, Any] | None, routing: Routing) -> int:
    """The share of the main route's requests Envoy also copies to the canary; see
    :func:`split_of`.

    Raises:
        RouteError: as :func:`canary_share_pct`.
    """
    return split_of(vs_spec, routing).mirror_pct


def _has_header_match(matches: Any) -> bool:
    return isinstance(matches, list) and any(
        isinstance(m, dict) and m.get("headers") for m in matches
    )


def _vs_routes(
    vs_spec: Mapping[str, Any] | None, routing: Routing
) -> tuple[str, Mapping[str, Any], Mapping[str, Any] | None]:
    """(the VirtualService's name, the main route, the cohort's route ahead of it)."""
    name = f"VirtualService {routing.canary.namespace}/{routing.virtual_service}"
    if not routing.virtual_service:
        raise RouteError(f"Canary {routing.canary}: spec.trafficRouting.istio is not set")
    if vs_spec is None:
        raise RouteError(f"{name} not found")
    http = vs_spec.get("http")
    http = [r for r in http if isinstance(r, dict)] if isinstance(http, list) else []
    if routing.routes:
        wanted = routing.routes[0]
        route = next((r for r in http if r.get("name") == wanted), None)
        if route is None:
            raise RouteError(f"{name} has no HTTP route named {wanted!r}")
    else:
        route = next(
            (
                r
                for r in http
                if isinstance(r.get("route"), list)
                and not _has_header_match(r.get("match"))  # a cohort's, not everyone's
                and any(_is(d, routing, routing.stable_destination) for d in r["route"])
                and any(_is(d, routing, routing.canary_destination) for d in r["route"])
            ),
            None,
        )
        if route is None:
            raise RouteError(
                f"{name} has no HTTP route to both {routing.match_by}s "
                f"{routing.stable_destination!r} and {routing.canary_destination!r}"
            )
    ahead = http[: next(i for i, r in enumerate(http) if r is route)]
    cohort = next(
        (
            r
            for r in ahead
            if _has_header_match(r.get("match"))
            and isinstance(r.get("route"), list)
            and any(_is(d, routing, routing.canary_destination) for d in r["route"])
        ),
        None,
    )
    return name, route, cohort


def _route_share_pct(route: Mapping[str, Any], routing: Routing, name: str) -> int:
    """The canary's share of one Istio HTTP route's destinations."""
    where = f"{name}, route {route.get('name') or '(unnamed)'}"
    destinations = route.get("route")
    destinations = (
        [d for d in destinations if isinstance(d, dict)] if isinstance(destinations, list) else []
    )
    canary = next((d for d in destinations if _is(d, routing, routing.canary_destination)), None)
    if canary is None:
        raise RouteError(
            f"{where}: no destination with {routing.match_by} {routing.canary_destination!r}"
        )
    alone = len(destinations) == 1
    total = sum(_weight(d, alone, where) for d in destinations)
    if total == 0:
        raise RouteError(f"{where}: every destination has weight 0")
    return round(100 * _weight(canary, alone, where) / total)


def _backend_weight(ref: Mapping[str, Any], where: str) -> int:
    """A backendRef's weight: as written, 1 when unset (the Gateway API's default)."""
    weight = ref.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        raise RouteError(f"{where}: weight {weight!r} is not a whole number >= 0")
    return weight


def _httproute_split(route_spec: Mapping[str, Any] | None, routing: Routing) -> Split:
    """The :class:`Split` of an HTTPRoute, as a Gateway API implementation splits it:
    the main rule is the first named in ``routing.routes``, else the first with both
    Services among its backendRefs (and no header match); the canary's share of a rule
    is its weight over the sum of the rule's weights."""
    name = f"HTTPRoute {routing.canary.namespace}/{routing.virtual_service}"
    if route_spec is None:
        raise RouteError(f"{name} not found")
    rules = route_spec.get("rules")
    rules = [r for r in rules if isinstance(r, dict)] if isinstance(rules, list) else []

    def backends(rule: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        refs = rule.get("backendRefs")
        return [b for b in refs if isinstance(b, dict)] if isinstance(refs, list) else []

    def is_service(ref: Mapping[str, Any], wanted: str) -> bool:
        core = ref.get("group", "") in ("", None) and ref.get("kind", "Service") == "Service"
        return core and ref.get("name") == wanted

    if routing.routes:
        wanted = routing.routes[0]
        rule = next((r for r in rules if r.get("name") == wanted), None)
        if rule is None:
            raise RouteError(f"{name} has no rule named {wanted!r}")
    else:
        rule = next(
            (
                r
                for r in rules
                if not _has_header_match(r.get("matches"))  # a cohort's, not everyone's
                and any(is_service(b, routing.stable_destination) for b in backends(r))
                and any(is_service(b, routing.canary_destination) for b in backends(r))
            ),
            None,
        )
        if rule is None:
            raise RouteError(
                f"{name} has no rule to both Services {routing.stable_destination!r} and "
                f"{routing.canary_destination!r}"
            )

    def share(rule: Mapping[str, Any]) -> int:
        where = f"{name}, rule {rule.get('name') or '(unnamed)'}"
        refs = backends(rule)
        canary = next((b for b in refs if is_service(b, routing.canary_destination)), None)
        if canary is None:
            raise RouteError(f"{where}: no backendRef to Service {routing.canary_destination!r}")
        total = sum(_backend_weight(b, where) for b in refs)
        if total == 0:
            raise RouteError(f"{where}: every backendRef has weight 0")
        return round(100 * _backend_weight(canary, where) / total)

    cohort = next(
        (
            r
            for r in rules
            if r is not rule
            and _has_header_match(r.get("matches"))
            and any(is_service(b, routing.canary_destination) for b in backends(r))
        ),
        None,
    )
    mirror = 0
    for flt in rule.get("filters") or []:
        config = _dict(_dict(flt).get("requestMirror"))
        if _dict(flt).get("type") == "RequestMirror" and is_service(
            _dict(config.get("backendRef")), routing.canary_destination
        ):
            pct = config.get("percent", 100)
            if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
                raise RouteError(f"{name}: RequestMirror percent {pct!r} is not a percentage")
            mirror = pct
    return Split(share(rule), None if cohort is None else share(cohort), mirror)


# --------------------------------------------------------------------------- the emulator


class _Series(NamedTuple):
    """The labels of one arm's series: values in ``HISTOGRAM_LABELS`` order, and rendered
    as the text format's label block (without braces)."""

    labels: tuple[str, ...]
    rendered: str


class _Snapshot(NamedTuple):
    """Every arm that has served, with its cumulative counters, in parallel lists."""

    series: list[_Series]
    served: list[int]
    errors: list[int]
    buckets: list[list[int]]  # cumulative, N_BUCKETS each
    sums_ms: list[float]


@dataclass(eq=False, slots=True)
class _Emulated:
    """One Canary's simulated traffic."""

    routing: Routing
    sim: Simulation
    started_s: float  # wall clock (monotonic) when discovered
    series: tuple[_Series, _Series]  # stable's, canary's
    weight_pct: int = 0
    problem: str | None = None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _series(routing: Routing, workload: str) -> _Series:
    labels = _labels(routing, workload)
    rendered = ",".join(
        f'{name}="{_escape(value)}"' for name, value in zip(HISTOGRAM_LABELS, labels, strict=True)
    )
    return _Series(labels, rendered)


def _labels(routing: Routing, workload: str) -> tuple[str, ...]:
    ns = routing.canary.namespace
    return (
        "destination",
        SOURCE_WORKLOAD,
        workload,
        ns,
        f"{routing.service}.{ns}.svc.cluster.local",
        routing.service,
        routing.service,
        "http",
        f"{workload}-0",
    )


class MeshEmulator:
    """Istio's metrics on ``/metrics``, on simulated traffic that follows the cluster.

    See the module docstring.  ``start()`` returns once the first lists are read (or
    after ``sync_timeout_s``); ``with MeshEmulator(...) as emulator:`` starts and stops.

    Args:
        api: a client for the cluster; the caller keeps it and closes it after ``stop()``.
        scenario: what every Canary's traffic does (each gets its own simulation).
        namespaces: where to look for Canaries; empty for all namespaces.
        speed: virtual seconds per wall-clock second (> 0).
        seed: seed of the first Canary discovered; the i-th (from 0) gets ``seed + i``.
        host: address to listen on.
        port: port to listen on; 0 for a free one (see :attr:`port`).
        watch_timeout_s: each watch request ends after this and is renewed, seconds.
        sync_timeout_s: how long ``start()`` waits for the first lists, seconds.
        exposition: who writes ``/metrics``: ``"prometheus_client"`` (its WSGI app on
            :attr:`registry`, which holds this collector; content negotiation, OpenMetrics
            too) or ``"fast"`` (:meth:`render_text`: the same text-format series, several
            times faster at thousands of Canaries).
        clock: wall clock, monotonic seconds.
    """

    def __init__(
        self,
        api: k8s.ApiClient,
        scenario: Scenario,
        *,
        namespaces: Sequence[str] = (),
        speed: float = 1.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        watch_timeout_s: float = 60.0,
        sync_timeout_s: float = 10.0,
        exposition: Exposition = "prometheus_client",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        if exposition not in EXPOSITIONS:
            raise ValueError(f"exposition must be one of {EXPOSITIONS}, got {exposition!r}")
        self.exposition = exposition
        self.scenario = scenario
        self.namespaces = tuple(dict.fromkeys(namespaces))
        self.speed = speed
        self.seed = seed
        self.host = host
        self.sync_timeout_s = sync_timeout_s
        self._requested_port = port
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[CanaryId, _Emulated] = {}
        #: (resource, ns, name) -> spec of every VirtualService and HTTPRoute
        self._vs: dict[tuple[str, str, str], Mapping[str, Any]] = {}
        self._by_vs: dict[tuple[str, str, str], set[CanaryId]] = {}
        self._rejected: dict[CanaryId, str] = {}  # Canaries not emulated, and why
        self._shared: set[CanaryId] = set()  # Canaries whose series another one has
        self._discovered = 0
        self._vs_synced = False
        self._halt = threading.Event()
        custom = k8s.CustomObjectsApi(api)
        scopes: list[str | None] = list(self.namespaces) or [None]
        # VirtualServices and Gateway API HTTPRoutes, each in every scope
        self._route_scopes = [
            (group, version, plural, scope)
            for group, version, plural in (
                (ISTIO_GROUP, ISTIO_VERSION, VS_PLURAL),
                (GATEWAY_GROUP, GATEWAY_VERSION, HTTPROUTE_PLURAL),
            )
            for scope in scopes
        ]
        self._vs_informers = [
            Informer(
                custom_list_fn(custom, group, version, plural, scope),
                f"{plural} in {scope or 'all namespaces'}",
                functools.partial(self._on_vs_list, plural, scope),
                functools.partial(self._on_vs_event, plural),
                self._halt, watch_timeout_s,
            )
            for group, version, plural, scope in self._route_scopes
        ]  # fmt: skip
        self._canary_informers = [
            Informer(
                custom_list_fn(custom, CANARY_GROUP, CANARY_VERSION, CANARY_PLURAL, scope),
                f"{CANARY_PLURAL} in {scope or 'all namespaces'}",
                functools.partial(self._on_canary_list, scope), self._on_canary_event,
                self._halt, watch_timeout_s,
            )
            for scope in scopes
        ]  # fmt: skip
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._httpd: ThreadingWSGIServer | None = None
        self._server_thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Listen, start the informers, and wait (up to ``sync_timeout_s``) for their lists.

        Raises:
            OSError: if the address cannot be bound.
        """
        if self._httpd is not None:
            raise RuntimeError("already started")
        self._halt.clear()
        server_class = _Server6 if ":" in self.host else _Server
        app = (
            self._serve_text
            if self.exposition == "fast"
            else make_wsgi_app(self.registry, disable_compression=True)
        )
        httpd = make_server(
            self.host, self._requested_port, app, server_class, handler_class=_QuietHandler
        )
        self._httpd = httpd
        self._server_thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="mesh-emulator http",
            daemon=True,
        )
        self._server_thread.start()
        for informer in (*self._vs_informers, *self._canary_informers):
            informer.start()
        if not self.wait_synced(self.sync_timeout_s):
            log.warning(
                "the first lists are not read after %.0f s; serving anyway, still trying",
                self.sync_timeout_s,
            )
        log.info(
            "serving %s for %d Canaries in %s",
            self.metrics_url,
            len(self._entries),
            ", ".join(self.namespaces) or "all namespaces",
        )
        return self

    def stop(self) -> None:
        """Stop serving and end the watches (their threads are joined)."""
        self._halt.set()
        for informer in (*self._vs_informers, *self._canary_informers):
            informer.stop()
        httpd, thread = self._httpd, self._server_thread
        if httpd is not None and thread is not None:
            httpd.shutdown()
            httpd.server_close()
            thread.join()
        self._httpd = self._server_thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_synced(self, timeout_s: float) -> bool:
        """Wait until every informer has read its first list; False on timeout."""
        deadline = time.monotonic() + timeout_s
        for informer in (*self._vs_informers, *self._canary_informers):
            if not informer.synced.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    # -- views -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on (the one bound when ``port=0`` was asked for)."""
        if self._httpd is None:
            raise RuntimeError("the emulator is not running")
        return int(self._httpd.server_address[1])

    @property
    def metrics_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def weights(self) -> dict[CanaryId, int]:
        """The canary weight, in percent, each emulated Canary's traffic is split at now."""
        with self._lock:
            return {ref: entry.weight_pct for ref, entry in self._entries.items()}

    @property
    def problems(self) -> dict[CanaryId, str]:
        """Why a Canary's route is unreadable (it is then at weight 0) or it is not emulated."""
        with self._lock:
            found = {ref: e.problem for ref, e in self._entries.items() if e.problem is not None}
            return found | self._rejected

    def simulation(self, ref: CanaryId) -> Simulation | None:
        """The Canary's simulation (do not advance it while the emulator runs)."""
        with self._lock:
            entry = self._entries.get(ref)
            return entry.sim if entry else None

    # -- the Collector ---------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        """Advance every simulation to now; the counters of every arm that has served."""
        now_s = self._clock()
        series: list[_Series] = []
        served: list[int] = []
        errors: list[int] = []
        rows: list[tuple[int, ...]] = []
        seen: set[tuple[str, ...]] = set()
        with self._lock:
            for ref, entry in self._entries.items():
                self._advance(entry, now_s)
                observed = entry.sim.observe()
                arms = zip(entry.series, (observed.stable, observed.canary), strict=True)
                for arm, counts in arms:
                    if counts is None or counts.requests == 0:
                        continue
                    if arm.labels in seen:  # another Canary over the same Deployment
                        self._warn_shared(ref, arm.labels)
                        continue
                    seen.add(arm.labels)
                    series.append(arm)
                    served.append(counts.requests)
                    errors.append(counts.errors)
                    rows.append(counts.latency_buckets)
        buckets = np.array(rows, dtype=np.int64).reshape(len(rows), N_BUCKETS)
        sums_ms = (np.diff(buckets, axis=1, prepend=0) @ _MIDPOINTS_MS).tolist()
        return _Snapshot(series, served, errors, buckets.tolist(), sums_ms)

    def collect(self) -> Iterator[Metric]:
        """Advance every simulation to now and yield both metric families.

        Called by prometheus_client on each scrape, from the HTTP server's threads.
        ``_sum`` of the histogram is estimated from the bucket counts: each request is
        taken at its bucket's midpoint (the last finite edge for ``+Inf``), in ms.
        """
        snap = self._snapshot()
        requests = CounterMetricFamily(_REQUESTS, _REQUESTS_HELP, labels=COUNTER_LABELS)
        durations = HistogramMetricFamily(_DURATION, _DURATION_HELP, labels=HISTOGRAM_LABELS)
        # Samples are built here rather than with add_metric(), which rebuilds every
        # label dict from lists: same samples, half the time at 5,000 Canaries.
        counted, timed = requests.samples, durations.samples
        for arm, served, errors, row, sum_ms in zip(*snap, strict=True):
            base = dict(zip(HISTOGRAM_LABELS, arm.labels, strict=True))
            if served > errors:
                counted.append(Sample(_REQUESTS, base | _OK, served - errors))
            if errors:
                counted.append(Sample(_REQUESTS, base | _ERROR, errors))
            pairs = zip(_LE, row, strict=True)
            timed += [Sample(_BUCKET, base | {"le": le}, count) for le, count in pairs]
            timed.append(Sample(_COUNT, base, served))
            timed.append(Sample(_SUM, base, sum_ms))
        yield requests
        yield durations

    def _serve_text(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        """The WSGI app of ``exposition="fast"``: :meth:`render_text` on GET, at any path."""
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        body = self.render_text()
        headers = [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4), ("Content-Length", str(len(body)))]
        start_response("200 OK", headers)
        return [body if environ["REQUEST_METHOD"] == "GET" else b""]

    def render_text(self) -> bytes:
        """What :meth:`collect` reports, in Prometheus' text format (0.0.4), directly.

        The same series and values as ``prometheus_client.generate_latest`` makes of
        :meth:`collect`, several times faster (at 5,000 Canaries ~0.5 s a scrape instead
        of ~3.5 s): each arm's label block is rendered once, when its Canary is
        discovered, instead of validated and escaped per sample.
        """
        snap = self._snapshot()
        lines = [
            f"# HELP {_REQUESTS} {_REQUESTS_HELP}\n# TYPE {_REQUESTS} counter\n",
        ]
        for arm, served, errors, _, _ in zip(*snap, strict=True):
            head = f"{_REQUESTS}{{{arm.rendered},response_code="
            if served > errors:
                lines.append(f'{head}"200"}} {served - errors}\n')
            if errors:
                lines.append(f'{head}"503"}} {errors}\n')
        lines.append(f"# HELP {_DURATION} {_DURATION_HELP}\n# TYPE {_DURATION} histogram\n")
        for arm, served, _, row, sum_ms in zip(*snap, strict=True):
            head = f"{_BUCKET}{{{arm.rendered},le="
            lines += [f'{head}"{le}"}} {count}\n' for le, count in zip(_LE, row, strict=True)]
            lines.append(f"{_COUNT}{{{arm.rendered}}} {served}\n")
            lines.append(f"{_SUM}{{{arm.rendered}}} {sum_ms!r}\n")
        return "".join(lines).encode()

    # -- state (called with the lock held unless said otherwise) -------------------------

    def _warn_shared(self, ref: CanaryId, labels: tuple[str, ...]) -> None:
        """Log once that ``ref``'s series are left out: another Canary has the same."""
        if ref not in self._shared:
            self._shared.add(ref)
            log.warning(
                "%s: Deployment %s/%s is already emulated for another Canary; its series "
                "come from that Canary's traffic only",
                ref, labels[3], labels[2],
            )  # fmt: skip

    def _advance(self, entry: _Emulated, now_s: float) -> None:
        """Serve the entry's traffic up to ``now_s`` at the weight routed until now."""
        target_s = (now_s - entry.started_s) * self.speed
        if target_s > entry.sim.now_s:
            entry.sim.advance(target_s - entry.sim.now_s)

    def _reweigh(self, entry: _Emulated, now_s: float) -> None:
        """Read the entry's weight from the cached VirtualService; apply a change."""
        routing = entry.routing
        vs_spec = self._vs.get(routing.vs_key)
        try:
            split = split_of(vs_spec, routing)  # one read of the object for both
            weight = split.share_pct(entry.sim.scenario.traffic.cohort_pct)
            mirror = split.mirror_pct
            problem = None
        except RouteError as exc:
            weight, mirror, problem = 0, 0, str(exc)
        if problem != entry.problem and self._vs_synced:
            if problem is not None:
                log.warning("%s: routing 0%% to the canary: %s", routing.canary, problem)
            elif entry.problem is not None:
                log.info("%s: the route is readable again", routing.canary)
            entry.problem = problem
        if weight != entry.weight_pct:
            self._advance(entry, now_s)
            entry.sim.set_canary_weight(weight)
            log.info("%s: canary weight %d%% -> %d%%", routing.canary, entry.weight_pct, weight)
            entry.weight_pct = weight
        if mirror != entry.sim.mesh.mirror_pct:
            self._advance(entry, now_s)
            log.info(
                "%s: mirror to the canary %d%% -> %d%%",
                routing.canary, entry.sim.mesh.mirror_pct, mirror,
            )  # fmt: skip
            entry.sim.set_mirror(mirror)

    def _index(self, ref: CanaryId, routing: Routing | None, old: Routing | None) -> None:
        if old is not None:
            users = self._by_vs.get(old.vs_key)
            if users is not None:
                users.discard(ref)
                if not users:
                    del self._by_vs[old.vs_key]
        if routing is not None:
            self._by_vs.setdefault(routing.vs_key, set()).add(ref)

    def _upsert(self, obj: Obj, now_s: float) -> None:
        meta = obj.get("metadata") or {}
        ref = CanaryId(_text(meta.get("namespace")), _text(meta.get("name")))
        entry = self._entries.get(ref)
        try:
            routing = routing_of(obj)
        except ValueError as exc:
            if self._rejected.get(ref) != str(exc):
                log.warning("%s: not emulated: %s", ref, exc)
                self._rejected[ref] = str(exc)
            if entry is not None:
                self._remove(ref)
            return
        self._rejected.pop(ref, None)
        if entry is not None and entry.routing.workloads != routing.workloads:
            self._remove(ref)  # other workloads: other series, from a fresh simulation
            entry = None
        if entry is None:
            sim = Simulation.warmed_up(self.scenario, self.seed + self._discovered)
            self._discovered += 1
            series = (
                _series(routing, routing.stable_workload),
                _series(routing, routing.canary_workload),
            )
            entry = self._entries[ref] = _Emulated(routing, sim, now_s, series)
            self._index(ref, routing, None)
            log.info(
                "%s: emulating %s (stable %s, canary %s)",
                ref, routing.service, routing.stable_workload, routing.canary_workload,
            )  # fmt: skip
        elif entry.routing != routing:
            self._index(ref, routing, entry.routing)
            entry.routing = routing
        self._reweigh(entry, now_s)

    def _remove(self, ref: CanaryId) -> None:
        entry = self._entries.pop(ref, None)
        self._shared.discard(ref)
        if entry is not None:
            self._index(ref, None, entry.routing)
            log.info("%s: no longer emulated", ref)

    # -- informer callbacks (informer threads) --------------------------------------------

    def _on_canary_list(self, namespace: str | None, items: list[Obj]) -> None:
        now_s = self._clock()
        listed = {
            CanaryId(_text(m.get("namespace")), _text(m.get("name")))
            for m in ((i.get("metadata") or {}) for i in items)
        }
        with self._lock:
            for ref in [*self._entries, *self._rejected]:
                if (namespace is None or ref.namespace == namespace) and ref not in listed:
                    self._remove(ref)
                    self._rejected.pop(ref, None)
            for obj in items:
                self._upsert(obj, now_s)

    def _on_canary_event(self, kind: str, obj: Obj) -> None:
        now_s = self._clock()
        with self._lock:
            if kind == "DELETED":
                meta = obj.get("metadata") or {}
                ref = CanaryId(_text(meta.get("namespace")), _text(meta.get("name")))
                self._remove(ref)
                self._rejected.pop(ref, None)
            else:
                self._upsert(obj, now_s)

    def _on_vs_list(self, plural: str, namespace: str | None, items: list[Obj]) -> None:
        now_s = self._clock()
        with self._lock:
            for key in [
                k for k in self._vs if k[0] == plural and (namespace is None or k[1] == namespace)
            ]:
                del self._vs[key]
            for obj in items:
                meta = obj.get("metadata") or {}
                spec = obj.get("spec")
                key = (plural, _text(meta.get("namespace")), _text(meta.get("name")))
                self._vs[key] = spec if isinstance(spec, dict) else {}
            # problems are logged only once every route list is in: before, a
            # VirtualService or HTTPRoute not yet listed would be reported missing
            self._vs_synced = all(
                i.synced.is_set() or (p, scope) == (plural, namespace)
                for i, (_, _, p, scope) in zip(self._vs_informers, self._route_scopes, strict=True)
            )
            for entry in self._entries.values():
                if namespace is None or entry.routing.canary.namespace == namespace:
                    self._reweigh(entry, now_s)

    def _on_vs_event(self, plural: str, kind: str, obj: Obj) -> None:
        now_s = self._clock()
        meta = obj.get("metadata") or {}
        key = (plural, _text(meta.get("namespace")), _text(meta.get("name")))
        spec = obj.get("spec")
        with self._lock:
            if kind == "DELETED":
                self._vs.pop(key, None)
            else:
                self._vs[key] = spec if isinstance(spec, dict) else {}
            for ref in self._by_vs.get(key, ()):
                self._reweigh(self._entries[ref], now_s)


class _Server(ThreadingWSGIServer):
    """A thread per scrape, on IPv4."""

    address_family = socket.AF_INET


class _Server6(_Server):
    """A thread per scrape, on IPv6."""

    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Serves scrapes without an access log line per request."""

    def log_message(self, format: str, *args: Any) -> None:
        return


# --------------------------------------------------------------------------- the command

SERVE_HELP = """\
Emulate an Istio mesh with live synthetic traffic, for a real Prometheus to scrape.

Finds the Canary resources of a cluster and serves, for each, Istio's standard metrics
(istio_requests_total, istio_request_duration_milliseconds) on /metrics, from
simulated traffic split between its stable and canary Deployments at the weights of
its VirtualService.  The weights are watched: when canaryd shifts traffic, the
emulated traffic follows within a second.  Each Canary gets its own simulation of the
scenario, started (warmed up) when the Canary is first seen.

On start, one JSON line goes to stdout: {"metrics_url": ..., "port": ...}.  Logs go to
stderr.  SIGTERM or Ctrl-C stops it (exit 0).

examples:
  canaryd-sim serve --kubeconfig ~/.kube/config
  canaryd-sim serve --kubeconfig kc.yaml --namespace shop --port 9100
  canaryd-sim serve --kubeconfig kc.yaml --scenario error-spike --speed 10 --seed 7
  canaryd-sim serve --kubeconfig kc.yaml --scenario-file incident.yaml --port 0
  canaryd-sim serve --kubeconfig kc.yaml --exposition fast    # thousands of Canaries

  then scrape it:  curl -s http://127.0.0.1:9100/metrics | grep istio_requests_total

exit codes:
  0  stopped by SIGTERM / SIGINT      2  usage error: bad scenario, kubeconfig or address
"""


_P = TypeVar("_P", bound=argparse.ArgumentParser)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction[_P]) -> _P:
    """Add the ``serve`` command to a command line's subparsers."""
    serve = subparsers.add_parser(
        "serve",
        help="emulate an Istio mesh: Istio metrics on /metrics, following the VirtualServices",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)",
    )
    serve.add_argument("--context", metavar="NAME", help="kubeconfig context (default: current)")
    serve.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="look for Canaries in NS; repeat for more (default: all namespaces)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=0,
        help="port to listen on; 0 picks a free one (default: 0)",
    )
    source = serve.add_mutually_exclusive_group()
    source.add_argument(
        "--scenario",
        metavar="NAME",
        default="healthy",
        help="built-in scenario (default: healthy); see 'canaryd scenarios'",
    )
    source.add_argument("--scenario-file", metavar="FILE", help="scenario YAML file")
    serve.add_argument(
        "--speed",
        type=_positive,
        default=1.0,
        metavar="X",
        help="virtual seconds per real second: X times the scenario's traffic and pace "
        "(default: 1)",
    )
    serve.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the first Canary's traffic; the next get N+1, N+2, ... (default: 0)",
    )
    serve.add_argument(
        "--exposition",
        choices=EXPOSITIONS,
        default="prometheus_client",
        help="who writes /metrics: prometheus_client's exposition (default), or 'fast', "
        "the same series written directly, several times cheaper with thousands of Canaries",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log level, on stderr (default: info)",
    )
    serve.set_defaults(handler=run)
    return serve


class UsageError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""


def _scenario(args: argparse.Namespace) -> Scenario:
    try:
        if args.scenario_file:
            return load_scenario_file(args.scenario_file)
        return get_scenario(args.scenario)
    except ScenarioError as exc:
        raise UsageError(str(exc)) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _api_client(path: str | None, context: str | None) -> k8s.ApiClient:
    from kubernetes import config  # noqa: PLC0415 - only the command needs it
    from kubernetes.config.config_exception import ConfigException  # noqa: PLC0415

    if not path:
        env = os.environ.get("KUBECONFIG", "")
        path = env.split(os.pathsep)[0] if env else str(Path.home() / ".kube" / "config")
    file = Path(path)
    if not file.is_file():
        why = "it is a directory" if file.is_dir() else "no such file"
        raise UsageError(f"cannot read kubeconfig {file}: {why}")
    try:
        api = config.new_client_from_config(config_file=str(file), context=context)
    except ConfigException as exc:
        raise UsageError(f"cannot use kubeconfig {file}: {_one_line(exc)}") from None
    except (KeyError, TypeError, AttributeError) as exc:  # YAML, but not a kubeconfig's shape
        raise UsageError(
            f"cannot use kubeconfig {file}: not a kubeconfig (clusters, contexts, users): "
            f"{_one_line(exc)}"
        ) from None
    except Exception as exc:  # a YAML syntax error, an unreadable file, ...
        raise UsageError(
            f"cannot use kubeconfig {file}: {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    if not isinstance(api, k8s.ApiClient):
        raise UsageError(f"cannot use kubeconfig {path}")
    return api


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``serve`` until SIGTERM or SIGINT; the exit code.

    Raises:
        UsageError: for a bad scenario, kubeconfig or address.
    """
    out = out or sys.stdout
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    scenario = _scenario(args)
    api = _api_client(args.kubeconfig, args.context)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        emulator = MeshEmulator(
            api,
            scenario,
            namespaces=args.namespace,
            speed=args.speed,
            seed=args.seed,
            host=args.host,
            port=args.port,
            exposition=args.exposition,
        )
        try:
            emulator.start()
        except OSError as exc:
            emulator.stop()
            raise UsageError(
                f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
            ) from None
        try:
            out.write(json.dumps({"metrics_url": emulator.metrics_url, "port": emulator.port}))
            out.write("\n")
            out.flush()
            while not stop.wait(0.5):
                pass
            log.info("stopping")
        finally:
            emulator.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        api.close()
    return 0
