"""One event model, the notifier's queues, and webhooks against a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from canaryd.events import (
    SCHEMA,
    EventReason,
    RolloutEvent,
    event_of,
    json_schema,
)
from canaryd.kube import CanaryObject
from canaryd.metrics import REGISTRY
from canaryd.outbox import Notifier, Outbox, backoff_delays
from canaryd.ports import CanaryRef
from canaryd.spec import CanarySpec, SpecError, parse_spec
from canaryd.status import CanaryStatus, Phase, VerdictDecision, VerdictRecord
from canaryd.webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    WebhookSettings,
    WebhookSink,
    refused_host,
    sign,
    verify,
)

ROOT = Path(__file__).resolve().parents[1]
AT = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
KEY = b"k" * 32


def event(reason: EventReason = EventReason.STEP_STARTED, n: int = 0, **kw: Any) -> RolloutEvent:
    return RolloutEvent(
        id=f"e{n}", at=AT, namespace="shop", name="checkout", reason=reason,
        message=f"event {n}", phase=Phase.PROGRESSING, weight_pct=10, step=1,
        steps=[10, 50, 100], revision="v2", **kw,
    )  # fmt: skip


# -- the event model ---------------------------------------------------------------------


def test_the_published_json_schema_is_the_models() -> None:
    published = json.loads((ROOT / "docs" / "event.schema.json").read_text())
    assert published == json_schema(), (
        "docs/event.schema.json is stale: regenerate it from canaryd.events.json_schema()"
    )
    assert published["properties"]["schema"]["const"] == SCHEMA
    assert set(published["$defs"]["EventReason"]["enum"]) == {r.value for r in EventReason}


def test_an_event_round_trips_through_its_json_and_omits_nulls() -> None:
    verdict = VerdictRecord(decision=VerdictDecision.PASS, at=AT, reasons=["errors fine"])
    original = event(EventReason.STEP_PASSED, 1, verdict=verdict, by="alice")
    wire = json.loads(original.encode())
    assert wire["schema"] == SCHEMA and wire["reason"] == "StepPassed"
    assert wire["weightPct"] == 10 and wire["verdict"]["reasons"] == ["errors fine"]
    assert "approvalPct" not in wire  # None is left out, not sent as null
    assert RolloutEvent.model_validate(wire) == original


def test_event_of_names_the_step_that_waits_and_who_approved() -> None:
    status = CanaryStatus(
        phase=Phase.WAITING_APPROVAL, revision="v2", step_index=0, pending_step_index=1,
        canary_weight=10,
    )  # fmt: skip
    waiting = event_of("shop", "checkout", status, [10, 50, 100],
                       EventReason.WAITING_APPROVAL, "approval needed", AT)  # fmt: skip
    assert waiting.approval_pct == 50 and waiting.step == 1 and waiting.weight_pct == 10
    idle = event_of("shop", "checkout", CanaryStatus(), [10, 100], EventReason.NOT_READY, "x", AT)
    assert idle.step is None and idle.approval_pct is None
    assert waiting.id != idle.id


# -- the bounded queue -------------------------------------------------------------------


def test_an_outbox_drops_the_oldest_when_full_and_counts_it() -> None:
    box: Outbox[int] = Outbox("test-outbox", capacity=3)
    before = REGISTRY.get_sample_value("canaryd_events_dropped_total", {"sink": "test-outbox"})
    for i in range(5):
        box.put(i)
    assert list(box) == [2, 3, 4] and box.dropped == 2
    after = REGISTRY.get_sample_value("canaryd_events_dropped_total", {"sink": "test-outbox"})
    assert after is not None and after - (before or 0) == 2
    box.put_front(9)  # full: the given-back (oldest) one is dropped, newer ones kept
    assert list(box) == [2, 3, 4] and box.dropped == 3
    assert asyncio.run(box.get()) == 2
    box.put_front(1)
    assert list(box) == [1, 3, 4]


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    import random

    delays = backoff_delays(0.5, 4.0, random.Random(1))
    got = [next(delays) for _ in range(8)]
    assert 0.25 <= got[0] <= 0.5 and all(1.9 <= d <= 4.0 for d in got[4:])
    assert len(set(got)) == len(got)  # jittered


def test_a_sink_that_raises_on_offer_does_not_reach_the_publisher() -> None:
    class Bad:
        name = "bad"

        def offer(self, event: RolloutEvent) -> None:
            raise RuntimeError("bug")

        async def run(self) -> None:
            return None

    class Good:
        name = "good"

        def __init__(self) -> None:
            self.got: list[str] = []

        def offer(self, event: RolloutEvent) -> None:
            self.got.append(event.id)

        async def run(self) -> None:
            return None

    good = Good()
    notifier = Notifier([Bad(), good])
    notifier.publish(event(n=1))
    notifier.publish(event(n=2))
    assert good.got == ["e1", "e2"] and notifier.published == 2


# -- webhooks ----------------------------------------------------------------------------


class Receiver:
    """A real HTTP endpoint: records each request; ``plan`` gives the status codes of
    the next answers (then 200); ``hang_s`` stalls every answer."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.plan: list[tuple[int, dict[str, str]]] = []
        self.hang_s = 0.0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.hang_s:
                    time.sleep(receiver.hang_s)
                with receiver.lock:
                    receiver.got.append((dict(self.headers.items()), body))
                    code, headers = receiver.plan.pop(0) if receiver.plan else (200, {})
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def canary_with_hooks(hooks: list[dict[str, Any]]) -> CanaryObject:
    spec = parse_spec({
        "service": "checkout", "stable": {"deployment": "checkout"},
        "canary": {"deployment": "checkout-canary"},
        "notifications": {"webhooks": hooks},
    })  # fmt: skip
    return CanaryObject(
        ref=CanaryRef("shop", "checkout"), spec=spec, spec_error=None, status=CanaryStatus(),
        commands=(), resource_version="1", generation=1, uid="u", raw={},
    )  # fmt: skip


async def _fast_sleep(_s: float) -> None:
    await asyncio.sleep(0.01)


async def _deliver(sink: WebhookSink, until: Any, timeout_s: float = 10.0) -> None:
    task = asyncio.create_task(sink.run(), name="sink:webhooks")
    try:
        deadline = time.monotonic() + timeout_s
        while not until():
            assert time.monotonic() < deadline, "timed out waiting for deliveries"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_webhooks_are_signed_in_order_and_retried_through_500_and_429(
    receiver: Receiver,
) -> None:
    canary = canary_with_hooks([{"url": receiver.url}])
    receiver.plan = [(500, {}), (429, {"Retry-After": "0"}), (503, {})]
    sink = WebhookSink(
        WebhookSettings(key=KEY, trust_env=False), lambda ref: canary, sleep=_fast_sleep
    )
    for n in range(4):
        sink.offer(event(n=n))
    asyncio.run(_deliver(sink, lambda: len(receiver.got) >= 7))
    bodies = [json.loads(body)["id"] for _, body in receiver.got]
    assert bodies == ["e0", "e0", "e0", "e0", "e1", "e2", "e3"]  # retried, then in order
    now = time.time()
    for headers, body in receiver.got:
        assert verify(KEY, headers, body, now), "every request verifies with the key"
        assert not verify(b"other key", headers, body, now)
        assert headers[SIGNATURE_HEADER].startswith("sha256=")
        assert headers[EVENT_ID_HEADER] == json.loads(body)["id"]
    headers, body = receiver.got[-1]
    assert not verify(KEY, headers, body + b" ", now)  # a changed body fails
    assert not verify(KEY, headers, body, now + 600)  # a replay 10 minutes on fails
    assert sign(KEY, 1, b"x") != sign(KEY, 2, b"x")


def test_webhooks_filter_by_reason_give_up_on_4xx_and_never_go_unsigned(
    receiver: Receiver,
) -> None:
    canary = canary_with_hooks([{"url": receiver.url, "events": ["RolledBack", "Promoted"]}])
    unsigned = WebhookSink(WebhookSettings(key=None, trust_env=False), lambda ref: canary)
    unsigned.offer(event(EventReason.PROMOTED, 1))
    assert not unsigned.queues  # no key: nothing is queued, let alone sent

    failed = (
        REGISTRY.get_sample_value(
            "canaryd_events_sent_total", {"sink": "webhooks", "result": "failed"}
        )
        or 0.0
    )
    receiver.plan = [(404, {})]
    sink = WebhookSink(
        WebhookSettings(key=KEY, trust_env=False), lambda ref: canary, sleep=_fast_sleep
    )
    sink.offer(event(EventReason.ROLLED_BACK, 1))  # answered 404: given up at once
    sink.offer(event(EventReason.STEP_STARTED, 2))  # not in events: not sent
    sink.offer(event(EventReason.PROMOTED, 3))
    asyncio.run(_deliver(sink, lambda: len(receiver.got) >= 2))
    assert [json.loads(b)["id"] for _, b in receiver.got] == ["e1", "e3"]
    now_failed = REGISTRY.get_sample_value(
        "canaryd_events_sent_total", {"sink": "webhooks", "result": "failed"}
    )
    assert now_failed == failed + 1


def test_a_hanging_webhook_never_slows_offer(receiver: Receiver) -> None:
    canary = canary_with_hooks([{"url": receiver.url}])
    receiver.hang_s = 2.0
    sink = WebhookSink(
        WebhookSettings(key=KEY, timeout_s=0.3, attempts=2, capacity=10, trust_env=False),
        lambda ref: canary, sleep=_fast_sleep,
    )  # fmt: skip

    async def scenario() -> list[float]:
        task = asyncio.create_task(sink.run(), name="sink:webhooks")
        await asyncio.sleep(0.05)
        took = []
        for n in range(50):
            t0 = time.perf_counter()
            sink.offer(event(n=n))
            took.append(time.perf_counter() - t0)
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return took

    took = asyncio.run(scenario())
    assert max(took) < 0.005, f"offer took up to {max(took) * 1000:.1f} ms"
    assert sum(q.dropped for q in sink.queues.values()) >= 39  # bound 10 of 50


def test_link_local_and_metadata_hosts_are_refused() -> None:
    assert refused_host("http://169.254.169.254/latest/meta-data") is not None
    assert refused_host("http://[fe80::1]/x") is not None
    assert refused_host("http://metadata.google.internal/x") is not None
    assert refused_host("https://hooks.example.com/canary") is None
    assert refused_host("http://127.0.0.1:9000/x") is None


@pytest.mark.parametrize(
    ("hook", "error"),
    [
        ({"url": "ftp://x.example.com/"}, "http:// or https://"),
        ({"url": "https://user:pw@x.example.com/"}, "no credentials"),
        ({"url": "https://x.example.com/", "events": ["Exploded"]}, "unknown event reasons"),
    ],
)
def test_bad_webhooks_in_a_spec_are_refused_clearly(hook: dict[str, Any], error: str) -> None:
    with pytest.raises(SpecError, match=error):
        canary_with_hooks([hook])


def test_approvals_accept_approvers_hold_and_the_legacy_wait() -> None:
    base = {"service": "s", "steps": [10, 50, 100]}
    spec: CanarySpec = parse_spec({**base, "approvals": {
        "before": [50], "approvers": ["U024BE7LH", "S0614TZR7"], "onTimeout": "wait"}})  # fmt: skip
    assert spec.approvals.on_timeout == "hold" and spec.approvals.approvers == [
        "U024BE7LH", "S0614TZR7"]  # fmt: skip
    with pytest.raises(SpecError, match="Slack user IDs"):
        parse_spec({**base, "approvals": {"before": [50], "approvers": ["@alice"]}})
