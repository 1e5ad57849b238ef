"""Canaries sharded across replicas on Kubernetes Leases (``canaryd run --shards N``).

A Canary belongs to shard ``hash(namespace/name) mod N`` (a stable hash: the same on
every replica and across restarts).  Each shard is one ``coordination.k8s.io`` Lease,
``<lease-name>-shard-<i>``, taken and renewed by :class:`~canaryd.leader.LeaderElector`
exactly as the single leader's Lease is (liveness judged on this process's monotonic
clock; every write carries the resourceVersion, so of two replicas racing for a shard
one wins).  A replica reconciles the Canaries of the shards it holds and no others.

Who is there: each replica also holds a member Lease of its own,
``<lease-name>-member-<identity>``, renewed with its shards; a member whose Lease has
not changed for its duration (as this process saw it) is gone.  Every Lease of the
group carries the label ``canaryd.io/lease-group: <lease-name>``, so one list request
a tick reads them all.

Fair shares: the live members sorted by identity; the first ``N mod M`` of ``M``
members hold ``N // M + 1`` shards, the others ``N // M``, so that the shares add up to
``N`` on every replica that sees the same members.  Below its share a replica takes
free shards (no holder, or a holder whose Lease ran out), preferring those it ranks
highest (rendezvous hashing, so the same replica tends to get the same shards back);
above it, it hands the shards it ranks lowest over *at a round boundary*: no new
reconcile of their Canaries starts, and the Lease is released (no holder) once those
in progress have ended, so the new holder takes it at its next tick.  A shard nobody's
share covers (the replicas' views of the members differ for a moment) is taken by
anyone once it has been free for two lease durations.

Nothing coordinates but the Leases: there is no leader of the replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import structlog
from kubernetes import client as k8s

from canaryd.kube import Kube
from canaryd.leader import LeaderElector, LeaseSettings, beside, observed, pause
from canaryd.ports import CanaryRef, KubeError

log = structlog.get_logger("canaryd.shards")

GROUP_LABEL = "canaryd.io/lease-group"
ROLE_LABEL = "canaryd.io/lease-role"


def shard_of(ref: CanaryRef, count: int) -> int:
    """The shard a Canary belongs to: a stable hash of ``namespace/name`` mod ``count``."""
    digest = hashlib.blake2b(f"{ref.namespace}/{ref.name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def fair_shares(members: list[str], count: int) -> dict[str, int]:
    """Each member's share of ``count`` shards (they add up to ``count``)."""
    ordered = sorted(set(members))
    if not ordered:
        return {}
    base, extra = divmod(count, len(ordered))
    return {m: base + (1 if i < extra else 0) for i, m in enumerate(ordered)}


def _rank(identity: str, shard: int) -> int:
    """How much ``identity`` prefers ``shard`` (rendezvous hashing)."""
    digest = hashlib.blake2b(f"{identity}#{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def member_lease_name(base: str, identity: str) -> str:
    """``<base>-member-<identity>`` as a valid object name (lower case, at most 253)."""
    slug = re.sub(r"[^a-z0-9.-]+", "-", identity.lower()).strip("-.") or "replica"
    name = f"{base}-member-{slug}"
    if len(name) > 253 or slug != identity:
        tag = hashlib.blake2b(identity.encode(), digest_size=4).hexdigest()
        name = f"{name[:240].rstrip('-.')}-{tag}"
    return name


@dataclass(frozen=True, slots=True)
class ShardSettings:
    """How many shards, and the Lease settings they share.

    Attributes:
        count: number of shards (at least 1).
        lease: namespace, base name, this replica's identity and the timings of every
            Lease of the group (``name`` is the base: shards are ``<name>-shard-<i>``).
    """

    count: int
    lease: LeaseSettings


class ShardManager:
    """Holds a fair share of the shards; :meth:`owns` says whether to reconcile a Canary.

    ``on_acquired(shard)`` is called when this replica takes a shard (wake its
    Canaries); ``busy(ref)`` brackets a reconcile, so that a shard being handed over
    is released only between rounds.
    """

    def __init__(
        self,
        kube: Kube,
        settings: ShardSettings,
        *,
        on_acquired: Callable[[int], None] = lambda shard: None,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.count < 1:
            raise ValueError("shards must be at least 1")
        self.kube = kube
        self.settings = settings
        self.count = settings.count
        self.on_acquired = on_acquired
        self.monotonic = monotonic
        base = settings.lease
        self.identity = base.identity
        group = (GROUP_LABEL, base.name)
        self.electors = [
            LeaderElector(
                kube,
                replace(base, name=f"{base.name}-shard-{i}", labels=(group, (ROLE_LABEL, "shard"))),
                wall=wall,
                monotonic=monotonic,
            )
            for i in range(settings.count)
        ]
        self.member = LeaderElector(
            kube,
            replace(
                base,
                name=member_lease_name(base.name, base.identity),
                labels=(group, (ROLE_LABEL, "member")),
            ),
            wall=wall,
            monotonic=monotonic,
        )
        #: member Lease name -> (its resourceVersion, first seen with it): ``leader.observed``
        self._members_seen: dict[str, tuple[str, float]] = {}
        #: the live members at the last tick, sorted
        self.members: list[str] = [self.identity]
        #: each shard's holder as last listed ("" for none)
        self.holders: list[str] = [""] * settings.count
        #: shards being handed over: no new reconcile starts in them
        self.draining: set[int] = set()
        #: since when (monotonic s) each shard has been seen free
        self._free_since: dict[int, float] = {}
        #: reconciles in progress per shard
        self._busy: Counter[int] = Counter()
        self._renewed: list[float] = [-float("inf")] * settings.count
        self._member_renewed = -float("inf")
        self.changed = asyncio.Event()
        #: how a tick reaches the daemon's loop (``on_acquired``, ``changed``): directly
        #: when ticked on it, ``call_soon_threadsafe`` when :meth:`run` ticks beside it
        self._post: Callable[[Callable[[], None]], object] = lambda fn: fn()

    # -- what the daemon asks ------------------------------------------------------------

    def shard(self, ref: CanaryRef) -> int:
        return shard_of(ref, self.count)

    def holds(self, ref: CanaryRef) -> bool:
        """This replica holds the Canary's shard now (it may finish a round in it)."""
        return self.electors[self.shard(ref)].is_leader

    def owns(self, ref: CanaryRef) -> bool:
        """This replica may start a round for the Canary (held, not being handed over)."""
        shard = self.shard(ref)
        return shard not in self.draining and self.electors[shard].is_leader

    @property
    def held(self) -> list[int]:
        return [i for i, e in enumerate(self.electors) if e.is_leader]

    @contextlib.contextmanager
    def busy(self, ref: CanaryRef) -> Iterator[None]:
        """Bracket one reconcile of ``ref`` (a shard is released only when none runs)."""
        shard = self.shard(ref)
        self._busy[shard] += 1
        try:
            yield
        finally:
            self._busy[shard] -= 1

    def describe(self) -> dict[str, object]:
        """For ``/readyz`` and ``canaryd status``: who holds what, as this replica sees it."""
        return {
            "count": self.count,
            "identity": self.identity,
            "held": self.held,
            "members": list(self.members),
            "holders": {str(i): holder or None for i, holder in enumerate(self.holders)},
        }

    # -- the loop ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Tick every ``retry_s`` until ``stop`` is set (or the task is cancelled), on
        a loop of its own beside the daemon's (:func:`~canaryd.leader.beside`), so that
        renewals keep their time however many Canaries the daemon's loop is busy with."""
        loop = asyncio.get_running_loop()
        self._post = loop.call_soon_threadsafe
        try:
            await beside(self._ticks, stop, name="shard-leases")
        finally:
            self._post = lambda fn: fn()

    async def _ticks(self, halted: Callable[[], bool]) -> None:
        while not halted():
            try:  # on the lease loop: its calls take that loop's threads, not the daemon's
                await self.tick()
            except KubeError as exc:
                # held shards stay held until their Leases would have run out
                log.warning("shard leases: attempt failed", error=str(exc), held=self.held)
            await pause(halted, self.settings.lease.retry_s)

    def _target(self) -> int:
        return fair_shares(self.members, self.count).get(self.identity, 0)

    async def tick(self) -> None:
        """One look at the group's Leases: renew, hand over above the share, take below."""
        s = self.settings.lease
        listed = await self.kube.call(
            self.kube.coordination.list_namespaced_lease,
            s.namespace,
            label_selector=f"{GROUP_LABEL}={s.name}",
        )
        by_name: dict[str, k8s.V1Lease] = {
            str(lease.metadata.name): lease for lease in listed.items if lease.metadata
        }
        now = self.monotonic()
        if not self.member.is_leader or now - self._member_renewed >= s.renew_s:
            member = by_name.get(self.member.settings.name)
            if await self.member.try_acquire_or_renew(member, was_listed=True):
                self._member_renewed = now
        self._see_members(by_name)
        before = set(self.held)
        free: list[int] = []
        for i, elector in enumerate(self.electors):
            lease = by_name.get(elector.settings.name)
            holder, is_free = elector.observe(lease) if lease is not None else ("", True)
            self.holders[i] = holder
            if elector.is_leader:
                due = now - self._renewed[i] >= s.renew_s
                if due and await elector.try_acquire_or_renew(lease, was_listed=True):
                    self._renewed[i] = now
                if elector.is_leader:
                    self.holders[i] = self.identity
            elif is_free:
                free.append(i)
            if is_free and not elector.is_leader:
                self._free_since.setdefault(i, now)
            else:
                self._free_since.pop(i, None)
        await self._hand_over()
        await self._take(free, by_name, now)
        if set(self.held) != before:
            log.info("shards changed", held=self.held, members=self.members, identity=self.identity)
            self._post(self.changed.set)

    def _see_members(self, by_name: dict[str, k8s.V1Lease]) -> None:
        now = self.monotonic()
        live = {self.identity}
        seen: dict[str, tuple[str, float]] = {}
        for name, lease in by_name.items():
            meta = lease.metadata or k8s.V1ObjectMeta()
            if (meta.labels or {}).get(ROLE_LABEL) != "member" or name == self.member.settings.name:
                continue
            spec = lease.spec or k8s.V1LeaseSpec()
            holder = spec.holder_identity or ""
            seen[name] = observed(
                self._members_seen.get(name), str(meta.resource_version or ""), now
            )
            since = seen[name][1]
            duration_s = float(spec.lease_duration_seconds or self.settings.lease.lease_duration_s)
            if holder and now - since < duration_s:
                live.add(holder)
        self._members_seen = seen
        self.members = sorted(live)

    async def _hand_over(self) -> None:
        """Above the share: mark the lowest-ranked held shards; release each once no
        reconcile of it is in progress (a round boundary)."""
        keep = [i for i in self.held if i not in self.draining]
        extra = len(keep) - self._target()
        if extra > 0:
            for i in sorted(keep, key=lambda i: _rank(self.identity, i))[:extra]:
                self.draining.add(i)
                log.info("handing a shard over", shard=i, identity=self.identity)
        for i in sorted(self.draining):
            if not self.electors[i].is_leader:
                self.draining.discard(i)  # lost meanwhile: nothing to release
            elif self._busy[i] == 0:
                await self.electors[i].release()
                self.holders[i] = ""
                self.draining.discard(i)
                self._free_since[i] = self.monotonic()

    async def _take(self, free: list[int], by_name: dict[str, k8s.V1Lease], now: float) -> None:
        """Below the share, take free shards, the highest-ranked first; take an orphan
        (free for two lease durations) whatever the share."""
        duration_s = self.settings.lease.lease_duration_s
        for i in sorted(free, key=lambda i: -_rank(self.identity, i)):
            orphan = now - self._free_since.get(i, now) >= 2 * duration_s
            if len(self.held) >= self._target() and not orphan:
                continue
            elector = self.electors[i]
            if await elector.try_acquire_or_renew(
                by_name.get(elector.settings.name), was_listed=True
            ):
                self._renewed[i] = now
                self.holders[i] = self.identity
                self._free_since.pop(i, None)
                log.info("took a shard", shard=i, identity=self.identity, orphan=orphan)
                self._post(functools.partial(self.on_acquired, i))

    async def release_all(self) -> None:
        """On a clean stop: give every shard up and leave the group, so that the others
        take the shards over at their next tick instead of a lease duration later."""
        for elector in self.electors:
            await elector.release()
        s = self.member.settings
        with contextlib.suppress(KubeError):
            await self.kube.call(
                self.kube.coordination.delete_namespaced_lease, s.name, s.namespace
            )
