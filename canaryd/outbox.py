"""Getting events out without ever slowing the control loop.

Every sink (Slack, webhooks, MQTT) owns an :class:`Outbox`: a bounded FIFO that the
control loop puts into without waiting (when full, the oldest event is dropped and
counted in ``canaryd_events_dropped_total{sink}``), and that the sink's own task drains
at its own pace, retrying with :func:`backoff_delays`.  A sink that is down, slow or
rate-limited costs the control loop one ``deque.append``.

:class:`Notifier` fans each event out to every sink's outbox, in order, and runs the
sinks as named, supervised tasks: a sink that crashes is logged and restarted after a
pause, and never takes the daemon down.

Everything runs on the daemon's event loop.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Generic, Protocol, TypeVar

import structlog
from prometheus_client import Counter

from canaryd.events import RolloutEvent
from canaryd.metrics import REGISTRY

log = structlog.get_logger("canaryd.notify")

T = TypeVar("T")

EVENTS_DROPPED = Counter(
    "canaryd_events_dropped",
    "Events a sink's bounded queue dropped (oldest first) because the sink fell behind.",
    ["sink"],
    registry=REGISTRY,
)
EVENTS_SENT = Counter(
    "canaryd_events_sent",
    "Events a sink delivered (result ok) or gave up on after its retries (result failed).",
    ["sink", "result"],
    registry=REGISTRY,
)

#: Default bound of a sink's queue.
OUTBOX_SIZE = 1000


class Outbox(Generic[T]):
    """A bounded FIFO: :meth:`put` never waits (drops the oldest when full), :meth:`get`
    waits for an item.  Loop-local: use from one event loop only."""

    def __init__(self, sink: str, capacity: int = OUTBOX_SIZE) -> None:
        if capacity < 1:
            raise ValueError("an outbox holds at least one item")
        self.sink = sink
        self.capacity = capacity
        self.dropped = 0
        self._items: deque[T] = deque()
        self._ready = asyncio.Event()

    def put(self, item: T) -> None:
        if len(self._items) >= self.capacity:
            self._items.popleft()
            self.dropped += 1
            EVENTS_DROPPED.labels(sink=self.sink).inc()
        self._items.append(item)
        self._ready.set()

    def put_front(self, item: T) -> None:
        """Give back an item that could not be delivered yet (it stays first)."""
        if len(self._items) >= self.capacity:
            self.dropped += 1
            EVENTS_DROPPED.labels(sink=self.sink).inc()
            return  # newer items win: the given-back one is the oldest
        self._items.appendleft(item)
        self._ready.set()

    async def get(self) -> T:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def peek(self) -> T | None:
        return self._items[0] if self._items else None

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(tuple(self._items))


def backoff_delays(
    base_s: float = 0.5, cap_s: float = 30.0, rng: random.Random | None = None
) -> Iterator[float]:
    """Retry pauses: exponential from ``base_s`` up to ``cap_s``, with full jitter in
    the upper half (so that replicas and sinks do not retry in step)."""
    rng = rng or random.Random()
    delay = base_s
    while True:
        yield delay * (0.5 + 0.5 * rng.random())
        delay = min(cap_s, delay * 2)


class EventSink(Protocol):
    """Where events go.  ``offer`` is called on the control loop and must not wait or
    raise; ``run`` delivers until cancelled."""

    @property
    def name(self) -> str: ...

    def offer(self, event: RolloutEvent) -> None: ...

    async def run(self) -> None: ...


class Notifier:
    """Fans events out to the sinks, in order, and keeps their tasks running."""

    def __init__(self, sinks: Sequence[EventSink] = (), restart_s: float = 5.0) -> None:
        self.sinks = list(sinks)
        self.restart_s = restart_s
        self.published = 0

    def publish(self, event: RolloutEvent) -> None:
        self.published += 1
        for sink in self.sinks:
            try:
                sink.offer(event)
            except Exception:  # a sink's bug must not reach the control loop
                log.exception("sink refused an event", sink=sink.name, event_id=event.id)

    async def run(self) -> None:
        """Run every sink until cancelled (the daemon's task group cancels it)."""
        if not self.sinks:
            return
        async with asyncio.TaskGroup() as group:
            for sink in self.sinks:
                group.create_task(self._supervise(sink), name=f"sink:{sink.name}")

    async def _supervise(self, sink: EventSink) -> None:
        while True:
            try:
                await sink.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sink crashed; restarting", sink=sink.name, after_s=self.restart_s)
                await asyncio.sleep(self.restart_s)
