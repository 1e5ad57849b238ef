"""One event model for every sink (design §3, §6).

A rollout's story is told once, by the state machine (:class:`~canaryd.rollout.Notify`)
and by the daemon for what happens outside it (traffic drift, readiness, deletion), as
a :class:`RolloutEvent`.  Kubernetes Events, log lines, the status API's event stream,
Slack, webhooks and MQTT all receive that same object, in the same order, and say the
same thing: ``reason``, ``message``, the Canary's phase and weight, and the verdict with
its numbers.

The JSON form (:meth:`RolloutEvent.to_json`) is a versioned contract: ``schema`` names
its version, fields are only ever added within a version, and :func:`json_schema` is
published as ``docs/event.schema.json`` (a test keeps the two equal).

Pure: no I/O, no clock (times are given), no logging.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from canaryd.status import CanaryStatus, Phase, VerdictRecord

#: The event schema's version: a consumer checks it before reading anything else.
SCHEMA: Literal["canaryd.io/event/v1"] = "canaryd.io/event/v1"


class EventReason(StrEnum):
    """What happened: the ``reason`` of every event (CamelCase, as Kubernetes Events)."""

    ROLLOUT_STARTED = "RolloutStarted"  #: a promote (or an auto trigger) started a rollout
    SUPERSEDED = "Superseded"  #: a newer revision replaced the one rolling out
    ROLLOUT_RESTARTED = "RolloutRestarted"  #: the pod template changed: back to step 1
    STEP_STARTED = "StepStarted"  #: traffic moved to the next step's weight
    STEP_PASSED = "StepPassed"  #: analysis (or a skip) passed the step
    WAITING_APPROVAL = "WaitingApproval"  #: the next step needs a person's yes
    APPROVED = "Approved"  #: someone approved the waiting step
    HOLDING = "Holding"  #: analysis cannot judge (too little data, a shared incident)
    RESUMED = "Resumed"  #: the hold is over
    PAUSED = "Paused"  #: no data for too long, and noData.then is pause
    PROMOTING = "Promoting"  #: copying the canary's template to stable
    PROMOTED = "Promoted"  #: the rollout succeeded
    PROMOTION_FAILED = "PromotionFailed"  #: stable did not roll out the new version
    ROLLED_BACK = "RolledBack"  #: all traffic back on stable (analysis, abort or timeout)
    TRAFFIC_DRIFT = "TrafficDrift"  #: the routes read other than canaryd set, or match again
    NOT_READY = "NotReady"  #: canaryd cannot act: a named object is missing or unfit
    TRAFFIC_RESTORED = "TrafficRestored"  #: the Canary was deleted, stable has all traffic
    FINALIZER_TIMEOUT = "FinalizerTimeout"  #: deleted without restoring traffic in time


#: Reasons that end a rollout: sinks that keep one message per rollout close it.
FINAL_REASONS = frozenset(
    {EventReason.PROMOTED, EventReason.ROLLED_BACK, EventReason.PROMOTION_FAILED}
)


class RolloutEvent(BaseModel):
    """One event, as every sink receives it.

    Attributes:
        schema_: always :data:`SCHEMA` (``schema`` in JSON).
        id: unique per event (a consumer drops one it has already seen).
        at: when it happened (UTC).
        namespace, name: the Canary.
        reason: see :class:`EventReason`.
        warning: something went wrong (Kubernetes Event type Warning).
        message: one line for people.
        revision: the revision rolling out, if any.
        phase: the Canary's phase after the event.
        weight_pct: canary traffic after the event, percent.
        step: 1-based number of the current step, or None when idle.
        steps: every step's weight, percent.
        approval_pct: for ``WaitingApproval``: the weight of the step that waits.
        by: who caused it (the approver, the promoter), if a person did.
        verdict: the latest verdict, with its reasons and numbers.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid"
    )

    schema_: Literal["canaryd.io/event/v1"] = Field(default=SCHEMA, alias="schema")
    id: str
    at: datetime
    namespace: str
    name: str
    reason: EventReason
    warning: bool = False
    message: str
    revision: str | None = None
    phase: Phase
    weight_pct: int = Field(ge=0, le=100)
    step: int | None = None
    steps: list[int] = Field(default_factory=list)
    approval_pct: int | None = None
    by: str | None = None
    verdict: VerdictRecord | None = None

    def to_json(self) -> dict[str, Any]:
        """The event as every sink sends it (camelCase, ISO timestamps, no nulls)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def encode(self) -> bytes:
        """:meth:`to_json` as compact UTF-8 JSON, for wires (webhooks, MQTT)."""
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False).encode()

    @property
    def key(self) -> str:
        """``namespace/name``."""
        return f"{self.namespace}/{self.name}"


def new_event_id() -> str:
    """A fresh event id (random: unique across replicas and restarts)."""
    return secrets.token_hex(8)


def event_of(
    namespace: str,
    name: str,
    status: CanaryStatus,
    steps: list[int],
    reason: EventReason,
    message: str,
    at: datetime,
    *,
    warning: bool = False,
    by: str | None = None,
    event_id: str | None = None,
) -> RolloutEvent:
    """The event for ``reason``, with the Canary's state from ``status`` (the status
    as written with the change that caused it)."""
    waiting = status.phase is Phase.WAITING_APPROVAL and status.pending_step_index is not None
    approval_pct = None
    if waiting and status.pending_step_index is not None and status.pending_step_index < len(steps):
        approval_pct = steps[status.pending_step_index]
    if by is None and reason is EventReason.APPROVED and status.approvals:
        by = status.approvals[-1].by
    return RolloutEvent(
        id=event_id or new_event_id(),
        at=at,
        namespace=namespace,
        name=name,
        reason=reason,
        warning=warning,
        message=message,
        revision=status.revision,
        phase=status.phase,
        weight_pct=status.canary_weight,
        step=None if status.phase is Phase.IDLE else status.step_index + 1,
        steps=list(steps),
        approval_pct=approval_pct,
        by=by or None,
        verdict=status.last_verdict,
    )


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :meth:`RolloutEvent.to_json` (``docs/event.schema.json``)."""
    schema = RolloutEvent.model_json_schema(by_alias=True, mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://canaryd.io/schemas/event-v1.json"
    return schema
