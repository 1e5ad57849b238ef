"""Judge one step of a rollout from the counts since the step began.

``evaluate`` runs every configured check and folds their results into one
:class:`~analysis.verdict.Verdict`:

1. any check in breach → **rollback**, naming the check and its numbers;
2. a breach that stable shows as well (a shared incident) → **hold**;
3. fewer than ``min_requests`` canary requests → **continue** while the step runs,
   **hold** once its duration is up;
4. ``step_duration_s`` elapsed with no breach → **pass**;
5. otherwise **continue**.

The false-rollback budget ``alpha`` is split evenly over the checks that can roll back,
so the whole rollout stays within ``alpha`` (design §5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from analysis.counts import ArmCounts
from analysis.evalue import combine_steps, mixture_log_evalue, theta0_for_ratio
from analysis.verdict import (
    CheckResult,
    CheckStatus,
    Decision,
    Verdict,
    fmt_duration,
    fmt_e,
    fmt_pct,
)

#: Prior strength of the canary-vs-stable mixture (a + b of the Beta prior).  Measured
#: at a 10% step, 100 rps, 0.5% stable errors (median requests to rollback, 200 runs):
#: κ=5: 2× 70k, 5× 6.0k, 10× 2.0k; κ=10: 66k, 6.0k, 2.0k; κ=20: 63k, 6.8k, 3.0k;
#: κ=50: -, 7.9k, 3.0k.  κ=10 is within 5% of the best at every ratio.
DEFAULT_CONCENTRATION: float = 10.0
#: Prior strength of one-sample guards (a proportion above a fixed bound).
DEFAULT_GUARD_CONCENTRATION: float = 20.0

ERRORS = "errors"
ERRORS_MAX = "errors.max"


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
        error_max_pct: absolute guard on the canary's error ratio, percent, or None.
        concentration: prior strength of the comparison mixture.
        guard_concentration: prior strength of the guard mixture.
    """

    alpha: float = 0.01
    step_duration_s: float = 600.0
    min_step_duration_s: float = 120.0
    min_requests: int = 200
    error_tolerance: float = 0.2
    error_max_pct: float | None = 5.0
    concentration: float = DEFAULT_CONCENTRATION
    guard_concentration: float = DEFAULT_GUARD_CONCENTRATION

    def rollback_checks(self, has_stable_steps: bool) -> tuple[str, ...]:
        """Names of the checks that may roll back, to split ``alpha`` over."""
        names = [ERRORS] if has_stable_steps else []
        if self.error_max_pct is not None:
            names.append(ERRORS_MAX)
        return tuple(names)


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
    """

    steps: tuple[int, ...]
    step_index: int
    elapsed_s: float
    stable: ArmCounts
    canary: ArmCounts
    prior_log_e: Mapping[str, Sequence[float]]


def _alpha_per_check(settings: Settings, steps: Sequence[int]) -> float:
    checks = settings.rollback_checks(any(w < 100 for w in steps))
    return settings.alpha / max(len(checks), 1)


def check_error_ratio(settings: Settings, data: StepData, alpha: float) -> CheckResult:
    """Canary vs stable error rate: is the canary's above ``(1 + tol) ×`` stable's?"""
    threshold = 1.0 / alpha
    n_steps = sum(1 for w in data.steps if w < 100)
    prior = list(data.prior_log_e.get(ERRORS, ()))
    c, s = data.canary, data.stable
    if c.requests == 0 or s.requests == 0:
        why = "no stable traffic to compare with" if s.requests == 0 else "no canary traffic yet"
        log_e = combine_steps(prior, n_steps) if prior else 0.0
        return CheckResult(
            ERRORS, CheckStatus.NOT_APPLICABLE, 0.0, log_e, threshold, f"errors: {why}"
        )
    weight = c.requests / (c.requests + s.requests)
    ratio_bound = 1.0 + settings.error_tolerance
    theta0 = theta0_for_ratio(weight, ratio_bound)
    step_log_e = mixture_log_evalue(c.errors, s.errors, theta0, settings.concentration)
    log_e = combine_steps([*prior, step_log_e], n_steps)
    e_value = math.exp(min(log_e, 709.0))
    ratio = c.error_ratio / s.error_ratio if s.errors else math.inf if c.errors else math.nan
    breach = log_e >= math.log(threshold)
    ratio_txt = "n/a" if math.isnan(ratio) else ("inf" if math.isinf(ratio) else f"{ratio:.2f}")
    reason = (
        f"errors: canary {fmt_pct(c.error_ratio)} ({c.errors}/{c.requests}) vs stable "
        f"{fmt_pct(s.error_ratio)} ({s.errors}/{s.requests}), ratio {ratio_txt}, "
        f"e-value {fmt_e(e_value)} {'≥' if breach else '<'} {fmt_e(threshold)}"
    )
    stats = {
        "canary_requests": float(c.requests),
        "canary_errors": float(c.errors),
        "stable_requests": float(s.requests),
        "stable_errors": float(s.errors),
        "ratio": ratio,
        "ratio_bound": ratio_bound,
        "canary_share": weight,
        "theta0": theta0,
        "e_value": e_value,
        "threshold": threshold,
    }
    status = CheckStatus.BREACH if breach else CheckStatus.OK
    return CheckResult(ERRORS, status, step_log_e, log_e, threshold, reason, stats)


def check_error_max(settings: Settings, data: StepData, alpha: float) -> CheckResult | None:
    """Absolute guard: is the canary's error ratio above ``maxPct``?

    Tested like the comparison (a one-sample mixture on canary requests), so one noisy
    window cannot trip it.  When stable's own error ratio is at or above the bound too,
    the breach is reported as a shared incident rather than blamed on the canary.
    """
    if settings.error_max_pct is None:
        return None
    threshold = 1.0 / alpha
    bound = settings.error_max_pct / 100.0
    prior = list(data.prior_log_e.get(ERRORS_MAX, ()))
    c, s = data.canary, data.stable
    if bound >= 1.0 or c.requests == 0:
        log_e = combine_steps(prior, len(data.steps)) if prior else 0.0
        return CheckResult(
            ERRORS_MAX,
            CheckStatus.NOT_APPLICABLE,
            0.0,
            log_e,
            threshold,
            "errors.max: no canary traffic yet",
        )
    step_log_e = mixture_log_evalue(
        c.errors, c.requests - c.errors, bound, settings.guard_concentration
    )
    log_e = combine_steps([*prior, step_log_e], len(data.steps))
    e_value = math.exp(min(log_e, 709.0))
    breach = log_e >= math.log(threshold)
    stable_log_e = (
        mixture_log_evalue(s.errors, s.requests - s.errors, bound, settings.guard_concentration)
        if s.requests
        else -math.inf
    )
    stable_bad = s.requests > 0 and (s.error_ratio >= bound or stable_log_e >= math.log(threshold))
    reason = (
        f"errors.max: canary {fmt_pct(c.error_ratio)} ({c.errors}/{c.requests}) vs limit "
        f"{settings.error_max_pct:g}%, e-value {fmt_e(e_value)} {'≥' if breach else '<'} "
        f"{fmt_e(threshold)}"
    )
    status = CheckStatus.BREACH if breach else CheckStatus.OK
    if breach and stable_bad:
        status = CheckStatus.SHARED
        reason += f"; stable is at {fmt_pct(s.error_ratio)} too: shared incident, not the canary"
    stats = {
        "canary_requests": float(c.requests),
        "canary_errors": float(c.errors),
        "limit_pct": settings.error_max_pct,
        "stable_error_ratio": s.error_ratio,
        "e_value": e_value,
        "threshold": threshold,
    }
    return CheckResult(ERRORS_MAX, status, step_log_e, log_e, threshold, reason, stats)


def evaluate(settings: Settings, data: StepData) -> Verdict:
    """Judge the current step: see the module docstring for the order of rules."""
    alpha = _alpha_per_check(settings, data.steps)
    checks = [check_error_ratio(settings, data, alpha)]
    guard = check_error_max(settings, data, alpha)
    if guard is not None:
        checks.append(guard)
    breaches = [c for c in checks if c.status is CheckStatus.BREACH]
    shared = [c for c in checks if c.status is CheckStatus.SHARED]
    others = [c.reason for c in checks if c.status not in (CheckStatus.BREACH, CheckStatus.SHARED)]
    elapsed = fmt_duration(data.elapsed_s)
    if breaches:
        reasons = [c.reason for c in breaches] + [c.reason for c in shared] + others
        return Verdict(Decision.ROLLBACK, tuple(reasons), tuple(checks))
    if shared:
        reasons = [c.reason for c in shared] + others
        return Verdict(Decision.HOLD, tuple(reasons), tuple(checks))
    need = settings.min_requests
    step_over = data.elapsed_s >= settings.step_duration_s
    if data.canary.requests < need:
        summary = f"{data.canary.requests} of {need} canary requests needed after {elapsed}"
        if step_over:
            reasons = [f"insufficient data: {summary}; holding until enough traffic arrives"]
            return Verdict(Decision.HOLD, (*reasons, *others), tuple(checks))
        return Verdict(Decision.CONTINUE, (f"collecting data: {summary}", *others), tuple(checks))
    if step_over and data.elapsed_s >= settings.min_step_duration_s:
        head = f"step passed: {elapsed} with no evidence of regression"
        return Verdict(Decision.PASS, (head, *others), tuple(checks))
    passes_at = fmt_duration(settings.step_duration_s)
    head = f"no evidence of regression after {elapsed} (step passes at {passes_at})"
    return Verdict(Decision.CONTINUE, (head, *others), tuple(checks))
