"""The ports (design §2): what the core needs from the world, as small Protocols.

Each integration lives in one module behind one of these; the errors the ports raise
(``MetricsError``, ``RoutingError``, ``WorkloadError``, ``KubeError`` and its kinds)
live here, so the daemon
handles them without importing any integration.  The simulator provides fakes of
the metrics source, the router and the workloads.
``canaryd simulate`` drives the simulator directly in virtual time; the daemon
(``canaryd run``) drives these ports on the wall clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from analysis.budget import Events
from analysis.counts import Observation
from canaryd.spec import CanarySpec


@dataclass(frozen=True, slots=True)
class CanaryRef:
    """Which Canary: ``namespace``/``name``."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class MetricsError(Exception):
    """Metrics could not be had (source down, slow, empty, NaN): the core holds."""


class RoutingError(Exception):
    """The traffic router cannot carry this Canary's split (a VirtualService, route or
    subset missing or unusable); says what is wrong."""


class WorkloadError(Exception):
    """A Deployment the Canary names is missing or unusable; says which."""


class KubeError(Exception):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class NotFoundError(KubeError):
    """404: the object is not there."""


class ConflictError(KubeError):
    """409: a stale resourceVersion, or the object exists already."""


class InvalidError(KubeError):
    """422: the API server rejected the object."""


class ForbiddenError(KubeError):
    """401/403: RBAC or credentials."""


class UnavailableError(KubeError):
    """Worth retrying: the API server is unreachable, overloaded or slow."""


class QueryRejectedError(MetricsError):
    """The metrics source refused a query as malformed (HTTP 400 and kin): retrying
    the same text cannot help, and the fault may lie in one Canary's input."""


@dataclass(frozen=True, slots=True)
class SloService:
    """A service whose error budget is read: its namespace and name, the label values
    of its arms' series (stable and canary serve its users alike), and the spec that
    holds its objectives and says where its series are."""

    namespace: str
    service: str
    arms: tuple[str, ...]
    spec: CanarySpec


class SloEventsSource(Protocol):
    """Good and total events of services' objectives over windows (Prometheus)."""

    async def slo_events(
        self, services: Sequence[SloService], windows_s: Sequence[float]
    ) -> dict[tuple[str, str], dict[str, dict[float, Events]]]:
        """``{(namespace, service): {objective: {window_s: Events}}}``; raises
        :class:`MetricsError` when the source fails."""
        ...


class MetricsSource(Protocol):
    """Cumulative request, error and latency counters of both arms (Prometheus, simulator).

    Raises :class:`MetricsError` when the data cannot be had; the core turns that into
    a *hold*, never a rollback or a pass.
    """

    async def observe(self, ref: CanaryRef, spec: CanarySpec) -> Observation: ...


class TrafficRouter(Protocol):
    """Sets the canary's share of traffic (Istio VirtualService, HTTPRoute, simulator mesh)."""

    async def check(self, ref: CanaryRef, spec: CanarySpec) -> None:
        """Raise an error naming what is missing before any traffic moves."""
        ...

    async def set_weights(
        self, ref: CanaryRef, spec: CanarySpec, canary_pct: int, mirror_pct: int = 0
    ) -> tuple[int, ...]:
        """Route ``canary_pct`` % to the canary on every managed route, and mirror
        ``mirror_pct`` % of the rest to it (0: no mirror; a mirror canaryd set is
        removed); return each route's canary weight as stored (the
        :class:`~canaryd.converger.Converger` verifies them)."""
        ...

    async def route_weights(self, ref: CanaryRef, spec: CanarySpec) -> tuple[int, ...]:
        """The canary weight of every managed route now."""
        ...


class Workloads(Protocol):
    """Stable and canary workloads (Kubernetes Deployments, simulator)."""

    async def check(self, ref: CanaryRef, spec: CanarySpec) -> None:
        """Raise an error naming a missing workload."""
        ...

    async def promote_stable(
        self, ref: CanaryRef, spec: CanarySpec, revision: str, template_hash: str | None = None
    ) -> None:
        """Copy the canary's template to stable; refuse when ``template_hash`` is given
        and the canary no longer runs it."""
        ...

    async def template_hash(self, ref: CanaryRef, spec: CanarySpec) -> str:
        """A hash of the canary's pod template (what a rollout analyses)."""
        ...

    async def stable_revision(self, ref: CanaryRef, spec: CanarySpec) -> str | None: ...

    async def scale_canary(self, ref: CanaryRef, spec: CanarySpec, replicas: int) -> None: ...

    async def canary_replicas(self, ref: CanaryRef, spec: CanarySpec) -> int: ...

    async def ensure_canary_ready(self, ref: CanaryRef, spec: CanarySpec) -> str | None:
        """None when the canary can take traffic, else why not yet (it may scale it up)."""
        ...

    async def canary_revision(self, ref: CanaryRef, spec: CanarySpec) -> str | None:
        """The canary's revision when it differs from stable's (``trigger: auto``)."""
        ...
