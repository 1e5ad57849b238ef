# The driver's methods change d.status; mypy's narrowing of d.status.phase between
# assertions does not know that.
# mypy: disable-error-code="comparison-overlap"
"""The rollout state machine: transitions, invariants and properties (design §4)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.counts import N_BUCKETS, ArmCounts, Observation
from canaryd.converger import wants_scaled_down
from canaryd.rollout import (
    Command,
    CommandKind,
    Notify,
    Observed,
    PromoteStable,
    Result,
    reconcile,
)
from canaryd.spec import CanarySpec, parse_spec
from canaryd.status import CanaryStatus, Phase, StepOutcome, VerdictDecision

T0 = datetime(2026, 3, 1, tzinfo=UTC)
# Fixed step timing: early pass is tested on its own below.
SPEC = parse_spec({"analysis": {"interval": "1m", "earlyPassRatio": None}})
PROMOTE = Command(id="c1", kind=CommandKind.PROMOTE, revision="v2", by="ci")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Driver:
    """Feeds the state machine traffic like the simulator would, without randomness."""

    def __init__(
        self,
        spec: CanarySpec = SPEC,
        canary_error: float = 0.005,
        stable_error: float = 0.005,
        rps: float = 100.0,
    ):
        self.spec = spec
        self.status = CanaryStatus()
        self.canary = ArmCounts()
        self.stable = ArmCounts()
        self.canary_error, self.stable_error, self.rps = canary_error, stable_error, rps
        self.t = 0.0
        self.commands: list[Command] = []
        self.stable_revision: str | None = None
        self.drift: str | None = None  # what the daemon reports when routes were changed
        self.template: str | None = None  # the canary pod template's hash, when known
        self.results: list[Result] = []
        self.weights: list[int] = []  # every weight the status asked the routes for

    def traffic(self, seconds: float) -> None:
        total = self.rps * seconds
        c = round(total * self.status.canary_weight / 100)
        s = round(total) - c
        self.canary = self.canary + ArmCounts(c, round(c * self.canary_error))
        self.stable = self.stable + ArmCounts(s, round(s * self.stable_error))
        self.t += seconds

    def observe(self, metrics: bool = True) -> Observed:
        obs = Observation(stable=self.stable, canary=self.canary) if metrics else None
        return Observed(
            metrics=obs,
            metrics_error=None if metrics else "prometheus: connection refused",
            stable_revision=self.stable_revision,
            traffic_drift=self.drift,
            canary_template=self.template,
        )

    def reconcile(self, *, metrics: bool = True) -> Result:
        result = reconcile(self.spec, self.status, self.observe(metrics), self.commands, at(self.t))
        if result.status.canary_weight != self.status.canary_weight:
            self.weights.append(result.status.canary_weight)
        self.status = result.status
        self.results.append(result)
        for action in result.actions:
            if isinstance(action, PromoteStable):
                self.stable_revision = action.revision
        return result

    def command(self, cmd: Command) -> Result:
        self.commands.append(cmd)
        return self.reconcile()

    def run(self, seconds: float, *, metrics: bool = True) -> None:
        end = self.t + seconds
        while self.t < end and not self.status.phase.terminal:
            self.traffic(60)
            self.reconcile(metrics=metrics)

    def reasons(self) -> list[str]:
        return [a.reason for r in self.results for a in r.actions if isinstance(a, Notify)]


def test_promote_starts_the_first_step() -> None:
    d = Driver()
    result = d.command(PROMOTE)
    assert d.status.phase is Phase.PROGRESSING
    assert (d.status.revision, d.status.step_index, d.status.canary_weight) == ("v2", 0, 10)
    assert d.status.step_started_at == T0
    assert d.weights == [10]
    assert not any(isinstance(a, PromoteStable) for a in result.actions)
    assert d.status.acknowledged == ["c1"]
    assert d.status.history[0].weight == 10


def test_healthy_canary_walks_every_step_and_is_promoted() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(600)
    assert (d.status.step_index, d.status.canary_weight) == (1, 50)
    d.run(600)
    assert (d.status.step_index, d.status.canary_weight) == (2, 100)
    d.run(600)
    assert d.status.phase is Phase.PROMOTING  # stable is rolling the new version out
    d.run(60)
    assert d.status.phase is Phase.SUCCEEDED
    assert d.status.canary_weight == 0  # all traffic back on stable, which now runs v2
    assert d.weights == [10, 50, 100, 0]
    assert [h.verdict for h in d.status.history] == ["pass", "pass", "pass"]
    assert d.reasons()[-1] == "Promoted"
    assert wants_scaled_down(d.spec, d.status)  # the Converger scales it down, weights first


def test_bad_canary_rolls_back_weight_zero_first() -> None:
    d = Driver(canary_error=0.05)
    d.command(PROMOTE)
    d.run(600)
    assert d.status.phase is Phase.ROLLED_BACK
    assert d.status.canary_weight == 0
    assert d.weights == [10, 0]
    assert wants_scaled_down(d.spec, d.status)
    assert d.status.history[-1].verdict == "rollback"
    assert d.status.message.startswith("rolled back: errors: canary")
    assert d.t <= 120  # within the first two evaluations of the 10% step


def test_abort_rolls_back_and_is_recorded() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(120)
    result = d.command(Command(id="c2", kind=CommandKind.ABORT, by="alice", reason="pager"))
    assert d.status.phase is Phase.ROLLED_BACK
    assert result.status.canary_weight == 0 and d.weights[-1] == 0
    assert d.status.history[-1].verdict == "aborted"
    assert "aborted by alice: pager" in d.status.message


def test_skip_moves_to_the_next_step() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(60)
    d.command(Command(id="c2", kind=CommandKind.SKIP, by="bob"))
    assert (d.status.step_index, d.status.canary_weight) == (1, 50)
    assert d.status.history[0].verdict == "skipped"


def test_approval_gates_a_step_and_approve_enters_it() -> None:
    spec = parse_spec({"approvals": {"before": [50]}, "analysis": {"earlyPassRatio": None}})
    d = Driver(spec)
    d.command(PROMOTE)
    d.run(600)
    assert d.status.phase is Phase.WAITING_APPROVAL
    assert d.status.canary_weight == 10  # stays at the passed step's weight
    d.run(300)
    assert d.status.phase is Phase.WAITING_APPROVAL
    d.command(Command(id="c2", kind=CommandKind.APPROVE, weight=50, by="carol"))
    assert (d.status.phase, d.status.canary_weight) == (Phase.PROGRESSING, 50)
    assert d.status.approvals[0].by == "carol"


def test_an_approval_given_ahead_of_time_is_remembered() -> None:
    spec = parse_spec({"approvals": {"before": [50]}, "analysis": {"earlyPassRatio": None}})
    d = Driver(spec)
    d.command(PROMOTE)
    d.command(Command(id="c2", kind=CommandKind.APPROVE, weight=50, by="pipeline"))
    d.run(600)
    assert (d.status.phase, d.status.canary_weight) == (Phase.PROGRESSING, 50)


def test_a_regression_while_waiting_for_approval_still_rolls_back() -> None:
    spec = parse_spec({"approvals": {"before": [50]}, "analysis": {"earlyPassRatio": None}})
    d = Driver(spec)
    d.command(PROMOTE)
    d.run(600)
    assert d.status.phase is Phase.WAITING_APPROVAL
    d.canary_error = 0.2
    d.run(300)
    assert d.status.phase is Phase.ROLLED_BACK


def test_approval_timeout_aborts() -> None:
    spec = parse_spec(
        {"approvals": {"before": [50], "timeout": "30m"}, "analysis": {"earlyPassRatio": None}}
    )
    d = Driver(spec)
    d.command(PROMOTE)
    d.run(600 + 1800)
    assert d.status.phase is Phase.ROLLED_BACK
    assert "no approval within 30m" in d.status.message


def test_missing_metrics_hold_then_roll_back_after_hold_for() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(120)
    d.run(120, metrics=False)
    assert d.status.phase is Phase.HOLDING
    assert d.status.last_verdict is not None
    assert d.status.last_verdict.reasons == ["no metrics: prometheus: connection refused"]
    assert d.status.canary_weight == 10
    d.run(120, metrics=False)
    assert d.status.phase is Phase.HOLDING  # 4m since the last data at 2m
    d.run(60, metrics=False)
    assert d.status.phase is Phase.ROLLED_BACK
    assert "no data for 5m" in d.status.message


def test_missing_metrics_then_data_returns_resumes() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(120)
    d.run(120, metrics=False)
    assert d.status.phase is Phase.HOLDING
    d.run(60)
    assert d.status.phase is Phase.PROGRESSING
    assert "Resumed" in d.reasons()


def test_no_data_pause_waits_for_approval_and_resumes_the_same_step() -> None:
    spec = parse_spec({"analysis": {"noData": {"holdFor": "2m", "then": "pause"}}})
    d = Driver(spec)
    d.command(PROMOTE)
    d.run(120)
    d.run(180, metrics=False)
    assert d.status.phase is Phase.WAITING_APPROVAL
    assert d.status.canary_weight == 10
    started = d.status.step_started_at
    d.command(Command(id="c2", kind=CommandKind.APPROVE, by="dave"))
    assert (d.status.phase, d.status.step_index) == (Phase.PROGRESSING, 0)
    assert d.status.step_started_at == started


def test_low_traffic_holds_rather_than_passing_or_rolling_back() -> None:
    d = Driver(rps=2)
    d.command(PROMOTE)
    d.run(660)
    assert d.status.phase is Phase.HOLDING
    assert d.status.last_verdict is not None
    assert d.status.last_verdict.reasons[0].startswith("insufficient data")
    d.run(600)
    assert d.status.step_index == 1  # enough canary requests arrived: the step passed


def test_weights_only_promotion_leaves_traffic_on_the_canary() -> None:
    spec = parse_spec({"promotion": {"mode": "weights-only"}, "analysis": {"earlyPassRatio": None}})
    d = Driver(spec)
    d.command(PROMOTE)
    d.run(1800)
    assert d.status.phase is Phase.SUCCEEDED
    assert d.status.canary_weight == 100
    assert not any(isinstance(a, PromoteStable) for r in d.results for a in r.actions)


def test_early_pass_moves_a_clearly_healthy_canary_on_after_the_minimum() -> None:
    d = Driver(parse_spec({}), rps=2000)
    d.command(PROMOTE)
    d.run(60)
    assert d.status.step_index == 0  # never before minStepDuration (2m)
    d.run(60)
    assert d.status.step_index == 1
    assert d.status.history[0].reasons[0].startswith("step passed early after 2m")


class StuckStable(Driver):
    """A cluster whose stable Deployment never finishes rolling out."""

    def reconcile(self, *, metrics: bool = True) -> Result:
        result = super().reconcile(metrics=metrics)
        self.stable_revision = None
        return result


def test_promotion_that_never_completes_fails() -> None:
    d = StuckStable()
    d.command(PROMOTE)
    d.run(1800)
    assert d.status.phase is Phase.PROMOTING
    d.run(60 * 9)
    assert d.status.phase is Phase.PROMOTING
    d.run(60)
    assert d.status.phase is Phase.FAILED
    assert "did not roll out revision v2 within 10m" in d.status.message
    assert d.status.canary_weight == 100  # the verified canary keeps serving


def test_a_new_revision_supersedes_the_running_one() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(600)
    assert d.status.step_index == 1
    d.command(Command(id="c2", kind=CommandKind.PROMOTE, revision="v3"))
    assert (d.status.revision, d.status.step_index, d.status.canary_weight) == ("v3", 0, 10)
    assert "Superseded" in d.reasons()
    assert d.status.evidence == {}


def test_same_revision_promote_is_a_no_op() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(300)
    before = d.status
    result = d.command(Command(id="c2", kind=CommandKind.PROMOTE, revision="v2"))
    assert result.actions == ()
    assert d.status.model_copy(update={"acknowledged": before.acknowledged}) == before


def test_a_counter_reset_restarts_the_window_instead_of_misjudging() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(300)
    d.canary = ArmCounts(5, 0)  # the canary pods restarted
    d.t += 60
    d.reconcile()
    assert d.status.phase is Phase.PROGRESSING
    assert "counters reset" in d.status.message
    assert d.status.step_started_at == at(d.t)


def test_a_shared_incident_restarts_the_window_but_keeps_its_evidence() -> None:
    spec = parse_spec({"analysis": {"errorRate": {"maxPct": 5}, "earlyPassRatio": None}})
    d = Driver(spec)
    d.command(PROMOTE)
    d.run(180)
    before = dict(d.status.step_evidence)
    assert "errors" in before
    d.canary_error = d.stable_error = 0.2  # both arms fail together
    d.run(60)
    assert d.status.phase is Phase.HOLDING
    assert "shared incident" in d.status.message
    assert d.status.step_started_at == at(d.t)  # the window restarted
    # the comparison's evidence is carried; the shared limit's (the incident's) is not
    assert d.status.window_carry["errors"] == pytest.approx(d.status.step_evidence["errors"])
    assert "errors.limit" not in d.status.window_carry
    d.canary_error = d.stable_error = 0.005
    d.run(120)
    assert d.status.phase is Phase.PROGRESSING
    assert "errors" in d.status.window_carry


def test_no_step_advances_without_data_from_that_step() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(600)
    assert d.status.step_index == 1
    # same instant, same counters: nothing to judge the new step on
    again = d.reconcile()
    assert again.actions == ()
    assert d.status.step_index == 1


# -- properties ------------------------------------------------------------------------------

commands = st.sampled_from(["promote", "promote2", "abort", "approve", "skip", "none"])


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[str, float, float, bool]]:
    """Random runs: a command, the canary's error rate, seconds of traffic, metrics up?"""
    return draw(
        st.lists(
            st.tuples(
                commands,
                st.sampled_from([0.0, 0.005, 0.01, 0.05, 0.3]),
                st.sampled_from([0.0, 30.0, 60.0, 600.0]),
                st.booleans(),
            ),
            min_size=1,
            max_size=25,
        )
    )


SPECS = [
    SPEC,
    parse_spec({"approvals": {"before": [50, 100]}}),
    parse_spec({"steps": [5, 25, 100], "analysis": {"noData": {"then": "pause", "holdFor": "1m"}}}),
    parse_spec({"steps": [100], "promotion": {"mode": "weights-only"}}),
]


def _play(spec: CanarySpec, script: Sequence[tuple[str, float, float, bool]]) -> Driver:
    d = Driver(spec)
    for i, (name, error, seconds, metrics) in enumerate(script):
        d.canary_error = error
        if name != "none":
            kind = {"promote2": "promote"}.get(name, name)
            revision = "v3" if name == "promote2" else "v2"
            d.commands.append(Command(id=f"c{i}", kind=CommandKind(kind), revision=revision))
        d.traffic(seconds)
        d.reconcile(metrics=metrics)
    return d


@settings(max_examples=150, deadline=None, derandomize=True)
@given(spec_index=st.integers(0, len(SPECS) - 1), script=scripts())
def test_weights_always_sum_to_100_and_rollback_sets_zero_first(
    spec_index: int, script: list[tuple[str, float, float, bool]]
) -> None:
    spec = SPECS[spec_index]
    d = _play(spec, script)
    for result in d.results:
        status = result.status
        assert 0 <= status.canary_weight <= 100
        assert status.canary_weight + status.stable_weight == 100
        rolled_back = any(
            isinstance(a, Notify) and a.reason == "RolledBack" for a in result.actions
        )
        if rolled_back:
            assert status.canary_weight == 0  # in the very status that says RolledBack
            assert status.phase is Phase.ROLLED_BACK and wants_scaled_down(spec, status)
        if status.phase in (Phase.PROGRESSING, Phase.HOLDING):
            assert status.canary_weight == spec.steps[status.step_index]


@settings(max_examples=100, deadline=None, derandomize=True)
@given(spec_index=st.integers(0, len(SPECS) - 1), script=scripts())
def test_reconcile_is_idempotent(
    spec_index: int, script: list[tuple[str, float, float, bool]]
) -> None:
    """Re-running a reconcile with the same inputs changes nothing (design §4)."""
    spec = SPECS[spec_index]
    d = _play(spec, script)
    once = d.status
    again = reconcile(spec, once, d.observe(), d.commands, at(d.t))
    twice = reconcile(spec, again.status, d.observe(), d.commands, at(d.t))
    assert twice.status == again.status
    assert twice.status.canary_weight == again.status.canary_weight
    assert not any(isinstance(a, Notify) for a in twice.actions)  # nothing said twice


@settings(max_examples=100, deadline=None, derandomize=True)
@given(script=scripts())
def test_steps_only_advance_on_a_verdict_or_command(
    script: list[tuple[str, float, float, bool]],
) -> None:
    d = _play(SPEC, script)
    if d.status.last_verdict is not None:
        assert isinstance(d.status.last_verdict.decision, VerdictDecision)
    for record in d.status.history:
        assert record.verdict is None or isinstance(record.verdict, StepOutcome)
        if record.ended_at is not None:
            assert record.verdict in {
                "pass", "skipped", "rollback", "aborted", "no-data", "approval-timeout"
            }  # fmt: skip
            assert record.reasons


def test_promoting_the_revision_that_already_succeeded_is_a_no_op() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(1800 + 60)
    assert d.status.phase is Phase.SUCCEEDED
    again = d.command(Command(id="c2", kind=CommandKind.PROMOTE, revision="v2"))
    assert again.actions == ()
    assert d.status.phase is Phase.SUCCEEDED
    assert "c2" in d.status.acknowledged
    fresh = d.command(Command(id="c3", kind=CommandKind.PROMOTE, revision="v3"))
    assert d.status.phase is Phase.PROGRESSING
    assert d.status.canary_weight == 10 and d.weights[-1] == 10
    assert any(isinstance(a, Notify) and a.reason == "StepStarted" for a in fresh.actions)


def test_steps_shrinking_under_a_running_rollout_roll_back_instead_of_crashing() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(1200)
    assert d.status.step_index == 2
    d.spec = parse_spec({"steps": [25, 100], "analysis": {"earlyPassRatio": None}})
    d.run(60)
    assert d.status.phase is Phase.ROLLED_BACK
    assert "spec.steps changed to [25, 100]" in d.status.message
    assert d.status.canary_weight == 0 and d.weights[-1] == 0


def _arm(requests: int, errors: int, buckets: Sequence[int]) -> ArmCounts:
    return ArmCounts(requests, errors, tuple(buckets))


_COUNTS = st.integers(min_value=0, max_value=10**7)
_ARMS = st.builds(_arm, _COUNTS, _COUNTS, st.lists(_COUNTS, min_size=N_BUCKETS, max_size=N_BUCKETS))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(stable=_ARMS, canary=_ARMS)
def test_counters_that_disagree_or_go_back_never_crash_the_judge(
    stable: ArmCounts, canary: ArmCounts
) -> None:
    """Series read a moment apart (more errors than requests, a bucket above the
    requests or above the next bucket) or reset on their own (one bucket's counter
    back to zero) reach the state machine; it restarts the window or judges, never
    raises (``event counts must be non-negative`` crashed every reconcile)."""
    spec = parse_spec(
        {"analysis": {"interval": "1m", "earlyPassRatio": None, "latency": [{"percentile": 99}]}}
    )
    d = Driver(spec)
    d.command(PROMOTE)
    base_s, base_c = d.stable, d.canary
    d.stable = _arm(base_s.requests + 500, base_s.errors, [base_s.requests + 500] * N_BUCKETS)
    d.canary = _arm(base_c.requests + 100, base_c.errors, [base_c.requests + 100] * N_BUCKETS)
    d.t += 60
    d.reconcile()  # a window with buckets starts
    for _ in range(2):
        d.stable, d.canary = d.stable + stable, d.canary + canary
        d.t += 60
        d.reconcile()
    d.stable, d.canary = stable, canary  # and everything reset at once
    d.t += 60
    d.reconcile()
    assert d.status.phase in set(Phase)


def test_counts_are_mended_as_prometheus_mends_histograms() -> None:
    arm = ArmCounts(100, 130, (10, 5, 200) + (90,) * (N_BUCKETS - 3))
    fixed = arm.coherent()
    assert fixed.errors == 100
    assert list(fixed.latency_buckets) == sorted(fixed.latency_buckets)
    assert max(fixed.latency_buckets) == fixed.latency_buckets[-1] == 100
    assert not arm.went_back and ArmCounts(5, 0, (-1,) * N_BUCKETS).went_back
    fine = ArmCounts(100, 3, (50,) * (N_BUCKETS - 1) + (100,))
    assert fine.coherent() is fine


def test_traffic_drift_holds_the_step_unjudged_and_restarts_its_window_when_cleared() -> None:
    d = Driver()
    d.command(PROMOTE)
    d.run(300)
    d.drift = "routes read 40% canary, not the 10% canaryd set"
    d.run(1200)  # twice the step's duration: would have passed the step without the drift
    assert (d.status.phase, d.status.step_index, d.status.canary_weight) == (
        Phase.HOLDING,
        0,
        10,
    )
    assert d.status.last_verdict is not None
    assert d.status.last_verdict.decision == "traffic-drift"
    assert "40% canary" in d.status.message
    holds = [
        a
        for r in d.results
        for a in r.actions
        if isinstance(a, Notify) and a.reason == "Holding" and "traffic drift" in a.message
    ]
    assert len(holds) == 1  # said once, not every round
    assert d.weights == [10]  # the state machine never fights the edit

    d.drift = None
    d.traffic(60)
    d.reconcile()
    assert d.status.phase is Phase.PROGRESSING
    assert d.status.step_started_at == at(d.t)  # the window starts again at the right weight
    assert "window restarts" in d.status.message
    d.run(540)
    assert d.status.step_index == 0  # a full step's duration is needed after the drift
    d.run(120)
    assert (d.status.step_index, d.status.canary_weight) == (1, 50)


def test_a_template_changed_mid_rollout_restarts_it_and_only_the_analysed_one_is_promoted() -> None:
    d = Driver()
    d.template = "aaaa"
    d.command(PROMOTE)
    assert d.status.template_hash == "aaaa"
    d.run(600)
    assert (d.status.step_index, d.status.canary_weight) == (1, 50)
    d.template = "bbbb"  # someone pushed a new image to the canary Deployment
    d.traffic(60)
    result = d.reconcile()
    assert (d.status.phase, d.status.step_index, d.status.canary_weight) == (
        Phase.PROGRESSING,
        0,
        10,
    )
    assert d.status.template_hash == "bbbb"
    assert d.status.revision == "v2"
    assert [h.weight for h in d.status.history] == [10]  # the new template's own steps
    restarted = [a for a in result.actions if isinstance(a, Notify)]
    assert restarted[0].reason == "RolloutRestarted" and restarted[0].warning
    assert "aaaa → bbbb" in restarted[0].message and "first step" in restarted[0].message
    assert d.weights == [10, 50, 10]
    d.run(1800)
    promoted = [a for r in d.results for a in r.actions if isinstance(a, PromoteStable)]
    assert promoted and all(a.template_hash == "bbbb" for a in promoted)


def test_an_unknown_template_neither_restarts_nor_blocks_a_rollout() -> None:
    d = Driver()
    d.command(PROMOTE)  # the workload could not be read: no hash recorded
    assert d.status.template_hash is None
    d.run(300)
    d.template = "cccc"  # readable again: adopted, not taken for a change
    d.run(300)
    assert d.status.template_hash == "cccc"
    assert (d.status.step_index, d.status.canary_weight) == (1, 50)
    assert not any(
        a.reason == "RolloutRestarted"
        for r in d.results
        for a in r.actions
        if isinstance(a, Notify)
    )


def test_a_status_with_an_unknown_decision_or_outcome_is_refused() -> None:
    import pydantic

    good = {"decision": "pass", "at": T0.isoformat()}
    assert CanaryStatus.model_validate({"lastVerdict": good}).last_verdict is not None
    with pytest.raises(pydantic.ValidationError):
        CanaryStatus.model_validate({"lastVerdict": {**good, "decision": "maybe"}})
    step = {"index": 0, "weight": 10, "startedAt": T0.isoformat(), "verdict": "meh"}
    with pytest.raises(pydantic.ValidationError):
        CanaryStatus.model_validate({"history": [step]})
