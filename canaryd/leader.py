"""Leader election with a ``coordination.k8s.io/v1`` Lease: one replica acts at a time.

The leader renews the Lease every ``renew_s``; a standby retries every ``retry_s``.
Liveness is judged as client-go judges it: by when *this* process saw the Lease's
record change, on its own monotonic clock, never by comparing the holder's
``renewTime`` with the local wall clock (clocks of two nodes disagree; a standby whose
clock ran ahead would take a live leader's Lease, one whose clock lagged would leave a
dead leader's Lease alone for as long as the skew).  A standby takes the Lease over
once its record has not changed for ``lease_duration_s`` as it watched it, or at once
when the holder released it (no holder).  Every write carries the Lease's
resourceVersion, so of two replicas racing for an expired Lease exactly one wins (the
other gets 409 and stays standby).  A leader that cannot renew stops acting
``lease_duration_s`` after its last successful renewal began, on its own monotonic
clock, which is before any standby, counting from when it saw that renewal, may take
over.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from kubernetes import client as k8s

from canaryd.kube import Kube
from canaryd.ports import ConflictError, KubeError, NotFoundError

log = structlog.get_logger("canaryd.leader")


async def beside(
    body: Callable[[Callable[[], bool]], Coroutine[Any, Any, None]],
    stop: asyncio.Event | None,
    *,
    name: str,
    join_s: float = 30.0,
) -> None:
    """Run ``body(halted)`` on an event loop of its own, in a thread, until ``stop`` is
    set or this task is cancelled (then ``halted()`` turns true and the thread is
    joined).

    Lease renewals keep their time this way however busy the daemon's loop is: a
    round's start on thousands of Canaries is thousands of ready callbacks, and a
    renewal that waits behind them at each of its awaits (list, renew, take) lets the
    Lease lapse mid-round.  On its own loop a renewal waits only for the GIL, which a
    busy thread yields every few milliseconds.  ``body`` must reach the daemon's loop
    only through ``loop.call_soon_threadsafe``.
    """
    halt = threading.Event()
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def finish(error: BaseException | None) -> None:
        if ended.done():
            return
        if error is None:
            ended.set_result(None)
        else:
            ended.set_exception(error)

    def main() -> None:
        error: BaseException | None = None
        try:
            asyncio.run(body(halt.is_set))
        except BaseException as exc:  # handed to the awaiting task, which raises it
            error = exc
        with contextlib.suppress(RuntimeError):  # the daemon's loop already closed
            loop.call_soon_threadsafe(finish, error)

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        waits: set[asyncio.Future[Any]] = {ended} | ({stopping} if stopping else set())
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if ended.done():
            ended.result()
    finally:
        halt.set()
        if stopping is not None:
            stopping.cancel()
        await asyncio.shield(asyncio.to_thread(thread.join, join_s))


async def pause(halted: Callable[[], bool], seconds: float, step_s: float = 0.1) -> None:
    """Sleep ``seconds``, waking early when ``halted()``."""
    deadline = time.monotonic() + seconds
    while not halted() and (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(step_s, left))


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """Lease timing, seconds (defaults as client-go's leader election uses).

    Attributes:
        namespace: namespace of the Lease.
        name: name of the Lease.
        identity: this replica's identity (pod name).
        lease_duration_s: how long a Lease is valid after its last renewal.
        renew_s: how often the leader renews.
        retry_s: how often a standby tries to acquire.
        labels: labels a Lease this replica creates carries (how sharded replicas
            list their group's Leases in one request).
    """

    namespace: str
    name: str
    identity: str
    lease_duration_s: float = 15.0
    renew_s: float = 10.0
    retry_s: float = 2.0
    labels: tuple[tuple[str, str], ...] = ()


def observed(before: tuple[str, float] | None, record: str, now: float) -> tuple[str, float]:
    """``(record, since)``: since when this process has seen a Lease's current record
    (its resourceVersion).  A Lease's age is measured from there on our own monotonic
    clock, never from the holder's timestamps (clocks skew; a renewal changes the record)."""
    return before if before is not None and before[0] == record else (record, now)


class LeaderElector:
    """Holds or waits for the Lease; ``is_leader`` says whether to act now.

    ``wall`` stamps the times written into the Lease (for people reading it);
    ``monotonic`` is the only clock decisions are made by.
    """

    def __init__(
        self,
        kube: Kube,
        settings: LeaseSettings,
        *,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.wall = wall
        self.monotonic = monotonic
        #: monotonic time our last successful renewal began
        self._renewed_at: float | None = None
        #: the Lease record last read (its resourceVersion) and when we first saw it
        self._observed: tuple[str, float] | None = None

    @property
    def is_leader(self) -> bool:
        """True while our last successful renewal is younger than the lease duration."""
        last = self._renewed_at
        return last is not None and self.monotonic() - last < self.settings.lease_duration_s

    def _set(self, renewed_at: float | None) -> None:
        was = self.is_leader
        self._renewed_at = renewed_at
        if was != self.is_leader:
            log.info(
                "leadership changed",
                leader=self.is_leader,
                identity=self.settings.identity,
                lease=f"{self.settings.namespace}/{self.settings.name}",
            )

    def _spec(self, now: datetime, transitions: int, acquired: datetime) -> k8s.V1LeaseSpec:
        return k8s.V1LeaseSpec(
            holder_identity=self.settings.identity,
            lease_duration_seconds=max(1, round(self.settings.lease_duration_s)),
            acquire_time=acquired,
            renew_time=now,
            lease_transitions=transitions,
        )

    def observe(self, lease: k8s.V1Lease) -> tuple[str, bool]:
        """Look at the Lease as listed: its holder and whether it is free to take
        (no holder, or its record unchanged for its duration as this process saw it)."""
        spec = lease.spec or k8s.V1LeaseSpec()
        holder = spec.holder_identity or ""
        duration_s = float(spec.lease_duration_seconds or self.settings.lease_duration_s)
        return holder, not holder or self._observe(lease, self.monotonic()) >= duration_s

    def _observe(self, lease: k8s.V1Lease, started: float) -> float:
        """Seconds the Lease's record has stood unchanged, as this process saw it."""
        record = str((lease.metadata and lease.metadata.resource_version) or "")
        self._observed = observed(self._observed, record, started)
        return self.monotonic() - self._observed[1]

    async def try_acquire_or_renew(
        self, listed: k8s.V1Lease | None = None, *, was_listed: bool = False
    ) -> bool:
        """One attempt; returns whether we hold the Lease afterwards.

        ``was_listed``: the Lease was just listed (``listed``, None when the list did
        not hold it), so it is not read again."""
        s = self.settings
        started = self.monotonic()
        now = self.wall()
        try:
            if was_listed:
                if listed is None:
                    raise NotFoundError(f"lease {s.namespace}/{s.name} not found")
                lease = listed
            else:
                lease = await self.kube.call(
                    self.kube.coordination.read_namespaced_lease, s.name, s.namespace
                )
        except NotFoundError:
            body = k8s.V1Lease(
                metadata=k8s.V1ObjectMeta(
                    name=s.name, namespace=s.namespace, labels=dict(s.labels) or None
                ),
                spec=self._spec(now, 0, now),
            )
            try:
                await self.kube.call(
                    self.kube.coordination.create_namespaced_lease, s.namespace, body
                )
            except ConflictError:
                return False  # another replica created it first
            self._set(started)
            return True
        spec = lease.spec or k8s.V1LeaseSpec()
        holder = spec.holder_identity or ""
        duration_s = float(spec.lease_duration_seconds or s.lease_duration_s)
        unchanged_s = self._observe(lease, started)
        ours = holder == s.identity
        expired = not holder or unchanged_s >= duration_s
        if not ours and not expired:
            self._set(None)
            return False
        transitions = (spec.lease_transitions or 0) + (0 if ours else 1)
        acquired = spec.acquire_time if ours and spec.acquire_time else now
        lease.spec = self._spec(now, transitions, acquired)
        try:
            written = await self.kube.call(
                self.kube.coordination.replace_namespaced_lease, s.name, s.namespace, lease
            )
        except ConflictError:
            self._set(None)
            return False  # someone else renewed or took it in between
        self._observe(written, started)
        self._set(started)
        return True

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Acquire, then keep renewing until ``stop`` is set (or the task is cancelled),
        on a loop of its own (:func:`beside`)."""
        await beside(self._run, stop, name=f"lease:{self.settings.name}")

    async def _run(self, halted: Callable[[], bool]) -> None:
        while not halted():
            try:  # on the lease loop: its calls take that loop's threads, not the daemon's
                held = await self.try_acquire_or_renew()
            except KubeError as exc:
                # keep acting until the lease would have expired, retrying soon
                log.warning("lease attempt failed", error=str(exc), leader=self.is_leader)
                held = False
            await pause(halted, self.settings.renew_s if held else self.settings.retry_s)

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown (no holder), so a standby takes over at
        its next retry."""
        if not self.is_leader:
            return
        s = self.settings
        with contextlib.suppress(KubeError):
            lease = await self.kube.call(
                self.kube.coordination.read_namespaced_lease, s.name, s.namespace
            )
            if lease.spec and lease.spec.holder_identity == s.identity:
                lease.spec.holder_identity = None
                lease.spec.lease_duration_seconds = 1
                await self.kube.call(
                    self.kube.coordination.replace_namespaced_lease, s.name, s.namespace, lease
                )
        self._set(None)
