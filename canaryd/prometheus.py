"""The ``MetricsSource`` port on Prometheus (design §2, §5, §7).

What it hides: PromQL, the Prometheus HTTP API (through ``prometheus-api-client``, a
blocking library, always called in worker threads), authentication and TLS, retries,
and how cumulative counters are kept exact when pods restart or come and go.

**Batching.**  Canaries whose ``spec.metrics`` has the same shape (templates, labels,
extra matchers: every Canary on Istio's defaults) share one *snapshot*: one query per
metric (requests, errors, latency buckets), grouped by namespace, arm label and pod,
covering all of them, evaluated at one instant.  The daemon evaluates every Canary of
an interval at the same aligned tick, so a round costs three queries whatever the
number of Canaries; a snapshot younger than ``max_age_s`` (and at most half the
Canary's interval) is reused, and concurrent callers wait for the one fetch in flight.
:attr:`PrometheusMetrics.stats` counts ``queries`` and ``fetches``.

**Counters.**  Each series (one pod's counter) is followed on its own, as Prometheus's
own ``increase()`` does: a value below the previous one is a reset (the pod restarted)
and counts from zero; a series that disappears (the pod is gone) keeps what it
counted; a new pod's series counts from its first value.  An arm's total is the sum,
so it never goes backwards and loses nothing when stable scales down.  The state
machine takes differences of these totals since the step began.

**Failure.**  Unreachable, slow (``timeout_s``), an HTTP error, an answer that is not
Prometheus's, NaN, or no series for a Canary: :class:`MetricsError` with the reason,
which the state machine turns into a *hold* (never a rollback or a pass on missing
data); ``analysis.noData`` decides what happens if it lasts.  Failed queries are
retried with backoff within the deadline; a failed fetch is remembered for the rest
of its ``max_age_s`` so that a thousand Canaries do not each retry it.  A NaN or a
missing series affects only the Canaries whose arms it belongs to.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any, NamedTuple

import requests
import structlog
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from analysis.budget import Events
from analysis.counts import LATENCY_EDGES_MS, N_BUCKETS, ArmCounts, Observation
from canaryd.ports import CanaryRef, MetricsError, QueryRejectedError, SloService
from canaryd.redact import redact
from canaryd.spec import CanarySpec, Metrics

log = structlog.get_logger("canaryd.prometheus")

#: a pruned member's series are forgotten after this long without an observe, seconds
MEMBER_TTL_S = 600.0


@dataclass(frozen=True, slots=True)
class PrometheusSettings:
    """How to reach Prometheus.

    Attributes:
        url: base URL, e.g. ``http://prometheus.istio-system:9090`` (a path prefix such
            as Thanos' or a hosted Prometheus's ``/api/prom`` is kept).
        headers: extra HTTP headers on every request (e.g. ``X-Scope-OrgID``).
        bearer_token: sent as ``Authorization: Bearer …``.
        bearer_token_file: read before every fetch (rotated service-account tokens).
        basic_auth: (user, password).
        ca_file: CA bundle that signs the server's certificate.
        insecure_skip_verify: do not verify the server's certificate (testing only).
        client_cert: (certificate file, key file) for mutual TLS.
        timeout_s: deadline for one fetch (all its queries and retries), seconds.
        retries: further attempts of a failed query within the deadline.
        backoff_s: wait before the first retry, doubled for each next one, seconds.
        max_age_s: a snapshot this young is reused by later callers, seconds (never
            more than half the Canary's interval).
        max_selector_chars: list arm values in the query while the regex stays this
            short; beyond it, match on namespaces only.
    """

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    bearer_token: str | None = None
    bearer_token_file: str | None = None
    basic_auth: tuple[str, str] | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    client_cert: tuple[str, str] | None = None
    timeout_s: float = 5.0
    retries: int = 2
    backoff_s: float = 0.25
    max_age_s: float = 5.0
    max_selector_chars: int = 4000


# -- one query shape -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Shape:
    """What Canaries must share to be served by the same queries."""

    requests: str
    errors: str
    latency: str | None
    edge_ms: float
    namespace_label: str | None
    arm_label: str
    pod_label: str | None
    selector: str

    @classmethod
    def of(cls, metrics: Metrics) -> _Shape:
        requests_tpl, errors_tpl, latency_tpl = metrics.templates()
        return cls(
            requests_tpl,
            errors_tpl,
            latency_tpl,
            metrics.latency_edge_ms(),
            metrics.namespace_label,
            metrics.arm_label,
            metrics.pod_label,
            metrics.selector,
        )

    @property
    def by(self) -> str:
        labels = [self.namespace_label, self.arm_label, self.pod_label]
        return ", ".join(label for label in labels if label)


#: (namespace, arm label value): one arm of one Canary
ArmKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class _Member:
    namespace: str
    stable: str
    canary: str

    @property
    def keys(self) -> tuple[ArmKey, ArmKey]:
        return (self.namespace, self.stable), (self.namespace, self.canary)


@dataclass(slots=True)
class _Snapshot:
    """Every arm's totals at one instant, or why there are none."""

    fetched_at: float
    covers: frozenset[ArmKey] | None  # None: every arm of the namespaces queried
    namespaces: frozenset[str]
    requests: dict[ArmKey, int] = field(default_factory=dict)
    errors: dict[ArmKey, int] = field(default_factory=dict)
    buckets: dict[ArmKey, dict[float, int]] = field(default_factory=dict)
    bad: dict[ArmKey, str] = field(default_factory=dict)
    error: str | None = None

    def has(self, member: _Member) -> bool:
        if self.error is not None:
            return True  # a failure within max_age_s is everyone's: no retry per Canary
        if member.namespace not in self.namespaces:
            return False
        return self.covers is None or all(k in self.covers for k in member.keys)


@dataclass(slots=True)
class _ShapeState:
    members: dict[CanaryRef, tuple[_Member, float]] = field(default_factory=dict)
    snapshot: _Snapshot | None = None
    inflight: asyncio.Task[_Snapshot] | None = None
    #: last raw value of each series: (metric, arm, pod, le) → value
    last: dict[tuple[str, ArmKey, str, float], float] = field(default_factory=dict)
    #: per-series-corrected totals: (metric, arm, le) → count
    totals: dict[tuple[str, ArmKey, float], float] = field(default_factory=dict)


# -- the source ------------------------------------------------------------------------------


class PrometheusMetrics:
    """The ``MetricsSource`` port on a Prometheus server (see the module docstring)."""

    def __init__(
        self, settings: PrometheusSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._shapes: dict[_Shape, _ShapeState] = {}
        #: ``queries`` sent (retries included), ``fetches`` (snapshots taken), ``failures``
        self.stats: Counter[str] = Counter()
        # one client per metric, so that the three queries of a fetch run in parallel
        # threads without sharing a requests.Session
        self._clients = {name: self._client() for name in ("requests", "errors", "latency")}

    def _client(self) -> PrometheusConnect:
        s = self.settings
        session = requests.Session()
        session.verify = s.ca_file or not s.insecure_skip_verify
        if s.client_cert is not None:
            session.cert = s.client_cert
        session.hooks["response"].append(_compact_json)
        return PrometheusConnect(
            url=s.url.rstrip("/"),
            headers=self._headers() if not s.bearer_token_file else dict(s.headers),
            disable_ssl=s.insecure_skip_verify,
            # retries are ours, bounded by the fetch's deadline; urllib3 re-raises as is
            retry=Retry(total=0, read=False, redirect=False, status=False),
            auth=s.basic_auth,
            session=session,
        )

    def close(self) -> None:
        """Close the HTTP sessions."""
        for client in self._clients.values():
            client.close()

    # -- the port ----------------------------------------------------------------------------

    async def observe(self, ref: CanaryRef, spec: CanarySpec) -> Observation:
        metrics = spec.metrics
        stable, canary = spec.arm_values()
        if not stable or not canary:
            raise MetricsError(
                "cannot tell the arms apart: set spec.stable and spec.canary (or "
                "spec.metrics.stableValue and canaryValue)"
            )
        shape = _Shape.of(metrics)
        state = self._shapes.setdefault(shape, _ShapeState())
        member = _Member(ref.namespace if shape.namespace_label else "", stable, canary)
        now = self.clock()
        state.members[ref] = (member, now)
        max_age_s = min(self.settings.max_age_s, spec.analysis.interval / 2)
        snapshot = await self._snapshot(shape, state, member, max_age_s)
        return _observation(snapshot, member, shape, latency=bool(spec.analysis.latency))

    async def _snapshot(
        self, shape: _Shape, state: _ShapeState, member: _Member, max_age_s: float
    ) -> _Snapshot:
        for _ in range(3):
            snap = state.snapshot
            if (
                snap is not None
                and self.clock() - snap.fetched_at <= max_age_s
                and snap.has(member)
            ):
                return snap
            if state.inflight is None or state.inflight.done():
                state.inflight = asyncio.create_task(
                    self._fetch(shape, state), name="prometheus-fetch"
                )
            # shielded: one caller's deadline must not cancel everyone's fetch
            snap = await asyncio.shield(state.inflight)
            if snap.has(member):
                return snap
        raise MetricsError("the Prometheus snapshot never covered this Canary")  # pragma: no cover

    # -- one fetch ---------------------------------------------------------------------------

    def _members(self, state: _ShapeState) -> list[_Member]:
        """The Canaries that asked lately (the others are forgotten)."""
        now = self.clock()
        for ref, (_, seen) in list(state.members.items()):
            if now - seen > MEMBER_TTL_S:
                del state.members[ref]
        return [m for m, _ in state.members.values()]

    def _selector(
        self, shape: _Shape, members: Sequence[_Member]
    ) -> tuple[str, frozenset[ArmKey] | None, frozenset[str]]:
        namespaces = frozenset(m.namespace for m in members)
        arms = frozenset(k for m in members for k in m.keys)
        matchers = [shape.selector] if shape.selector else []
        if shape.namespace_label:
            matchers.append(f'{shape.namespace_label}=~"{_regex(namespaces)}"')
        values = _regex({value for _, value in arms})
        covers: frozenset[ArmKey] | None = None
        if len(values) <= self.settings.max_selector_chars:
            matchers.append(f'{shape.arm_label}=~"{values}"')
            covers = arms
        else:
            matchers.append(f'{shape.arm_label}!=""')
        if not shape.namespace_label:
            covers = arms  # without a namespace label, arms are matched by value alone
        return ",".join(matchers), covers, namespaces

    async def _fetch(self, shape: _Shape, state: _ShapeState) -> _Snapshot:
        started = self.clock()
        members = self._members(state)
        selector, covers, namespaces = self._selector(shape, members)
        snap = _Snapshot(started, covers, namespaces)
        at = time.time()  # every query is evaluated at this one instant
        deadline = started + self.settings.timeout_s
        self.stats["fetches"] += 1
        results: list[dict[str, list[Any]]] = []
        try:
            if self.settings.bearer_token_file:  # once per fetch, before the threads start
                headers = self._headers()
                for client in self._clients.values():
                    client.headers = headers
            try:
                results.append(await self._queries(shape, selector, at, deadline))
            except QueryRejectedError:
                if len(members) <= 1:
                    raise
                # one Canary's input may have broken the shared query: find it by halves,
                # so that it alone is charged and every other Canary gets its data
                self.stats["splits"] += 1
                await self._isolate(shape, members, at, deadline, snap, results)
                snap.covers = frozenset(k for m in members for k in m.keys)
                snap.namespaces = frozenset(m.namespace for m in members)
        except MetricsError as exc:
            self.stats["failures"] += 1
            snap.error = str(exc)
            log.warning("prometheus fetch failed", error=snap.error)
            snap.fetched_at = self.clock()
            state.snapshot = snap
            return snap
        for result in results:
            for name, series in result.items():
                self._accumulate(shape, state, snap, name, series)
        for metric, arm, le in list(state.totals):
            value = round(state.totals[(metric, arm, le)])
            if metric == "requests":
                snap.requests[arm] = value
            elif metric == "errors":
                snap.errors[arm] = value
            else:
                snap.buckets.setdefault(arm, {})[le] = value
        snap.fetched_at = self.clock()
        state.snapshot = snap
        log.debug(
            "prometheus fetch",
            queries=sum(len(r) for r in results),
            canaries=len(state.members),
            arms=len(snap.requests),
            duration_ms=round((snap.fetched_at - started) * 1000, 1),
        )
        return snap

    async def _queries(
        self, shape: _Shape, selector: str, at: float, deadline: float
    ) -> dict[str, list[Any]]:
        """The shape's queries for ``selector``, in parallel; one failure fails them all."""
        substitute = {"selector": selector, "by": shape.by}
        queries = {"requests": shape.requests, "errors": shape.errors}
        if shape.latency is not None:
            queries["latency"] = shape.latency
        rendered = {k: Template(v).safe_substitute(substitute) for k, v in queries.items()}
        tasks = [
            asyncio.create_task(self._query(name, q, at, deadline), name=f"prometheus-{name}")
            for name, q in rendered.items()
        ]
        try:
            results = await asyncio.gather(*tasks)
        finally:  # one failed query fails the snapshot: stop retrying the others
            for task in tasks:
                task.cancel()
        return dict(zip(rendered, results, strict=True))

    async def _isolate(
        self,
        shape: _Shape,
        members: list[_Member],
        at: float,
        deadline: float,
        snap: _Snapshot,
        results: list[dict[str, list[Any]]],
    ) -> None:
        """Query ``members`` by halves until each rejected query is one Canary's: those
        arms are marked bad (with their own query's error), the rest are answered."""
        half = len(members) // 2
        for part in (members[:half], members[half:]):
            try:
                selector, _, _ = self._selector(shape, part)
                results.append(await self._queries(shape, selector, at, deadline))
            except QueryRejectedError as exc:
                if len(part) > 1:
                    await self._isolate(shape, part, at, deadline, snap, results)
                    continue
                for key in part[0].keys:
                    snap.bad[key] = f"{exc} (this Canary's query only)"

    async def _query(self, name: str, query: str, at: float, deadline: float) -> list[Any]:
        """One instant query, retried with backoff until ``deadline`` (monotonic)."""
        attempt = 0
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise MetricsError(
                    f"Prometheus at {redact(self.settings.url)} did not answer within "
                    f"{self.settings.timeout_s:g}s"
                )
            self.stats["queries"] += 1
            try:
                return await asyncio.to_thread(self._blocking_query, name, query, at, remaining)
            except _RetryableError as exc:
                attempt += 1
                wait_s = self.settings.backoff_s * 2 ** (attempt - 1)
                if attempt > self.settings.retries or self.clock() + wait_s >= deadline:
                    raise MetricsError(str(exc)) from exc
                log.info(
                    "prometheus query failed; will retry",
                    attempt=f"{attempt}/{self.settings.retries}",
                    error=str(exc),
                )
                await asyncio.sleep(wait_s)

    # -- a service's traffic (canaryd plan --from-prometheus) ----------------------------

    async def traffic(self, spec: CanarySpec, namespace: str, window_s: float) -> ServiceTraffic:
        """Stable's request rate, error ratio, p50 and p99 over the last ``window_s``,
        and how much its error ratio varies from minute to minute beyond chance.

        The spec's own query templates are used (Istio's by default), each metric
        selector wrapped in ``rate(…[window])``; one query per figure, in parallel,
        within the source's deadline.

        Raises:
            MetricsError: Prometheus failed, or has no traffic for stable there.
        """
        queries = traffic_queries(spec, namespace, window_s)
        deadline = self.clock() + self.settings.timeout_s
        at = time.time()
        names = list(queries)
        answers = await asyncio.gather(
            *(self._query("requests", queries[n], at, deadline) for n in names)
        )
        values: dict[str, float] = {}
        for name, answer in zip(names, answers, strict=True):
            if answer:
                values[name] = float(answer[0].value)
        stable = _stable_value(spec)
        where = f"{stable} in namespace {namespace}" if spec.metrics.namespace_label else stable
        rps = values.get("rps", 0.0)
        if not math.isfinite(rps) or rps <= 0:
            raise MetricsError(
                f"Prometheus has no requests to {where} in the last {window_s:g}s: check "
                "--namespace, and the spec's stable.deployment or metrics section"
            )
        error_rate = values.get("error_ratio", 0.0)
        error_rate = error_rate if math.isfinite(error_rate) else 0.0
        unit = spec.metrics.latency_edge_ms()
        p50 = values.get("p50", math.nan) * unit
        p99 = values.get("p99", math.nan) * unit
        if not (math.isfinite(p50) and math.isfinite(p99) and 0 < p50 <= p99):
            raise MetricsError(
                f"Prometheus has no latency histogram for {where} in the last {window_s:g}s"
            )
        sd = values.get("error_ratio_sd", 0.0)
        per_minute = rps * 60.0
        binomial = error_rate * (1 - error_rate) / per_minute
        extra = max(sd * sd - binomial, 0.0) if math.isfinite(sd) else 0.0
        cv = math.sqrt(extra) / error_rate if error_rate > 0 else 0.0
        return ServiceTraffic(rps, error_rate, p50, p99, min(cv, 3.0), window_s)

    # -- SLO events (error budgets) ----------------------------------------------------

    async def slo_events(
        self, services: Sequence[SloService], windows_s: Sequence[float]
    ) -> dict[tuple[str, str], dict[str, dict[float, Events]]]:
        """Good and total events of every service's objectives over every window.

        Batched as the analysis is: per query shape, one query per metric and window
        covers every service of that shape (``increase`` over the window, summed by
        namespace and arm label); a service's events are its stable's and canary's
        together.  Returns ``{(namespace, service): {objective: {window_s: Events}}}``
        with the objectives ``availability`` and, where set, ``latency``.

        Raises:
            MetricsError: Prometheus failed (the figures are then left as they were).
        """
        by_shape: dict[_Shape, list[SloService]] = {}
        for service in services:
            by_shape.setdefault(_Shape.of(service.spec.metrics), []).append(service)
        deadline = self.clock() + self.settings.timeout_s
        at = time.time()
        out: dict[tuple[str, str], dict[str, dict[float, Events]]] = {}
        for shape, members in by_shape.items():
            queries = _slo_queries(shape, members, windows_s)
            names = list(queries)
            answers = await asyncio.gather(
                *(self._query("requests", queries[n], at, deadline) for n in names)
            )
            sums: dict[tuple[str, float, str, str], float] = {}
            for (metric, window), answer in zip(names, answers, strict=True):
                for series in answer:
                    value = float(series.value)
                    if not math.isfinite(value):
                        continue
                    ns = (
                        series.labels.get(shape.namespace_label, "")
                        if shape.namespace_label
                        else ""
                    )
                    arm = series.labels.get(shape.arm_label, "")
                    key = (metric, window, ns, arm)
                    sums[key] = sums.get(key, 0.0) + value
            for member in members:
                ns = member.namespace if shape.namespace_label else ""
                arms = member.arms
                objectives: dict[str, dict[float, Events]] = {"availability": {}}
                threshold_ms = _latency_threshold_ms(member)
                fast = _fast_key(threshold_ms) if threshold_ms is not None else None
                if fast:
                    objectives["latency"] = {}
                for w in windows_s:
                    requests = _arms_sum(sums, "requests", w, ns, arms)
                    errors = _arms_sum(sums, "errors", w, ns, arms)
                    objectives["availability"][w] = Events(requests - errors, requests)
                    if fast:
                        objectives["latency"][w] = Events(
                            _arms_sum(sums, fast, w, ns, arms), requests
                        )
                out[member.namespace, member.service] = objectives
        return out

    def _blocking_query(self, name: str, query: str, at: float, timeout_s: float) -> list[Any]:
        """The HTTP call (in a worker thread), its failures mapped to our errors."""
        client = self._clients[name]
        url = redact(self.settings.url)
        try:
            result = client.custom_query(query, params={"time": f"{at:.3f}"}, timeout=timeout_s)
        except requests.exceptions.JSONDecodeError as exc:
            raise _RetryableError(
                f"Prometheus at {url} sent an answer that is not its API's (not JSON): "
                f"is the URL right? ({exc})"
            ) from exc
        except requests.exceptions.Timeout as exc:
            raise _RetryableError(f"Prometheus at {url} timed out after {timeout_s:.1f}s") from exc
        except requests.exceptions.SSLError as exc:
            raise MetricsError(
                f"TLS error talking to Prometheus at {url}: {_without_path(str(exc))}"
            ) from exc
        except requests.exceptions.ConnectionError as exc:
            if "timed out" in str(exc):
                raise _RetryableError(
                    f"Prometheus at {url} timed out after {timeout_s:.1f}s"
                ) from exc
            raise _RetryableError(f"Prometheus at {url} is unreachable: {_reason(exc)}") from exc
        except requests.exceptions.RequestException as exc:
            raise _RetryableError(
                f"request to Prometheus at {url} failed: {_without_path(str(exc))}"
            ) from exc
        except PrometheusApiClientException as exc:
            text = str(exc)[:300]
            status = re.search(r"HTTP Status Code (\d+)", text)
            code = int(status.group(1)) if status else 0
            # not the query's text: batched, it names other namespaces' workloads
            message = f"Prometheus at {url} answered {text} to the {name} query"
            if code in (401, 403):
                raise MetricsError(f"Prometheus at {url} refused our credentials ({text})") from exc
            if 400 <= code < 500 and code not in (408, 429):
                raise QueryRejectedError(message) from exc  # retrying the same text cannot help
            raise _RetryableError(message) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise _RetryableError(
                f"Prometheus at {url} sent an answer that is not its API's: {exc}"
            ) from exc
        if not isinstance(result, list):
            raise _RetryableError(
                f"Prometheus at {url} sent a {type(result).__name__}, not a vector"
            )
        return result

    def _headers(self) -> dict[str, str]:
        """Every request's headers; a token file is read afresh (rotated tokens)."""
        token = self.settings.bearer_token
        if self.settings.bearer_token_file:
            try:
                token = Path(self.settings.bearer_token_file).read_text().strip()
            except OSError as exc:
                raise MetricsError(f"cannot read the Prometheus bearer token file: {exc}") from exc
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return {**dict(self.settings.headers), **auth}

    def _accumulate(
        self,
        shape: _Shape,
        state: _ShapeState,
        snap: _Snapshot,
        metric: str,
        result: Sequence[Any],
    ) -> None:
        """Fold one query's series into the per-series-corrected totals.

        The hot loop of a round (one pass per series: tens of thousands at a thousand
        Canaries), so it works on plain dicts and tuples.
        """
        ns_label, arm_label, pod_label = shape.namespace_label, shape.arm_label, shape.pod_label
        latency, edge_ms = metric == "latency", shape.edge_ms
        last, totals = state.last, state.totals
        arms: dict[tuple[str, str], tuple[str, str]] = {}  # one tuple per arm, shared by keys
        le = math.inf
        for item in result:
            try:
                labels, value = item  # a _Series
                raw = float(value)
                if latency:
                    le = float(labels["le"]) * edge_ms
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            arm = (labels.get(ns_label, "") if ns_label else "", labels.get(arm_label, ""))
            arm = arms.setdefault(arm, arm)
            if not 0 <= raw < math.inf:  # NaN, ±Inf, negative
                shown = "NaN" if math.isnan(raw) else f"{raw:g}"
                snap.bad[arm] = f"Prometheus returned {shown} for the {metric} of {arm[1]}"
                continue
            key = (metric, arm, labels.get(pod_label, "") if pod_label else "", le)
            previous = last.get(key)
            last[key] = raw
            # a new series counts from its first value; a drop is a reset (from zero)
            delta = raw if previous is None or raw < previous else raw - previous
            total_key = (metric, arm, le)
            totals[total_key] = totals.get(total_key, 0.0) + delta
        self._forget(state)

    def _forget(self, state: _ShapeState) -> None:
        """Drop the series of arms no member has any more (bounded memory)."""
        live = {k for m, _ in state.members.values() for k in m.keys}
        if len(live) * 64 >= len(state.totals):
            return
        state.last = {k: v for k, v in state.last.items() if k[1] in live}
        state.totals = {k: v for k, v in state.totals.items() if k[1] in live}


class _Series(NamedTuple):
    """One series of an instant vector, as decoded by :func:`_compact_json`."""

    labels: dict[str, str]
    value: str


class _CompactResponse(requests.Response):
    """A response whose ``json()`` decodes an instant vector compactly.

    At thousands of canaries a latency answer holds tens of thousands of series; as
    plain JSON objects each costs about 1 KB and they are all alive at once while the
    answer is folded.  Here each series becomes a :class:`_Series` (labels and value),
    and equal label values share one string, which cuts the peak to about a third.
    """

    def json(self, **kwargs: Any) -> Any:
        memo: dict[str, str] = {}

        def hook(obj: dict[str, Any]) -> Any:
            value = obj.get("value")
            if len(obj) == 2 and isinstance(obj.get("metric"), dict) and isinstance(value, list):
                return _Series(obj["metric"], value[1] if len(value) > 1 else "")
            if all(type(v) is str for v in obj.values()):  # labels: share equal values
                return {k: memo.setdefault(v, v) for k, v in obj.items()}
            return obj

        try:
            return json.loads(self.content, object_hook=hook)
        except json.JSONDecodeError as exc:  # as requests raises it, for the mapping above
            raise requests.exceptions.JSONDecodeError(exc.msg, exc.doc, exc.pos) from exc


def _compact_json(response: requests.Response, **_: Any) -> requests.Response:
    """Session hook: answers decode through :class:`_CompactResponse`."""
    response.__class__ = _CompactResponse
    return response


class _RetryableError(MetricsError):
    """A failure that may pass: connection refused, timeout, 5xx, garbled answer."""


def _without_path(text: str) -> str:
    """An HTTP library's error text without the request's path and query (urllib3 puts
    ``with url: /api/v1/query?query=…`` in it: the batched query, other namespaces'
    names included) and without credentials."""
    return redact(re.sub(r"url: \S+", "url: (query not shown)", text))


def _reason(exc: BaseException) -> str:
    """The innermost cause, e.g. ``Connection refused``, without urllib3's wrapping."""
    text = _without_path(str(exc))
    known = re.search(
        r"Connection refused|Name or service not known|Temporary failure in name resolution|"
        r"No route to host|Connection reset by peer|Network is unreachable",
        text,
    )
    return known.group(0).lower() if known else text[:200]


def _regex(values: frozenset[str] | set[str]) -> str:
    """An RE2 alternation matching exactly these values, inside a PromQL string.

    Two layers: each value is first escaped for RE2 (its metacharacters), and the
    whole alternation is then escaped for the double-quoted PromQL string literal
    (backslash, quote, and every character outside printable ASCII as ``\\U``).
    """
    alternation = "|".join(sorted(_RE2_META.sub(r"\\\g<0>", v) for v in values))
    return promql_string(alternation)


_RE2_META = re.compile(r"[.^$*+?()\[\]{}|\\]")


def promql_string(text: str) -> str:
    """``text`` escaped to sit between double quotes in PromQL (Go string escapes)."""
    out: list[str] = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def _observation(snap: _Snapshot, member: _Member, shape: _Shape, *, latency: bool) -> Observation:
    """One Canary's two arms out of a snapshot, or MetricsError saying what is missing."""
    if snap.error is not None:
        raise MetricsError(snap.error)
    stable_key, canary_key = member.keys
    for key in (stable_key, canary_key):
        if key in snap.bad:
            raise MetricsError(snap.bad[key])
    if stable_key not in snap.requests and canary_key not in snap.requests:
        where = f" in namespace {member.namespace}" if shape.namespace_label else ""
        raise MetricsError(
            f"Prometheus has no request series for {shape.arm_label}={member.stable!r} or "
            f"{member.canary!r}{where}: no traffic yet, or spec.metrics does not match "
            "the labels"
        )
    return Observation(
        stable=_arm(snap, stable_key, member, latency=latency and shape.latency is not None),
        canary=_arm(snap, canary_key, member, latency=latency and shape.latency is not None),
    )


def _arm(snap: _Snapshot, key: ArmKey, member: _Member, *, latency: bool) -> ArmCounts:
    """An arm's counters; an arm with no series yet has served nothing (Istio creates a
    series with its first request)."""
    requests_ = snap.requests.get(key, 0)
    errors = min(snap.errors.get(key, 0), requests_)
    if not latency:
        return ArmCounts(requests_, errors)
    edges = snap.buckets.get(key)
    if edges is None:
        if requests_ == 0:
            return ArmCounts(0, 0, (0,) * N_BUCKETS)
        raise MetricsError(
            f"Prometheus has requests but no latency histogram for {key[1]} in {member.namespace}"
        )
    return ArmCounts(requests_, errors, _rebucket(edges))


_OUR_EDGES = (*LATENCY_EDGES_MS, math.inf)
_OUR_EDGE_SET = frozenset(_OUR_EDGES)


def _rebucket(edges: Mapping[float, int]) -> tuple[int, ...]:
    """Cumulative counts on canaryd's edges from a histogram with any edges (in ms).

    A bucket of ours counts the requests at or below the largest edge of theirs that is
    not above ours: exact on Istio's edges, and otherwise the same event definition for
    both arms, which is all a canary-vs-stable comparison needs.
    """
    if edges.keys() == _OUR_EDGE_SET:  # Istio's own edges: nothing to map
        return tuple(edges[e] for e in _OUR_EDGES)
    theirs = sorted(edges.items())
    out: list[int] = []
    i, last = 0, 0
    for edge in _OUR_EDGES:
        while i < len(theirs) and theirs[i][0] <= edge * (1 + 1e-9):
            last = max(last, theirs[i][1])
            i += 1
        out.append(last)
    return tuple(out)


# -- a service's traffic -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceTraffic:
    """Stable's traffic over a window, as ``canaryd plan --from-prometheus`` reads it."""

    rps: float
    error_rate: float
    p50_ms: float
    p99_ms: float
    error_cv: float
    window_s: float


_METRIC_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^{}]*)\}")


def _over_window(template: str, function: str, window: str) -> str:
    """``template`` with each ``metric{…}`` selector as ``function(metric{…}[window])``
    (``rate`` or ``increase``)."""
    if "[" in template:
        raise MetricsError(f"a query template with a range ([…]) cannot be read with {function}()")
    return _METRIC_SELECTOR.sub(lambda m: f"{function}({m.group(0)}[{window}])", template)


def _stable_value(spec: CanarySpec) -> str:
    value = spec.arm_values()[0]
    if not value:
        raise MetricsError(
            "cannot find stable's series: set spec.stable.deployment (or "
            "spec.metrics.stableValue) in --spec"
        )
    return value


def traffic_queries(spec: CanarySpec, namespace: str, window_s: float) -> dict[str, str]:
    """The PromQL of :meth:`PrometheusMetrics.traffic`, by figure."""
    metrics = spec.metrics
    matchers = [metrics.selector] if metrics.selector else []
    if metrics.namespace_label:
        matchers.append(f'{metrics.namespace_label}="{promql_string(namespace)}"')
    matchers.append(f'{metrics.arm_label}="{promql_string(_stable_value(spec))}"')
    requests_t, errors_t, latency_t = metrics.templates()
    window = f"{max(round(window_s), 60)}s"

    def render(template: str, over: str) -> str:
        text = _over_window(template, "rate", over)
        return Template(text).safe_substitute(selector=",".join(matchers), by=metrics.arm_label)

    req, err = f"sum({render(requests_t, window)})", f"sum({render(errors_t, window)})"
    req_1m, err_1m = f"sum({render(requests_t, '1m')})", f"sum({render(errors_t, '1m')})"
    queries = {
        "rps": req,
        "error_ratio": f"({err} or vector(0)) / {req}",
        "error_ratio_sd": f"stddev_over_time((({err_1m} or vector(0)) / {req_1m})[{window}:1m])",
    }
    if latency_t is not None:
        buckets = render(latency_t, window)
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            queries[label] = f"histogram_quantile({q}, sum by (le) ({buckets}))"
    return queries


# -- SLO events ----------------------------------------------------------------------------


def _arms_sum(
    sums: Mapping[tuple[str, float, str, str], float],
    metric: str,
    window: float,
    namespace: str,
    arms: Sequence[str],
) -> float:
    """One metric's increase over a window, summed over a service's arms."""
    return sum(sums.get((metric, window, namespace, arm), 0.0) for arm in arms)


def _latency_threshold_ms(service: SloService) -> float | None:
    """A service's latency objective's threshold, if it has one."""
    slo = service.spec.analysis.slo
    return slo.latency.threshold_ms if slo is not None and slo.latency is not None else None


def _fast_key(threshold_ms: float) -> str:
    """The query name of 'answered within ``threshold_ms``' events."""
    return f"fast:{threshold_ms:g}"


def _slo_queries(
    shape: _Shape, members: Sequence[SloService], windows_s: Sequence[float]
) -> dict[tuple[str, float], str]:
    """The PromQL of :meth:`PrometheusMetrics.slo_events` for one shape, by (metric,
    window)."""
    matchers = [shape.selector] if shape.selector else []
    if shape.namespace_label:
        namespaces = {m.namespace for m in members}
        matchers.append(f'{shape.namespace_label}=~"{_regex(namespaces)}"')
    matchers.append(f'{shape.arm_label}=~"{_regex({a for m in members for a in m.arms})}"')
    by = ", ".join(label for label in (shape.namespace_label, shape.arm_label) if label)
    thresholds = sorted({t for m in members if (t := _latency_threshold_ms(m)) is not None})

    def query(template: str, window: str, extra: Sequence[str] = ()) -> str:
        text = _over_window(template, "increase", window)
        text = Template(text).safe_substitute(selector=",".join([*matchers, *extra]), by=by)
        return f"sum by ({by}) ({text})"

    queries: dict[tuple[str, float], str] = {}
    for w in windows_s:
        window = f"{round(w)}s"
        queries["requests", w] = query(shape.requests, window)
        queries["errors", w] = query(shape.errors, window)
        if shape.latency is not None:
            for threshold_ms in thresholds:
                edge = threshold_ms / shape.edge_ms
                le = f'le=~"{edge:g}|{edge:.1f}"'
                queries[_fast_key(threshold_ms), w] = query(shape.latency, window, [le])
    return queries
