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

import functools
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from numpy.typing import ArrayLike
from scipy.special import betainc, betaln

FloatArray = npt.NDArray[np.float64]

#: Floor of log e-values, so that a hopeless step (the posterior far below θ0)
#: stays a finite, JSON-safe number.  e^-745 is below the smallest double.
LOG_FLOOR: float = -745.0
#: log-odds range searched for confidence bounds: θ from ~2e-9 to 1 - 2e-9.
_LOGIT_SPAN = 20.0


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


def _log_betainc_array(a: FloatArray, b: FloatArray, x: FloatArray) -> FloatArray:
    """Elementwise :func:`log_betainc`: scipy where it is accurate, the fraction elsewhere."""
    value = np.asarray(betainc(a, b, x), dtype=np.float64)
    with np.errstate(divide="ignore"):
        out = np.log(value)
    for i in zip(*np.nonzero(value <= 1e-280), strict=True):
        out[i] = log_betainc(float(a[i]), float(b[i]), float(x[i]))
    return out


def prior_params(theta0: float, concentration: float) -> tuple[float, float]:
    """Beta prior parameters with mean ``theta0`` and ``a + b = concentration``."""
    return concentration * theta0, concentration * (1.0 - theta0)


def _log_evalue_scalar(x: float, y: float, theta0: float, concentration: float) -> float:
    """:func:`log_evalue_upper` for one canary in plain floats (7× faster than numpy)."""
    if not 0.0 < theta0 < 1.0:
        raise ValueError(f"theta0 must lie in (0, 1), got {theta0}")
    if x < 0 or y < 0:
        raise ValueError(f"event counts must be non-negative, got x={x}, y={y}")
    if x == 0 and y == 0:
        return 0.0
    a, b = prior_params(theta0, concentration)
    log_e = (
        float(betaln(a + x, b + y))
        + log_betainc(b + y, a + x, 1.0 - theta0)
        - float(betaln(a, b))
        - log_betainc(b, a, 1.0 - theta0)
        - x * math.log(theta0)
        - y * math.log1p(-theta0)
    )
    return max(log_e, LOG_FLOOR)


def log_evalue_upper(
    x: ArrayLike, y: ArrayLike, theta0: ArrayLike, concentration: float
) -> FloatArray:
    """log of the one-sided mixture e-value for ``H0: θ ≤ θ0`` (evidence that θ > θ0).

    Vectorised: ``x``, ``y`` and ``theta0`` broadcast together.

    Args:
        x: bad events on the side under test (the canary); ``x ≥ 0``.
        y: bad events on the other side (the stable, or the good events in a
            one-sample test); ``y ≥ 0``.
        theta0: the null bound, ``0 < theta0 < 1``.
        concentration: prior strength ``a + b``; smaller spreads the bet over larger
            departures from ``θ0``, larger over small ones.

    Returns:
        ``log E``: 0 with no events (no evidence either way), floored at ``LOG_FLOOR``.
    """
    xa, ya, t0 = np.broadcast_arrays(
        np.asarray(x, dtype=np.float64),
        np.asarray(y, dtype=np.float64),
        np.asarray(theta0, dtype=np.float64),
    )
    shape = xa.shape
    xa, ya, t0 = (np.atleast_1d(v) for v in (xa, ya, t0))
    if np.any((t0 <= 0.0) | (t0 >= 1.0)):
        raise ValueError(f"theta0 must lie in (0, 1), got {theta0!r}")
    if np.any((xa < 0) | (ya < 0)):
        raise ValueError(f"event counts must be non-negative, got x={x!r}, y={y!r}")
    a = concentration * t0
    b = concentration * (1.0 - t0)
    log_e = (
        betaln(a + xa, b + ya)
        + _log_betainc_array(b + ya, a + xa, 1.0 - t0)  # log(1 - I_θ0(a+x, b+y))
        - betaln(a, b)
        - _log_betainc_array(b, a, 1.0 - t0)
        - xa * np.log(t0)
        - ya * np.log1p(-t0)
    )
    log_e = np.maximum(log_e, LOG_FLOOR)
    result = np.where((xa == 0) & (ya == 0), 0.0, log_e)
    return np.asarray(result, dtype=np.float64).reshape(shape)


def log_evalue_lower(
    x: ArrayLike, y: ArrayLike, theta_bound: ArrayLike, concentration: float
) -> FloatArray:
    """log e-value for ``H0: θ ≥ θb`` (evidence that θ < θb).

    The mirror image of :func:`log_evalue_upper`: sides swapped and ``θ ↔ 1 − θ``.
    """
    mirrored = 1.0 - np.asarray(theta_bound, dtype=np.float64)
    return log_evalue_upper(y, x, mirrored, concentration)


def mixture_log_evalue(x: float, y: float, theta0: float, concentration: float) -> float:
    """Scalar :func:`log_evalue_upper`: the e-value of design §5 for one canary."""
    return _log_evalue_scalar(float(x), float(y), theta0, concentration)


#: Bisection steps for confidence bounds, from a bracket of ±(6 standard errors + 1)
#: log-odds around the estimate: resolution below 1% of the ratio for any data.
BOUND_ITERATIONS = 10


def theta_bounds(
    x: ArrayLike,
    y: ArrayLike,
    level: float,
    concentration: float,
    iterations: int = BOUND_ITERATIONS,
) -> tuple[FloatArray, FloatArray]:
    """Anytime-valid confidence sequence for θ, by inverting the mixture tests.

    The lower end is the largest θ the upper test rejects at ``level``, the upper end
    the smallest θ the lower test rejects.  Each end holds with probability at least
    ``1 - level`` at all times at once, so ``level = 0.025`` gives a 95% sequence.
    Bisection in log-odds, vectorised over the inputs; :func:`theta_bounds_scalar`
    does the same for one pair of counts in plain floats.
    """
    xa, ya = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    threshold = math.log(1.0 / level)
    centre = np.log((xa + 0.5) / (ya + 0.5))

    reach = 6.0 * np.sqrt(1.0 / (xa + 0.5) + 1.0 / (ya + 0.5)) + 1.0
    test_lo, test_hi = log_evalue_upper, log_evalue_lower

    def rejects(lower_end: bool, logit: FloatArray) -> npt.NDArray[np.bool_]:
        theta = 1.0 / (1.0 + np.exp(-np.clip(logit, -_LOGIT_SPAN, _LOGIT_SPAN)))
        test = test_lo if lower_end else test_hi
        return np.asarray(test(xa, ya, theta, concentration) >= threshold)

    def search(lower_end: bool) -> FloatArray:
        sign = -1.0 if lower_end else 1.0
        kept = centre.copy()
        bracket = np.clip(centre + sign * reach, -_LOGIT_SPAN, _LOGIT_SPAN)
        excluded = np.where(rejects(lower_end, bracket), bracket, sign * _LOGIT_SPAN)
        for _ in range(iterations):
            mid = 0.5 * (kept + excluded)
            rejected = rejects(lower_end, mid)
            excluded = np.where(rejected, mid, excluded)
            kept = np.where(rejected, kept, mid)
        return np.asarray(1.0 / (1.0 + np.exp(-excluded)), dtype=np.float64)

    lo = np.where(xa > 0, search(lower_end=True), 0.0)
    hi = np.where(ya > 0, search(lower_end=False), 1.0)
    return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)


def theta_bounds_scalar(
    x: float, y: float, level: float, concentration: float, iterations: int = BOUND_ITERATIONS
) -> tuple[float, float]:
    """:func:`theta_bounds` for one pair of counts, in plain floats."""
    threshold = math.log(1.0 / level)
    centre = math.log((x + 0.5) / (y + 0.5))
    reach = 6.0 * math.sqrt(1.0 / (x + 0.5) + 1.0 / (y + 0.5)) + 1.0

    def rejects(lower_end: bool, logit: float) -> bool:
        theta = 1.0 / (1.0 + math.exp(-min(max(logit, -_LOGIT_SPAN), _LOGIT_SPAN)))
        if lower_end:
            return _log_evalue_scalar(x, y, theta, concentration) >= threshold
        return _log_evalue_scalar(y, x, 1.0 - theta, concentration) >= threshold

    def search(lower_end: bool) -> float:
        sign = -1.0 if lower_end else 1.0
        kept = centre
        bracket = min(max(centre + sign * reach, -_LOGIT_SPAN), _LOGIT_SPAN)
        excluded = bracket if rejects(lower_end, bracket) else sign * _LOGIT_SPAN
        for _ in range(iterations):
            mid = 0.5 * (kept + excluded)
            if rejects(lower_end, mid):
                excluded = mid
            else:
                kept = mid
        return 1.0 / (1.0 + math.exp(-excluded))

    return (search(True) if x > 0 else 0.0, search(False) if y > 0 else 1.0)


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


#: Prior weight of the restart mixture on "the regression shows from the first step".
FIRST_STEP_WEIGHT: float = 0.8


@functools.cache
def restart_weights(n_steps: int) -> tuple[float, ...]:
    """Prior weights of the restart mixture over the step a regression starts in.

    Most regressions show from the first step, so it gets 0.8 of the mass (costing
    log(1/0.8) ≈ 0.22 nats of evidence there); the rest is spread evenly over the
    later steps.  Sums to 1.
    """
    if n_steps <= 1:
        return (1.0,)
    rest = (1.0 - FIRST_STEP_WEIGHT) / (n_steps - 1)
    return (FIRST_STEP_WEIGHT,) + (rest,) * (n_steps - 1)


#: log π0 and log(1 − π0) of :func:`restart_weights` (the first step's closed form)
_LOG_FIRST_WEIGHT: float = math.log(FIRST_STEP_WEIGHT)
_LOG_REST_WEIGHT: float = math.log1p(-FIRST_STEP_WEIGHT)


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
    if current == 1:  # the common case, in closed form: log(π0·E + (1 − π0))
        if n_steps == 1:
            return step_log_es[0]
        head = _LOG_FIRST_WEIGHT + step_log_es[0]
        if head >= _LOG_REST_WEIGHT:
            return head + math.log1p(math.exp(_LOG_REST_WEIGHT - head))
        return _LOG_REST_WEIGHT + math.log1p(math.exp(head - _LOG_REST_WEIGHT))
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
