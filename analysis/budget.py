"""Error budgets: SLO figures from good and total events, and the release policy tier.

Pure arithmetic (design §5–6), no I/O: the daemon reads good and total events per
window from the metrics source and asks here what they mean.

* **Availability** over the compliance window: good / total events.
* **Error budget remaining**, a fraction of the budget: ``1 − (1 − A) / (1 − T)`` for
  availability ``A`` and target ``T``.  1 with no bad events, 0 when exactly spent,
  negative when overspent.
* **Burn rate** over a window: its bad-event ratio over the budget's, ``(1 − A_w) /
  (1 − T)``; 1 spends the budget exactly over the compliance window.
* **Multi-window pairs** (the SRE workbook's): 1 h & 5 m at 14.4×, 6 h & 30 m at 6×,
  24 h & 2 h at 3×.  A pair fires when *both* its windows burn faster than its factor:
  the long window says the burn is real, the short one that it is still going on.
* **Policy tier** from those figures (``PolicyTiers``): normal; every step after the
  first needs approval; a new rollout needs an override; frozen (only fixes start,
  running rollouts hold).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

#: The standard multi-window pairs: (long window s, short window s, burn-rate factor).
BURN_PAIRS: tuple[tuple[float, float, float], ...] = (
    (3600.0, 300.0, 14.4),
    (21600.0, 1800.0, 6.0),
    (86400.0, 7200.0, 3.0),
)
#: Every window the pairs read, seconds.
BURN_WINDOWS_S: tuple[float, ...] = tuple(sorted({w for pair in BURN_PAIRS for w in pair[:2]}))
#: The default compliance window: 30 days.
DEFAULT_WINDOW_S: float = 30 * 86400.0


class Tier(StrEnum):
    """What the error-budget policy allows, from most to least."""

    NORMAL = "normal"  #: rollouts as the spec says
    APPROVAL = "approval"  #: every step after the first needs an approval
    OVERRIDE = "override"  #: a new rollout needs an explicit override command
    FROZEN = "frozen"  #: only fixes start; running rollouts hold at their step


_ORDER = {tier: i for i, tier in enumerate(Tier)}


def stricter(a: Tier, b: Tier) -> Tier:
    """The stricter of two tiers."""
    return a if _ORDER[a] >= _ORDER[b] else b


@dataclass(frozen=True, slots=True)
class Events:
    """Good and total events over a window."""

    good: float
    total: float

    @property
    def bad_ratio(self) -> float | None:
        """Bad / total, or None with no events."""
        if self.total <= 0 or not math.isfinite(self.total) or not math.isfinite(self.good):
            return None
        return min(max(1.0 - self.good / self.total, 0.0), 1.0)


def window_label(seconds: float) -> str:
    """``300`` → ``5m``, ``3600`` → ``1h``, ``86400`` → ``1d`` (metric labels)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class BurnPair:
    """One multi-window pair and whether it fires."""

    long_s: float
    short_s: float
    factor: float
    long_rate: float | None
    short_rate: float | None

    @property
    def firing(self) -> bool:
        return (
            self.long_rate is not None
            and self.short_rate is not None
            and self.long_rate > self.factor
            and self.short_rate > self.factor
        )

    @property
    def label(self) -> str:
        return f"{window_label(self.long_s)}&{window_label(self.short_s)}"


@dataclass(frozen=True, slots=True)
class SloFigures:
    """One objective's figures.

    Attributes:
        objective: the target, as a fraction (0.999).
        window_s: the compliance window.
        availability: good / total over it, or None without events.
        budget_remaining: fraction of the error budget left (may be negative), or None.
        burn_rates: by window (seconds), or None for a window without events.
        pairs: the multi-window pairs.
    """

    objective: float
    window_s: float
    availability: float | None
    budget_remaining: float | None
    burn_rates: Mapping[float, float | None] = field(default_factory=dict)
    pairs: tuple[BurnPair, ...] = ()

    @property
    def firing(self) -> tuple[BurnPair, ...]:
        return tuple(p for p in self.pairs if p.firing)


def figures(
    objective: float,
    compliance: Events,
    windows: Mapping[float, Events],
    window_s: float = DEFAULT_WINDOW_S,
) -> SloFigures:
    """The figures of an objective (0 < ``objective`` < 1) from its events.

    Args:
        objective: target fraction of good events, e.g. 0.999.
        compliance: events over the compliance window.
        windows: events over each burn-rate window, by its length in seconds.
        window_s: the compliance window's length (reported).
    """
    if not 0.0 < objective < 1.0:
        raise ValueError(f"an objective lies strictly between 0 and 1, got {objective!r}")
    budget = 1.0 - objective
    bad = compliance.bad_ratio
    availability = None if bad is None else 1.0 - bad
    remaining = None if bad is None else 1.0 - bad / budget
    rates: dict[float, float | None] = {}
    for w in BURN_WINDOWS_S:
        ratio = windows[w].bad_ratio if w in windows else None
        rates[w] = None if ratio is None else ratio / budget
    pairs = tuple(
        BurnPair(long_s, short_s, factor, rates.get(long_s), rates.get(short_s))
        for long_s, short_s, factor in BURN_PAIRS
    )
    return SloFigures(objective, window_s, availability, remaining, rates, pairs)


@dataclass(frozen=True, slots=True)
class PolicyTiers:
    """The error-budget policy (defaults: Google's SRE practice).

    Attributes:
        approval_below: budget remaining below this: steps after the first need approval.
        override_below: below this: a new rollout needs an override.
        fast_burn_factor: a firing pair with at least this factor freezes releases.
    """

    approval_below: float = 0.5
    override_below: float = 0.2
    fast_burn_factor: float = 6.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.override_below <= self.approval_below <= 1.0:
            raise ValueError(
                "policy tiers need 0 ≤ overrideBelow ≤ approvalBelow ≤ 1, got "
                f"{self.override_below:g} and {self.approval_below:g}"
            )


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The tier an objective's figures put releases in, and why (with the numbers)."""

    tier: Tier
    reason: str


def _pct(value: float) -> str:
    return f"{100 * value:.3g}%"


def decide(name: str, slo: SloFigures, tiers: PolicyTiers = PolicyTiers()) -> PolicyDecision:
    """The policy tier of one objective (``name``, e.g. ``availability``)."""
    fast = [p for p in slo.firing if p.factor >= tiers.fast_burn_factor]
    remaining = slo.budget_remaining
    if remaining is None:
        return PolicyDecision(
            Tier.NORMAL, f"{name} SLO: no events in the window; the budget is unknown"
        )
    text = (
        f"{name} SLO {_pct(slo.objective)}: {_pct(slo.availability or 0.0)} over "
        f"{window_label(slo.window_s)}, error budget {_pct(remaining)} remaining"
    )
    if fast:
        burning = ", ".join(
            f"{p.label} at {p.long_rate:.3g}×/{p.short_rate:.3g}× (> {p.factor:g}×)" for p in fast
        )
        return PolicyDecision(
            Tier.FROZEN, f"{text}; fast burn {burning}: only fixes may start, rollouts hold"
        )
    if remaining <= 0.0:
        return PolicyDecision(
            Tier.FROZEN, f"{text}: budget exhausted, only fixes may start, rollouts hold"
        )
    if remaining < tiers.override_below:
        return PolicyDecision(
            Tier.OVERRIDE,
            f"{text} (< {_pct(tiers.override_below)}): a new rollout needs an override",
        )
    if remaining < tiers.approval_below:
        return PolicyDecision(
            Tier.APPROVAL,
            f"{text} (< {_pct(tiers.approval_below)}): every step after the first needs approval",
        )
    return PolicyDecision(Tier.NORMAL, f"{text}: normal releases")


def decide_all(
    objectives: Mapping[str, SloFigures], tiers: PolicyTiers = PolicyTiers()
) -> PolicyDecision:
    """The strictest tier over a service's objectives, with every objective's reason."""
    decisions = [decide(name, slo, tiers) for name, slo in objectives.items()]
    if not decisions:
        return PolicyDecision(Tier.NORMAL, "no SLO")
    tier = Tier.NORMAL
    for d in decisions:
        tier = stricter(tier, d.tier)
    return PolicyDecision(tier, "; ".join(d.reason for d in decisions))
