"""Generic webhooks: every event (or the reasons listed) POSTed as signed JSON.

A Canary lists its endpoints in ``spec.notifications.webhooks``; the daemon holds the
signing key (``--webhook-secret-file`` or ``CANARYD_WEBHOOK_SECRET``), never the spec.
Each request carries::

    Content-Type: application/json
    X-Canaryd-Event-Id: 3f2a9c0d1b7e4a55          (the event's id: drop repeats)
    X-Canaryd-Timestamp: 1764950400               (Unix seconds when it was signed)
    X-Canaryd-Signature: sha256=<hex>             (HMAC-SHA256 of "<timestamp>.<body>")

so a receiver checks the signature over the timestamp and the exact body bytes, and
refuses timestamps more than a few minutes old (replays).  The body is
:meth:`~canaryd.events.RolloutEvent.encode` — the same JSON MQTT carries.

Each URL has its own bounded queue and task, so one hanging endpoint delays only its
own events; an event is retried with backoff on timeouts, connection errors, 429
(``Retry-After`` honoured) and 5xx, and given up (counted) after ``attempts``.  Without
a key nothing is sent: canaryd does not send unsigned webhooks.  URLs whose host is a
link-local address (cloud metadata endpoints) are refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import structlog

from canaryd.events import RolloutEvent
from canaryd.kube import CanaryObject
from canaryd.outbox import EVENTS_SENT, OUTBOX_SIZE, Outbox, backoff_delays
from canaryd.ports import CanaryRef

log = structlog.get_logger("canaryd.webhooks")

SIGNATURE_HEADER = "X-Canaryd-Signature"
TIMESTAMP_HEADER = "X-Canaryd-Timestamp"
EVENT_ID_HEADER = "X-Canaryd-Event-Id"
#: the most endpoints the sink keeps a queue for (a bound on what specs can make it hold)
MAX_ENDPOINTS = 1000


def sign(key: bytes, timestamp_s: int, body: bytes) -> str:
    """The signature header's value: ``sha256=`` + HMAC-SHA256 of ``<ts>.<body>``."""
    digest = hmac.new(key, f"{timestamp_s}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(
    key: bytes, headers: dict[str, str], body: bytes, now_s: float, max_age_s: float = 300
) -> bool:
    """What a receiver does (and the tests check): signature and freshness."""
    try:
        timestamp_s = int(headers[TIMESTAMP_HEADER])
    except (KeyError, ValueError):
        return False
    if abs(now_s - timestamp_s) > max_age_s:
        return False
    return hmac.compare_digest(headers.get(SIGNATURE_HEADER, ""), sign(key, timestamp_s, body))


def refused_host(url: str) -> str | None:
    """Why ``url`` may not be called, or None: link-local hosts are cloud metadata."""
    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host.lower().startswith("metadata."):
            return f"{host} is a cloud metadata endpoint"
        return None
    if address.is_link_local:
        return f"{host} is link-local (cloud metadata lives there)"
    return None


@dataclass(frozen=True)
class WebhookSettings:
    """The daemon's webhook settings (the URLs are on each Canary)."""

    key: bytes | None = field(default=None, repr=False)
    timeout_s: float = 5.0
    attempts: int = 6
    capacity: int = OUTBOX_SIZE
    trust_env: bool = True  #: honour HTTP(S)_PROXY / NO_PROXY


class WebhookSink:
    """Delivers events to the webhooks each Canary lists (see the module docstring)."""

    name = "webhooks"

    def __init__(
        self,
        settings: WebhookSettings,
        lookup: Callable[[CanaryRef], CanaryObject | None],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.lookup = lookup
        self.sleep = sleep
        self.clock = clock
        self.queues: dict[str, Outbox[RolloutEvent]] = {}
        self._new = asyncio.Event()
        self._warned: set[str] = set()

    def offer(self, event: RolloutEvent) -> None:
        canary = self.lookup(CanaryRef(event.namespace, event.name))
        spec = canary.spec if canary is not None else None
        if spec is None:
            return
        for hook in spec.notifications.webhooks:
            if hook.events and event.reason.value not in hook.events:
                continue
            if self.settings.key is None:
                self._warn_once(
                    event.key,
                    "webhooks listed but no signing key configured "
                    "(--webhook-secret-file): canaryd sends no unsigned webhooks",
                )
                continue
            why = refused_host(hook.url)
            if why is not None:
                self._warn_once(hook.url, f"webhook refused: {why}")
                continue
            queue = self.queues.get(hook.url)
            if queue is None:
                if len(self.queues) >= MAX_ENDPOINTS:
                    self._warn_once("max", f"more than {MAX_ENDPOINTS} webhook URLs: ignored")
                    continue
                queue = self.queues[hook.url] = Outbox(self.name, self.settings.capacity)
                self._new.set()
            queue.put(event)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, key=key)

    async def run(self) -> None:
        started: set[str] = set()
        async with (
            httpx.AsyncClient(
                timeout=self.settings.timeout_s,
                follow_redirects=False,
                trust_env=self.settings.trust_env,
                headers={"User-Agent": "canaryd-webhooks"},
            ) as client,
            asyncio.TaskGroup() as group,
        ):
            while True:
                self._new.clear()
                for url, queue in list(self.queues.items()):
                    if url not in started:
                        started.add(url)
                        group.create_task(self._deliver(client, url, queue), name=f"webhook:{url}")
                await self._new.wait()

    async def _deliver(
        self, client: httpx.AsyncClient, url: str, queue: Outbox[RolloutEvent]
    ) -> None:
        while True:
            event = await queue.get()
            body = event.encode()
            delays = backoff_delays()
            for attempt in range(1, self.settings.attempts + 1):
                pause_s = next(delays)
                final = attempt >= self.settings.attempts
                try:
                    response = await client.post(
                        url, content=body, headers=self._headers(event, body)
                    )
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                else:
                    if response.is_success:
                        EVENTS_SENT.labels(sink=self.name, result="ok").inc()
                        break
                    problem = f"HTTP {response.status_code}"
                    if response.status_code == 429:
                        pause_s = max(pause_s, _retry_after_s(response))
                    elif response.status_code < 500:
                        final = True  # the endpoint refuses it: retrying will not help
                if final:
                    EVENTS_SENT.labels(sink=self.name, result="failed").inc()
                    log.warning(
                        "webhook gave up", url=url, event_id=event.id,
                        reason=str(event.reason), problem=problem, attempts=attempt,
                    )  # fmt: skip
                    break
                log.info("webhook retry", url=url, problem=problem, after_s=round(pause_s, 2))
                await self.sleep(pause_s)

    def _headers(self, event: RolloutEvent, body: bytes) -> dict[str, str]:
        assert self.settings.key is not None  # offer() queues nothing without a key
        now_s = int(self.clock())
        return {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: event.id,
            TIMESTAMP_HEADER: str(now_s),
            SIGNATURE_HEADER: sign(self.settings.key, now_s, body),
        }


def _retry_after_s(response: httpx.Response) -> float:
    try:
        return min(300.0, max(0.0, float(response.headers.get("Retry-After", "0"))))
    except ValueError:
        return 1.0
