"""The rollout state machine (design §4): pure, so every driver shares it.

:func:`reconcile` takes the spec, the current status, what was observed, the
commands written on the resource and the time, and returns the new status and the few
one-off actions that cannot be derived from it (promote the template, notify).  Traffic
and replicas are not actions: the status says what they should be (``canaryWeight``,
the phase) and the :class:`~canaryd.converger.Converger` makes the world match it.
It never sleeps, reads a clock, logs or calls out; the daemon, ``canaryd simulate``
and the tests are drivers around it.

Invariants it keeps (and the tests check):

* weights always sum to 100 (the status carries the canary's share only);
* a rollback sets ``canaryWeight`` to 0 in the same status that says RolledBack;
* no step advances without a verdict on data from that step;
* re-running with the same inputs changes nothing: commands are acknowledged by id,
  and a step that began at ``now`` is not judged before data arrives.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

from analysis.budget import Tier
from analysis.counts import ArmCounts, Observation
from analysis.dispersion import Blocks, Moments
from analysis.engine import LatencySettings, Settings, StepData, evaluate
from analysis.verdict import CheckStatus, Decision, Verdict, format_duration
from canaryd.events import EventReason
from canaryd.spec import CanarySpec
from canaryd.status import (
    ApprovalRecord,
    Baseline,
    BlocksRecord,
    CanaryStatus,
    CheckRecord,
    Counts,
    Phase,
    StepOutcome,
    StepRecord,
    VerdictDecision,
    VerdictRecord,
)

#: How many handled command ids the status remembers (older ones are dropped).
ACK_MEMORY = 50


class CommandKind(StrEnum):
    """Commands people and pipelines write on the resource."""

    PROMOTE = "promote"  #: start (or restart) a rollout of ``revision``
    ABORT = "abort"  #: roll back now
    APPROVE = "approve"  #: let the rollout enter the step waiting for approval
    SKIP = "skip"  #: treat the current step as passed


@dataclass(frozen=True, slots=True)
class Command:
    """A command, identified by ``id`` so it is handled exactly once.

    Attributes:
        id: unique id; handled ids are kept in ``status.acknowledged``.
        kind: see :class:`CommandKind`.
        revision: for ``promote``: the revision to roll out.
        weight: for ``approve``: the step weight (%) approved; None approves whatever
            step is waiting.
        by: who issued it (user, pipeline, Slack handle).
        reason: free text recorded with it (for an approve, the override's why).
        fix: for ``promote``: the release is a fix, which the error-budget policy lets
            through when releases are frozen.
    """

    id: str
    kind: CommandKind
    revision: str | None = None
    weight: int | None = None
    by: str = ""
    reason: str = ""
    fix: bool = False


_NUMBER = re.compile(r"[-+]?\d[\d.,]*")


def _same_words(a: str | None, b: str | None) -> bool:
    """The same message but for its numbers (the budget's figures move every read; an
    event is told when the cause changes, not when a figure does)."""
    if a is None or b is None:
        return a is b
    return _NUMBER.sub("#", a) == _NUMBER.sub("#", b)


@dataclass(frozen=True, slots=True)
class BudgetGate:
    """The error-budget policy's verdict on the Canary's service (``canaryd.slo``).

    Attributes:
        tier: what the budget allows.
        reason: the figures behind it, for reasons and events.
    """

    tier: Tier
    reason: str


@dataclass(frozen=True, slots=True)
class Observed:
    """What the drivers observed for one reconcile.

    Attributes:
        metrics: both arms' cumulative counters, or None when the metrics source failed.
        metrics_error: why metrics are missing (shown in the hold reason).
        stable_revision: the revision the stable workload has fully rolled out, if known.
        traffic_drift: someone else changed the weights canaryd set (what the routes
            read, and what canaryd set), or None: the step is not judged meanwhile.
        canary_template: a hash of the canary's pod template now, or None when unknown;
            recorded when a rollout starts, and a rollout whose template changes
            restarts from its first step.
        budget: the error-budget policy's tier for the service, when the spec asks for
            the policy (``analysis.slo.budgetPolicy``) and its figures are known.
    """

    metrics: Observation | None = None
    metrics_error: str | None = None
    stable_revision: str | None = None
    traffic_drift: str | None = None
    canary_template: str | None = None
    budget: BudgetGate | None = None


@dataclass(frozen=True, slots=True)
class PromoteStable:
    """Copy the canary's pod template into the stable workload (idempotent); with
    ``template_hash``, only if the canary still runs that analysed template."""

    revision: str
    template_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Notify:
    """Tell the world: the daemon turns it into a :class:`~canaryd.events.RolloutEvent`
    for every sink (Kubernetes Event, log, SSE, Slack, webhooks, MQTT)."""

    reason: EventReason
    message: str
    warning: bool = False


Action = PromoteStable | Notify


@dataclass(frozen=True, slots=True)
class Result:
    """What :func:`reconcile` returns: the new status and the actions, in order."""

    status: CanaryStatus
    actions: tuple[Action, ...] = field(default_factory=tuple)


def analysis_settings(spec: CanarySpec) -> Settings:
    """The analysis settings a spec asks for."""
    a = spec.analysis
    return Settings(
        alpha=a.alpha,
        step_duration_s=a.step_duration,
        min_step_duration_s=a.min_step_duration,
        min_requests=a.min_requests,
        error_tolerance=a.error_rate.relative_tolerance,
        error_max_pct=a.error_rate.max_pct,
        latency=tuple(
            LatencySettings(c.percentile, c.relative_tolerance, c.max_ms) for c in a.latency
        ),
        slo_availability_pct=a.slo.availability_pct if a.slo else None,
        slo_burn_rate_limit=a.slo.burn_rate_limit if a.slo else 14.4,
        early_pass_ratio=a.early_pass_ratio,
    )


class _Run:
    """Mutable scratch for one reconcile: the status being built and the actions."""

    def __init__(self, spec: CanarySpec, status: CanaryStatus, observed: Observed, now: datetime):
        self.spec = spec
        self.status = status
        self.observed = observed
        self.now = now
        self.actions: list[Action] = []
        self.settings = analysis_settings(spec)

    def update(self, **changes: object) -> None:
        self.status = self.status.model_copy(update=changes)

    def emit(self, reason: EventReason, message: str, *, warning: bool = False) -> None:
        self.actions.append(Notify(reason, message, warning))

    # -- transitions -----------------------------------------------------------------

    def start(self, revision: str, by: str, *, fix: bool = False) -> None:
        """A new rollout of ``revision`` from step 0."""
        fresh = CanaryStatus(
            revision=revision,
            template_hash=self.observed.canary_template,
            acknowledged=self.status.acknowledged,
            observed_generation=self.status.observed_generation,
            fix=fix,
        )
        self.status = fresh
        who = f" by {by}" if by else ""
        what = " (a fix)" if fix else ""
        self.emit(EventReason.ROLLOUT_STARTED, f"rollout of revision {revision}{what} started{who}")
        self.enter_or_wait(0)

    # -- the error-budget policy -------------------------------------------------------

    def budget_block(self, index: int) -> str | None:
        """Why the error-budget policy keeps the rollout from entering step ``index``
        now, or None.  Frozen: only a fix moves; a new rollout below the override
        tier needs an approval with a reason (the override: who and why); below the
        approval tier every step after the first needs an approval."""
        frozen = self.frozen()
        gate = self.observed.budget
        if frozen is not None or gate is None or gate.tier in (Tier.NORMAL, Tier.FROZEN):
            return frozen  # frozen: only a fix (whose rollout frozen() lets through) moves
        weight = self.spec.steps[index]
        approvals = [a for a in self.status.approvals if a.weight == weight]
        if index == 0:
            if gate.tier is Tier.OVERRIDE and not any(a.reason for a in approvals):
                return (
                    f"error-budget policy: {gate.reason}; override with an approval that "
                    "gives a reason (canaryd approve --reason WHY)"
                )
            return None
        if not approvals:
            return f"error-budget policy: {gate.reason}"
        return None

    def frozen(self) -> str | None:
        """Why a running rollout must hold at its step (releases frozen), or None."""
        gate = self.observed.budget
        if gate is not None and gate.tier is Tier.FROZEN and not self.status.fix:
            return f"error-budget policy: {gate.reason}"
        return None

    def recheck_budget(self) -> None:
        """A rollout the policy stopped moves on once the policy allows it."""
        st = self.status
        if st.budget_hold is None:
            return
        if st.phase is Phase.WAITING_APPROVAL and st.pending_step_index is not None:
            index = st.pending_step_index
            block = self.budget_block(index)
            if block is not None and block != st.budget_hold:  # new figures, same wait
                weight = self.spec.steps[index]
                if not _same_words(block, st.budget_hold):  # a new cause, not new numbers
                    self.emit(
                        EventReason.WAITING_APPROVAL, f"{weight}% step: {block}", warning=True
                    )
                self.update(
                    budget_hold=block, message=f"waiting before the {weight}% step: {block}"
                )
            if block is None:
                self.update(budget_hold=None)
                weight = self.spec.steps[index]
                approved = any(a.weight == weight for a in st.approvals)
                if weight in self.spec.approvals.before and not approved:
                    return  # the spec's own approval is still to come
                self.emit(EventReason.RESUMED, f"error-budget policy allows the {weight}% step now")
                self.enter_step(index)
        elif st.phase is Phase.HOLDING and self.frozen() is None:
            self.update(budget_hold=None)  # the next pass moves on

    def enter_or_wait(self, index: int) -> None:
        """Enter step ``index``, or wait for approval if the spec (or the error-budget
        policy) asks for one first."""
        weight = self.spec.steps[index]
        block = self.budget_block(index)
        if block is not None:
            if self.status.budget_hold != block or self.status.phase is not Phase.WAITING_APPROVAL:
                self.emit(EventReason.WAITING_APPROVAL, f"{weight}% step: {block}", warning=True)
            self.update(
                phase=Phase.WAITING_APPROVAL,
                phase_since=self.now,
                pending_step_index=index,
                budget_hold=block,
                message=f"waiting before the {weight}% step: {block}",
            )
            return
        approved = any(a.weight == weight for a in self.status.approvals)
        if weight in self.spec.approvals.before and not approved:
            self.update(
                phase=Phase.WAITING_APPROVAL,
                phase_since=self.now,
                pending_step_index=index,
                message=f"waiting for approval to move to {weight}%",
            )
            self.emit(EventReason.WAITING_APPROVAL, f"approval needed before the {weight}% step")
            return
        self.enter_step(index)

    def enter_step(self, index: int) -> None:
        self.carry_evidence()
        weight = self.spec.steps[index]
        metrics = self.observed.metrics
        baseline = (
            Baseline(stable=Counts.of(metrics.stable), canary=Counts.of(metrics.canary))
            if metrics is not None and metrics.stable is not None and metrics.canary is not None
            else None
        )
        history = [
            *self.status.history,
            StepRecord(index=index, weight=weight, started_at=self.now),
        ]
        self.update(
            phase=Phase.PROGRESSING,
            phase_since=self.now,
            step_index=index,
            canary_weight=weight,
            step_started_at=self.now,
            pending_step_index=None,
            baseline=baseline,
            last_data_at=self.now,
            last_canary_requests=baseline.canary.requests if baseline else None,
            step_evidence={},
            history=history,
            message=f"step {index + 1}/{len(self.spec.steps)}: {self.spec.step_traffic(index)}",
        )
        plain = self.spec.strategy == "canary" and not self.spec.mirror_pct(index)
        self.emit(
            EventReason.STEP_STARTED,
            f"step {index + 1}/{len(self.spec.steps)}: "
            + (f"canary at {weight}%" if plain else self.spec.step_traffic(index)),
        )

    def finish_history(self, verdict: StepOutcome, reasons: Sequence[str]) -> None:
        """Record the current step's outcome in the audit trail."""
        history = list(self.status.history)
        if history and history[-1].ended_at is None:
            history[-1] = history[-1].model_copy(
                update={"ended_at": self.now, "verdict": verdict, "reasons": list(reasons)}
            )
            self.update(history=history)

    def carry_evidence(self) -> None:
        """Close the current step's evidence: it becomes one factor of the rollout's."""
        evidence = {k: list(v) for k, v in self.status.evidence.items()}
        for name, log_e in self.status.step_evidence.items():
            evidence.setdefault(name, []).append(log_e)
        self.update(evidence=evidence, step_evidence={}, window_carry={})

    def advance(self, reasons: Sequence[str], verdict: StepOutcome = StepOutcome.PASS) -> None:
        """The current step is done: next step, or promotion after the last.

        A step that waits for approval keeps its window (and evidence) open: the canary
        still serves at its weight and is still judged; the evidence is carried only
        when the next step starts.
        """
        self.finish_history(verdict, reasons)
        index = self.status.step_index
        weight = self.spec.steps[index]
        self.emit(
            EventReason.STEP_PASSED, f"{weight}% {reasons[0] if reasons else 'step ' + verdict}"
        )
        if index + 1 < len(self.spec.steps):
            self.enter_or_wait(index + 1)
            return
        revision = self.status.revision or ""
        if self.spec.promotion.mode == "weights-only":
            self.update(
                phase=Phase.SUCCEEDED,
                phase_since=self.now,
                message=f"revision {revision} promoted: canary carries 100% (weights-only)",
            )
            self.emit(EventReason.PROMOTED, f"revision {revision} promoted (weights-only)")
            return
        self.update(
            phase=Phase.PROMOTING,
            phase_since=self.now,
            message=f"promoting revision {revision}: rolling it out to the stable workload",
        )
        self.actions.append(PromoteStable(revision, self.status.template_hash))
        self.emit(EventReason.PROMOTING, f"copying revision {revision} to the stable workload")

    def rollback(self, reasons: Sequence[str], verdict: StepOutcome = StepOutcome.ROLLBACK) -> None:
        """Canary weight 0 first, then scale the canary down."""
        self.finish_history(verdict, reasons)
        first = reasons[0] if reasons else verdict
        self.update(
            phase=Phase.ROLLED_BACK,
            phase_since=self.now,
            canary_weight=0,
            pending_step_index=None,
            message=f"rolled back: {first}",
        )
        self.emit(EventReason.ROLLED_BACK, f"rolled back: {first}", warning=True)

    # -- commands ----------------------------------------------------------------------

    def command(self, cmd: Command) -> None:
        phase = self.status.phase
        if cmd.kind is CommandKind.PROMOTE:
            revision = cmd.revision or self.status.revision or "unversioned"
            same = revision == self.status.revision
            if same and (phase.active or phase is Phase.SUCCEEDED):
                return  # already rolling out, or already promoted: a re-run pipeline
            if phase.active:
                self.emit(
                    EventReason.SUPERSEDED,
                    f"revision {self.status.revision} superseded by {revision}",
                    warning=True,
                )
            self.start(revision, cmd.by, fix=cmd.fix)
        elif cmd.kind is CommandKind.ABORT:
            if phase.active and phase is not Phase.PROMOTING:
                who = f" by {cmd.by}" if cmd.by else ""
                why = f": {cmd.reason}" if cmd.reason else ""
                self.rollback([f"aborted{who}{why}"], verdict=StepOutcome.ABORTED)
        elif cmd.kind is CommandKind.APPROVE:
            self.approve(cmd)
        elif cmd.kind is CommandKind.SKIP and phase in (Phase.PROGRESSING, Phase.HOLDING):
            who = f" by {cmd.by}" if cmd.by else ""
            self.advance([f"step skipped{who}"], verdict=StepOutcome.SKIPPED)

    def approve(self, cmd: Command) -> None:
        if not self.status.phase.active:
            return
        pending = self.status.pending_step_index
        waiting_weight = self.spec.steps[pending] if pending is not None else None
        weight = cmd.weight if cmd.weight is not None else waiting_weight
        if weight is None or weight not in self.spec.steps:
            return
        record = ApprovalRecord(
            weight=weight, by=cmd.by or "unknown", at=self.now, reason=cmd.reason
        )
        self.update(approvals=[*self.status.approvals, record])
        if self.status.phase is Phase.WAITING_APPROVAL and weight == waiting_weight:
            assert pending is not None
            self.emit(EventReason.APPROVED, f"{weight}% step approved by {record.by}")
            if pending == self.status.step_index and self.status.step_started_at is not None:
                # a pause (noData.then: pause) resumes the step it interrupted
                self.update(phase=Phase.PROGRESSING, pending_step_index=None, last_data_at=self.now)
            elif self.status.budget_hold is not None:
                self.update(budget_hold=None)
                self.enter_or_wait(pending)  # the policy may still say no (frozen)
            else:
                self.enter_step(pending)

    # -- analysis ----------------------------------------------------------------------

    def judge(self) -> None:
        """Evaluate the current step and act on the verdict."""
        st = self.status
        metrics = self.observed.metrics
        if self.traffic_drift():
            return
        if st.step_started_at is None or self.now <= st.step_started_at:
            return  # the step began now: no data from it yet
        if metrics is None or metrics.stable is None or metrics.canary is None:
            self.no_data(self.observed.metrics_error or "the metrics source returned nothing")
            return
        if st.baseline is None:
            # data was missing when the step began: its window starts now
            self.restart_window(metrics.stable, metrics.canary)
            return
        stable = metrics.stable - st.baseline.stable.arm()
        canary = metrics.canary - st.baseline.canary.arm()
        went_back = (
            st.last_canary_requests is not None
            and metrics.canary.requests < st.last_canary_requests
        )
        if went_back or stable.went_back or canary.went_back:
            self.restart_window(
                metrics.stable,
                metrics.canary,
                message="metric counters reset: the step's analysis window restarts now",
            )
            return
        if metrics.canary.requests != st.last_canary_requests:
            self.update(last_data_at=self.now, last_canary_requests=metrics.canary.requests)
        elif self.no_data_expired("no new canary requests"):
            return
        blocks = self.count_blocks(metrics.stable, metrics.canary)
        # series read a moment apart may disagree (more errors than requests): mended
        # as Prometheus mends histograms, so the statistics only ever see counts
        verdict = self.evaluate(stable.coherent(), canary.coherent(), blocks)
        self.record(verdict)
        decision = verdict.decision
        if self.status.phase is Phase.WAITING_APPROVAL:
            if decision is Decision.ROLLBACK:
                self.rollback(verdict.reasons)
            return
        if decision is Decision.ROLLBACK:
            self.rollback(verdict.reasons)
        elif decision is Decision.PASS and (frozen := self.frozen()) is not None:
            weight = self.spec.steps[self.status.step_index]
            if not _same_words(frozen, self.status.budget_hold):
                self.emit(
                    EventReason.HOLDING, f"{weight}% step passed, held: {frozen}", warning=True
                )
            self.update(
                phase=Phase.HOLDING,
                budget_hold=frozen,
                message=f"holding at {weight}%: the step passed, but {frozen}",
            )
        elif decision is Decision.PASS:
            self.update(budget_hold=None)
            self.advance(verdict.reasons)
        elif decision is Decision.HOLD:
            if self.status.phase is not Phase.HOLDING:
                self.emit(EventReason.HOLDING, verdict.reasons[0], warning=True)
            self.update(phase=Phase.HOLDING, message=f"holding: {verdict.reasons[0]}")
            if verdict.shared_incident:
                # The incident's data says nothing about the canary: once it is over,
                # judge the step on clean data only.
                shared = [c.name for c in verdict.checks if c.status is CheckStatus.SHARED]
                self.restart_window(metrics.stable, metrics.canary, drop=shared)
        else:
            if self.status.phase is Phase.HOLDING:
                self.emit(EventReason.RESUMED, verdict.reasons[0])
            self.update(phase=Phase.PROGRESSING, message=verdict.reasons[0])

    def template_changed(self) -> None:
        """The analysed template is the promoted one: a rollout whose canary pod
        template changed starts again from its first step, for the new template."""
        st, now_hash = self.status, self.observed.canary_template
        if not st.phase.active or now_hash is None:
            return
        if st.template_hash is None:  # a rollout begun before hashes were recorded
            self.update(template_hash=now_hash)
            return
        if now_hash == st.template_hash:
            return
        revision = st.revision or "unversioned"
        self.emit(
            EventReason.ROLLOUT_RESTARTED,
            f"the canary's pod template changed during the rollout of {revision} "
            f"(template {st.template_hash} → {now_hash}, at {st.canary_weight}%): the "
            "rollout restarts from the first step, so that what is promoted is what was "
            "analysed",
            warning=True,
        )
        self.start(revision, "a template change")

    def traffic_drift(self) -> bool:
        """Hold while the routes read other than the weight canaryd set (True: the step
        is not judged now).  Once they read it again the step's window restarts, so the
        step is judged on traffic at its own weight."""
        st, drift = self.status, self.observed.traffic_drift
        held = (
            st.phase is Phase.HOLDING
            and st.last_verdict is not None
            and st.last_verdict.decision == VerdictDecision.TRAFFIC_DRIFT
        )
        if drift is not None:
            if st.phase is Phase.PROGRESSING or (st.phase is Phase.HOLDING and not held):
                reason = f"traffic drift: {drift}"
                self.emit(EventReason.HOLDING, reason, warning=True)
                self.update(
                    phase=Phase.HOLDING,
                    message=f"holding: {reason}",
                    last_verdict=VerdictRecord(
                        decision=VerdictDecision.TRAFFIC_DRIFT, at=self.now, reasons=[reason]
                    ),
                )
            return True
        if held:
            reason = (
                f"the routes read {st.canary_weight}% canary again: the step's analysis "
                "window restarts now"
            )
            self.emit(EventReason.RESUMED, reason)
            metrics = self.observed.metrics
            if metrics is not None and metrics.stable is not None and metrics.canary is not None:
                self.restart_window(metrics.stable, metrics.canary)
            else:
                self.update(baseline=None, step_started_at=self.now, last_data_at=self.now)
            self.update(phase=Phase.PROGRESSING, message=reason)
            return True
        return False

    def restart_window(
        self,
        stable: ArmCounts,
        canary: ArmCounts,
        *,
        drop: Collection[str] = (),
        **changes: object,
    ) -> None:
        """Start the step's analysis window at these counters, now.

        Used when the window's start is unknown or its counters are no longer
        comparable.  The evidence of the windows so far is carried, not dropped:
        dropping a factor below 1 and starting again at 1 would inflate the
        false-rollback rate; the step's factor is the product of its windows'.

        ``drop`` names limit checks breached in a shared incident: their evidence
        measured the incident, not the canary.  Dropping it keeps α, because a limit
        check can only roll back after a first crossing of its threshold, and these
        have crossed already.
        """
        self.update(
            baseline=Baseline(stable=Counts.of(stable), canary=Counts.of(canary)),
            step_started_at=self.now,
            last_data_at=self.now,
            last_canary_requests=canary.requests,
            window_carry={k: v for k, v in self.status.step_evidence.items() if k not in drop},
            **changes,
        )

    def count_blocks(self, stable: ArmCounts, canary: ArmCounts) -> tuple[Moments, Moments]:
        """Add this reading to the error-count blocks; the extra variance they show.

        Blocks lie within one window of one step (a block open when the window
        restarted is dropped), so each has one canary weight.
        """
        st = self.status
        assert st.step_started_at is not None and st.baseline is not None
        record = st.blocks
        # a new rollout, or a window begun since the open block: start at the window
        fresh = record is None or record.started_at < st.step_started_at
        # sums of an earlier window (step) are folded in: a new window has its own rates
        earlier = False
        if record is not None:
            window = record.window_started_at
            earlier = window < st.step_started_at if window is not None else fresh
        start_s = st.step_started_at.timestamp()
        base_s, base_c = st.baseline.stable, st.baseline.canary
        stable_at, canary_at = (base_s.requests, base_s.errors), (base_c.requests, base_c.errors)
        if record is not None and not fresh:
            start_s = record.started_at.timestamp()
            stable_at = (record.stable_at[0], record.stable_at[1])
            canary_at = (record.canary_at[0], record.canary_at[1])
        stable_m = Moments.from_list(record.stable) if record else Moments()
        canary_m = Moments.from_list(record.canary) if record else Moments()
        if earlier:
            stable_m, canary_m = stable_m.fold(), canary_m.fold()
        blocks = Blocks(start_s, stable_at, canary_at, stable_m, canary_m)
        before = blocks
        now_s, stable_now = self.now.timestamp(), (stable.requests, stable.errors)
        canary_now = (canary.requests, canary.errors)
        blocks = blocks.advance(now_s, stable_now, canary_now)
        if blocks is not before or fresh or earlier:
            self.update(
                blocks=BlocksRecord(
                    started_at=datetime.fromtimestamp(blocks.started_s, tz=self.now.tzinfo),
                    window_started_at=st.step_started_at,
                    stable_at=list(blocks.stable_at),
                    canary_at=list(blocks.canary_at),
                    stable=blocks.stable.as_list(),
                    canary=blocks.canary.as_list(),
                )
            )
        return blocks.including(stable_now, canary_now)

    def evaluate(
        self,
        stable: ArmCounts,
        canary: ArmCounts,
        blocks: tuple[Moments, Moments] | None = None,
    ) -> Verdict:
        st = self.status
        assert st.step_started_at is not None
        data = StepData(
            steps=self.spec.analysis_steps(),
            step_index=st.step_index,
            elapsed_s=(self.now - st.step_started_at).total_seconds(),
            stable=stable,
            canary=canary,
            prior_log_e=st.evidence,
            stable_reference=st.baseline.stable.arm() if st.baseline else None,
            window_carry_log_e=st.window_carry,
            error_blocks=blocks,
        )
        return evaluate(self.step_settings(st.step_index), data)

    def step_settings(self, index: int) -> Settings:
        """The analysis settings of step ``index``: the spec's, but for a step with a
        duration of its own (blueGreen's switch, judged for scaleDownDelay with the old
        version kept: never passed early)."""
        duration_s = self.spec.own_step_duration_s(index)
        if duration_s is None:
            return self.settings
        return replace(
            self.settings,
            step_duration_s=duration_s,
            min_step_duration_s=min(self.settings.min_step_duration_s, duration_s),
            early_pass_ratio=None,
        )

    def record(self, verdict: Verdict) -> None:
        checks = [
            CheckRecord(
                name=c.name,
                status=str(c.status),
                e_value=None if c.status is CheckStatus.NOT_APPLICABLE else c.e_value,
                threshold=c.threshold,
                reason=c.reason,
                stats={k: (v if math.isfinite(v) else None) for k, v in c.stats.items()},
            )
            for c in verdict.checks
        ]
        reasons = list(verdict.reasons)
        gate = self.observed.budget
        if gate is not None and gate.tier is not Tier.NORMAL:
            reasons.append(f"error-budget policy ({gate.tier}): {gate.reason}")
        self.update(
            last_verdict=VerdictRecord(
                decision=VerdictDecision(verdict.decision),
                at=self.now,
                reasons=reasons,
                checks=checks,
            ),
            step_evidence=verdict.step_log_es(),
        )

    def no_data_expired(self, why: str) -> bool:
        """Apply ``noData`` once data has been missing for ``holdFor``; True if it acted."""
        st = self.status
        since = st.last_data_at or st.step_started_at or self.now
        missing_s = (self.now - since).total_seconds()
        policy = self.spec.analysis.no_data
        if missing_s < policy.hold_for:
            return False
        reason = f"no data for {format_duration(missing_s)} ({why}); noData.then is {policy.then}"
        if policy.then == "rollback":
            self.rollback([reason], verdict=StepOutcome.NO_DATA)
        elif self.status.phase is not Phase.WAITING_APPROVAL:
            self.update(
                phase=Phase.WAITING_APPROVAL,
                phase_since=self.now,
                pending_step_index=st.step_index,
                message=f"paused: {reason}; approve to resume",
            )
            self.emit(EventReason.PAUSED, reason, warning=True)
        return True

    def no_data(self, why: str) -> None:
        if self.no_data_expired(why):
            return
        reason = f"no metrics: {why}"
        record = VerdictRecord(decision=VerdictDecision.HOLD, at=self.now, reasons=[reason])
        if self.status.phase is Phase.PROGRESSING:
            self.emit(EventReason.HOLDING, reason, warning=True)
            self.update(phase=Phase.HOLDING, message=f"holding: {reason}", last_verdict=record)

    def timers(self) -> None:
        """Approval and promotion deadlines."""
        st = self.status
        since = st.phase_since or self.now
        waited_s = (self.now - since).total_seconds()
        if st.phase is Phase.WAITING_APPROVAL:
            approvals = self.spec.approvals
            if approvals.on_timeout == "abort" and waited_s >= approvals.timeout:
                self.rollback(
                    [
                        f"no approval within {format_duration(approvals.timeout)}: "
                        "approvals.onTimeout is abort"
                    ],
                    verdict=StepOutcome.APPROVAL_TIMEOUT,
                )
        elif st.phase is Phase.PROMOTING:
            revision = st.revision or ""
            if self.observed.stable_revision == revision:
                self.update(
                    phase=Phase.SUCCEEDED,
                    phase_since=self.now,
                    canary_weight=0,
                    message=f"revision {revision} promoted: stable runs it and carries all traffic",
                )
                self.emit(EventReason.PROMOTED, f"revision {revision} promoted")
            elif waited_s >= self.spec.promotion.timeout:
                self.update(
                    phase=Phase.FAILED,
                    phase_since=self.now,
                    message=(
                        f"stable did not roll out revision {revision} within "
                        f"{format_duration(self.spec.promotion.timeout)}; "
                        "the canary keeps all traffic"
                    ),
                )
                self.emit(EventReason.PROMOTION_FAILED, self.status.message, warning=True)
            else:
                self.actions.append(PromoteStable(revision, self.status.template_hash))


def reconcile(
    spec: CanarySpec,
    status: CanaryStatus,
    observed: Observed,
    commands: Sequence[Command],
    now: datetime,
) -> Result:
    """One step of the state machine: new status and the actions to carry out.

    Args:
        spec: the Canary's spec.
        status: its current status (the only state).
        observed: metrics and workload facts observed for this reconcile.
        commands: commands on the resource; those already acknowledged are skipped.
        now: the time of this reconcile (wall clock in the daemon, virtual in simulation).
    """
    run = _Run(spec, status, observed, now)
    if status.phase.active and (
        status.step_index >= len(spec.steps) or (status.pending_step_index or 0) >= len(spec.steps)
    ):
        # spec.steps changed under a running rollout: its place no longer exists
        run.rollback(
            [f"spec.steps changed to {spec.steps} during the rollout (was at step "
             f"{status.step_index + 1}); rolled back to be safe"],
            verdict=StepOutcome.SPEC_CHANGED,
        )  # fmt: skip
        return Result(run.status, tuple(run.actions))
    for cmd in commands:
        if cmd.id in run.status.acknowledged:
            continue
        run.command(cmd)
        run.update(acknowledged=[*run.status.acknowledged, cmd.id][-ACK_MEMORY:])
    run.template_changed()
    run.recheck_budget()
    phase = run.status.phase
    if phase in (Phase.PROGRESSING, Phase.HOLDING, Phase.WAITING_APPROVAL):
        run.judge()
    run.timers()
    return Result(run.status, tuple(run.actions))
