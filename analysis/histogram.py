"""Quantiles from cumulative latency histograms, as Prometheus' ``histogram_quantile``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from analysis.counts import LATENCY_EDGES_MS


def histogram_quantile(
    q: float, buckets: Sequence[int], edges_ms: Sequence[float] = LATENCY_EDGES_MS
) -> float:
    """The ``q``-quantile (0 < q < 1) in ms from cumulative bucket counts.

    Interpolates linearly inside the bucket that holds the quantile, with 0 as the
    lower edge of the first bucket, exactly like PromQL's ``histogram_quantile``.
    Returns NaN with no observations; the last finite edge when the quantile falls
    in the ``+Inf`` bucket.
    """
    if not buckets or buckets[-1] <= 0:
        return math.nan
    rank = q * buckets[-1]
    lower_edge, lower_count = 0.0, 0
    for edge, count in zip(edges_ms, buckets, strict=False):
        if count >= rank:
            width = count - lower_count
            if width <= 0:
                return edge
            return lower_edge + (edge - lower_edge) * (rank - lower_count) / width
        lower_edge, lower_count = edge, count
    return float(edges_ms[-1])
