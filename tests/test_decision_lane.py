"""Decisions first (issue 19): a rollback's or a step's status write, and the weights
it moves, run on threads of their own, never queued behind other Canaries' routine
calls in the shared pool."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from canaryd.kube import CanaryObject, Kube, decision_lane, in_decision_lane
from canaryd.rollout import CommandKind
from canaryd.status import CanaryStatus
from kubedouble.apiserver import KubeApiServer
from simulator import get_scenario
from tests.test_daemon import Harness, phase


def test_a_decision_is_not_queued_behind_routine_calls() -> None:
    done: list[str] = []

    def slow(name: str, _request_timeout: float = 0.0) -> str:
        time.sleep(0.2)
        done.append(name)
        return name

    def quick(_request_timeout: float = 0.0) -> str:
        done.append("decision")
        return "decision"

    async def scenario() -> None:
        kube = Kube(api_client=None, timeout_s=10.0)  # type: ignore[arg-type]
        routine = [asyncio.create_task(kube.call(slow, f"routine-{i}")) for i in range(30)]
        await asyncio.sleep(0.05)  # the shared pool is busy, its queue long
        with decision_lane():
            assert in_decision_lane()
            assert await kube.call(quick) == "decision"
        assert not in_decision_lane()
        await asyncio.gather(*routine)

    asyncio.run(scenario())
    # the routine calls take ~1 s on the shared pool's few threads; the decision ran at
    # once, ahead of nearly all of them
    assert done.index("decision") < 10, done
    assert len(done) == 31


def test_the_daemon_writes_a_rollback_in_the_decision_lane_and_progress_outside_it(
    cluster: KubeApiServer,
) -> None:
    lanes: list[tuple[str, bool]] = []  # (phase written, in the decision lane)

    async def scenario() -> None:
        async with Harness(cluster, get_scenario("error-spike"), status_refresh_s=0.0) as h:
            write = h.kube.write_status

            async def spy(canary: CanaryObject, status: CanaryStatus) -> Any:
                lanes.append((str(status.phase), in_decision_lane()))
                return await write(canary, status)

            h.kube.write_status = spy  # type: ignore[method-assign]
            await h.command(CommandKind.PROMOTE, revision="v2")
            await h.until(lambda o: phase(o) == "RolledBack")

    asyncio.run(scenario())
    assert ("RolledBack", True) in lanes, lanes
    assert ("Progressing", True) in lanes  # the rollout's start: its first weight
    assert ("Progressing", False) in lanes, lanes  # a verdict's numbers: routine
