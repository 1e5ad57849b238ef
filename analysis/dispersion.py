"""Extra-binomial variance of error counts, and the widening it calls for (design §5).

The count tests of :mod:`analysis.engine` assume independent requests: given the bad
events of both arms, each is the canary's with a fixed probability.  Real errors are
not independent: an arm's error rate drifts from minute to minute (a sick pod, a
retry storm, one client's burst), and the totals then vary more than a binomial
allows, which makes any count test over-confident.

We measure that drift from the data and widen the test by it, in three pure steps:

1. **Blocks.** The rollout cuts each arm's counters into blocks of at least
   ``BLOCK_S`` seconds (``Blocks.advance``) and keeps running sums of each arm's
   block requests ``n`` and bad events ``b`` (``Moments``): seven numbers an arm,
   whatever the rollout's length.
2. **Extra variance.** With an arm's error rate ``r·g`` in a block, ``g`` a multiplier
   of mean 1 and variance ``v`` (``v = CV²``), ``Var(b) = r·n + v·r²·n²``.  The method
   of moments, corrected for ``r`` being estimated, gives ``v̂`` (``extra_variance``),
   pooled over both arms: the drift both arms show is the service's, not the canary's.
   With few blocks the estimate leans on a prior (``PRIOR_V`` worth ``PRIOR_BLOCKS``
   blocks), so that the first minute of a rollout is not judged as if errors were
   independent.
3. **Inflation.** Over a step of ``k`` blocks with ``μc``, ``μs`` bad events expected
   in the window, the canary's share of bad events has ``φ`` times the binomial
   variance, ``φ = 1 + v·[(1−θ)²·μc² + θ²·μs²] / (k·[(1−θ)²·μc + θ²·μs])``
   (``inflation``).  The test then counts ``x/φ`` and ``y/φ`` bad events: the
   quasi-likelihood widening, which keeps the binomial case (``φ = 1``) unchanged.

Validity is approximate (the widening is estimated, not known) and is measured, not
assumed: Monte Carlo on the simulator's overdispersed scenarios, in the test suite
and ``bench/detection.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

#: Shortest block, seconds.  Error-rate drift slower than this is not seen as
#: dispersion (it shows as a difference between the arms' levels instead).
BLOCK_S: float = 60.0
#: Prior extra variance (a CV of 0.5 per block), and how many blocks it is worth.
PRIOR_V: float = 0.25
PRIOR_BLOCKS: float = 0.0
#: Estimated extra variance is raised by this many relative standard errors.
UNCERTAINTY_Z: float = 1.5
#: A window (step) is measured around its own rate once it has this many blocks (the
#: open one included); younger, it is measured with the previous window, as one.
#: Measured at a 10 s interval (1,000 runs): 2 blocks let a client's burst early in a
#: step pass as a new level (1.7% false rollbacks on client-bursts), 3 and 5 give
#: 1.2%; a ×5 regression that starts at the 50% step is caught in 180 s at 3, 240 s at 5.
MIN_WINDOW_BLOCKS: int = 3
#: The widening never exceeds this: beyond it the test is told to learn nothing.
MAX_INFLATION: float = 1e6


@dataclass(frozen=True, slots=True)
class BlockSums:
    """Sums over one window's blocks: ``k``, Σn, Σn², Σn³, Σb, Σb², Σbn."""

    blocks: int = 0
    n: float = 0.0
    n2: float = 0.0
    n3: float = 0.0
    b: float = 0.0
    b2: float = 0.0
    bn: float = 0.0

    def add(self, requests: int, bad: int) -> BlockSums:
        """These sums with one more block of ``requests`` and ``bad`` events."""
        n, b = float(requests), float(bad)
        return self.merge(BlockSums(1, n, n * n, n * n * n, b, b * b, b * n))

    def merge(self, other: BlockSums) -> BlockSums:
        return BlockSums(
            self.blocks + other.blocks,
            self.n + other.n,
            self.n2 + other.n2,
            self.n3 + other.n3,
            self.b + other.b,
            self.b2 + other.b2,
            self.bn + other.bn,
        )

    def as_list(self) -> list[float]:
        return [float(self.blocks), self.n, self.n2, self.n3, self.b, self.b2, self.bn]

    @classmethod
    def from_list(cls, values: list[float]) -> BlockSums:
        k, n, n2, n3, b, b2, bn = values
        return cls(int(k), n, n2, n3, b, b2, bn)

    def spread(self) -> tuple[float, float] | None:
        """(rate r̂, Σ(b − r̂n)²) over the blocks, or None with too little to tell."""
        if self.blocks < 2 or self.n <= 0 or self.b <= 0:
            return None
        rate = self.b / self.n
        return rate, self.b2 - 2.0 * rate * self.bn + rate * rate * self.n2

    def figures(self) -> Figures:
        """This window's contribution to both estimates (see :class:`Figures`)."""
        fit = self.spread()
        if fit is None:
            return Figures()
        rate, spread = fit
        p2 = self.n2 / (self.n * self.n)
        poisson = rate * (self.n - 2.0 * self.n2 / self.n + p2 * self.n)
        extra = rate * rate * (self.n2 - 2.0 * self.n3 / self.n + p2 * self.n2)
        num, den = (spread - poisson, extra) if extra > 0.0 else (0.0, 0.0)
        expected = rate * (self.n - self.n2 / self.n)
        if expected <= 0.0:
            return Figures(num, den)
        return Figures(num, den, max(spread, 0.0), expected, float(self.blocks - 1))


@dataclass(frozen=True, slots=True)
class Figures:
    """What windows add up to, each measured around its own rate.

    Attributes:
        num: numerator of the moment estimate of ``v``:
            ``Σ(b − r̂n)² − r̂·Σn·c`` (see :meth:`Moments.excess`).
        den: its denominator, ``r̂²·Σn²·c``.
        spread: Pearson's ``Σ(b − r̂n)²``.
        expected: its expectation for independent requests, ``r̂·(N − Σn²/N)``.
        dof: degrees of freedom, blocks less one per window.
    """

    num: float = 0.0
    den: float = 0.0
    spread: float = 0.0
    expected: float = 0.0
    dof: float = 0.0

    def __add__(self, other: Figures) -> Figures:
        return Figures(
            self.num + other.num,
            self.den + other.den,
            self.spread + other.spread,
            self.expected + other.expected,
            self.dof + other.dof,
        )

    def as_list(self) -> list[float]:
        return [self.num, self.den, self.spread, self.expected, self.dof]


@dataclass(frozen=True, slots=True)
class Moments:
    """One arm's block sums: the current window's, the previous window's (``last``),
    and the :class:`Figures` of the windows before (``past``).

    An arm's error rate may differ from one step to the next (the canary's does when a
    regression shows only under more load): each window's blocks are measured around
    that window's own rate and the windows pooled, so a change of level between steps
    is not taken for dispersion.  A window younger than ``MIN_WINDOW_BLOCKS`` is
    measured with the previous one, around their common rate, as one: a burst in a
    step's first minutes must still show as dispersion the moment it shows as
    evidence (a block or two cannot tell a burst from a new level).
    """

    current: BlockSums = BlockSums()
    last: BlockSums = BlockSums()
    past: Figures = Figures()

    def add(self, requests: int, bad: int) -> Moments:
        """These sums with one more block of ``requests`` and ``bad`` events."""
        return replace(self, current=self.current.add(requests, bad))

    def fold(self) -> Moments:
        """A new window begins: the current one becomes the previous (merged into it if
        it is younger than ``MIN_WINDOW_BLOCKS``), and the previous one's figures join
        the past."""
        if self.current.blocks >= MIN_WINDOW_BLOCKS:
            return Moments(last=self.current, past=self.past + self.last.figures())
        return Moments(last=self.last.merge(self.current), past=self.past)

    def as_list(self) -> list[float]:
        return [*self.current.as_list(), *self.last.as_list(), *self.past.as_list()]

    @classmethod
    def from_list(cls, values: list[float]) -> Moments:
        """From :meth:`as_list`; a record of the current window's seven sums alone
        (written before windows were told apart) reads with no earlier windows;
        anything else as none."""
        if len(values) == 7:
            return cls(BlockSums.from_list(values))
        if len(values) != 19:
            return cls()
        return cls(
            BlockSums.from_list(values[:7]),
            BlockSums.from_list(values[7:14]),
            Figures(*values[14:]),
        )

    def _totals(self) -> Figures:
        """Every window's figures, the current one pooled with the previous while young."""
        if self.current.blocks >= MIN_WINDOW_BLOCKS:
            return self.past + self.last.figures() + self.current.figures()
        return self.past + self.last.merge(self.current).figures()

    def excess(self) -> tuple[float, float]:
        """(numerator, denominator) of this arm's moment estimate of ``v``, all windows.

        ``E[Σ(b − r̂n)²] = Σ (r·n + v·r²·n²)(1 − 2n/N + Σn²/N²)`` for blocks with
        independent multipliers, so ``v̂ = (S − r̂·Σn·c) / (r̂²·Σn²·c)`` with the
        correction ``c`` written out in sums; windows add their numerators and
        denominators.  (0, 0) when the arm tells nothing.
        """
        totals = self._totals()
        return totals.num, totals.den

    @property
    def dof(self) -> float:
        """Degrees of freedom of the estimates: blocks less one per window."""
        return self._totals().dof

    def pearson(self) -> tuple[float, float] | None:
        """(dispersion ``D̂``, its standard error) of this arm's blocks, or None.

        ``D = Var(b) / E(b)`` per block: 1 for independent requests, more when errors
        drift or come in bursts, whatever the cause.  ``E[Σ(b − r̂n)²] = D·r·(N − Σn²/N)``
        corrects for the rate being estimated; the standard error is the Poisson one,
        ``√(2/dof)``.
        """
        totals = self._totals()
        if totals.expected <= 0.0 or totals.dof < 1.0:
            return None
        return totals.spread / totals.expected, math.sqrt(2.0 / totals.dof)


def extra_variance(stable: Moments, canary: Moments) -> float:
    """Pooled estimate of the error-rate multiplier's variance ``v`` (≥ 0), with the prior."""
    num_s, den_s = stable.excess()
    num_c, den_c = canary.excess()
    den = den_s + den_c
    blocks = max(stable.dof, canary.dof)
    if den <= 0.0 or blocks <= 0:
        return PRIOR_V
    measured = max(0.0, (num_s + num_c) / den) * (1.0 + UNCERTAINTY_Z * math.sqrt(2.0 / blocks))
    return (PRIOR_BLOCKS * PRIOR_V + blocks * measured) / (PRIOR_BLOCKS + blocks)


def arm_dispersion(moments: Moments, v: float, bad_per_block: float) -> float:
    """The dispersion ``D ≥ 1`` to assume for one arm's bad events per block.

    The larger of what the shared drift ``v`` implies at this arm's level
    (``1 + v·μ``) and what the arm's own blocks show beyond doubt (``D̂`` less one
    standard error): the second catches bursts that land on one arm, which a drift
    in rate does not describe.
    """
    model = 1.0 + v * max(bad_per_block, 0.0)
    own = moments.pearson()
    if own is None:
        return model
    d_hat, se = own
    return max(model, d_hat - se)


def inflation(
    theta: float,
    canary_bad: float,
    stable_bad: float,
    canary_dispersion: float,
    stable_dispersion: float,
) -> float:
    """Variance factor ``φ ≥ 1`` of the canary's share of bad events.

    Args:
        theta: the share under test (the null bound).
        canary_bad: bad events expected on the canary side over the window.
        stable_bad: bad events expected on the stable side over the window.
        canary_dispersion: ``D`` of the canary's counts (``arm_dispersion``).
        stable_dispersion: ``D`` of the stable's counts.

    With blocks independent, ``Var(x) = D_c·μc`` and ``Var(y) = D_s·μs``; the share's
    variance is ``[(1−θ)²·Var(x) + θ²·Var(y)] / B²`` against the binomial
    ``[(1−θ)²·μc + θ²·μs] / B²``.
    """
    wc, ws = (1.0 - theta) ** 2 * canary_bad, theta**2 * stable_bad
    base = wc + ws
    if base <= 0.0:
        return 1.0
    phi = (wc * max(canary_dispersion, 1.0) + ws * max(stable_dispersion, 1.0)) / base
    return min(phi, MAX_INFLATION)


def _block_share(elapsed_s: float) -> float:
    """The share of a window of ``elapsed_s`` that one block covers (1 within a block)."""
    return min(1.0, BLOCK_S / elapsed_s) if elapsed_s > 0 else 1.0


def error_inflation(
    theta: float,
    stable_requests: int,
    canary_requests: int,
    bad: int,
    elapsed_s: float,
    stable: Moments,
    canary: Moments,
) -> float:
    """``φ`` of a window of ``elapsed_s`` with these requests and ``bad`` events in all.

    Expected bad events per arm are at the pooled rate (the null's), per block at the
    window's block length.  ``stable`` and ``canary`` are the arms' block sums,
    including the block still open.
    """
    total = stable_requests + canary_requests
    if bad <= 0 or total <= 0:
        return 1.0
    rate = bad / total
    per_block = _block_share(elapsed_s)
    v = extra_variance(stable, canary)
    d_s = arm_dispersion(stable, v, rate * stable_requests * per_block)
    d_c = arm_dispersion(canary, v, rate * canary_requests * per_block)
    return inflation(theta, rate * canary_requests, rate * stable_requests, d_c, d_s)


def canary_inflation(
    canary_requests: int, canary_bad: int, elapsed_s: float, stable: Moments, canary: Moments
) -> float:
    """``φ`` of the canary's own error count (the one-sample limit test): its ``D``."""
    if canary_bad <= 0 or canary_requests <= 0:
        return 1.0
    per_block = _block_share(elapsed_s)
    v = extra_variance(stable, canary)
    return min(max(arm_dispersion(canary, v, canary_bad * per_block), 1.0), MAX_INFLATION)


@dataclass(frozen=True, slots=True)
class Blocks:
    """Block accounting of one rollout: where the current block began, and the sums.

    Attributes:
        started_s: when the current block began (seconds, any origin).
        stable_at: stable's (requests, bad) counters when it began.
        canary_at: canary's (requests, bad) counters when it began.
        stable: sums over stable's completed blocks.
        canary: sums over canary's completed blocks.
    """

    started_s: float
    stable_at: tuple[int, int]
    canary_at: tuple[int, int]
    stable: Moments = Moments()
    canary: Moments = Moments()

    def _since(
        self, stable: tuple[int, int], canary: tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Both arms' (requests, bad) accrued since the open block began."""
        return (
            (stable[0] - self.stable_at[0], stable[1] - self.stable_at[1]),
            (canary[0] - self.canary_at[0], canary[1] - self.canary_at[1]),
        )

    def advance(self, now_s: float, stable: tuple[int, int], canary: tuple[int, int]) -> Blocks:
        """These blocks after a reading at ``now_s`` of both arms' cumulative counters.

        A block closes once it is ``BLOCK_S`` old; a reading with a counter below the
        block's start (a reset) starts the block again and adds nothing.  The same
        reading twice changes nothing.
        """
        ds, dc = self._since(stable, canary)
        if min(*ds, *dc) < 0:
            return Blocks(now_s, stable, canary, self.stable, self.canary)
        if now_s - self.started_s < BLOCK_S - 1e-3:  # timestamps as floats: 1 ms slack
            return self
        return Blocks(now_s, stable, canary, self.stable.add(*ds), self.canary.add(*dc))

    def including(
        self, stable: tuple[int, int], canary: tuple[int, int]
    ) -> tuple[Moments, Moments]:
        """Both arms' sums with the open block, read now, counted as a block: a burst
        is seen as dispersion from the moment it is seen as evidence."""
        ds, dc = self._since(stable, canary)
        if min(*ds, *dc) < 0 or ds[0] + dc[0] <= 0:
            return self.stable, self.canary
        return self.stable.add(*ds), self.canary.add(*dc)
