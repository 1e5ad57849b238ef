"""The MQTT sink against a real mosquitto: events in order, retained state, a broker
that goes away and comes back, commands behind the broker's ACL; and the pure parsers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import pytest

from canaryd.events import SCHEMA, EventReason, RolloutEvent
from canaryd.metrics import REGISTRY
from canaryd.mqtt import (
    MAX_COMMAND_BYTES,
    MqttSettings,
    MqttSink,
    parse_command,
    parse_url,
    topic_for,
)
from canaryd.ports import CanaryRef
from canaryd.rollout import Command, CommandKind
from canaryd.status import Phase
from tests.mosquitto import MosquittoServer, require_mosquitto

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
WAIT_S = 10.0

ACL = """\
user canaryd
topic readwrite canaryd/#

user viewer
topic read canaryd/#

pattern write canaryd/+/+/commands/%u
"""
USERS = {"canaryd": "daemon-pw", "viewer": "viewer-pw", "alice": "alice-pw", "bob": "bob-pw"}


# -- helpers ----------------------------------------------------------------------------


def event(
    i: int,
    *,
    name: str = "checkout",
    reason: EventReason = EventReason.STEP_STARTED,
    phase: Phase = Phase.PROGRESSING,
    weight_pct: int = 10,
) -> RolloutEvent:
    return RolloutEvent(
        id=f"ev{i:04d}",
        at=T0 + timedelta(seconds=i),
        namespace="shop",
        name=name,
        reason=reason,
        message=f"event {i}",
        revision="v2",
        phase=phase,
        weight_pct=weight_pct,
        step=1,
        steps=[10, 50, 100],
    )


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def dropped_total() -> float:
    return sample("canaryd_events_dropped_total", {"sink": "mqtt"})


def logged(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> str:
    """What was logged, wherever structlog sends it (stdout, or stdlib logging once
    another test configured it)."""
    out, err = capsys.readouterr()
    return "\n".join((out, err, caplog.text))


def commands_total(result: str) -> float:
    return sample("canaryd_mqtt_commands_total", {"result": result})


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Subscriber:
    """A plain aiomqtt client that records what it receives; reconnects (with its
    session, when ``persistent``) if the broker goes away."""

    broker: MosquittoServer
    topic: str
    identifier: str
    persistent: bool = False
    username: str | None = None
    password: str | None = None
    tls_context: ssl.SSLContext | None = None
    messages: list[aiomqtt.Message] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    def on(self, leaf: str) -> list[aiomqtt.Message]:
        return [m for m in self.messages if m.topic.value.endswith(f"/{leaf}")]

    def event_ids(self) -> list[str]:
        """The events' ids in arrival order, each once: QoS 1 is at least once, and a
        broker restart redelivers what it had not seen acknowledged to a session."""
        ids = (json.loads(as_bytes(m))["id"] for m in self.on("events"))
        return list(dict.fromkeys(ids))

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.broker.port,
                    username=self.username,
                    password=self.password,
                    identifier=self.identifier,
                    clean_session=not self.persistent,
                    tls_context=self.tls_context,
                    timeout=5,
                ) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        self.messages.append(message)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)


def as_bytes(message: aiomqtt.Message) -> bytes:
    assert isinstance(message.payload, bytes)
    return message.payload


@contextlib.asynccontextmanager
async def running(*jobs: Awaitable[None]) -> AsyncIterator[None]:
    """Run ``jobs`` as tasks for the block, then cancel them."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task.cancelled() or task.exception() is None


async def subscribed(sub: Subscriber) -> None:
    await asyncio.wait_for(sub.subscribed.wait(), WAIT_S)


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoServer]:
    require_mosquitto()
    with MosquittoServer() as server:
        yield server


@pytest.fixture
def persistent_broker() -> Iterator[MosquittoServer]:
    """A broker of its own (it is stopped and started), keeping sessions across that."""
    require_mosquitto()
    with MosquittoServer(persistence=True) as server:
        yield server


# -- events and state -------------------------------------------------------------------


def test_events_arrive_in_order_with_qos1_and_the_event_json(broker: MosquittoServer) -> None:
    sink = MqttSink(MqttSettings(url=broker.url, client_id="t-order", topic_prefix="t1"))
    events = [event(i, weight_pct=5 * i) for i in range(1, 21)]
    events[-1] = event(20, reason=EventReason.PROMOTED, phase=Phase.SUCCEEDED, weight_pct=0)

    async def scenario() -> None:
        sub = Subscriber(broker, "t1/#", "t-order-sub")
        async with running(sub.run()):
            await subscribed(sub)
            async with running(sink.run()):
                for e in events:
                    sink.offer(e)
                await wait_until(lambda: len(sub.on("events")) == 20, "20 events")
                await wait_until(lambda: len(sub.on("state")) == 20, "20 states")
                assert sink.connected
                assert sample("canaryd_mqtt_connected") == 1.0
        on_events = sub.on("events")
        assert {m.topic.value for m in on_events} == {"t1/shop/checkout/events"}
        assert all(m.qos == 1 and not m.retain for m in on_events)
        assert sub.event_ids() == [e.id for e in events]
        first = json.loads(as_bytes(on_events[0]))
        assert first["schema"] == SCHEMA == "canaryd.io/event/v1"
        assert first["reason"] == "StepStarted"
        assert first["weightPct"] == 5
        assert first["phase"] == "Progressing"
        assert first["steps"] == [10, 50, 100]
        assert as_bytes(on_events[0]) == events[0].encode()
        last = json.loads(as_bytes(on_events[-1]))
        assert (last["reason"], last["phase"], last["weightPct"]) == ("Promoted", "Succeeded", 0)

    sent_before = sample("canaryd_events_sent_total", {"sink": "mqtt", "result": "ok"})
    asyncio.run(scenario())
    assert sample("canaryd_events_sent_total", {"sink": "mqtt", "result": "ok"}) == sent_before + 20
    assert not sink.connected
    assert len(sink.outbox) == 0


def test_a_late_subscriber_gets_the_latest_state_retained(broker: MosquittoServer) -> None:
    sink = MqttSink(MqttSettings(url=broker.url, client_id="t-state", topic_prefix="t2"))

    async def scenario() -> None:
        early = Subscriber(broker, "t2/+/+/state", "t-state-early")
        async with running(early.run(), sink.run()):
            await subscribed(early)
            sink.offer(event(1, weight_pct=10))
            sink.offer(event(2, reason=EventReason.WAITING_APPROVAL, weight_pct=10))
            sink.offer(event(3, name="cart", weight_pct=30))
            sink.offer(event(4, reason=EventReason.APPROVED, weight_pct=50))
            await wait_until(lambda: len(early.on("state")) == 4, "4 live states")
        assert not any(m.retain for m in early.on("state"))  # live ones are not flagged

        late = Subscriber(broker, "t2/+/+/state", "t-state-late")
        async with running(late.run()):
            await wait_until(lambda: len(late.messages) == 2, "2 retained states")
            await asyncio.sleep(0.2)  # nothing more comes
        states = {m.topic.value: m for m in late.messages}
        assert set(states) == {"t2/shop/checkout/state", "t2/shop/cart/state"}
        assert all(m.retain and m.qos == 1 for m in late.messages)
        checkout = json.loads(as_bytes(states["t2/shop/checkout/state"]))
        assert (checkout["id"], checkout["reason"], checkout["weightPct"]) == (
            "ev0004",
            "Approved",
            50,
        )
        assert checkout["phase"] == "Progressing"
        cart = json.loads(as_bytes(states["t2/shop/cart/state"]))
        assert (cart["id"], cart["weightPct"]) == ("ev0003", 30)

    asyncio.run(scenario())


# -- the broker goes away ---------------------------------------------------------------


def _timed_offers(sink: MqttSink, events: list[RolloutEvent]) -> list[float]:
    took_s = []
    for e in events:
        start = time.perf_counter()
        sink.offer(e)
        took_s.append(time.perf_counter() - start)
    return took_s


def test_events_queue_while_the_broker_is_down_and_none_are_lost(
    persistent_broker: MosquittoServer,
) -> None:
    broker = persistent_broker
    sink = MqttSink(MqttSettings(url=broker.url, client_id="t-down", timeout_s=3.0))
    sent_before = sample("canaryd_events_sent_total", {"sink": "mqtt", "result": "ok"})
    before = [event(i) for i in range(1, 4)]
    during = [event(i, weight_pct=50) for i in range(4, 34)]
    after = [event(i, weight_pct=100) for i in range(34, 37)]

    async def scenario() -> None:
        sub = Subscriber(broker, "canaryd/shop/+/events", "t-down-sub", persistent=True)
        async with running(sub.run(), sink.run()):
            await subscribed(sub)
            await wait_until(lambda: sink.connected, "the sink to connect")
            for e in before:
                sink.offer(e)
            await wait_until(lambda: len(sub.event_ids()) == 3, "the first 3 events")

            await asyncio.to_thread(broker.stop)
            await wait_until(lambda: not sink.connected, "the sink to see the broker go")
            assert sample("canaryd_mqtt_connected") == 0.0
            took_s = _timed_offers(sink, during)
            assert max(took_s) < 0.001, f"offer() waited {max(took_s) * 1000:.2f} ms"
            assert len(sink.outbox) == 30
            await asyncio.sleep(0.6)  # at least one failed reconnect
            assert len(sink.outbox) == 30 and sink.outbox.dropped == 0

            await asyncio.to_thread(broker.start)
            await wait_until(lambda: sink.connected, "the sink to reconnect")
            for e in after:
                sink.offer(e)
            await wait_until(lambda: len(sub.event_ids()) >= 36, "all 36 events")
        assert sub.event_ids() == [e.id for e in before + during + after]
        assert sink.outbox.dropped == 0
        sent = sample("canaryd_events_sent_total", {"sink": "mqtt", "result": "ok"})
        assert sent - sent_before == 36  # each sent once: nothing was in flight at the stop

    asyncio.run(scenario())


def test_a_full_queue_drops_the_oldest_and_counts_them(
    persistent_broker: MosquittoServer,
) -> None:
    broker = persistent_broker
    sink = MqttSink(MqttSettings(url=broker.url, client_id="t-drop"), capacity=5)
    during = [event(i) for i in range(1, 9)]

    async def scenario() -> None:
        sub = Subscriber(broker, "canaryd/shop/+/events", "t-drop-sub", persistent=True)
        async with running(sub.run(), sink.run()):
            await subscribed(sub)
            await wait_until(lambda: sink.connected, "the sink to connect")
            sink.offer(event(0))
            await wait_until(lambda: len(sub.event_ids()) == 1, "the first event")

            await asyncio.to_thread(broker.stop)
            await wait_until(lambda: not sink.connected, "the sink to see the broker go")
            dropped_before = dropped_total()
            took_s = _timed_offers(sink, during)
            assert max(took_s) < 0.001, f"offer() waited {max(took_s) * 1000:.2f} ms"
            assert sink.outbox.dropped == 3
            assert dropped_total() == dropped_before + 3
            assert [e.id for e in sink.outbox] == [e.id for e in during[3:]]

            await asyncio.to_thread(broker.start)
            await wait_until(lambda: len(sub.event_ids()) >= 6, "the 5 kept events")
            await asyncio.sleep(0.1)
        assert sub.event_ids() == ["ev0000"] + [e.id for e in during[3:]]
        assert sink.outbox.dropped == 3
        assert dropped_total() == dropped_before + 3

    asyncio.run(scenario())


def test_an_event_whose_publish_times_out_is_kept_and_sent_first() -> None:
    """The broker hangs mid-stream: the publish in flight times out, the event goes
    back to the front of the queue, and after the broker wakes all arrive in order."""
    require_mosquitto()
    events = [event(i) for i in range(1, 5)]
    with MosquittoServer() as broker:
        sink = MqttSink(MqttSettings(url=broker.url, client_id="t-hang", timeout_s=0.5))
        sent_before = sample("canaryd_events_sent_total", {"sink": "mqtt", "result": "ok"})

        async def scenario() -> None:
            sub = Subscriber(broker, "canaryd/#", "t-hang-sub", persistent=True)
            async with running(sub.run(), sink.run()):
                await subscribed(sub)
                await wait_until(lambda: sink.connected, "the sink to connect")
                sink.offer(events[0])
                await wait_until(lambda: sub.event_ids() == ["ev0001"], "the first event")

                broker.pause()
                for e in events[1:]:
                    sink.offer(e)
                await wait_until(lambda: not sink.connected, "the publish to time out")
                # the one in flight was given back, first: nothing lost, order kept
                assert [e.id for e in sink.outbox] == ["ev0002", "ev0003", "ev0004"]

                broker.resume()
                await wait_until(lambda: len(sub.event_ids()) == 4, "all 4 events")
            assert sub.event_ids() == [e.id for e in events]

        asyncio.run(scenario())
    sent = sample("canaryd_events_sent_total", {"sink": "mqtt", "result": "ok"})
    assert sent - sent_before == 4


def test_an_unreachable_broker_is_retried_quietly(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    require_mosquitto()
    with MosquittoServer() as server:
        url = server.url
    # the server is gone: its port refuses connections
    settings = MqttSettings(url=url, client_id="t-gone", username="u", password="s3cret-pw")
    sink = MqttSink(settings)

    async def scenario() -> None:
        async with running(sink.run()):
            sink.offer(event(1))
            await asyncio.sleep(0.8)
            assert not sink.connected
            assert [e.id for e in sink.outbox] == ["ev0001"]

    asyncio.run(scenario())
    out = logged(capsys, caplog)
    assert "MQTT broker unavailable; retrying" in out
    assert "Connection refused" in out
    assert "Traceback" not in out
    assert "s3cret-pw" not in out


def test_wrong_credentials_are_retried_and_never_logged(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    require_mosquitto()
    with MosquittoServer(users=USERS, acl=ACL) as broker:
        settings = MqttSettings(
            url=broker.url, client_id="t-creds", username="canaryd", password="wrong-pw"
        )
        sink = MqttSink(settings)

        async def scenario() -> None:
            async with running(sink.run()):
                sink.offer(event(1))
                await asyncio.sleep(0.6)
                assert not sink.connected
                assert len(sink.outbox) == 1

        asyncio.run(scenario())
    out = logged(capsys, caplog)
    assert "MQTT broker unavailable; retrying" in out
    assert "Not authorized" in out
    assert "wrong-pw" not in out


def test_mqtts_with_a_ca_file() -> None:
    require_mosquitto()
    with MosquittoServer(tls=True) as broker:
        assert broker.url.startswith("mqtts://")
        good = MqttSink(
            MqttSettings(url=broker.url, client_id="t-tls", ca_file=str(broker.ca_file))
        )
        # without the CA file: the system's CAs, which do not know the test CA
        system = MqttSink(MqttSettings(url=broker.url, client_id="t-tls-system"))

        async def scenario() -> None:
            context = ssl.create_default_context(cafile=str(broker.ca_file))
            sub = Subscriber(broker, "canaryd/#", "t-tls-sub", tls_context=context)
            async with running(sub.run(), good.run(), system.run()):
                await subscribed(sub)
                good.offer(event(1))
                system.offer(event(2))
                await wait_until(lambda: len(sub.on("events")) == 1, "the event over TLS")
                await asyncio.sleep(0.3)
                assert good.connected and not system.connected
            assert sub.event_ids() == ["ev0001"]
            assert [e.id for e in system.outbox] == ["ev0002"]

        asyncio.run(scenario())


# -- commands ---------------------------------------------------------------------------


@dataclass
class Submitted:
    calls: list[tuple[CanaryRef, Command]] = field(default_factory=list)

    async def __call__(self, ref: CanaryRef, command: Command) -> None:
        if ref.name == "broken":
            raise RuntimeError("the Kubernetes API said no")
        self.calls.append((ref, command))


async def publish(
    broker: MosquittoServer, user: str, topic: str, payload: bytes, *, retain: bool = False
) -> None:
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, username=user, password=USERS[user], identifier=f"pub-{user}"
    ) as client:
        await client.publish(topic, payload, qos=1, retain=retain)


def test_commands_from_allowed_users_only(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    require_mosquitto()
    submitted = Submitted()
    results = ("accepted", "refused", "malformed", "failed")
    before = {r: commands_total(r) for r in results}

    def delta() -> dict[str, float]:
        return {r: commands_total(r) - before[r] for r in results}

    async def scenario(broker: MosquittoServer) -> None:
        settings = MqttSettings(
            url=broker.url,
            username="canaryd",
            password=USERS["canaryd"],
            client_id="t-commands",
            commands=True,
            command_users=frozenset({"alice"}),
        )
        sink = MqttSink(settings, submitted)
        base = "canaryd/shop"
        # retained before canaryd connects: it must not act on it when it does
        await publish(
            broker, "alice", f"{base}/old/commands/alice", b'{"command":"abort"}', retain=True
        )
        async with running(sink.run()):
            await wait_until(lambda: delta()["refused"] == 1, "the retained command refused")
            await publish(broker, "alice", f"{base}/checkout/commands/alice",
                          b'{"command":"approve","weight":50,"reason":"looks good"}')  # fmt: skip
            await publish(broker, "bob", f"{base}/checkout/commands/bob", b'{"command":"abort"}')
            await publish(broker, "alice", f"{base}/checkout/commands/alice", b'{"command": appro')
            await publish(
                broker, "alice", f"{base}/checkout/commands/alice", b'{"command":"deploy"}'
            )
            # bob signs as alice: the broker's ACL drops it, canaryd never sees it
            await publish(broker, "bob", f"{base}/checkout/commands/alice", b'{"command":"abort"}')
            await publish(broker, "alice", f"{base}/broken/commands/alice", b'{"command":"skip"}')
            await publish(broker, "alice", f"{base}/cart/commands/alice", b'{"command":"skip"}')
            await wait_until(lambda: len(submitted.calls) == 2, "the second accepted command")
            await asyncio.sleep(0.1)

    with MosquittoServer(users=USERS, acl=ACL) as broker:
        asyncio.run(scenario(broker))

    (ref1, approve), (ref2, skip) = submitted.calls
    assert ref1 == CanaryRef("shop", "checkout")
    assert approve.kind is CommandKind.APPROVE
    assert (approve.weight, approve.by, approve.reason) == (50, "mqtt:alice", "looks good")
    assert approve.id.startswith("approve-")
    assert ref2 == CanaryRef("shop", "cart")
    assert (skip.kind, skip.by) == (CommandKind.SKIP, "mqtt:alice")
    # retained + bob; malformed JSON + unknown command; the submit that raised
    assert delta() == {"accepted": 2, "refused": 2, "malformed": 2, "failed": 1}
    out = logged(capsys, caplog)
    assert USERS["canaryd"] not in out  # the password is never logged


def test_commands_are_off_by_default(broker: MosquittoServer) -> None:
    submitted = Submitted()
    sink = MqttSink(MqttSettings(url=broker.url, client_id="t-off", topic_prefix="t6"), submitted)

    async def scenario() -> None:
        async with running(sink.run()):
            await wait_until(lambda: sink.connected, "the sink to connect")
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="t-off-pub") as client:
                await client.publish(
                    "t6/shop/checkout/commands/alice", b'{"command":"abort"}', qos=1
                )
            sink.offer(event(1))  # and it still publishes
            sub = Subscriber(broker, "t6/+/+/state", "t-off-sub")
            async with running(sub.run()):
                await wait_until(lambda: len(sub.messages) == 1, "the state")

    asyncio.run(scenario())
    assert submitted.calls == []


# -- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://broker:1883", "broker", 1883, False),
        ("mqtts://broker.example.com:8883", "broker.example.com", 8883, True),
        ("mqtt://broker", "broker", 1883, False),
        ("mqtts://broker", "broker", 8883, True),
        ("MQTT://10.0.0.1:11883/", "10.0.0.1", 11883, False),
        ("mqtt://[::1]:1884", "::1", 1884, False),
    ],
)
def test_parse_url(url: str, host: str, port: int, tls: bool) -> None:
    broker = parse_url(url)
    assert (broker.host, broker.port, broker.tls) == (host, port, tls)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://broker:1883", "not http://"),
        ("tcp://broker:1883", "not tcp://"),
        ("broker:1883", "mqtt://HOST:1883"),
        ("", "no scheme"),
        ("mqtt://:1883", "no host"),
        ("mqtt://broker:99999", "bad host or port"),
        ("mqtt://broker:port", "bad host or port"),
        ("mqtt://broker:0", "1-65535"),
        ("mqtt://broker:1883/topic", "no path"),
        ("mqtt://broker:1883?x=1", "no path"),
        ("mqtt://user:s3cret@broker:1883", "no credentials"),
    ],
)
def test_parse_url_refuses(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        parse_url(url)
    assert "s3cret" not in str(info.value)


def test_settings_are_checked_and_hide_the_password() -> None:
    settings = MqttSettings(url="mqtts://b:8883", username="canaryd", password="s3cret")
    assert "s3cret" not in repr(settings)
    assert settings.broker.tls
    for bad in (
        {"url": "ws://b"},
        {"url": "mqtt://b", "ca_file": "/ca.pem"},
        {"url": "mqtt://b", "topic_prefix": "canaryd/#"},
        {"url": "mqtt://b", "topic_prefix": "/canaryd"},
        {"url": "mqtt://b", "topic_prefix": ""},
        {"url": "mqtt://b", "command_users": frozenset({"a/b"})},
        {"url": "mqtt://b", "command_users": frozenset({"+"})},
        {"url": "mqtt://b", "password": "x"},
        {"url": "mqtt://b", "timeout_s": 0},
    ):
        with pytest.raises(ValueError):
            MqttSettings(**bad)


def test_topic_for() -> None:
    assert topic_for("canaryd", "shop", "checkout", "events") == "canaryd/shop/checkout/events"
    assert topic_for("site/a", "shop", "checkout", "state") == "site/a/shop/checkout/state"
    settings = MqttSettings(url="mqtt://b", topic_prefix="site/a")
    assert settings.command_filter == "site/a/+/+/commands/+"


CMD = MqttSettings(url="mqtt://b", commands=True, command_users=frozenset({"alice", "ci"}))
TOPIC = "canaryd/shop/checkout/commands/alice"


def _ok(payload: dict[str, Any], topic: str = TOPIC) -> tuple[CanaryRef, Command]:
    result = parse_command(topic, json.dumps(payload).encode(), CMD)
    assert not isinstance(result, str), result
    return result


def test_parse_command_accepts() -> None:
    ref, cmd = _ok({"command": "approve", "weight": 50, "reason": "ok"})
    assert ref == CanaryRef("shop", "checkout")
    assert (cmd.kind, cmd.weight, cmd.by, cmd.reason) == (
        CommandKind.APPROVE,
        50,
        "mqtt:alice",
        "ok",
    )
    _, cmd = _ok({"command": "promote", "revision": "v2.1"}, "canaryd/shop/checkout/commands/ci")
    assert (cmd.kind, cmd.revision, cmd.by) == (CommandKind.PROMOTE, "v2.1", "mqtt:ci")
    _, cmd = _ok({"command": "promote"})
    assert cmd.revision  # a timestamp, as the CLI and the API do
    _, cmd = _ok({"command": "abort", "reason": "errors"})
    assert (cmd.kind, cmd.weight, cmd.revision) == (CommandKind.ABORT, None, None)
    _, cmd = _ok({"command": "skip"})
    assert cmd.kind is CommandKind.SKIP


@pytest.mark.parametrize(
    ("topic", "payload", "why"),
    [
        ("canaryd/shop/checkout/commands/bob", b'{"command":"abort"}', "'bob' may not"),
        ("canaryd/shop/checkout/commands/Alice", b'{"command":"abort"}', "may not"),
        ("other/shop/checkout/commands/alice", b'{"command":"abort"}', "prefix"),
        ("canaryd/shop/checkout/command/alice", b'{"command":"abort"}', "not a command topic"),
        ("canaryd/shop/checkout/commands/alice/x", b'{"command":"abort"}', "not a command topic"),
        ("canaryd/shop/commands/alice", b'{"command":"abort"}', "not a command topic"),
        ("canaryd/Shop/checkout/commands/alice", b'{"command":"abort"}', "Kubernetes name"),
        ("canaryd/shop/-x/commands/alice", b'{"command":"abort"}', "Kubernetes name"),
        (TOPIC, b"{not json", "Invalid JSON"),
        (TOPIC, b"", "Invalid JSON"),
        (TOPIC, b"[1]", "object"),
        (TOPIC, b'{"command":"deploy"}', "command"),
        (TOPIC, b'{"weight":50}', "command: Field required"),
        (TOPIC, b'{"command":"approve","weight":"50"}', "weight"),
        (TOPIC, b'{"command":"approve","weight":true}', "weight"),
        (TOPIC, b'{"command":"approve","weight":101}', "weight"),
        (TOPIC, b'{"command":"approve","by":"root"}', "by: Extra inputs"),
        (TOPIC, b'{"command":"abort","weight":50}', "weight: only for approve"),
        (TOPIC, b'{"command":"approve","revision":"v2"}', "revision: only for promote"),
        (TOPIC, b'{"command":"promote","revision":"v2; rm -rf"}', "revision"),
        (TOPIC, b'{"command":"abort","reason":"' + b"x" * 600 + b'"}', "reason"),
        (TOPIC, b'{"command":"abort","reason":"' + b"x" * MAX_COMMAND_BYTES + b'"}', "4096 bytes"),
    ],
)
def test_parse_command_refuses(topic: str, payload: bytes, why: str) -> None:
    result = parse_command(topic, payload, CMD)
    assert isinstance(result, str)
    assert why in result


def test_parse_command_needs_commands_on() -> None:
    off = MqttSettings(url="mqtt://b", command_users=frozenset({"alice"}))
    assert parse_command(TOPIC, b'{"command":"abort"}', off) == "MQTT commands are off"
