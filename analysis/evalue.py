"""One-sided Beta-binomial mixture e-values (design §5).

The canary-vs-stable comparison, the absolute guards and (later) SLO burn all reduce
to one question about bad events: is the probability ``θ`` that a bad event lands on
the side under test larger than a bound ``θ0``?  For ``x`` bad events on that side and
``y`` on the other, with a ``Beta(a, b)`` prior restricted to ``θ > θ0``::

    E = B(a+x, b+y) (1 - I_θ0(a+x, b+y)) / [B(a, b) (1 - I_θ0(a, b))] / [θ0^x (1-θ0)^y]

Under ``H0: θ ≤ θ0`` this is a test supermartingale, so rejecting when ``E ≥ 1/α``
keeps the probability of *ever* rejecting below ``α`` however often we look
(Ville's inequality).  Everything here works in logs to stay finite for large counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.special import betainc, betaln

#: Floor of log e-values, so that a hopeless step (the posterior far below θ0)
#: stays a finite, JSON-safe number.  e^-745 is below the smallest double.
LOG_FLOOR: float = -745.0


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (modified Lentz), for ``x < (a+1)/(a+b+2)``."""
    tiny, eps = 1e-300, 1e-14
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def log_betainc(a: float, b: float, x: float) -> float:
    """log of the regularized incomplete beta ``I_x(a, b)``, finite far into the tail.

    scipy's ``betainc`` underflows to 0 below ~1e-308, which the e-value cannot
    afford: its other terms grow with the counts, so a floored tail would turn a
    hopeless step into overwhelming evidence.  There, the continued fraction with
    its prefactor taken in logs gives the exact value.
    """
    value = float(betainc(a, b, x))
    if value > 1e-280:
        return math.log(value)
    if x <= 0.0:
        return -math.inf
    if x < (a + 1.0) / (a + b + 2.0):
        prefix = a * math.log(x) + b * math.log1p(-x) - math.log(a) - float(betaln(a, b))
        return prefix + math.log(_betacf(a, b, x))
    # upper side: I_x(a, b) = 1 - I_{1-x}(b, a), and the tiny value is the complement
    return math.log1p(-math.exp(log_betainc(b, a, 1.0 - x)))


def _log_upper_tail(a: float, b: float, theta0: float) -> float:
    """log(1 - I_θ0(a, b)) = log I_{1-θ0}(b, a), accurate far into the tail."""
    return log_betainc(b, a, 1.0 - theta0)


def prior_params(theta0: float, concentration: float) -> tuple[float, float]:
    """Beta prior parameters with mean ``theta0`` and ``a + b = concentration``."""
    return concentration * theta0, concentration * (1.0 - theta0)


def mixture_log_evalue(x: int, y: int, theta0: float, concentration: float) -> float:
    """log of the one-sided mixture e-value for ``H0: θ ≤ θ0``.

    Args:
        x: bad events on the side under test (the canary); ``x ≥ 0``.
        y: bad events on the other side (the stable, or the good events in a
            one-sample test); ``y ≥ 0``.
        theta0: the null bound, ``0 < theta0 < 1``.
        concentration: prior strength ``a + b``; smaller spreads the bet over larger
            departures from ``θ0``, larger over small ones.

    Returns:
        ``log E``; 0.0 with no events (no evidence either way), never above what the
        data supports, floored at ``LOG_FLOOR``.
    """
    if not 0.0 < theta0 < 1.0:
        raise ValueError(f"theta0 must lie in (0, 1), got {theta0}")
    if x < 0 or y < 0:
        raise ValueError(f"event counts must be non-negative, got x={x}, y={y}")
    if x == 0 and y == 0:
        return 0.0
    a, b = prior_params(theta0, concentration)
    log_e = (
        betaln(a + x, b + y)
        + _log_upper_tail(a + x, b + y, theta0)
        - betaln(a, b)
        - _log_upper_tail(a, b, theta0)
        - x * math.log(theta0)
        - y * math.log1p(-theta0)
    )
    return max(float(log_e), LOG_FLOOR)


def theta0_for_ratio(weight: float, ratio: float) -> float:
    """Null bound on P(a bad event is the canary's) when canary/stable ≤ ``ratio``.

    With a canary traffic share ``weight`` (0 < weight < 1) and the canary's bad-event
    rate at most ``ratio`` times the stable's, a bad event is the canary's with
    probability at most ``w·r / (w·r + 1 - w)`` (design §5).
    """
    wr = weight * ratio
    return wr / (wr + 1.0 - weight)


def ratio_for_theta(weight: float, theta: float) -> float:
    """Inverse of :func:`theta0_for_ratio`: the canary/stable rate ratio for ``theta``."""
    if theta >= 1.0:
        return math.inf
    return theta * (1.0 - weight) / (weight * (1.0 - theta))


def restart_weights(n_steps: int) -> tuple[float, ...]:
    """Prior weights of the restart mixture over the step a regression starts in.

    Half the mass bets that the regression is there from the first step (where most
    are caught), the rest is spread evenly over the later steps.  Sums to 1.
    """
    if n_steps <= 1:
        return (1.0,)
    rest = 0.5 / (n_steps - 1)
    return (0.5,) + (rest,) * (n_steps - 1)


def combine_steps(step_log_es: Sequence[float], n_steps: int) -> float:
    """log of the rollout-wide e-value from per-step e-values.

    A plain product over steps is valid but lets one healthy step (E ≪ 1) mask a
    regression that appears later, e.g. under the load of the 50% step.  Instead we
    mix over the step ``j`` where the regression starts: ``M = Σ_j π_j M_j`` with
    ``M_j = ∏_{k=j..i} E_k`` once step ``j`` has begun and ``M_j = 1`` before.  Each
    ``M_j`` is a test supermartingale starting at 1, so their convex mixture is one
    too and Ville's inequality still bounds the false-rollback rate by ``α``.  The
    product over all steps is the ``j = 0`` term.

    Args:
        step_log_es: log e-values of the steps so far in order, the current step last.
        n_steps: how many steps this check applies to in the whole rollout
            (``≥ len(step_log_es)``).
    """
    current = len(step_log_es)
    if current == 0:
        return 0.0
    n_steps = max(n_steps, current)
    weights = restart_weights(n_steps)
    terms: list[float] = []
    suffix = 0.0
    for j in range(current - 1, -1, -1):
        suffix += step_log_es[j]
        terms.append(math.log(weights[j]) + suffix)
    not_started = sum(weights[current:])
    if not_started > 0.0:
        terms.append(math.log(not_started))
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))
