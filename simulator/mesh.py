"""The simulated service mesh: the stable/canary traffic split."""

from __future__ import annotations

import operator


class Mesh:
    """Traffic split between the stable and canary arms, in whole percent.

    The two weights always sum to 100, as in an Istio VirtualService route.

    Args:
        canary_weight_pct: initial share of requests routed to the canary, 0..100.
    """

    __slots__ = ("_canary_weight_pct", "_mirror_pct")

    def __init__(self, canary_weight_pct: int = 0) -> None:
        self._canary_weight_pct = 0
        self._mirror_pct = 0
        self.set_canary_weight(canary_weight_pct)

    @property
    def mirror_pct(self) -> int:
        """Share of stable's requests also copied to the canary (answers discarded)."""
        return self._mirror_pct

    def set_mirror(self, pct: int) -> None:
        """Copy ``pct`` percent (0..100) of the requests stable serves to the canary.

        Raises:
            ValueError: if ``pct`` is outside 0..100.
        """
        value = operator.index(pct)
        if not 0 <= value <= 100:
            raise ValueError(f"mirror percent must be within 0..100, got {value}")
        self._mirror_pct = value

    @property
    def canary_weight_pct(self) -> int:
        """Share of requests routed to the canary, in percent (0..100)."""
        return self._canary_weight_pct

    @property
    def stable_weight_pct(self) -> int:
        """Share of requests routed to the stable arm, in percent: ``100 - canary``."""
        return 100 - self._canary_weight_pct

    def set_canary_weight(self, pct: int) -> None:
        """Route ``pct`` percent of requests to the canary and the rest to stable.

        Raises:
            TypeError: if ``pct`` is not an integer.
            ValueError: if ``pct`` is outside 0..100.
        """
        if isinstance(pct, bool):
            raise TypeError("canary weight must be an int percentage, not a bool")
        value = operator.index(pct)
        if not 0 <= value <= 100:
            raise ValueError(f"canary weight must be within 0..100 percent, got {value}")
        self._canary_weight_pct = value

    def __repr__(self) -> str:
        return (
            f"Mesh(stable_weight_pct={self.stable_weight_pct}, "
            f"canary_weight_pct={self._canary_weight_pct})"
        )
