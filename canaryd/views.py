"""What the status API shows: read models built from a Canary (design §6).

Pure: each view is computed from a :class:`~canaryd.kube.CanaryObject` (and, for the
series, from two successive observations); no I/O.  The JSON keys are camelCase like
the Canary's own status, which the detail view embeds as Kubernetes stores it.
"""

from __future__ import annotations

import math
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from analysis.counts import ArmCounts
from analysis.histogram import histogram_quantile
from canaryd.events import RolloutEvent
from canaryd.kube import CanaryObject
from canaryd.slo import service_name
from canaryd.status import (
    ApprovalRecord,
    Condition,
    Phase,
    StepRecord,
    VerdictDecision,
    VerdictRecord,
)


class _View(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class EventType(StrEnum):
    """What an event on ``/api/v1/events`` reports."""

    ADDED = "added"  #: a Canary appeared
    DELETED = "deleted"  #: a Canary is gone
    PHASE = "phase"  #: the phase changed
    WEIGHT = "weight"  #: the canary weight changed
    VERDICT = "verdict"  #: a new analysis verdict (hold, rollback or pass; not "continue")
    RESET = "reset"  #: the stream could not resume from Last-Event-ID: reload everything
    ROLLOUT = "rollout"  #: a rollout event (``event``: the one model every sink receives)


class CanarySummary(_View):
    """One row of the canary table."""

    namespace: str
    name: str
    phase: Phase
    canary_weight: int = Field(description="percent of traffic on the canary")
    step_index: int
    steps: list[int] = Field(description="the step weights, percent")
    revision: str | None
    created_at: datetime | None
    phase_since: datetime | None
    message: str
    last_decision: VerdictDecision | None = Field(
        description="rollback, pass, hold, continue or traffic-drift"
    )
    last_decision_at: datetime | None
    last_reason: str | None = Field(description="the first reason of the last verdict")
    waiting_approval_for: int | None = Field(description="the step weight awaiting approval")
    ready: bool = Field(description="canaryd can act on this Canary (condition Ready)")
    ready_message: str = ""


class SpecSummary(_View):
    """The spec fields a person looks at first."""

    service: str | None
    steps: list[int]
    interval_s: float
    step_duration_s: float
    approvals_before: list[int]
    trigger: str
    promotion_mode: str
    virtual_service: str | None
    http_route: str | None = None
    strategy: str = Field(default="canary", description="canary, abTest or blueGreen")
    step_mirrors_pct: list[int] = Field(
        default_factory=list,
        description="per step, the share of live requests mirrored to the canary (0: none)",
    )
    step_traffic: list[str] = Field(
        default_factory=list, description="per step, what it sends the canary, in words"
    )
    step_durations_s: list[float] = Field(
        default_factory=list,
        description="per step, how long it is judged (stepDuration, or blueGreen's "
        "scaleDownDelay for the switch)",
    )


class EventView(_View):
    """An event of the stream; ``canary`` is the Canary's row after the change."""

    id: str
    type: EventType
    at: datetime
    namespace: str
    name: str
    message: str
    canary: CanarySummary | None = None
    event: RolloutEvent | None = Field(
        default=None, description="for type rollout: the event as Slack, webhooks and MQTT get it"
    )


class CanaryDetail(_View):
    """Everything about one Canary."""

    summary: CanarySummary
    spec: SpecSummary | None
    spec_error: str | None
    last_verdict: VerdictRecord | None
    history: list[StepRecord]
    approvals: list[ApprovalRecord]
    conditions: list[Condition]
    events: list[EventView] = Field(description="recent events of this Canary, oldest first")
    status: dict[str, Any] = Field(description="the status exactly as stored on the Canary")


class ArmPoint(_View):
    """One arm's traffic over one interval."""

    requests: int
    errors: int
    error_rate_pct: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None


class SeriesPoint(_View):
    """One interval of the current rollout."""

    at: datetime
    canary_weight: int
    step_index: int
    canary: ArmPoint
    stable: ArmPoint
    decision: VerdictDecision | None = Field(default=None, description="the decision of this round")


class Series(_View):
    """Per-interval figures of the current rollout, oldest first."""

    namespace: str
    name: str
    revision: str | None
    points: list[SeriesPoint]


class ErrorBody(_View):
    """Every error answer: what went wrong, in a sentence."""

    status: int
    reason: str
    message: str


class CommandAccepted(_View):
    """A command written onto the Canary; the daemon acknowledges its id in status."""

    id: str
    kind: str
    namespace: str
    name: str
    by: str
    revision: str | None = Field(default=None, description="for promote: the revision")
    weight: int | None = Field(default=None, description="for approve: the step's weight")


def summary_of(canary: CanaryObject) -> CanarySummary:
    st = canary.status
    verdict = st.last_verdict
    ready = st.condition("Ready")
    meta = canary.raw.get("metadata") or {}
    created = meta.get("creationTimestamp")
    waiting = None
    if st.phase is Phase.WAITING_APPROVAL and canary.spec and st.pending_step_index is not None:
        steps = canary.spec.steps
        waiting = steps[st.pending_step_index] if st.pending_step_index < len(steps) else None
    return CanarySummary(
        namespace=canary.ref.namespace,
        name=canary.ref.name,
        phase=st.phase,
        canary_weight=st.canary_weight,
        step_index=st.step_index,
        steps=list(canary.spec.steps) if canary.spec else [],
        revision=st.revision,
        created_at=_parse_time(created),
        phase_since=st.phase_since,
        message=st.message,
        last_decision=verdict.decision if verdict else None,
        last_decision_at=verdict.at if verdict else None,
        last_reason=verdict.reasons[0] if verdict and verdict.reasons else None,
        waiting_approval_for=waiting,
        ready=canary.spec is not None and (ready is None or ready.status == "True"),
        ready_message=canary.spec_error or (ready.message if ready else ""),
    )


def spec_summary_of(canary: CanaryObject) -> SpecSummary | None:
    spec = canary.spec
    if spec is None:
        return None
    routing = spec.traffic_routing
    return SpecSummary(
        service=service_name(spec),
        steps=list(spec.steps),
        interval_s=spec.analysis.interval,
        step_duration_s=spec.analysis.step_duration,
        approvals_before=list(spec.approvals.before),
        trigger=spec.trigger,
        promotion_mode=spec.promotion.mode,
        virtual_service=(routing.istio.virtual_service.name if routing and routing.istio else None),
        http_route=(routing.gateway_api.http_route if routing and routing.gateway_api else None),
        strategy=spec.strategy,
        step_mirrors_pct=[spec.mirror_pct(i) for i in range(len(spec.steps))],
        step_traffic=[spec.step_traffic(i) for i in range(len(spec.steps))],
        step_durations_s=[
            spec.own_step_duration_s(i) or spec.analysis.step_duration
            for i in range(len(spec.steps))
        ],
    )


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _finite(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def arm_point(delta: ArmCounts) -> ArmPoint:
    """One arm's figures from its counters' increase over an interval."""
    buckets = delta.latency_buckets
    quantiles = [
        _finite(histogram_quantile(q, buckets)) if buckets else None for q in (0.5, 0.9, 0.99)
    ]
    return ArmPoint(
        requests=delta.requests,
        errors=delta.errors,
        error_rate_pct=round(100.0 * delta.errors / delta.requests, 4) if delta.requests else None,
        p50_ms=quantiles[0],
        p90_ms=quantiles[1],
        p99_ms=quantiles[2],
    )


def increase(later: ArmCounts, earlier: ArmCounts) -> ArmCounts | None:
    """``later - earlier``, or None when a counter went down (a restart reset it)."""
    delta = later - earlier
    if delta.requests < 0 or delta.errors < 0 or any(b < 0 for b in delta.latency_buckets):
        return None
    return delta
