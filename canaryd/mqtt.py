"""MQTT: every event to a broker, each Canary's state retained, and optional commands.

For the Canary ``<ns>/<name>``, with the default prefix ``canaryd``:

``canaryd/<ns>/<name>/events`` (QoS 1)
    every :class:`~canaryd.events.RolloutEvent`, in order, as
    :meth:`~canaryd.events.RolloutEvent.encode` (the same JSON webhooks carry).
``canaryd/<ns>/<name>/state`` (QoS 1, retained)
    the latest event again: a subscriber that connects later gets the Canary's phase,
    weight, step, revision and verdict at once.
``canaryd/<ns>/<name>/commands/<user>`` (only with ``commands`` on)
    ``{"command": "approve"|"abort"|"promote"|"skip", "revision"?: str,
    "weight"?: int, "reason"?: str}`` (at most 4 KiB), from the MQTT user ``<user>``.

Delivery is at least once: an event leaves the sink's :class:`~canaryd.outbox.Outbox`
only once the broker acknowledged it, so a connection lost between the broker's
receipt and its PUBACK sends it twice (consumers drop repeats by the event ``id``).
While the broker is away, events wait in the outbox (bounded, oldest dropped and
counted); the sink reconnects with :func:`~canaryd.outbox.backoff_delays`.

Commands.  MQTT does not tell a subscriber who published a message, so the publisher's
name is the topic's last segment, and the *broker* makes it true: its ACL lets each
user write only under its own name.  canaryd then accepts a command only from the users
in ``command_users``.  A mosquitto example (``acl_file``)::

    # canaryd itself: publishes events and state, reads commands
    user canaryd
    topic readwrite canaryd/#

    # dashboards and other readers
    user viewer
    topic read canaryd/#

    # every user may publish commands under its own name, and only there
    pattern write canaryd/+/+/commands/%u

with ``allow_anonymous false`` and a ``password_file``, and canaryd started with
``command_users={"alice", "ci"}``.  Never list canaryd's own user (it may write
everywhere).  Retained command messages are refused (a retained command would be
replayed on every reconnect), as are commands for names that are not Kubernetes
names, malformed payloads and unknown users; each is logged in one line and counted in
``canaryd_mqtt_commands_total{result}`` (``accepted``, ``refused``, ``malformed``,
``failed``).  Commands sent while canaryd is disconnected are lost (clean session).

Each replica needs its own ``client_id``: a broker disconnects a client when another
connects with the same id.
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import aiomqtt
import structlog
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from canaryd.events import RolloutEvent
from canaryd.kube import new_command
from canaryd.metrics import REGISTRY
from canaryd.outbox import EVENTS_SENT, OUTBOX_SIZE, Outbox, backoff_delays
from canaryd.ports import CanaryRef
from canaryd.rollout import Command, CommandKind

__all__ = [
    "MAX_COMMAND_BYTES",
    "BrokerUrl",
    "CommandPayload",
    "MqttSettings",
    "MqttSink",
    "parse_command",
    "parse_url",
    "tls_context",
    "topic_for",
]

log = structlog.get_logger("canaryd.mqtt")

CONNECTED = Gauge(
    "canaryd_mqtt_connected",
    "1 while the MQTT sink is connected to its broker, else 0.",
    registry=REGISTRY,
)
COMMANDS = Counter(
    "canaryd_mqtt_commands",
    "Commands received over MQTT, by result (accepted, refused, malformed, failed).",
    ["result"],
    registry=REGISTRY,
)

#: the largest command payload read
MAX_COMMAND_BYTES = 4096
#: how long a command's submit may take
SUBMIT_TIMEOUT_S = 30.0
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
#: a namespace (DNS-1123 label) and a Canary name (DNS-1123 subdomain)
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_TOPIC_SPECIAL = re.compile(r"[+#\x00]")

Result = Literal["accepted", "refused", "malformed", "failed"]
Submit = Callable[[CanaryRef, Command], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """Where the broker is: ``host``, ``port``, and whether to speak TLS."""

    host: str
    port: int
    tls: bool


def parse_url(url: str) -> BrokerUrl:
    """``mqtt://HOST[:PORT]`` (default 1883) or ``mqtts://HOST[:PORT]`` (TLS, 8883).

    Raises :class:`ValueError`, saying what is wrong, for any other scheme, a missing
    host, a bad port, a path, query or fragment, or credentials in the URL (they go in
    ``username`` and ``password``, and are never echoed back).
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(
            "not a broker URL (mqtt://HOST:1883 or mqtts://HOST:8883): bad host or port"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        shown = f"{scheme}://" if scheme else "no scheme"
        raise ValueError(f"a broker URL is mqtt://HOST:1883 or mqtts://HOST:8883, not {shown}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("no credentials in the broker URL: set the username and password apart")
    if not parts.hostname:
        raise ValueError("the broker URL has no host (mqtt://HOST:1883)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a broker URL has no path, query or fragment (mqtt://HOST:1883)")
    if port == 0:
        raise ValueError("the broker URL's port must be 1-65535")
    return BrokerUrl(parts.hostname, port or _DEFAULT_PORTS[scheme], scheme == "mqtts")


def topic_for(prefix: str, namespace: str, name: str, leaf: str) -> str:
    """``<prefix>/<namespace>/<name>/<leaf>``: ``events``, ``state``, ``commands/<user>``."""
    return f"{prefix}/{namespace}/{name}/{leaf}"


@dataclass(frozen=True)
class MqttSettings:
    """The daemon's MQTT settings (see the module docstring).

    Attributes:
        url: ``mqtt://host:1883`` or ``mqtts://host:8883`` (:func:`parse_url`).
        username, password: the broker's credentials (the password is never shown).
        client_id: this replica's MQTT client id (unique per replica).
        topic_prefix: the first topic levels, without wildcards or outer slashes.
        ca_file: for ``mqtts``: the CA bundle to trust (default: the system's CAs).
        commands: subscribe to commands.
        command_users: the MQTT users whose commands are accepted.
        keepalive_s: MQTT keepalive.
        timeout_s: how long connecting and each publish may take.
        reconnect_max_s: the longest pause between reconnection attempts.
    """

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str = "canaryd"
    topic_prefix: str = "canaryd"
    ca_file: str | None = None
    commands: bool = False
    command_users: frozenset[str] = frozenset()
    keepalive_s: int = 30
    timeout_s: float = 10.0
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        broker = parse_url(self.url)
        if self.ca_file is not None and not broker.tls:
            raise ValueError("a CA file needs TLS: use mqtts://HOST:8883")
        if self.password is not None and self.username is None:
            raise ValueError("an MQTT password needs a username")
        prefix = self.topic_prefix
        if not prefix or prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
            raise ValueError(f"bad MQTT topic prefix {prefix!r}: no empty levels")
        if _TOPIC_SPECIAL.search(prefix):
            raise ValueError(f"bad MQTT topic prefix {prefix!r}: no wildcards (+, #)")
        for user in self.command_users:
            if not user or "/" in user or _TOPIC_SPECIAL.search(user):
                raise ValueError(f"bad MQTT command user {user!r}: one topic level, no wildcards")
        if not self.client_id:
            raise ValueError("the MQTT client id must not be empty")
        if self.keepalive_s < 1 or self.timeout_s <= 0 or self.reconnect_max_s <= 0:
            raise ValueError("the MQTT keepalive and timeout must be positive")

    @property
    def broker(self) -> BrokerUrl:
        return parse_url(self.url)

    @property
    def command_filter(self) -> str:
        """The subscription for commands: ``<prefix>/+/+/commands/+``."""
        return f"{self.topic_prefix}/+/+/commands/+"


class CommandPayload(BaseModel):
    """A command message's JSON: strict, nothing else allowed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    command: CommandKind
    revision: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$"
    )
    weight: int | None = Field(default=None, ge=1, le=100)
    reason: str = Field(default="", max_length=500)


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why a command message is not taken, and how it is counted."""

    result: Result
    why: str


def _judge(
    topic: str, payload: bytes, settings: MqttSettings
) -> tuple[CanaryRef, Command] | _Refusal:
    """The command a message asks for, or why not."""
    head = f"{settings.topic_prefix}/"
    if not topic.startswith(head):
        return _Refusal("refused", "not under the topic prefix")
    levels = topic[len(head) :].split("/")
    if len(levels) != 4 or levels[2] != "commands":
        return _Refusal("refused", "not a command topic (<prefix>/<ns>/<name>/commands/<user>)")
    namespace, name, _, user = levels
    if not _NAMESPACE.fullmatch(namespace) or not _NAME.fullmatch(name):
        return _Refusal("refused", "the namespace or name is not a Kubernetes name")
    if not settings.commands:
        return _Refusal("refused", "MQTT commands are off")
    if user not in settings.command_users:
        return _Refusal("refused", f"user {user!r} may not send commands")
    if len(payload) > MAX_COMMAND_BYTES:
        return _Refusal("malformed", f"payload over {MAX_COMMAND_BYTES} bytes")
    try:
        body = CommandPayload.model_validate_json(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in exc.errors()
        )
        return _Refusal("malformed", problems[:300])
    if body.revision is not None and body.command is not CommandKind.PROMOTE:
        return _Refusal("malformed", "revision: only for promote")
    if body.weight is not None and body.command is not CommandKind.APPROVE:
        return _Refusal("malformed", "weight: only for approve")
    command = new_command(
        body.command,
        f"mqtt:{user}",
        revision=body.revision,
        weight=body.weight,
        reason=body.reason,
    )
    return CanaryRef(namespace, name), command


def parse_command(
    topic: str, payload: bytes, settings: MqttSettings
) -> tuple[CanaryRef, Command] | str:
    """The Canary and command a message on ``topic`` asks for, or why it is refused.

    ``topic`` is ``<prefix>/<ns>/<name>/commands/<user>``, ``user`` must be in
    ``settings.command_users`` (the broker's ACL guarantees it is the publisher), and
    ``payload`` a :class:`CommandPayload` of at most 4 KiB; the command is by
    ``mqtt:<user>``.
    """
    judged = _judge(topic, payload, settings)
    return judged.why if isinstance(judged, _Refusal) else judged


def _problem(exc: BaseException) -> str:
    """One line: the exception and, for aiomqtt's wrappers, its cause."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho-mqtt 2.2 leaves the socket open when the TLS handshake raises (a certificate
    it does not trust, say), leaking one file descriptor per reconnect until the
    garbage collector finds it.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying TLS client context: trusting ``ca_file``, or the system's CAs."""
    context = ssl.create_default_context(cafile=ca_file)
    context.sslsocket_class = _ClosingSSLSocket
    return context


class MqttSink:
    """Publishes events to an MQTT broker, and optionally reads commands from it.

    ``offer`` only queues; :meth:`run` connects, publishes the queue in order and
    reconnects with backoff until cancelled.  ``submit`` receives accepted commands
    (the daemon's ``add_command``); without it, no commands are read.
    """

    name = "mqtt"

    def __init__(
        self,
        settings: MqttSettings,
        submit: Submit | None = None,
        capacity: int = OUTBOX_SIZE,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.submit = submit
        self.outbox: Outbox[RolloutEvent] = Outbox(self.name, capacity)
        self.connected = False
        self._rng = rng
        self._broker = settings.broker
        self._tls: ssl.SSLContext | None = None
        if self._broker.tls:
            self._tls = tls_context(settings.ca_file)
        #: per Canary, the latest event whose state is not yet published
        self._unsent_state: dict[str, RolloutEvent] = {}

    @property
    def reads_commands(self) -> bool:
        return self.settings.commands and self.submit is not None

    def offer(self, event: RolloutEvent) -> None:
        """Queue ``event`` (never waits; when full, the oldest is dropped and counted)."""
        self.outbox.put(event)

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        CONNECTED.set(1 if connected else 0)

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        return aiomqtt.Client(
            self._broker.host,
            self._broker.port,
            username=s.username,
            password=s.password,
            identifier=s.client_id,
            keepalive=s.keepalive_s,
            tls_context=self._tls,
            timeout=s.timeout_s,
        )

    async def run(self) -> None:
        """Deliver until cancelled: connect, publish, and on a lost connection back off
        and reconnect (one warning line each time)."""
        if self.settings.commands and self.submit is None:
            log.warning("MQTT commands are on but nothing takes them: not subscribing")
        where = f"{self._broker.host}:{self._broker.port}"
        delays = backoff_delays(cap_s=self.settings.reconnect_max_s, rng=self._rng)
        while True:
            problem = "disconnected"
            try:
                async with self._client() as client:
                    self._set_connected(True)
                    delays = backoff_delays(cap_s=self.settings.reconnect_max_s, rng=self._rng)
                    log.info(
                        "MQTT connected", broker=where, tls=self._broker.tls,
                        commands=self.reads_commands, queued=len(self.outbox),
                    )  # fmt: skip
                    async with asyncio.TaskGroup() as group:
                        group.create_task(self._publish(client), name="mqtt:publish")
                        group.create_task(self._read(client), name="mqtt:read")
            except* (aiomqtt.MqttError, OSError, TimeoutError) as errors:
                problem = _problem(errors.exceptions[0])
            finally:
                self._set_connected(False)
            pause_s = next(delays)
            log.warning(
                "MQTT broker unavailable; retrying", broker=where, problem=problem,
                after_s=round(pause_s, 2), queued=len(self.outbox),
            )  # fmt: skip
            await asyncio.sleep(pause_s)

    async def _publish(self, client: aiomqtt.Client) -> None:
        """Publish the queue in order; an event leaves it once the broker has it."""
        timeout_s = self.settings.timeout_s
        await self._publish_states(client)
        while True:
            event = await self.outbox.get()
            topic = topic_for(self.settings.topic_prefix, event.namespace, event.name, "events")
            try:
                await client.publish(topic, event.encode(), qos=1, timeout=timeout_s)
            except BaseException:  # failed, or cancelled with the connection: keep it
                self.outbox.put_front(event)
                raise
            EVENTS_SENT.labels(sink=self.name, result="ok").inc()
            self._unsent_state.pop(event.key, None)  # keep the latest one last
            self._unsent_state[event.key] = event
            await self._publish_states(client)

    async def _publish_states(self, client: aiomqtt.Client) -> None:
        """Publish each Canary's latest state (retained) not yet published."""
        for key, event in list(self._unsent_state.items()):
            topic = topic_for(self.settings.topic_prefix, event.namespace, event.name, "state")
            await client.publish(
                topic, event.encode(), qos=1, retain=True, timeout=self.settings.timeout_s
            )
            if self._unsent_state.get(key) is event:
                del self._unsent_state[key]

    async def _read(self, client: aiomqtt.Client) -> None:
        """Handle commands; also ends (raises) when the connection is lost, which
        stops the publisher with it."""
        if self.reads_commands:
            granted = await client.subscribe(
                self.settings.command_filter, qos=1, timeout=self.settings.timeout_s
            )
            codes = [code if isinstance(code, int) else code.value for code in granted]
            # brokers that check read ACLs on subscribe answer 0x80 (mosquitto 2.0 grants
            # it and filters on delivery instead)
            if any(code >= 0x80 for code in codes):
                log.warning(
                    "MQTT broker refused the command subscription: no commands will arrive",
                    topic=self.settings.command_filter, username=self.settings.username,
                )  # fmt: skip
        async for message in client.messages:
            await self._handle(message)

    async def _handle(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload
        judged: tuple[CanaryRef, Command] | _Refusal
        if message.retain:
            judged = _Refusal("refused", "retained command (it would replay on every reconnect)")
        elif not isinstance(payload, bytes | bytearray):
            judged = _Refusal("malformed", "payload is not bytes")
        else:
            judged = _judge(topic, bytes(payload), self.settings)
        if isinstance(judged, _Refusal):
            COMMANDS.labels(result=judged.result).inc()
            log.warning(
                "MQTT command refused", topic=topic[:300], result=judged.result, why=judged.why
            )
            return
        ref, command = judged
        assert self.submit is not None  # reads_commands
        try:
            async with asyncio.timeout(SUBMIT_TIMEOUT_S):
                await self.submit(ref, command)
        except Exception as exc:  # never raised: logged and counted
            COMMANDS.labels(result="failed").inc()
            log.warning(
                "MQTT command failed", canary=str(ref), command=str(command.kind),
                by=command.by, problem=_problem(exc),
            )  # fmt: skip
            return
        COMMANDS.labels(result="accepted").inc()
        log.info(
            "MQTT command accepted", canary=str(ref), command=str(command.kind),
            by=command.by, id=command.id,
        )  # fmt: skip
