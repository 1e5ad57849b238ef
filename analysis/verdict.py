"""Verdict types: what analysis returns, with reasons a person can read."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Decision(StrEnum):
    """What analysis says about the current step."""

    ROLLBACK = "rollback"  #: evidence of harm: route all traffic back to stable
    PASS = "pass"  #: the step is done: move on
    HOLD = "hold"  #: cannot judge (too little data, shared incident): do not move
    CONTINUE = "continue"  #: nothing wrong so far, the step is still collecting evidence


class CheckStatus(StrEnum):
    """How one check stands."""

    OK = "ok"  #: no evidence against the canary
    BREACH = "breach"  #: evidence against the canary crossed the check's threshold
    SHARED = "shared"  #: a breach that stable shows too: a shared incident
    NOT_APPLICABLE = "n/a"  #: cannot be evaluated in this step (e.g. no stable arm at 100%)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's outcome.

    Attributes:
        name: the check, e.g. ``errors`` or ``errors.max``.
        status: see :class:`CheckStatus`.
        step_log_e: log e-value of this step alone (carried into later steps).
        log_e: log of the rollout-wide e-value (steps combined).
        threshold: rollback when ``exp(log_e) ≥ threshold`` (``1/α`` of this check).
        reason: one line a person can read, with the numbers.
        stats: the numbers behind the reason, for machines.
        pass_ok: the check allows an early pass (its confidence sequence lies below
            its pass bound); not-applicable checks never hold a pass back.
    """

    name: str
    status: CheckStatus
    step_log_e: float
    log_e: float
    threshold: float
    reason: str
    stats: Mapping[str, float] = field(default_factory=dict)
    pass_ok: bool = False

    @property
    def e_value(self) -> float:
        """The rollout-wide e-value (may be ``inf`` for overwhelming evidence)."""
        return math.exp(min(self.log_e, 709.0)) if self.log_e < 709.0 else math.inf


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for a step, the reasons for it, and every check behind it."""

    decision: Decision
    reasons: tuple[str, ...]
    checks: tuple[CheckResult, ...] = ()

    @property
    def shared_incident(self) -> bool:
        """True when a limit is breached by stable as well as by the canary."""
        return any(c.status is CheckStatus.SHARED for c in self.checks)

    def step_log_es(self) -> dict[str, float]:
        """Per check, this step's log e-value so far, to carry into the next step.

        A check not applicable now is left out unless an earlier window of the step
        gave it evidence, which must not be lost.
        """
        return {
            c.name: c.step_log_e
            for c in self.checks
            if c.status is not CheckStatus.NOT_APPLICABLE or c.step_log_e != 0.0
        }


def fmt_e(value: float) -> str:
    """An e-value for people: 3 significant digits, scientific when large."""
    if math.isinf(value):
        return "inf"
    if value >= 1e5 or (0 < value < 1e-3):
        return f"{value:.2e}"
    return f"{value:.3g}"


def fmt_pct(ratio: float) -> str:
    """A proportion as a percentage with sensible precision."""
    return f"{100 * ratio:.2f}%"


def format_duration(seconds: float) -> str:
    """Seconds as the shortest Go-style duration: ``600`` → ``10m``, ``3725`` →
    ``1h2m5s``, ``90.5`` → ``1m30.5s``, ``0`` → ``0s`` (to the millisecond).

    The one duration formatter: spec values (parsed back exactly by
    ``canaryd.spec.parse_duration``), messages and reports all use it.
    """
    total = round(seconds, 3)
    sign = "-" if total < 0 else ""
    total = abs(total)
    hours, rest = divmod(int(total), 3600)
    minutes = rest // 60
    secs = round(total - 3600 * hours - 60 * minutes, 3)
    out = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    if secs or not out:
        out += f"{secs:g}s"
    return sign + out
