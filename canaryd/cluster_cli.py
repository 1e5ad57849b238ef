"""The cluster commands of the CLI: ``run``, ``promote``, ``abort``, ``approve``, ``status``.

They find the cluster like kubectl (``--kubeconfig``, ``--context``, ``KUBECONFIG``,
``~/.kube/config``, else the in-cluster service account) and write commands onto the
Canary (the ``canaryd.io/commands`` annotation), which the daemon acknowledges in
status.  ``promote --wait`` is the contract deploy pipelines rely on: exit 0 when
promoted, 1 when rolled back, 3 on timeout, 2 on error.  Flags that make no sense
(a zero lease, a URL that is not one) are usage errors before any cluster is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException

from analysis.verdict import format_duration
from canaryd.backends import Backend, BackendError, CanaryView, KubeBackend
from canaryd.cli import _version, duration_arg, http_url_arg, number_arg, one_line
from canaryd.kube import CanaryObject, Kube
from canaryd.ports import (
    CanaryRef,
    KubeError,
    MetricsError,
    MetricsSource,
    NotFoundError,
    TrafficRouter,
    UnavailableError,
)
from canaryd.rollout import Command, CommandKind
from canaryd.status import Phase

if TYPE_CHECKING:
    from canaryd.outbox import Notifier
    from canaryd.slack import SlackInteractions

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
    if namespaced:
        api = parser.add_argument_group("through a daemon's status API instead")
        api.add_argument(
            "--server",
            default=os.environ.get("CANARYD_SERVER"),
            metavar="URL",
            help="the daemon's API, e.g. http://canaryd.canaryd:8080 (default: "
            "$CANARYD_SERVER); the token comes from $CANARYD_TOKEN or --token-file",
        )
        api.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    group.add_argument(
        "--request-timeout",
        type=duration_arg(maximum=MAX_REQUEST_TIMEOUT_S),
        default=10.0,
        metavar="D",
        help="deadline of each API call, above 0s and at most 10m (default 10s)",
    )


#: The longest ``--request-timeout``: a deadline beyond this is a hang, not a deadline.
MAX_REQUEST_TIMEOUT_S = 600.0


def api_client(args: argparse.Namespace) -> tuple[k8s.ApiClient, str]:
    """A client and the default namespace, found the way kubectl finds them."""
    path = args.kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    first = path.split(os.pathsep)[0]
    if args.kubeconfig or Path(first).exists():
        problem = _kubeconfig_problem(first)
        if problem:
            raise ClusterError(f"no usable Kubernetes configuration in {first}: {problem}")
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
    except (ConfigException, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # TypeError, AttributeError: the client trips over a kubeconfig of the wrong shape
        detail = one_line(str(exc)) or type(exc).__name__
        raise ClusterError(
            f"no usable Kubernetes configuration ({detail}); "
            "pass --kubeconfig FILE or set KUBECONFIG"
        ) from None


def _kubeconfig_problem(path: str) -> str | None:
    """What makes the kubeconfig file at ``path`` unusable, in words, or None: read
    here so that a broken file is one clear line, not the client's traceback."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return "no such file"
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read it: {getattr(exc, 'strerror', None) or exc}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(exc, "problem", None) or exc
        return one_line(f"not valid YAML{where}: {what}")
    if data is None:
        return "the file is empty"
    if not isinstance(data, dict):
        return f"expected a kubeconfig (apiVersion, clusters, contexts, users), got a {_kind(data)}"
    for key in ("clusters", "contexts", "users"):
        entries = data.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            return f"'{key}' must be a list, got a {_kind(entries)}"
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                return f"{key}[{index}] must be a mapping with a 'name'"
            if key[:-1] in entry and not isinstance(entry[key[:-1]], dict | None):
                return (
                    f"{key}[{index}].{key[:-1]} must be a mapping, got a {_kind(entry[key[:-1]])}"
                )
    if not isinstance(data.get("current-context"), str | None):
        return f"'current-context' must be a name, got a {_kind(data['current-context'])}"
    return None


def _kind(value: object) -> str:
    names = {dict: "mapping", list: "list", str: "string", int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)


def _ref(args: argparse.Namespace, default_ns: str) -> CanaryRef:
    return CanaryRef(args.namespace or default_ns, args.name)


def _who() -> str:
    return os.environ.get("CANARYD_USER") or os.environ.get("USER") or "cli"


def _line(canary: CanaryView, budget: str = "") -> str:
    st = canary.status
    steps = canary.steps
    step = f"step {st.step_index + 1}/{len(steps)}" if steps else ""
    parts = [
        str(canary.ref),
        str(st.phase),
        step,
        f"canary {st.canary_weight}%",
        budget,
        st.message,
    ]
    return "  ".join(p for p in parts if p)


async def _promote(args: argparse.Namespace, backend: Backend, ref: CanaryRef, out: TextIO) -> int:
    command = await backend.submit(
        ref, CommandKind.PROMOTE, _who(), revision=args.revision, fix=args.fix
    )
    revision = command.revision or args.revision
    out.write(f"promote of revision {revision} requested on {ref} (command {command.id})\n")
    if not args.wait:
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            canary = await backend.get(ref)
        except UnavailableError as exc:  # a blip of the API server: keep waiting
            out.write(f"(unavailable: {exc}; still waiting)\n")
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
            out.write(_outcome("rolled back", st.message) + "\n")
            return EXIT_REJECTED
        if mine and st.phase is Phase.FAILED:
            out.write(_outcome("failed", st.message) + "\n")
            return EXIT_ERROR
        if st.revision not in (None, revision) and mine is False and command.id in st.acknowledged:
            out.write(f"superseded by revision {st.revision}\n")
            return EXIT_ERROR
        await asyncio.sleep(args.poll)
    out.write(f"timed out after {format_duration(args.timeout)} waiting for {ref}\n")
    return EXIT_TIMEOUT


def _outcome(word: str, message: str) -> str:
    """``word: message``, but once: the daemon's message often starts with the word."""
    message = message.strip()
    if message.lower().startswith(word):
        return message
    return f"{word}: {message}" if message else word


async def _slo(args: argparse.Namespace, backend: Backend, default_ns: str, out: TextIO) -> int:
    """Every released service's SLO figures and policy tier: from a running daemon's
    API (``--server``), or read now from Prometheus for the cluster's Canaries."""
    namespace = None if args.all_namespaces else (args.namespace or default_ns)
    if isinstance(backend, KubeBackend):
        rows = await _slo_from_prometheus(args, backend, namespace)
    else:
        rows = await backend.slos(namespace)
    if args.json:
        out.write(json.dumps(rows, allow_nan=False) + "\n")
        return EXIT_OK
    if not rows:
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        out.write(f"no service with an SLO in {where}\n")
        return EXIT_OK
    table = [["NAMESPACE", "SERVICE", "OBJECTIVE", "TARGET", "ACHIEVED", "BUDGET LEFT",
              "BURN 5m/1h/6h/1d", "FIRING", "TIER"]]  # fmt: skip
    for row in rows:
        for name, figures in row["objectives"].items():
            burn = figures["burn_rates"]
            rates = "/".join(
                "-" if burn.get(w) is None else f"{burn[w]:.2g}"
                for w in ("300", "3600", "21600", "86400")
            )
            tier = row["tier"] + ("" if row["enforced"] else " (not enforced)")
            table.append([
                row["namespace"], row["service"], name,
                _pct(figures["objective"]), _pct(figures["availability"]),
                _pct(figures["error_budget_remaining"]), rates,
                ",".join(figures["firing"]) or "-", tier,
            ])  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
    if args.verbose:
        for row in rows:
            out.write(f"{row['namespace']}/{row['service']}: {row['reason']}\n")
    return EXIT_OK


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.4g}%"


async def _slo_from_prometheus(
    args: argparse.Namespace, backend: KubeBackend, namespace: str | None
) -> list[dict[str, Any]]:
    if not args.prometheus_url:
        raise ClusterError(
            "canaryd slo reads the figures from Prometheus: give --prometheus-url URL (or "
            "$CANARYD_PROMETHEUS_URL), or --server URL to ask a running canaryd"
        )
    return await _read_slos(args, await backend.kube.list_canaries(namespace))


async def _read_slos(
    args: argparse.Namespace, canaries: list[CanaryObject]
) -> list[dict[str, Any]]:
    """The SLO figures of these Canaries' services, read from Prometheus now."""
    from canaryd.prometheus import PrometheusMetrics, PrometheusSettings  # noqa: PLC0415
    from canaryd.slo import read_slos  # noqa: PLC0415

    source = PrometheusMetrics(
        PrometheusSettings(
            url=args.prometheus_url,
            bearer_token_file=args.prometheus_bearer_token_file,
            timeout_s=args.request_timeout,
        )
    )
    try:
        slos = await read_slos(source, canaries)
    except MetricsError as exc:
        raise ClusterError(f"the SLO figures could not be read: {exc}") from None
    finally:
        source.close()
    return [s.to_json() for s in sorted(slos, key=lambda s: (s.namespace, s.service))]


@dataclass(slots=True)
class _StatusSlos:
    """The SLO figures ``canaryd status`` shows beside each Canary: from the daemon's API
    (``--server``) or Prometheus (``--prometheus-url``), read at most every
    ``max_age_s`` while watching; ``note`` says why there are none."""

    max_age_s: float = 30.0
    rows: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    note: str | None = None
    read_at: float | None = None

    async def read(self, args: argparse.Namespace, backend: Backend, namespace: str | None) -> None:
        now = time.monotonic()
        if self.read_at is not None and now - self.read_at < self.max_age_s:
            return
        self.read_at = now
        try:
            if isinstance(backend, KubeBackend):
                canaries = await backend.kube.list_canaries(namespace)
                if not any(c.spec and c.spec.analysis.slo for c in canaries):
                    self.rows, self.note = {}, None
                    return
                if not args.prometheus_url:
                    self.note = (
                        "error budgets: give --prometheus-url URL (or --server URL) to show them"
                    )
                    return
                rows = await _read_slos(args, canaries)
            else:
                rows = await backend.slos(namespace)
        except (ClusterError, BackendError) as exc:
            self.note = f"error budgets not read: {exc}"
            return
        self.rows = {(r["namespace"], r["service"]): r for r in rows}
        self.note = None

    def of(self, canary: CanaryView) -> dict[str, Any] | None:
        if canary.service is None:
            return None
        return self.rows.get((canary.ref.namespace, canary.service))


def _budget_brief(row: dict[str, Any]) -> str:
    """``budget 30% left (approval)``: the tightest objective's budget and the tier."""
    left = [
        o["error_budget_remaining"]
        for o in row["objectives"].values()
        if o["error_budget_remaining"] is not None
    ]
    tier = row["tier"] + ("" if row["enforced"] else ", not enforced")
    return f"budget {_pct(min(left)) if left else '-'} left ({tier})"


def _budget_lines(row: dict[str, Any]) -> list[str]:
    """Every objective's figures, one line each, under the tier and its reason."""
    enforced = "enforced" if row["enforced"] else "not enforced: no budgetPolicy"
    lines = [f"  error budget of {row['service']}: tier {row['tier']} ({enforced})"]
    for name, o in row["objectives"].items():
        rates = o["burn_rates"]
        burn = " ".join(
            f"{label} " + ("-" if rates.get(w) is None else f"{rates[w]:.2g}x")
            for label, w in (("5m", "300"), ("1h", "3600"), ("6h", "21600"), ("1d", "86400"))
        )
        firing = f"; firing {','.join(o['firing'])}" if o["firing"] else ""
        under = f" under {o['threshold_ms']:g} ms" if o.get("threshold_ms") else ""
        lines.append(
            f"    {name}{under}: {_pct(o['availability'])} over {format_duration(o['window_s'])} "
            f"(objective {_pct(o['objective'])}), {_pct(o['error_budget_remaining'])} of the "
            f"budget left; burn {burn}{firing}"
        )
    lines.append(f"    policy: {row['reason']}")
    return lines


async def _status(args: argparse.Namespace, backend: Backend, default_ns: str, out: TextIO) -> int:
    namespace = None if args.all_namespaces else (args.namespace or default_ns)
    budgets = _StatusSlos()
    while True:
        if args.name:
            canaries = [await backend.get(CanaryRef(args.namespace or default_ns, args.name))]
        else:
            canaries = await backend.list(namespace)
        await budgets.read(args, backend, args.namespace or default_ns if args.name else namespace)
        shards = None if args.json else await backend.shards()
        if args.watch and not args.json and out.isatty():
            out.write("\x1b[H\x1b[2J")  # redraw in place
        if args.json:
            out.write(
                json.dumps(
                    [
                        {
                            "namespace": c.ref.namespace,
                            "name": c.ref.name,
                            "status": c.status.to_json(),
                            "slo": budgets.of(c),
                        }
                        for c in canaries
                    ],
                    allow_nan=False,
                )
                + "\n"
            )
        else:
            for canary in canaries:
                row = budgets.of(canary)
                out.write(_line(canary, _budget_brief(row) if row and not args.name else "") + "\n")
                if args.name and row is not None:
                    out.write("\n".join(_budget_lines(row)) + "\n")
                if args.name and shards is not None:
                    out.write(f"  {shards.of(canary.ref)}\n")
                verdict = canary.status.last_verdict
                if args.name and verdict is not None:
                    out.write(f"  last verdict: {verdict.decision} at {verdict.at.isoformat()}\n")
                    for reason in verdict.reasons:
                        out.write(f"    - {reason}\n")
            if not canaries:
                out.write("no Canaries found\n")
            elif budgets.note:
                out.write(f"({budgets.note})\n")
            if shards is not None and not args.name:
                out.write(shards.line() + "\n")
        out.flush()
        if not args.watch:
            return EXIT_OK
        await asyncio.sleep(2.0)


async def _command(args: argparse.Namespace, backend: Backend, ref: CanaryRef, out: TextIO) -> int:
    kind = CommandKind(args.command)
    command = await backend.submit(
        ref,
        kind,
        _who(),
        weight=getattr(args, "step", None),
        reason=getattr(args, "reason", "") or "",
    )
    out.write(f"{kind} requested on {ref} (command {command.id})\n")
    return EXIT_OK


async def _run_daemon(args: argparse.Namespace, client: k8s.ApiClient, out: TextIO) -> int:
    from canaryd import logs  # noqa: PLC0415
    from canaryd.daemon import Daemon, DaemonSettings  # noqa: PLC0415
    from canaryd.hub import StatusHub  # noqa: PLC0415
    from canaryd.leader import LeaseSettings  # noqa: PLC0415
    from canaryd.routes import KubeRouter  # noqa: PLC0415
    from canaryd.workloads import Deployments  # noqa: PLC0415

    logs.configure(args.log_level, json_output=args.log_format == "json")
    kube = Kube(client, timeout_s=args.request_timeout)
    router = KubeRouter(kube)
    metrics, metrics_timeout_s = _metrics_source(args, router)
    lease = None
    identity = args.identity or socket.gethostname()
    # who wrote what, in the API server's audit log (and the double's write log)
    client.user_agent = f"canaryd/{_version()} ({identity})"
    if args.leader_elect:
        lease = LeaseSettings(
            namespace=args.lease_namespace,
            name=args.lease_name,
            identity=identity,
            lease_duration_s=args.lease_duration,
            renew_s=args.lease_renew,
            retry_s=args.lease_retry,
        )
    settings = DaemonSettings(
        namespaces=tuple(args.watch_namespace or ()),
        lease=lease,
        shards=args.shards,
        resync_s=args.resync,
        watch_timeout_s=args.watch_timeout,
        metrics_timeout_s=metrics_timeout_s,
        status_refresh_s=args.status_refresh,
        slo_refresh_s=args.slo_refresh,
    )
    hub = StatusHub()
    leading: list[Callable[[CanaryRef], bool]] = []  # the daemon's, once it exists
    notifier, interactions = _notifications(
        args, kube, hub.get, lambda ref: bool(leading) and leading[0](ref)
    )
    daemon = Daemon(kube, metrics, router, Deployments(kube), settings, hub=hub, notifier=notifier)
    leading.append(daemon.acting_for)
    sock = None
    if args.listen != "off":
        from canaryd import api  # noqa: PLC0415

        try:
            host, port = api.parse_listen(args.listen)
            api_settings = api.ApiSettings(
                tokens=api.TokenStore.load(args.api_token_file)
                if args.api_token_file
                else api.TokenStore(),
                reads_need_token=args.api_reads_need_token,
                cors_origins=tuple(args.api_cors_origin or ()),
            )
            sock = api.bind(host, port)
            bound = sock.getsockname()
            structlog.get_logger("canaryd.api").info(
                "api listening", url=f"http://{host}:{bound[1]}/"
            )
        except (ValueError, OSError) as exc:
            raise ClusterError(str(exc)) from None
        if args.api_reads_need_token and not api_settings.tokens.entries:
            raise ClusterError("--api-reads-need-token: --api-token-file holds no tokens")
        app = api.create_app(
            daemon.hub,
            kube.add_command,
            api_settings,
            readiness=daemon.readiness,
            leader=lambda: daemon.acting,
            slack_interactions=interactions.handle if interactions is not None else None,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with asyncio.TaskGroup() as group:
        if sock is not None:
            group.create_task(api.serve_threaded(app, sock, stop, daemon.hub.close), name="api")
        group.create_task(daemon.run(stop), name="daemon")
    return EXIT_OK


def read_secret(path: str | None, env: str, what: str) -> str | None:
    """A secret from the file ``path``, else from the environment variable ``env``
    (stripped; None when neither is set).  The value is never shown in an error."""
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ClusterError(
                f"cannot read the {what} from {path}: {exc.__class__.__name__}"
            ) from None
        if not value:
            raise ClusterError(f"the {what} file {path} is empty")
        return value
    return os.environ.get(env, "").strip() or None


def _notifications(
    args: argparse.Namespace,
    kube: Kube,
    lookup: Callable[[CanaryRef], CanaryObject | None],
    acting: Callable[[CanaryRef], bool],
) -> tuple[Notifier, SlackInteractions | None]:
    """The notifier (Slack, webhooks, MQTT sinks the flags ask for) and the Slack
    interactions handler (None without a signing secret)."""
    from canaryd.outbox import EventSink, Notifier  # noqa: PLC0415
    from canaryd.webhooks import WebhookSettings, WebhookSink  # noqa: PLC0415

    sinks: list[EventSink] = []
    interactions = None
    webhook_key = read_secret(args.webhook_secret_file, "CANARYD_WEBHOOK_SECRET", "webhook key")
    sinks.append(
        WebhookSink(WebhookSettings(key=webhook_key.encode() if webhook_key else None), lookup)
    )
    token = read_secret(args.slack_token_file, "CANARYD_SLACK_TOKEN", "Slack bot token")
    signing = read_secret(
        args.slack_signing_secret_file, "CANARYD_SLACK_SIGNING_SECRET", "Slack signing secret"
    )
    hook = read_secret(
        args.slack_webhook_url_file, "CANARYD_SLACK_WEBHOOK_URL", "Slack incoming-webhook URL"
    )
    if token or hook or signing:
        from canaryd.slack import SlackInteractions, SlackSettings, SlackSink  # noqa: PLC0415

        slack = SlackSettings(
            token=token,
            signing_secret=signing,
            channel=args.slack_channel,
            webhook_url=hook,
            api_url=args.slack_api_url,
            dashboard_url=args.dashboard_url,
        )
        if token or hook:
            sinks.append(SlackSink(slack, lookup))
        if signing:
            if not token:
                raise ClusterError(
                    "--slack-signing-secret-file needs --slack-token-file too: approving "
                    "in Slack updates the message with the bot token"
                )
            interactions = SlackInteractions(slack, lookup, kube.add_command)
    if args.mqtt_url:
        from canaryd.mqtt import MqttSettings, MqttSink  # noqa: PLC0415

        try:
            mqtt = MqttSettings(
                url=args.mqtt_url,
                username=args.mqtt_username,
                password=read_secret(
                    args.mqtt_password_file, "CANARYD_MQTT_PASSWORD", "MQTT password"
                ),
                client_id=args.mqtt_client_id or f"canaryd-{socket.gethostname()}",
                topic_prefix=args.mqtt_topic_prefix,
                ca_file=args.mqtt_ca_file,
                commands=bool(args.mqtt_command_user),
                command_users=frozenset(args.mqtt_command_user or ()),
            )
        except ValueError as exc:
            raise ClusterError(f"--mqtt-url: {exc}") from None

        async def submit_if_leading(ref: CanaryRef, command: Command) -> None:
            # every replica reads the command topic; only the one that acts for the
            # Canary (leads, or holds its shard) writes the command, so that it is not
            # written once per replica
            if acting(ref):
                await kube.add_command(ref, command)

        sinks.append(MqttSink(mqtt, submit_if_leading))
    return Notifier(sinks), interactions


def _metrics_source(args: argparse.Namespace, router: TrafficRouter) -> tuple[MetricsSource, float]:
    """The metrics source the flags ask for, and the daemon's deadline for it (s)."""
    simulated = args.simulate or args.simulate_file
    if simulated:
        from canaryd.simsource import SimulatedMetrics  # noqa: PLC0415
        from simulator import ScenarioError, get_scenario, load_scenario_file  # noqa: PLC0415

        try:
            scenario = (
                load_scenario_file(args.simulate_file)
                if args.simulate_file
                else get_scenario(args.simulate)
            )
        except ScenarioError as exc:
            raise ClusterError(str(exc)) from None
        return SimulatedMetrics(scenario, router, speed=args.simulate_speed), 10.0
    from canaryd.prometheus import PrometheusMetrics, PrometheusSettings  # noqa: PLC0415

    headers: dict[str, str] = {}
    for header in args.prometheus_header or ():  # checked by _header
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    basic_auth = None
    if args.prometheus_basic_auth_file:
        try:
            text = Path(args.prometheus_basic_auth_file).read_text().strip()
        except OSError as exc:
            raise ClusterError(f"--prometheus-basic-auth-file: {exc}") from None
        user, sep, password = text.partition(":")
        if not sep:
            raise ClusterError("--prometheus-basic-auth-file must hold user:password")
        basic_auth = (user, password)
    for flag in ("prometheus_bearer_token_file", "prometheus_ca_file"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise ClusterError(f"--{flag.replace('_', '-')}: no such file: {path}")
    cert = args.prometheus_client_cert
    settings = PrometheusSettings(
        url=args.prometheus_url,
        headers=headers,
        bearer_token_file=args.prometheus_bearer_token_file,
        basic_auth=basic_auth,
        ca_file=args.prometheus_ca_file,
        insecure_skip_verify=args.prometheus_insecure_skip_verify,
        client_cert=(cert, args.prometheus_client_key) if cert else None,
        timeout_s=args.prometheus_timeout,
    )
    return PrometheusMetrics(settings), settings.timeout_s + 2.0


def _shard_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= count <= 1024:
        raise argparse.ArgumentTypeError(f"{count} shards: give 1 to 1024")
    return count


def check_run(args: argparse.Namespace) -> str | None:
    """The first problem with ``canaryd run``'s flags taken together, or None; checked
    as the flags are parsed (a usage error, exit 2), before any cluster is contacted."""
    d = format_duration
    if args.lease_renew >= args.lease_duration:
        return (
            f"--lease-renew {d(args.lease_renew)} must be shorter than --lease-duration "
            f"{d(args.lease_duration)}: the leader must renew before its Lease runs out"
        )
    if args.lease_retry >= args.lease_duration:
        return (
            f"--lease-retry {d(args.lease_retry)} must be shorter than --lease-duration "
            f"{d(args.lease_duration)}"
        )
    if args.shards > 1 and not args.leader_elect:
        return "--shards needs --leader-elect: each shard is a Lease"
    if args.simulate and args.simulate_file:
        return "give --simulate or --simulate-file, not both"
    simulated = args.simulate or args.simulate_file
    if args.prometheus_url and simulated:
        return (
            "give either --prometheus-url (or $CANARYD_PROMETHEUS_URL) or "
            "--simulate/--simulate-file, not both"
        )
    if not args.prometheus_url and not simulated:
        return (
            "no metrics source: give --prometheus-url URL (or set CANARYD_PROMETHEUS_URL), "
            "or --simulate SCENARIO for a dry run on simulated traffic"
        )
    if bool(args.prometheus_client_cert) != bool(args.prometheus_client_key):
        return "--prometheus-client-cert and --prometheus-client-key go together"
    if args.api_reads_need_token and not args.api_token_file and args.listen != "off":
        return "--api-reads-need-token needs --api-token-file (or $CANARYD_API_TOKEN_FILE)"
    return None


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header(text: str) -> str:
    """An argparse type: ``'Name: value'``; the value is never echoed (often a secret)."""
    name, sep, _ = text.partition(":")
    if not sep or not _HEADER_NAME.fullmatch(name.strip()):
        raise argparse.ArgumentTypeError(
            "expected 'NAME: VALUE' with NAME of letters, digits and '-', e.g. "
            "'X-Scope-OrgID: team-a' (what was given is not shown: it may hold a secret)"
        )
    return text


def _listen(text: str) -> str:
    """An argparse type: ``HOST:PORT`` (``[::1]:8080``; port 0: any free one) or ``off``."""
    from canaryd.api import parse_listen  # noqa: PLC0415 - the web stack loads only for run

    if text.strip() != "off":
        try:
            parse_listen(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} (the flag or $CANARYD_LISTEN): expected HOST:PORT with a port "
                "from 0 to 65535, e.g. 127.0.0.1:8080 or [::1]:8080, or 'off'"
            ) from None
    return text.strip()


def add_parsers(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:  # type: ignore[type-arg]
    run = sub.add_parser(
        "run",
        help="run the controller daemon against a cluster",
        description=(
            "Run the canaryd controller: watch Canaries, move VirtualService traffic step by\n"
            "step, judge every step, roll back on evidence of harm, promote when done.\n"
            "Only the leader (a coordination.k8s.io Lease) acts when replicas run together.\n\n"
            "Metrics come from Prometheus (Istio's standard metrics by default; see\n"
            "spec.metrics for other labels or PromQL), or from simulated traffic for a dry\n"
            "run (--simulate SCENARIO).  Prometheus unreachable, slow or empty: canaries\n"
            "hold (never pass or roll back on missing data); analysis.noData decides what\n"
            "happens if it lasts.\n\n"
            "Examples:\n"
            "  canaryd run --prometheus-url http://prometheus.istio-system:9090\n"
            "  canaryd run --prometheus-url https://prom.example.com \\\n"
            "      --prometheus-bearer-token-file /var/run/secrets/prom/token\n"
            "  canaryd run --kubeconfig ~/.kube/config --simulate error-spike --no-leader-elect\n\n"
            "Stops cleanly on SIGTERM: the reconcile in progress finishes, the Lease is released."
        ),
        epilog=(
            "exit codes: 0 stopped cleanly (SIGTERM), 2 usage or runtime error (a bad flag,\n"
            "  no kubeconfig, the status API's address taken); see 'canaryd --help'"
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
    prom = run.add_argument_group("metrics: Prometheus")
    prom.add_argument(
        "--prometheus-url",
        type=http_url_arg("http://prometheus.istio-system:9090", env="CANARYD_PROMETHEUS_URL"),
        default=os.environ.get("CANARYD_PROMETHEUS_URL"),
        metavar="URL",
        help="Prometheus base URL, http(s)://HOST[:PORT][/PATH] (default: $CANARYD_PROMETHEUS_URL)",
    )
    prom.add_argument(
        "--prometheus-bearer-token-file",
        metavar="FILE",
        help="send this file's token as 'Authorization: Bearer' (re-read on every query)",
    )
    prom.add_argument(
        "--prometheus-basic-auth-file",
        metavar="FILE",
        help="basic auth: a file holding user:password",
    )
    prom.add_argument(
        "--prometheus-header",
        action="append",
        type=_header,
        metavar="'NAME: VALUE'",
        help="extra header on every query, e.g. 'X-Scope-OrgID: team-a' (repeatable)",
    )
    prom.add_argument("--prometheus-ca-file", metavar="FILE", help="CA bundle for https")
    prom.add_argument(
        "--prometheus-insecure-skip-verify",
        action="store_true",
        help="do not verify Prometheus's TLS certificate (testing only)",
    )
    prom.add_argument("--prometheus-client-cert", metavar="FILE", help="mutual TLS certificate")
    prom.add_argument("--prometheus-client-key", metavar="FILE", help="mutual TLS key")
    prom.add_argument(
        "--prometheus-timeout",
        type=duration_arg(maximum=MAX_REQUEST_TIMEOUT_S),
        default=5.0,
        metavar="D",
        help="deadline for one round's queries, retries included, above 0s and at most 10m "
        "(default 5s)",
    )
    sim = run.add_argument_group("metrics: simulated (dry run)")
    sim.add_argument(
        "--simulate",
        metavar="SCENARIO",
        help="read simulated traffic of this scenario instead of Prometheus",
    )
    sim.add_argument(
        "--simulate-file", metavar="FILE", help="simulated traffic from a scenario file"
    )
    sim.add_argument(
        "--simulate-speed",
        type=number_arg(float),
        default=1.0,
        metavar="X",
        help="virtual seconds per real second, above 0 (default 1)",
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
        "--shards",
        type=_shard_count,
        default=1,
        metavar="N",
        help="split the Canaries into N shards, one Lease each (<lease-name>-shard-<i>); "
        "every replica reconciles the Canaries of a fair share of them, and takes a lost "
        "replica's over (default 1: one leader for all)",
    )
    at_least_1s = duration_arg(minimum=1.0, inclusive=True)
    run.add_argument(
        "--lease-duration",
        type=at_least_1s,
        default=15.0,
        metavar="D",
        help="how long a Lease is valid after its last renewal, at least 1s (default 15s)",
    )
    run.add_argument(
        "--lease-renew",
        type=duration_arg(),
        default=10.0,
        metavar="D",
        help="how often the leader renews, shorter than --lease-duration (default 10s)",
    )
    run.add_argument(
        "--lease-retry",
        type=duration_arg(),
        default=2.0,
        metavar="D",
        help="how often a standby tries to take the Lease, shorter than --lease-duration "
        "(default 2s)",
    )
    run.add_argument(
        "--resync",
        type=at_least_1s,
        default=30.0,
        metavar="D",
        help="list Canaries this often, at least 1s (default 30s)",
    )
    run.add_argument(
        "--watch-timeout", type=at_least_1s, default=60.0, metavar="D", help=argparse.SUPPRESS
    )
    run.add_argument(
        "--status-refresh",
        type=duration_arg(inclusive=True),
        default=30.0,
        metavar="D",
        help="write an unchanged verdict's numbers at most this often (default 30s; "
        "0: every round; decisions are always written at once)",
    )
    run.add_argument(
        "--slo-refresh",
        type=duration_arg(),
        default=60.0,
        metavar="D",
        help="read every service's SLO figures (spec.analysis.slo) from Prometheus this "
        "often (default 60s; a service not read yet is read within 2s)",
    )
    web = run.add_argument_group("status API, dashboard and /metrics")
    web.add_argument(
        "--listen",
        type=_listen,
        default=os.environ.get("CANARYD_LISTEN", "127.0.0.1:8080"),
        metavar="HOST:PORT",
        help="where the API, dashboard, /metrics and probes listen (default 127.0.0.1:8080; "
        "0.0.0.0:8080 in a cluster; 'off' for none)",
    )
    web.add_argument(
        "--api-token-file",
        default=os.environ.get("CANARYD_API_TOKEN_FILE"),
        metavar="FILE",
        help="bearer tokens, one 'TOKEN,NAME,ROLE' per line (ROLE: viewer or operator); "
        "commands need an operator token (default: $CANARYD_API_TOKEN_FILE; none: "
        "commands over HTTP are refused)",
    )
    web.add_argument(
        "--api-reads-need-token",
        action="store_true",
        help="reads need a viewer or operator token too (default: reads are open)",
    )
    web.add_argument(
        "--api-cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let browser pages of this origin call the API (repeatable; default: none)",
    )
    note = run.add_argument_group(
        "notifications: Slack, webhooks, MQTT",
        "Secrets come from files (or the environment variables named), never from flags' "
        "values or the Canary spec.  Sinks never slow the control loop: each has a "
        "bounded queue (drops counted in canaryd_events_dropped_total).",
    )
    note.add_argument(
        "--slack-token-file", metavar="FILE",
        help="Slack bot token (xoxb-…; chat:write, usergroups:read) for messages updated "
        "in place and approval buttons (or $CANARYD_SLACK_TOKEN)",
    )  # fmt: skip
    note.add_argument(
        "--slack-signing-secret-file", metavar="FILE",
        help="Slack signing secret: enables POST /slack/interactions, the Approve and "
        "Abort buttons (or $CANARYD_SLACK_SIGNING_SECRET)",
    )  # fmt: skip
    note.add_argument(
        "--slack-webhook-url-file", metavar="FILE",
        help="Slack incoming-webhook URL: notifications only, no buttons, when there is no "
        "bot token (or $CANARYD_SLACK_WEBHOOK_URL)",
    )  # fmt: skip
    note.add_argument(
        "--slack-channel", metavar="CHANNEL",
        help="default channel for Canaries that name none (notifications.slack.channel, "
        "approvals.slack.channel)",
    )  # fmt: skip
    note.add_argument("--slack-api-url", metavar="URL", help=argparse.SUPPRESS)  # tests' double
    note.add_argument(
        "--dashboard-url", metavar="URL",
        help="the dashboard's public URL, for links in messages (e.g. https://canaryd.example.com)",
    )  # fmt: skip
    note.add_argument(
        "--webhook-secret-file", metavar="FILE",
        help="key that signs webhooks (X-Canaryd-Signature: sha256=HMAC of '<timestamp>.<body>'); "
        "without it no webhook is sent (or $CANARYD_WEBHOOK_SECRET)",
    )  # fmt: skip
    note.add_argument(
        "--mqtt-url", metavar="URL",
        help="broker, mqtt://HOST:1883 or mqtts://HOST:8883: events to "
        "<prefix>/<ns>/<name>/events (QoS 1), state retained on …/state",
    )  # fmt: skip
    note.add_argument("--mqtt-username", metavar="USER")
    note.add_argument("--mqtt-password-file", metavar="FILE", help="(or $CANARYD_MQTT_PASSWORD)")
    note.add_argument(
        "--mqtt-client-id", metavar="ID",
        help="unique per replica (default: canaryd-<hostname>; a broker disconnects a "
        "client when another connects with the same id)",
    )  # fmt: skip
    note.add_argument("--mqtt-topic-prefix", default="canaryd", metavar="PREFIX")
    note.add_argument("--mqtt-ca-file", metavar="FILE", help="CA bundle for mqtts://")
    note.add_argument(
        "--mqtt-command-user", action="append", metavar="USER",
        help="accept commands from this MQTT user on <prefix>/<ns>/<name>/commands/<USER> "
        "(repeatable; the broker's ACL must bind the topic to the user; default: no "
        "commands over MQTT)",
    )  # fmt: skip
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="json", choices=["json", "console"])
    run.set_defaults(cluster_handler="run", check=check_run)

    promote = sub.add_parser(
        "promote",
        help="start a rollout of a new revision (pipelines: --wait)",
        description=(
            "Ask canaryd to roll out a revision on the Canary NAME.\n\n"
            "With --wait, follow the rollout and exit with its outcome:\n"
            "  0 promoted   1 rolled back   2 error   3 timeout"
        ),
        epilog=(
            "exit codes: 0 requested (with --wait: promoted), 1 rolled back (--wait),\n"
            "  2 usage or runtime error (with --wait: also failed or superseded),\n"
            "  3 timed out (--wait --timeout D); see 'canaryd --help'"
        ),
        formatter_class=fmt,
    )
    promote.add_argument("name", metavar="NAME")
    add_kube_flags(promote)
    promote.add_argument("--revision", metavar="R", help="revision label (default: a timestamp)")
    promote.add_argument("--wait", action="store_true", help="follow the rollout to its end")
    promote.add_argument(
        "--fix",
        action="store_true",
        help="the release is a fix: the error-budget policy lets it start when releases "
        "are frozen (budget exhausted or burning fast)",
    )
    promote.add_argument(
        "--timeout",
        type=duration_arg(),
        default=3600.0,
        metavar="D",
        help="with --wait: give up (exit 3) after this long, above 0s (default 1h)",
    )
    promote.add_argument(
        "--poll", type=duration_arg(), default=1.0, metavar="D", help=argparse.SUPPRESS
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
    approve.add_argument(
        "--reason",
        default="",
        help="recorded with the approval; an override of the error-budget policy needs one",
    )
    approve.add_argument(
        "--step",
        type=number_arg(int, maximum=100),
        metavar="WEIGHT",
        help="the step's weight, 1 to 100, e.g. 50",
    )
    _command_parser(
        sub, fmt, "skip", "treat a Canary's current step as passed",
        "Skip the current step of the Canary NAME.",
    )  # fmt: skip

    slo = sub.add_parser(
        "slo",
        help="show each service's SLO figures and error-budget policy tier",
        description=(
            "Show every service's objectives: achieved availability (or latency), error\n"
            "budget left, burn rates over 5m/1h/6h/1d, firing multi-window pairs, and the\n"
            "release-policy tier they put the service in.\n\n"
            "With --server, asks a running canaryd (its last reading); otherwise reads\n"
            "the cluster's Canaries and their figures from Prometheus now.\n\n"
            "examples:\n"
            "  canaryd slo -n shop --prometheus-url http://prometheus.istio-system:9090\n"
            "  canaryd slo -A --server http://canaryd.canaryd:8080 --json"
        ),
        epilog="exit codes: 0 shown, 2 usage or runtime error (e.g. Prometheus unreachable)",
        formatter_class=fmt,
    )
    add_kube_flags(slo)
    slo.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    slo.add_argument("--json", action="store_true", help="print one JSON array")
    slo.add_argument("-v", "--verbose", action="store_true", help="also print each tier's reason")
    _add_slo_prometheus_flags(slo)
    slo.set_defaults(cluster_handler="slo")

    status = sub.add_parser(
        "status",
        help="show Canaries and their last verdicts",
        formatter_class=fmt,
        description=(
            "Show one Canary (with its last verdict's reasons) or all of a namespace.\n"
            "Canaries with an SLO also show their service's error budget and policy tier:\n"
            "with --server from the running canaryd, else from --prometheus-url."
        ),
        epilog="exit codes: 0 shown, 2 usage or runtime error (e.g. Canary not found); "
        "see 'canaryd --help'",
    )
    status.add_argument("name", nargs="?", metavar="NAME")
    add_kube_flags(status)
    status.add_argument("-A", "--all-namespaces", action="store_true")
    status.add_argument("--watch", action="store_true", help="refresh every 2 seconds")
    status.add_argument("--json", action="store_true")
    status.add_argument(
        "--lease-namespace",
        default="default",
        metavar="NS",
        help="where canaryd run keeps its Leases, to show which replica holds which shard "
        "(as run's flag; default default)",
    )
    status.add_argument("--lease-name", default="canaryd-leader", metavar="NAME")
    _add_slo_prometheus_flags(status, "to show the error budgets of Canaries with an SLO, ")
    status.set_defaults(cluster_handler="status")


def _add_slo_prometheus_flags(parser: argparse.ArgumentParser, why: str = "") -> None:
    """Where ``canaryd slo`` and ``canaryd status`` read SLO figures without --server."""
    parser.add_argument(
        "--prometheus-url",
        type=http_url_arg("http://prometheus.istio-system:9090", env="CANARYD_PROMETHEUS_URL"),
        default=os.environ.get("CANARYD_PROMETHEUS_URL"),
        metavar="URL",
        help=f"Prometheus base URL, {why}without --server (default: $CANARYD_PROMETHEUS_URL)",
    )
    parser.add_argument(
        "--prometheus-bearer-token-file", metavar="FILE", help="bearer token for Prometheus"
    )


def _command_parser(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    fmt: type[argparse.HelpFormatter],
    name: str,
    help_text: str,
    description: str,
) -> argparse.ArgumentParser:
    """A command that writes one command onto the Canary NAME."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=description,
        epilog="exit codes: 0 command written on the Canary, 2 usage or runtime error\n"
        "  (e.g. Canary not found); see 'canaryd --help'",
        formatter_class=fmt,
    )
    parser.add_argument("name", metavar="NAME")
    add_kube_flags(parser)
    parser.set_defaults(cluster_handler="command")
    return parser


def handle(args: argparse.Namespace, out: TextIO) -> int:
    """Run a cluster command; ClusterError for what the user can fix."""
    server = getattr(args, "server", None)
    if server and args.cluster_handler != "run":
        from canaryd.backends import HttpBackend  # noqa: PLC0415

        try:
            return asyncio.run(
                _through(
                    args, HttpBackend(server, _token(args), args.request_timeout), "default", out
                )
            )
        except (BackendError, KubeError) as exc:
            raise ClusterError(str(exc)) from None
    client, default_ns = api_client(args)
    try:
        if args.cluster_handler == "run":
            return asyncio.run(_run_daemon(args, client, out))
        kube = Kube(client, timeout_s=args.request_timeout)
        backend = KubeBackend(
            kube,
            getattr(args, "lease_namespace", "default"),
            getattr(args, "lease_name", "canaryd-leader"),
        )
        return asyncio.run(_through(args, backend, default_ns, out))
    except BackendError as exc:
        raise ClusterError(str(exc)) from None
    except NotFoundError as exc:
        raise ClusterError(str(exc)) from None
    except KubeError as exc:
        raise ClusterError(f"Kubernetes API: {exc}") from None
    finally:
        client.close()


async def _through(args: argparse.Namespace, backend: Backend, default_ns: str, out: TextIO) -> int:
    try:
        if args.cluster_handler == "status":
            return await _status(args, backend, default_ns, out)
        if args.cluster_handler == "slo":
            return await _slo(args, backend, default_ns, out)
        ref = _ref(args, default_ns)
        if args.cluster_handler == "promote":
            return await _promote(args, backend, ref, out)
        return await _command(args, backend, ref, out)
    finally:
        await backend.close()


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip() or None
        except OSError as exc:
            raise ClusterError(f"--token-file: {exc.strerror}: {args.token_file}") from None
    return os.environ.get("CANARYD_TOKEN") or None
