"""How one version answers requests, and how total traffic varies over a day.

A version is described by its 5xx probability and two latency quantiles.  Latency is
modelled as log-normal, fitted so that its median is ``p50_ms`` and its 0.99 quantile
is ``p99_ms``; the simulator only needs the probability of each histogram bucket.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from analysis.counts import LATENCY_EDGES_MS

#: Standard normal 0.99 quantile: ``p99 = p50 * exp(Z99 * sigma)`` for a log-normal.
Z99: float = 2.3263478740408408

#: Smallest log-normal sigma used, so that ``p99_ms == p50_ms`` stays well defined.
MIN_SIGMA: float = 1e-6

#: Length of the daily traffic cycle, in seconds.
DAY_S: float = 86400.0

#: Hour of the day (0..24) of the daily traffic minimum; the maximum is 12 h later.
TROUGH_HOUR: float = 3.0

#: Daily traffic swing: the factor runs from ``1 - DAILY_AMPLITUDE`` to ``1 + DAILY_AMPLITUDE``.
DAILY_AMPLITUDE: float = 0.5

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How one version answers requests at some instant.

    Attributes:
        error_rate: probability that a request is answered with a 5xx (0..1).
        p50_ms: median latency, in milliseconds (> 0).
        p99_ms: 99th-percentile latency, in milliseconds (>= ``p50_ms``).
    """

    error_rate: float
    p50_ms: float
    p99_ms: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be within 0..1, got {self.error_rate!r}")
        if not (math.isfinite(self.p50_ms) and self.p50_ms > 0):
            raise ValueError(f"p50_ms must be a finite number > 0, got {self.p50_ms!r}")
        if not (math.isfinite(self.p99_ms) and self.p99_ms >= self.p50_ms):
            raise ValueError(
                f"p99_ms must be finite and >= p50_ms ({self.p50_ms!r}), got {self.p99_ms!r}"
            )

    def lognormal_params(self) -> tuple[float, float]:
        """``(mu, sigma)`` of the latency log-normal (of latency in ms).

        ``mu = ln p50_ms`` and ``sigma = (ln p99_ms - ln p50_ms) / Z99``, but at least
        ``MIN_SIGMA``.
        """
        return _lognormal_params(self.p50_ms, self.p99_ms)

    def bucket_probabilities(self) -> FloatArray:
        """Probability that one request falls in each non-cumulative latency bucket.

        Entry ``i`` is ``P(LATENCY_EDGES_MS[i-1] < latency_ms <= LATENCY_EDGES_MS[i])``
        (with edge ``-1`` taken as 0 ms); the last entry is ``P(latency_ms > last edge)``.
        The array has ``analysis.counts.N_BUCKETS`` entries summing to 1, is cached and read-only.
        """
        return _bucket_probabilities(self.p50_ms, self.p99_ms)


def _lognormal_params(p50_ms: float, p99_ms: float) -> tuple[float, float]:
    mu = math.log(p50_ms)
    sigma = max((math.log(p99_ms) - mu) / Z99, MIN_SIGMA)
    return mu, sigma


@functools.cache
def _bucket_probabilities(p50_ms: float, p99_ms: float) -> FloatArray:
    mu, sigma = _lognormal_params(p50_ms, p99_ms)
    scale = sigma * math.sqrt(2.0)
    # Log-normal CDF at each edge: Phi((ln x - mu) / sigma), via erfc for accuracy in the tails.
    cdf = [0.5 * math.erfc(-(math.log(edge_ms) - mu) / scale) for edge_ms in LATENCY_EDGES_MS]
    probs = np.diff(np.array([0.0, *cdf, 1.0], dtype=np.float64))
    probs = np.clip(probs, 0.0, None)
    probs /= probs.sum()
    probs.setflags(write=False)
    return probs


def _phase(t_s: float, start_hour: float) -> float:
    """Angle of the daily cycle at ``t_s``: 0 at the trough (``TROUGH_HOUR``)."""
    hours_since_trough = start_hour - TROUGH_HOUR + t_s / 3600.0
    return 2.0 * math.pi * hours_since_trough / 24.0


def daily_factor(t_s: float, start_hour: float) -> float:
    """Multiplier of the base request rate at ``t_s`` seconds into a scenario.

    A sinusoid with a 24 h (86,400 s) period and mean 1 over a day: 0.5 at 03:00 and
    1.5 at 15:00.  ``start_hour`` is the hour of day (0..24) at which ``t_s == 0``.
    """
    return 1.0 - DAILY_AMPLITUDE * math.cos(_phase(t_s, start_hour))


def daily_factor_mean(t0_s: float, t1_s: float, start_hour: float) -> float:
    """Exact mean of :func:`daily_factor` over ``[t0_s, t1_s]`` seconds.

    Multiplying a base rate by it and by ``t1_s - t0_s`` gives the expected number of
    requests in the interval, however long the interval is.
    """
    if t1_s == t0_s:
        return daily_factor(t0_s, start_hour)
    phi0 = _phase(t0_s, start_hour)
    phi1 = _phase(t1_s, start_hour)
    half = 0.5 * (phi1 - phi0)
    # mean of cos over [phi0, phi1] = cos(mid) * sin(half) / half, stable for short spans.
    sinc = math.sin(half) / half if half != 0.0 else 1.0
    return 1.0 - DAILY_AMPLITUDE * math.cos(0.5 * (phi0 + phi1)) * sinc
