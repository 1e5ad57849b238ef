"""Canaries sharded across replicas on Leases (issue 19): fair shares, takeover of a
lost replica's shards, graceful hand-over to an added one, and never two writers of
one Canary in the same lease term (from the API double's write log)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from kubernetes import client as k8s

from canaryd.kube import Kube
from canaryd.leader import LeaseSettings
from canaryd.ports import CanaryRef
from canaryd.rollout import Command, CommandKind
from canaryd.shards import (
    ShardManager,
    ShardSettings,
    fair_shares,
    member_lease_name,
    shard_of,
)
from kubedouble.apiserver import KubeApiServer, WriteRecord, writes_by_non_holders
from simulator import get_scenario
from tests.conftest import DESTINATION_RULE, NS, VIRTUAL_SERVICE, canary, deployment
from tests.test_daemon import Harness

# -- pure parts ---------------------------------------------------------------------------


def test_a_canary_keeps_its_shard_and_shards_are_used_evenly() -> None:
    refs = [CanaryRef(f"ns{i % 7}", f"svc-{i}") for i in range(4000)]
    first = [shard_of(ref, 8) for ref in refs]
    assert first == [shard_of(CanaryRef(r.namespace, r.name), 8) for r in refs]  # stable
    counts = Counter(first)
    assert set(counts) == set(range(8))
    # ~500 each: a binomial's standard deviation is ~21, so within 15% (3.5 of them)
    assert all(abs(n - 500) < 75 for n in counts.values()), counts
    # known values: a change of the hash would move every Canary between shards
    assert shard_of(CanaryRef("shop", "checkout"), 4) == 3
    assert shard_of(CanaryRef("shop", "checkout"), 16) == 11
    assert shard_of(CanaryRef("default", "web"), 16) == 12
    assert shard_of(CanaryRef("shop", "checkout"), 1) == 0


@pytest.mark.parametrize(("members", "count"), [(3, 8), (1, 4), (4, 4), (5, 3), (2, 7)])
def test_fair_shares_add_up_and_differ_by_at_most_one(members: int, count: int) -> None:
    ids = [f"pod-{i}" for i in range(members)]
    shares = fair_shares(list(reversed(ids)), count)
    assert sum(shares.values()) == count
    assert max(shares.values()) - min(shares.values()) <= 1
    assert shares == fair_shares(ids, count)  # the same on every replica


def test_member_lease_names_are_valid_object_names() -> None:
    dns = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    for identity in ("canaryd-7d9f-abcde", "Pod_A", "x" * 300, "ip-10-0-0-1.ec2.internal"):
        name = member_lease_name("canaryd-leader", identity)
        assert dns.match(name) and len(name) <= 253, name
    assert member_lease_name("l", "Pod_A") != member_lease_name("l", "pod-a")


# -- the managers on the double, virtual time ---------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def manager(kube: Kube, identity: str, clock: Clock, count: int = 6) -> ShardManager:
    lease = LeaseSettings(NS, "canaryd", identity, 15.0, 10.0, 2.0)
    return ShardManager(kube, ShardSettings(count, lease), monotonic=clock)


def assert_disjoint(managers: list[ShardManager]) -> None:
    held = [s for m in managers for s in m.held]
    assert len(held) == len(set(held)), {m.identity: m.held for m in managers}


def test_three_replicas_split_the_shards_and_two_take_a_lost_ones_over(
    kubeapi: KubeApiServer,
) -> None:
    async def scenario() -> tuple[list[int], float]:
        api = kubeapi.api_client()
        kube = Kube(api, timeout_s=5.0)
        clock = Clock()
        a, b, c = (manager(kube, x, clock) for x in ("a", "b", "c"))
        for _ in range(6):  # a few ticks of every replica, 2 s apart
            for m in (a, b, c):
                await m.tick()
                assert_disjoint([a, b, c])
            clock.t += 2.0
        sizes = [len(m.held) for m in (a, b, c)]
        lost, died = set(c.held), clock.t  # c dies: it never ticks again
        while set(a.held) | set(b.held) != set(range(6)):
            assert clock.t - died < 40, (a.held, b.held)
            clock.t += 2.0
            for m in (a, b):
                await m.tick()
            assert_disjoint([a, b, c])  # c's own clock ends its term before they start
        assert lost and len(a.held) == len(b.held) == 3
        api.close()
        return sizes, clock.t - died

    sizes, took_s = asyncio.run(scenario())
    assert sizes == [2, 2, 2]
    assert took_s <= 15.0 + 2.0 + 2.0  # one lease duration, plus a tick to see each


def test_shards_stay_held_while_the_daemons_loop_lags_past_a_lease_duration(
    kubeapi: KubeApiServer,
) -> None:
    """A round's start on thousands of Canaries keeps the daemon's loop busy for
    seconds at a time; the Leases are renewed on a loop of their own, so a lag longer
    than the lease duration loses no shard (on the daemon's loop, each await of a tick
    waited one lagging iteration, and the shards lapsed)."""
    lease = LeaseSettings(NS, "canaryd", "a", 2.0, 1.0, 0.25)
    samples: list[int] = []

    async def scenario() -> None:
        api = kubeapi.api_client()
        kube = Kube(api, timeout_s=5.0)
        m = ShardManager(kube, ShardSettings(2, lease))
        stop = asyncio.Event()
        task = asyncio.create_task(m.run(stop))
        sampling = threading.Event()

        def sample() -> None:  # from a thread: the loop itself is what lags
            while not sampling.wait(0.1):
                samples.append(len(m.held))

        sampler = threading.Thread(target=sample)
        started = time.monotonic()
        while len(m.held) < 2:
            assert time.monotonic() - started < 5.0, m.held
            await asyncio.sleep(0.05)
        sampler.start()

        async def busy() -> None:  # 8 of these: each iteration of the loop takes 2.4 s
            while not stop.is_set():
                time.sleep(0.3)
                await asyncio.sleep(0)

        hogs = [asyncio.create_task(busy()) for _ in range(8)]
        await asyncio.sleep(4.0)
        stop.set()
        await asyncio.gather(task, *hogs)
        sampling.set()
        sampler.join()
        api.close()

    asyncio.run(scenario())
    assert len(samples) > 25 and set(samples) == {2}, Counter(samples)


def test_an_added_replica_gets_its_share_only_between_rounds(kubeapi: KubeApiServer) -> None:
    async def scenario() -> None:
        api = kubeapi.api_client()
        kube = Kube(api, timeout_s=5.0)
        clock = Clock()
        a, b = manager(kube, "a", clock), manager(kube, "b", clock)
        for _ in range(3):
            for m in (a, b):
                await m.tick()
            clock.t += 2.0
        assert len(a.held) == len(b.held) == 3
        c = manager(kube, "c", clock)
        await c.tick()  # c joins: a and b see a third member at their next tick
        assert c.held == []
        # a Canary of each of a's shards is mid-reconcile: the shard a hands over is
        # released only once its round has ended
        refs = (CanaryRef(NS, f"svc-{i}") for i in range(1000))
        busy = {a.shard(ref): ref for ref in refs if a.shard(ref) in a.held}
        assert len(busy) == 3
        with contextlib.ExitStack() as rounds:
            for ref in busy.values():
                rounds.enter_context(a.busy(ref))
            for _ in range(3):
                for m in (a, b, c):
                    await m.tick()
                    assert_disjoint([a, b, c])
                clock.t += 2.0
            assert len(a.draining) == 1 and len(a.held) == 3  # marked, not released
            (leaving,) = a.draining
            assert a.holds(busy[leaving]) and not a.owns(busy[leaving])
            assert len(c.held) == 1  # b's spare shard: b's rounds were not in progress
        for _ in range(3):
            for m in (a, b, c):
                await m.tick()
                assert_disjoint([a, b, c])
            clock.t += 2.0
        assert sorted(len(m.held) for m in (a, b, c)) == [2, 2, 2]
        assert set(a.held) | set(b.held) | set(c.held) == set(range(6))
        assert not a.draining and not b.draining
        holders = {}
        for i in range(6):
            lease = kubeapi.get("coordination.k8s.io", "v1", "leases", NS, f"canaryd-shard-{i}")
            assert lease is not None
            holders[f"canaryd-shard-{i}"] = lease["spec"].get("holderIdentity")
        assert holders == {f"canaryd-shard-{i}": m.identity for m in (a, b, c) for i in m.held}
        api.close()

    asyncio.run(scenario())


def test_a_clean_stop_hands_the_shards_over_at_once(kubeapi: KubeApiServer) -> None:
    async def scenario() -> None:
        api = kubeapi.api_client()
        kube = Kube(api, timeout_s=5.0)
        clock = Clock()
        a, b = manager(kube, "a", clock, count=4), manager(kube, "b", clock, count=4)
        for _ in range(3):
            for m in (a, b):
                await m.tick()
            clock.t += 2.0
        await b.release_all()  # SIGTERM: shards released, member Lease deleted
        clock.t += 2.0
        await a.tick()
        assert a.members == ["a"]
        assert a.held == [0, 1, 2, 3]  # no lease duration to wait out
        api.close()

    asyncio.run(scenario())


# -- three daemons on the double, compressed real time --------------------------------------

COUNT, SHARDS = 12, 6
_TARGET = re.compile(r"/(?:canaries|virtualservices|deployments)/(c\d+)(?:-canary)?(?:/|$)")
_SHARD_LEASE = re.compile(r"^canaryd-leader-shard-(\d+)$")


def populate_many(server: KubeApiServer) -> list[CanaryRef]:
    api = server.api_client()
    refs = []
    try:
        apps, custom = k8s.AppsV1Api(api), k8s.CustomObjectsApi(api)
        for i in range(COUNT):
            name = f"c{i}"
            vs = copy.deepcopy(VIRTUAL_SERVICE)
            vs["metadata"]["name"] = name
            dr = copy.deepcopy(DESTINATION_RULE)
            dr["metadata"]["name"] = name
            server.put_raw("networking.istio.io", "v1", "virtualservices", vs)
            server.put_raw("networking.istio.io", "v1", "destinationrules", dr)
            apps.create_namespaced_deployment(NS, deployment(name, "shop/checkout:1", "stable"))
            apps.create_namespaced_deployment(
                NS, deployment(f"{name}-canary", "shop/checkout:2", "canary", replicas=1)
            )
            body = canary(name, stepDuration="600s")
            spec = body["spec"]
            spec["stable"]["deployment"], spec["canary"]["deployment"] = name, f"{name}-canary"
            spec["trafficRouting"]["istio"]["virtualService"]["name"] = name
            spec["trafficRouting"]["istio"]["destinationRule"]["name"] = name
            custom.create_namespaced_custom_object("canaryd.io", "v1alpha1", NS, "canaries", body)
            refs.append(CanaryRef(NS, name))
    finally:
        api.close()
    return refs


def double_writes(log: list[WriteRecord]) -> list[str]:
    """Writes of a Canary's objects by a replica that was not, by the last write of the
    Canary's shard Lease before it, that shard's holder."""
    return writes_by_non_holders(
        log, _SHARD_LEASE, _TARGET, lambda name: shard_of(CanaryRef(NS, name), SHARDS)
    )[1]


def test_three_daemons_split_the_canaries_and_take_a_killed_ones_over(
    kubeapi: KubeApiServer,
) -> None:
    refs = populate_many(kubeapi)

    def lease(identity: str) -> LeaseSettings:
        return LeaseSettings(NS, "canaryd-leader", identity, 3.0, 1.0, 0.3)

    async def scenario() -> tuple[dict[str, Any], float]:
        daemons = {
            x: Harness(kubeapi, get_scenario("healthy"), lease=lease(x), shards=SHARDS,
                       status_refresh_s=0.0)
            for x in ("a", "b", "c")
        }  # fmt: skip
        for h in daemons.values():
            await h.__aenter__()
        api = kubeapi.api_client()
        api.user_agent = "test-pipeline"
        kube = Kube(api, timeout_s=5.0)
        loop = asyncio.get_running_loop()
        try:
            start = loop.time()
            while sorted(len(h.daemon.shards.held) for h in daemons.values()) != [2, 2, 2]:  # type: ignore[union-attr]
                assert loop.time() - start < 10, "the shards were not split"
                await asyncio.sleep(0.05)
            settled_s = loop.time() - start
            settled_at = len(kubeapi.write_log)  # before: writes of shards in passing
            for i, ref in enumerate(refs):
                await kube.add_command(
                    ref, Command(id=f"p{i}", kind=CommandKind.PROMOTE, by="test", revision="v2")
                )
            start = loop.time()
            while not all(
                (kubeapi.get("canaryd.io", "v1alpha1", "canaries", NS, r.name) or {})
                .get("status", {})
                .get("phase")
                == "Progressing"
                for r in refs
            ):
                assert loop.time() - start < 20, "not every Canary started"
                await asyncio.sleep(0.1)
            split = {x: sorted(h.daemon.shards.held) for x, h in daemons.items()}  # type: ignore[union-attr]
            readyz = daemons["a"].daemon.readiness()[1]
            await asyncio.sleep(1.5)
            victim = daemons.pop("c")
            assert victim.task is not None
            lost = set(victim.daemon.shards.held)  # type: ignore[union-attr]
            victim.task.cancel()  # killed: no release
            await asyncio.gather(victim.task, return_exceptions=True)
            died = loop.time()
            writes_at_death = {x: h.daemon.stats["writes"] for x, h in daemons.items()}
            while True:
                held = set().union(*(h.daemon.shards.held for h in daemons.values()))  # type: ignore[union-attr]
                if held == set(range(SHARDS)):
                    break
                assert loop.time() - died < 8.0, "the killed daemon's shards were not taken"
                await asyncio.sleep(0.05)
            took_s = loop.time() - died
            await asyncio.sleep(2.0)  # the survivors reconcile the lost Canaries
            grew = {x: h.daemon.stats["writes"] - writes_at_death[x] for x, h in daemons.items()}
            victim.api.close()
            info = {"split": split, "lost": lost, "grew": grew, "readyz": readyz}
            return info | {"settled_s": settled_s, "settled_at": settled_at}, took_s
        finally:
            api.close()
            for h in daemons.values():
                await h.__aexit__()

    info, took_s = asyncio.run(scenario())
    assert sorted(len(v) for v in info["split"].values()) == [2, 2, 2], info  # still
    assert info["settled_s"] < 3.0, info  # a few ticks of 0.3 s
    assert info["lost"] and all(n > 0 for n in info["grew"].values()), info
    assert took_s <= 3.0 + 0.3 + 1.0, took_s  # one lease duration, a tick to see it, slack
    shards = info["readyz"]["shards"]
    assert shards["count"] == SHARDS and shards["held"] == info["split"]["a"]
    assert {v for v in shards["holders"].values()} == {"a", "b", "c"}
    log = kubeapi.write_log
    assert sum(1 for r in log if "/canaries/" in r.path and r.agent != "test-pipeline") > 50
    assert double_writes(log) == []
    # once the shards were split, every Canary's status was written by the holder of
    # its shard, and after the takeover by its new holder: each lost Canary has two
    # writers over time (before the split, a shard may pass through a replica that
    # started first)
    writers: dict[str, set[str]] = {}
    for r in log[info["settled_at"] :]:
        if (m := _TARGET.search(r.path)) and "canaryd-test" in (r.agent or ""):
            writers.setdefault(m.group(1), set()).add(r.agent or "")
    moved = [n for n in writers if shard_of(CanaryRef(NS, n), SHARDS) in info["lost"]]
    assert moved and all(len(writers[n]) == 2 for n in moved), {n: writers[n] for n in moved}


def test_status_shows_which_replica_holds_which_shard(
    cluster: KubeApiServer, kubeconfig: Any
) -> None:
    import io

    from canaryd.cli import main

    async def hold() -> None:
        api = cluster.api_client()
        kube = Kube(api, timeout_s=5.0)
        clock = Clock()
        lease = LeaseSettings(NS, "canaryd-leader", "pod-a", 15.0, 10.0, 2.0)
        a = ShardManager(kube, ShardSettings(4, lease), monotonic=clock)
        b = ShardManager(kube, ShardSettings(4, replace(lease, identity="pod-b")), monotonic=clock)
        for _ in range(3):
            for m in (a, b):
                await m.tick()
            clock.t += 2.0
        api.close()

    asyncio.run(hold())

    def status(*argv: str) -> str:
        out = io.StringIO()
        code = main(["status", *argv, "--kubeconfig", str(kubeconfig), "-n", NS,
                     "--lease-namespace", NS], out, io.StringIO())  # fmt: skip
        assert code == 0
        return out.getvalue()

    listed = status()
    line = next(x for x in listed.splitlines() if x.startswith("shards (4): "))
    assert "pod-a" in line and "pod-b" in line and "unheld" not in line, listed
    holder = cluster.get("coordination.k8s.io", "v1", "leases", NS, "canaryd-leader-shard-3")
    assert holder is not None
    detail = status("checkout")  # shop/checkout is in shard 3 of 4
    assert f"shard 3 of 4, held by {holder['spec']['holderIdentity']}" in detail, detail
    without = io.StringIO()
    main(["status", "--kubeconfig", str(kubeconfig), "-n", NS], without, io.StringIO())
    assert "shards" not in without.getvalue()  # no shard Leases in "default"


def test_the_shard_line_names_unheld_shards() -> None:
    from canaryd.backends import ShardView

    view = ShardView(("pod-a", None, "pod-b", "pod-a"))
    assert view.line() == "shards (4): 0,3 pod-a · 2 pod-b · 1 unheld"
    assert view.of(CanaryRef("shop", "checkout")) == "shard 3 of 4, held by pod-a"


def test_the_sharded_overlay_runs_shards_and_its_rbac_covers_their_leases(
    kubeapi: KubeApiServer,
) -> None:
    from dataclasses import replace as with_

    from tests.test_manifests import (
        NAMESPACE,
        accesses,
        denied,
        granted_rules,
        objects,
        run_args,
        the,
    )

    args = run_args("sharded")
    assert args.shards == 8 and args.leader_elect and args.lease_namespace == NAMESPACE
    assert the("Deployment", "canaryd", "sharded")["spec"]["replicas"] == 4
    assert sum(o["kind"] == "Deployment" for o in objects("sharded")) == 1

    async def calls() -> None:  # every kind of call the shard Leases take
        api = kubeapi.api_client()
        kube = Kube(api, timeout_s=5.0)
        clock = Clock()
        lease = LeaseSettings(args.lease_namespace, args.lease_name, "pod-a", 15.0, 10.0, 2.0)
        a = ShardManager(kube, ShardSettings(args.shards, lease), monotonic=clock)
        b = ShardManager(kube, ShardSettings(args.shards, with_(lease, identity="pod-b")),
                         monotonic=clock)  # fmt: skip
        for _ in range(8):
            for m in (a, b):
                await m.tick()
            clock.t += 11.0  # past renew_s: renewals too
        await b.release_all()
        await a.tick()
        api.close()

    asyncio.run(calls())
    # (a collection GET in the log may be a list or a watch; the shards only list)
    wanted = {x for r in kubeapi.requests for x in accesses(r) if x.verb != "watch"}
    verbs = {a.verb for a in wanted}
    assert {"list", "create", "update", "get", "delete"} <= verbs, verbs
    account = (NAMESPACE, "canaryd")
    assert denied(granted_rules(account, "sharded"), wanted) == []
    # and without the overlay's Role, the base grants too little for shards
    assert denied(granted_rules(account, "cluster-wide"), wanted)
