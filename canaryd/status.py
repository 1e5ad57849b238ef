"""The ``Canary`` status: the only state canaryd keeps (design §3).

Everything the daemon needs to continue a rollout after a restart lives here: the
phase, the step and its start, the counters captured when the step began, the
evidence carried from earlier steps, approvals and the commands already handled.
Serialised with camelCase keys, as Kubernetes status fields are.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from analysis.counts import ArmCounts


class VerdictDecision(StrEnum):
    """What the latest verdict decided (``status.lastVerdict.decision``): the four
    decisions of analysis, and a hold for traffic someone else moved."""

    CONTINUE = "continue"  #: nothing wrong so far; the step keeps collecting evidence
    PASS = "pass"  #: the step is done
    HOLD = "hold"  #: cannot judge (too little data, a shared incident)
    ROLLBACK = "rollback"  #: evidence of harm
    TRAFFIC_DRIFT = "traffic-drift"  #: the routes read other than canaryd set: not judged


class StepOutcome(StrEnum):
    """How a step ended (``status.history[].verdict``)."""

    PASS = "pass"  #: analysis passed it
    SKIPPED = "skipped"  #: a skip command
    ROLLBACK = "rollback"  #: analysis found harm
    ABORTED = "aborted"  #: an abort command
    NO_DATA = "no-data"  #: no data for noData.holdFor, and noData.then is rollback
    APPROVAL_TIMEOUT = "approval-timeout"  #: no approval in time, onTimeout abort
    SPEC_CHANGED = "spec-changed"  #: spec.steps changed so that the step is gone


class Phase(StrEnum):
    """Where a rollout stands (design §4)."""

    IDLE = "Idle"
    PROGRESSING = "Progressing"
    WAITING_APPROVAL = "WaitingApproval"
    HOLDING = "Holding"
    PROMOTING = "Promoting"
    SUCCEEDED = "Succeeded"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"

    @property
    def active(self) -> bool:
        """True while a rollout is under way (traffic may be on the canary)."""
        return self in _ACTIVE

    @property
    def terminal(self) -> bool:
        """True once a rollout has ended."""
        return self in _TERMINAL


_ACTIVE = frozenset({Phase.PROGRESSING, Phase.WAITING_APPROVAL, Phase.HOLDING, Phase.PROMOTING})
_TERMINAL = frozenset({Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.FAILED})


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore"
    )


class Counts(_Model):
    """Counters of one arm as stored in status (see :class:`analysis.counts.ArmCounts`)."""

    requests: int = 0
    errors: int = 0
    latency_buckets: list[int] = Field(default_factory=list)

    @classmethod
    def of(cls, arm: ArmCounts) -> Counts:
        return cls(
            requests=arm.requests, errors=arm.errors, latency_buckets=list(arm.latency_buckets)
        )

    def arm(self) -> ArmCounts:
        return ArmCounts(self.requests, self.errors, tuple(self.latency_buckets))


class Baseline(_Model):
    """Both arms' counters when the current step began."""

    stable: Counts
    canary: Counts


class BlocksRecord(_Model):
    """Blocks of the arms' error counters, for the overdispersion estimate
    (:class:`analysis.dispersion.Blocks`): where the current block began, the window
    (step) the sums belong to, and the sums (:class:`analysis.dispersion.Moments`:
    this window's completed blocks and the earlier windows' figures, twelve numbers an
    arm)."""

    started_at: datetime
    window_started_at: datetime | None = None
    stable_at: list[int] = Field(default_factory=list)
    canary_at: list[int] = Field(default_factory=list)
    stable: list[float] = Field(default_factory=list)
    canary: list[float] = Field(default_factory=list)


class CheckRecord(_Model):
    """One check of a verdict, as recorded (numbers for machines, reason for people)."""

    name: str
    status: str
    e_value: float | None = None
    threshold: float | None = None
    reason: str
    stats: dict[str, float | None] = Field(default_factory=dict)


class VerdictRecord(_Model):
    """The latest analysis verdict: decision, reasons, and the checks behind them."""

    decision: VerdictDecision
    at: datetime
    reasons: list[str] = Field(default_factory=list)
    checks: list[CheckRecord] = Field(default_factory=list)


class StepRecord(_Model):
    """One step of the rollout, for the audit trail."""

    index: int
    weight: int
    started_at: datetime
    ended_at: datetime | None = None
    verdict: StepOutcome | None = None
    reasons: list[str] = Field(default_factory=list)


class ApprovalRecord(_Model):
    """An approval: who approved which step weight, when, and why (an override of the
    error-budget policy must say why)."""

    weight: int
    by: str
    at: datetime
    reason: str = ""


class Condition(_Model):
    """A Kubernetes-style condition (``Ready``: can canaryd act on this Canary?)."""

    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""
    last_transition_time: datetime | None = None


class CanaryStatus(_Model):
    """``status`` of a ``Canary``.

    Attributes:
        phase: see :class:`Phase`.
        revision: the revision being rolled out.
        step_index: index into ``spec.steps`` of the current step.
        canary_weight: canary traffic now, percent; stable carries the rest (what the
            routes should read; the Converger makes them).
        traffic_verified: every managed route was last read at ``canary_weight``
            (None before the first convergence).
        verified_canary_pct: the canary weight canaryd last wrote or read on every
            managed route; routes that later read otherwise at this same weight were
            changed by someone else (drift).
        template_hash: a hash of the canary pod template this rollout analyses
            (recorded when it starts); promotion copies only that template.
        step_started_at: when the current step's window began.
        phase_since: when the current phase began (timers for approval and promotion).
        pending_step_index: the step to enter on approval (WaitingApproval only).
        baseline: counters captured when the step began; deltas are judged.
        last_data_at: when metrics last brought new canary requests (noData timer).
        last_canary_requests: canary counter at ``last_data_at``.
        evidence: per check, log e-values of the completed steps.
        step_evidence: per check, the current step's latest log e-value (all of the
            step's windows).
        window_carry: per check, log e-value of the step's windows before the current
            one (the window restarts on a shared incident or a counter reset).
        blocks: the rollout's error counters cut into blocks, for the overdispersion
            estimate that widens the error comparison.
        last_verdict: the latest verdict with its reasons and numbers.
        history: every step entered, with its outcome.
        approvals: approvals given for this revision.
        acknowledged: ids of the commands already handled (newest last).
        fix: the rollout was started as a fix (``promote --fix``): the error-budget
            policy lets it through when releases are frozen.
        budget_hold: why the error-budget policy stops the rollout (waiting before a
            step, or holding at one), or None.
        message: one line saying what is happening and why.
        observed_generation: ``metadata.generation`` the status was computed from.
        conditions: ``Ready`` says whether canaryd can act (spec valid, VirtualService,
            routes, subsets and Deployments present), with the reason if not.
    """

    phase: Phase = Phase.IDLE
    revision: str | None = None
    step_index: int = 0
    canary_weight: int = 0
    traffic_verified: bool | None = None
    verified_canary_pct: int | None = Field(default=None, ge=0, le=100)
    template_hash: str | None = None
    step_started_at: datetime | None = None
    phase_since: datetime | None = None
    pending_step_index: int | None = None
    baseline: Baseline | None = None
    last_data_at: datetime | None = None
    last_canary_requests: int | None = None
    evidence: dict[str, list[float]] = Field(default_factory=dict)
    step_evidence: dict[str, float] = Field(default_factory=dict)
    window_carry: dict[str, float] = Field(default_factory=dict)
    blocks: BlocksRecord | None = None
    last_verdict: VerdictRecord | None = None
    history: list[StepRecord] = Field(default_factory=list)
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    fix: bool = False
    budget_hold: str | None = None
    acknowledged: list[str] = Field(default_factory=list)
    message: str = ""
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)

    @property
    def stable_weight(self) -> int:
        """Stable traffic, percent: always ``100 - canary_weight``."""
        return 100 - self.canary_weight

    def condition(self, type_: str) -> Condition | None:
        """The condition ``type_``, if set."""
        return next((c for c in self.conditions if c.type == type_), None)

    def with_condition(
        self, type_: str, ok: bool, reason: str, message: str, now: datetime
    ) -> CanaryStatus:
        """This status with condition ``type_`` set (transition time kept if unchanged)."""
        value = "True" if ok else "False"
        old = self.condition(type_)
        since = old.last_transition_time if old is not None and old.status == value else now
        new = Condition(
            type=type_, status=value, reason=reason, message=message, last_transition_time=since
        )
        if old is None:
            return self.model_copy(update={"conditions": [*self.conditions, new]})
        # in place: conditions set in turn by two writers must not swap places forever
        conditions = [new if c.type == type_ else c for c in self.conditions]
        return self.model_copy(update={"conditions": conditions})

    def to_json(self) -> dict[str, Any]:
        """The status as Kubernetes stores it (camelCase, ISO timestamps)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
