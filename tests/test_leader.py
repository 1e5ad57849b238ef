"""Leader election judged by this process's own monotonic clock, as client-go does:
the holder's renewTime is never compared with a local wall clock that may be skewed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from canaryd.kube import Kube
from canaryd.leader import LeaderElector, LeaseSettings
from kubedouble.apiserver import KubeApiServer


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def kube(kubeapi: KubeApiServer) -> Iterator[Kube]:
    api = kubeapi.api_client()
    yield Kube(api, timeout_s=5.0)
    api.close()


def elector(kube: Kube, identity: str, clock: Clock, skew_s: float = 0.0) -> LeaderElector:
    settings = LeaseSettings("default", "canaryd-leader", identity, 15.0, 10.0, 2.0)
    return LeaderElector(
        kube,
        settings,
        wall=lambda: datetime.now(UTC) + timedelta(seconds=skew_s),
        monotonic=clock,
    )


def test_a_standby_whose_clock_runs_ahead_never_takes_a_live_leaders_lease(kube: Kube) -> None:
    async def scenario() -> list[bool]:
        clock = Clock()
        leader = elector(kube, "pod-a", clock)
        standby = elector(kube, "pod-b", clock, skew_s=3600.0)  # an hour ahead
        assert await leader.try_acquire_or_renew()
        taken = []
        for second in range(1, 61):
            clock.t += 1.0
            if second % 10 == 0:
                assert await leader.try_acquire_or_renew()
            if second % 2 == 0:
                taken.append(await standby.try_acquire_or_renew())
        assert leader.is_leader and not standby.is_leader
        return taken

    assert not any(asyncio.run(scenario()))


def test_a_standby_whose_clock_lags_takes_a_dead_leaders_lease_within_one_duration(
    kube: Kube,
) -> None:
    async def scenario() -> float:
        clock = Clock()
        leader = elector(kube, "pod-a", clock)
        standby = elector(kube, "pod-b", clock, skew_s=-3600.0)  # an hour behind
        assert await leader.try_acquire_or_renew()
        died = clock.t  # the leader stops renewing
        while not await standby.try_acquire_or_renew():
            clock.t += 2.0
            assert clock.t - died < 60, "the standby never took over"
        assert not leader.is_leader  # it stopped acting before the standby began
        return clock.t - died

    waited_s = asyncio.run(scenario())
    assert 15.0 <= waited_s <= 15.0 + 2.0


def test_a_released_lease_is_taken_at_the_next_retry(kube: Kube) -> None:
    async def scenario() -> None:
        clock = Clock()
        leader = elector(kube, "pod-a", clock)
        standby = elector(kube, "pod-b", clock)
        assert await leader.try_acquire_or_renew()
        assert not await standby.try_acquire_or_renew()
        await leader.release()
        assert not leader.is_leader
        clock.t += 2.0
        assert await standby.try_acquire_or_renew()
        assert standby.is_leader

    asyncio.run(scenario())


def test_a_leader_that_cannot_renew_stops_acting_after_one_duration(kube: Kube) -> None:
    async def scenario() -> None:
        clock = Clock()
        leader = elector(kube, "pod-a", clock)
        assert await leader.try_acquire_or_renew()
        clock.t += 14.9
        assert leader.is_leader
        clock.t += 0.2
        assert not leader.is_leader

    asyncio.run(scenario())
