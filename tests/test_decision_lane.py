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


def test_a_rollback_reaches_the_virtualservice_ahead_of_1000_queued_cosmetic_writes(
    cluster: KubeApiServer,
) -> None:
    """On the double, through the real client: 1,000 status refreshes of other Canaries
    are queued on the shared pool, then a rollback sets the weight to 0 in the decision
    lane; the double's write log shows which it applied first."""
    import copy

    from canaryd.istio import IstioRouter
    from canaryd.kube import to_canary
    from canaryd.ports import CanaryRef
    from tests.conftest import NS

    base = cluster.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout")
    assert base is not None
    for i in range(1000):
        other = copy.deepcopy(base)
        other["metadata"] = {"name": f"other-{i}", "namespace": NS}
        cluster.put_raw("canaryd.io", "v1alpha1", "canaries", other)
    spec = to_canary(base).spec
    assert spec is not None
    vs = cluster.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
    assert vs is not None
    vs["spec"]["http"][0]["route"][0]["weight"] = 90  # the canary at 10%: the breach
    vs["spec"]["http"][0]["route"][1]["weight"] = 10
    cluster.put_raw("networking.istio.io", "v1", "virtualservices", vs)
    cluster.clear_log()

    async def scenario() -> None:
        api = cluster.api_client()
        kube = Kube(api, timeout_s=30.0)
        router = IstioRouter(kube)
        patch = {"status": {"message": "numbers of an unchanged verdict"}}
        refresh = kube.custom.patch_namespaced_custom_object_status
        group = ("canaryd.io", "v1alpha1", NS, "canaries")
        cosmetic = [
            asyncio.create_task(kube.call(refresh, *group, f"other-{i}", patch))
            for i in range(1000)
        ]
        await asyncio.sleep(0.05)  # queued: the shared pool has a handful of threads
        with decision_lane():
            await router.set_weights(CanaryRef(NS, "checkout"), spec, 0)
        await asyncio.gather(*cosmetic)
        api.close()

    asyncio.run(scenario())
    log = [r for r in cluster.write_log if r.method in ("PUT", "PATCH")]
    assert sum("/canaries/other-" in r.path for r in log) == 1000
    (rollback,) = [n for n, r in enumerate(log) if "/virtualservices/checkout" in r.path]
    assert rollback < 100, f"the weight write came after {rollback} of the 1,000 refreshes"
