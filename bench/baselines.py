"""Baseline judges for the detection benchmark: for comparison only, not product features.

Every baseline runs the same rollout as canaryd's default spec (canary weights 10 → 50 →
100 %, a 1-minute evaluation interval, 10-minute steps, promotion after the 100 % step);
only the rule that judges each interval differs.  :func:`run_rollout` is that shared
loop: it warms the simulated stable up for 10 minutes, then each interval advances the
simulation, takes the interval's counts, asks the judge, and tallies what was served
until the decision.  The judges:

* :class:`FlaggerJudge` -- Flagger's metric checks: per 1-minute window, canary success
  rate >= 99 % and canary p99 <= 500 ms; each failing window (or one without canary
  requests, Flagger's "no values found") increments ``failedChecks``, never reset; roll
  back when it reaches the threshold.
* :class:`KayentaJudge` -- Kayenta-style canary judgement: per step, a one-sided
  Mann-Whitney U test of the canary's per-interval values against the stable's, with an
  effect-size gate, for error rate and p99; the fixed-horizon test is re-run every
  interval (repeated looks, as when a Kayenta analysis is scheduled every interval).
* :class:`OracleSprtJudge` -- Wald's SPRT told the true rates by the scenario: the lower
  bound on requests needed for the same error rates (design §5, "The limit we measure
  against").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from scenarios import BenchScenario
from scipy.stats import mannwhitneyu

from analysis.counts import ArmCounts
from analysis.histogram import histogram_quantile
from simulator import Simulation

#: Canary weights of the steps, percent (canaryd's default).
STEPS: tuple[int, ...] = (10, 50, 100)
#: Seconds between evaluations (canaryd's default ``interval``).
INTERVAL_S = 60.0
#: Seconds each step lasts when nothing rolls it back (canaryd's default ``stepDuration``).
STEP_S = 600.0

#: What a judge says about one interval.  ``marginal`` only matters at a step's end: the
#: step advances but the pass is counted as marginal (Kayenta's 75-95 score band).
Verdict = Literal["continue", "rollback", "marginal"]
#: How a rollout ended: as ``canaryd.simulate`` names outcomes.
Outcome = Literal["promoted", "rolled_back", "held", "waiting_approval", "failed"]


@dataclass(frozen=True, slots=True)
class Interval:
    """What happened in one evaluation interval ``[start_s, end_s)``.

    Attributes:
        start_s: when the interval began, seconds since the rollout started.
        end_s: when it ended (the evaluation time).
        step_index: the step it belongs to (index into ``STEPS``).
        weight_pct: the canary weight configured during the interval.
        intervals_in_step: how many intervals of this step have ended, this one included.
        stable: the stable arm's counts during the interval.
        canary: the canary arm's counts during the interval.
    """

    start_s: float
    end_s: float
    step_index: int
    weight_pct: int
    intervals_in_step: int
    stable: ArmCounts
    canary: ArmCounts


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One simulated rollout of one method, reduced to what the benchmark reports.

    Attributes:
        seed: the simulation seed.
        outcome: how it ended (``promoted``, ``rolled_back``, ``held``, ...).
        end_s: when it ended: the rollback or promotion decision, else the run's end.
        reached_100_s: when the canary weight was set to 100 %, or ``None``.
        requests: requests served to both arms from t = 0 until ``end_s``.
        canary_requests: the canary's share of ``requests``.
        bad_canary_requests: canary errors, plus (latency scenarios) slow canary requests.
        marginal_steps: steps passed with a marginal score (Kayenta only).
    """

    seed: int
    outcome: Outcome
    end_s: float
    reached_100_s: float | None
    requests: int
    canary_requests: int
    bad_canary_requests: int
    marginal_steps: int = 0


class Judge(Protocol):
    """Decides, interval by interval, whether to roll back."""

    def start_step(self, step_index: int, weight_pct: int) -> None:
        """A new step begins (the first at t = 0)."""

    def judge(self, interval: Interval, *, step_end: bool) -> Verdict:
        """The verdict on ``interval``; ``step_end`` when it completes the step's time."""


def run_rollout(
    bench: BenchScenario,
    judge: Judge,
    seed: int,
    *,
    steps: Sequence[int] = STEPS,
    interval_s: float = INTERVAL_S,
    step_s: float = STEP_S,
) -> RunRecord:
    """Roll a canary out under ``judge`` on ``bench``'s simulated traffic with ``seed``.

    The stable serves alone for ``WARMUP_S`` before t = 0 (``Simulation.warmed_up``, as
    canaryd's driver does);
    then each step lasts ``step_s`` unless the judge rolls back, and the last step's end
    promotes.  Requests are tallied from t = 0 until the decision.
    """
    scenario = bench.scenario
    sim = Simulation.warmed_up(scenario, seed)
    previous = sim.observe()
    step_index, step_started_s, intervals_in_step = 0, 0.0, 0
    sim.set_canary_weight(steps[0])
    judge.start_step(0, steps[0])
    reached_100_s = 0.0 if steps[0] == 100 else None
    requests = canary_requests = bad = marginal = 0
    outcome: Outcome = "held"
    while sim.now_s < scenario.duration_s:
        start_s = sim.now_s
        sim.advance(min(interval_s, scenario.duration_s - start_s))
        observation = sim.observe()
        assert observation.stable and observation.canary and previous.stable and previous.canary
        stable = observation.stable - previous.stable
        canary = observation.canary - previous.canary
        previous = observation
        requests += stable.requests + canary.requests
        canary_requests += canary.requests
        bad += bench.bad_requests(canary)
        intervals_in_step += 1
        now_s = sim.now_s
        step_end = now_s - step_started_s >= step_s - 1e-9
        interval = Interval(
            start_s, now_s, step_index, steps[step_index], intervals_in_step, stable, canary
        )
        verdict = judge.judge(interval, step_end=step_end)
        if verdict == "rollback":
            sim.set_canary_weight(0)
            outcome = "rolled_back"
            break
        if step_end:
            marginal += verdict == "marginal"
            if step_index == len(steps) - 1:
                outcome = "promoted"
                break
            step_index += 1
            step_started_s, intervals_in_step = now_s, 0
            sim.set_canary_weight(steps[step_index])
            judge.start_step(step_index, steps[step_index])
            if steps[step_index] == 100:
                reached_100_s = now_s
    return RunRecord(
        seed=seed,
        outcome=outcome,
        end_s=sim.now_s,
        reached_100_s=reached_100_s,
        requests=requests,
        canary_requests=canary_requests,
        bad_canary_requests=bad,
        marginal_steps=marginal,
    )


# --------------------------------------------------------------------------- Flagger


def flagger_check_passes(
    canary: ArmCounts, *, min_success_pct: float = 99.0, max_p99_ms: float = 500.0
) -> bool:
    """Flagger's two default checks on one window of canary counts.

    Success rate (non-5xx share) at least ``min_success_pct`` and the window's p99
    (``histogram_quantile`` over its buckets) at most ``max_p99_ms``.  A window without
    canary requests fails: Flagger reports "no values found" and counts a failed check.
    """
    if canary.requests <= 0:
        return False
    if (canary.requests - canary.errors) * 100 < min_success_pct * canary.requests:
        return False
    return not histogram_quantile(0.99, canary.latency_buckets) > max_p99_ms


class FlaggerJudge:
    """Flagger-style thresholds: roll back after ``threshold`` failed 1-minute checks.

    ``failed_checks`` is never reset by a passing check or a new step, as in Flagger.
    """

    def __init__(
        self, threshold: int, *, min_success_pct: float = 99.0, max_p99_ms: float = 500.0
    ) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")
        self.threshold = threshold
        self.min_success_pct = min_success_pct
        self.max_p99_ms = max_p99_ms
        self.failed_checks = 0

    def start_step(self, step_index: int, weight_pct: int) -> None:
        """Flagger keeps counting failed checks across steps."""

    def judge(self, interval: Interval, *, step_end: bool) -> Verdict:
        if not flagger_check_passes(
            interval.canary, min_success_pct=self.min_success_pct, max_p99_ms=self.max_p99_ms
        ):
            self.failed_checks += 1
        return "rollback" if self.failed_checks >= self.threshold else "continue"


# --------------------------------------------------------------------------- Kayenta


def kayenta_metric_fails(
    canary: Sequence[float],
    stable: Sequence[float],
    *,
    p_value: float = 0.02,
    min_ratio: float = 1.2,
    zero_stable_floor: float | None = None,
) -> bool | None:
    """Whether one metric fails Kayenta-style: significantly and materially higher.

    It fails when a one-sided Mann-Whitney U test (canary greater) gives a p-value below
    ``p_value`` *and* the effect is large enough: canary median / stable median at
    least ``min_ratio``, or, when the stable median is 0, canary median above
    ``zero_stable_floor`` (``None``: never).  Returns ``None`` when either arm has no
    values (no data: the metric is left out of the score).
    """
    if not canary or not stable:
        return None
    canary_median = statistics.median(canary)
    stable_median = statistics.median(stable)
    if stable_median > 0:
        material = canary_median / stable_median >= min_ratio
    else:
        material = zero_stable_floor is not None and canary_median > zero_stable_floor
    if not material:  # the cheap gate first; it also spares the test all-tied samples
        return False
    result = mannwhitneyu(canary, stable, alternative="greater")
    return bool(result.pvalue < p_value)


class KayentaJudge:
    """Kayenta-style judge: Mann-Whitney U on per-interval values, re-run every interval.

    Metrics: the interval error rate (a stable median of 0 fails only if the canary's
    median exceeds 0.5 percentage points) and the interval p99 latency.  From the
    ``min_intervals``-th interval of a step on, score = 100 × passing / metrics with
    data; below ``fail_below`` rolls back; at the step's end a score below ``pass_at``
    passes as marginal.  With no stable traffic (the 100 % step) no metric has data and
    the judge has no objection.
    """

    def __init__(
        self,
        *,
        p_value: float = 0.02,
        min_ratio: float = 1.2,
        zero_error_floor: float = 0.005,
        min_intervals: int = 3,
        fail_below: float = 75.0,
        pass_at: float = 95.0,
    ) -> None:
        self.p_value = p_value
        self.min_ratio = min_ratio
        self.zero_error_floor = zero_error_floor
        self.min_intervals = min_intervals
        self.fail_below = fail_below
        self.pass_at = pass_at
        self.last_score: float | None = None
        self._values: dict[str, tuple[list[float], list[float]]] = {}
        self.start_step(0, 0)

    def start_step(self, step_index: int, weight_pct: int) -> None:
        """Each step is judged on its own intervals only."""
        self._values = {"error_rate": ([], []), "p99_ms": ([], [])}
        self.last_score = None

    def add(self, interval: Interval) -> None:
        """Record the interval's per-arm error rate and p99 (arms without requests skip)."""
        for arm, index in ((interval.canary, 0), (interval.stable, 1)):
            if arm.requests > 0:
                self._values["error_rate"][index].append(arm.errors / arm.requests)
                p99 = histogram_quantile(0.99, arm.latency_buckets)
                if not math.isnan(p99):
                    self._values["p99_ms"][index].append(p99)

    def score(self) -> float | None:
        """100 × passing metrics / metrics with data, or ``None`` when none has data."""
        fails = [
            kayenta_metric_fails(
                canary,
                stable,
                p_value=self.p_value,
                min_ratio=self.min_ratio,
                zero_stable_floor=self.zero_error_floor if name == "error_rate" else None,
            )
            for name, (canary, stable) in self._values.items()
        ]
        judged = [fail for fail in fails if fail is not None]
        if not judged:
            return None
        return 100.0 * sum(not fail for fail in judged) / len(judged)

    def judge(self, interval: Interval, *, step_end: bool) -> Verdict:
        self.add(interval)
        if interval.intervals_in_step < self.min_intervals:
            return "continue"
        score = self.last_score = self.score()
        if score is None:
            return "continue"
        if score < self.fail_below:
            return "rollback"
        if step_end and score < self.pass_at:
            return "marginal"
        return "continue"


# --------------------------------------------------------------------------- oracle


def sprt_interval_llr(canary_bad: int, stable_bad: int, canary_share: float, ratio: float) -> float:
    """Log-likelihood ratio of H1 (rate ratio ``ratio``) to H0 (ratio 1) for one interval.

    Given the canary's share ``w`` of the interval's requests, each bad event is the
    canary's with probability ``θ = w·r / (w·r + 1 − w)``: ``θ0 = w`` under H0, ``θ1``
    with ``r = ratio`` under H1.  An interval with no stable or no canary traffic carries
    no information (0).
    """
    if not 0.0 < canary_share < 1.0:
        return 0.0
    theta0 = canary_share
    theta1 = canary_share * ratio / (canary_share * ratio + 1.0 - canary_share)
    return canary_bad * math.log(theta1 / theta0) + stable_bad * math.log(
        (1.0 - theta1) / (1.0 - theta0)
    )


class OracleSprtJudge:
    """Wald's SPRT on bad events, knowing the true canary/stable rate ratio.

    H1 is the scenario's true bad-event ratio in force during each interval; where that
    is not above 1 (healthy scenarios, shared incidents, the healthy start of a gradual
    degradation) H1 is ``healthy_ratio`` (2).  Each step runs its own SPRT: roll back
    when the log-likelihood ratio reaches ``log((1 − β)/α)``; accept H0 at
    ``log(β/(1 − α))`` and stop testing (the step then advances at its end).
    """

    def __init__(
        self,
        bench: BenchScenario,
        *,
        alpha: float = 0.01,
        beta: float = 0.05,
        healthy_ratio: float = 2.0,
    ) -> None:
        self.bench = bench
        self.healthy_ratio = healthy_ratio
        self.upper = math.log((1.0 - beta) / alpha)
        self.lower = math.log(beta / (1.0 - alpha))
        self.llr = 0.0
        self.accepted = False

    def start_step(self, step_index: int, weight_pct: int) -> None:
        """A fresh SPRT for every step."""
        self.llr = 0.0
        self.accepted = False

    def h1_ratio(self, t_s: float) -> float:
        """The alternative's rate ratio for an interval starting at ``t_s``."""
        ratio = self.bench.bad_ratio(t_s)
        return ratio if 1.0 < ratio < math.inf else self.healthy_ratio

    def judge(self, interval: Interval, *, step_end: bool) -> Verdict:
        if self.accepted:
            return "continue"
        total = interval.canary.requests + interval.stable.requests
        if total == 0:
            return "continue"
        self.llr += sprt_interval_llr(
            self.bench.bad_events(interval.canary),
            self.bench.bad_events(interval.stable),
            interval.canary.requests / total,
            self.h1_ratio(interval.start_s),
        )
        if self.llr >= self.upper:
            return "rollback"
        if self.llr <= self.lower:
            self.accepted = True
        return "continue"
