"""The daemon end to end: the Kubernetes API double over real HTTP, simulated traffic.

Real time, compressed: evaluations every second, 6-second steps, simulated traffic at
60× (each second of the test is a minute of traffic at 100 requests/s).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from canaryd.daemon import Daemon, DaemonSettings, _Worker
from canaryd.events import RolloutEvent
from canaryd.kube import Kube
from canaryd.leader import LeaseSettings
from canaryd.outbox import Notifier
from canaryd.ports import CanaryRef
from canaryd.rollout import Command, CommandKind
from canaryd.routes import KubeRouter
from canaryd.simsource import SimulatedMetrics
from canaryd.workloads import Deployments
from kubedouble.apiserver import KubeApiServer
from simulator import Scenario, get_scenario
from tests.conftest import NS

REF = CanaryRef(NS, "checkout")
Obj = dict[str, Any]


def canary_obj(server: KubeApiServer) -> Obj:
    obj = server.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout")
    assert obj is not None
    return obj


def vs(server: KubeApiServer) -> Obj:
    obj = server.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
    assert obj is not None
    return obj


def canary_weight(server: KubeApiServer) -> int:
    route = vs(server)["spec"]["http"][0]["route"]
    weights = {d["destination"]["subset"]: d["weight"] for d in route}
    assert weights["stable"] + weights["canary"] == 100
    return int(weights["canary"])


def tracked_raw(daemon: Daemon, missing_ok: bool = False) -> Any:
    """The object the daemon holds in its cache for REF."""
    tracked = daemon.canaries.get(REF)
    raw = tracked.raw if tracked is not None else None
    assert missing_ok or raw is not None
    return raw


def forget_cached(daemon: Daemon) -> None:
    """Drop the daemon's cached copy of REF (the next round reads the API)."""
    tracked = daemon.canaries.get(REF)
    if tracked is not None:
        tracked.raw = tracked.parsed = None


def wait_for_canary(
    server: KubeApiServer, predicate: Callable[[Obj], bool], timeout_s: float = 30.0
) -> Obj:
    """The Canary once ``predicate`` holds (polling the double from this thread)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        obj = canary_obj(server)
        if predicate(obj):
            return obj
        time.sleep(0.05)
    raise AssertionError(f"timed out: {canary_obj(server).get('status')}")


def phase(obj: Obj) -> str:
    return str((obj.get("status") or {}).get("phase", ""))


class Harness:
    """A daemon in this event loop, with the double, simulated traffic and helpers."""

    def __init__(
        self,
        server: KubeApiServer,
        scenario: Scenario,
        *,
        lease: LeaseSettings | None = None,
        speed: float = 60.0,
        status_refresh_s: float = 30.0,
        resync_s: float = 1.0,
        notifier: Notifier | None = None,
        namespaces: tuple[str, ...] = (),
        shards: int = 1,
    ) -> None:
        self.server = server
        self.api = server.api_client()
        if lease is not None:  # who wrote what, in the double's write log
            self.api.user_agent = f"canaryd-test ({lease.identity})"
        self.kube = Kube(self.api, timeout_s=5.0)
        self.router = KubeRouter(self.kube)
        self.metrics = SimulatedMetrics(scenario, self.router, speed=speed, seed=3)
        settings = DaemonSettings(
            namespaces=namespaces,
            resync_s=resync_s,
            watch_timeout_s=1.0,
            lease=lease,
            shards=shards,
            drain_s=5.0,
            status_refresh_s=status_refresh_s,
        )
        self.daemon = Daemon(
            self.kube, self.metrics, self.router, Deployments(self.kube), settings,
            notifier=notifier,
        )  # fmt: skip
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Harness:
        self.task = asyncio.create_task(self.daemon.run(self.stop), name="daemon")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        if not self.task.done():
            await asyncio.wait_for(self.task, 20)
        elif not self.task.cancelled() and self.task.exception() is not None:
            raise self.task.exception()  # type: ignore[misc]
        self.api.close()

    async def command(self, kind: CommandKind, **fields: Any) -> Command:
        command = Command(id=f"{kind}-{len(self.server.requests)}", kind=kind, by="test", **fields)
        await self.kube.add_command(REF, command)
        return command

    async def until(self, predicate: Callable[[Obj], bool], timeout_s: float = 45.0) -> Obj:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            obj = canary_obj(self.server)
            if predicate(obj):
                return obj
            if loop.time() > deadline:
                raise AssertionError(f"timed out; status: {obj.get('status')}")
            await asyncio.sleep(0.1)


def test_healthy_canary_goes_10_50_100_and_is_promoted(cluster: KubeApiServer) -> None:
    weights_seen: list[int] = []

    async def scenario() -> Obj:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")

            def done(obj: Obj) -> bool:
                weight = canary_weight(cluster)
                if not weights_seen or weights_seen[-1] != weight:
                    weights_seen.append(weight)
                return phase(obj) == "Succeeded"

            return await h.until(done)

    obj = asyncio.run(scenario())
    status = obj["status"]
    assert [s["weight"] for s in status["history"]] == [10, 50, 100]
    assert all(s["verdict"] == "pass" for s in status["history"])
    assert weights_seen[0] in (0, 10) and 50 in weights_seen and 100 in weights_seen
    assert weights_seen == [*sorted(weights_seen[:-1]), weights_seen[-1]]  # never backwards
    stable = cluster.get("apps", "v1", "deployments", NS, "checkout")
    canary = cluster.get("apps", "v1", "deployments", NS, "checkout-canary")
    assert stable is not None and canary is not None
    assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/checkout:2"
    assert stable["spec"]["template"]["metadata"]["labels"]["track"] == "stable"
    assert stable["metadata"]["annotations"]["canaryd.io/revision"] == "v2"
    assert canary["spec"]["replicas"] == 0
    assert canary_weight(cluster) == 0  # all traffic on stable, which runs v2
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    events = cluster.list_objects("", "v1", "events", NS)
    reasons = [e["reason"] for e in events]
    assert {"RolloutStarted", "StepStarted", "StepPassed", "Promoting", "Promoted"} <= set(reasons)


class Recorder:
    """A sink that keeps what it is offered (and sends it nowhere)."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[RolloutEvent] = []

    def offer(self, event: RolloutEvent) -> None:
        self.events.append(event)

    async def run(self) -> None:
        await asyncio.Event().wait()


def test_every_sink_gets_the_same_events_in_the_same_order(cluster: KubeApiServer) -> None:
    recorder = Recorder()

    async def scenario() -> Harness:
        async with Harness(cluster, get_scenario("healthy"), notifier=Notifier([recorder])) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            await h.until(lambda obj: phase(obj) == "Succeeded")
            return h

    h = asyncio.run(scenario())
    reasons = [str(e.reason) for e in recorder.events]
    assert reasons[0] == "RolloutStarted" and reasons[-1] == "Promoted"
    steps = [e.weight_pct for e in recorder.events if e.reason == "StepStarted"]
    assert steps == [10, 50, 100]
    assert reasons.index("Promoting") < reasons.index("Promoted")
    assert all(e.namespace == NS and e.name == "checkout" for e in recorder.events)
    assert all(e.revision == "v2" for e in recorder.events)
    passed = [e for e in recorder.events if e.reason == "StepPassed"]
    assert len(passed) == 3 and all(e.verdict is not None for e in passed)
    # the same events, in the same order, on the status API's stream and in the log ring
    streamed = [ev.event for ev in h.daemon.hub.events_after(None) or [] if ev.event is not None]
    assert [e.id for e in streamed] == [e.id for e in recorder.events]
    assert [e.id for e in h.daemon.told] == [e.id for e in recorder.events]
    # and as Kubernetes Events, with the same reasons and messages
    kube = sorted(cluster.list_objects("", "v1", "events", NS), key=lambda e: e["firstTimestamp"])
    told = [(str(e.reason), e.message) for e in recorder.events]
    assert sorted((e["reason"], e["message"]) for e in kube) == sorted(told)


def test_bad_canary_is_rolled_back_within_its_first_step(cluster: KubeApiServer) -> None:
    async def scenario() -> Obj:
        async with Harness(cluster, get_scenario("error-spike")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            return await h.until(lambda o: phase(o) == "RolledBack")

    status = asyncio.run(scenario())["status"]
    assert len(status["history"]) == 1
    assert status["history"][0]["weight"] == 10
    assert status["history"][0]["verdict"] == "rollback"
    assert status["lastVerdict"]["reasons"][0].startswith("errors: canary")
    assert canary_weight(cluster) == 0
    canary = cluster.get("apps", "v1", "deployments", NS, "checkout-canary")
    assert canary is not None and canary["spec"]["replicas"] == 0
    stable = cluster.get("apps", "v1", "deployments", NS, "checkout")
    assert stable is not None
    assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/checkout:1"


def _without_weights(obj: Obj) -> Obj:
    spec: Obj = copy.deepcopy(obj["spec"])
    for route in spec["http"]:
        for dest in route["route"]:
            dest.pop("weight", None)
    return spec


def test_every_other_field_of_the_virtual_service_is_untouched(cluster: KubeApiServer) -> None:
    before = vs(cluster)

    async def scenario() -> None:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            await h.until(lambda o: phase(o) == "Succeeded")

    asyncio.run(scenario())
    after = vs(cluster)
    assert _without_weights(after) == _without_weights(before)
    assert after["spec"]["http"][0]["retries"] == before["spec"]["http"][0]["retries"]
    assert after["spec"]["http"][0]["fault"] == before["spec"]["http"][0]["fault"]
    assert after["spec"]["http"][1] == before["spec"]["http"][1]  # the unrelated route
    assert after["metadata"].get("ownerReferences") is None  # canaryd never owns it


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (
            lambda s: s.delete_raw("networking.istio.io", "v1", "virtualservices", NS, "checkout"),
            "VirtualService shop/checkout not found",
        ),
        (
            lambda s: s.put_raw(
                "networking.istio.io",
                "v1",
                "virtualservices",
                {**vs(s), "spec": {**vs(s)["spec"], "http": vs(s)["spec"]["http"][1:]}},
            ),
            "has no HTTP route named http-primary (routes: admin)",
        ),
        (
            lambda s: s.put_raw(
                "networking.istio.io",
                "v1",
                "destinationrules",
                {
                    **(
                        s.get("networking.istio.io", "v1", "destinationrules", NS, "checkout") or {}
                    ),
                    "spec": {"host": "checkout", "subsets": [{"name": "stable"}]},
                },
            ),
            "DestinationRule checkout has no subset 'canary' (subsets: stable)",
        ),
        (
            lambda s: s.delete_raw("apps", "v1", "deployments", NS, "checkout-canary"),
            "Deployment shop/checkout-canary not found",
        ),
    ],
    ids=["virtual-service", "route", "subset", "deployment"],
)
def test_missing_objects_are_reported_and_no_traffic_moves(
    cluster: KubeApiServer, break_it: Callable[[KubeApiServer], object], expected: str
) -> None:
    break_it(cluster)
    before = cluster.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")

    async def scenario() -> Obj:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            obj = await h.until(
                lambda o: any(
                    c.get("status") == "False"
                    for c in (o.get("status") or {}).get("conditions", [])
                )
            )
            await asyncio.sleep(1.5)  # a few more rounds: still nothing may move
            assert h.daemon.stats["failures"] == 0
            return obj

    obj = asyncio.run(scenario())
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert expected in ready["message"]
    assert obj["status"].get("phase", "Idle") == "Idle"
    assert obj["status"]["message"].startswith("cannot act: ")
    after = cluster.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
    assert after == before  # not one weight changed


def test_promote_wait_exits_0_when_promoted_and_1_when_rolled_back(
    cluster: KubeApiServer, kubeconfig: Any
) -> None:
    import io

    from canaryd.cli import main

    def promote(revision: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        argv = ["promote", "checkout", "--kubeconfig", str(kubeconfig), "--revision", revision,
                "--wait", "--timeout", "60s", "--poll", "0.2s"]  # fmt: skip
        return main(argv, out, err), out.getvalue() + err.getvalue()

    async def scenario(name: str, revision: str) -> tuple[int, str]:
        async with Harness(cluster, get_scenario(name)):
            return await asyncio.to_thread(promote, revision)

    code, text = asyncio.run(scenario("healthy", "v2"))
    assert code == 0, text
    assert "promoted: revision v2" in text
    assert "Progressing" in text  # progress was streamed
    code, text = asyncio.run(scenario("error-spike", "v3"))
    assert code == 1, text
    assert "rolled back: errors: canary" in text and "rolled back: rolled back" not in text


def test_a_409_storm_does_not_lose_a_command(cluster: KubeApiServer) -> None:
    async def scenario() -> Obj:
        async with Harness(cluster, get_scenario("healthy")) as h:
            cluster.inject(path_contains="/canaries/checkout/status", status=409, times=12)
            cluster.inject(verb="patch", path_contains="/canaries/checkout", status=409, times=3)
            command = await h.command(CommandKind.PROMOTE, revision="v2")
            obj = await h.until(
                lambda o: command.id in (o.get("status") or {}).get("acknowledged", [])
            )
            assert h.daemon.stats["conflicts"] >= 1
            return obj

    obj = asyncio.run(scenario())
    assert obj["status"]["revision"] == "v2"
    assert obj["status"]["phase"] in ("Progressing", "Holding", "Promoting", "Succeeded")


def test_two_daemons_never_both_write_and_the_standby_takes_over(cluster: KubeApiServer) -> None:
    def lease(identity: str) -> LeaseSettings:
        return LeaseSettings(
            namespace=NS, name="canaryd-leader", identity=identity,
            lease_duration_s=3.0, renew_s=1.0, retry_s=0.3,
        )  # fmt: skip

    async def scenario() -> tuple[int, int, int]:
        first = Harness(cluster, get_scenario("healthy"), lease=lease("a"))
        second = Harness(cluster, get_scenario("healthy"), lease=lease("b"))
        await second.__aenter__()
        try:
            await first.__aenter__()
            await first.command(CommandKind.PROMOTE, revision="v2")
            await first.until(lambda o: phase(o) == "Progressing")
            await asyncio.sleep(3)
            writers = [h for h in (first, second) if h.daemon.stats["writes"]]
            assert len(writers) == 1, [h.daemon.stats for h in (first, second)]
            leader = writers[0]
            standby = second if leader is first else first
            # the leader dies without releasing the Lease (no clean shutdown)
            assert leader.task is not None
            leader.task.cancel()
            await asyncio.gather(leader.task, return_exceptions=True)
            loop = asyncio.get_running_loop()
            died = loop.time()
            before = standby.daemon.stats["writes"]
            while standby.daemon.stats["writes"] == before:
                assert loop.time() - died < 6.0, "the standby did not take over"
                await asyncio.sleep(0.1)
            took_over_ms = int(1000 * (loop.time() - died))
            return leader.daemon.stats["writes"], before, took_over_ms
        finally:
            await first.__aexit__()
            await second.__aexit__()

    leader_writes, standby_writes_before, took_over_ms = asyncio.run(scenario())
    assert leader_writes > 0
    assert standby_writes_before == 0
    assert took_over_ms <= 3000 + 1000  # within one lease duration (+ one retry and a round)
    lease_obj = cluster.get("coordination.k8s.io", "v1", "leases", NS, "canaryd-leader")
    assert lease_obj is not None and lease_obj["spec"]["leaseTransitions"] >= 1


def test_a_killed_daemon_resumes_the_same_step_at_the_same_weight(
    cluster: KubeApiServer, kubeconfig: Any
) -> None:
    import signal
    import subprocess
    import sys
    import time

    from kubernetes import client as k8s

    api = cluster.api_client()
    k8s.CustomObjectsApi(api).patch_namespaced_custom_object(
        "canaryd.io", "v1alpha1", NS, "canaries", "checkout",
        {"spec": {"analysis": {"earlyPassRatio": None, "stepDuration": "4s"}}},
    )  # fmt: skip
    api.close()
    argv = [sys.executable, "-m", "canaryd", "run", "--kubeconfig", str(kubeconfig),
            "--simulate", "healthy", "--simulate-speed", "60", "--no-leader-elect",
            "--resync", "1s", "--watch-timeout", "1s", "--status-refresh", "0",
            "--listen", "127.0.0.1:0"]  # fmt: skip

    def wait(predicate: Callable[[Obj], bool], timeout_s: float = 30.0) -> Obj:
        return wait_for_canary(cluster, predicate, timeout_s)

    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        api = cluster.api_client()
        asyncio.run(
            Kube(api).add_command(REF, Command(id="p1", kind=CommandKind.PROMOTE, revision="v2"))
        )
        api.close()
        mid = wait(lambda o: (o.get("status") or {}).get("stepIndex") == 1)
        time.sleep(1.2)  # mid-step: some evaluations of the 50% step are done
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        assert first.stderr is not None
        first.stderr.close()
    killed = canary_obj(cluster)["status"]
    assert killed["stepIndex"] == 1 and killed["canaryWeight"] == 50
    assert canary_weight(cluster) == 50
    second = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        resumed = wait(lambda o: o["status"]["lastVerdict"]["at"] != killed["lastVerdict"]["at"])
        assert resumed["status"]["stepIndex"] == 1
        assert resumed["status"]["canaryWeight"] == 50
        # The simulated metrics live in the daemon process, so the restarted one sees
        # fresh (lower) counters: a counter reset, which restarts the step's window
        # (carrying its evidence) rather than misjudging.  Same step, same weight.
        if resumed["status"]["stepStartedAt"] != killed["stepStartedAt"]:
            assert resumed["status"]["stepStartedAt"] > killed["stepStartedAt"]
            assert "errors" in resumed["status"].get("windowCarry", {})
        assert len(resumed["status"]["history"]) == len(killed["history"])  # no repeated step
        assert resumed["status"]["history"][-1]["startedAt"] == killed["history"][-1]["startedAt"]
        assert canary_weight(cluster) == 50  # never moved backwards
        done = wait(lambda o: o["status"]["phase"] == "Succeeded", timeout_s=40)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0  # SIGTERM drains cleanly
    assert [s["weight"] for s in done["status"]["history"]] == [10, 50, 100]
    assert mid["status"]["stepIndex"] == 1


def _patch_canary_spec(server: KubeApiServer, patch: Obj) -> None:
    from kubernetes import client as k8s

    api = server.api_client()
    try:
        k8s.CustomObjectsApi(api).patch_namespaced_custom_object(
            "canaryd.io", "v1alpha1", NS, "canaries", "checkout", {"spec": patch}
        )
    finally:
        api.close()


def test_trigger_auto_starts_a_rollout_when_the_canary_template_changes(
    cluster: KubeApiServer,
) -> None:
    from kubernetes import client as k8s

    _patch_canary_spec(cluster, {"trigger": "auto"})
    # the canary runs what stable runs: nothing to roll out
    api = cluster.api_client()
    apps = k8s.AppsV1Api(api)
    image = {
        "spec": {
            "template": {"spec": {"containers": [{"name": "app", "image": "shop/checkout:1"}]}}
        }
    }
    apps.patch_namespaced_deployment("checkout-canary", NS, image)

    async def scenario() -> Obj:
        # a 30 s resync: only the Deployment watch can start the rollout within a second
        async with Harness(cluster, get_scenario("healthy"), resync_s=30.0) as h:
            await asyncio.sleep(2.5)
            assert phase(canary_obj(cluster)) in ("", "Idle")
            image["spec"]["template"]["spec"]["containers"][0]["image"] = "shop/checkout:3"
            await asyncio.to_thread(apps.patch_namespaced_deployment, "checkout-canary", NS, image)
            await h.until(lambda o: phase(o) == "Progressing", timeout_s=1.0)
            done = await h.until(lambda o: phase(o) == "Succeeded")
            await asyncio.sleep(2.5)  # the promoted template must not start another rollout
            return done

    try:
        done = asyncio.run(scenario())
    finally:
        api.close()
    after = canary_obj(cluster)["status"]
    assert done["status"]["revision"].startswith("auto-")
    assert after["revision"] == done["status"]["revision"]
    assert after["phase"] == "Succeeded"
    assert len(after["history"]) == 3
    stable = cluster.get("apps", "v1", "deployments", NS, "checkout")
    assert stable is not None
    assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/checkout:3"


def test_weights_only_promotion_moves_traffic_and_leaves_workloads_alone(
    cluster: KubeApiServer,
) -> None:
    _patch_canary_spec(cluster, {"promotion": {"mode": "weights-only"}})

    async def scenario() -> Obj:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            return await h.until(lambda o: phase(o) == "Succeeded")

    asyncio.run(scenario())
    assert canary_weight(cluster) == 100
    stable = cluster.get("apps", "v1", "deployments", NS, "checkout")
    canary = cluster.get("apps", "v1", "deployments", NS, "checkout-canary")
    assert stable is not None and canary is not None
    assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/checkout:1"
    assert canary["spec"]["replicas"] == 1


def test_its_own_status_writes_do_not_make_a_worker_spin(cluster: KubeApiServer) -> None:
    """A worker wakes early on commands or spec changes, not on the writes it makes."""
    _patch_canary_spec(cluster, {"analysis": {"interval": "2s", "stepDuration": "60s"}})

    async def scenario() -> int:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            await h.until(lambda o: phase(o) == "Progressing")
            start = h.daemon.stats["reconciles"]
            await asyncio.sleep(5)
            return h.daemon.stats["reconciles"] - start

    rounds = asyncio.run(scenario())
    assert rounds <= 5, rounds  # ~3 at one every 2 s; a self-waking worker does hundreds


def test_the_next_rollout_scales_a_scaled_down_canary_back_up_before_routing_to_it(
    cluster: KubeApiServer,
) -> None:
    async def rollback() -> None:
        async with Harness(cluster, get_scenario("error-spike")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            await h.until(lambda o: phase(o) == "RolledBack")

    asyncio.run(rollback())
    canary = cluster.get("apps", "v1", "deployments", NS, "checkout-canary")
    assert canary is not None and canary["spec"]["replicas"] == 0
    assert canary["metadata"]["annotations"]["canaryd.io/replicas-before-scale-down"] == "1"

    async def next_rollout() -> Obj:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v3")
            return await h.until(
                lambda o: phase(o) == "Progressing" and o["status"]["revision"] == "v3"
            )

    obj = asyncio.run(next_rollout())
    canary = cluster.get("apps", "v1", "deployments", NS, "checkout-canary")
    assert canary is not None and canary["spec"]["replicas"] == 1
    assert obj["status"]["canaryWeight"] == 10
    assert canary_weight(cluster) == 10
    events = cluster.list_objects("", "v1", "events", NS)
    waited = [e["message"] for e in events if e["reason"] == "CanaryNotReady"]
    assert waited == ["scaling Deployment checkout-canary back up to 1 before routing to it"]


@pytest.mark.parametrize("refresh_s", [0.0, 30.0])
def test_unchanged_verdicts_refresh_status_at_most_every_status_refresh(
    cluster: KubeApiServer, refresh_s: float
) -> None:
    """Rounds that only refresh the numbers of a "continue" verdict write status at most
    every ``status_refresh_s``; a decision is written at once, whatever the refresh."""
    api = cluster.api_client()
    from kubernetes import client as k8s

    k8s.CustomObjectsApi(api).patch_namespaced_custom_object(
        "canaryd.io", "v1alpha1", NS, "canaries", "checkout",
        {"spec": {"analysis": {"earlyPassRatio": None, "stepDuration": "60s",
                               "minStepDuration": "30s"}}},
    )  # fmt: skip
    api.close()

    async def scenario() -> tuple[int, int, Obj]:
        async with Harness(cluster, get_scenario("healthy"), status_refresh_s=refresh_s) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            await h.until(lambda o: ((o.get("status") or {}).get("lastVerdict") or {})
                          .get("decision") == "continue")  # fmt: skip
            before = h.daemon.stats["writes"]
            await asyncio.sleep(5.0)  # five 1-second rounds of "continue"
            during = h.daemon.stats["writes"] - before
            reconciles = h.daemon.stats["reconciles"]
            await h.command(CommandKind.ABORT)
            obj = await h.until(lambda o: phase(o) == "RolledBack", timeout_s=5)
            return during, reconciles, obj

    during, reconciles, obj = asyncio.run(scenario())
    assert reconciles >= 5
    if refresh_s:
        assert during == 0, "unchanged verdicts were written before the refresh was due"
    else:
        assert during >= 4, "with no refresh interval, every round is written"
    assert obj["status"]["canaryWeight"] == 0  # the abort was written and acted on at once


@contextlib.asynccontextmanager
async def by_hand(cluster: KubeApiServer) -> AsyncIterator[Harness]:
    """A harness whose daemon's watch events the test delivers itself, in the order it wants, and
    whose reconciles it runs itself: no watch runs, and a placeholder worker keeps the
    events from starting a reconciling one.  Every round writes (refresh 0)."""

    async def idle() -> None:
        await asyncio.Event().wait()

    h = Harness(cluster, get_scenario("healthy"), status_refresh_s=0.0)
    placeholder = asyncio.create_task(idle(), name="idle")
    h.daemon._track(REF).worker = _Worker(placeholder)
    try:
        yield h
    finally:
        placeholder.cancel()
        h.api.close()


def test_a_lagging_watch_does_not_turn_the_daemons_own_writes_into_conflicts(
    cluster: KubeApiServer,
) -> None:
    """A watch that lags (thousands of Canaries at start-up) delivers events older than
    the daemon's own last write: they must not replace it in the cache, or every next
    write is a 409; events after its write came back are believed again."""

    async def scenario() -> None:
        async with by_hand(cluster) as h:
            daemon = h.daemon
            await h.command(CommandKind.PROMOTE, revision="v2")
            late = canary_obj(cluster)  # the promote as written: the watch is late with it
            first = await daemon.reconcile(REF)
            assert first is not None and first.status.phase == "Progressing"
            daemon._on_watch_event("MODIFIED", copy.deepcopy(late))  # older than our write
            second = await daemon.reconcile(REF)
            assert second is not None and second.resource_version != first.resource_version
            assert daemon.stats["conflicts"] == 0
            # our first write comes back (old too: the second came later) ...
            daemon._on_watch_event("MODIFIED", copy.deepcopy(first.raw))
            assert tracked_raw(daemon)["metadata"]["resourceVersion"] == second.resource_version
            # ... then our second: from here on, what the watch brings is news
            daemon._on_watch_event("MODIFIED", copy.deepcopy(canary_obj(cluster)))
            await h.command(CommandKind.ABORT)
            daemon.workers[REF].wake.clear()
            daemon._on_watch_event("MODIFIED", copy.deepcopy(canary_obj(cluster)))
            assert daemon.workers[REF].wake.is_set()
            third = await daemon.reconcile(REF)
            assert third is not None and third.status.phase == "RolledBack"
            assert daemon.stats["conflicts"] == 0

    asyncio.run(scenario())


def test_a_fresh_watch_list_is_believed_over_a_write_it_never_delivers(
    cluster: KubeApiServer,
) -> None:
    """After a watch restarts from a fresh list (its history expired), our last write may
    never come back as itself: the list's objects are current and replace it."""

    async def scenario() -> None:
        async with by_hand(cluster) as h:
            daemon = h.daemon
            await h.command(CommandKind.PROMOTE, revision="v2")
            assert await daemon.reconcile(REF) is not None
            # someone else's write after ours; the watch restarts past both
            await h.command(CommandKind.ABORT)
            current = canary_obj(cluster)
            daemon._on_watch_event("RESYNC", {})
            daemon._on_watch_event("ADDED", copy.deepcopy(current))
            rv = tracked_raw(daemon)["metadata"]["resourceVersion"]
            assert rv == current["metadata"]["resourceVersion"]
            done = await daemon.reconcile(REF)
            assert done is not None and done.status.phase == "RolledBack"
            assert daemon.stats["conflicts"] == 0

    asyncio.run(scenario())


def test_a_parsed_canary_is_cached_as_its_metadata_and_never_read_again(
    cluster: KubeApiServer,
) -> None:
    """Once parsed, a Canary is kept as its parsed form plus its metadata (the whole
    raw object is ~40 KB of Python objects): the next round neither GETs nor parses it,
    and a change by someone else (a full object from the watch) is parsed once, on
    arrival, and shared by the cache and the hub."""

    def reads() -> int:
        return sum(
            1
            for r in cluster.requests
            if r.method == "GET" and r.path.endswith("/canaries/checkout")
        )

    async def scenario() -> None:
        async with by_hand(cluster) as h:
            daemon = h.daemon
            await h.command(CommandKind.PROMOTE, revision="v2")
            done = await daemon.reconcile(REF)  # no cache yet: one GET
            assert done is not None and "status" in done.raw  # callers get it whole
            daemon._on_watch_event("MODIFIED", copy.deepcopy(canary_obj(cluster)))
            assert set(tracked_raw(daemon)) == {"metadata"}  # even the watch's own copy
            before = reads()
            again = await daemon.reconcile(REF)
            assert again is not None and again.status.phase == "Progressing"
            assert reads() == before
            daemon._on_watch_event("MODIFIED", copy.deepcopy(again.raw))  # its write is back
            await h.command(CommandKind.ABORT)
            news = copy.deepcopy(canary_obj(cluster))
            daemon._on_watch_event("MODIFIED", news)
            # news: parsed at once, kept (and shown) without its raw body
            assert set(tracked_raw(daemon)) == {"metadata"}
            tracked = daemon.canaries[REF]
            assert tracked.parsed is not None and tracked.parsed.commands
            assert tracked.parsed.resource_version == news["metadata"]["resourceVersion"]
            shown = daemon.hub.get(REF)
            assert shown is tracked.parsed and set(shown.raw) == {"metadata"}
            before = reads()  # (adding the command read the Canary)
            aborted = await daemon.reconcile(REF)
            assert aborted is not None and aborted.status.phase == "RolledBack"
            assert reads() == before and daemon.stats["conflicts"] == 0

    asyncio.run(scenario())


def test_a_silently_stalled_watch_hides_a_command_for_one_resync_at_most(
    cluster: KubeApiServer,
) -> None:
    """The watch stays open and says nothing; the periodic list (every second here)
    must bring the promote to the worker, not the next working watch a minute later."""

    async def scenario() -> float:
        async with Harness(cluster, get_scenario("healthy")) as h:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while tracked_raw(h.daemon, missing_ok=True) is None and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert tracked_raw(h.daemon, missing_ok=True) is not None
            cluster.watches_stalled.set()
            try:
                await asyncio.sleep(1.5)  # the watch in flight is stalled too
                await h.command(CommandKind.PROMOTE, revision="v2")
                written = loop.time()
                await h.until(lambda obj: phase(obj) == "Progressing", timeout_s=8.0)
                return loop.time() - written
            finally:
                cluster.watches_stalled.clear()

    noticed_s = asyncio.run(scenario())
    assert noticed_s < 4.0  # resync 1 s, plus the round's own reads and writes


def test_an_idle_canary_says_whether_it_could_roll_out_before_anyone_promotes(
    cluster: KubeApiServer,
) -> None:
    """A misnamed Deployment shows as Ready=False on the idle Canary; once it exists,
    Ready=True, still without a promote; nothing is scaled or routed meanwhile."""
    canary_deployment = cluster.get("apps", "v1", "deployments", NS, "checkout-canary")
    assert canary_deployment is not None
    cluster.delete_raw("apps", "v1", "deployments", NS, "checkout-canary")
    before = vs(cluster)

    def ready(obj: Obj) -> dict[str, Any] | None:
        conditions = (obj.get("status") or {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "Ready"), None)

    async def scenario() -> tuple[Obj, Obj]:
        async with Harness(cluster, get_scenario("healthy")) as h:
            broken = await h.until(lambda o: (ready(o) or {}).get("status") == "False", 10.0)
            cluster.put_raw("apps", "v1", "deployments", copy.deepcopy(canary_deployment))
            fixed = await h.until(lambda o: (ready(o) or {}).get("status") == "True", 10.0)
            return broken, fixed

    broken, fixed = asyncio.run(scenario())
    condition = ready(broken)
    assert condition is not None and condition["reason"] == "WorkloadNotReady"
    assert "Deployment shop/checkout-canary not found" in condition["message"]
    assert broken["status"]["message"].startswith("cannot act: ")
    assert phase(fixed) in ("", "Idle") and not fixed["status"].get("message")
    assert vs(cluster) == before
    events = cluster.list_objects("", "v1", "events", NS)
    assert "WorkloadNotReady" in {e["reason"] for e in events}


@pytest.mark.parametrize("status_code", [500, 409])
def test_a_rollback_whose_weight_write_fails_never_scales_the_canary_below_its_traffic(
    cluster: KubeApiServer, status_code: int
) -> None:
    """The VirtualService write fails (500s, or a 409 storm) as the rollback begins:
    the canary keeps its pods while any route still sends it users, and the rollback
    completes once the API recovers (weights 0 first, then the scale-down)."""
    violations: list[str] = []
    reasons: set[str] = set()

    def replicas() -> int:
        obj = cluster.get("apps", "v1", "deployments", NS, "checkout-canary")
        assert obj is not None
        return int(obj["spec"].get("replicas", 1))

    async def watch_invariant(stop: asyncio.Event) -> None:
        while not stop.is_set():
            weight, count = canary_weight(cluster), replicas()
            if weight > 0 and count == 0:
                violations.append(f"{weight}% routed to a canary with 0 replicas")
            for c in (canary_obj(cluster).get("status") or {}).get("conditions", []):
                if c["type"] == "TrafficVerified" and c["status"] == "False":
                    reasons.add(c["reason"])
            await asyncio.sleep(0.02)

    async def scenario() -> Obj:
        async with Harness(cluster, get_scenario("healthy")) as h:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_invariant(stop))
            try:
                await h.command(CommandKind.PROMOTE, revision="v2")
                await h.until(lambda o: phase(o) == "Progressing" and canary_weight(cluster) == 10)
                cluster.inject(
                    verb="update", path_contains="/virtualservices/checkout",
                    status=status_code, times=3 if status_code == 500 else 12,
                )  # fmt: skip
                await h.command(CommandKind.ABORT)
                await h.until(lambda o: phase(o) == "RolledBack", 20.0)
                return await h.until(
                    lambda o: (
                        canary_weight(cluster) == 0
                        and replicas() == 0
                        and (o.get("status") or {}).get("trafficVerified") is True
                    ),
                    30.0,
                )
            finally:
                stop.set()
                await watcher

    obj = asyncio.run(scenario())
    assert violations == []
    assert "WeightsNotSet" in reasons  # the failure showed as a condition meanwhile
    verified = next(c for c in obj["status"]["conditions"] if c["type"] == "TrafficVerified")
    assert verified["status"] == "True"


def test_a_rollout_reads_the_virtual_service_at_most_twice_per_weight_change(
    cluster: KubeApiServer,
) -> None:
    """One road: per change of phase or weight, the preflight check and the Converger
    read the VirtualService once each; the write verifies from its answer."""
    import dataclasses

    from canaryd.istio import IstioRouter

    counts = {"read": 0, "write": 0}

    async def scenario() -> Obj:
        h = Harness(cluster, get_scenario("healthy"))
        h.daemon.settings = dataclasses.replace(h.daemon.settings, resync_s=120.0)
        h.metrics.router = IstioRouter(h.kube)  # the simulated mesh's reads are not ours
        router = h.router.istio
        real_get, real_call = router.get, router.kube.call

        async def get(namespace: str, name: str) -> dict[str, Any]:
            counts["read"] += 1
            return await real_get(namespace, name)

        async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(fn, "__name__", "") == "replace_namespaced_custom_object":
                counts["write"] += "virtualservices" in args
            return await real_call(fn, *args, **kwargs)

        router.get = get  # type: ignore[method-assign]
        router.kube = copy.copy(router.kube)
        router.kube.call = call  # type: ignore[method-assign]
        async with h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            return await h.until(lambda o: phase(o) == "Succeeded")

    obj = asyncio.run(scenario())
    assert [s["weight"] for s in obj["status"]["history"]] == [10, 50, 100]
    # 10, 50, 100, Promoting at 100, Succeeded at 0: five changes, four weight writes
    assert counts["write"] == 4, counts
    assert counts["read"] <= 2 * 5, counts


def test_a_canary_deleted_mid_rollout_sends_all_traffic_back_to_stable_first(
    cluster: KubeApiServer,
) -> None:
    from kubernetes import client as k8s

    async def scenario() -> None:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            obj = await h.until(lambda o: phase(o) == "Progressing" and canary_weight(cluster) > 0)
            assert "canaryd.io/restore-traffic" in obj["metadata"]["finalizers"]
            await asyncio.to_thread(
                k8s.CustomObjectsApi(h.api).delete_namespaced_custom_object,
                "canaryd.io", "v1alpha1", NS, "canaries", "checkout",
            )  # fmt: skip
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while cluster.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout") is not None:
                assert loop.time() < deadline, "the Canary was never let go"
                await asyncio.sleep(0.05)
            while REF in h.daemon.canaries:  # its one record goes with it, all of it
                assert loop.time() < deadline, "the daemon still keeps state for it"
                await asyncio.sleep(0.05)
            assert REF not in h.daemon.workers

    asyncio.run(scenario())
    assert canary_weight(cluster) == 0
    canary = cluster.get("apps", "v1", "deployments", NS, "checkout-canary")
    assert canary is not None and canary["spec"]["replicas"] == 0
    reasons = {e["reason"] for e in cluster.list_objects("", "v1", "events", NS)}
    assert "TrafficRestored" in reasons


def test_a_deletion_is_never_wedged_by_a_missing_virtual_service(cluster: KubeApiServer) -> None:
    import dataclasses

    from kubernetes import client as k8s

    async def scenario() -> float:
        h = Harness(cluster, get_scenario("healthy"))
        h.daemon.settings = dataclasses.replace(h.daemon.settings, finalize_timeout_s=2.0)
        async with h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            await h.until(lambda o: phase(o) == "Progressing" and canary_weight(cluster) > 0)
            cluster.delete_raw("networking.istio.io", "v1", "virtualservices", NS, "checkout")
            await asyncio.to_thread(
                k8s.CustomObjectsApi(h.api).delete_namespaced_custom_object,
                "canaryd.io", "v1alpha1", NS, "canaries", "checkout",
            )  # fmt: skip
            loop = asyncio.get_running_loop()
            started = loop.time()
            while cluster.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout") is not None:
                assert loop.time() - started < 15, "the deletion hung"
                await asyncio.sleep(0.05)
            return loop.time() - started

    took_s = asyncio.run(scenario())
    # it tried for the timeout first (deletionTimestamp has whole seconds, as the real
    # API server's: the 2 s are counted from up to 1 s before the deletion)
    assert took_s >= 0.95
    reasons = {e["reason"] for e in cluster.list_objects("", "v1", "events", NS)}
    assert "FinalizerTimeout" in reasons


def test_commands_leave_the_annotation_once_acknowledged_and_never_apply_twice(
    cluster: KubeApiServer,
) -> None:
    """The first removal fails (as if the daemon crashed between acknowledging in status
    and pruning the annotation): the command stays, acknowledged, and is not applied
    again; the next round removes it."""

    def annotation() -> str | None:
        return (canary_obj(cluster)["metadata"].get("annotations") or {}).get("canaryd.io/commands")

    async def scenario() -> None:
        async with by_hand(cluster) as h:
            daemon = h.daemon
            assert await daemon.reconcile(REF) is not None  # idle: adds the finalizer
            forget_cached(daemon)
            command = await h.command(CommandKind.PROMOTE, revision="v2")
            cluster.inject(verb="patch", path_contains="/canaries/checkout", status=500, times=1)
            first = await daemon.reconcile(REF)
            assert first is not None and command.id in first.status.acknowledged
            forget_cached(daemon)
            assert annotation() is not None and command.id in (annotation() or "")
            forget_cached(daemon)
            second = await daemon.reconcile(REF)
            assert second is not None and second.status.step_index == 0
            assert annotation() is None

    asyncio.run(scenario())
    started = [
        e for e in cluster.list_objects("", "v1", "events", NS) if e["reason"] == "RolloutStarted"
    ]
    assert len(started) == 1  # applied once


def set_canary_weight_by_hand(server: KubeApiServer, canary_pct: int) -> None:
    """What a person with kubectl does: edit the route's weights behind canaryd's back."""
    obj = vs(server)
    for dest in obj["spec"]["http"][0]["route"]:
        sub = dest["destination"]["subset"]
        dest["weight"] = canary_pct if sub == "canary" else 100 - canary_pct
    server.put_raw("networking.istio.io", "v1", "virtualservices", obj)


def with_spec(server: KubeApiServer, **routing: Any) -> None:
    """The cluster's Canary with long steps (a step never ends during the test) and
    ``trafficRouting`` fields added."""
    obj = canary_obj(server)
    obj["spec"]["analysis"]["stepDuration"] = "10m"
    obj["spec"]["trafficRouting"] |= routing
    server.put_raw("canaryd.io", "v1alpha1", "canaries", obj)


def condition(obj: Obj, type_: str) -> Obj:
    found = [c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_]
    return found[0] if found else {}


def drift_events(server: KubeApiServer) -> list[str]:
    events = server.list_objects("", "v1", "events", NS)
    return [str(e["message"]) for e in events if e["reason"] == "TrafficDrift"]


def test_weights_changed_by_someone_else_hold_the_rollout_and_are_left_alone(
    cluster: KubeApiServer,
) -> None:
    """onDrift: hold (the default): a hand edit of the routes is reported with both
    values (condition and Event), the rollout holds and canaryd does not overwrite it;
    once the routes read canaryd's weight again the step resumes on a fresh window."""

    async def scenario() -> tuple[Obj, Obj, int, Obj]:
        with_spec(cluster)
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            await h.until(lambda o: (o.get("status") or {}).get("verifiedCanaryPct") == 10)
            set_canary_weight_by_hand(cluster, 30)
            held = await h.until(
                lambda o: phase(o) == "Holding" and condition(o, "TrafficDrift") != {}
            )
            await asyncio.sleep(3.0)  # three resyncs and rounds: still the person's weights
            later = canary_obj(cluster)
            weight_later = canary_weight(cluster)
            set_canary_weight_by_hand(cluster, 10)
            resumed = await h.until(
                lambda o: (
                    phase(o) == "Progressing"
                    and condition(o, "TrafficDrift").get("status") == "False"
                )
            )
            await h.command(CommandKind.ABORT)
            await h.until(lambda o: phase(o) == "RolledBack")
            return held, later, weight_later, resumed

    held, later, weight_later, resumed = asyncio.run(scenario())
    drift = condition(held, "TrafficDrift")
    assert drift["status"] == "True" and drift["reason"] == "RoutesChanged"
    assert "30%" in drift["message"] and "10%" in drift["message"]
    assert "traffic drift" in held["status"]["message"]
    assert condition(held, "TrafficVerified")["status"] == "False"
    assert weight_later == 30, "canaryd overwrote a person's weights under onDrift: hold"
    assert phase(later) == "Holding" and later["status"]["stepIndex"] == 0
    assert condition(resumed, "TrafficDrift")["reason"] == "RoutesMatch"
    assert "window restarts" in resumed["status"]["message"]
    messages = drift_events(cluster)
    assert any("30%" in m and "10%" in m for m in messages), messages
    assert len([m for m in messages if "30%" in m]) == 1, "one Event per drift, not per round"


def test_on_drift_reassert_rewrites_during_a_rollout_but_a_finished_one_never_does(
    cluster: KubeApiServer,
) -> None:
    """onDrift: reassert puts canaryd's weight back while a rollout is under way (with an
    Event naming both values); after the rollout has ended its weights are never
    rewritten, only reported."""

    async def scenario() -> tuple[int, int, Obj]:
        with_spec(cluster, onDrift="reassert")
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            await h.until(lambda o: (o.get("status") or {}).get("verifiedCanaryPct") == 10)
            set_canary_weight_by_hand(cluster, 30)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while canary_weight(cluster) != 10 and loop.time() < deadline:
                await asyncio.sleep(0.1)
            reasserted = canary_weight(cluster)
            await h.command(CommandKind.ABORT)
            await h.until(
                lambda o: (
                    phase(o) == "RolledBack"
                    and (o.get("status") or {}).get("verifiedCanaryPct") == 0
                )
            )
            set_canary_weight_by_hand(cluster, 20)
            ended = await h.until(
                lambda o: condition(o, "TrafficDrift").get("status") == "True", timeout_s=10
            )
            await asyncio.sleep(3.0)
            return reasserted, canary_weight(cluster), ended

    reasserted, after_end, ended = asyncio.run(scenario())
    assert reasserted == 10
    messages = drift_events(cluster)
    assert any("30%" in m and "reasserted" in m for m in messages), messages
    assert after_end == 20, "a finished rollout rewrote the weights it had written"
    assert "20%" in condition(ended, "TrafficDrift")["message"]
    assert phase(ended) == "RolledBack"


def set_canary_image(server: KubeApiServer, image: str) -> None:
    from kubernetes import client as k8s

    api = server.api_client()
    try:
        k8s.AppsV1Api(api).patch_namespaced_deployment(
            "checkout-canary",
            NS,
            {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}},
        )
    finally:
        api.close()


def test_a_template_changed_mid_rollout_restarts_it_and_stable_gets_the_analysed_one(
    cluster: KubeApiServer,
) -> None:
    """trigger: manual: the canary Deployment's image changes at 50%; the rollout starts
    again from 10% for the new template (an Event says why), and the template promoted
    is the one analysed from the first step."""

    async def scenario() -> tuple[Obj, Obj]:
        async with Harness(cluster, get_scenario("healthy")) as h:
            await h.command(CommandKind.PROMOTE, revision="v2")
            before = await h.until(lambda o: (o.get("status") or {}).get("canaryWeight") == 50)
            await asyncio.to_thread(set_canary_image, cluster, "shop/checkout:4")
            done = await h.until(lambda o: phase(o) == "Succeeded", timeout_s=60)
            return before, done

    before, done = asyncio.run(scenario())
    first, last = before["status"]["templateHash"], done["status"]["templateHash"]
    assert first and last and first != last
    assert done["status"]["revision"] == "v2"
    assert [s["weight"] for s in done["status"]["history"]] == [10, 50, 100]  # all anew
    events = cluster.list_objects("", "v1", "events", NS)
    restarted = [str(e["message"]) for e in events if e["reason"] == "RolloutRestarted"]
    assert len(restarted) == 1 and f"{first} → {last}" in restarted[0]
    stable = cluster.get("apps", "v1", "deployments", NS, "checkout")
    assert stable is not None
    assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "shop/checkout:4"


def test_promotion_refuses_a_template_other_than_the_analysed_one(cluster: KubeApiServer) -> None:
    from canaryd.ports import WorkloadError
    from canaryd.spec import parse_spec

    obj = canary_obj(cluster)
    spec = parse_spec(obj["spec"])

    async def scenario() -> tuple[str, str]:
        api = cluster.api_client()
        try:
            workloads = Deployments(Kube(api, timeout_s=5.0))
            analysed = await workloads.template_hash(REF, spec)
            await asyncio.to_thread(set_canary_image, cluster, "shop/checkout:5")
            with pytest.raises(WorkloadError, match=r"not the .* that was analysed"):
                await workloads.promote_stable(REF, spec, "v2", analysed)
            return analysed, await workloads.template_hash(REF, spec)
        finally:
            api.close()

    analysed, now = asyncio.run(scenario())
    assert analysed != now
    stable = cluster.get("apps", "v1", "deployments", NS, "checkout")
    assert stable is not None
    assert stable["spec"]["template"]["spec"]["containers"][0]["image"] != "shop/checkout:5"
