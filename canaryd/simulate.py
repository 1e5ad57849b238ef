"""``canaryd simulate``: the real state machine and analysis, on simulated traffic.

A driver like the daemon, but on the simulator's virtual clock: each interval it
observes the simulator's counters, calls :func:`canaryd.rollout.reconcile`, carries
out its one-off actions (promote, notify), and lets the same
:class:`~canaryd.converger.Converger` the daemon uses make the simulated mesh and
canary replicas match the status, in the same order (pods, weights, scale-down).
A 30-minute rollout runs in milliseconds, so ``--runs N`` can measure a config's
false-rollback rate and its detection speed before it meets production.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from analysis.counts import ArmCounts, Observation
from analysis.histogram import histogram_quantile
from canaryd.converger import Converger
from canaryd.ports import CanaryRef
from canaryd.rollout import (
    Command,
    CommandKind,
    Notify,
    Observed,
    PromoteStable,
    reconcile,
)
from canaryd.spec import CanarySpec
from canaryd.status import CanaryStatus, Phase
from simulator import Scenario, Simulation

#: Virtual time zero: simulated timestamps are this plus the virtual seconds.
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
#: Outcome names of the JSON contract, and the exit codes of ``canaryd simulate``.
EXIT_CODES = {"promoted": 0, "rolled_back": 1, "held": 4, "waiting_approval": 4, "failed": 2}
#: Reconciles at one instant before the driver gives up (actions must settle).
_MAX_SETTLE = 10
_REF = CanaryRef("simulate", "canary")
T = TypeVar("T")


class _SimRoutes:
    """The ``TrafficRouter`` port on the simulated mesh (one route, never failing)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        #: the route's weight as written (under abTest, the cohort's route: the mesh
        #: then serves that share of the scenario's cohort)
        self.weight_pct = sim.mesh.canary_weight_pct

    async def check(self, ref: CanaryRef, spec: CanarySpec) -> None:
        return None

    async def route_weights(self, ref: CanaryRef, spec: CanarySpec) -> tuple[int, ...]:
        return (self.weight_pct,)

    async def set_weights(
        self, ref: CanaryRef, spec: CanarySpec, canary_pct: int, mirror_pct: int = 0
    ) -> tuple[int, ...]:
        cohort_pct = self.sim.scenario.traffic.cohort_pct
        self.sim.set_canary_weight(spec.traffic_share_pct(canary_pct, cohort_pct))
        self.sim.set_mirror(mirror_pct)
        self.weight_pct = canary_pct
        return (self.weight_pct,)


class _SimWorkloads:
    """The ``Workloads`` port on the simulation: a canary whose pods are ready at once,
    and a stable that rolls a promoted template out instantly."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.replicas = 1
        self.promoted: str | None = None

    async def check(self, ref: CanaryRef, spec: CanarySpec) -> None:
        return None

    async def promote_stable(
        self, ref: CanaryRef, spec: CanarySpec, revision: str, template_hash: str | None = None
    ) -> None:
        self.sim.promote_stable()
        self.promoted = revision

    async def stable_revision(self, ref: CanaryRef, spec: CanarySpec) -> str | None:
        return self.promoted

    async def template_hash(self, ref: CanaryRef, spec: CanarySpec) -> str:
        return "simulated"

    async def scale_canary(self, ref: CanaryRef, spec: CanarySpec, replicas: int) -> None:
        self.replicas = replicas

    async def canary_replicas(self, ref: CanaryRef, spec: CanarySpec) -> int:
        return self.replicas

    async def ensure_canary_ready(self, ref: CanaryRef, spec: CanarySpec) -> str | None:
        self.replicas = max(self.replicas, 1)
        return None

    async def canary_revision(self, ref: CanaryRef, spec: CanarySpec) -> str | None:
        return None


def _now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits (the simulated ports answer at once) to its
    end, without an event loop: thousands of runs stay fast."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("a simulated port waited; it must answer at once")


@dataclass(frozen=True, slots=True)
class Sample:
    """One evaluation: what the canary and stable did in the interval before it.

    Attributes:
        t_s: virtual seconds since the start.
        phase: the rollout phase after this evaluation.
        step_index: current step.
        canary_weight_pct: canary traffic share after this evaluation, percent.
        decision: the verdict of this evaluation (``continue``, ``pass``, ...), or "".
        reasons: the verdict's reasons.
        stable: stable's counts during the interval.
        canary: canary's counts during the interval.
    """

    t_s: float
    phase: str
    step_index: int
    canary_weight_pct: int
    decision: str
    reasons: tuple[str, ...]
    stable: ArmCounts
    canary: ArmCounts

    def latency_ms(self, arm: str, q: float) -> float:
        """The ``q``-quantile latency of ``arm`` ("stable"/"canary") in the interval."""
        counts = self.stable if arm == "stable" else self.canary
        return histogram_quantile(q, counts.latency_buckets)


@dataclass(frozen=True, slots=True)
class Event:
    """A notification the state machine emitted, stamped with virtual time."""

    t_s: float
    reason: str
    message: str
    warning: bool


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """One step of a simulated rollout."""

    weight: int
    started_s: float
    ended_s: float | None
    verdict: str
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RunResult:
    """A simulated rollout, start to end (``to_json`` is the CLI's JSON contract)."""

    scenario: str
    seed: int
    outcome: str
    duration_s: float
    canary_requests: int
    canary_errors: int
    steps: tuple[StepOutcome, ...]
    reasons: tuple[str, ...]
    samples: tuple[Sample, ...] = field(repr=False, default=())
    events: tuple[Event, ...] = field(repr=False, default=())

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]

    def to_json(self, *, steps: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scenario": self.scenario,
            "seed": self.seed,
            "outcome": self.outcome,
            "duration_s": self.duration_s,
            "canary_requests": self.canary_requests,
            "canary_errors": self.canary_errors,
        }
        if steps:
            out["steps"] = [
                {
                    "weight": s.weight,
                    "started_s": s.started_s,
                    "ended_s": s.ended_s,
                    "verdict": s.verdict,
                    "reasons": list(s.reasons),
                }
                for s in self.steps
            ]
        out["reasons"] = list(self.reasons)
        return out


def _seconds(at: datetime | None) -> float | None:
    return None if at is None else (at - EPOCH).total_seconds()


def _outcome(phase: Phase) -> str:
    return {
        Phase.SUCCEEDED: "promoted",
        Phase.ROLLED_BACK: "rolled_back",
        Phase.WAITING_APPROVAL: "waiting_approval",
        Phase.FAILED: "failed",
    }.get(phase, "held")


def simulate_once(
    spec: CanarySpec,
    scenario: Scenario,
    seed: int,
    on_sample: Callable[[Sample, CanaryStatus], None] | None = None,
    on_event: Callable[[Event], None] | None = None,
    simulation: Simulation | None = None,
    status: CanaryStatus | None = None,
) -> RunResult:
    """Run one rollout of ``spec`` against ``scenario`` with ``seed``, in virtual time.

    The stable serves alone for ``simulator.WARMUP_S`` first (``Simulation.warmed_up``);
    the rollout starts at t=0 with a
    ``promote`` command and is evaluated every
    ``spec.analysis.interval`` until it ends or the scenario's duration is over.
    Promotion to stable completes at once (the simulated stable rolls out instantly).
    ``simulation``, when given, is played instead of a fresh warmed-up one (``canaryd
    plan`` passes an :class:`~simulator.expected.ExpectedSimulation`); with ``status``
    too, the rollout resumes from that status at the simulation's time, as a restarted
    daemon would (``canaryd plan`` forks one healthy rollout at each step's start).
    """
    sim = simulation if simulation is not None else Simulation.warmed_up(scenario, seed)
    commands = []
    if status is None:
        status = CanaryStatus()
        commands.append(
            Command(
                id="simulate-promote", kind=CommandKind.PROMOTE, revision="canary", by="simulate"
            )
        )
    workloads = _SimWorkloads(sim)
    converger = Converger(_SimRoutes(sim), workloads)
    samples: list[Sample] = []
    events: list[Event] = []
    previous = sim.observe()
    interval_s = spec.analysis.interval
    while True:
        now_s = sim.now_s
        observation = sim.observe()
        for _ in range(_MAX_SETTLE):
            observed = Observed(
                metrics=observation,
                stable_revision=workloads.promoted if status.phase is Phase.PROMOTING else None,
            )
            result = reconcile(spec, status, observed, commands, EPOCH + timedelta(seconds=now_s))
            status = result.status
            for action in result.actions:
                if isinstance(action, PromoteStable):
                    _now(workloads.promote_stable(_REF, spec, action.revision))
                elif isinstance(action, Notify):
                    event = Event(now_s, action.reason, action.message, action.warning)
                    events.append(event)
                    if on_event is not None:
                        on_event(event)
            converged = _now(converger.converge(_REF, spec, status))
            if converged.ok:  # as the daemon records it
                status = status.model_copy(
                    update={"traffic_verified": True, "verified_canary_pct": status.canary_weight}
                )
            if not any(isinstance(a, PromoteStable) for a in result.actions):
                break
        sample = _sample(now_s, status, observation, previous)
        samples.append(sample)
        if on_sample is not None:
            on_sample(sample, status)
        previous = observation
        if status.phase.terminal or now_s >= scenario.duration_s:
            break
        sim.advance(min(interval_s, scenario.duration_s - now_s))
    return _result(
        scenario=scenario,
        seed=seed,
        status=status,
        final=sim.observe(),
        samples=samples,
        events=events,
        end_s=sim.now_s,
    )


def _sample(
    now_s: float, status: CanaryStatus, observation: Observation, previous: Observation
) -> Sample:
    verdict = status.last_verdict
    fresh = verdict is not None and _seconds(verdict.at) == now_s
    assert observation.stable and observation.canary and previous.stable and previous.canary
    return Sample(
        t_s=now_s,
        phase=str(status.phase),
        step_index=status.step_index,
        canary_weight_pct=status.canary_weight,
        decision=verdict.decision if fresh and verdict else "",
        reasons=tuple(verdict.reasons) if fresh and verdict else (),
        stable=observation.stable - previous.stable,
        canary=observation.canary - previous.canary,
    )


def _result(
    *,
    scenario: Scenario,
    seed: int,
    status: CanaryStatus,
    final: Observation,
    samples: Sequence[Sample],
    events: Sequence[Event],
    end_s: float,
) -> RunResult:
    last = status.last_verdict
    steps = []
    for record in status.history:
        open_step = record.ended_at is None
        verdict = record.verdict or (last.decision if last and open_step else "")
        reasons = record.reasons or (last.reasons if last and open_step else [])
        steps.append(
            StepOutcome(
                weight=record.weight,
                started_s=_seconds(record.started_at) or 0.0,
                ended_s=_seconds(record.ended_at),
                verdict=verdict,
                reasons=tuple(reasons),
            )
        )
    reasons = [status.message] if status.message else []
    if last is not None:
        reasons += [r for r in last.reasons if r not in status.message]
    canary = final.canary or ArmCounts()
    return RunResult(
        scenario=scenario.name,
        seed=seed,
        outcome=_outcome(status.phase),
        duration_s=end_s,
        canary_requests=canary.requests,
        canary_errors=canary.errors,
        steps=tuple(steps),
        reasons=tuple(reasons),
        samples=tuple(samples),
        events=tuple(events),
    )


@dataclass(frozen=True, slots=True)
class MonteCarlo:
    """``--runs N``: outcomes of N rollouts with seeds ``seed, seed+1, ...``."""

    scenario: str
    runs: tuple[RunResult, ...]

    @property
    def outcomes(self) -> dict[str, int]:
        counts = Counter(r.outcome for r in self.runs)
        return {k: counts[k] for k in ("promoted", "rolled_back", "held", "waiting_approval")} | {
            k: v for k, v in counts.items() if k == "failed"
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "runs": len(self.runs),
            "outcomes": self.outcomes,
            "median_duration_s": statistics.median(r.duration_s for r in self.runs),
            "median_canary_errors": statistics.median(r.canary_errors for r in self.runs),
            "results": [r.to_json(steps=False) for r in self.runs],
        }


def simulate_many(
    spec: CanarySpec,
    scenario: Scenario,
    seed: int,
    runs: int,
    progress: Callable[[int, RunResult], None] | None = None,
) -> MonteCarlo:
    """Run ``runs`` rollouts with seeds ``seed … seed+runs-1`` (run i is ``--seed seed+i``)."""
    results = []
    for i in range(runs):
        result = simulate_once(spec, scenario, seed + i)
        results.append(result)
        if progress is not None:
            progress(i + 1, result)
    return MonteCarlo(scenario.name, tuple(results))
