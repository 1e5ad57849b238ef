"""Judge one step of a rollout from the counts since the step began (design §5).

Checks, each a test on *bad events* with the mixture e-values of :mod:`analysis.evalue`:

* ``errors`` — canary vs stable: is the canary's error rate above ``(1 + tol) ×``
  stable's?
* ``latency.pNN`` — canary vs stable: is the canary's share of requests slower than
  ``L`` above ``(1 + tol) ×`` stable's?  ``L`` is the histogram edge at or above
  stable's NN-th percentile, fixed from stable data *before* the step's window.
* ``errors.limit`` — the canary alone: is its error ratio above the tighter of
  ``maxPct`` and the SLO burn limit ``burnRateLimit × (1 − availability)``?  Both are
  the same question with different bounds, so one test serves both.
* ``latency.pNN.max`` — the canary alone: are more than ``(100 − NN)%`` of its
  requests slower than ``maxMs`` (tested at the histogram edge at or above it)?

Rules, in order:

1. any check in breach → **rollback**, naming the check and its numbers;
2. a limit breached by stable as well (a shared incident) → **hold**;
3. fewer than ``min_requests`` canary requests → **continue** while the step runs,
   **hold** once its duration is up;
4. ``step_duration_s`` elapsed with no breach → **pass**;
5. early pass: after ``min_step_duration_s``, when every check's anytime-valid 95%
   confidence sequence lies below its pass bound (``early_pass_ratio ×`` stable for
   comparisons, the limit itself for limits) → **pass**;
6. otherwise **continue**.

The false-rollback budget ``alpha`` is split over the checks by fixed weights (see
``ALPHA_WEIGHTS``; fixed before any data is seen), so the whole rollout stays within
``alpha``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np

from analysis.counts import LATENCY_EDGES_MS, ArmCounts
from analysis.dispersion import Moments, canary_inflation, error_inflation
from analysis.evalue import (
    combine_steps,
    log_evalue_lower,
    log_evalue_upper,
    mixture_log_evalue,
    ratio_for_theta,
    theta0_for_ratio,
    theta_bounds,
    theta_bounds_scalar,
)
from analysis.verdict import (
    CheckResult,
    CheckStatus,
    Decision,
    Verdict,
    fmt_e,
    fmt_pct,
    format_duration,
)

#: Prior strength of the mixtures (a + b of the Beta prior).  Measured at a 10% step,
#: 100 rps, 0.5% stable errors (median requests to rollback, 200 runs): κ=5: 2× 70k,
#: 5× 6.0k, 10× 2.0k; κ=10: 66k, 6.0k, 2.0k; κ=20: 63k, 6.8k, 3.0k; κ=50: -, 7.9k,
#: 3.0k.  κ=10 is within 5% of the best at every ratio.
DEFAULT_CONCENTRATION: float = 10.0
DEFAULT_GUARD_CONCENTRATION: float = 10.0

ERRORS = "errors"
ERRORS_LIMIT = "errors.limit"


class CheckKind(StrEnum):
    COMPARE = "compare"  #: canary vs stable, bad events split between the arms
    LIMIT = "limit"  #: canary alone against a fixed bound


@dataclass(frozen=True, slots=True)
class LatencySettings:
    """One latency percentile to judge.

    Attributes:
        percentile: e.g. 99 for p99 (0 < percentile < 100).
        tolerance: the canary's share of requests slower than ``L`` may be up to
            ``(1 + tolerance) ×`` stable's.
        max_ms: absolute limit on the canary's percentile, ms, or None.
    """

    percentile: float
    tolerance: float = 0.2
    max_ms: float | None = None

    @property
    def label(self) -> str:
        return f"p{self.percentile:g}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Analysis settings, in plain units (the spec model maps onto these).

    Attributes:
        alpha: false-rollback budget for the whole rollout, 0 < alpha < 1.
        step_duration_s: a step passes once this long with no breach (seconds).
        min_step_duration_s: no step passes sooner than this (seconds).
        min_requests: canary requests in the step before it may pass.
        error_tolerance: canary error rate up to ``(1 + tolerance) ×`` stable's is
            accepted; beyond it is what we test for.
        error_max_pct: absolute limit on the canary's error ratio, percent, or None.
        latency: latency percentiles to judge.
        slo_availability_pct: availability objective, percent, or None for no SLO.
        slo_burn_rate_limit: error-budget burn rate that counts as a breach.
        early_pass_ratio: pass early once every comparison's confidence sequence lies
            below this ratio; None disables early pass.
        cs_level: each end of the confidence sequences holds with ``1 - cs_level``
            (0.025: 95% sequences).
        concentration: prior strength of the comparison mixtures.
        guard_concentration: prior strength of the one-sample mixtures.
        min_reference_tail: stable requests expected beyond a percentile in the
            history before the window, before ``L`` may be fixed from it.
    """

    alpha: float = 0.01
    step_duration_s: float = 600.0
    min_step_duration_s: float = 120.0
    min_requests: int = 200
    error_tolerance: float = 0.0
    error_max_pct: float | None = 5.0
    latency: tuple[LatencySettings, ...] = ()
    slo_availability_pct: float | None = None
    slo_burn_rate_limit: float = 14.4
    early_pass_ratio: float | None = 1.5
    cs_level: float = 0.025
    concentration: float = DEFAULT_CONCENTRATION
    guard_concentration: float = DEFAULT_GUARD_CONCENTRATION
    min_reference_tail: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        tolerances = [self.error_tolerance, *(lat.tolerance for lat in self.latency)]
        if self.early_pass_ratio is not None and self.early_pass_ratio <= 1 + max(tolerances):
            raise ValueError("early_pass_ratio must exceed 1 + every tolerance")

    def error_limit(self) -> tuple[float, str] | None:
        """The tighter of ``maxPct`` and the SLO burn limit, as (proportion, why)."""
        limits = []
        if self.error_max_pct is not None:
            limits.append((self.error_max_pct / 100.0, f"maxPct {self.error_max_pct:g}%"))
        if self.slo_availability_pct is not None:
            budget = 1.0 - self.slo_availability_pct / 100.0
            burn = self.slo_burn_rate_limit * budget
            limits.append(
                (
                    burn,
                    f"SLO burn limit {fmt_pct(burn)} ({self.slo_burn_rate_limit:g}× the "
                    f"{fmt_pct(budget)} error budget)",
                )
            )
        limits = [(bound, why) for bound, why in limits if 0.0 < bound < 1.0]
        return min(limits) if limits else None


@dataclass(frozen=True)
class CheckPlan:
    """A check as planned for a rollout: what it tests and its share of ``alpha``."""

    name: str
    kind: CheckKind
    alpha: float
    n_steps: int
    tolerance: float = 0.0
    bound: float = 0.0
    bound_text: str = ""
    latency: LatencySettings | None = None

    @property
    def threshold(self) -> float:
        """Roll back when the check's e-value reaches this (``1/alpha``)."""
        return 1.0 / self.alpha

    @functools.cached_property
    def log_threshold(self) -> float:
        return -math.log(self.alpha)


@functools.lru_cache(maxsize=1024)
def plan_checks(settings: Settings, steps: tuple[int, ...]) -> tuple[CheckPlan, ...]:
    """The checks of a rollout with these steps, each with its share of ``alpha``.

    Fixed by the settings and steps alone (never by data), as the validity of the
    α split requires; so it is computed once per (settings, steps), not per evaluation.
    """
    compare_steps = sum(1 for w in steps if w < 100)
    all_steps = len(steps)
    plans: list[CheckPlan] = []
    if compare_steps:
        plans.append(
            CheckPlan(ERRORS, CheckKind.COMPARE, 0.0, compare_steps, settings.error_tolerance)
        )
        plans += [
            CheckPlan(
                f"latency.{lat.label}",
                CheckKind.COMPARE,
                0.0,
                compare_steps,
                lat.tolerance,
                latency=lat,
            )
            for lat in settings.latency
        ]
    limit = settings.error_limit()
    if limit is not None:
        plans.append(
            CheckPlan(
                ERRORS_LIMIT, CheckKind.LIMIT, 0.0, all_steps, bound=limit[0], bound_text=limit[1]
            )
        )
    plans += [
        CheckPlan(
            f"latency.{lat.label}.max",
            CheckKind.LIMIT,
            0.0,
            all_steps,
            bound=1.0 - lat.percentile / 100.0,
            bound_text=f"{lat.label} ≤ {lat.max_ms:g} ms",
            latency=lat,
        )
        for lat in settings.latency
        if lat.max_ms is not None and edge_index_at_or_above(lat.max_ms) is not None
    ]
    weights = [ALPHA_WEIGHTS[_weight_class(plan)] for plan in plans]
    total = sum(weights) or 1.0
    return tuple(
        replace(plan, alpha=settings.alpha * w / total)
        for plan, w in zip(plans, weights, strict=True)
    )


#: Shares of ``alpha`` by kind of check.  The error comparison is the check most
#: regressions show in, and the one whose speed matters most: it gets the largest
#: share; latency comparisons next; the absolute limits are backstops (a canary far
#: over a limit produces overwhelming evidence at any threshold).  With the default
#: spec: errors 0.4·α, latency p99 and p50 0.2·α each, the two limits 0.1·α each.
ALPHA_WEIGHTS: Mapping[str, float] = {"errors": 4.0, "latency": 2.0, "limit": 1.0}


def _weight_class(plan: CheckPlan) -> str:
    if plan.kind is CheckKind.LIMIT:
        return "limit"
    return "latency" if plan.latency is not None else "errors"


@functools.cache
def edge_index_at_or_above(value_ms: float) -> int | None:
    """Index of the first histogram edge at or above ``value_ms`` (cached: a spec has
    a handful of limits, looked up for every canary in every round)."""
    for i, edge in enumerate(LATENCY_EDGES_MS):
        if edge >= value_ms:
            return i
    return None


def latency_edge_index(reference: ArmCounts, percentile: float) -> int | None:
    """Index of the bucket edge at or above ``reference``'s percentile, or None."""
    buckets = reference.latency_buckets
    if not buckets or buckets[-1] <= 0:
        return None
    rank = percentile / 100.0 * buckets[-1]
    for i, count in enumerate(buckets[: len(LATENCY_EDGES_MS)]):
        if count >= rank:
            return i
    return None


def _slower_than(arm: ArmCounts, index: int) -> int:
    return arm.requests - arm.latency_buckets[index]


@dataclass(frozen=True, slots=True)
class StepData:
    """Counts and context of the current step.

    Attributes:
        steps: canary weights of the whole rollout, percent (e.g. ``(10, 50, 100)``).
        step_index: index of the current step in ``steps``.
        elapsed_s: seconds since the step began.
        stable: stable's counts since the step began.
        canary: canary's counts since the step began.
        prior_log_e: per check, log e-values of the earlier steps it applied to.
        stable_reference: stable's latency history before the step began, from which
            each latency check fixes its threshold ``L``; None when unknown.
        window_carry_log_e: per check, log e-value of this step's earlier windows when
            the step's window was restarted (shared incident, counter reset): the step's
            factor is their product with the current window's, never a fresh start.
        error_blocks: both arms' error counts in blocks, (stable, canary), the open
            block included (:mod:`analysis.dispersion`): the error comparison is widened
            by the dispersion they show.  None treats requests as independent.
    """

    steps: tuple[int, ...]
    step_index: int
    elapsed_s: float
    stable: ArmCounts
    canary: ArmCounts
    prior_log_e: Mapping[str, Sequence[float]]
    stable_reference: ArmCounts | None = None
    window_carry_log_e: Mapping[str, float] = field(default_factory=dict)
    error_blocks: tuple[Moments, Moments] | None = None


@dataclass(frozen=True, slots=True)
class _Inputs:
    """One check's test inputs for one canary (or why it cannot be tested)."""

    x: int = 0  #: bad events on the canary side
    y: int = 0  #: bad events on the stable side (compare) or good canary events (limit)
    theta0: float = 0.5  #: rollback null bound
    theta_pass: float = 0.5  #: early-pass bound
    weight: float = 0.0  #: canary share of requests (compare)
    canary_n: int = 0
    stable_n: int = 0
    stable_x: int = 0  #: stable's bad events (limit: for shared incidents)
    edge_ms: float | None = None
    missing: str = ""  #: non-empty: the check is not applicable, and why
    scale: float = 1.0  #: overdispersion factor φ: the test counts x/φ and y/φ

    @property
    def x_eff(self) -> float:
        return self.x / self.scale if self.scale != 1.0 else self.x

    @property
    def y_eff(self) -> float:
        return self.y / self.scale if self.scale != 1.0 else self.y


def _inputs(plan: CheckPlan, settings: Settings, data: StepData) -> _Inputs:
    c, s = data.canary, data.stable
    edge: int | None = None
    if plan.latency is not None:
        if not c.latency_buckets:
            return _Inputs(missing="no latency histogram")
        if plan.kind is CheckKind.COMPARE:
            q = plan.latency.percentile
            ref = data.stable_reference
            need = settings.min_reference_tail / (1.0 - q / 100.0)
            if ref is None or ref.requests < need:
                have = ref.requests if ref is not None else 0
                return _Inputs(
                    missing=f"{have} stable requests of history, {need:.0f} needed to fix "
                    f"the {plan.latency.label} threshold"
                )
            edge = latency_edge_index(ref, q)
        else:
            assert plan.latency.max_ms is not None
            edge = edge_index_at_or_above(plan.latency.max_ms)
        if edge is None:
            return _Inputs(missing="percentile beyond the last histogram edge")
    edge_ms = LATENCY_EDGES_MS[edge] if edge is not None else None
    if plan.kind is CheckKind.COMPARE:
        if s.requests == 0:
            return _Inputs(missing="no stable traffic to compare with")
        if c.requests == 0:
            return _Inputs(missing="no canary traffic yet")
        if edge is not None and not s.latency_buckets:
            return _Inputs(missing="no stable latency histogram")
        x = _slower_than(c, edge) if edge is not None else c.errors
        y = _slower_than(s, edge) if edge is not None else s.errors
        w = c.requests / (c.requests + s.requests)
        ratio_pass = settings.early_pass_ratio or math.inf
        theta0 = theta0_for_ratio(w, 1.0 + plan.tolerance)
        scale = 1.0
        if edge is None and data.error_blocks is not None:
            scale = error_inflation(
                theta0, s.requests, c.requests, x + y, data.elapsed_s, *data.error_blocks
            )
        return _Inputs(
            x=x,
            y=y,
            theta0=theta0,
            theta_pass=theta0_for_ratio(w, ratio_pass) if math.isfinite(ratio_pass) else 0.5,
            weight=w,
            canary_n=c.requests,
            stable_n=s.requests,
            edge_ms=edge_ms,
            scale=scale,
        )
    if c.requests == 0:
        return _Inputs(missing="no canary traffic yet")
    x = _slower_than(c, edge) if edge is not None else c.errors
    stable_x = (_slower_than(s, edge) if s.latency_buckets else 0) if edge is not None else s.errors
    scale = 1.0
    if edge is None and data.error_blocks is not None:
        scale = canary_inflation(c.requests, x, data.elapsed_s, *data.error_blocks)
    return _Inputs(
        x=x,
        y=c.requests - x,
        theta0=plan.bound,
        theta_pass=plan.bound,
        canary_n=c.requests,
        stable_n=s.requests,
        stable_x=stable_x,
        edge_ms=edge_ms,
        scale=scale,
    )


#: Computes log e-values for lists of (x, y, θ): scalar or vectorised.
EvalFn = Callable[[Sequence[float], Sequence[float], Sequence[float], float], Sequence[float]]


def _scalar_upper(
    x: Sequence[float], y: Sequence[float], t: Sequence[float], k: float
) -> Sequence[float]:
    return [mixture_log_evalue(a, b, c, k) for a, b, c in zip(x, y, t, strict=True)]


def _scalar_lower(
    x: Sequence[float], y: Sequence[float], t: Sequence[float], k: float
) -> Sequence[float]:
    return [mixture_log_evalue(b, a, 1.0 - c, k) for a, b, c in zip(x, y, t, strict=True)]


def _array_upper(
    x: Sequence[float], y: Sequence[float], t: Sequence[float], k: float
) -> Sequence[float]:
    return [float(v) for v in log_evalue_upper(np.array(x), np.array(y), np.array(t), k)]


def _array_lower(
    x: Sequence[float], y: Sequence[float], t: Sequence[float], k: float
) -> Sequence[float]:
    return [float(v) for v in log_evalue_lower(np.array(x), np.array(y), np.array(t), k)]


@dataclass(slots=True)
class _Column:
    """One check across a batch of canaries: inputs, then e-values."""

    plan: CheckPlan
    inputs: list[_Inputs]
    log_e: list[float] = field(default_factory=list)
    log_pass: list[float] = field(default_factory=list)
    #: limit checks widened for overdispersion: the e-value of the raw counts, which
    #: decides whether stable's breach makes a shared incident
    log_raw: dict[int, float] = field(default_factory=dict)

    def row(self, i: int) -> tuple[_Inputs, float, float, float | None]:
        return self.inputs[i], self.log_e[i], self.log_pass[i], self.log_raw.get(i)


def _fill(column: _Column, settings: Settings, upper: EvalFn, lower: EvalFn) -> None:
    live = [i for i, inp in enumerate(column.inputs) if not inp.missing]
    k = (
        settings.concentration
        if column.plan.kind is CheckKind.COMPARE
        else settings.guard_concentration
    )
    column.log_e = [0.0] * len(column.inputs)
    column.log_pass = [0.0] * len(column.inputs)
    if not live:
        return
    xs = [column.inputs[i].x_eff for i in live]
    ys = [column.inputs[i].y_eff for i in live]
    for i, v in zip(live, upper(xs, ys, [column.inputs[i].theta0 for i in live], k), strict=True):
        column.log_e[i] = v
    widened = [i for i in live if column.inputs[i].scale != 1.0]
    if column.plan.kind is CheckKind.LIMIT and widened:
        raw = upper(
            [column.inputs[i].x for i in widened],
            [column.inputs[i].y for i in widened],
            [column.inputs[i].theta0 for i in widened],
            k,
        )
        column.log_raw = dict(zip(widened, raw, strict=True))
    if settings.early_pass_ratio is not None:
        pass_bounds = [column.inputs[i].theta_pass for i in live]
        for i, v in zip(live, lower(xs, ys, pass_bounds, k), strict=True):
            column.log_pass[i] = v


def _fmt_ratio(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _result(
    plan: CheckPlan,
    settings: Settings,
    data: StepData,
    inp: _Inputs,
    step_log_e: float,
    log_pass: float,
    log_raw: float | None = None,
) -> CheckResult:
    prior = data.prior_log_e.get(plan.name, ())
    carry = data.window_carry_log_e.get(plan.name, 0.0) if data.window_carry_log_e else 0.0
    threshold = plan.threshold
    if inp.missing:
        log_e = combine_steps((*prior, carry), plan.n_steps) if prior or carry else 0.0
        return CheckResult(
            plan.name,
            CheckStatus.NOT_APPLICABLE,
            carry,
            log_e,
            threshold,
            f"{plan.name}: {inp.missing}",
            pass_ok=True,
        )
    step_log_e += carry
    log_e = combine_steps((*prior, step_log_e), plan.n_steps)
    e_value = math.exp(min(log_e, 709.0))
    breach = log_e >= plan.log_threshold
    pass_ok = settings.early_pass_ratio is not None and log_pass >= -math.log(settings.cs_level)
    status = CheckStatus.BREACH if breach else CheckStatus.OK
    compare = "≥" if breach else "<"
    canary_rate = inp.x / inp.canary_n
    slower = f"slower than {inp.edge_ms:g} ms" if inp.edge_ms is not None else "errors"
    if plan.kind is CheckKind.COMPARE:
        stable_rate = inp.y / inp.stable_n
        ratio = canary_rate / stable_rate if inp.y else (math.inf if inp.x else math.nan)
        stats: dict[str, float] = {
            "canary_requests": inp.canary_n,
            "canary_bad": inp.x,
            "e_value": e_value,
            "threshold": threshold,
            "alpha": plan.alpha,
            "stable_requests": inp.stable_n,
            "stable_bad": inp.y,
            "ratio": ratio,
            "ratio_bound": 1.0 + plan.tolerance,
            "canary_share": inp.weight,
            "theta0": inp.theta0,
            "dispersion_factor": inp.scale,
        }
        what = "errors" if inp.edge_ms is None else f"{plan.name} ({slower})"
        reason = (
            f"{what}: canary {fmt_pct(canary_rate)} ({inp.x}/{inp.canary_n}) vs stable "
            f"{fmt_pct(stable_rate)} ({inp.y}/{inp.stable_n}), ratio {_fmt_ratio(ratio)}, "
            f"e-value {fmt_e(e_value)} {compare} {fmt_e(threshold)}"
        )
        if inp.scale >= 1.05:
            reason += f"; errors overdispersed: evidence counted at 1/{inp.scale:.2g}"
        return CheckResult(
            plan.name, status, step_log_e, log_e, threshold, reason, stats, pass_ok=pass_ok
        )
    what = "errors" if inp.edge_ms is None else f"requests {slower}"
    stats = {
        "canary_requests": inp.canary_n,
        "canary_bad": inp.x,
        "e_value": e_value,
        "threshold": threshold,
        "alpha": plan.alpha,
        "limit": plan.bound,
        "stable_requests": inp.stable_n,
        "dispersion_factor": inp.scale,
    }
    reason = (
        f"{plan.name}: canary {what} {fmt_pct(canary_rate)} ({inp.x}/{inp.canary_n}) vs "
        f"{plan.bound_text}"
        + (f" ({fmt_pct(plan.bound)} allowed)" if inp.edge_ms is not None else "")
        + f", e-value {fmt_e(e_value)} {compare} {fmt_e(threshold)}"
    )
    if inp.scale >= 1.05:
        reason += f"; errors overdispersed: evidence counted at 1/{inp.scale:.2g}"
    # A shared incident is judged on the raw counts: the widening for overdispersion
    # must not hide that both arms crossed the limit together.
    raw_breach = breach
    if log_raw is not None:
        raw_breach = combine_steps((*prior, log_raw + carry), plan.n_steps) >= plan.log_threshold
    if raw_breach and inp.stable_n:
        stable_rate = inp.stable_x / inp.stable_n
        stable_log_e = mixture_log_evalue(
            inp.stable_x, inp.stable_n - inp.stable_x, plan.bound, settings.guard_concentration
        )
        if stable_rate >= plan.bound or stable_log_e >= plan.log_threshold:
            status = CheckStatus.SHARED
            if not breach:
                reason += " (the raw counts cross it)"
            reason += f"; stable is at {fmt_pct(stable_rate)} too: shared incident, not the canary"
        stats["stable_rate"] = stable_rate
    return CheckResult(
        plan.name, status, step_log_e, log_e, threshold, reason, stats, pass_ok=pass_ok
    )


def _with_interval(
    result: CheckResult, inp: _Inputs, plan: CheckPlan, settings: Settings, lo: float, hi: float
) -> CheckResult:
    """The check with its 95% confidence sequence (bounds on θ) in the reason and stats."""
    pct = round(100 * (1 - 2 * settings.cs_level))
    if plan.kind is CheckKind.COMPARE:
        lo_v, hi_v = ratio_for_theta(inp.weight, lo), ratio_for_theta(inp.weight, hi)
        text = f"{pct}% CS {_fmt_ratio(lo_v)}–{_fmt_ratio(hi_v)}"
        reason = result.reason.replace(", e-value", f" ({text}), e-value", 1)
    else:
        lo_v, hi_v = lo, hi
        text = f"{pct}% CS {fmt_pct(lo)}–{fmt_pct(hi)}"
        reason = result.reason.replace(" vs ", f", {text}, vs ", 1)
    stats = dict(result.stats) | {"cs_low": lo_v, "cs_high": hi_v}
    return CheckResult(
        result.name,
        result.status,
        result.step_log_e,
        result.log_e,
        result.threshold,
        reason,
        stats,
        pass_ok=result.pass_ok,
    )


def _decide(
    settings: Settings, data: StepData, checks: list[CheckResult]
) -> tuple[Decision, list[str]]:
    breaches = [c for c in checks if c.status is CheckStatus.BREACH]
    shared = [c for c in checks if c.status is CheckStatus.SHARED]
    others = [c.reason for c in checks if c.status not in (CheckStatus.BREACH, CheckStatus.SHARED)]
    elapsed = format_duration(data.elapsed_s)
    if breaches:
        return Decision.ROLLBACK, [c.reason for c in breaches + shared] + others
    if shared:
        return Decision.HOLD, [c.reason for c in shared] + others
    need = settings.min_requests
    step_over = data.elapsed_s >= settings.step_duration_s
    if data.canary.requests < need:
        summary = f"{data.canary.requests} of {need} canary requests needed after {elapsed}"
        if step_over:
            head = f"insufficient data: {summary}; holding until enough traffic arrives"
            return Decision.HOLD, [head, *others]
        return Decision.CONTINUE, [f"collecting data: {summary}", *others]
    if step_over and data.elapsed_s >= settings.min_step_duration_s:
        return Decision.PASS, [f"step passed: {elapsed} with no evidence of regression", *others]
    applicable = [c for c in checks if c.status is not CheckStatus.NOT_APPLICABLE]
    ratio = settings.early_pass_ratio
    if (
        ratio is not None
        and data.elapsed_s >= settings.min_step_duration_s
        and applicable
        and all(c.pass_ok for c in applicable)
    ):
        head = (
            f"step passed early after {elapsed}: every check's 95% confidence sequence lies "
            f"below {ratio:g}× stable (or its limit)"
        )
        return Decision.PASS, [head, *others]
    waiting = [c.name for c in applicable if not c.pass_ok]
    passes_at = format_duration(settings.step_duration_s)
    head = f"no evidence of regression after {elapsed} (step passes at {passes_at}"
    if ratio is not None and waiting:
        verb = "is" if len(waiting) == 1 else "are"
        head += f", or early once {', '.join(waiting)} {verb} clearly within bounds"
    return Decision.CONTINUE, [head + ")", *others]


def evaluate_many(
    settings: Settings,
    batch: Sequence[StepData],
    *,
    intervals: bool | None = None,
    vectorised: bool = True,
) -> list[Verdict]:
    """Judge many canaries' steps at once (one vectorised e-value call per check).

    Args:
        settings: analysis settings shared by the batch.
        batch: each canary's step data.
        intervals: add 95% confidence sequences to the reasons: always (True), never
            (False), or only for rollback and pass verdicts (None: the decisions people
            read, at a fraction of the cost).
        vectorised: compute e-values with numpy arrays (fast for batches) or plain
            floats (fast for one canary).
    """
    upper, lower = (_array_upper, _array_lower) if vectorised else (_scalar_upper, _scalar_lower)
    per_canary_plans = [plan_checks(settings, tuple(data.steps)) for data in batch]
    columns: dict[str, _Column] = {}
    slots: list[list[tuple[str, int]]] = []
    for data, canary_plans in zip(batch, per_canary_plans, strict=True):
        mine = []
        for plan in canary_plans:
            column = columns.get(plan.name)
            if column is None:
                column = columns[plan.name] = _Column(plan, [])
            mine.append((plan.name, len(column.inputs)))
            column.inputs.append(_inputs(plan, settings, data))
        slots.append(mine)
    for column in columns.values():
        _fill(column, settings, upper, lower)
    judged = []
    for data, canary_plans, mine in zip(batch, per_canary_plans, slots, strict=True):
        checks = [
            _result(plan, settings, data, *columns[name].row(row))
            for plan, (name, row) in zip(canary_plans, mine, strict=True)
        ]
        decision, reasons = _decide(settings, data, checks)
        show = intervals if intervals is not None else decision in _DECISIONS
        judged.append((checks, decision, reasons, show))
    # confidence sequences, for the verdicts that show them: one call per check
    bounds: dict[tuple[str, int], tuple[float, float]] = {}
    for name, column in columns.items():
        rows = [
            row
            for (_, _, _, show), mine in zip(judged, slots, strict=True)
            if show
            for n, row in mine
            if n == name and not column.inputs[row].missing
        ]
        if rows:
            k = (
                settings.concentration
                if column.plan.kind is CheckKind.COMPARE
                else settings.guard_concentration
            )
            xs = [column.inputs[r].x_eff for r in rows]
            ys = [column.inputs[r].y_eff for r in rows]
            if vectorised:
                lo_a, hi_a = theta_bounds(np.array(xs), np.array(ys), settings.cs_level, k)
                pairs = list(zip(lo_a.tolist(), hi_a.tolist(), strict=True))
            else:
                pairs = [
                    theta_bounds_scalar(x, y, settings.cs_level, k)
                    for x, y in zip(xs, ys, strict=True)
                ]
            bounds |= {(name, r): p for r, p in zip(rows, pairs, strict=True)}
    verdicts = []
    for data, canary_plans, mine, (checks, first_decision, first_reasons, show) in zip(
        batch, per_canary_plans, slots, judged, strict=True
    ):
        decision, reasons = first_decision, first_reasons
        if show:
            for i, (plan, (name, row)) in enumerate(zip(canary_plans, mine, strict=True)):
                if (name, row) in bounds:
                    lo, hi = bounds[name, row]
                    checks[i] = _with_interval(
                        checks[i], columns[name].inputs[row], plan, settings, lo, hi
                    )
            decision, reasons = _decide(settings, data, checks)
        verdicts.append(Verdict(decision, tuple(reasons), tuple(checks)))
    return verdicts


_DECISIONS = (Decision.ROLLBACK, Decision.PASS)


def evaluate(settings: Settings, data: StepData, *, intervals: bool | None = None) -> Verdict:
    """Judge one canary's current step: see the module docstring for the rules."""
    return evaluate_many(settings, [data], intervals=intervals, vectorised=False)[0]
