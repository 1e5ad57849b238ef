"""``canaryd playground``: the whole product on one laptop, with no cluster.

The real daemon, status API and dashboard run against the project's Kubernetes API
double (:class:`kubedouble.apiserver.KubeApiServer`, real HTTP) with simulated traffic on
accelerated time.  Four sample Canaries in namespace ``shop`` show what canaryd does:

* ``checkout`` — healthy: 10% → 50% → 100%, promoted;
* ``payments`` — 10× the errors of stable: rolled back at the first step;
* ``search`` — 1.5× the latency of stable: rolled back on the latency check;
* ``cart`` — healthy, but the 50% step waits for a person's approval (the dashboard's
  Approve button, with the operator token printed at start-up).

A finished rollout starts again with a new revision a little later, so there is
always something moving.  Everything lives in memory and ends with the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import secrets
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from kubernetes import client as k8s

from canaryd.api import (
    ApiSettings,
    Identity,
    Role,
    TokenStore,
    bind,
    create_app,
    parse_listen,
    serve_threaded,
)
from canaryd.cli import duration_arg, number_arg
from canaryd.daemon import Daemon, DaemonSettings
from canaryd.hub import StatusHub
from canaryd.istio import IstioRouter
from canaryd.kube import Kube, new_command
from canaryd.ports import CanaryRef, KubeError
from canaryd.rollout import CommandKind
from canaryd.simsource import SimulatedMetrics
from canaryd.views import EventType, EventView
from canaryd.workloads import Deployments
from kubedouble.apiserver import KubeApiServer
from simulator import Scenario, get_scenario

NAMESPACE = "shop"


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    scenario: str
    blurb: str
    approvals_before: tuple[int, ...] = ()
    #: spec fields over the sample's (e.g. a strategy; its steps are then its own)
    spec: tuple[tuple[str, Any], ...] = ()


SAMPLES: tuple[Sample, ...] = (
    Sample("checkout", "healthy", "healthy: promoted step by step"),
    Sample("payments", "error-spike", "10x the errors of stable: rolled back"),
    Sample("search", "latency-regression", "1.5x the latency of stable: rolled back"),
    Sample("cart", "healthy", "healthy, 50% step waits for your approval", (50,)),
)


def sample_objects(
    sample: Sample, interval_s: float, step_intervals: int = 12
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(group, version, plural, object) of one sample service: its VirtualService,
    DestinationRule, stable and canary Deployments, and its Canary."""
    app = sample.name
    ns = NAMESPACE

    def deployment(name: str, image: str, track: str, replicas: int) -> dict[str, Any]:
        labels = {"app": app, "track": track}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "app", "image": image}]},
                },
            },
        }

    virtual_service = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": app, "namespace": ns},
        "spec": {
            "hosts": [app],
            "http": [
                {
                    "name": "primary",
                    "route": [
                        {"destination": {"host": app, "subset": "stable"}, "weight": 100},
                        {"destination": {"host": app, "subset": "canary"}, "weight": 0},
                    ],
                }
            ],
        },
    }
    destination_rule = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": app, "namespace": ns},
        "spec": {
            "host": app,
            "subsets": [
                {"name": "stable", "labels": {"track": "stable"}},
                {"name": "canary", "labels": {"track": "canary"}},
            ],
        },
    }
    interval = f"{interval_s:g}s"
    canary: dict[str, Any] = {
        "apiVersion": "canaryd.io/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": app, "namespace": ns, "labels": {"app": app}},
        "spec": {
            "service": app,
            "stable": {"deployment": app},
            "canary": {"deployment": f"{app}-canary"},
            "trafficRouting": {
                "istio": {
                    "virtualService": {"name": app, "routes": ["primary"]},
                    "destinationRule": {"name": app},
                }
            },
            "steps": [10, 50, 100],
            "analysis": {
                "interval": interval,
                "stepDuration": f"{interval_s * step_intervals:g}s",
                "minStepDuration": f"{interval_s * 4:g}s",
                "minRequests": 200,
                "noData": {"holdFor": f"{interval_s * 30:g}s"},
            },
            "approvals": {
                "before": list(sample.approvals_before),
                "timeout": "1h",
                "onTimeout": "hold",
            },
        },
    }
    if sample.spec:
        canary["spec"] |= dict(sample.spec)
        if "strategy" in canary["spec"]:
            del canary["spec"]["steps"]  # the strategy plans its own
    return [
        ("networking.istio.io", "v1", "virtualservices", virtual_service),
        ("networking.istio.io", "v1", "destinationrules", destination_rule),
        ("apps", "v1", "deployments", deployment(app, f"shop/{app}:1", "stable", 3)),
        ("apps", "v1", "deployments", deployment(f"{app}-canary", f"shop/{app}:2", "canary", 1)),
        ("canaryd.io", "v1alpha1", "canaries", canary),
    ]


def seed(
    server: KubeApiServer,
    api_client: Any,
    samples: tuple[Sample, ...],
    interval_s: float,
    step_intervals: int = 12,
) -> None:
    """Create the samples' objects in ``server`` (Deployments through the API, so that
    the double's Deployment controller rolls them out)."""
    apps = k8s.AppsV1Api(api_client)
    for sample in samples:
        for group, version, plural, obj in sample_objects(sample, interval_s, step_intervals):
            if plural == "deployments":
                body: Any = copy.deepcopy(obj)  # the client takes plain dicts as bodies
                apps.create_namespaced_deployment(NAMESPACE, body)
            else:
                server.put_raw(group, version, plural, copy.deepcopy(obj))


class Playground:
    """The double, the daemon and the API in one event loop (also used by tests)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        speed: float = 30.0,
        interval_s: float = 2.0,
        restart_after_s: float = 20.0,
        step_intervals: int = 12,
        samples: tuple[Sample, ...] = SAMPLES,
        token: str | None = None,
        kube_url: str | None = None,
    ) -> None:
        self.samples = samples
        #: a Kubernetes API (double) already seeded with :func:`seed`, e.g. in another
        #: process; by default the playground starts its own double in this process
        self.kube_url = kube_url
        self.interval_s = interval_s
        self.restart_after_s = restart_after_s
        #: a step lasts this many intervals (at least 4: minStepDuration is 4 intervals)
        self.step_intervals = max(4, step_intervals)
        self.token = token or secrets.token_urlsafe(24)
        self.server = KubeApiServer()
        self.hub = StatusHub()
        self.speed = speed
        self.sock = bind(host, port)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.daemon: Daemon | None = None
        self.kube: Kube | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def run(self, stop: asyncio.Event, out: TextIO | None = None) -> None:
        if self.kube_url is None:
            self.server.start()
            api_client = self.server.api_client()
        else:
            configuration = k8s.Configuration()
            configuration.host = self.kube_url
            api_client = k8s.ApiClient(configuration)
        try:
            if self.kube_url is None:
                await asyncio.to_thread(
                    seed, self.server, api_client, self.samples, self.interval_s,
                    self.step_intervals,
                )  # fmt: skip
            kube = self.kube = Kube(api_client, timeout_s=5.0)
            router = IstioRouter(kube)
            scenarios: dict[CanaryRef, Scenario] = {
                CanaryRef(NAMESPACE, s.name): get_scenario(s.scenario) for s in self.samples
            }
            metrics = SimulatedMetrics(scenarios, router, speed=self.speed, seed=11)
            settings = DaemonSettings(resync_s=5.0, watch_timeout_s=30.0, drain_s=5.0)
            daemon = self.daemon = Daemon(
                kube, metrics, router, Deployments(kube), settings, hub=self.hub
            )
            tokens = TokenStore.of((self.token, Identity("playground", Role.OPERATOR)))
            app = create_app(
                self.hub,
                kube.add_command,
                ApiSettings(tokens=tokens),
                readiness=daemon.readiness,
                leader=lambda: daemon.acting,
            )
            async with asyncio.TaskGroup() as group:
                group.create_task(daemon.run(stop), name="daemon")
                group.create_task(serve_threaded(app, self.sock, stop, self.hub.close), name="api")
                group.create_task(self._drive(stop), name="driver")
                if out is not None:
                    group.create_task(self._narrate(stop, out), name="narrator")
        finally:
            api_client.close()
            if self.kube_url is None:
                self.server.stop()

    async def _drive(self, stop: asyncio.Event) -> None:
        """Start every sample's rollout, and start a finished one again a little later."""
        assert self.kube is not None
        ended: dict[CanaryRef, float] = {}
        revision = dict.fromkeys((s.name for s in self.samples), 1)
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            for sample in self.samples:
                ref = CanaryRef(NAMESPACE, sample.name)
                canary = self.hub.get(ref)
                if canary is None:
                    continue
                phase = canary.status.phase
                idle = canary.status.revision is None and not canary.commands
                if phase.terminal and ref not in ended:
                    ended[ref] = loop.time()
                due = ref in ended and loop.time() - ended[ref] >= self.restart_after_s
                if idle or due:
                    revision[sample.name] += 1
                    command = new_command(
                        CommandKind.PROMOTE, "playground", revision=f"v{revision[sample.name]}"
                    )
                    with contextlib.suppress(KubeError):
                        await self.kube.add_command(ref, command)
                        ended.pop(ref, None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()

    async def _narrate(self, stop: asyncio.Event, out: TextIO) -> None:
        """One line per event on the terminal."""
        sub = self.hub.subscribe()
        try:
            while not stop.is_set():
                event = await sub.queue.get()
                if event is None:
                    sub = self.hub.subscribe()
                    continue
                if event.type is not EventType.ADDED:
                    out.write(_line(event) + "\n")
                    out.flush()
        finally:
            self.hub.unsubscribe(sub)


def _line(event: EventView) -> str:
    at = event.at.astimezone().strftime("%H:%M:%S")
    return f"{at}  {event.namespace}/{event.name:<10} {event.type:<8} {event.message}"


def add_parser(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "playground",
        help="the daemon, API and dashboard on this laptop, with no cluster",
        description=(
            "Run the real canaryd daemon, status API and web dashboard on this machine\n"
            "against an in-memory Kubernetes API and simulated traffic, on accelerated\n"
            "time.  Four sample canaries in namespace 'shop': one healthy, one with an\n"
            "error regression, one with a latency regression, and one whose 50% step\n"
            "waits for your approval.  Open the printed URL; paste the printed operator\n"
            "token into the dashboard to use Approve / Abort / Skip.\n\n"
            "Examples:\n"
            "  canaryd playground\n"
            "  canaryd playground --listen 127.0.0.1:9000 --speed 60\n\n"
            "Stop with Ctrl-C; nothing is kept."
        ),
        epilog=(
            "exit codes: 0 stopped (Ctrl-C or --duration), 2 usage or runtime error\n"
            "  (e.g. the --listen address is taken); see 'canaryd --help'"
        ),
        formatter_class=fmt,
    )
    parser.add_argument(
        "--listen",
        type=_listen_arg,
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="where the API and dashboard listen (default 127.0.0.1:8080; port 0: any free)",
    )
    parser.add_argument(
        "--speed",
        type=number_arg(float, maximum=1000),
        default=30.0,
        metavar="X",
        help="simulated seconds of traffic per real second, above 0, at most 1000 (default 30)",
    )
    parser.add_argument(
        "--duration",
        type=duration_arg(),
        default=None,
        metavar="D",
        help="stop after this long, e.g. 5m (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--token",
        default=None,
        metavar="TOKEN",
        help="operator token to accept (default: a random one, printed at start)",
    )
    parser.set_defaults(handler=cmd_playground)


def _listen_arg(text: str) -> str:
    """An argparse type: ``HOST:PORT`` (port 0: any free one)."""
    try:
        parse_listen(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:9000"
        ) from None
    return text


def cmd_playground(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from canaryd import logs  # noqa: PLC0415
    from canaryd.cli import CliError  # noqa: PLC0415

    if args.speed <= 0 or args.speed > 1000:
        raise CliError(f"--speed {args.speed:g}: give a number above 0, at most 1000")
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    logs.configure("error", json_output=False)
    try:
        playground = Playground(host=host, port=port, speed=args.speed, token=args.token)
    except OSError as exc:
        err.write(f"canaryd playground: {exc} (try --listen 127.0.0.1:0)\n")
        return 2
    out.write(
        f"canaryd playground: dashboard at {playground.url}\n"
        f"  operator token (for Approve / Abort / Skip): {playground.token}\n"
        f"  CLI: CANARYD_SERVER={playground.url} canaryd status -A\n"
        f"  traffic at {args.speed:g}x; sample canaries in namespace {NAMESPACE}:\n"
    )
    for sample in SAMPLES:
        out.write(f"    {sample.name:<10} {sample.blurb}\n")
    out.write("  Ctrl-C to stop.\n\n")
    out.flush()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.duration is not None:
            loop.call_later(args.duration, stop.set)
        await playground.run(stop, out)

    asyncio.run(main())
    out.write(f"canaryd playground: stopped at {datetime.now(UTC).astimezone():%H:%M:%S}\n")
    return 0
