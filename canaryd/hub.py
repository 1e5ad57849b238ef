"""The status hub: what this replica knows of every Canary, for the API and dashboard.

The daemon feeds it from its watch cache and its own writes (:meth:`StatusHub.update`,
:meth:`StatusHub.remove`) and from each evaluation round (:meth:`StatusHub.round`), so
a standby replica, which watches but does not reconcile, answers reads too (it has no
per-interval series: only the leader observes metrics).  Readers get snapshots:
immutable parsed Canaries and pre-built summaries, never a lock on the control loop.

Everything runs on the daemon's event loop; nothing here does I/O or blocks.

* **Events** (:class:`~canaryd.views.EventView`): phase changes, weight changes and
  verdicts other than "continue", derived by comparing each new version of a Canary
  with the last one.  Kept in a bounded ring (``ring_size``) with ids
  ``<boot>-<sequence>``; a subscriber resumes after any id still in the ring, and is
  told to reload (a ``reset`` event) when the id is older or from another process.
* **Subscribers** each get a bounded queue.  One that falls ``subscriber_queue`` events
  behind is cut off (its stream ends, counted in :attr:`StatusHub.dropped`): the
  browser reconnects with ``Last-Event-ID`` and resumes from the ring.  Publishing
  never waits for a reader.
* **Series**: per interval, both arms' requests, errors, error rate and latency
  percentiles, from the increase of the counters between two rounds; reset when the
  revision changes, at most ``series_points`` kept per Canary (compact tuples).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

from analysis.counts import ArmCounts, Observation
from canaryd.events import RolloutEvent
from canaryd.kube import CanaryObject
from canaryd.ports import CanaryRef
from canaryd.slo import ServiceSlo
from canaryd.status import Phase, VerdictDecision, VerdictRecord
from canaryd.views import (
    CanaryDetail,
    CanarySummary,
    EventType,
    EventView,
    Series,
    SeriesPoint,
    arm_point,
    increase,
    spec_summary_of,
    summary_of,
)


@dataclass(slots=True)
class _Entry:
    canary: CanaryObject
    summary: CanarySummary
    #: the summary as JSON (camelCase), built once per version for the list endpoint
    summary_json: dict[str, Any]


@dataclass(slots=True)
class _SeriesState:
    revision: str | None
    last_at: datetime | None = None
    last: Observation | None = None
    #: (at, weight, step, canary delta, stable delta, decision)
    points: deque[tuple[datetime, int, int, ArmCounts, ArmCounts, str | None]] = field(
        default_factory=deque
    )


@dataclass(slots=True, eq=False)
class Subscription:
    """One SSE client: events arrive on ``queue``; ``None`` means the stream must end."""

    queue: asyncio.Queue[EventView | None]
    #: the loop the reader runs on (the API's): events are put on the queue there
    loop: asyncio.AbstractEventLoop
    namespace: str | None = None
    canaries: frozenset[CanaryRef] = frozenset()

    def wants(self, event: EventView) -> bool:
        if self.namespace is not None and event.namespace != self.namespace:
            return False
        return not self.canaries or CanaryRef(event.namespace, event.name) in self.canaries


P = ParamSpec("P")
R = TypeVar("R")


def _locked(method: Callable[P, R]) -> Callable[P, R]:
    """Run the hub method under the hub's lock."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with args[0].lock:  # type: ignore[attr-defined]
            return method(*args, **kwargs)

    return wrapper


class StatusHub:
    """Snapshots, events and series of every Canary this replica sees."""

    def __init__(
        self, *, ring_size: int = 2000, series_points: int = 360, subscriber_queue: int = 256
    ) -> None:
        self.boot = secrets.token_hex(3)
        self.series_points = series_points
        self.subscriber_queue = subscriber_queue
        self._entries: dict[CanaryRef, _Entry] = {}
        self._ring: deque[EventView] = deque(maxlen=ring_size)
        #: each ring event's JSON, encoded once for every subscriber
        self._encoded: dict[str, str] = {}
        self._seq = 0
        self._series: dict[CanaryRef, _SeriesState] = {}
        self._subscribers: set[Subscription] = set()
        #: per Canary: verdicts made by this replica, by (decision, check)
        self.decisions: dict[CanaryRef, Counter[tuple[str, str]]] = {}
        #: per Canary: rollouts ended by this replica, by outcome (terminal phase)
        self.rollouts: dict[CanaryRef, Counter[str]] = {}
        #: events not delivered to subscribers that fell behind (they resume from the ring)
        self.dropped = 0
        #: bumped on every change of a row: readers may cache what they built from it
        self.version = 0
        #: held by every method: the daemon's loop writes, the API's thread reads
        self.lock = threading.RLock()
        #: every service's SLO figures, by (namespace, service) (``canaryd.slo``)
        self.slos: dict[tuple[str, str], ServiceSlo] = {}

    # -- fed by the daemon ---------------------------------------------------------------

    @_locked
    def update(self, canary: CanaryObject, now: datetime | None = None) -> None:
        """A Canary as the watch or our own write has it now."""
        old = self._entries.get(canary.ref)
        if old is not None and old.canary.resource_version == canary.resource_version:
            return
        summary = summary_of(canary)
        self.version += 1
        self._entries[canary.ref] = _Entry(
            canary, summary, summary.model_dump(mode="json", by_alias=True)
        )
        at = now or canary.status.phase_since or summary.created_at
        if old is None:
            self._publish(EventType.ADDED, canary.ref, f"{summary.phase}", summary, at)
            return
        before, after = old.canary.status, canary.status
        if before.phase != after.phase:
            text = f"{before.phase} → {after.phase}"
            self._publish(EventType.PHASE, canary.ref, _with(text, after.message), summary, at)
        if before.canary_weight != after.canary_weight:
            text = f"canary weight {before.canary_weight}% → {after.canary_weight}%"
            self._publish(EventType.WEIGHT, canary.ref, text, summary, at)
        verdict = after.last_verdict
        moved = before.step_index != after.step_index or before.phase != after.phase
        if _new_verdict(before.last_verdict, verdict, moved) and verdict is not None:
            reason = verdict.reasons[0] if verdict.reasons else ""
            self._publish(
                EventType.VERDICT, canary.ref, _with(verdict.decision, reason), summary, verdict.at
            )

    @_locked
    def rollout(self, event: RolloutEvent) -> None:
        """A rollout event (the daemon's, as every sink gets it) onto the stream."""
        ref = CanaryRef(event.namespace, event.name)
        entry = self._entries.get(ref)
        self._publish(
            EventType.ROLLOUT, ref, f"{event.reason}: {event.message}",
            entry.summary if entry else None, event.at, event,
        )  # fmt: skip

    @_locked
    def remove(self, ref: CanaryRef, now: datetime | None = None) -> None:
        """The Canary is gone: forget it (its metrics series disappear with it)."""
        entry = self._entries.pop(ref, None)
        self.version += 1
        self._series.pop(ref, None)
        self.decisions.pop(ref, None)
        self.rollouts.pop(ref, None)
        if entry is not None:
            self._publish(EventType.DELETED, ref, "deleted", None, now)

    @_locked
    def round(
        self,
        ref: CanaryRef,
        at: datetime,
        *,
        revision: str | None,
        weight: int,
        step_index: int,
        observation: Observation | None,
        verdict: VerdictRecord | None,
    ) -> None:
        """One evaluation round: a series point (from the counters' increase since the
        last round, at the weight routed meanwhile) and the decision counters."""
        decision = verdict.decision if verdict is not None and verdict.at == at else None
        if decision is not None and verdict is not None:
            counts = self.decisions.setdefault(ref, Counter())
            for check in _deciding_checks(verdict):
                counts[(decision, check)] += 1
        if observation is None or not observation.complete:
            return
        state = self._series.get(ref)
        if state is None or state.revision != revision:
            state = self._series[ref] = _SeriesState(
                revision, points=deque(maxlen=self.series_points)
            )
        if state.last is not None and state.last_at is not None and at > state.last_at:
            assert state.last.canary is not None and state.last.stable is not None
            assert observation.canary is not None and observation.stable is not None
            canary = increase(observation.canary, state.last.canary)
            stable = increase(observation.stable, state.last.stable)
            if canary is not None and stable is not None:
                state.points.append((at, weight, step_index, canary, stable, decision))
        state.last, state.last_at = observation, at

    @_locked
    def latest_intervals(self) -> list[tuple[CanaryRef, ArmCounts, ArmCounts]]:
        """(Canary, canary arm, stable arm): both arms' counts over the last interval of
        each rollout under way (for ``/metrics``).  A Canary whose rollout has ended, or
        with no point of its current revision yet, is left out."""
        latest = []
        for ref, state in self._series.items():
            entry = self._entries.get(ref)
            if entry is None or not state.points:
                continue
            status = entry.canary.status
            if state.revision != status.revision or not status.phase.active:
                continue
            _, _, _, canary, stable, _ = state.points[-1]
            latest.append((ref, canary, stable))
        return latest

    @_locked
    def rollout_ended(self, ref: CanaryRef, outcome: Phase) -> None:
        self.rollouts.setdefault(ref, Counter())[str(outcome)] += 1

    # -- read by the API -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @_locked
    def set_slos(self, slos: Iterable[ServiceSlo]) -> None:
        """Replace every service's SLO figures (a service no longer released drops out)."""
        self.slos = {(s.namespace, s.service): s for s in slos}

    @_locked
    def refs(self) -> list[CanaryRef]:
        return list(self._entries)

    @_locked
    def get(self, ref: CanaryRef) -> CanaryObject | None:
        entry = self._entries.get(ref)
        return entry.canary if entry else None

    @_locked
    def summaries(self) -> list[CanarySummary]:
        return [e.summary for e in self._entries.values()]

    @_locked
    def list_json(self, namespace: str | None = None, phase: Phase | None = None) -> list[Any]:
        """The rows, as JSON, sorted by namespace and name."""
        rows = [
            e.summary_json
            for ref, e in sorted(
                self._entries.items(), key=lambda kv: (kv[0].namespace, kv[0].name)
            )
            if (namespace is None or ref.namespace == namespace)
            and (phase is None or e.summary.phase is phase)
        ]
        return rows

    @_locked
    def detail(self, ref: CanaryRef, events: int = 30) -> CanaryDetail | None:
        entry = self._entries.get(ref)
        if entry is None:
            return None
        canary, st = entry.canary, entry.canary.status
        recent = [
            e for e in reversed(self._ring) if e.namespace == ref.namespace and e.name == ref.name
        ]
        return CanaryDetail(
            summary=entry.summary,
            spec=spec_summary_of(canary),
            spec_error=canary.spec_error,
            last_verdict=st.last_verdict,
            history=st.history,
            approvals=st.approvals,
            conditions=st.conditions,
            events=list(reversed(recent[:events])),
            status=st.to_json(),
        )

    @_locked
    def series(self, ref: CanaryRef) -> Series | None:
        entry = self._entries.get(ref)
        if entry is None:
            return None
        state = self._series.get(ref)
        points = []
        if state is not None and state.revision == entry.canary.status.revision:
            points = [
                SeriesPoint(
                    at=at,
                    canary_weight=weight,
                    step_index=step,
                    canary=arm_point(canary),
                    stable=arm_point(stable),
                    decision=decision,
                )
                for at, weight, step, canary, stable, decision in state.points
            ]
        return Series(
            namespace=ref.namespace,
            name=ref.name,
            revision=entry.canary.status.revision,
            points=points,
        )

    # -- the event stream --------------------------------------------------------------------

    @_locked
    def events_after(self, last_id: str | None) -> list[EventView] | None:
        """The ring's events after ``last_id`` (all with None); None when it is not in
        the ring any more, or from another process: the reader must reload."""
        if not last_id:
            return list(self._ring)
        boot, _, seq_text = last_id.partition("-")
        if boot != self.boot or not seq_text.isdigit():
            return None
        seq = int(seq_text)
        if seq > self._seq:
            return None
        oldest = _seq_of(self._ring[0]) if self._ring else self._seq + 1
        if seq < oldest - 1:
            return None
        return [e for e in self._ring if _seq_of(e) > seq]

    @_locked
    def subscribe(
        self, namespace: str | None = None, canaries: Iterable[CanaryRef] = ()
    ) -> Subscription:
        sub = Subscription(
            asyncio.Queue(self.subscriber_queue),
            asyncio.get_running_loop(),
            namespace,
            frozenset(canaries),
        )
        self._subscribers.add(sub)
        return sub

    @_locked
    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @_locked
    def close(self) -> None:
        """End every open stream (the server is stopping)."""
        for sub in list(self._subscribers):
            self._cut(sub)

    @_locked
    def _cut(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        _on_loop(sub.loop, self._end, sub)

    @staticmethod
    def _end(sub: Subscription) -> None:
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)

    @_locked
    def _deliver(self, sub: Subscription, event: EventView) -> None:
        """On the subscriber's loop: queue the event, or cut a reader that fell behind."""
        if sub not in self._subscribers:
            return
        try:
            sub.queue.put_nowait(event)
        except asyncio.QueueFull:
            # too slow: cut it off rather than wait; it resumes from the ring
            self.dropped += sub.queue.qsize() + 1
            self._cut(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @_locked
    def encoded(self, event: EventView) -> str:
        """The event as JSON (camelCase), encoded once however many streams send it."""
        text = self._encoded.get(event.id)
        if text is None:
            text = event.model_dump_json(by_alias=True)
            if event.type is not EventType.RESET:  # ring events: pruned with the ring
                self._encoded[event.id] = text
        return text

    @_locked
    def reset_event(self, at: datetime) -> EventView:
        return EventView(
            id=f"{self.boot}-{self._seq}",
            type=EventType.RESET,
            at=at,
            namespace="",
            name="",
            message="cannot resume from the given Last-Event-ID: reload the canaries",
        )

    @_locked
    def _publish(
        self,
        kind: EventType,
        ref: CanaryRef,
        message: str,
        summary: CanarySummary | None,
        at: datetime | None,
        rollout: RolloutEvent | None = None,
    ) -> None:
        self._seq += 1
        event = EventView(
            id=f"{self.boot}-{self._seq}",
            type=kind,
            at=at or datetime.now().astimezone(),
            namespace=ref.namespace,
            name=ref.name,
            message=message,
            canary=summary,
            event=rollout,
        )
        if len(self._ring) == self._ring.maxlen:
            self._encoded.pop(self._ring[0].id, None)
        self._ring.append(event)
        for sub in list(self._subscribers):
            if not sub.wants(event):
                continue
            _on_loop(sub.loop, self._deliver, sub, event)


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)`` now when called on ``loop``, else soon on ``loop`` (another thread's)."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(*args)
        return
    with contextlib.suppress(RuntimeError):  # that loop is closed: its reader is gone
        loop.call_soon_threadsafe(fn, *args)


def _seq_of(event: EventView) -> int:
    return int(event.id.rpartition("-")[2])


def _with(head: str, tail: str) -> str:
    return f"{head}: {tail}" if tail else head


def _new_verdict(before: VerdictRecord | None, after: VerdictRecord | None, moved: bool) -> bool:
    """A verdict worth an event: not "continue", and not the same decision repeated in
    the same step and phase (a step waiting for approval passes every round)."""
    if after is None or after.decision == VerdictDecision.CONTINUE:
        return False
    if before is None or before.decision != after.decision:
        return True
    return moved and before.at != after.at


def _deciding_checks(verdict: VerdictRecord) -> list[str]:
    """The checks a decision is counted under: for a rollback the breached checks, for
    a hold the shared-incident checks (``data`` when no check could run), else ``all``."""
    if verdict.decision == VerdictDecision.ROLLBACK:
        names = [c.name for c in verdict.checks if c.status == "breach"]
        return names or ["command"]
    if verdict.decision == VerdictDecision.HOLD:
        names = [c.name for c in verdict.checks if c.status == "shared"]
        return names or ["data"]
    return ["all"]
