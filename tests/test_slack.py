"""Slack: one message per rollout, thread replies, retries, webhook-only mode, and
signed Approve / Abort clicks — over real HTTP against :mod:`tests.slackdouble`."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from structlog.testing import capture_logs

from canaryd.events import EventReason, RolloutEvent
from canaryd.kube import CanaryObject, to_canary
from canaryd.metrics import REGISTRY
from canaryd.ports import CanaryRef, ConflictError
from canaryd.rollout import Command, CommandKind
from canaryd.slack import (
    ABORT_ACTION,
    APPROVE_ACTION,
    SlackInteractions,
    SlackSettings,
    SlackSink,
    approval_blocks,
    slack_approvers,
    slack_channel,
    summary_blocks,
    thread_text,
)
from canaryd.status import (
    ApprovalRecord,
    CanaryStatus,
    CheckRecord,
    Phase,
    VerdictDecision,
    VerdictRecord,
)
from tests.conftest import NS, canary
from tests.slackdouble import Call, SlackDouble, interaction_body, sign

TOKEN = "xoxb-test-token"
SECRET = "signing-secret-0123456789"
DASHBOARD = "https://canaryd.example.com"
T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
NOW_S = T0.timestamp() + 5  # the interactions' clock: 12:00:05 UTC
REF = CanaryRef(NS, "checkout")


def verdict(decision: str = "pass", status: str = "ok", e: float = 1.3) -> VerdictRecord:
    return VerdictRecord(
        decision=VerdictDecision(decision),
        at=T0,
        reasons=[f"errors: e-value {e} against 250"],
        checks=[
            CheckRecord(
                name="errors", status=status, e_value=e, threshold=250.0, reason="error rate",
                stats={"canary_rate": 0.042, "stable_rate": 0.005},
            )
        ],
    )  # fmt: skip


def event(reason: EventReason, n: int, **kw: Any) -> RolloutEvent:
    fields: dict[str, Any] = {
        "phase": Phase.PROGRESSING, "weight_pct": 10, "step": 1, "revision": "v2",
        "verdict": verdict(),
    } | kw  # fmt: skip
    return RolloutEvent(
        id=f"e{n}", at=T0, namespace=NS, name="checkout", reason=reason,
        message=f"event {n}: {reason}", steps=[10, 50, 100], **fields,
    )  # fmt: skip


def waiting_event(n: int = 3) -> RolloutEvent:
    return event(EventReason.WAITING_APPROVAL, n, phase=Phase.WAITING_APPROVAL, approval_pct=50)


def canary_object(
    status: CanaryStatus | None = None,
    *,
    approvers: list[str] | None = None,
    channel: str | None = "#deploys",
    approvals_channel: str | None = None,
) -> CanaryObject:
    """A Canary as the hub holds it (the same manifest as the other tests' clusters)."""
    obj = copy.deepcopy(canary("checkout"))
    spec = obj["spec"]
    spec["approvals"] = {"before": [50], "approvers": approvers or []}
    if approvals_channel:
        spec["approvals"]["slack"] = {"channel": approvals_channel}
    if channel:
        spec["notifications"] = {"slack": {"channel": channel}}
    obj["metadata"] |= {"resourceVersion": "1", "uid": "uid-checkout"}
    obj["status"] = (status or CanaryStatus()).to_json()
    result = to_canary(obj)
    assert result.spec is not None, result.spec_error
    return result


def waiting_status() -> CanaryStatus:
    return CanaryStatus(
        phase=Phase.WAITING_APPROVAL, revision="v2", step_index=0, canary_weight=10,
        pending_step_index=1, phase_since=T0, last_verdict=verdict(),
    )  # fmt: skip


def sent(sink: str, result: str) -> float:
    value = REGISTRY.get_sample_value("canaryd_events_sent_total", {"sink": sink, "result": result})
    return value or 0.0


@pytest.fixture
def slack() -> Iterator[SlackDouble]:
    with SlackDouble(token=TOKEN, groups={"SDEPLOYERS": ["UGROUPIE"]}) as double:
        yield double


class FastSleep:
    """The sink's sleep: records the pauses asked for, waits next to nothing."""

    def __init__(self) -> None:
        self.pauses_s: list[float] = []

    async def __call__(self, pause_s: float) -> None:
        self.pauses_s.append(pause_s)
        await asyncio.sleep(0.001)


def settings(slack: SlackDouble, **kw: Any) -> SlackSettings:
    base: dict[str, Any] = {
        "token": TOKEN, "signing_secret": SECRET, "api_url": slack.api_url,
        "dashboard_url": DASHBOARD, "min_interval_s": 0.0, "timeout_s": 5.0,
    } | kw  # fmt: skip
    return SlackSettings(**base)


async def deliver(sink: SlackSink, until: Callable[[], bool], timeout_s: float = 10.0) -> None:
    task = asyncio.create_task(sink.run(), name="sink:slack")
    try:
        deadline = time.monotonic() + timeout_s
        while not until():
            assert time.monotonic() < deadline, "timed out waiting for Slack calls"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def texts(blocks: list[dict[str, Any]]) -> str:
    return json.dumps(blocks)


def buttons(blocks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        e["action_id"]: e for b in blocks if b["type"] == "actions" for e in b.get("elements", [])
    }


# -- pure rendering ----------------------------------------------------------------------


def test_summary_blocks_say_service_revision_weight_step_verdict_and_link() -> None:
    blocks = summary_blocks(event(EventReason.STEP_STARTED, 1), DASHBOARD, service="checkout")
    text = texts(blocks)
    for part in ("*checkout*", "shop/checkout", "`v2`", "10% canary / 90% stable", "1/3"):
        assert part in text, part
    assert "last verdict: pass" in text and "errors e=1.3/250" in text
    assert f"{DASHBOARD}/canaries/shop/checkout" in text
    assert not buttons(blocks)
    assert "dashboard" not in texts(summary_blocks(event(EventReason.STEP_STARTED, 1), None))


def test_approval_blocks_carry_the_step_the_numbers_and_both_buttons() -> None:
    blocks = approval_blocks(waiting_event(), DASHBOARD, service="checkout")
    text = texts(blocks)
    assert "*50%*" in text and "`v2`" in text and "checkout" in text
    assert "canary_rate=0.042" in text and "e=1.3/250" in text
    assert f"{DASHBOARD}/canaries/shop/checkout" in text
    found = buttons(blocks)
    assert set(found) == {APPROVE_ACTION, ABORT_ACTION}
    value = '{"ns":"shop","name":"checkout","revision":"v2","weight":50}'
    assert found[APPROVE_ACTION]["value"] == value == found[ABORT_ACTION]["value"]
    assert not buttons(approval_blocks(waiting_event(), None, buttons=False))


def test_thread_text_names_the_check_that_fired_and_its_numbers() -> None:
    rolled = event(
        EventReason.ROLLED_BACK, 9, phase=Phase.ROLLED_BACK, weight_pct=0,
        verdict=verdict("rollback", "breach", 312.0),
    )  # fmt: skip
    text = thread_text(rolled)
    assert "rolled back" in text
    assert "errors breach: e=312/250, canary_rate=0.042, stable_rate=0.005" in text
    holding = event(EventReason.HOLDING, 4, phase=Phase.HOLDING, verdict=verdict("hold"))
    assert "holding" in thread_text(holding) and "e-value 1.3" in thread_text(holding)
    assert "50%" in thread_text(waiting_event())


def test_the_channel_comes_from_notifications_then_approvals_then_the_daemon() -> None:
    both = canary_object(channel="#rollouts", approvals_channel="#approvals").spec
    assert slack_channel(both, "#default") == "#rollouts"
    only_approvals = canary_object(channel=None, approvals_channel="#approvals").spec
    assert slack_channel(only_approvals, "#default") == "#approvals"
    assert slack_channel(canary_object(channel=None).spec, "#default") == "#default"
    assert slack_channel(canary_object(channel=None).spec) is None
    assert slack_approvers(canary_object(approvers=["UALICE", "SDEPLOYERS"]).spec) == [
        "UALICE",
        "SDEPLOYERS",
    ]


# -- the sink ----------------------------------------------------------------------------


def test_one_message_per_rollout_updated_in_place_with_thread_replies(
    slack: SlackDouble,
) -> None:
    obj = canary_object()
    sink = SlackSink(settings(slack), lambda ref: obj, sleep=FastSleep())
    story = [
        event(EventReason.ROLLOUT_STARTED, 1),
        event(EventReason.STEP_STARTED, 2),
        event(EventReason.STEP_PASSED, 3),
        waiting_event(4),
        event(EventReason.APPROVED, 5, weight_pct=50, step=2, by="slack:alice (U1)"),
        event(EventReason.PROMOTED, 6, phase=Phase.SUCCEEDED, weight_pct=0),
        # a new rollout (even of the same revision) starts a new message
        event(EventReason.ROLLOUT_STARTED, 7),
    ]
    for item in story:
        sink.offer(item)
    # 1 post + 5 updates + 3 thread replies (passed, approval, promoted) + 1 post
    asyncio.run(deliver(sink, lambda: len(slack.calls()) >= 10))

    *calls, again = slack.calls()
    assert again.method == "chat.postMessage" and "thread_ts" not in again.args
    assert all(c.auth == f"Bearer {TOKEN}" for c in calls)
    first, *rest = calls
    assert first.method == "chat.postMessage" and "thread_ts" not in first.args
    assert first.args["channel"] == "#deploys"
    assert "*checkout*" in texts(first.args["blocks"]) and "`v2`" in texts(first.args["blocks"])
    ts = "1700000000.000100"
    assert [(c.method, c.args.get("ts") or c.args.get("thread_ts")) for c in rest] == [
        ("chat.update", ts),
        ("chat.update", ts),
        ("chat.postMessage", ts),  # StepPassed
        ("chat.update", ts),
        ("chat.postMessage", ts),  # the approval message
        ("chat.update", ts),  # Approved: the summary only
        ("chat.update", ts),
        ("chat.postMessage", ts),  # Promoted
    ]
    assert all(c.args["channel"] == "CDEPLOYS" for c in rest)  # the ID Slack answered
    updates = [c for c in rest if c.method == "chat.update"]
    assert "Succeeded" in texts(updates[-1].args["blocks"])
    replies = [c for c in rest if c.method == "chat.postMessage"]
    assert "step passed" in replies[0].args["text"]
    approval = replies[1].args
    assert approval["reply_broadcast"] is True
    value = buttons(approval["blocks"])[APPROVE_ACTION]["value"]
    assert json.loads(value) == {"ns": NS, "name": "checkout", "revision": "v2", "weight": 50}
    assert "promoted" in replies[2].args["text"]


def test_no_channel_skips_the_event_and_counts_it(slack: SlackDouble) -> None:
    obj = canary_object(channel=None)
    sink = SlackSink(settings(slack), lambda ref: obj)
    sink.offer(event(EventReason.ROLLOUT_STARTED, 1))
    assert sink.skipped == 1 and len(sink.outbox) == 0
    with_default = SlackSink(settings(slack, channel="#default"), lambda ref: obj)
    with_default.offer(event(EventReason.ROLLOUT_STARTED, 1))
    assert with_default.skipped == 0 and len(with_default.outbox) == 1


def test_429_and_500_are_retried_in_order_while_offer_stays_instant(slack: SlackDouble) -> None:
    obj = canary_object()
    sink = SlackSink(settings(slack), lambda ref: obj, sleep=FastSleep())
    heads: list[tuple[float, str | None]] = []  # each pause, and what is first in line

    async def sleep(pause_s: float) -> None:
        head = sink.outbox.peek()
        heads.append((pause_s, head.event.id if head is not None else None))
        await asyncio.sleep(0.05 if pause_s >= 1 else 0.001)  # the outage lasts a while

    sink.sleep = sleep
    slack.fail("chat.postMessage", 429, times=1)
    slack.fail("chat.update", 500, times=2)
    story = [event(EventReason.ROLLOUT_STARTED, 0)] + [
        event(EventReason.STEP_STARTED, n, weight_pct=n) for n in range(1, 40)
    ]
    failed_before = sent("slack", "failed")

    async def scenario() -> list[float]:
        task = asyncio.create_task(sink.run())
        sink.offer(story[0])
        offers_s = []
        try:
            deadline = time.monotonic() + 10
            while not slack.calls():  # Slack is rate-limiting the sink now
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.001)
            for item in story[1:]:
                started = time.perf_counter()
                sink.offer(item)
                offers_s.append(time.perf_counter() - started)
            while len(slack.calls(ok_only=True)) < len(story):
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return offers_s

    offers_s = asyncio.run(scenario())
    assert max(offers_s) < 0.001, offers_s
    assert [c.status for c in slack.calls() if c.status != 200] == [429, 500, 500]
    assert heads[0] == (1.0, "e0")  # Retry-After honoured, the event back first in line
    assert [head for _, head in heads] == ["e0", "e1", "e1"]
    ok = slack.calls(ok_only=True)
    assert [c.method for c in ok] == ["chat.postMessage"] + ["chat.update"] * 39
    assert all(f"{n}% canary" in texts(c.args["blocks"]) for n, c in enumerate(ok[1:], start=1))
    assert sent("slack", "failed") == failed_before


def test_a_deleted_summary_message_is_started_anew(slack: SlackDouble) -> None:
    obj = canary_object()
    sink = SlackSink(settings(slack), lambda ref: obj, sleep=FastSleep())
    sink.offer(event(EventReason.ROLLOUT_STARTED, 1))
    sink.offer(event(EventReason.STEP_STARTED, 2))
    asyncio.run(deliver(sink, lambda: len(slack.calls()) >= 2))
    slack.delete("1700000000.000100")
    sink2_calls = len(slack.calls())
    sink.outbox = type(sink.outbox)("slack")  # a fresh loop's queue, same memory
    sink.offer(event(EventReason.STEP_PASSED, 3))
    asyncio.run(deliver(sink, lambda: len(slack.calls()) >= sink2_calls + 3))
    later = [(c.method, c.args.get("thread_ts")) for c in slack.calls()[sink2_calls:]]
    assert later == [
        ("chat.update", None),  # message_not_found
        ("chat.postMessage", None),  # a new summary
        ("chat.postMessage", "1700000000.000200"),  # the reply, in the new thread
    ]


def test_a_lasting_outage_gives_up_after_five_attempts_and_a_refusal_at_once(
    slack: SlackDouble,
) -> None:
    obj = canary_object()
    sink = SlackSink(settings(slack), lambda ref: obj, sleep=FastSleep())
    slack.fail("chat.postMessage", 500, times=5)
    failed_before = sent("slack", "failed")
    sink.offer(event(EventReason.ROLLOUT_STARTED, 1))
    sink.offer(event(EventReason.ROLLOUT_STARTED, 2))
    asyncio.run(deliver(sink, lambda: len(slack.calls(ok_only=True)) >= 1))
    assert [c.status for c in slack.calls()] == [500] * 5 + [200]
    assert sent("slack", "failed") == failed_before + 1

    missing = canary_object(channel="#missing")
    refusing = SlackSink(settings(slack), lambda ref: missing, sleep=FastSleep())
    refusing.offer(event(EventReason.ROLLOUT_STARTED, 3))
    asyncio.run(deliver(refusing, lambda: sent("slack", "failed") >= failed_before + 2))
    assert len([c for c in slack.calls() if c.args.get("channel") == "#missing"]) == 1


def test_at_most_one_call_per_interval_per_channel(slack: SlackDouble) -> None:
    obj = canary_object()
    clock = [100.0]

    async def sleep(pause_s: float) -> None:
        pauses_s.append(pause_s)
        clock[0] += pause_s

    pauses_s: list[float] = []
    sink = SlackSink(
        settings(slack, min_interval_s=1.0), lambda ref: obj, sleep=sleep,
        monotonic=lambda: clock[0],
    )  # fmt: skip
    for n in range(4):
        sink.offer(event(EventReason.STEP_STARTED, n))
    asyncio.run(deliver(sink, lambda: len(slack.calls()) >= 4))
    assert pauses_s == [1.0, 1.0, 1.0]


def test_webhook_only_posts_plain_messages_without_buttons(slack: SlackDouble) -> None:
    obj = canary_object(channel=None)
    only_hook = SlackSettings(webhook_url=slack.webhook_url, min_interval_s=0.0)
    sink = SlackSink(only_hook, lambda ref: obj, sleep=FastSleep())
    sink.offer(event(EventReason.ROLLOUT_STARTED, 1))
    sink.offer(event(EventReason.STEP_STARTED, 2))  # no edits possible: not sent
    sink.offer(waiting_event(3))
    asyncio.run(deliver(sink, lambda: len(slack.calls("webhook")) >= 2))
    calls = slack.calls()
    assert [c.method for c in calls] == ["webhook", "webhook"]
    approval = calls[1].args
    assert "canaryd approve checkout -n shop --step 50" in approval["text"]
    assert not buttons(approval["blocks"])
    assert calls[1].auth == ""


# -- button clicks -----------------------------------------------------------------------


class Recorder:
    """The submit port: the commands a click wrote."""

    def __init__(self, error: Exception | None = None) -> None:
        self.commands: list[tuple[CanaryRef, Command]] = []
        self.error = error

    async def __call__(self, ref: CanaryRef, command: Command) -> None:
        if self.error is not None:
            raise self.error
        self.commands.append((ref, command))


def click(
    action: str = APPROVE_ACTION,
    *,
    user: str = "U1",
    trigger: str = "trig-1",
    weight: int = 50,
    revision: str = "v2",
    response_url: str = "https://hooks.slack.com/actions/T1/1/x",
) -> bytes:
    value = json.dumps(
        {"ns": NS, "name": "checkout", "revision": revision, "weight": weight},
        separators=(",", ":"),
    )
    blocks = approval_blocks(waiting_event(), DASHBOARD)
    return interaction_body(
        action, value, user, f"name-{user}", "CDEPLOYS", "1700000000.000200", trigger,
        blocks=blocks, response_url=response_url,
    )  # fmt: skip


def handle(
    interactions: SlackInteractions, body: bytes, timestamp: float = NOW_S, secret: str = SECRET
) -> tuple[int, dict[str, Any]]:
    return asyncio.run(interactions.handle(body, sign(body, secret, int(timestamp))))


def interactions_for(
    slack: SlackDouble,
    obj: CanaryObject,
    submit: Recorder,
    **kw: Any,
) -> SlackInteractions:
    return SlackInteractions(settings(slack, **kw), lambda ref: obj, submit, clock=lambda: NOW_S)


def updates(slack: SlackDouble) -> list[Call]:
    return slack.calls("chat.update")


def test_a_signed_approve_click_submits_one_approve_and_says_who_and_when(
    slack: SlackDouble,
) -> None:
    submit = Recorder()
    interactions = interactions_for(slack, canary_object(waiting_status()), submit)
    status, answer = handle(interactions, click())
    assert (status, answer) == (200, {})
    [(ref, command)] = submit.commands
    assert ref == REF and command.kind is CommandKind.APPROVE and command.weight == 50
    assert command.by == "slack:name-U1 (U1)"
    [update] = updates(slack)
    assert update.args["channel"] == "CDEPLOYS" and update.args["ts"] == "1700000000.000200"
    assert update.args["text"] == "Approved by <@U1> at 12:00:05 UTC"
    assert not buttons(update.args["blocks"])
    assert "Approved by <@U1> at 12:00:05 UTC" in texts(update.args["blocks"])
    assert "*50%*" in texts(update.args["blocks"])  # the message itself is kept

    # the same click again (Slack retries, a replayed request): nothing more
    status, answer = handle(interactions, click())
    assert status == 200 and "already handled" in answer["text"]
    assert len(submit.commands) == 1 and len(updates(slack)) == 1


def test_an_abort_click_submits_an_abort(slack: SlackDouble) -> None:
    submit = Recorder()
    interactions = interactions_for(slack, canary_object(waiting_status()), submit)
    assert handle(interactions, click(ABORT_ACTION)) == (200, {})
    [(_, command)] = submit.commands
    assert command.kind is CommandKind.ABORT and command.by == "slack:name-U1 (U1)"
    assert command.reason
    assert updates(slack)[0].args["text"].startswith("Aborted by <@U1> at ")


def test_bad_stale_or_missing_signatures_are_refused(slack: SlackDouble) -> None:
    submit = Recorder()
    interactions = interactions_for(slack, canary_object(waiting_status()), submit)
    assert handle(interactions, click(), secret="not-the-secret")[0] == 401
    assert handle(interactions, click(), timestamp=NOW_S - 6 * 60)[0] == 401
    assert asyncio.run(interactions.handle(click(), {}))[0] == 401
    tampered = sign(click(), SECRET, int(NOW_S))
    assert asyncio.run(interactions.handle(click(weight=100), tampered))[0] == 401
    assert submit.commands == [] and updates(slack) == []
    # lower-case header names (as the API server hands them over) are fine
    lower = {k.lower(): v for k, v in sign(click(), SECRET, int(NOW_S)).items()}
    assert asyncio.run(interactions.handle(click(), lower))[0] == 200
    assert len(submit.commands) == 1


def test_without_a_signing_secret_clicks_are_refused(slack: SlackDouble) -> None:
    submit = Recorder()
    interactions = interactions_for(
        slack, canary_object(waiting_status()), submit, signing_secret=None
    )
    status, answer = handle(interactions, click())
    assert status == 503 and "signing secret" in answer["error"]
    assert submit.commands == []


def test_a_malformed_payload_is_a_400(slack: SlackDouble) -> None:
    interactions = interactions_for(slack, canary_object(waiting_status()), Recorder())
    assert handle(interactions, b"payload=not-json")[0] == 400
    assert handle(interactions, b"nothing=here")[0] == 400


def test_only_approvers_and_members_of_approver_groups_may_click(slack: SlackDouble) -> None:
    submit = Recorder()
    obj = canary_object(waiting_status(), approvers=["UBOSS", "SDEPLOYERS"])
    interactions = interactions_for(slack, obj, submit)
    refused = click(user="UOTHER", trigger="t-1", response_url=slack.response_url)
    status, answer = handle(interactions, refused)
    assert status == 200 and answer["text"] == "you are not an approver of shop/checkout"
    assert submit.commands == [] and updates(slack) == []
    [told] = slack.calls("response")  # the clicker alone sees why
    assert told.args["text"] == answer["text"] and told.args["response_type"] == "ephemeral"
    assert told.args["replace_original"] is False

    assert handle(interactions, click(user="UGROUPIE", trigger="t-2")) == (200, {})
    assert [c.by for _, c in submit.commands] == ["slack:name-UGROUPIE (UGROUPIE)"]
    assert [c.args["usergroup"] for c in slack.calls("usergroups.users.list")] == ["SDEPLOYERS"]
    handle(interactions, click(user="UOTHER", trigger="t-3"))  # the group is cached
    assert len(slack.calls("usergroups.users.list")) == 1
    assert handle(interactions, click(user="UBOSS", trigger="t-4")) == (200, {})
    assert len(submit.commands) == 2


def test_a_late_click_changes_nothing_and_the_message_says_why(slack: SlackDouble) -> None:
    approved = CanaryStatus(
        phase=Phase.PROGRESSING, revision="v2", step_index=1, canary_weight=50,
        approvals=[ApprovalRecord(weight=50, by="cli:bob", at=T0)],
    )  # fmt: skip
    submit = Recorder()
    interactions = interactions_for(slack, canary_object(approved), submit)
    status, answer = handle(interactions, click(trigger="t-1"))
    assert status == 200 and "already approved by cli:bob at 2026-12-06 12:00:00" in answer["text"]
    assert "already approved by cli:bob" in updates(slack)[-1].args["text"]
    assert not buttons(updates(slack)[-1].args["blocks"])

    over = CanaryStatus(phase=Phase.ROLLED_BACK, revision="v2")
    interactions = interactions_for(slack, canary_object(over), submit)
    status, answer = handle(interactions, click(trigger="t-2"))
    assert "no longer waiting: phase RolledBack" in answer["text"]
    assert "no longer waiting: phase RolledBack" in updates(slack)[-1].args["text"]

    newer = waiting_status().model_copy(update={"revision": "v3"})
    interactions = interactions_for(slack, canary_object(newer), submit)
    status, answer = handle(interactions, click(trigger="t-3"))
    assert "revision v2 is over" in answer["text"]
    assert submit.commands == []


def test_a_kubernetes_error_says_it_failed_and_keeps_the_buttons(slack: SlackDouble) -> None:
    submit = Recorder(ConflictError("kept changing", 409))
    interactions = interactions_for(slack, canary_object(waiting_status()), submit)
    status, answer = handle(interactions, click())
    assert status == 200 and "try again" in answer["text"]
    [update] = updates(slack)
    assert "failed" in update.args["text"] and "try again" in update.args["text"]
    assert set(buttons(update.args["blocks"])) == {APPROVE_ACTION, ABORT_ACTION}


def test_the_token_and_secret_are_never_logged_nor_shown(slack: SlackDouble) -> None:
    hook = f"{slack.webhook_url}?secret-part"
    shown = repr(settings(slack, webhook_url=hook))
    assert TOKEN not in shown and SECRET not in shown and "secret-part" not in shown
    obj = canary_object(waiting_status(), approvers=["UBOSS"])
    with capture_logs() as logs:
        slack.fail("chat.postMessage", 500, times=5)
        sink = SlackSink(settings(slack), lambda ref: obj, sleep=FastSleep())
        sink.offer(event(EventReason.ROLLOUT_STARTED, 1))
        asyncio.run(deliver(sink, lambda: len(slack.calls()) >= 5))
        interactions = interactions_for(slack, obj, Recorder())
        handle(interactions, click(user="UOTHER"))
        handle(interactions, click(), secret="wrong")
    assert logs, "expected log lines (retries, give-up, refusal)"
    assert TOKEN not in repr(logs) and SECRET not in repr(logs)
