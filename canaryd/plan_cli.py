"""``canaryd plan``: the flags, reading the traffic, and the printed plan.

The arithmetic is :mod:`canaryd.plan`; the traffic comes from flags, a scenario, or a
live service's Prometheus (:meth:`canaryd.prometheus.PrometheusMetrics.traffic`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TextIO

from analysis.verdict import format_duration
from canaryd.cli import (
    EXIT_OK,
    CliError,
    _spec_error_text,
    duration_arg,
    number_arg,
)
from canaryd.plan import Detection, Plan, TrafficProfile, fmt_chance, make_plan
from canaryd.ports import MetricsError
from canaryd.spec import CanarySpec, SpecError, load_spec_file, parse_spec
from simulator import Scenario, ScenarioError, get_scenario, load_scenario_file

PLAN_HELP = """\
Predict how a Canary spec behaves on a service's traffic, in about a second: how long a
healthy rollout takes, and for each step how long (and how many requests) until errors
x1.5/x2/x5 and p99 x1.5/x2 are caught, how often a regression the typical rollout
misses is caught anyway, and what to change.

Each prediction is the real state machine and analysis run on the expected traffic
(no randomness): the typical rollout.  'canaryd simulate --runs N' measures the spread.

traffic, one of:
  --rps N [--error-pct P] [--p50-ms M] [--p99-ms M] [--error-cv X]
  --scenario NAME | --scenario-file FILE     (its stable's traffic; also predicts its canary)
  --from-prometheus URL --namespace NS       (the live stable's last --window)

examples:
  canaryd plan --rps 2
  canaryd plan --spec canary.yaml --rps 300 --error-pct 0.2 --p99-ms 450
  canaryd plan --scenario bursty-regression --json
  canaryd plan --spec canary.yaml --from-prometheus http://prometheus:9090 --namespace shop
"""


def _load_spec(path: str | None) -> CanarySpec:
    try:
        return load_spec_file(path) if path else parse_spec({})
    except SpecError as exc:
        raise CliError(_spec_error_text(exc, "--spec")) from None


def _scenario(args: argparse.Namespace) -> Scenario | None:
    try:
        if args.scenario_file:
            return load_scenario_file(args.scenario_file)
        if args.scenario:
            return get_scenario(args.scenario)
    except ScenarioError as exc:
        raise CliError(str(exc)) from None
    return None


def _from_prometheus(args: argparse.Namespace, spec: CanarySpec) -> TrafficProfile:
    from canaryd.prometheus import PrometheusMetrics, PrometheusSettings  # noqa: PLC0415
    from canaryd.redact import redact  # noqa: PLC0415

    token = args.prometheus_bearer_token_file
    if token and not Path(token).is_file():
        raise CliError(f"--prometheus-bearer-token-file: no such file: {token}")
    settings = PrometheusSettings(
        url=args.from_prometheus, bearer_token_file=token, timeout_s=args.prometheus_timeout
    )
    source = PrometheusMetrics(settings)
    try:
        traffic = asyncio.run(source.traffic(spec, args.namespace, args.window))
    except MetricsError as exc:
        raise CliError(f"--from-prometheus: {exc}") from None
    finally:
        source.close()
    return TrafficProfile(
        rps=traffic.rps,
        error_rate=traffic.error_rate,
        p50_ms=traffic.p50_ms,
        p99_ms=traffic.p99_ms,
        error_cv=traffic.error_cv,
        source=(
            f"Prometheus {redact(args.from_prometheus)}, namespace {args.namespace}, "
            f"last {format_duration(traffic.window_s)}"
        ),
    )


def _profile(
    args: argparse.Namespace, spec: CanarySpec, scenario: Scenario | None
) -> TrafficProfile:
    try:
        if scenario is not None:
            return TrafficProfile.of_scenario(scenario)
        if args.from_prometheus:
            return _from_prometheus(args, spec)
        return TrafficProfile(
            rps=args.rps,
            error_rate=(0.5 if args.error_pct is None else args.error_pct) / 100.0,
            p50_ms=40.0 if args.p50_ms is None else args.p50_ms,
            p99_ms=180.0 if args.p99_ms is None else args.p99_ms,
            error_cv=args.error_cv or 0.0,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def check_plan(args: argparse.Namespace) -> str | None:
    """The first problem with the flags taken together (a usage error), or None."""
    sources = [
        name
        for name, given in (
            ("--rps", args.rps is not None),
            ("--scenario/--scenario-file", bool(args.scenario or args.scenario_file)),
            ("--from-prometheus", bool(args.from_prometheus)),
        )
        if given
    ]
    by_hand = [
        f"--{name.replace('_', '-')}"
        for name in ("error_pct", "p50_ms", "p99_ms", "error_cv")
        if getattr(args, name) is not None
    ]
    if by_hand and args.rps is None:
        return f"{', '.join(by_hand)} describe traffic given by hand: add --rps N"
    if not sources:
        return (
            "say what the traffic looks like: --rps N, --scenario NAME, or "
            "--from-prometheus URL --namespace NS"
        )
    if len(sources) > 1:
        return f"give one source of traffic, not {' and '.join(sources)}"
    if args.namespace and not args.from_prometheus:
        return "--namespace goes with --from-prometheus URL"
    if args.from_prometheus and not args.namespace:
        return "--from-prometheus needs --namespace NS (where the stable runs)"
    return None


def cmd_plan(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    spec = _load_spec(args.spec)
    scenario = _scenario(args)
    profile = _profile(args, spec, scenario)
    plan = make_plan(spec, profile, scenario=scenario)
    if args.json:
        out.write(json.dumps(plan.to_json(), allow_nan=False) + "\n")
    else:
        out.write(render(plan))
    return EXIT_OK


# -- the printed plan ----------------------------------------------------------------------


def _count(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}"


def _cell(d: Detection, weights: tuple[int, ...]) -> str:
    if d.caught and d.time_s is not None:
        where = "" if d.caught_step == d.start_step else f" (at {weights[d.caught_step or 0]}%)"
        return (
            f"{format_duration(d.time_s)}{where} · {_count(d.requests)} · {_count(d.bad_requests)}"
        )
    chance = d.catch_probability
    if chance is None or chance < 0.005:
        return "missed"
    return f"missed ({fmt_chance(chance)} caught)"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


def render(plan: Plan) -> str:
    """The plan for a person: traffic, healthy rollout, detection table, advice."""
    p = plan.profile
    d = format_duration
    lines = [
        f"canaryd plan · {p.rps:g} req/s · errors {100 * p.error_rate:.3g}% · p50 {p.p50_ms:g} ms"
        f" · p99 {p.p99_ms:g} ms" + (f" · error CV {p.error_cv:.2g}" if p.error_cv else ""),
        f"  traffic from {p.source}",
        f"  spec: steps {' → '.join(f'{w}%' for w in plan.steps)} · interval {d(plan.interval_s)}"
        f" · stepDuration {d(plan.step_duration_s)} · minRequests {plan.min_requests}"
        f" · alpha {100 * plan.alpha:g}%",
        "",
    ]
    if plan.healthy_time_s is not None:
        lines.append(f"healthy rollout: promoted after {d(plan.healthy_time_s)}")
    else:
        lines.append(f"healthy rollout: does not finish ({plan.healthy_outcome})")
    rows = [["step", "canary req/s", "minRequests after", "healthy step ends"]]
    for step in plan.step_plans:
        ends = step.how if step.duration_s is None else f"{step.how} after {d(step.duration_s)}"
        reach = d(round(step.min_requests_s)) if step.min_requests_s is not None else "never"
        rows.append([f"{step.weight}%", f"{step.canary_rps:.3g}", reach, ends])
    lines += _table(rows)
    lines += [
        "",
        "time to rollback · requests (both arms) · bad canary requests, by the step the "
        "regression starts at:",
    ]
    labels = [det.label for det in plan.step_plans[0].detections] if plan.step_plans else []
    rows = [["regression", *(f"from {w}%" for w in plan.steps)]]
    for i, label in enumerate(labels):
        row = [label]
        for step in plan.step_plans:
            row.append(_cell(step.detections[i], plan.steps) if i < len(step.detections) else "—")
        rows.append(row)
    lines += _table(rows)
    if plan.scenario is not None:
        name, outcome, time_s = plan.scenario
        ends = {"promoted": "promoted", "rolled_back": "rolled back"}.get(outcome, outcome)
        text = f"{ends} after {d(time_s)}"
        for det in plan.extra:
            if det.caught:
                text += (
                    f" ({_count(det.requests)} requests, {_count(det.bad_requests)} bad canary "
                    "requests)"
                )
            elif det.catch_probability is not None:
                text += f"; its regression is caught in {fmt_chance(det.catch_probability)}"
                text += " of rollouts"
        lines += ["", f"scenario {name} itself, on its typical path: {text}"]
    lines += ["", "notes:"]
    lines += [f"  - {note}" for note in plan.notes]
    lines += ["", "recommendations:"]
    lines += [f"  - {advice}" for advice in plan.recommendations]
    return "\n".join(lines) + "\n"


def add_parser(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "plan",
        help="predict detection times and healthy rollout time for a spec and traffic",
        description=PLAN_HELP,
        epilog="exit codes: 0 planned, 2 usage or runtime error (e.g. Prometheus unreachable)",
        formatter_class=fmt,
    )
    parser.add_argument(
        "--spec",
        metavar="FILE",
        help="Canary spec or resource YAML (default: built-in defaults)",
    )
    traffic = parser.add_argument_group("traffic given by hand")
    traffic.add_argument(
        "--rps", type=number_arg(float), metavar="N", help="total requests per second"
    )
    traffic.add_argument(
        "--error-pct",
        type=number_arg(float, inclusive=True, maximum=99.0),
        metavar="P",
        help="stable's 5xx share, percent (default: 0.5)",
    )
    traffic.add_argument(
        "--p50-ms",
        type=number_arg(float),
        metavar="MS",
        help="stable's median latency (default: 40)",
    )
    traffic.add_argument(
        "--p99-ms", type=number_arg(float), metavar="MS", help="stable's p99 latency (default: 180)"
    )
    traffic.add_argument(
        "--error-cv",
        type=number_arg(float, inclusive=True, maximum=3.0),
        metavar="X",
        help="how much the error rate varies minute to minute, as a coefficient of "
        "variation (default: 0, independent requests; 0.5 is bursty)",
    )
    scen = parser.add_argument_group("traffic from a scenario")
    which = scen.add_mutually_exclusive_group()
    which.add_argument(
        "--scenario", metavar="NAME", help="built-in scenario (see 'canaryd scenarios')"
    )
    which.add_argument("--scenario-file", metavar="FILE", help="scenario YAML file")
    prom = parser.add_argument_group("traffic from a live service")
    prom.add_argument("--from-prometheus", metavar="URL", help="Prometheus base URL")
    prom.add_argument("--namespace", metavar="NS", help="the service's namespace")
    prom.add_argument(
        "--window",
        type=duration_arg(minimum=60.0, inclusive=True, maximum=7 * 86400.0),
        default=3600.0,
        metavar="D",
        help="how far back to read the traffic (default: 1h)",
    )
    prom.add_argument(
        "--prometheus-bearer-token-file", metavar="FILE", help="bearer token for Prometheus"
    )
    prom.add_argument(
        "--prometheus-timeout",
        type=duration_arg(),
        default=10.0,
        metavar="D",
        help="deadline for the queries (default: 10s)",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.set_defaults(handler=cmd_plan, check=check_plan)
