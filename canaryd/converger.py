"""The Converger: the one road from a Canary's status to its traffic and workloads.

The state machine decides what the world should look like and writes it to status
(phase and canary weight).  The Converger makes the world match, every time it is
asked, in a fixed order that keeps users off a canary with no pods:

1. **pods before traffic**: when the status routes traffic to the canary, the canary
   Deployment has ready pods first (scaled back up if a previous rollout scaled it
   down); until it has, no weight moves;
2. **weights**: every managed route is read; if any differs, all are written, and the
   object the API server stored is read back from the write's answer and checked on
   every route (``verified``).  Routes that differ from a weight canaryd had already
   verified were changed by someone else (*drift*): they are left as they are and
   reported (``Stage.DRIFT``) unless ``trafficRouting.onDrift`` is ``reassert`` and the
   rollout is under way; a finished rollout never rewrites weights it wrote;
3. **scale down last**: a rolled-back or promoted canary is scaled to 0 only once every
   route reads 0% canary.

A failed step stops the sequence (the later ones never run on a world the earlier
one did not reach) and is reported in the result; the caller retries next round and
shows it as a condition.  Reads: one of the VirtualService per call, and none more
when the weights are already right.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from canaryd.ports import (
    CanaryRef,
    KubeError,
    RoutingError,
    TrafficRouter,
    WorkloadError,
    Workloads,
)
from canaryd.spec import CanarySpec
from canaryd.status import CanaryStatus, Phase


class Stage(StrEnum):
    """Where a convergence stopped (or ``DONE``)."""

    PODS = "pods"
    WEIGHTS = "weights"
    DRIFT = "drift"
    SCALE_DOWN = "scale-down"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Convergence:
    """What one convergence found and did.

    Attributes:
        want_pct: the canary weight the status asks for.
        route_weights_pct: the canary weight of every managed route as last read or
            written (empty when they could not be read).
        wrote_weights: whether the weights were written this time.
        verified: every managed route reads ``want_pct``.
        scaled_down: the canary was scaled to 0 this time.
        stopped_at: the stage that failed, or ``Stage.DONE``.
        problem: why it stopped (one line), or None.
        drifted_pct: what the routes read when they differed from the weight canaryd
            had verified at this same status (someone else changed them), else empty:
            left alone (``Stage.DRIFT``) or reasserted (then ``wrote_weights``).
    """

    want_pct: int
    route_weights_pct: tuple[int, ...]
    wrote_weights: bool
    verified: bool
    scaled_down: bool
    stopped_at: Stage
    problem: str | None = None
    drifted_pct: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.stopped_at is Stage.DONE

    @property
    def drift(self) -> bool:
        return bool(self.drifted_pct)


def mirror_pct(spec: CanarySpec, status: CanaryStatus) -> int:
    """The share of stable's requests the status asks to mirror to the canary: the
    current step's mirror while a rollout is under way, else none."""
    if not status.phase.active or status.phase is Phase.PROMOTING:
        return 0
    return spec.mirror_pct(status.step_index)


def wants_scaled_down(spec: CanarySpec, status: CanaryStatus) -> bool:
    """A rolled-back canary, and a promoted one whose template now runs as stable, keep
    no pods."""
    return status.phase is Phase.ROLLED_BACK or (
        status.phase is Phase.SUCCEEDED and spec.promotion.mode == "copy-to-stable"
    )


class Converger:
    """Makes the routes and the canary's replicas match a Canary's status."""

    def __init__(self, router: TrafficRouter, workloads: Workloads) -> None:
        self.router = router
        self.workloads = workloads

    async def converge(
        self, ref: CanaryRef, spec: CanarySpec, status: CanaryStatus, *, force: bool = False
    ) -> Convergence:
        """Make the world match ``status``; ``force`` writes the weights over any drift
        (a deleted Canary's traffic goes back to stable whoever moved it)."""
        want = status.canary_weight
        mirror = mirror_pct(spec, status)
        weights: tuple[int, ...] = ()

        def stop(stage: Stage, problem: str, *, wrote: bool = False) -> Convergence:
            verified = bool(weights) and all(w == want for w in weights)
            return Convergence(want, weights, wrote, verified, False, stage, problem)

        if want > 0 or mirror > 0:
            try:
                waiting = await self.workloads.ensure_canary_ready(ref, spec)
            except (WorkloadError, KubeError) as exc:
                return stop(Stage.PODS, f"cannot ready the canary: {exc}")
            if waiting is not None:
                return stop(Stage.PODS, waiting)
        try:
            weights = await self.router.route_weights(ref, spec)
        except (RoutingError, KubeError) as exc:
            return stop(Stage.WEIGHTS, f"cannot read the routes: {exc}")
        wrote = False
        drift = status.verified_canary_pct == want and any(w != want for w in weights)
        drifted = weights if drift else ()
        if drift and not force:
            routing = spec.traffic_routing
            reassert = routing is not None and routing.on_drift == "reassert"
            if status.phase.terminal or not reassert:
                return Convergence(
                    want, weights, False, False, False, Stage.DRIFT,
                    f"routes read {route_pcts(weights)} canary, not the {want}% canaryd set: "
                    f"changed by someone else; left as they are "
                    + ("(the rollout has finished)" if status.phase.terminal
                       else "(onDrift: hold)"),
                    drifted_pct=weights,
                )  # fmt: skip
        # a spec that mirrors: the router compares the mirrors too (on the copy it just
        # read: no second read) and writes only when something differs
        differ = any(w != want for w in weights)
        if differ or spec.mirrors:
            try:
                weights = await self.router.set_weights(ref, spec, want, mirror)
                wrote = differ  # (a change of mirror alone is not counted as a write)
            except (RoutingError, KubeError) as exc:
                return stop(Stage.WEIGHTS, f"cannot set the canary weight to {want}%: {exc}")
        if any(w != want for w in weights):
            return stop(
                Stage.WEIGHTS,
                f"routes read {route_pcts(weights)} canary after the write, not {want}%",
                wrote=wrote,
            )
        scaled = False
        if wants_scaled_down(spec, status):
            try:
                if await self.workloads.canary_replicas(ref, spec) != 0:
                    await self.workloads.scale_canary(ref, spec, 0)
                    scaled = True
            except (WorkloadError, KubeError) as exc:
                return Convergence(
                    want, weights, wrote, True, False, Stage.SCALE_DOWN,
                    f"cannot scale the canary down: {exc}", drifted_pct=drifted,
                )  # fmt: skip
        return Convergence(want, weights, wrote, True, scaled, Stage.DONE, drifted_pct=drifted)


def route_pcts(weights: tuple[int, ...]) -> str:
    """``30%`` for one route, ``[30, 10]%`` for several."""
    return f"{weights[0]}%" if len(weights) == 1 else f"{list(weights)}%"
