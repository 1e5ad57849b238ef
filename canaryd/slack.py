"""Slack: one message per rollout, updated in place, and Approve / Abort buttons.

**Messages** (:class:`SlackSink`, a notifier sink).  With a bot token, the first event
of a rollout (namespace, name, revision) posts a summary message — the Canary, its
revision, phase, weight, step k/n and the last verdict — and every later event of that
rollout edits it in place (``chat.update``).  The events people should see happen also
get a reply in the message's thread: StepPassed, Holding, Paused, RolledBack (with the
check that fired and its numbers), Promoted, PromotionFailed, and WaitingApproval,
whose reply (broadcast to the channel) carries the Approve / Abort buttons.

The message timestamps are kept in memory only (the most recent
:data:`MAX_ROLLOUTS` rollouts): after a daemon restart, the next event of a rollout
already under way starts a new summary message rather than editing the old one.

The channel of a Canary is ``spec.notifications.slack.channel``, else
``spec.approvals.slack.channel``, else the daemon's ``--slack-channel``; without one
the Canary's events are skipped (counted in :attr:`SlackSink.skipped`).

With only an incoming webhook (no token), each of those events is posted as one plain
message (no edits, no buttons: webhooks can do neither) to the webhook's own channel;
approvals then go through the dashboard, the CLI or the status API, and the
WaitingApproval message says so.

Delivery is in order, one call at a time, at most one call per ``min_interval_s`` per
channel.  An event leaves the queue only once sent or given up: on 429 it goes back
first in the queue and waits ``Retry-After``; 5xx, connection errors and timeouts are
retried with backoff and given up after :data:`ATTEMPTS` (counted in
``canaryd_events_sent_total{sink="slack",result="failed"}``, one log line); other
refusals (``channel_not_found``, ``not_in_channel``, ``invalid_auth``, …) are given up at
once with a log line naming Slack's error.

**Buttons** (:class:`SlackInteractions`): the logic behind ``POST /slack/interactions``.
A click is accepted only when Slack's signature verifies (``X-Slack-Signature`` over
``v0:<timestamp>:<body>`` with the app's signing secret, timestamp at most five minutes
old), the clicker is an approver (``spec.approvals.approvers``: user IDs, or user-group
IDs resolved with ``usergroups.users.list`` and cached a minute; empty: anyone in the
channel), the click has not been seen before, and the Canary still waits for exactly
that approval (same revision, same step weight).  Then the command is written as the
CLI and the status API write it, and the approval message's buttons are replaced by
who did what and when.

Neither the token nor the signing secret is ever logged.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import structlog
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import Clock, SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from canaryd.events import EventReason, RolloutEvent
from canaryd.kube import CanaryObject, new_command
from canaryd.outbox import EVENTS_SENT, OUTBOX_SIZE, Outbox, backoff_delays
from canaryd.ports import CanaryRef, KubeError
from canaryd.rollout import CommandKind
from canaryd.spec import CanarySpec
from canaryd.status import CheckRecord, Phase, VerdictRecord

if TYPE_CHECKING:  # canaryd.api is the web app: not needed at runtime
    from canaryd.api import Submit

log = structlog.get_logger("canaryd.slack")

SINK_NAME = "slack"
APPROVE_ACTION = "canaryd_approve"
ABORT_ACTION = "canaryd_abort"
APPROVAL_BLOCK_ID = "canaryd_approval"
#: rollouts whose message timestamps are remembered (least recently used dropped)
MAX_ROLLOUTS = 1000
#: attempts at one Slack call on 5xx / connection errors / timeouts before giving up
ATTEMPTS = 5
#: how old a signed request may be (Slack's own rule)
MAX_SIGNATURE_AGE_S = 300
#: how long a user group's members are cached
GROUP_CACHE_S = 60.0
#: clicks remembered to refuse replays
MAX_CLICKS = 10_000
#: the most a click may wait for the command to be written (Slack wants 200 in 3 s)
SUBMIT_TIMEOUT_S = 2.5

#: reasons that get a thread reply (and, with only a webhook, a message)
THREAD_REASONS = frozenset(
    {
        EventReason.STEP_PASSED,
        EventReason.HOLDING,
        EventReason.PAUSED,
        EventReason.ROLLED_BACK,
        EventReason.PROMOTED,
        EventReason.PROMOTION_FAILED,
        EventReason.WAITING_APPROVAL,
    }
)
#: chat.update errors that mean the summary message is gone: a new one is posted
_GONE_ERRORS = frozenset({"message_not_found", "cant_update_message", "edit_window_closed"})
#: Slack errors (``ok: false``) worth retrying; every other one is final
_TRANSIENT_ERRORS = frozenset(
    {"internal_error", "fatal_error", "service_unavailable", "request_timeout", "ratelimited"}
)


@dataclass(frozen=True)
class SlackSettings:
    """The daemon's Slack settings (channels can also come from each Canary's spec).

    Attributes:
        token: bot token (``xoxb-…``): messages, edits, buttons.
        signing_secret: the app's signing secret: verifies button clicks.
        channel: default channel (name or ID) for Canaries that name none.
        webhook_url: incoming webhook, used only without a token (plain messages).
        api_url: Web API base URL (None: Slack's own); tests point it at a double.
        dashboard_url: the status API's dashboard, for links in messages.
        timeout_s: per Slack call.
        min_interval_s: at most one call per channel in this interval.
    """

    token: str | None = field(default=None, repr=False)
    signing_secret: str | None = field(default=None, repr=False)
    channel: str | None = None
    webhook_url: str | None = field(default=None, repr=False)
    api_url: str | None = None
    dashboard_url: str | None = None
    timeout_s: float = 10.0
    min_interval_s: float = 1.0


# -- spec accessors (tolerate specs without the Slack fields) ----------------------------


def slack_channel(spec: CanarySpec | None, default: str | None = None) -> str | None:
    """The Canary's Slack channel: notifications', else approvals', else ``default``."""
    if spec is None:
        return default
    notifications = getattr(getattr(spec, "notifications", None), "slack", None)
    channel = getattr(notifications, "channel", None)
    if channel:
        return str(channel)
    approvals = getattr(getattr(spec, "approvals", None), "slack", None)
    channel = getattr(approvals, "channel", None)
    return str(channel) if channel else default


def slack_approvers(spec: CanarySpec | None) -> list[str]:
    """Slack user and user-group IDs allowed to click Approve/Abort (empty: anyone)."""
    approvals = getattr(spec, "approvals", None)
    return [str(a) for a in getattr(approvals, "approvers", None) or []]


# -- pure rendering ----------------------------------------------------------------------


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def check_line(check: CheckRecord) -> str:
    """One check with its numbers: ``errors breach: e=312/250, canary_rate=0.04 — …``."""
    numbers = []
    if check.e_value is not None:
        threshold = f"/{_num(check.threshold)}" if check.threshold is not None else ""
        numbers.append(f"e={_num(check.e_value)}{threshold}")
    numbers += [f"{k}={_num(v)}" for k, v in sorted(check.stats.items())]
    shown = f": {', '.join(numbers)}" if numbers else ""
    why = f" — {check.reason}" if check.reason else ""
    return f"{check.name} {check.status}{shown}{why}"


def verdict_line(verdict: VerdictRecord | None) -> str:
    """The verdict in one line: decision, first reason, and each check's e-value."""
    if verdict is None:
        return "no verdict yet"
    reason = f" — {verdict.reasons[0]}" if verdict.reasons else ""
    checks = ", ".join(
        f"{c.name} e={_num(c.e_value)}/{_num(c.threshold)}"
        for c in verdict.checks
        if c.e_value is not None
    )
    return f"last verdict: {verdict.decision}{reason}" + (f" ({checks})" if checks else "")


def _fired(verdict: VerdictRecord | None) -> list[CheckRecord]:
    if verdict is None:
        return []
    return [c for c in verdict.checks if c.status not in ("ok", "n/a")]


def dashboard_link(event: RolloutEvent, dashboard_url: str | None) -> str | None:
    """``{dashboard}/canaries/{ns}/{name}``, or None without a dashboard."""
    if not dashboard_url:
        return None
    return f"{dashboard_url.rstrip('/')}/canaries/{event.namespace}/{event.name}"


def _title(event: RolloutEvent, service: str | None) -> str:
    what = f"*{service}* (`{event.key}`)" if service else f"*`{event.key}`*"
    return f"{what} revision `{event.revision or 'none'}`"


def _step(event: RolloutEvent) -> str:
    if event.step is None or not event.steps:
        return "idle"
    plan = " → ".join(f"{w}%" for w in event.steps)
    return f"{event.step}/{len(event.steps)} ({plan})"


def summary_text(event: RolloutEvent, *, service: str | None = None) -> str:
    """The summary in one plain line (notification text, screen readers)."""
    who = service or event.key
    return (
        f"{who} {event.revision or ''}: {event.phase}, canary {event.weight_pct}%, "
        f"step {_step(event)} — {event.message}"
    )


def summary_blocks(
    event: RolloutEvent, dashboard_url: str | None, *, service: str | None = None
) -> list[dict[str, Any]]:
    """Block Kit of the one message per rollout, as of ``event``."""
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": _title(event, service)}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": f"*Phase*\n{event.phase}"},
                {
                    "type": "mrkdwn",
                    "text": f"*Weight*\n{event.weight_pct}% canary / "
                    f"{100 - event.weight_pct}% stable",
                },
                {"type": "mrkdwn", "text": f"*Step*\n{_step(event)}"},
                {"type": "mrkdwn", "text": f"*Revision*\n`{event.revision or 'none'}`"},
            ],
        },
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": f"{event.reason}: {event.message}"},
        },
    ]
    context = [{"type": "mrkdwn", "text": verdict_line(event.verdict)}]
    link = dashboard_link(event, dashboard_url)
    if link:
        context.append({"type": "mrkdwn", "text": f"<{link}|dashboard>"})
    blocks.append({"type": "context", "elements": context})
    return blocks


def button_value(event: RolloutEvent) -> str:
    """The buttons' ``value``: compact JSON naming exactly the approval asked for."""
    data = {
        "ns": event.namespace,
        "name": event.name,
        "revision": event.revision,
        "weight": event.approval_pct,
    }
    return json.dumps(data, separators=(",", ":"))


def approval_blocks(
    event: RolloutEvent,
    dashboard_url: str | None,
    *,
    service: str | None = None,
    buttons: bool = True,
) -> list[dict[str, Any]]:
    """Block Kit of the approval message of a ``WaitingApproval`` event: what waits,
    the evidence so far, a dashboard link, and (``buttons``) Approve / Abort."""
    weight = event.approval_pct
    step = f"*{weight}%*" if weight is not None else "the next step"
    blocks: list[dict[str, Any]] = [
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f":raised_hand: Approval needed: {_title(event, service)} — "
                f"move to {step} (canary now at {event.weight_pct}%)",
            },
        }
    ]
    lines = [verdict_line(event.verdict)]
    if event.verdict is not None:
        lines += [f"• {check_line(c)}" for c in event.verdict.checks]
    blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}})
    link = dashboard_link(event, dashboard_url)
    if link:
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{link}|dashboard>"}]}
        )
    if buttons:
        value = button_value(event)
        blocks.append(
            {
                "type": "actions",
                "block_id": APPROVAL_BLOCK_ID,
                "elements": [
                    {
                        "type": "button",
                        "action_id": APPROVE_ACTION,
                        "style": "primary",
                        "text": {"type": "plain_text", "text": "Approve"},
                        "value": value,
                    },
                    {
                        "type": "button",
                        "action_id": ABORT_ACTION,
                        "style": "danger",
                        "text": {"type": "plain_text", "text": "Abort"},
                        "value": value,
                        "confirm": {
                            "title": {"type": "plain_text", "text": "Abort the rollout?"},
                            "text": {
                                "type": "mrkdwn",
                                "text": f"All traffic goes back to stable for `{event.key}`.",
                            },
                            "confirm": {"type": "plain_text", "text": "Abort"},
                            "deny": {"type": "plain_text", "text": "Cancel"},
                        },
                    },
                ],
            }
        )
    else:
        blocks.append(
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": _offline_approval(event)}],
            }
        )
    return blocks


def _offline_approval(event: RolloutEvent) -> str:
    step = f" --step {event.approval_pct}" if event.approval_pct is not None else ""
    return (
        "approve or abort in the dashboard, with "
        f"`canaryd approve {event.name} -n {event.namespace}{step}`, or through the status API"
    )


def thread_text(event: RolloutEvent) -> str:
    """The thread reply (or webhook message) for ``event``: what happened, and why."""
    reason = event.reason
    if reason is EventReason.STEP_PASSED:
        return f":white_check_mark: step passed — {event.message}\n{verdict_line(event.verdict)}"
    if reason is EventReason.HOLDING:
        why = "; ".join(event.verdict.reasons) if event.verdict else ""
        return f":pause_button: holding — {event.message}" + (f"\n{why}" if why else "")
    if reason is EventReason.PAUSED:
        return f":double_vertical_bar: paused — {event.message}"
    if reason is EventReason.ROLLED_BACK:
        lines = [f":rotating_light: rolled back — {event.message}"]
        fired = _fired(event.verdict)
        if fired:
            lines += [f"• {check_line(c)}" for c in fired]
        elif event.verdict is not None and event.verdict.reasons:
            lines += [f"• {r}" for r in event.verdict.reasons]
        return "\n".join(lines)
    if reason is EventReason.PROMOTED:
        return f":tada: promoted `{event.revision}` — {event.message}"
    if reason is EventReason.PROMOTION_FAILED:
        return f":x: promotion failed — {event.message}"
    if reason is EventReason.WAITING_APPROVAL:
        weight = f"{event.approval_pct}%" if event.approval_pct is not None else "the next step"
        return (
            f":raised_hand: approval needed for {event.key} `{event.revision}`: move to {weight} "
            f"(canary now at {event.weight_pct}%) — {verdict_line(event.verdict)}"
        )
    return f"{reason}: {event.message}"


def webhook_message(
    event: RolloutEvent, dashboard_url: str | None, *, service: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Text and simple blocks of a webhook-only message (no buttons)."""
    if event.reason is EventReason.WAITING_APPROVAL:
        text = f"{thread_text(event)}\n{_offline_approval(event)}"
        return text, approval_blocks(event, dashboard_url, service=service, buttons=False)
    text = thread_text(event)
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": _title(event, service)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
    ]
    link = dashboard_link(event, dashboard_url)
    if link:
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{link}|dashboard>"}]}
        )
    return text, blocks


# -- the sink ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Work:
    """One queued event and how far its delivery got (``stage`` 0: the summary
    message; 1: the thread reply), and the attempt at the current call."""

    channel: str
    event: RolloutEvent
    service: str | None = None
    stage: int = 0
    attempt: int = 1


@dataclass(frozen=True)
class _Thread:
    """Where a rollout's summary message lives (``channel`` is Slack's channel ID)."""

    channel: str
    ts: str


class _RetryError(Exception):
    """A Slack call should be tried again after ``after_s`` (None: backoff)."""

    def __init__(
        self, problem: str, after_s: float | None = None, final: bool = False, error: str = ""
    ):
        super().__init__(problem)
        self.problem = problem
        self.error = error  #: Slack's error code, if it gave one
        self.after_s = after_s
        self.final = final


Sleep = Callable[[float], Awaitable[None]]


class SlackSink:
    """Delivers events to Slack (see the module docstring)."""

    name = SINK_NAME

    def __init__(
        self,
        settings: SlackSettings,
        lookup: Callable[[CanaryRef], CanaryObject | None],
        capacity: int = OUTBOX_SIZE,
        sleep: Sleep = asyncio.sleep,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.lookup = lookup
        self.sleep = sleep
        self.monotonic = monotonic
        self.outbox: Outbox[_Work] = Outbox(self.name, capacity)
        self.skipped = 0  #: events not queued: no channel, or Slack not configured
        self.threads: OrderedDict[tuple[str, str, str | None], _Thread] = OrderedDict()
        self._next_call_s: dict[str, float] = {}
        self._channel_ids: dict[str, str] = {}
        self._backoff: Iterator[float] = backoff_delays()
        self._client: AsyncWebClient | None = None
        self._webhook: AsyncWebhookClient | None = None
        self._warned: set[str] = set()

    # -- the control loop's side: never waits, never raises

    def offer(self, event: RolloutEvent) -> None:
        """Queue ``event`` for the Canary's channel (or skip it, counted)."""
        try:
            canary = self.lookup(CanaryRef(event.namespace, event.name))
            spec = canary.spec if canary is not None else None
            service = spec.service if spec is not None else None
            if self.settings.token:
                channel = slack_channel(spec, self.settings.channel)
            elif self.settings.webhook_url:
                if event.reason not in THREAD_REASONS | {EventReason.ROLLOUT_STARTED}:
                    return  # a webhook cannot edit a summary: only the telling events
                channel = "webhook"  # the webhook's own channel
            else:
                channel = None
            if channel is None:
                self.skipped += 1
                self._warn_once(event.key, "no Slack channel for this Canary: events skipped")
                return
            self.outbox.put(_Work(channel, event, service))
        except Exception:  # offer() must never raise into the control loop
            self.skipped += 1
            log.exception("slack sink refused an event", event_id=event.id)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and len(self._warned) < MAX_ROLLOUTS:
            self._warned.add(key)
            log.info(message, canary=key)

    # -- the sink's own task

    async def run(self) -> None:
        """Deliver queued events in order until cancelled."""
        if self.settings.token:
            self._client = AsyncWebClient(
                token=self.settings.token,
                base_url=self.settings.api_url or AsyncWebClient.BASE_URL,
                timeout=int(max(1, self.settings.timeout_s)),
                retry_handlers=[],  # this sink decides what to retry
            )
        elif self.settings.webhook_url:
            self._webhook = AsyncWebhookClient(
                self.settings.webhook_url, timeout=int(max(1, self.settings.timeout_s))
            )
        while True:
            work = await self.outbox.get()
            try:
                done = await self._advance(work)
            except _RetryError as retry:
                final = retry.final or (retry.after_s is None and work.attempt >= ATTEMPTS)
                if final:
                    self._gave_up(work, retry.problem)
                    continue
                pause_s = retry.after_s if retry.after_s is not None else next(self._backoff)
                self.outbox.put_front(replace(work, attempt=work.attempt + 1))
                log.info(
                    "slack retry", problem=retry.problem, after_s=round(pause_s, 2),
                    attempt=work.attempt, event_id=work.event.id,
                )  # fmt: skip
                await self.sleep(pause_s)
                continue
            if done is None:
                self._backoff = backoff_delays()
                EVENTS_SENT.labels(sink=self.name, result="ok").inc()
            else:  # the next stage of the same event stays first in line
                self.outbox.put_front(done)

    def _gave_up(self, work: _Work, problem: str) -> None:
        self._backoff = backoff_delays()
        EVENTS_SENT.labels(sink=self.name, result="failed").inc()
        log.warning(
            "slack gave up on an event", canary=work.event.key, reason=str(work.event.reason),
            event_id=work.event.id, channel=work.channel, problem=problem,
            attempts=work.attempt,
        )  # fmt: skip

    async def _advance(self, work: _Work) -> _Work | None:
        """Make the next Slack call for ``work``; the work left, or None when done."""
        if self._webhook is not None:
            await self._post_webhook(work)
            return None
        event = work.event
        key = (event.namespace, event.name, event.revision)
        if work.stage == 0:
            thread = self.threads.get(key)
            if event.reason is EventReason.ROLLOUT_STARTED:
                thread = None  # a new rollout (even of the same revision): a new message
            blocks = summary_blocks(event, self.settings.dashboard_url, service=work.service)
            text = summary_text(event, service=work.service)
            if thread is None:
                answer = await self._call(
                    work.channel, "chat_postMessage",
                    channel=work.channel, text=text, blocks=blocks,
                )  # fmt: skip
                channel_id = str(answer.get("channel") or work.channel)
                self._channel_ids[work.channel] = channel_id
                due_s = max(self._next_call_s.get(k, 0.0) for k in (work.channel, channel_id))
                self._next_call_s[channel_id] = due_s  # pace by the ID from now on
                thread = _Thread(channel_id, str(answer["ts"]))
            else:
                try:
                    await self._call(
                        work.channel, "chat_update",
                        channel=thread.channel, ts=thread.ts, text=text, blocks=blocks,
                    )  # fmt: skip
                except _RetryError as exc:
                    if exc.error not in _GONE_ERRORS:
                        raise
                    log.info(
                        "slack summary message cannot be edited; starting a new one",
                        canary=event.key, problem=exc.problem,
                    )  # fmt: skip
                    self.threads.pop(key, None)
                    return replace(work, attempt=1)  # the summary again: posted anew
            self._remember(key, thread)
            if event.reason in THREAD_REASONS:
                return replace(work, stage=1, attempt=1)
            return None
        thread = self.threads.get(key)
        if thread is None:  # forgotten meanwhile (LRU): nothing to reply to
            return None
        if event.reason is EventReason.WAITING_APPROVAL:
            await self._call(
                work.channel, "chat_postMessage",
                channel=thread.channel, thread_ts=thread.ts, reply_broadcast=True,
                text=thread_text(event),
                blocks=approval_blocks(event, self.settings.dashboard_url, service=work.service),
            )  # fmt: skip
        else:
            await self._call(
                work.channel, "chat_postMessage",
                channel=thread.channel, thread_ts=thread.ts, text=thread_text(event),
            )  # fmt: skip
        return None

    def _remember(self, key: tuple[str, str, str | None], thread: _Thread) -> None:
        self.threads[key] = thread
        self.threads.move_to_end(key)
        while len(self.threads) > MAX_ROLLOUTS:
            self.threads.popitem(last=False)

    async def _pace(self, channel: str) -> None:
        """At most one call per ``min_interval_s`` per channel."""
        key = self._channel_ids.get(channel, channel)
        now_s = self.monotonic()
        due_s = self._next_call_s.get(key, now_s)
        if due_s > now_s:
            await self.sleep(due_s - now_s)
        self._next_call_s[key] = max(now_s, due_s) + self.settings.min_interval_s
        if len(self._next_call_s) > MAX_ROLLOUTS:
            self._next_call_s.pop(next(iter(self._next_call_s)))

    async def _call(self, pace_key: str, method: str, /, **kwargs: Any) -> dict[str, Any]:
        """One Web API call, its failure sorted into retry-after, backoff or final."""
        assert self._client is not None
        await self._pace(pace_key)
        try:
            response = await getattr(self._client, method)(**kwargs)
        except SlackApiError as exc:
            status = int(getattr(exc.response, "status_code", 0) or 0)
            error = _slack_error(exc)
            if status == 429 or error == "ratelimited":
                headers = getattr(exc.response, "headers", None) or {}
                raise _RetryError(f"HTTP 429 {error}", after_s=_retry_after_s(headers)) from None
            if status >= 500 or error in _TRANSIENT_ERRORS:
                raise _RetryError(f"HTTP {status} {error}") from None
            raise _RetryError(
                f"Slack refused {method}: HTTP {status} {error}", final=True, error=error
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _RetryError(
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            ) from None
        data = response.data
        return data if isinstance(data, dict) else {}

    async def _post_webhook(self, work: _Work) -> None:
        assert self._webhook is not None
        await self._pace(work.channel)
        text, blocks = webhook_message(
            work.event, self.settings.dashboard_url, service=work.service
        )
        try:
            response = await self._webhook.send(text=text, blocks=blocks)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _RetryError(
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            ) from None
        status = response.status_code
        if status == 429:
            raise _RetryError("HTTP 429", after_s=_retry_after_s(response.headers or {}))
        if status >= 500:
            raise _RetryError(f"HTTP {status}")
        if status >= 300:
            raise _RetryError(
                f"Slack refused the webhook: HTTP {status} {response.body}", final=True
            )


def _slack_error(exc: SlackApiError) -> str:
    try:
        return str(exc.response.get("error", "") or "")
    except Exception:
        return ""


def _retry_after_s(headers: Mapping[str, Any]) -> float:
    value: Any = None
    for key, item in headers.items():
        if str(key).lower() == "retry-after":
            value = item[0] if isinstance(item, list) and item else item
    try:
        return min(300.0, max(0.0, float(value)))
    except (TypeError, ValueError):
        return 1.0


# -- button clicks -----------------------------------------------------------------------


class _Clock(Clock):
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def now(self) -> float:
        return self._clock()


@dataclass(frozen=True)
class Click:
    """One button click, as taken from Slack's ``block_actions`` payload."""

    action_id: str
    ref: CanaryRef
    revision: str | None
    weight: int | None
    user_id: str
    username: str
    channel_id: str | None
    message_ts: str | None
    click_id: str
    message_blocks: list[dict[str, Any]]
    response_url: str | None = None


class BadPayloadError(ValueError):
    """The body is not a block_actions payload carrying one of canaryd's buttons."""


def parse_click(body: bytes) -> Click:
    """The click in a form-encoded ``payload=`` body; :class:`BadPayloadError` if none."""
    try:
        form = parse_qs(body.decode(), strict_parsing=True)
        payload = json.loads(form["payload"][0])
        if payload.get("type") != "block_actions":
            raise BadPayloadError(f"unsupported interaction type {payload.get('type')!r}")
        actions = payload.get("actions") or []
        action = next(a for a in actions if a.get("action_id") in (APPROVE_ACTION, ABORT_ACTION))
        value = json.loads(action["value"])
        user = payload["user"]
        container = payload.get("container") or {}
        message = payload.get("message") or {}
        channel = container.get("channel_id") or (payload.get("channel") or {}).get("id")
        weight = value.get("weight")
        return Click(
            action_id=str(action["action_id"]),
            ref=CanaryRef(str(value["ns"]), str(value["name"])),
            revision=None if value.get("revision") is None else str(value["revision"]),
            weight=None if weight is None else int(weight),
            user_id=str(user["id"]),
            username=str(user.get("username") or user.get("name") or user["id"]),
            channel_id=None if channel is None else str(channel),
            message_ts=str(container.get("message_ts") or message.get("ts") or "") or None,
            click_id=str(payload.get("trigger_id") or f"{action.get('action_ts')}:{user['id']}"),
            message_blocks=[b for b in message.get("blocks") or [] if isinstance(b, dict)],
            response_url=str(payload.get("response_url") or "") or None,
        )
    except BadPayloadError:
        raise
    except (ValueError, KeyError, TypeError, StopIteration, AttributeError, IndexError) as exc:
        raise BadPayloadError(f"malformed interaction payload ({type(exc).__name__})") from None


def _ephemeral(text: str) -> dict[str, Any]:
    return {"response_type": "ephemeral", "replace_original": False, "text": text}


class SlackInteractions:
    """Approve / Abort clicks: ``await handle(body, headers)`` → (HTTP status, JSON).

    Runs on the status API's event loop (its own thread); its state (seen clicks, the
    user-group cache) is guarded by a lock and never held across an ``await``."""

    def __init__(
        self,
        settings: SlackSettings,
        lookup: Callable[[CanaryRef], CanaryObject | None],
        submit: Submit,
        *,
        client: AsyncWebClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.lookup = lookup
        self.submit = submit
        self.clock = clock
        self._client = client
        self._verifier = (
            SignatureVerifier(settings.signing_secret, clock=_Clock(clock))
            if settings.signing_secret
            else None
        )
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._groups: dict[str, tuple[float, frozenset[str]]] = {}

    @property
    def client(self) -> AsyncWebClient | None:
        """The Web API client (None without a token: messages cannot be edited)."""
        if self._client is None and self.settings.token:
            self._client = AsyncWebClient(
                token=self.settings.token,
                base_url=self.settings.api_url or AsyncWebClient.BASE_URL,
                timeout=int(max(1, min(self.settings.timeout_s, 3))),
                retry_handlers=[],
            )
        return self._client

    async def handle(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """Check and carry out one click (see the module docstring)."""
        if self._verifier is None:
            return 503, {"error": "Slack interactions are not configured: no signing secret"}
        lower = {k.lower(): v for k, v in headers.items()}
        timestamp = lower.get("x-slack-request-timestamp")
        signature = lower.get("x-slack-signature")
        if not timestamp or not signature:
            return 401, {"error": "missing Slack signature headers"}
        try:
            age_s = abs(self.clock() - int(timestamp))
        except ValueError:
            return 401, {"error": "bad Slack request timestamp"}
        if age_s > MAX_SIGNATURE_AGE_S:
            return 401, {"error": "stale Slack request timestamp (more than 5 minutes)"}
        if not self._verifier.is_valid(body=body, timestamp=timestamp, signature=signature):
            return 401, {"error": "bad Slack signature"}
        try:
            click = parse_click(body)
        except BadPayloadError as exc:
            return 400, {"error": str(exc)}
        if not self._first_time(click.click_id):
            log.info("slack click replayed", canary=str(click.ref), user=click.user_id)
            return 200, await self._tell(click, "this click was already handled; nothing changed")
        canary = self.lookup(click.ref)
        if canary is None or canary.spec is None:
            why = f"Canary {click.ref} not found" if canary is None else "its spec is invalid"
            await self._update(click, f":warning: nothing changed: {why}", keep_buttons=False)
            return 200, await self._tell(click, f"nothing changed: {why}")
        if not await self._is_approver(click.user_id, slack_approvers(canary.spec)):
            log.warning(
                "slack click refused: not an approver", canary=str(click.ref), user=click.user_id
            )
            return 200, await self._tell(click, f"you are not an approver of {click.ref}")
        stale = _stale(canary, click)
        if stale is not None:
            await self._update(click, f":information_source: nothing changed: {stale}")
            return 200, await self._tell(click, f"nothing changed: {stale}")
        by = f"slack:{click.username} ({click.user_id})"
        if click.action_id == APPROVE_ACTION:
            command = new_command(CommandKind.APPROVE, by, weight=click.weight)
            done = "Approved"
        else:
            command = new_command(
                CommandKind.ABORT, by, reason="aborted from the Slack approval message"
            )
            done = "Aborted"
        try:
            async with asyncio.timeout(SUBMIT_TIMEOUT_S):
                await self.submit(click.ref, command)
        except (KubeError, TimeoutError) as exc:
            log.warning(
                "slack click failed", canary=str(click.ref), user=click.user_id,
                command=str(command.kind), problem=f"{type(exc).__name__}: {exc}",
            )  # fmt: skip
            text = (
                f":warning: {done.lower()[:-1]}ing failed ({type(exc).__name__}): nothing "
                "was changed, or the Kubernetes API did not confirm in time; check the "
                "Canary and try again"
            )
            await self._update(click, text, keep_buttons=True)
            return 200, await self._tell(click, text)
        at = datetime.fromtimestamp(self.clock(), UTC).strftime("%H:%M:%S UTC")
        log.info(
            "slack command accepted", canary=str(click.ref), user=click.user_id,
            command=str(command.kind), id=command.id, weight=click.weight,
        )  # fmt: skip
        await self._update(click, f"{done} by <@{click.user_id}> at {at}")
        return 200, {}

    async def _tell(self, click: Click, text: str) -> dict[str, Any]:
        """Tell the clicker alone (an ephemeral message through the payload's
        ``response_url``, which Slack shows; the HTTP answer it does not), and return
        the same as the HTTP answer."""
        answer = _ephemeral(text)
        url = click.response_url
        if url and _trusted_response_url(url, self.settings.api_url):
            try:
                async with asyncio.timeout(2):
                    await AsyncWebhookClient(url, timeout=2).send(
                        text=text, response_type="ephemeral", replace_original=False
                    )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning("slack response_url failed", problem=type(exc).__name__)
        return answer

    def _first_time(self, click_id: str) -> bool:
        with self._lock:
            if click_id in self._seen:
                return False
            self._seen[click_id] = None
            while len(self._seen) > MAX_CLICKS:
                self._seen.popitem(last=False)
            return True

    async def _is_approver(self, user_id: str, approvers: list[str]) -> bool:
        if not approvers or user_id in approvers:
            return True
        for group in (a for a in approvers if a.startswith("S")):
            if user_id in await self._members(group):
                return True
        return False

    async def _members(self, group: str) -> frozenset[str]:
        now_s = self.clock()
        with self._lock:
            cached = self._groups.get(group)
        if cached is not None and cached[0] > now_s:
            return cached[1]
        client = self.client
        if client is None:
            return frozenset()
        try:
            response = await client.usergroups_users_list(usergroup=group)
            users = frozenset(str(u) for u in response.get("users") or [])
        except (SlackApiError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("slack user group lookup failed", group=group, problem=type(exc).__name__)
            return cached[1] if cached is not None else frozenset()
        with self._lock:
            self._groups[group] = (now_s + GROUP_CACHE_S, users)
        return users

    async def _update(self, click: Click, note: str, *, keep_buttons: bool = False) -> None:
        """Edit the approval message: its blocks (buttons dropped unless ``keep_buttons``)
        and a line saying what happened."""
        client = self.client
        if client is None or not click.channel_id or not click.message_ts:
            return
        blocks = [
            b
            for b in click.message_blocks
            if keep_buttons or b.get("type") != "actions"
            if b.get("block_id") != "canaryd_outcome"
        ]
        outcome = {"type": "section", "text": {"type": "mrkdwn", "text": note}}
        blocks.append({**outcome, "block_id": "canaryd_outcome"})
        try:
            await client.chat_update(
                channel=click.channel_id, ts=click.message_ts, text=note, blocks=blocks
            )
        except (SlackApiError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning(
                "slack message update failed", canary=str(click.ref), problem=type(exc).__name__
            )


def _trusted_response_url(url: str, api_url: str | None) -> bool:
    """Only Slack's own hooks (or, with ``api_url`` set, that host: a test double)
    are answered: the payload names the URL, and canaryd posts only to Slack."""
    parts = urlsplit(url)
    if api_url is None:
        return parts.scheme == "https" and parts.hostname == "hooks.slack.com"
    api = urlsplit(api_url)
    return (parts.scheme, parts.netloc) == (api.scheme, api.netloc)


def _stale(canary: CanaryObject, click: Click) -> str | None:
    """Why the click no longer applies to the Canary, or None when it does."""
    status, spec = canary.status, canary.spec
    assert spec is not None
    if click.revision != status.revision:
        return (
            f"the rollout of revision {click.revision} is over: "
            f"{click.ref} is at revision {status.revision} ({status.phase})"
        )
    if click.action_id == ABORT_ACTION:
        if not status.phase.active or status.phase is Phase.PROMOTING:
            return f"this rollout is no longer abortable: phase {status.phase}"
        return None
    pending = status.pending_step_index
    waiting = spec.steps[pending] if pending is not None and pending < len(spec.steps) else None
    if status.phase is Phase.WAITING_APPROVAL and waiting == click.weight:
        return None
    done = next((a for a in reversed(status.approvals) if a.weight == click.weight), None)
    if done is not None:
        return f"already approved by {done.by} at {done.at.strftime('%Y-%m-%d %H:%M:%S UTC')}"
    return f"this rollout is no longer waiting: phase {status.phase}"
