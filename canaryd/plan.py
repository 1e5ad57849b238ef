"""``canaryd plan``: how a spec will behave on a service's traffic, in under a second.

For a traffic profile (total requests per second, stable's error rate and latency, how
bursty its errors are) and a spec, the plan answers the questions a person tuning a
Canary asks: how long a healthy rollout takes and why; for each step, how long and how
many requests until errors ×1.5/×2/×5 and p99 ×1.5/×2 are caught; how often a
regression the rollout misses on its typical path is caught all the same; and what to
change.

**Method.**  Each prediction is one rollout of the *real* state machine and analysis on
the expected-traffic path (:class:`~simulator.expected.ExpectedSimulation`: every
interval's expected counts, no randomness), so the plan follows the engine's exact
thresholds, α split, restart mixture, early pass, ``minRequests`` and dispersion
widening, and needs no formula of its own that could drift from them.  The median of a
first-passage time is close to the time the median path crosses the threshold (the
evidence grows steadily with counts); ``tests/test_plan.py`` checks the predictions
against Monte Carlo medians of the random simulator on the built-in scenarios (within
20%).  Where the median path misses a regression, the chance that a rollout catches it
anyway is a normal approximation of each check's evidence at its peak (see
:func:`catch_probability`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from scipy.special import log_ndtr

from analysis.counts import LATENCY_EDGES_MS
from analysis.engine import DEFAULT_CONCENTRATION, edge_index_at_or_above
from analysis.evalue import mixture_log_evalue
from analysis.verdict import format_duration as _fmt_s
from canaryd.simulate import Sample, StepOutcome, simulate_once
from canaryd.spec import CanarySpec
from canaryd.status import CanaryStatus
from simulator import Event, Latency, Noise, Scenario, Traffic, VersionSpec
from simulator.expected import ExpectedSimulation
from simulator.scenario import MAX_DURATION_S

#: The regressions every plan predicts: (label, kind, factor).
STANDARD_REGRESSIONS: tuple[tuple[str, str, float], ...] = (
    ("errors ×1.5", "errors", 1.5),
    ("errors ×2", "errors", 2.0),
    ("errors ×5", "errors", 5.0),
    ("p99 ×1.5", "p99", 1.5),
    ("p99 ×2", "p99", 2.0),
)
#: The longest step duration a recommendation proposes, seconds.
_MAX_RECOMMENDED_STEP_S = 4 * 3600.0


@dataclass(frozen=True, slots=True)
class TrafficProfile:
    """What the service's traffic looks like before a rollout.

    Attributes:
        rps: total requests per second (both arms together).
        error_rate: stable's share of 5xx answers, 0..1.
        p50_ms: stable's median latency, ms.
        p99_ms: stable's 99th-percentile latency, ms.
        error_cv: coefficient of variation of each arm's error rate from minute to
            minute (0: independent requests; 0.5: bursty).
        source: where these figures came from, for the report.
    """

    rps: float
    error_rate: float
    p50_ms: float
    p99_ms: float
    error_cv: float = 0.0
    source: str = "the command line"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rps) and self.rps > 0):
            raise ValueError(f"rps must be a number > 0, got {self.rps:g}")
        if not 0.0 <= self.error_rate < 1.0:
            raise ValueError(f"the error rate must lie in 0..100%, got {100 * self.error_rate:g}%")
        if not (0 < self.p50_ms <= self.p99_ms):
            raise ValueError(
                f"latency must satisfy 0 < p50 ≤ p99, got p50 {self.p50_ms:g} ms, "
                f"p99 {self.p99_ms:g} ms"
            )
        if not 0.0 <= self.error_cv <= 3.0:
            raise ValueError(f"error CV must lie in 0..3, got {self.error_cv:g}")

    def stable(self) -> VersionSpec:
        return VersionSpec(
            error_rate=self.error_rate, latency_ms=Latency(p50=self.p50_ms, p99=self.p99_ms)
        )

    def regressed(self, kind: str, factor: float) -> VersionSpec:
        """The canary of a regression: errors × factor, or the tail stretched so that
        p99 is × factor with p50 unchanged."""
        if kind == "errors":
            return VersionSpec(
                error_rate=min(1.0, self.error_rate * factor),
                latency_ms=Latency(p50=self.p50_ms, p99=self.p99_ms),
            )
        return VersionSpec(
            error_rate=self.error_rate,
            latency_ms=Latency(p50=self.p50_ms, p99=self.p99_ms * factor),
        )

    @classmethod
    def of_scenario(cls, scenario: Scenario) -> TrafficProfile:
        """The profile of a scenario's stable at its start."""
        stable = scenario.behaviour_at("stable", 0.0)
        cv = scenario.noise.error_cv if scenario.noise is not None else 0.0
        return cls(
            rps=scenario.rps_at(0.0),
            error_rate=stable.error_rate,
            p50_ms=stable.p50_ms,
            p99_ms=stable.p99_ms,
            error_cv=cv,
            source=f"scenario {scenario.name}",
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "rps": self.rps,
            "error_pct": 100.0 * self.error_rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "error_cv": self.error_cv,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True)
class Detection:
    """How a regression that starts at one step fares on the median path.

    Attributes:
        label: e.g. ``errors ×2``.
        start_step: index of the step the regression starts at.
        caught: rolled back on the median path.
        caught_step: index of the step it was caught in, or None.
        time_s: from the regression's start to the rollback, seconds (None: missed).
        requests: both arms' requests in that time.
        canary_requests: the canary's requests in that time.
        bad_requests: the canary's bad requests users got in that time (errors; for
            latency, requests slower than stable's p99); mirrored copies not counted.
        catch_probability: chance a rollout catches it (None where the median path
            does: above one half).
        checks: the checks that fired, or that came closest.
    """

    label: str
    start_step: int
    caught: bool
    caught_step: int | None
    time_s: float | None
    requests: int
    canary_requests: int
    bad_requests: int
    catch_probability: float | None
    checks: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "regression": self.label,
            "start_step": self.start_step,
            "caught": self.caught,
            "caught_step": self.caught_step,
            "time_s": self.time_s,
            "requests": self.requests,
            "canary_requests": self.canary_requests,
            "bad_requests": self.bad_requests,
            "catch_probability": self.catch_probability,
            "checks": list(self.checks),
        }


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step of the healthy rollout, and the regressions that start at it."""

    index: int
    weight: int
    canary_rps: float
    duration_s: float | None  #: None: never ends on the healthy path (holds)
    how: str  #: "early pass", "full step", "holds" or "promotion"
    min_requests_s: float | None  #: time to reach minRequests at this weight
    detections: tuple[Detection, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "weight": self.weight,
            "canary_rps": self.canary_rps,
            "healthy_duration_s": self.duration_s,
            "healthy_end": self.how,
            "min_requests_s": self.min_requests_s,
            "detections": [d.to_json() for d in self.detections],
        }


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything ``canaryd plan`` prints (``to_json`` is its JSON contract)."""

    profile: TrafficProfile
    steps: tuple[int, ...]
    interval_s: float
    step_duration_s: float
    min_requests: int
    alpha: float
    healthy_outcome: str
    healthy_time_s: float | None
    step_plans: tuple[StepPlan, ...]
    recommendations: tuple[str, ...]
    extra: tuple[Detection, ...] = ()  #: a scenario's own canary (``--scenario``)
    notes: tuple[str, ...] = field(default=())
    #: ``--scenario``: its name, and how and when its typical rollout ends
    scenario: tuple[str, str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile.to_json(),
            "spec": {
                "steps": list(self.steps),
                "interval_s": self.interval_s,
                "step_duration_s": self.step_duration_s,
                "min_requests": self.min_requests,
                "alpha": self.alpha,
            },
            "healthy": {
                "outcome": self.healthy_outcome,
                "time_s": self.healthy_time_s,
                "false_rollback_bound": self.alpha,
            },
            "steps": [s.to_json() for s in self.step_plans],
            "scenario": None
            if self.scenario is None
            else {
                "name": self.scenario[0],
                "outcome": self.scenario[1],
                "time_s": self.scenario[2],
                "detection": self.extra[0].to_json() if self.extra else None,
            },
            "recommendations": list(self.recommendations),
            "notes": list(self.notes),
        }


# -- the median path -----------------------------------------------------------------------


@dataclass(slots=True)
class _Path:
    """One expected-traffic rollout: outcome, samples and the status at each one."""

    outcome: str
    end_s: float
    steps: tuple[StepOutcome, ...]
    samples: list[Sample]
    statuses: list[CanaryStatus]


def _horizon_s(spec: CanarySpec) -> float:
    """A scenario long enough for the whole rollout, holds included."""
    analysis = spec.analysis
    return min(MAX_DURATION_S, len(spec.steps) * analysis.step_duration * 4 + 3600.0)


def _scenario(
    profile: TrafficProfile,
    spec: CanarySpec,
    canary: VersionSpec | None = None,
    at_s: float = 0.0,
) -> Scenario:
    stable = profile.stable()
    events: tuple[Event, ...] = ()
    start = stable
    if canary is not None and at_s <= 0.0:
        start = canary
    elif canary is not None:
        events = (
            Event(
                at_s=at_s,
                version="canary",
                error_rate=canary.error_rate,
                latency_ms={"p50": canary.latency_ms.p50, "p99": canary.latency_ms.p99},
            ),
        )
    noise = Noise(error_cv=profile.error_cv, period_s=60.0) if profile.error_cv > 0 else None
    return Scenario(
        name="plan",
        duration_s=_horizon_s(spec),
        traffic=Traffic(rps=profile.rps),
        stable=stable,
        canary=start,
        events=events,
        noise=noise,
    )


#: Where a rollout stood when a step began: the simulation then, and the status.
Fork = tuple[ExpectedSimulation, CanaryStatus]


def run_path(
    spec: CanarySpec,
    scenario: Scenario,
    start: Fork | None = None,
    forks: dict[int, Fork] | None = None,
) -> _Path:
    """The rollout of ``spec`` on ``scenario``'s expected traffic.

    Args:
        start: resume from this fork of another path (its simulation plays
            ``scenario`` from there on) instead of starting afresh.
        forks: filled with a fork at each step's first evaluation, by step index.
    """
    samples: list[Sample] = []
    statuses: list[CanaryStatus] = []
    if start is None:
        sim, status = ExpectedSimulation.warmed_up(scenario), None
    else:
        sim, status = start[0].fork(scenario), start[1]

    def keep(sample: Sample, now: CanaryStatus) -> None:
        samples.append(sample)
        statuses.append(now)
        if forks is not None and now.step_index not in forks and not now.phase.terminal:
            forks[now.step_index] = (sim.fork(sim.scenario), now)

    result = simulate_once(spec, scenario, 0, on_sample=keep, simulation=sim, status=status)
    return _Path(result.outcome, result.duration_s, result.steps, samples, statuses)


def _slow_edge(profile: TrafficProfile) -> int:
    """Index of the histogram edge at or above stable's true p99 (the last edge beyond)."""
    edge = edge_index_at_or_above(profile.p99_ms)
    return len(LATENCY_EDGES_MS) - 1 if edge is None else edge


def _split(stats: dict[str, float | None]) -> tuple[float, float, float, float] | None:
    """(x, y, θ0, φ) of a check's test from its recorded statistics, or None."""
    x = float(stats.get("canary_bad") or 0.0)
    if stats.get("limit") is not None:  # one-sample: bad vs good canary requests
        y = float(stats.get("canary_requests") or 0.0) - x
        theta0 = float(stats.get("limit") or 0.0)
    else:
        y = float(stats.get("stable_bad") or 0.0)
        theta0 = float(stats.get("theta0") or 0.0)
    phi = max(float(stats.get("dispersion_factor") or 1.0), 1.0)
    if x + y <= 0 or not 0.0 < theta0 < 1.0:
        return None
    return x, y, theta0, phi


def catch_probability(
    checks: Sequence[dict[str, float | None]], log_threshold: float, peak_log_e: float
) -> float:
    """Chance that one check's evidence ever reaches its threshold, given the median path.

    The check's log e-value where the median path peaks is taken as normal, with mean
    that peak ``m`` and the variance the counts give it, ``s²``: by the delta method,
    each step's ``(∂ log E/∂x)²·Var(x)``, ``x`` the canary's share of ``B`` bad events
    (counted at ``1/φ``), ``Var(x) = B·θ̂(1−θ̂)``.  The chance is ``Φ((m−c)/s)`` for the
    threshold ``c``.  Strictly a lower bound (a path may cross earlier and fall back),
    but looks at intervals and the mixture's own caution make it the closer one: on
    the random simulator it is within 10 points of the Monte Carlo rate, where the
    Brownian first-passage formula overstates it by up to 14 (``tests/test_plan.py``).

    Args:
        checks: one entry per step: the check's recorded statistics at the step's
            last evaluation (``canary_bad``, ``stable_bad`` and ``theta0`` for a
            comparison; ``canary_requests`` and ``limit`` for a limit;
            ``dispersion_factor``).
        log_threshold: log of the check's rollback threshold.
        peak_log_e: the highest log e-value the median path reached.
    """
    variance = 0.0
    for stats in checks:
        split = _split(stats)
        if split is None:
            continue
        x, y, theta0, phi = split
        xe, ye = x / phi, y / phi
        theta = xe / (xe + ye)
        slope = mixture_log_evalue(xe + 0.5, max(ye - 0.5, 0.0), theta0, DEFAULT_CONCENTRATION)
        slope -= mixture_log_evalue(max(xe - 0.5, 0.0), ye + 0.5, theta0, DEFAULT_CONCENTRATION)
        variance += slope * slope * (xe + ye) * theta * (1.0 - theta)
    m, c = peak_log_e, log_threshold
    if variance <= 0.0:
        return 1.0 if m >= c else 0.0
    s = math.sqrt(variance)
    return math.exp(float(log_ndtr((m - c) / s)))


def _served(share: float, mirror_pct: int) -> float:
    """The fraction of all requests the canary serves: its ``share`` of them, and the
    copies of ``mirror_pct`` % of the rest."""
    return share + (1.0 - share) * mirror_pct / 100.0


def _detection(
    label: str,
    start_step: int,
    start_s: float,
    path: _Path,
    profile: TrafficProfile,
    kind: str,
    spec: CanarySpec,
) -> Detection:
    after = [s for s in path.samples if s.t_s > start_s]
    requests = sum(s.stable.requests + s.canary.requests for s in after)
    canary_requests = sum(s.canary.requests for s in after)

    def seen(s: Sample) -> float:
        """The share of the canary's requests users got: all but mirrored copies."""
        weight = s.canary_weight_pct / 100.0
        served = _served(weight, spec.mirror_pct(s.step_index))
        return weight / served if served > 0 else 0.0

    if kind == "errors":
        bad_f = sum(s.canary.errors * seen(s) for s in after)
    else:
        edge = _slow_edge(profile)
        bad_f = sum((s.canary.requests - s.canary.latency_buckets[edge]) * seen(s) for s in after)
    bad = round(bad_f)
    caught = path.outcome == "rolled_back"
    step_index = len(path.steps) - 1 if caught else None
    fired: tuple[str, ...] = ()
    probability: float | None = None
    if caught and path.statuses:
        last = path.statuses[-1].last_verdict
        if last is not None:
            fired = tuple(c.name for c in last.checks if c.status == "breach")
    if not caught:
        probability, fired = _miss_probability(path, start_s)
    return Detection(
        label,
        start_step,
        caught,
        step_index,
        path.end_s - start_s if caught else None,
        requests,
        canary_requests,
        bad,
        probability,
        fired,
    )


def _miss_probability(path: _Path, start_s: float) -> tuple[float, tuple[str, ...]]:
    """Chance of a catch by any check over the regression's exposure, and the check
    that came closest."""
    per_check: dict[str, list[dict[str, float | None]]] = {}
    peaks: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    peak_step: dict[str, int] = {}
    last_of_step: dict[tuple[str, int], dict[str, float | None]] = {}
    for sample, status in zip(path.samples, path.statuses, strict=True):
        verdict = status.last_verdict
        if sample.t_s <= start_s or verdict is None or not sample.decision:
            continue
        for check in verdict.checks:
            if check.e_value is None or check.threshold is None or check.status == "not_applicable":
                continue
            log_e = math.log(max(check.e_value, 1e-300))
            if log_e > peaks.get(check.name, -math.inf):
                peaks[check.name] = log_e
                peak_step[check.name] = sample.step_index
            thresholds[check.name] = math.log(check.threshold)
            last_of_step[check.name, sample.step_index] = check.stats
    for (name, step), stats in last_of_step.items():
        if step <= peak_step[name]:  # the variance of the evidence where it peaked
            per_check.setdefault(name, []).append(stats)
    if not per_check:
        return 0.0, ()
    miss = 1.0
    closest, best = "", -math.inf
    for name, steps in per_check.items():
        p = catch_probability(steps, thresholds[name], peaks[name])
        miss *= 1.0 - p
        if peaks[name] - thresholds[name] > best:
            closest, best = name, peaks[name] - thresholds[name]
    return 1.0 - miss, (closest,)


def _healthy_steps(path: _Path) -> list[tuple[float | None, str]]:
    out: list[tuple[float | None, str]] = []
    for step in path.steps:
        if step.ended_s is None:
            out.append((None, "holds" if path.outcome == "held" else "promotion"))
            continue
        how = "early pass" if "passed early" in " ".join(step.reasons) else "full step"
        if step.weight >= 100:
            how = "promotion"
        out.append((step.ended_s - step.started_s, how))
    return out


def make_plan(
    spec: CanarySpec,
    profile: TrafficProfile,
    *,
    scenario: Scenario | None = None,
    regressions: Sequence[tuple[str, str, float]] = STANDARD_REGRESSIONS,
    recommend: bool = True,
) -> Plan:
    """The plan of ``spec`` on ``profile``'s traffic (see the module docstring).

    Args:
        spec: the Canary spec (steps and analysis matter).
        profile: the traffic.
        scenario: also predict this scenario's own canary from the rollout's start
            (``--scenario``).
        regressions: (label, kind, factor) to predict, kind ``errors`` or ``p99``.
        recommend: search longer steps for regressions the median path misses.
    """
    analysis = spec.analysis
    forks: dict[int, Fork] = {}
    healthy = run_path(spec, _scenario(profile, spec), forks=forks)
    starts = [step.started_s for step in healthy.steps]
    weights = list(spec.steps)
    healthy_steps = _healthy_steps(healthy)
    detections: dict[int, list[Detection]] = {i: [] for i in range(len(weights))}
    first_paths: dict[str, _Path] = {}
    for label, kind, factor in regressions:
        canary = profile.regressed(kind, factor)
        for i in range(len(weights)):
            if i and i not in forks:
                break  # the healthy rollout never reached step i
            at_s = starts[i] if i else 0.0
            scenario_i = _scenario(profile, spec, canary, at_s)
            path = run_path(spec, scenario_i, forks[i] if i else None)
            detections[i].append(_detection(label, i, at_s, path, profile, kind, spec))
            if i == 0:
                first_paths[label] = path
    extra: list[Detection] = []
    own: tuple[str, str, float] | None = None
    if scenario is not None:
        path = run_path(spec, scenario)
        own = (scenario.name, path.outcome, path.end_s)
        if _regresses(scenario):
            kind = "p99" if scenario.canary.latency_ms != scenario.stable.latency_ms else "errors"
            extra.append(_detection(f"scenario {scenario.name}", 0, 0.0, path, profile, kind, spec))
    step_plans = []
    cohort_pct = int(Traffic.model_fields["cohort_pct"].default)  # the simulated cohort
    for i, weight in enumerate(weights):
        share = spec.traffic_share_pct(weight, cohort_pct) / 100.0
        canary_rps = profile.rps * _served(share, spec.mirror_pct(i))
        duration, how = healthy_steps[i] if i < len(healthy_steps) else (None, "not reached")
        step_plans.append(
            StepPlan(
                i,
                weight,
                canary_rps,
                duration,
                how,
                analysis.min_requests / canary_rps if canary_rps > 0 else None,
                tuple(detections[i]),
            )
        )
    plan = Plan(
        profile=profile,
        steps=tuple(weights),
        interval_s=analysis.interval,
        step_duration_s=analysis.step_duration,
        min_requests=analysis.min_requests,
        alpha=analysis.alpha,
        healthy_outcome=healthy.outcome,
        healthy_time_s=healthy.end_s if healthy.outcome == "promoted" else None,
        step_plans=tuple(step_plans),
        recommendations=(),
        extra=tuple(extra),
        notes=_notes(profile, analysis.alpha),
        scenario=own,
    )
    advice = recommendations(spec, plan, first_paths, search=recommend)
    return replace(plan, recommendations=tuple(advice))


def _regresses(scenario: Scenario) -> bool:
    """Whether a scenario's canary differs from its stable (at the start or later)."""
    if scenario.canary != scenario.stable:
        return True
    return any(event.version == "canary" for event in scenario.events)


def _notes(profile: TrafficProfile, alpha: float) -> tuple[str, ...]:
    notes = [
        f"false rollbacks of a healthy canary: at most {100 * alpha:g}% (alpha) however often "
        "it looks, for independent requests"
    ]
    if profile.error_cv > 0:
        notes.append(
            f"errors vary from minute to minute (CV {profile.error_cv:g}): the error tests are "
            "widened by the dispersion they measure; the bound is then approximate"
        )
    return tuple(notes)


# -- recommendations -----------------------------------------------------------------------


def recommendations(
    spec: CanarySpec,
    plan: Plan,
    paths: dict[str, _Path] | None = None,
    *,
    search: bool = True,
) -> list[str]:
    """What to change, in sentences with their numbers."""
    analysis = spec.analysis
    paths = paths or {}
    out: list[str] = []
    for step in plan.step_plans:
        if step.weight >= 100 or step.min_requests_s is None:
            continue
        if step.min_requests_s > analysis.step_duration:
            out.append(
                f"minRequests {analysis.min_requests} takes {_fmt_s(step.min_requests_s)} at "
                f"{step.canary_rps:.3g} req/s on the {step.weight}% step, longer than "
                f"stepDuration {_fmt_s(analysis.step_duration)}: the step holds until then; "
                f"raise stepDuration to {_fmt_s(_round_up(step.min_requests_s))} or lower "
                "minRequests"
            )
    first = {d.label: d for d in plan.step_plans[0].detections} if plan.step_plans else {}
    missed = [d for d in first.values() if not d.caught]
    for detection in missed:
        line = (
            f"{detection.label} is not caught on the typical rollout "
            f"(caught in {fmt_chance(detection.catch_probability)} of rollouts)"
        )
        if search:
            found = _longer_step(spec, plan.profile, detection.label, paths.get(detection.label))
            if found is not None:
                step_s, time_s = found
                miss = 1.0 - (detection.catch_probability or 0.0)
                line += f"; stepDuration {_fmt_s(step_s)} catches it in {_fmt_s(time_s)}, or "
                line += (
                    "accept that it ships"
                    if miss >= 0.995
                    else f"accept a {fmt_chance(miss)} miss rate"
                )
            else:
                line += (
                    f"; no stepDuration up to {_fmt_s(_MAX_RECOMMENDED_STEP_S)} catches it at this "
                    "traffic: only more canary traffic (a larger first step) can"
                )
        out.append(line)
    early = [s for s in plan.step_plans if s.weight < 100 and s.how == "full step"]
    if early and analysis.early_pass_ratio is not None and not out:
        weights = ", ".join(f"{s.weight}%" for s in early)
        out.append(
            f"the {weights} step{'s' * (len(early) > 1)} cannot pass early at this traffic "
            f"(too few events to bound the canary below {analysis.early_pass_ratio:g}× stable "
            f"within {_fmt_s(analysis.step_duration)}): a healthy rollout takes "
            f"{_fmt_s(plan.healthy_time_s or 0.0)}"
        )
    if not out:
        out.append("no change needed: every listed regression is caught on the typical rollout")
    return out


def fmt_chance(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 0.005:
        return "<1%"
    if 0.995 < value < 1.0:
        return ">99%"
    return f"{100 * value:.0f}%"


def _round_up(seconds: float) -> float:
    """Up to a whole minute (or five, beyond an hour)."""
    unit = 300.0 if seconds > 3600 else 60.0
    return math.ceil(seconds / unit) * unit


def _longer_step(
    spec: CanarySpec, profile: TrafficProfile, label: str, path: _Path | None
) -> tuple[float, float] | None:
    """A step duration that catches ``label`` on the median path, and the time it then
    takes: (step duration, time to rollback), or None.

    The missed path's evidence gives a first guess (:func:`_extrapolate`), which one
    more rollout on the expected traffic confirms (or a second, half as long again):
    two rollouts at most, judged at least a minute apart, so the plan stays fast.
    """
    kinds = {lbl: (kind, factor) for lbl, kind, factor in STANDARD_REGRESSIONS}
    if label not in kinds or path is None:
        return None
    guess = _extrapolate(path)
    if guess is None:
        return None
    kind, factor = kinds[label]
    canary = profile.regressed(kind, factor)
    step_s = _round_up(spec.analysis.step_duration * guess * 1.1)
    for _ in range(2):
        if step_s > _MAX_RECOMMENDED_STEP_S:
            return None
        # judged at least a minute apart: the answer is a step duration, and a finer
        # interval only costs time (a 4 h step at 10 s is 1,440 evaluations a step)
        coarse = max(spec.analysis.interval, 60.0)
        longer = spec.model_copy(
            update={
                "analysis": spec.analysis.model_copy(
                    update={"step_duration": step_s, "interval": coarse}
                )
            }
        )
        tried = run_path(longer, _scenario(profile, longer, canary))
        if tried.outcome == "rolled_back":
            return step_s, tried.end_s
        step_s = _round_up(step_s * 1.5)
    return None


def _extrapolate(path: _Path) -> float | None:
    """How many times longer every step must be for the missed path's most promising
    check to reach its threshold: log e-values grow about in proportion to the counts,
    so the ratio of the threshold to the highest evidence reached (at least 1.2, and 4
    where the evidence never got going)."""
    best: float | None = None
    for status in path.statuses:
        verdict = status.last_verdict
        if verdict is None:
            continue
        for check in verdict.checks:
            if check.e_value is None or check.threshold is None or check.status != "ok":
                continue
            log_e, log_c = math.log(max(check.e_value, 1e-300)), math.log(check.threshold)
            factor = log_c / log_e if log_e > 0.25 * log_c else 4.0
            best = factor if best is None else min(best, factor)
    return None if best is None else max(best, 1.2)
