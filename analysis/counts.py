"""Counts: the data every analysis works from.

An arm (stable or canary) is described by monotonic counters, exactly as Prometheus
exposes Istio's standard metrics: requests served, requests answered with a 5xx, and
the cumulative latency histogram (requests at or below each bucket edge).  Analysis
works on differences of such counters (since a step began, or over one interval).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Istio/Envoy default latency bucket upper edges, in milliseconds (design §2).
#: A histogram carries one count per edge plus a final ``+Inf`` bucket.
LATENCY_EDGES_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
    30000, 60000, 300000, 600000, 1800000, 3600000,
)  # fmt: skip

#: Number of cumulative buckets per histogram: one per edge plus ``+Inf``.
N_BUCKETS: int = len(LATENCY_EDGES_MS) + 1


@dataclass(frozen=True, slots=True)
class ArmCounts:
    """Counters of one arm (stable or canary), cumulative like Prometheus counters.

    Attributes:
        requests: requests served.
        errors: requests answered with a 5xx status (a subset of ``requests``).
        latency_buckets: cumulative histogram, ``N_BUCKETS`` long: entry ``i`` counts
            requests that took at most ``LATENCY_EDGES_MS[i]`` ms; the last entry
            (``+Inf``) equals ``requests``.  Empty when latency is not measured.
    """

    requests: int = 0
    errors: int = 0
    latency_buckets: tuple[int, ...] = ()

    def __sub__(self, other: ArmCounts) -> ArmCounts:
        """Counts accrued between ``other`` (earlier) and ``self`` (later)."""
        if self.latency_buckets and other.latency_buckets:
            buckets = tuple(
                a - b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)
            )
        else:
            buckets = self.latency_buckets
        return ArmCounts(self.requests - other.requests, self.errors - other.errors, buckets)

    def __add__(self, other: ArmCounts) -> ArmCounts:
        if self.latency_buckets and other.latency_buckets:
            buckets = tuple(
                a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)
            )
        else:
            buckets = self.latency_buckets or other.latency_buckets
        return ArmCounts(self.requests + other.requests, self.errors + other.errors, buckets)

    @property
    def went_back(self) -> bool:
        """True when a difference of counters is negative anywhere: a counter was reset
        between the two readings (a pod restarted), so they are not comparable."""
        return self.requests < 0 or self.errors < 0 or any(b < 0 for b in self.latency_buckets)

    def coherent(self) -> ArmCounts:
        """These counts with what cannot be true of one instant made true, as
        Prometheus's ``histogram_quantile`` mends non-monotonic buckets: series read
        a moment apart can show more errors than requests, or a bucket above the next
        or above the requests.  Errors are capped at requests; buckets are made
        non-decreasing and capped at requests.  Negative counts (see
        :attr:`went_back`) are for the caller to handle; here they become 0."""
        requests = max(0, self.requests)
        errors = min(max(0, self.errors), requests)
        buckets: list[int] = []
        running = 0
        for b in self.latency_buckets:
            running = min(max(running, b), requests)
            buckets.append(running)
        if buckets:
            buckets[-1] = requests  # +Inf counts every request
        fixed = ArmCounts(requests, errors, tuple(buckets))
        return self if fixed == self else fixed

    @property
    def error_ratio(self) -> float:
        """Errors per request (0.0 with no requests)."""
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True)
class Observation:
    """What a ``MetricsSource`` reports at one instant: both arms' counters.

    Attributes:
        stable: the stable arm's cumulative counters, or ``None`` when unknown.
        canary: the canary arm's cumulative counters, or ``None`` when unknown.
    """

    stable: ArmCounts | None
    canary: ArmCounts | None

    @property
    def complete(self) -> bool:
        """True when both arms were observed."""
        return self.stable is not None and self.canary is not None
