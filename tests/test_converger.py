"""The Converger: pods before traffic, weights verified on every route, scale-down last.

A property test drives it over in-memory ports whose every call may fail, at random
points of the sequence, and checks after every call that users are never routed to a
canary with no pods, and that the status is reached once the failures stop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from canaryd.converger import Converger, Stage
from canaryd.ports import CanaryRef, KubeError, RoutingError
from canaryd.spec import CanarySpec, parse_spec
from canaryd.status import CanaryStatus, Phase

REF = CanaryRef("shop", "checkout")
SPEC = parse_spec(
    {
        "service": "checkout",
        "stable": {"deployment": "checkout"},
        "canary": {"deployment": "checkout-canary"},
        "trafficRouting": {
            "istio": {"virtualService": {"name": "checkout", "routes": ["a", "b", "c"]}}
        },
    }
)


@dataclass
class World:
    """Three managed routes and a canary Deployment; ``fail`` says which calls fail."""

    routes_pct: list[int] = field(default_factory=lambda: [10, 10, 10])
    replicas: int = 2
    available: int = 2
    fail: list[bool] = field(default_factory=list)
    calls: int = 0
    #: a write that lands on only some routes before it fails (a partial write)
    partial: bool = False
    violations: list[str] = field(default_factory=list)

    def call(self, what: str) -> None:
        self.calls += 1
        if self.fail and self.fail.pop(0):
            raise KubeError(f"{what}: 500 Internal Server Error")

    def check(self) -> None:
        if any(w > 0 for w in self.routes_pct) and self.replicas == 0:
            self.violations.append(f"routes {self.routes_pct} with the canary at 0 replicas")


class Router:
    def __init__(self, world: World) -> None:
        self.world = world

    async def check(self, ref: CanaryRef, spec: CanarySpec) -> None:
        self.world.call("check")

    async def route_weights(self, ref: CanaryRef, spec: CanarySpec) -> tuple[int, ...]:
        self.world.call("read routes")
        return tuple(self.world.routes_pct)

    async def set_weights(
        self, ref: CanaryRef, spec: CanarySpec, pct: int, mirror_pct: int = 0
    ) -> tuple[int, ...]:
        if self.world.partial and pct != self.world.routes_pct[0]:
            self.world.routes_pct[0] = pct  # one route written, then the call fails
            self.world.check()
        self.world.call("write routes")
        self.world.routes_pct = [pct] * len(self.world.routes_pct)
        self.world.check()
        return tuple(self.world.routes_pct)


class Workloads:
    def __init__(self, world: World) -> None:
        self.world = world

    async def check(self, ref: CanaryRef, spec: CanarySpec) -> None:
        self.world.call("check")

    async def promote_stable(
        self, ref: CanaryRef, spec: CanarySpec, revision: str, template_hash: str | None = None
    ) -> None:
        raise AssertionError("not the Converger's")

    async def template_hash(self, ref: CanaryRef, spec: CanarySpec) -> str:
        raise AssertionError("not the Converger's")

    async def stable_revision(self, ref: CanaryRef, spec: CanarySpec) -> str | None:
        return None

    async def canary_revision(self, ref: CanaryRef, spec: CanarySpec) -> str | None:
        return None

    async def scale_canary(self, ref: CanaryRef, spec: CanarySpec, replicas: int) -> None:
        self.world.call("scale")
        self.world.replicas = replicas
        self.world.available = min(self.world.available, replicas)
        self.world.check()

    async def canary_replicas(self, ref: CanaryRef, spec: CanarySpec) -> int:
        self.world.call("read replicas")
        return self.world.replicas

    async def ensure_canary_ready(self, ref: CanaryRef, spec: CanarySpec) -> str | None:
        self.world.call("read canary")
        if self.world.replicas == 0:
            await self.scale_canary(ref, spec, 2)
            return "scaling the canary back up"
        if self.world.available == 0:
            self.world.available = self.world.replicas  # its pods become ready
            return "waiting for the canary's pods"
        return None


def status(phase: Phase, weight: int) -> CanaryStatus:
    return CanaryStatus(phase=phase, revision="v2", canary_weight=weight)


TARGETS = [
    status(Phase.ROLLED_BACK, 0),
    status(Phase.SUCCEEDED, 0),
    status(Phase.PROGRESSING, 50),
    status(Phase.PROGRESSING, 10),
    status(Phase.PROMOTING, 100),
]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    start_pct=st.sampled_from([0, 10, 50, 100]),
    start_replicas=st.sampled_from([0, 2]),
    target=st.sampled_from(TARGETS),
    fail=st.lists(st.booleans(), max_size=30),
    partial=st.booleans(),
)
def test_under_any_failures_no_route_reaches_a_canary_without_pods_and_the_status_is_reached(
    start_pct: int, start_replicas: int, target: CanaryStatus, fail: list[bool], partial: bool
) -> None:
    if start_pct > 0 and start_replicas == 0:
        start_replicas = 2  # the world starts consistent
    world = World(
        routes_pct=[start_pct] * 3, replicas=start_replicas, available=start_replicas,
        fail=list(fail), partial=partial,
    )  # fmt: skip
    converger = Converger(Router(world), Workloads(world))

    async def rounds() -> None:
        for _ in range(len(fail) + 6):  # every round retries what failed
            result = await converger.converge(REF, SPEC, target)
            if result.verified:  # never claimed without every route reading the target
                assert world.routes_pct == [target.canary_weight] * 3
            if result.ok:
                break
            assert result.problem

    asyncio.run(rounds())
    assert world.violations == []
    assert world.routes_pct == [target.canary_weight] * 3
    if target.phase in (Phase.ROLLED_BACK, Phase.SUCCEEDED):
        assert world.replicas == 0
    if target.canary_weight > 0:
        assert world.replicas > 0


def test_a_failed_weight_write_stops_before_the_scale_down() -> None:
    world = World(routes_pct=[50, 50, 50], replicas=2, available=2)
    converger = Converger(Router(world), Workloads(world))
    world.fail = [False, True]  # the read works, the write fails

    result = asyncio.run(converger.converge(REF, SPEC, status(Phase.ROLLED_BACK, 0)))
    assert result.stopped_at is Stage.WEIGHTS and not result.verified
    assert "cannot set the canary weight to 0%" in (result.problem or "")
    assert world.replicas == 2  # still serving the 50% the routes send it

    result = asyncio.run(converger.converge(REF, SPEC, status(Phase.ROLLED_BACK, 0)))
    assert result.ok and result.scaled_down and world.replicas == 0


def test_no_weight_moves_to_a_canary_that_has_no_pods_yet() -> None:
    world = World(routes_pct=[0, 0, 0], replicas=0, available=0)
    converger = Converger(Router(world), Workloads(world))
    result = asyncio.run(converger.converge(REF, SPEC, status(Phase.PROGRESSING, 10)))
    assert result.stopped_at is Stage.PODS and world.routes_pct == [0, 0, 0]
    assert world.replicas == 2
    result = asyncio.run(converger.converge(REF, SPEC, status(Phase.PROGRESSING, 10)))
    assert result.stopped_at is Stage.PODS  # scaled, pods not ready yet
    result = asyncio.run(converger.converge(REF, SPEC, status(Phase.PROGRESSING, 10)))
    assert result.ok and world.routes_pct == [10, 10, 10]


def test_weights_already_right_cost_one_read_and_no_write() -> None:
    world = World(routes_pct=[10, 10, 10])
    converger = Converger(Router(world), Workloads(world))
    result = asyncio.run(converger.converge(REF, SPEC, status(Phase.PROGRESSING, 10)))
    assert result.ok and not result.wrote_weights
    assert world.calls == 2  # the canary's readiness, the routes


def test_a_route_that_reads_another_weight_is_not_verified() -> None:
    class Stubborn(Router):
        async def set_weights(
            self, ref: CanaryRef, spec: CanarySpec, pct: int, mirror_pct: int = 0
        ) -> tuple[int, ...]:
            return (pct, pct, 30)  # a mutating webhook put route c back

    world = World(routes_pct=[30, 30, 30])
    result = asyncio.run(
        Converger(Stubborn(world), Workloads(world)).converge(
            REF, SPEC, status(Phase.ROLLED_BACK, 0)
        )
    )
    assert not result.verified and result.stopped_at is Stage.WEIGHTS
    assert "[0, 0, 30]" in (result.problem or "") and world.replicas == 2


def test_routing_errors_are_reported_not_raised() -> None:
    class Missing(Router):
        async def route_weights(self, ref: CanaryRef, spec: CanarySpec) -> tuple[int, ...]:
            raise RoutingError("VirtualService shop/checkout not found")

    world = World()
    result = asyncio.run(
        Converger(Missing(world), Workloads(world)).converge(
            REF, SPEC, status(Phase.PROGRESSING, 10)
        )
    )
    assert result.stopped_at is Stage.WEIGHTS and "not found" in (result.problem or "")
