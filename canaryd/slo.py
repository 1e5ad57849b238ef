"""Error budgets of the services canaryd releases (design §5–6).

Every Canary with ``spec.analysis.slo`` names its service's objectives; Canaries of one
service share them (the first by namespace/name wins if they disagree).  The
:class:`SloMonitor` reads every service's good and total events from the metrics source
every ``refresh_s`` (batched: a handful of queries per window for all services), turns
them into figures and a policy tier with :mod:`analysis.budget`, and keeps the result
in the :class:`~canaryd.hub.StatusHub`, from which ``/metrics`` exports ``slo_*`` and
the API serves them.  A failed read keeps the last figures and is logged; it never
touches a rollout.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from analysis.budget import (
    BURN_WINDOWS_S,
    Events,
    PolicyDecision,
    PolicyTiers,
    SloFigures,
    decide_all,
    figures,
)
from canaryd.ports import MetricsError, SloEventsSource, SloService
from canaryd.spec import CanarySpec

if TYPE_CHECKING:
    from canaryd.hub import StatusHub
    from canaryd.kube import CanaryObject

log = structlog.get_logger("canaryd.slo")


@dataclass(frozen=True, slots=True)
class ServiceSlo:
    """One service's SLO figures and the policy tier they put releases in.

    Attributes:
        namespace: the service's namespace.
        service: its name.
        objectives: figures by objective (``availability``, ``latency``).
        decision: the strictest tier and every objective's reason.
        enforced: the spec asks for the policy (``budgetPolicy``); otherwise figures only.
        at: when the figures were read.
        latency_threshold_ms: the latency objective's threshold (requests faster than it
            are good), when there is one.
    """

    namespace: str
    service: str
    objectives: Mapping[str, SloFigures]
    decision: PolicyDecision
    enforced: bool
    at: datetime
    latency_threshold_ms: float | None = None

    def to_json(self) -> dict[str, object]:
        def num(value: float | None) -> float | None:
            return value if value is not None and math.isfinite(value) else None

        return {
            "namespace": self.namespace,
            "service": self.service,
            "tier": str(self.decision.tier),
            "reason": self.decision.reason,
            "enforced": self.enforced,
            "at": self.at.isoformat(),
            "objectives": {
                name: {
                    "objective": slo.objective,
                    "window_s": slo.window_s,
                    "availability": num(slo.availability),
                    "error_budget_remaining": num(slo.budget_remaining),
                    "burn_rates": {f"{w:g}": num(r) for w, r in slo.burn_rates.items()},
                    "firing": [p.label for p in slo.firing],
                    **(
                        {"threshold_ms": self.latency_threshold_ms}
                        if name == "latency" and self.latency_threshold_ms is not None
                        else {}
                    ),
                }
                for name, slo in self.objectives.items()
            },
        }


def service_name(spec: CanarySpec) -> str | None:
    """The service a Canary releases: ``spec.service``, else its stable Deployment."""
    return spec.service or (spec.stable.deployment if spec.stable else None)


def slo_services(canaries: Iterable[CanaryObject]) -> list[SloService]:
    """One :class:`SloService` per (namespace, service) among Canaries with an SLO."""
    out: dict[tuple[str, str], SloService] = {}
    for canary in sorted(canaries, key=lambda c: (c.ref.namespace, c.ref.name)):
        spec = canary.spec
        if spec is None or spec.analysis.slo is None:
            continue
        name = service_name(spec)
        if not name:
            continue
        arms = tuple(a for a in spec.arm_values() if a)
        key = (canary.ref.namespace, name)
        if arms and key not in out:
            out[key] = SloService(canary.ref.namespace, name, arms, spec)
    return list(out.values())


def service_slo(
    service: SloService, events: Mapping[str, Mapping[float, Events]], at: datetime
) -> ServiceSlo:
    """A service's figures and tier from its events (pure)."""
    slo = service.spec.analysis.slo
    assert slo is not None
    targets = {"availability": slo.availability_pct / 100.0}
    if slo.latency is not None:
        targets["latency"] = slo.latency.target_pct / 100.0
    objectives = {}
    for name, target in targets.items():
        by_window = events.get(name, {})
        compliance = by_window.get(slo.window, Events(0.0, 0.0))
        objectives[name] = figures(target, compliance, by_window, slo.window)
    policy = slo.budget_policy
    tiers = (
        PolicyTiers(
            policy.approval_below_pct / 100.0,
            policy.override_below_pct / 100.0,
            policy.fast_burn_factor,
        )
        if policy is not None
        else PolicyTiers()
    )
    return ServiceSlo(
        service.namespace,
        service.service,
        objectives,
        decide_all(objectives, tiers),
        policy is not None,
        at,
        slo.latency.threshold_ms if slo.latency is not None else None,
    )


async def read_slos(source: SloEventsSource, canaries: Iterable[CanaryObject]) -> list[ServiceSlo]:
    """Every service's figures and tier, read now.

    Raises:
        MetricsError: the source failed.
    """
    services = slo_services(canaries)
    if not services:
        return []
    windows = {
        *BURN_WINDOWS_S,
        *(s.spec.analysis.slo.window for s in services if s.spec.analysis.slo),
    }
    events = await source.slo_events(services, sorted(windows))
    now = datetime.now(UTC)
    return [service_slo(s, events.get((s.namespace, s.service), {}), now) for s in services]


class SloMonitor:
    """Reads every service's SLO events every ``refresh_s`` into the hub.

    A service the hub has no figures for yet (the daemon just started, or a Canary of
    a new service appeared) is read within ``check_s`` instead of waiting for the next
    refresh; after a failed read such early reads back off, doubling up to
    ``refresh_s``.  Until a service's figures are read its rollouts are treated as
    unknown by the policy (see :meth:`canaryd.daemon.Daemon`), so the early read keeps
    that wait short.
    """

    def __init__(
        self,
        source: SloEventsSource,
        hub: StatusHub,
        *,
        refresh_s: float = 60.0,
        timeout_s: float = 30.0,
        check_s: float = 2.0,
    ) -> None:
        self.source = source
        self.hub = hub
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.check_s = check_s
        #: reads that failed (the last figures were kept)
        self.failures = 0
        #: why the last read failed, or None after a good one
        self.last_error: str | None = None

    def _canaries(self) -> list[CanaryObject]:
        with self.hub.lock:
            return [c for ref in self.hub.refs() if (c := self.hub.get(ref)) is not None]

    def unread(self) -> list[tuple[str, str]]:
        """(namespace, service) of the services with objectives but no figures yet."""
        services = slo_services(self._canaries())
        with self.hub.lock:
            known = set(self.hub.slos)
        return [(s.namespace, s.service) for s in services if (s.namespace, s.service) not in known]

    async def refresh(self) -> list[ServiceSlo]:
        """One read of every service's figures (kept in the hub); [] on failure."""
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await read_slos(self.source, self._canaries())
        except (MetricsError, TimeoutError) as exc:
            self.failures += 1
            self.last_error = str(exc) or f"no answer within {self.timeout_s:g}s"
            log.warning("slo figures not read; keeping the last ones", error=self.last_error)
            return []
        self.last_error = None
        self.hub.set_slos(result)
        return result

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh until ``stop`` is set."""
        loop = asyncio.get_running_loop()
        gap_s = self.check_s
        while not stop.is_set():
            started = loop.time()
            await self.refresh()
            gap_s = self.check_s if self.last_error is None else min(gap_s * 2, self.refresh_s)
            while not stop.is_set():
                elapsed_s = loop.time() - started
                if elapsed_s >= self.refresh_s or (elapsed_s >= gap_s and self.unread()):
                    break
                try:
                    async with asyncio.timeout(min(self.check_s, self.refresh_s - elapsed_s)):
                        await stop.wait()
                except TimeoutError:
                    pass
