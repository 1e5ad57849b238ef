"""Virtual time for simulated rollouts: it moves only when told to."""

from __future__ import annotations

import math


class VirtualClock:
    """A clock whose time, in seconds, advances only through :meth:`advance`.

    Args:
        start_s: the time the clock shows at first, in seconds.
    """

    __slots__ = ("_now_s",)

    def __init__(self, start_s: float = 0.0) -> None:
        if not math.isfinite(start_s):
            raise ValueError(f"start_s must be finite, got {start_s!r}")
        self._now_s = float(start_s)

    @property
    def now_s(self) -> float:
        """Current virtual time, in seconds."""
        return self._now_s

    def advance(self, dt_s: float) -> None:
        """Move the clock forward by ``dt_s`` seconds.

        Raises:
            ValueError: if ``dt_s`` is negative or not finite.
        """
        if not math.isfinite(dt_s) or dt_s < 0:
            raise ValueError(f"dt_s must be a finite number >= 0, got {dt_s!r}")
        self._now_s += dt_s

    def __repr__(self) -> str:
        return f"VirtualClock(now_s={self._now_s!r})"
