"""The error-budget policy in the state machine: each tier's effect on a rollout
(design: issue 16's table), driven as tests/test_rollout.py drives it."""

from __future__ import annotations

from dataclasses import replace

from analysis.budget import Tier
from canaryd.kube import command_json, new_command, parse_commands
from canaryd.rollout import BudgetGate, Command, CommandKind, Notify, Observed
from canaryd.status import Phase
from tests.test_rollout import PROMOTE, Driver, at

REASONS = {
    Tier.NORMAL: "availability SLO 99.9%: 99.96% over 30d, error budget 60% remaining",
    Tier.APPROVAL: "availability SLO 99.9%: 99.93% over 30d, error budget 30% remaining",
    Tier.OVERRIDE: "availability SLO 99.9%: 99.91% over 30d, error budget 10% remaining",
    Tier.FROZEN: "availability SLO 99.9%: 99.89% over 30d, error budget -10% remaining",
}


class BudgetDriver(Driver):
    """A Driver whose service's error budget puts releases in ``tier``."""

    def __init__(self, tier: Tier | None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.tier = tier
        self.reason: str | None = None  # instead of the tier's usual figures

    def observe(self, metrics: bool = True) -> Observed:
        reason = self.reason or (REASONS[self.tier] if self.tier else "")
        gate = None if self.tier is None else BudgetGate(self.tier, reason)
        return replace(super().observe(metrics), budget=gate)

    def messages(self) -> list[str]:
        return [a.message for r in self.results for a in r.actions if isinstance(a, Notify)]


def phase(d: Driver) -> Phase:
    """The phase now (a call, so that type checkers do not carry an earlier assert over)."""
    return d.status.phase


def approve(by: str, reason: str = "", n: int = 0) -> Command:
    return Command(id=f"a{by}{n}", kind=CommandKind.APPROVE, by=by, reason=reason)


def test_plenty_of_budget_changes_nothing_but_is_stated() -> None:
    d = BudgetDriver(Tier.NORMAL)
    d.command(PROMOTE)
    d.run(1300)
    assert [h.verdict for h in d.status.history][:2] == ["pass", "pass"]
    assert d.status.canary_weight == 100
    assert d.status.last_verdict is not None
    assert not any("error-budget" in r for r in d.status.last_verdict.reasons)


def test_a_low_budget_needs_an_approval_for_every_step_after_the_first() -> None:
    d = BudgetDriver(Tier.APPROVAL)
    d.command(PROMOTE)
    assert phase(d) is Phase.PROGRESSING and d.status.canary_weight == 10
    d.run(660)
    assert phase(d) is Phase.WAITING_APPROVAL
    assert d.status.canary_weight == 10 and d.status.pending_step_index == 1
    assert d.status.budget_hold is not None and "30% remaining" in d.status.budget_hold
    assert any("50% step: error-budget policy" in r for r in d.messages())
    assert d.status.last_verdict is not None
    assert any("error-budget policy (approval)" in r for r in d.status.last_verdict.reasons)
    d.command(approve("alice"))
    assert phase(d) is Phase.PROGRESSING and d.status.canary_weight == 50
    d.run(660)
    assert phase(d) is Phase.WAITING_APPROVAL and d.status.pending_step_index == 2


def test_a_very_low_budget_needs_an_override_with_who_and_why_to_start() -> None:
    d = BudgetDriver(Tier.OVERRIDE)
    d.command(PROMOTE)
    assert phase(d) is Phase.WAITING_APPROVAL and d.status.canary_weight == 0
    assert d.status.pending_step_index == 0
    assert "override with an approval that gives a reason" in (d.status.budget_hold or "")
    d.command(approve("bob"))  # no reason: not an override
    assert phase(d) is Phase.WAITING_APPROVAL and d.status.canary_weight == 0
    d.command(approve("carol", "hotfix for INC-42, reviewed", 1))
    assert phase(d) is Phase.PROGRESSING and d.status.canary_weight == 10
    override = d.status.approvals[-1]
    assert (override.by, override.reason) == ("carol", "hotfix for INC-42, reviewed")


def test_no_budget_left_starts_only_fixes() -> None:
    d = BudgetDriver(Tier.FROZEN)
    d.command(PROMOTE)
    assert phase(d) is Phase.WAITING_APPROVAL and d.status.canary_weight == 0
    d.command(approve("dave", "please"))  # an approval does not unfreeze
    assert phase(d) is Phase.WAITING_APPROVAL and d.status.canary_weight == 0
    fix = Command(id="fix1", kind=CommandKind.PROMOTE, revision="v3", by="ci", fix=True)
    d.command(fix)
    assert phase(d) is Phase.PROGRESSING and d.status.canary_weight == 10
    assert d.status.fix and d.status.revision == "v3"
    assert any("revision v3 (a fix) started by ci" in r for r in d.messages())
    d.run(660)
    assert d.status.canary_weight == 50  # a fix is not held either


def test_a_frozen_rollout_waits_and_starts_when_the_budget_recovers() -> None:
    d = BudgetDriver(Tier.FROZEN)
    d.command(PROMOTE)
    d.run(300)
    assert phase(d) is Phase.WAITING_APPROVAL and d.status.canary_weight == 0
    d.tier = Tier.NORMAL
    d.run(60)
    assert phase(d) is Phase.PROGRESSING and d.status.canary_weight == 10
    assert d.status.budget_hold is None
    assert any("error-budget policy allows the 10% step now" in r for r in d.messages())


def test_a_running_rollout_holds_at_its_step_when_releases_freeze() -> None:
    d = BudgetDriver(Tier.NORMAL)
    d.command(PROMOTE)
    d.run(300)
    d.tier = Tier.FROZEN
    d.run(600)
    assert phase(d) is Phase.HOLDING and d.status.canary_weight == 10
    assert "the step passed, but error-budget policy" in d.status.message
    assert "-10% remaining" in d.status.message
    d.tier = Tier.NORMAL
    d.run(120)
    assert d.status.canary_weight == 50 and d.status.budget_hold is None


def test_a_canary_burning_the_budget_is_rolled_back_whatever_the_tier() -> None:
    d = BudgetDriver(Tier.FROZEN, canary_error=0.05)
    fix = Command(id="fix1", kind=CommandKind.PROMOTE, revision="v3", by="ci", fix=True)
    d.command(fix)
    d.run(300)
    assert phase(d) is Phase.ROLLED_BACK and d.status.canary_weight == 0
    held = BudgetDriver(Tier.NORMAL, canary_error=0.05)
    held.command(PROMOTE)
    held.tier = Tier.FROZEN
    held.run(300)
    assert phase(held) is Phase.ROLLED_BACK


def test_without_a_policy_nothing_changes() -> None:
    d = BudgetDriver(None)
    d.command(PROMOTE)
    d.run(1300)
    assert d.status.canary_weight == 100 and d.status.budget_hold is None


def test_the_fix_flag_survives_the_annotation() -> None:
    cmd = new_command(CommandKind.PROMOTE, "ci", revision="v3", fix=True, now=at(0))
    assert cmd.fix
    (back,) = parse_commands("[" + __import__("json").dumps(command_json(cmd, at(0))) + "]")
    assert back.fix and back.revision == "v3"
    plain = new_command(CommandKind.PROMOTE, "ci", revision="v4", now=at(0))
    assert "fix" not in command_json(plain, at(0))


def test_a_waiting_rollout_states_the_latest_figures_and_tells_a_new_cause() -> None:
    d = BudgetDriver(Tier.OVERRIDE)
    d.reason = "checkout's error budget is unknown: not read yet"
    d.command(PROMOTE)
    assert "unknown: not read yet" in (d.status.budget_hold or "")
    told = len(d.messages())
    d.tier, d.reason = Tier.FROZEN, "availability SLO 99%: fast burn 1h&5m at 19.8x"
    d.run(5)
    assert phase(d) is Phase.WAITING_APPROVAL and d.status.canary_weight == 0
    assert "fast burn 1h&5m at 19.8x" in (d.status.budget_hold or "")
    assert "fast burn 1h&5m at 19.8x" in d.status.message
    assert len(d.messages()) == told + 1 and "fast burn" in d.messages()[-1]
    d.reason = "availability SLO 99%: fast burn 1h&5m at 17.2x"  # only a figure moved
    d.run(5)
    assert "17.2x" in (d.status.budget_hold or "")
    assert len(d.messages()) == told + 1, d.messages()[told:]
