"""The cluster commands of the CLI: ``run``, ``promote``, ``abort``, ``approve``, ``status``.

They find the cluster like kubectl (``--kubeconfig``, ``--context``, ``KUBECONFIG``,
``~/.kube/config``, else the in-cluster service account) and write commands onto the
Canary (the ``canaryd.io/commands`` annotation), which the daemon acknowledges in
status.  ``promote --wait`` is the contract deploy pipelines rely on: exit 0 when
promoted, 1 when rolled back, 3 on timeout, 2 on error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException

from canaryd.kube import (
    CanaryObject,
    Kube,
    KubeError,
    NotFoundError,
    UnavailableError,
    new_command_id,
)
from canaryd.ports import CanaryRef
from canaryd.rollout import Command, CommandKind
from canaryd.spec import format_duration, parse_duration
from canaryd.status import Phase

EXIT_OK, EXIT_REJECTED, EXIT_ERROR, EXIT_TIMEOUT = 0, 1, 2, 3


class ClusterError(Exception):
    """An error the user can fix (no kubeconfig, Canary not found): one line, exit 2."""


def add_kube_flags(parser: argparse.ArgumentParser, *, namespaced: bool = True) -> None:
    group = parser.add_argument_group("cluster (as kubectl)")
    group.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)",
    )
    group.add_argument("--context", metavar="NAME", help="kubeconfig context (default: current)")
    if namespaced:
        group.add_argument(
            "-n",
            "--namespace",
            metavar="NS",
            help="namespace (default: the context's, else 'default')",
        )
    group.add_argument(
        "--request-timeout",
        type=parse_duration,
        default=10.0,
        metavar="D",
        help="deadline of each API call (default 10s)",
    )


def api_client(args: argparse.Namespace) -> tuple[k8s.ApiClient, str]:
    """A client and the default namespace, found the way kubectl finds them."""
    path = args.kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    first = path.split(os.pathsep)[0]
    try:
        if args.kubeconfig or Path(first).exists():
            client = k8s_config.new_client_from_config(config_file=first, context=args.context)
            contexts, active = k8s_config.list_kube_config_contexts(config_file=first)
            current = next((c for c in contexts if c["name"] == args.context), active)
            namespace = (current or {}).get("context", {}).get("namespace") or "default"
            return client, namespace
        k8s_config.load_incluster_config()
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return k8s.ApiClient(), ns_file.read_text().strip() if ns_file.exists() else "default"
    except (ConfigException, OSError, ValueError, KeyError) as exc:
        raise ClusterError(
            f"no usable Kubernetes configuration ({exc}); pass --kubeconfig FILE or set KUBECONFIG"
        ) from None


def _ref(args: argparse.Namespace, default_ns: str) -> CanaryRef:
    return CanaryRef(args.namespace or default_ns, args.name)


async def _add(kube: Kube, ref: CanaryRef, command: Command) -> None:
    try:
        await kube.add_command(ref, command)
    except NotFoundError:
        raise ClusterError(f"Canary {ref} not found") from None


def _who() -> str:
    return os.environ.get("CANARYD_USER") or os.environ.get("USER") or "cli"


def _line(canary: CanaryObject) -> str:
    st = canary.status
    steps = canary.spec.steps if canary.spec else []
    step = f"step {st.step_index + 1}/{len(steps)}" if steps else ""
    return f"{canary.ref}  {st.phase}  {step}  canary {st.canary_weight}%  {st.message}".strip()


async def _promote(args: argparse.Namespace, kube: Kube, ref: CanaryRef, out: TextIO) -> int:
    now = datetime.now(UTC)
    revision = args.revision or now.strftime("%Y%m%d%H%M%S")
    command = Command(
        id=new_command_id(CommandKind.PROMOTE, now),
        kind=CommandKind.PROMOTE,
        revision=revision,
        by=_who(),
    )
    await _add(kube, ref, command)
    out.write(f"promote of revision {revision} requested on {ref} (command {command.id})\n")
    if not args.wait:
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            canary = await kube.get_canary(ref)
        except UnavailableError as exc:  # a blip of the API server: keep waiting
            out.write(f"(Kubernetes API unavailable: {exc}; still waiting)\n")
            await asyncio.sleep(args.poll)
            continue
        st = canary.status
        mine = command.id in st.acknowledged and st.revision == revision
        line = _line(canary)
        if mine and line != last:
            out.write(line + "\n")
            out.flush()
            last = line
        if mine and st.phase is Phase.SUCCEEDED:
            out.write(f"promoted: revision {revision}\n")
            return EXIT_OK
        if mine and st.phase is Phase.ROLLED_BACK:
            out.write(f"rolled back: {st.message}\n")
            return EXIT_REJECTED
        if mine and st.phase is Phase.FAILED:
            out.write(f"failed: {st.message}\n")
            return EXIT_ERROR
        if st.revision not in (None, revision) and mine is False and command.id in st.acknowledged:
            out.write(f"superseded by revision {st.revision}\n")
            return EXIT_ERROR
        await asyncio.sleep(args.poll)
    out.write(f"timed out after {format_duration(args.timeout)} waiting for {ref}\n")
    return EXIT_TIMEOUT


async def _status(args: argparse.Namespace, kube: Kube, default_ns: str, out: TextIO) -> int:
    while True:
        if args.name:
            canaries = [await kube.get_canary(CanaryRef(args.namespace or default_ns, args.name))]
        else:
            canaries = await kube.list_canaries(
                None if args.all_namespaces else (args.namespace or default_ns)
            )
        if args.json:
            out.write(
                json.dumps(
                    [
                        {
                            "namespace": c.ref.namespace,
                            "name": c.ref.name,
                            "status": c.status.to_json(),
                        }
                        for c in canaries
                    ]
                )
                + "\n"
            )
        else:
            for canary in canaries:
                out.write(_line(canary) + "\n")
                verdict = canary.status.last_verdict
                if args.name and verdict is not None:
                    out.write(f"  last verdict: {verdict.decision} at {verdict.at.isoformat()}\n")
                    for reason in verdict.reasons:
                        out.write(f"    - {reason}\n")
            if not canaries:
                out.write("no Canaries found\n")
        out.flush()
        if not args.watch:
            return EXIT_OK
        await asyncio.sleep(2.0)


async def _command(args: argparse.Namespace, kube: Kube, ref: CanaryRef, out: TextIO) -> int:
    now = datetime.now(UTC)
    kind = CommandKind(args.command)
    weight = getattr(args, "step", None)
    command = Command(
        id=new_command_id(kind, now),
        kind=kind,
        weight=weight,
        by=_who(),
        reason=getattr(args, "reason", "") or "",
    )
    await _add(kube, ref, command)
    out.write(f"{kind} requested on {ref} (command {command.id})\n")
    return EXIT_OK


async def _run_daemon(args: argparse.Namespace, client: k8s.ApiClient, out: TextIO) -> int:
    from canaryd import logs  # noqa: PLC0415
    from canaryd.daemon import Daemon, DaemonSettings  # noqa: PLC0415
    from canaryd.istio import IstioRouter  # noqa: PLC0415
    from canaryd.leader import LeaseSettings  # noqa: PLC0415
    from canaryd.simsource import SimulatedMetrics  # noqa: PLC0415
    from canaryd.workloads import Deployments  # noqa: PLC0415
    from simulator import ScenarioError, get_scenario, load_scenario_file  # noqa: PLC0415

    logs.configure(args.log_level, json_output=args.log_format == "json")
    kube = Kube(client, timeout_s=args.request_timeout)
    router = IstioRouter(kube)
    try:
        scenario = (
            load_scenario_file(args.simulate_file)
            if args.simulate_file
            else get_scenario(args.simulate)
        )
    except ScenarioError as exc:
        raise ClusterError(str(exc)) from None
    metrics = SimulatedMetrics(scenario, router, speed=args.simulate_speed)
    lease = None
    if args.leader_elect:
        lease = LeaseSettings(
            namespace=args.lease_namespace,
            name=args.lease_name,
            identity=args.identity or socket.gethostname(),
            lease_duration_s=args.lease_duration,
            renew_s=args.lease_renew,
            retry_s=args.lease_retry,
        )
    settings = DaemonSettings(
        namespaces=tuple(args.watch_namespace or ()),
        lease=lease,
        resync_s=args.resync,
        watch_timeout_s=args.watch_timeout,
    )
    daemon = Daemon(kube, metrics, router, Deployments(kube), settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.run(stop)
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:  # type: ignore[type-arg]
    run = sub.add_parser(
        "run",
        help="run the controller daemon against a cluster",
        description=(
            "Run the canaryd controller: watch Canaries, move VirtualService traffic step by\n"
            "step, judge every step, roll back on evidence of harm, promote when done.\n"
            "Only the leader (a coordination.k8s.io Lease) acts when replicas run together.\n\n"
            "Metrics: until the Prometheus source lands, the daemon reads simulated traffic\n"
            "(--simulate SCENARIO): a dry run against a real cluster, or the test setup.\n\n"
            "Stops cleanly on SIGTERM: the reconcile in progress finishes, the Lease is released."
        ),
        formatter_class=fmt,
    )
    add_kube_flags(run, namespaced=False)
    run.add_argument(
        "--watch-namespace",
        action="append",
        metavar="NS",
        help="namespace to watch (repeatable; default: all)",
    )
    run.add_argument(
        "--simulate",
        default="healthy",
        metavar="SCENARIO",
        help="simulated traffic scenario (default: healthy)",
    )
    run.add_argument(
        "--simulate-file", metavar="FILE", help="simulated traffic from a scenario file"
    )
    run.add_argument(
        "--simulate-speed",
        type=float,
        default=1.0,
        metavar="X",
        help="virtual seconds per real second (default 1)",
    )
    run.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use a Lease so only one replica acts (default: on)",
    )
    run.add_argument("--lease-namespace", default="default", metavar="NS")
    run.add_argument("--lease-name", default="canaryd-leader", metavar="NAME")
    run.add_argument("--identity", metavar="ID", help="this replica's identity (default: hostname)")
    run.add_argument(
        "--lease-duration", type=parse_duration, default=15.0, metavar="D", help="default 15s"
    )
    run.add_argument(
        "--lease-renew", type=parse_duration, default=10.0, metavar="D", help="default 10s"
    )
    run.add_argument(
        "--lease-retry", type=parse_duration, default=2.0, metavar="D", help="default 2s"
    )
    run.add_argument(
        "--resync",
        type=parse_duration,
        default=30.0,
        metavar="D",
        help="list Canaries this often (default 30s)",
    )
    run.add_argument(
        "--watch-timeout", type=parse_duration, default=60.0, metavar="D", help=argparse.SUPPRESS
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="json", choices=["json", "console"])
    run.set_defaults(cluster_handler="run")

    promote = sub.add_parser(
        "promote",
        help="start a rollout of a new revision (pipelines: --wait)",
        description=(
            "Ask canaryd to roll out a revision on the Canary NAME.\n\n"
            "With --wait, follow the rollout and exit with its outcome:\n"
            "  0 promoted   1 rolled back   2 error   3 timeout"
        ),
        formatter_class=fmt,
    )
    promote.add_argument("name", metavar="NAME")
    add_kube_flags(promote)
    promote.add_argument("--revision", metavar="R", help="revision label (default: a timestamp)")
    promote.add_argument("--wait", action="store_true", help="follow the rollout to its end")
    promote.add_argument(
        "--timeout",
        type=parse_duration,
        default=3600.0,
        metavar="D",
        help="with --wait (default 1h)",
    )
    promote.add_argument(
        "--poll", type=parse_duration, default=1.0, metavar="D", help=argparse.SUPPRESS
    )
    promote.set_defaults(cluster_handler="promote")

    abort = _command_parser(
        sub, fmt, "abort", "roll a Canary back now",
        "Roll the Canary NAME back to stable now (canary weight 0 first).",
    )  # fmt: skip
    abort.add_argument("--reason", default="", help="recorded with the command")
    approve = _command_parser(
        sub, fmt, "approve", "approve the step a Canary waits for",
        "Approve the next step of the Canary NAME (or, with --step, a step ahead of time).",
    )  # fmt: skip
    approve.add_argument("--step", type=int, metavar="WEIGHT", help="the step's weight, e.g. 50")
    _command_parser(
        sub, fmt, "skip", "treat a Canary's current step as passed",
        "Skip the current step of the Canary NAME.",
    )  # fmt: skip

    status = sub.add_parser(
        "status",
        help="show Canaries and their last verdicts",
        formatter_class=fmt,
        description="Show one Canary (with its last verdict's reasons) or all of a namespace.",
    )
    status.add_argument("name", nargs="?", metavar="NAME")
    add_kube_flags(status)
    status.add_argument("-A", "--all-namespaces", action="store_true")
    status.add_argument("--watch", action="store_true", help="refresh every 2 seconds")
    status.add_argument("--json", action="store_true")
    status.set_defaults(cluster_handler="status")


def _command_parser(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    fmt: type[argparse.HelpFormatter],
    name: str,
    help_text: str,
    description: str,
) -> argparse.ArgumentParser:
    """A command that writes one command onto the Canary NAME."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=description, formatter_class=fmt
    )
    parser.add_argument("name", metavar="NAME")
    add_kube_flags(parser)
    parser.set_defaults(cluster_handler="command")
    return parser


def handle(args: argparse.Namespace, out: TextIO) -> int:
    """Run a cluster command; ClusterError for what the user can fix."""
    client, default_ns = api_client(args)
    try:
        if args.cluster_handler == "run":
            return asyncio.run(_run_daemon(args, client, out))
        kube = Kube(client, timeout_s=args.request_timeout)
        if args.cluster_handler == "status":
            return asyncio.run(_status(args, kube, default_ns, out))
        ref = _ref(args, default_ns)
        if args.cluster_handler == "promote":
            return asyncio.run(_promote(args, kube, ref, out))
        return asyncio.run(_command(args, kube, ref, out))
    except NotFoundError as exc:
        raise ClusterError(str(exc)) from None
    except KubeError as exc:
        raise ClusterError(f"Kubernetes API: {exc}") from None
    finally:
        client.close()
