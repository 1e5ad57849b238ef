"""``canaryd run``: the daemon that drives every Canary (design §2–4, §7).

Named tasks, supervised in one task group:

* ``leader`` — holds or waits for the Lease (when leader election is on); only the
  leader reconciles;
* ``discover`` — lists Canaries every ``resync_s`` and keeps one worker per Canary;
* ``watch`` — streams Canary changes and wakes the affected worker at once (a command
  written by ``canaryd promote`` is acted on within a second, not an interval);
* ``watch-deployments`` — streams Deployment changes: a Canary whose canary
  Deployment's spec changed is woken at once (``trigger: auto``, a template changed
  mid-rollout);
* ``canary:<namespace>/<name>`` — reconciles its Canary on its spec's interval.

One reconcile: read the Canary → observe metrics (and the stable's rollout while
promoting) → the pure state machine → **write the status first** (with the
resourceVersion read; on 409 read again and start over) → carry out the actions →
converge the VirtualService to ``status.canaryWeight``.  Status before actions, and
convergence on every round, make a crash at any point safe: a restarted daemon
continues from the status without moving weights backwards or repeating a step.

SIGTERM sets the stop event: workers finish the reconcile in progress, the Lease is
released, and :meth:`Daemon.run` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

import structlog

from analysis.budget import Tier
from canaryd.converger import Converger, Stage, mirror_pct, route_pcts
from canaryd.events import EventReason, RolloutEvent, event_of
from canaryd.hub import StatusHub
from canaryd.kube import (
    COMMANDS_ANNOTATION,
    FINALIZER,
    PLURAL,
    VERSION,
    CanaryObject,
    Kube,
    decision_lane,
    to_canary,
)
from canaryd.leader import LeaderElector, LeaseSettings
from canaryd.metrics import METRIC_QUERIES, RECONCILE_SECONDS, ROLLOUT_SECONDS
from canaryd.outbox import Notifier
from canaryd.ports import (
    CanaryRef,
    ConflictError,
    KubeError,
    MetricsError,
    MetricsSource,
    NotFoundError,
    RoutingError,
    SloEventsSource,
    TrafficRouter,
    WorkloadError,
    Workloads,
)
from canaryd.redact import redact
from canaryd.rollout import (
    BudgetGate,
    Command,
    CommandKind,
    Notify,
    Observed,
    PromoteStable,
    reconcile,
)
from canaryd.shards import ShardManager, ShardSettings
from canaryd.slo import SloMonitor, service_name
from canaryd.spec import API_GROUP, CanarySpec
from canaryd.status import CanaryStatus, Phase, VerdictDecision
from canaryd.workloads import template_digest
from simulator.informer import Informer, ListFn, custom_list_fn

log = structlog.get_logger("canaryd.daemon")

#: status fields that only refresh the numbers of a round (see ``_progress_only``)
_PROGRESS_FIELDS = (
    "last_verdict",
    "step_evidence",
    "last_data_at",
    "last_canary_requests",
    "message",
)

CANARIES, DEPLOYMENTS = "canaries", "deployments"  # what a watch streams
#: status writes of the reconcile running in this task (for :class:`RoundStats`)
_WRITES: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("writes", default=None)


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """How the daemon runs.

    Attributes:
        namespaces: namespaces to watch; empty for all.
        lease: leader election; None to act without it (a single replica).
        shards: with ``lease``, split the Canaries into this many shards, one Lease
            each (``<lease name>-shard-<i>``), held by the replicas in fair shares
            (:mod:`canaryd.shards`); 1 is one leader for all.
        resync_s: how often to list Canaries and look at idle or finished ones, seconds.
        watch_timeout_s: each watch request ends after this and is renewed, seconds.
        conflict_attempts: fresh reads after 409 conflicts before giving up a round.
        metrics_timeout_s: deadline for the metrics source, seconds.
        drain_s: on stop, how long workers may finish their reconcile, seconds.
        status_refresh_s: a round whose verdict is an unchanged "continue" writes its
            numbers to status at most this often, seconds (every decision is written
            at once); with the default 1-minute interval, every round is written.
        watch_deployments: watch Deployments too, so that a changed canary pod template
            wakes its Canary at once instead of at the next resync.
        finalize_timeout_s: how long a deleted Canary's traffic is tried to be restored
            before its finalizer is dropped anyway (with a warning Event), seconds.
        slo_refresh_s: how often every service's SLO figures are read (when the metrics
            source can read them: Prometheus), seconds.
        readiness_recheck_s: how often an idle, ready Canary's routes and workloads are
            looked at again, seconds (at once when its spec changes; every round while
            they are missing).
    """

    namespaces: tuple[str, ...] = ()
    lease: LeaseSettings | None = None
    shards: int = 1
    slo_refresh_s: float = 60.0
    resync_s: float = 30.0
    watch_timeout_s: float = 60.0
    conflict_attempts: int = 6
    metrics_timeout_s: float = 10.0
    drain_s: float = 10.0
    status_refresh_s: float = 30.0
    readiness_recheck_s: float = 300.0
    finalize_timeout_s: float = 300.0
    watch_deployments: bool = True


@dataclass(slots=True)
class RoundStats:
    """One evaluation round: every reconcile that ran for the same aligned tick.

    Attributes:
        tick_s: the tick (Unix time, a multiple of the interval) the round belongs to.
        reconciles: reconciles that ran in it.
        started_s: when the first began (monotonic seconds).
        finished_s: when the last ended, its writes done (monotonic seconds).
        writes: status writes made in it.
    """

    tick_s: float
    reconciles: int = 0
    started_s: float = math.inf
    finished_s: float = 0.0
    writes: int = 0

    @property
    def duration_s(self) -> float:
        """Wall time from the first reconcile's start to the last one's end."""
        return max(0.0, self.finished_s - self.started_s)


@dataclass(slots=True)
class _Worker:
    task: asyncio.Task[None]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: (generation, commands annotation, deletionTimestamp) last seen: only a change
    #: of these wakes the worker early; its own status writes must not (they would
    #: loop it)
    seen: tuple[object, object, object] | None = None


@dataclass(slots=True, eq=False)
class _Tracked:
    """Everything the daemon keeps for one Canary, dropped together once it is gone.

    Attributes:
        worker: its reconcile loop (None until the watch or a list has seen it).
        interval_s: its analysis interval while a rollout or command is active, else
            None (which round a reconcile belongs to).
        raw: the latest object seen by the watch or a write (an informer cache): a
            round reads it instead of the API; a 409 on write reads afresh.
        parsed: the parsed form of ``raw``, while it is that version.
        written_at_s: when its status was last written (monotonic s).
        converged: ((phase, weight) last converged, when, monotonic s).
        unseen: our last write that the watch has not delivered yet, as
            (resourceVersion, when written, monotonic s): until it comes back, every
            event of the Canary is older than what we hold (a watch delivers one
            object's changes in order), so it must not replace the cache (a lagging
            watch, as at start-up with thousands of Canaries, would make every next
            write a 409).
        readiness_checked: (generation checked, monotonic s) of the last time an idle
            Canary's routes and workloads were found in place.
        delivered: while it is being reconciled, the resourceVersions the watch
            delivered meanwhile; else None.
    """

    worker: _Worker | None = None
    interval_s: float | None = None
    raw: dict[str, Any] | None = None
    parsed: CanaryObject | None = None
    written_at_s: float | None = None
    converged: tuple[tuple[object, int], float] | None = None
    unseen: tuple[str, float] | None = None
    readiness_checked: tuple[int | None, float] | None = None
    delivered: list[str] | None = None


def _trimmed(canary: CanaryObject) -> CanaryObject:
    """The parsed Canary with its raw object cut to the metadata (all that is read of
    it once it is parsed)."""
    return replace(canary, raw={"metadata": canary.raw.get("metadata") or {}})


def _version(obj: dict[str, Any]) -> str:
    """An object's ``metadata.resourceVersion`` (empty when it has none)."""
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


#: the TrafficVerified condition's reason when a convergence stops at a stage
_STOPPED_REASONS = {
    Stage.PODS: "CanaryNotReady",
    Stage.WEIGHTS: "WeightsNotSet",
    Stage.SCALE_DOWN: "ScaleDownFailed",
    Stage.DRIFT: "TrafficDrift",
    Stage.DONE: "Verified",
}


def _parse_time(value: str) -> datetime | None:
    """An RFC 3339 timestamp from the API (``...Z``), or None."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _listed_is_newer(listed: dict[str, Any], cached: dict[str, Any]) -> bool:
    """Whether a Canary from a list is newer than the cached copy.

    resourceVersions are opaque, but the same object's grow with every write on every
    API server we know (etcd revisions); a copy the watch delivered while the list was
    on its way is kept.  Versions that are not numbers: a different one is believed.
    """
    listed_rv, cached_rv = _version(listed), _version(cached)
    if listed_rv.isdigit() and cached_rv.isdigit():
        return int(listed_rv) > int(cached_rv)
    return listed_rv != cached_rv


class Daemon:
    """Drives Canaries with the pure state machine; every effect goes through a port."""

    def __init__(
        self,
        kube: Kube,
        metrics: MetricsSource,
        router: TrafficRouter,
        workloads: Workloads,
        settings: DaemonSettings | None = None,
        clock: Callable[[], datetime] | None = None,
        hub: StatusHub | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.kube = kube
        self.metrics = metrics
        self.router = router
        self.workloads = workloads
        self.settings = settings or DaemonSettings()
        self.clock = clock or (lambda: datetime.now(UTC))
        lease = self.settings.lease
        #: one Lease for all (``shards`` 1), or a fair share of the shards' Leases
        self.shards: ShardManager | None = None
        self.elector: LeaderElector | None = None
        if lease is not None and self.settings.shards > 1:
            self.shards = ShardManager(
                kube, ShardSettings(self.settings.shards, lease), on_acquired=self._acquired
            )
        elif lease is not None:
            self.elector = LeaderElector(kube, lease)
        self.converger = Converger(router, workloads)
        #: one record per Canary known (worker, cache, timers): see :class:`_Tracked`
        self.canaries: dict[CanaryRef, _Tracked] = {}
        #: counts of reconciles, status writes, conflicts and failures (for tests, metrics)
        self.stats: Counter[str] = Counter()
        #: the last evaluation rounds, oldest first (for benchmarks and metrics)
        self.rounds: OrderedDict[float, RoundStats] = OrderedDict()
        #: (generation, pod-spec hash) of every Deployment the Deployment watch has seen
        self._deployments: dict[tuple[str, str], tuple[object, str]] = {}
        self._stop = asyncio.Event()
        #: what the status API reads: snapshots, events and series of every Canary
        self.hub = hub if hub is not None else StatusHub()
        #: where rollout events go besides logs, Kubernetes Events and the hub
        self.notifier = notifier if notifier is not None else Notifier()
        #: every event told, oldest first, bounded (for tests and ``canaryd status``)
        self.told: deque[RolloutEvent] = deque(maxlen=1000)
        #: how the last listing of Canaries went, for /readyz: None before the first,
        #: "" when it succeeded, else its error
        self.listed: str | None = None
        #: reads the services' SLO figures when the metrics source can (Prometheus)
        self.slo_monitor: SloMonitor | None = (
            SloMonitor(
                cast(SloEventsSource, metrics),
                self.hub,
                refresh_s=self.settings.slo_refresh_s,
                timeout_s=self.settings.metrics_timeout_s,
            )
            if hasattr(metrics, "slo_events")
            else None
        )

    def _track(self, ref: CanaryRef) -> _Tracked:
        tracked = self.canaries.get(ref)
        if tracked is None:
            tracked = self.canaries[ref] = _Tracked()
        return tracked

    @property
    def workers(self) -> dict[CanaryRef, _Worker]:
        """The worker of every Canary that has one (a snapshot)."""
        return {ref: t.worker for ref, t in self.canaries.items() if t.worker is not None}

    @property
    def role(self) -> str:
        """``leader``, ``standby``, ``single`` (no leader election) or, sharded,
        ``sharded`` (holds shards) or ``standby``."""
        if self.shards is not None:
            return "sharded" if self.shards.held else "standby"
        if self.elector is None:
            return "single"
        return "leader" if self.elector.is_leader else "standby"

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready once the last listing of Canaries succeeded (Kubernetes reachable)."""
        listed = self.listed
        ok = listed == ""
        if listed is None:
            kube = "not listed yet"
        else:
            kube = f"unreachable: {listed}" if listed else "reachable"
        body: dict[str, object] = {
            "ready": ok, "role": self.role, "kubernetes": kube, "canaries": len(self.hub),
        }  # fmt: skip
        if self.shards is not None:
            body["shards"] = self.shards.describe()
        return ok, body

    @property
    def acting(self) -> bool:
        """True when this replica may write: it leads, runs without election, or holds
        shards (whether for one Canary: :meth:`acting_for`)."""
        if self.shards is not None:
            return bool(self.shards.held)
        return self.elector is None or self.elector.is_leader

    def acting_for(self, ref: CanaryRef) -> bool:
        """True when this replica may write ``ref`` now (it holds its shard, or leads)."""
        if self.shards is not None:
            return self.shards.holds(ref)
        return self.acting

    def _may_start(self, ref: CanaryRef) -> bool:
        """Whether a round of ``ref`` may begin (a shard being handed over starts none)."""
        if self.shards is not None:
            return self.shards.owns(ref)
        return self.acting

    def _acquired(self, shard: int) -> None:
        """A shard just taken: its Canaries' workers look at once."""
        assert self.shards is not None
        for ref, tracked in self.canaries.items():
            if tracked.worker is not None and self.shards.shard(ref) == shard:
                tracked.worker.wake.set()

    # -- the task tree ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then drain and return."""
        self._stop = stop
        async with asyncio.TaskGroup() as group:
            background = []
            if self.elector is not None:
                background.append(group.create_task(self.elector.run(stop), name="leader"))
            if self.shards is not None:
                background.append(group.create_task(self.shards.run(stop), name="shards"))
            background.append(group.create_task(self._discover(), name="discover"))
            background.append(group.create_task(self._watch(), name="watch"))
            background.append(group.create_task(self.notifier.run(), name="notifier"))
            if self.slo_monitor is not None:  # every replica: the figures are reads
                background.append(group.create_task(self.slo_monitor.run(stop), name="slo"))
            if self.settings.watch_deployments:
                background.append(
                    group.create_task(self._watch_deployments(), name="watch-deployments")
                )
            await stop.wait()
            log.info("stopping", workers=len(self.workers))
            for task in background:
                task.cancel()
            for worker in self.workers.values():
                worker.wake.set()
            pending = [w.task for w in self.workers.values() if not w.task.done()]
            if pending:
                _, late = await asyncio.wait(pending, timeout=self.settings.drain_s)
                for task in late:
                    task.cancel()
        if self.elector is not None:
            await self.elector.release()
        if self.shards is not None:
            await self.shards.release_all()
        log.info("stopped")

    def _ensure_worker(self, ref: CanaryRef) -> _Worker:
        tracked = self._track(ref)
        worker = tracked.worker
        if worker is None or worker.task.done():
            wake = asyncio.Event()
            task = asyncio.create_task(self._work(ref, wake), name=f"canary:{ref}")
            worker = tracked.worker = _Worker(task, wake)
        return worker

    async def _discover(self) -> None:
        while not self._stop.is_set():
            try:
                found = await self._list()
                for ref in found:
                    self._ensure_worker(ref)
                self.listed = ""
            except KubeError as exc:
                self.listed = str(exc) or type(exc).__name__
                log.warning("listing canaries failed", error=str(exc))
            await asyncio.sleep(self.settings.resync_s)

    async def _list(self) -> list[CanaryRef]:
        items: list[dict[str, Any]] = []
        for namespace in self.settings.namespaces or (None,):
            items += await self.kube.list_canaries_raw(namespace)
        refs = []
        for item in items:
            meta = item.get("metadata") or {}
            ref = CanaryRef(str(meta.get("namespace", "")), str(meta.get("name", "")))
            tracked = self.canaries.get(ref)
            cached = tracked.raw if tracked is not None else None
            if cached is None or _listed_is_newer(item, cached):
                # as if the watch had delivered it: a silently stalled watch must not
                # hide a command or a spec change for longer than one resync.  Newer
                # than the cache is newer than our last write too: not to be held back
                if tracked is not None:
                    tracked.unseen = None
                self._on_watch_event("MODIFIED", item)
            refs.append(ref)
        return refs

    async def _watch(self) -> None:
        """Stream Canary changes (in a thread: the client blocks) and wake workers."""
        await self._stream(CANARIES, self._on_watch_event)

    async def _watch_deployments(self) -> None:
        """Stream Deployment changes: a new canary pod template wakes its Canary at once
        (``trigger: auto`` starts within a second, a template changed mid-rollout is
        seen before the next step is judged), not at the next resync."""
        await self._stream(DEPLOYMENTS, self._on_deployment_event)

    async def _stream(self, resource: str, handle: Callable[[str, Any], None]) -> None:
        """Keep ``resource`` current with one :class:`~simulator.informer.Informer` per
        namespace scope (paginated list, watch, 410 → relist, back-off; in threads: the
        client blocks) and hand every event to ``handle`` on the loop.  After each
        (re)list, ``RESYNC`` and then every object listed, as ``ADDED``."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        halt = threading.Event()

        def post(kind: str, obj: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, obj))

        def listed(items: list[dict[str, Any]]) -> None:
            post("RESYNC", {})
            for item in items:
                post("ADDED", item)

        scopes: list[str | None] = list(self.settings.namespaces) or [None]
        informers = [
            Informer(
                self._list_fn(resource, scope),
                f"{resource} in {scope or 'all namespaces'}",
                listed, post, halt, self.settings.watch_timeout_s,
            )
            for scope in scopes
        ]  # fmt: skip
        for informer in informers:
            informer.start()
        try:
            handled = 0
            while not self._stop.is_set():
                kind, obj = await queue.get()
                handle(kind, obj)
                handled += 1
                if handled % 50 == 0:
                    # a full list is thousands of events that each parse a Canary, and a
                    # ready queue.get never yields: let Lease renewals and rounds run
                    await asyncio.sleep(0)
        finally:
            for informer in informers:
                informer.interrupt()

    def _list_fn(self, resource: str, namespace: str | None) -> ListFn:
        custom, apps = self.kube.custom, self.kube.apps
        if resource == DEPLOYMENTS:
            if namespace:
                return functools.partial(apps.list_namespaced_deployment, namespace)
            return apps.list_deployment_for_all_namespaces
        return custom_list_fn(custom, API_GROUP, VERSION, PLURAL, namespace)

    def _on_deployment_event(self, kind: str, deployment: dict[str, Any]) -> None:
        """Wake the Canaries whose canary Deployment's spec changed (its generation)."""
        if kind == "RESYNC":
            return
        meta = deployment.get("metadata") or {}
        if not meta.get("name"):
            return
        key = (str(meta.get("namespace") or ""), str(meta["name"]))
        before = self._deployments.get(key)
        if kind == "DELETED":
            self._deployments.pop(key, None)
            return
        generation = meta.get("generation")
        if before is not None and before[0] == generation:
            return  # only its status changed
        self._deployments[key] = (generation, template_digest(deployment))
        if before is None:
            return  # first seen (the initial list)
        for ref, tracked in self.canaries.items():
            raw, parsed = tracked.raw, tracked.parsed
            if ref.namespace != key[0] or raw is None:
                continue
            if parsed is not None and parsed.resource_version == _version(raw):
                spec = parsed.spec
                canary = spec.canary.deployment if spec and spec.canary else None
            else:
                canary = ((raw.get("spec") or {}).get("canary") or {}).get("deployment")
            worker = tracked.worker
            if canary == key[1] and worker is not None:
                log.info(
                    "canary template changed",
                    namespace=ref.namespace, name=ref.name, deployment=key[1],
                )  # fmt: skip
                worker.wake.set()

    def _on_watch_event(self, kind: str, obj: dict[str, Any]) -> None:
        """One watch event: update the cache and wake the Canary's worker if it changed.

        ``RESYNC`` (from :meth:`_pump`) says a fresh list starts: what it delivers is
        current, so no event is held back as older than our own writes any more.
        """
        if kind == "RESYNC":
            for each in self.canaries.values():
                each.unseen = None
            return
        meta = obj.get("metadata") or {}
        ref = CanaryRef(str(meta.get("namespace", "")), str(meta.get("name", "")))
        if not ref.name:
            return
        version = _version(obj)
        tracked = self.canaries.get(ref)
        if tracked is not None and tracked.delivered is not None:
            tracked.delivered.append(version)
        if kind in ("ADDED", "MODIFIED"):
            tracked = tracked or self._track(ref)
            unseen = tracked.unseen
            if unseen is not None:
                if version != unseen[0] and time.monotonic() - unseen[1] < self._unseen_for_s:
                    return  # from before our own write: nothing we do not have
                tracked.unseen = None
            parsed, shown = tracked.parsed, self.hub.get(ref)
            if parsed is None or parsed.resource_version != version:
                if shown is not None and shown.resource_version == version:
                    parsed = shown  # parse only what is new
                else:
                    # parsed once, kept without the raw body (~40 KB of Python objects a
                    # Canary): the cache, the hub and the next round share it
                    parsed = _trimmed(to_canary(obj))
            if shown is None or shown.resource_version != version:
                self.hub.update(parsed, self.clock())
            tracked.raw, tracked.parsed = parsed.raw, parsed
            worker = self._ensure_worker(ref)
            key = (
                meta.get("generation"),
                (meta.get("annotations") or {}).get(COMMANDS_ANNOTATION),
                meta.get("deletionTimestamp"),
            )
            if key != worker.seen:
                worker.seen = key
                worker.wake.set()
        elif kind == "DELETED":
            self.hub.remove(ref, self.clock())
            if tracked is not None:
                tracked.raw = tracked.unseen = None
                if tracked.worker is not None:
                    tracked.worker.wake.set()

    @property
    def _unseen_for_s(self) -> float:
        """How long a write of ours may take to come back through the watch before
        events are believed again (a safety net: every watch request ends and is
        renewed within ``watch_timeout_s``)."""
        return self.settings.watch_timeout_s + 5.0

    async def _work(self, ref: CanaryRef, wake: asyncio.Event) -> None:
        """One Canary's loop: reconcile, then wait for its interval or a wake-up."""
        failures = 0
        while not self._stop.is_set():
            delay = self.settings.resync_s
            if self._may_start(ref):
                round_ = self._round(ref)
                started_s = time.monotonic()
                _WRITES.set([0])  # this task's status writes, whatever runs beside it
                try:
                    with RECONCILE_SECONDS.time(), self._busy(ref):
                        canary = await self.reconcile(ref)
                except (KubeError, MetricsError, RoutingError, WorkloadError) as exc:
                    failures += 1
                    delay = min(30.0, 0.5 * 2**failures)
                    self.stats["failures"] += 1
                    log.warning(
                        "reconcile failed", namespace=ref.namespace, name=ref.name, error=str(exc)
                    )
                except Exception:  # a bug must not silently kill this Canary's worker
                    failures += 1
                    delay = min(60.0, 0.5 * 2**failures)
                    self.stats["failures"] += 1
                    log.exception("reconcile crashed", namespace=ref.namespace, name=ref.name)
                else:
                    failures = 0
                    if round_ is not None:
                        round_.reconciles += 1
                        round_.started_s = min(round_.started_s, started_s)
                        round_.finished_s = max(round_.finished_s, time.monotonic())
                        round_.writes += (_WRITES.get() or [0])[0]
                    if canary is None:
                        self._forget(ref)
                        return
                    delay = self._next_delay(canary)
            elif self.settings.lease is not None and self.shards is None:
                delay = self.settings.lease.retry_s  # (a shard taken wakes its Canaries)
            await self._sleep(wake, delay)

    def _busy(self, ref: CanaryRef) -> contextlib.AbstractContextManager[None]:
        """Bracket a reconcile: a shard is handed over only between its rounds."""
        return self.shards.busy(ref) if self.shards is not None else contextlib.nullcontext()

    def _remember(self, done: CanaryObject, *, wrote: bool, delivered: list[str]) -> None:
        """Cache the Canary a reconcile ended with (``wrote``: its own write), unless
        the watch ``delivered`` something newer meanwhile."""
        ref = done.ref
        # while the parsed form is kept, nothing reads the rest of the raw object again:
        # keep its metadata only (the whole object is ~40 KB of Python objects a Canary)
        done = _trimmed(done)
        if wrote:
            self.hub.update(done, self.clock())
        tracked = self._track(ref)
        if wrote and done.resource_version not in delivered:
            # the watch has yet to deliver our write: whatever it delivered is older
            tracked.unseen = (done.resource_version, time.monotonic())
            tracked.raw = done.raw
        else:
            cached = tracked.raw
            # keep what the watch brought meanwhile, unless it is this very version
            if cached is not None and _version(cached) != done.resource_version:
                return  # the watch's newer copy stays, parsed with it
            tracked.raw = done.raw
        tracked.parsed = done  # used while the cache holds its version

    def _forget(self, ref: CanaryRef) -> None:
        """Drop everything kept for a Canary that is gone."""
        self.hub.remove(ref, self.clock())
        self.canaries.pop(ref, None)

    def _next_delay(self, canary: CanaryObject) -> float:
        """Until the next tick: a multiple of the interval on the wall clock.

        Every Canary with the same interval is evaluated at the same ticks, so that one
        metrics snapshot (one query per metric) serves them all (design §7).
        """
        status, spec = canary.status, canary.spec
        tracked = self._track(canary.ref)
        tracked.interval_s = None
        pending = any(c.id not in status.acknowledged for c in canary.commands)
        if spec is not None and (status.phase.active or pending):
            interval = tracked.interval_s = spec.analysis.interval
            return interval - self.clock().timestamp() % interval
        return self.settings.resync_s

    def _wrote(self) -> None:
        self.stats["writes"] += 1
        counter = _WRITES.get()
        if counter is not None:
            counter[0] += 1

    def _round(self, ref: CanaryRef) -> RoundStats | None:
        """The evaluation round a reconcile of ``ref`` now belongs to (None when idle)."""
        tracked = self.canaries.get(ref)
        interval = tracked.interval_s if tracked is not None else None
        if interval is None:
            return None
        tick = round(self.clock().timestamp() / interval) * interval
        stats = self.rounds.get(tick)
        if stats is None:
            stats = self.rounds[tick] = RoundStats(tick)
            while len(self.rounds) > 200:
                self.rounds.popitem(last=False)
        return stats

    async def _sleep(self, wake: asyncio.Event, delay: float) -> None:
        waiters = [
            asyncio.create_task(wake.wait(), name="wake"),
            asyncio.create_task(self._stop.wait(), name="stop"),
        ]
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            wake.clear()

    # -- one reconcile -----------------------------------------------------------------------

    async def reconcile(self, ref: CanaryRef) -> CanaryObject | None:
        """One round for one Canary; returns it as written (None once it is deleted)."""
        tracked = self._track(ref)
        for _ in range(self.settings.conflict_attempts):
            cached, parsed = tracked.raw, tracked.parsed
            tracked.raw = tracked.parsed = None
            try:
                if (
                    cached is not None
                    and parsed is not None
                    and parsed.resource_version == _version(cached)
                ):
                    canary = parsed  # unchanged since we last parsed it: no parsing again
                elif cached is not None and "spec" in cached:
                    canary = to_canary(cached)
                else:
                    canary = await self.kube.get_canary(ref)
            except NotFoundError:
                return None
            self.stats["reconciles"] += 1
            tracked.delivered = []
            with structlog.contextvars.bound_contextvars(
                namespace=ref.namespace, name=ref.name, step=canary.status.step_index
            ):
                try:
                    if (canary.raw.get("metadata") or {}).get("deletionTimestamp"):
                        finalized = await self._finalize(canary)
                        if finalized is None:
                            return None
                        done = finalized
                    else:
                        done = await self._reconcile(canary)
                except ConflictError:
                    self.stats["conflicts"] += 1
                    continue
                finally:
                    delivered, tracked.delivered = tracked.delivered or [], None
            wrote = done.resource_version != canary.resource_version
            self._remember(done, wrote=wrote, delivered=delivered)
            return done
        raise ConflictError(f"{ref}: gave up after {self.settings.conflict_attempts} conflicts")

    async def _finalize(self, canary: CanaryObject) -> CanaryObject | None:
        """A Canary being deleted: all traffic back to stable (and a canary that was
        under rollout scaled down, weights first), then our finalizer removed; None once
        it is gone.  Whatever stands in the way (the VirtualService deleted, Istio's CRD
        gone, the API refusing) is retried each round for ``finalize_timeout_s`` from
        the deletion, then the finalizer is dropped with a warning Event, so that a
        deletion never hangs."""
        meta = canary.raw.get("metadata") or {}
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers or not self.acting_for(canary.ref):
            return canary
        problem: str | None = None
        spec = canary.spec
        if spec is not None and spec.traffic_routing is not None:
            status = canary.status
            target = status.model_copy(
                update={
                    "canary_weight": 0,
                    "phase": Phase.ROLLED_BACK if status.phase.active else status.phase,
                }
            )
            result = await self.converger.converge(canary.ref, spec, target, force=True)
            problem = result.problem
        if problem is not None:
            since = _parse_time(str(meta.get("deletionTimestamp")))
            waited_s = (self.clock() - since).total_seconds() if since else 0.0
            if waited_s < self.settings.finalize_timeout_s:
                log.warning("cannot restore traffic before deletion; retrying", error=problem)
                return canary
            with contextlib.suppress(KubeError):
                await self.tell(
                    canary, spec, EventReason.FINALIZER_TIMEOUT,
                    f"deleted without restoring traffic after {waited_s:.0f}s: {problem}",
                    warning=True,
                )  # fmt: skip
        else:
            with contextlib.suppress(KubeError):
                await self.tell(
                    canary,
                    spec,
                    EventReason.TRAFFIC_RESTORED,
                    "Canary deleted: all traffic back on stable",
                )
        await self.kube.set_finalizers(canary, [f for f in finalizers if f != FINALIZER])
        log.info("finalizer removed", traffic_restored=problem is None)
        return None

    async def _reconcile(self, canary: CanaryObject) -> CanaryObject:
        now = self.clock()
        status = canary.status
        meta = canary.raw.get("metadata") or {}
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers and self.acting_for(canary.ref):
            # before any traffic moves: a deletion from now on restores it first
            canary = await self.kube.set_finalizers(canary, [*finalizers, FINALIZER])
        if canary.spec is None:
            why = canary.spec_error or "invalid spec"
            return await self._not_ready(canary, "InvalidSpec", why, now)
        spec = canary.spec
        commands = list(canary.commands)
        auto = await self._auto_trigger(canary, spec)
        if auto is not None:
            commands.append(auto)
        pending = [c for c in commands if c.id not in status.acknowledged]
        if not status.phase.active and not pending:
            checked = await self._check_idle(canary, spec, now)
            if checked is not canary:
                return checked
            return await self._remove_acknowledged(await self._converge(canary, spec))
        observed = await self._observe(canary.ref, spec, status)
        result = reconcile(spec, status, observed, commands, now)
        if self.acting_for(canary.ref):
            self.hub.round(
                canary.ref,
                now,
                revision=result.status.revision,
                weight=status.canary_weight,
                step_index=status.step_index,
                observation=observed.metrics,
                verdict=result.status.last_verdict,
            )
        after = result.status
        moves_traffic = any(isinstance(a, PromoteStable) for a in result.actions) or (
            (after.canary_weight > 0 or mirror_pct(spec, after) > 0)
            and (after.canary_weight, after.step_index, after.revision)
            != (status.canary_weight, status.step_index, status.revision)
        )
        if moves_traffic:
            problem = await self._preflight(canary.ref, spec)
            if problem is not None:
                return await self._not_ready(canary, problem[0], problem[1], now)
        new_status = result.status.model_copy(update={"observed_generation": canary.generation})
        new_status = new_status.with_condition("Ready", True, "Ready", "", now)
        if new_status == status and not result.actions:
            return await self._converge(canary, spec)
        if not result.actions and self._progress_only(canary.ref, status, new_status, now):
            # numbers of an unchanged decision: written at the next refresh
            return await self._converge(canary, spec)
        if not self.acting_for(canary.ref):
            return canary  # leadership lapsed during this round: the new leader decides
        # a decision (a phase, step or weight change: a rollback above all) and what it
        # moves take the decision lane: never behind other Canaries' routine writes
        decides = (new_status.phase, new_status.step_index, new_status.canary_weight) != (
            status.phase,
            status.step_index,
            status.canary_weight,
        )
        with decision_lane(decides):
            written = await self.kube.write_status(canary, new_status)
            self._wrote()
            self._track(canary.ref).written_at_s = time.monotonic()
            if new_status.phase.terminal and not status.phase.terminal:
                self._ended(canary.ref, new_status, now)
            await self._promote_and_notify(written, spec, result.actions)
            written = await self._converge(written, spec)
        return await self._remove_acknowledged(written)

    async def _remove_acknowledged(self, canary: CanaryObject) -> CanaryObject:
        """Commands acted on or rejected (acknowledged in the status just written) come
        off the annotation, so it never grows and an old command can never come back
        once its id has aged out of the bounded acknowledgement list."""
        done = {c.id for c in canary.commands if c.id in canary.status.acknowledged}
        if not done or not self.acting_for(canary.ref):
            return canary
        try:
            pruned = await self.kube.remove_commands(canary, done)
        except KubeError as exc:  # a 409 included: the next round tries again
            log.info("acknowledged commands stay on the annotation for now", error=str(exc))
            return canary
        self._wrote()
        return pruned

    def _ended(self, ref: CanaryRef, status: CanaryStatus, now: datetime) -> None:
        """Count a rollout that has just ended (metrics)."""
        self.hub.rollout_ended(ref, status.phase)
        if status.history:
            duration_s = (now - status.history[0].started_at).total_seconds()
            ROLLOUT_SECONDS.labels(str(status.phase)).observe(max(0.0, duration_s))

    def _progress_only(
        self, ref: CanaryRef, old: CanaryStatus, new: CanaryStatus, now: datetime
    ) -> bool:
        """True when ``new`` only refreshes the numbers of an unchanged "continue" verdict
        while data flows, and the status was written less than ``status_refresh_s`` ago.

        Such a status need not be written every round: every decision, phase, step,
        weight, acknowledgement and window change is written before it acts, and the
        numbers skipped are recomputed from the persisted step baseline by the next
        round (or by a restarted daemon).  ``lastDataAt`` is written as soon as data
        stops, so ``noData.holdFor`` never counts from a stale time.
        """
        tracked = self.canaries.get(ref)
        written = tracked.written_at_s if tracked is not None else None
        if written is None or time.monotonic() - written >= self.settings.status_refresh_s:
            return False
        verdict, before = new.last_verdict, old.last_verdict
        if (
            new.last_data_at != now
            or verdict is None
            or verdict.decision != VerdictDecision.CONTINUE
        ):
            return False
        if before is None or before.decision != VerdictDecision.CONTINUE:
            return False
        blank = dict.fromkeys(_PROGRESS_FIELDS)
        return old.model_copy(update=blank) == new.model_copy(update=blank)

    async def _auto_trigger(self, canary: CanaryObject, spec: CanarySpec) -> Command | None:
        """``trigger: auto``: a promote for a canary pod template not yet rolled out.

        Its id comes from the template, so the state machine acts on it once (it is
        acknowledged in status like any command); a template that matches stable's, or
        the revision already rolled out, starts nothing.
        """
        if spec.trigger != "auto":
            return None
        try:
            revision = await self.workloads.canary_revision(canary.ref, spec)
        except (WorkloadError, KubeError) as exc:
            log.warning("cannot read the canary workload", error=str(exc))
            return None
        if revision is None or revision == canary.status.revision:
            return None
        return Command(id=revision, kind=CommandKind.PROMOTE, revision=revision, by="trigger: auto")

    async def _observe(self, ref: CanaryRef, spec: CanarySpec, status: CanaryStatus) -> Observed:
        metrics, error = None, None
        try:
            async with asyncio.timeout(self.settings.metrics_timeout_s):  # not wait_for: see kube
                metrics = await self.metrics.observe(ref, spec)
            METRIC_QUERIES.labels("ok").inc()
        except MetricsError as exc:
            METRIC_QUERIES.labels("error").inc()
            error = str(exc) or type(exc).__name__
        except TimeoutError:
            METRIC_QUERIES.labels("timeout").inc()
            error = f"the metrics source did not answer within {self.settings.metrics_timeout_s:g}s"
        stable_revision = None
        if status.phase is Phase.PROMOTING:
            try:
                stable_revision = await self.workloads.stable_revision(ref, spec)
            except (WorkloadError, KubeError) as exc:
                log.warning("cannot read the stable workload", error=str(exc))
        template = None
        if spec.canary is not None:  # the analysed template is the one promoted
            watched = self._deployments.get((ref.namespace, spec.canary.deployment))
            if watched is not None:  # from the Deployment watch: no read
                template = watched[1]
            else:
                try:
                    template = await self.workloads.template_hash(ref, spec)
                except (WorkloadError, KubeError) as exc:
                    log.warning("cannot read the canary workload", error=str(exc))
        drift = status.condition("TrafficDrift")
        hold_for_drift = (
            drift is not None
            and drift.status == "True"
            and (spec.traffic_routing is None or spec.traffic_routing.on_drift == "hold")
        )
        return Observed(
            metrics=metrics,
            metrics_error=error,
            stable_revision=stable_revision,
            traffic_drift=drift.message if hold_for_drift and drift is not None else None,
            canary_template=template,
            budget=self._budget(ref, spec),
        )

    def _budget(self, ref: CanaryRef, spec: CanarySpec) -> BudgetGate | None:
        """The error-budget policy's tier for this Canary's service, when its spec asks
        for the policy (``canaryd.slo``).

        Figures not read yet (the daemon just started, the service is new, or every
        read has failed) are doubt, and doubt does not release: the gate is the
        override tier until they are read, so a rollout starts only on an explicit
        override (or as a fix, which no tier stops) and a running one needs an approval
        for its next step.  Figures once read are kept through failed reads."""
        slo = spec.analysis.slo
        service = service_name(spec)
        if slo is None or slo.budget_policy is None or service is None:
            return None
        with self.hub.lock:
            figures = self.hub.slos.get((ref.namespace, service))
        if figures is not None:
            return BudgetGate(figures.decision.tier, figures.decision.reason)
        monitor = self.slo_monitor
        if monitor is None:
            why = "the metrics source cannot read error budgets (Prometheus can)"
        elif monitor.last_error is not None:
            why = f"reading them failed: {monitor.last_error}"
        else:
            why = "not read yet"
        return BudgetGate(Tier.OVERRIDE, f"{service}'s error budget is unknown: {why}")

    async def _preflight(self, ref: CanaryRef, spec: CanarySpec) -> tuple[str, str] | None:
        """(reason, message) when the routes or workloads this Canary names are missing."""
        try:
            await self.router.check(ref, spec)
        except RoutingError as exc:
            return "RoutingNotReady", str(exc)
        try:
            await self.workloads.check(ref, spec)
            waiting = await self.workloads.ensure_canary_ready(ref, spec)
        except WorkloadError as exc:
            return "WorkloadNotReady", str(exc)
        if waiting is not None:
            return "CanaryNotReady", waiting
        return None

    async def _check_idle(
        self, canary: CanaryObject, spec: CanarySpec, now: datetime
    ) -> CanaryObject:
        """The Ready condition of a Canary no rollout is running on, before anyone
        promotes: do the VirtualService (its routes), the DestinationRule (its subsets)
        and both Deployments exist?  Checked when the daemon first sees the Canary or its
        spec changes, every round while it is not ready, and otherwise once per
        ``readiness_recheck_s``; reads only, nothing is scaled or routed."""
        if not self.acting_for(canary.ref):
            return canary
        ref, status = canary.ref, canary.status
        ready = status.condition("Ready")
        tracked = self._track(ref)
        last = tracked.readiness_checked
        fresh = (
            last is not None
            and last[0] == canary.generation
            and time.monotonic() - last[1] < self.settings.readiness_recheck_s
        )
        if fresh and ready is not None and ready.status == "True":
            return canary
        problem: tuple[str, str] | None = None
        try:
            await self.router.check(ref, spec)
        except RoutingError as exc:
            problem = ("RoutingNotReady", str(exc))
        if problem is None:
            try:
                await self.workloads.check(ref, spec)
            except WorkloadError as exc:
                problem = ("WorkloadNotReady", str(exc))
        tracked.readiness_checked = (canary.generation, time.monotonic())
        if problem is not None:
            return await self._not_ready(canary, *problem, now, say=status.phase is Phase.IDLE)
        if ready is not None and ready.status == "True":
            return canary
        new_status = status.with_condition("Ready", True, "Ready", "", now)
        if status.phase is Phase.IDLE and status.message.startswith("cannot act: "):
            new_status = new_status.model_copy(update={"message": ""})
        written = await self.kube.write_status(canary, new_status)
        self._wrote()
        log.info("canary ready: its routes and workloads are in place")
        return written

    async def _not_ready(
        self, canary: CanaryObject, reason: str, message: str, now: datetime, *, say: bool = True
    ) -> CanaryObject:
        """Say why in status (condition Ready=False; with ``say``, the message too; an
        Event); move nothing."""
        status = canary.status.with_condition("Ready", False, reason, message, now)
        if say:
            status = status.model_copy(update={"message": f"cannot act: {message}"})
        if status == canary.status:
            return canary
        log.warning("canary not ready", reason=reason, error=message)
        written = await self.kube.write_status(canary, status)
        self._wrote()
        with contextlib.suppress(KubeError):
            await self.tell(
                written, canary.spec, EventReason.NOT_READY, message, warning=True,
                kube_reason=reason,
            )  # fmt: skip
        return written

    async def tell(
        self,
        canary: CanaryObject,
        spec: CanarySpec | None,
        reason: EventReason,
        message: str,
        *,
        warning: bool = False,
        kube_reason: str | None = None,
    ) -> RolloutEvent:
        """Tell the world, one event for every sink and in the same order: the log
        line, the status API's stream, Slack, webhooks and MQTT (through the notifier's
        queues: never waits), and last the Kubernetes Event (an API call; its
        KubeError reaches the caller).  ``canary`` is as written with the change.
        ``kube_reason`` gives the Kubernetes Event a finer reason (NotReady's cause)."""
        event = event_of(
            canary.ref.namespace, canary.ref.name, canary.status,
            list(spec.steps) if spec is not None else [], reason, redact(message),
            self.clock(), warning=warning,
        )  # fmt: skip
        verdict = event.verdict
        (log.warning if warning else log.info)(
            str(reason),
            message=event.message,
            event_id=event.id,
            phase=str(event.phase),
            weight=event.weight_pct,
            reasons=verdict.reasons if verdict else [],
        )
        self.told.append(event)
        self.hub.rollout(event)
        self.notifier.publish(event)
        await self.kube.emit_event(
            canary, kube_reason or str(reason), event.message, warning=warning
        )
        return event

    async def _promote_and_notify(
        self, canary: CanaryObject, spec: CanarySpec, actions: tuple[Any, ...]
    ) -> None:
        """The one-off actions of a reconcile: copy the template to stable, and tell
        the world (log line and Event).  Traffic and replicas are the Converger's."""
        ref = canary.ref
        for action in actions:
            if not self.acting_for(ref):
                log.warning("lost leadership: leaving the remaining actions to the new leader")
                return
            try:
                if isinstance(action, PromoteStable):
                    await self.workloads.promote_stable(
                        ref, spec, action.revision, action.template_hash
                    )
                elif isinstance(action, Notify):
                    await self.tell(
                        canary, spec, action.reason, action.message, warning=action.warning
                    )
            except (RoutingError, WorkloadError, KubeError) as exc:
                # the status is written: the next round converges what did not happen now
                self.stats["failures"] += 1
                log.error("action failed", action=repr(action), error=str(exc))

    async def _converge(self, canary: CanaryObject, spec: CanarySpec) -> CanaryObject:
        """Level-triggered, the one road from status to traffic: the
        :class:`~canaryd.converger.Converger` makes pods, routes and replicas match the
        status in its fixed order (pods before traffic, weights verified on every
        route, scale-down last); ``trafficVerified`` and the ``TrafficVerified``
        condition record the result when it changes.

        Run when the phase or weight differs from the last success (right after the
        status write that changed it), and otherwise once per ``resync_s`` (someone
        edited the VirtualService by hand): not on every round, which would cost a
        read per Canary per interval.  A failure is retried at the next round.
        """
        ref, status = canary.ref, canary.status
        if status.phase is Phase.IDLE or spec.traffic_routing is None or not self.acting_for(ref):
            return canary
        key = (status.phase, status.canary_weight)
        tracked = self._track(ref)
        last = tracked.converged
        recent = last is not None and time.monotonic() - last[1] < self.settings.resync_s
        if last is not None and last[0] == key and recent:
            return canary
        tracked.converged = None
        result = await self.converger.converge(ref, spec, status)
        if result.wrote_weights:
            log.info(
                "weights set",
                canary_pct=result.want_pct,
                stable_pct=100 - result.want_pct,
                routes_pct=list(result.route_weights_pct),
                verified=result.verified,
            )
        if result.scaled_down:
            log.info("canary scaled down: every route reads 0%")
        now = self.clock()
        drift_before = status.condition("TrafficDrift")
        drifting_before = drift_before is not None and drift_before.status == "True"
        event: tuple[str, bool] | None = None  # (message, warning)
        if result.ok:
            tracked.converged = (key, time.monotonic())
            new_status = status.with_condition(
                "TrafficVerified", True, "Verified",
                f"every managed route reads {result.want_pct}% canary", now,
            )  # fmt: skip
            new_status = new_status.model_copy(update={"verified_canary_pct": result.want_pct})
            if result.drift:
                message = (
                    f"routes read {route_pcts(result.drifted_pct)} canary, not the "
                    f"{result.want_pct}% canaryd set: reasserted (onDrift: reassert)"
                )
                event = (message, True)
                new_status = new_status.with_condition(
                    "TrafficDrift", False, "Reasserted", message, now
                )
            elif drifting_before:
                message = f"every managed route reads {result.want_pct}% canary again"
                event = (message, False)
                new_status = new_status.with_condition(
                    "TrafficDrift", False, "RoutesMatch", message, now
                )
        elif result.stopped_at is Stage.DRIFT:
            # someone else's weights: looked at again once per resync, never overwritten
            tracked.converged = (key, time.monotonic())
            message = result.problem or ""
            new_status = status.with_condition(
                "TrafficVerified", False, "TrafficDrift", message, now
            ).with_condition("TrafficDrift", True, "RoutesChanged", message, now)
            if not drifting_before or (drift_before and drift_before.message != message):
                event = (message, True)
                log.warning(
                    "traffic drift", routes_pct=list(result.drifted_pct),
                    canary_pct=result.want_pct, error=message,
                )  # fmt: skip
                if status.phase.active and tracked.worker is not None:
                    tracked.worker.wake.set()  # the state machine holds at once
        else:
            self.stats["failures"] += 1
            log.warning("convergence stopped", stage=str(result.stopped_at), error=result.problem)
            new_status = status.with_condition(
                "TrafficVerified", False, _STOPPED_REASONS[result.stopped_at],
                result.problem or "", now,
            )  # fmt: skip
        if event is not None:
            with contextlib.suppress(KubeError):
                await self.tell(canary, spec, EventReason.TRAFFIC_DRIFT, event[0], warning=event[1])
        new_status = new_status.model_copy(update={"traffic_verified": result.verified})
        if new_status == status:
            return canary
        try:
            written = await self.kube.write_status(canary, new_status)
        except ConflictError:
            return canary  # someone wrote meanwhile: the next round records it
        self._wrote()
        return written
