"""The ``canaryd`` command line.

The CLI only maps flags onto the library: ``simulate`` onto
:mod:`canaryd.simulate`, ``validate`` onto :mod:`canaryd.spec`, ``convert`` onto
:mod:`canaryd.convert`, ``scenarios`` onto the simulator's scenario catalogue.
Errors a person can fix are printed as one ``canaryd: error: …`` line (exit 2),
never as a traceback; so is any unexpected exception (``--debug`` adds its
traceback).  The exit codes are in :data:`EXIT_CODES_HELP`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

from analysis.verdict import format_duration
from canaryd.redact import MASK, redact
from canaryd.simulate import Event, MonteCarlo, RunResult, Sample, simulate_many, simulate_once
from canaryd.spec import (
    CanarySpec,
    SpecError,
    cluster_warnings,
    load_spec_file,
    parse_duration,
    parse_spec,
)
from canaryd.status import CanaryStatus
from simulator import BUILTIN_SCENARIOS, Scenario, ScenarioError, get_scenario, load_scenario_file

EXIT_OK, EXIT_REJECTED, EXIT_ERROR, EXIT_TIMEOUT, EXIT_UNFINISHED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130

#: The exit codes of every command (``canaryd --help`` and README.md say the same).
EXIT_CODES_HELP = """\
exit codes (every command):
  0    success: promoted, valid, command written, stopped cleanly
  1    rolled back (simulate, promote --wait) or invalid (validate)
  2    usage or runtime error: one 'canaryd…: error: …' line on stderr
       (an unexpected one too; --debug adds its traceback)
  3    timeout (promote --wait --timeout D)
  4    simulate only: held or waiting for approval when the scenario ended
  130  interrupted (Ctrl-C)
"""


class CliError(Exception):
    """An error the user can fix: printed as one line, exit code 2."""


def one_line(text: str) -> str:
    """``text`` on one line: every run of whitespace (newlines too) becomes one space."""
    return " ".join(text.split())


# -- flag values (argparse types: a bad value is a one-line usage error, exit 2) ----------


def duration_arg(
    *, minimum: float = 0.0, inclusive: bool = False, maximum: float | None = None
) -> Callable[[str], float]:
    """An argparse type: a duration (``30s``, ``1m30s``, ``90``) in seconds, above
    ``minimum`` (or at least it, if ``inclusive``) and at most ``maximum``."""
    bound = f"{'at least' if inclusive else 'longer than'} {format_duration(minimum)}"
    if maximum is not None:
        bound += f" and at most {format_duration(maximum)}"

    def duration(text: str) -> float:
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        low = seconds < minimum if inclusive else seconds <= minimum
        if low or (maximum is not None and seconds > maximum):
            raise argparse.ArgumentTypeError(f"must be {bound} (got {text!r})")
        return seconds

    return duration


def number_arg(
    kind: type[int] | type[float],
    *,
    minimum: float = 0.0,
    inclusive: bool = False,
    maximum: float | None = None,
) -> Callable[[str], float]:
    """An argparse type: a finite number (a whole one if ``kind`` is int) above
    ``minimum`` (or at least it, if ``inclusive``) and at most ``maximum``."""
    what = "a whole number" if kind is int else "a number"
    bound = f"{minimum:g} or more" if inclusive else f"more than {minimum:g}"
    if maximum is not None:
        bound += f" and at most {maximum:g}"

    def number(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, {bound} (got {text!r})") from None
        low = value < minimum if inclusive else value <= minimum
        if not math.isfinite(value) or low or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {what}, {bound} (got {text!r})")
        return value

    return number


def shown_url(text: str) -> str:
    """``text`` (a URL, or what should have been one) safe to print: credentials and
    secret query parameters masked (:func:`canaryd.redact.redact`), and, should an
    ``@`` remain (no scheme, a ``/`` in the password), all up to the last ``@`` too."""
    shown = redact(text)
    scheme, sep, rest = shown.partition("://")
    if not sep:
        scheme, rest = "", shown
    if "@" in rest and not rest.startswith(f"{MASK}@"):
        rest = f"{MASK}@{rest.rpartition('@')[2]}"
    return f"{scheme}{sep}{rest}"


def http_url_arg(example: str, env: str | None = None) -> Callable[[str], str]:
    """An argparse type: an ``http(s)://HOST[:PORT][/PATH]`` base URL (no query, no
    fragment); a bad one is echoed with its credentials masked (:func:`shown_url`)."""
    source = f" (the flag or ${env})" if env else ""

    def url(text: str) -> str:
        value = text.strip()
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:  # its text may quote part of a password: not shown
            problem = "a port that is not a number from 1 to 65535, or a malformed host"
        else:
            if parts.scheme not in ("http", "https"):
                problem = "not an http:// or https:// URL"
            elif not parts.hostname:
                problem = "no host"
            elif port == 0:
                problem = "port 0"
            elif any(c.isspace() for c in value):
                problem = "spaces in it"
            elif parts.query or parts.fragment:
                problem = "a query or fragment: give the base URL only"
            else:
                return value
        raise argparse.ArgumentTypeError(
            f"{shown_url(value)!r}{source}: {problem}; "
            f"expected http(s)://HOST[:PORT][/PATH], e.g. {example}"
        )

    return url


def _version() -> str:
    try:
        return version("canaryd")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


# -- simulate ----------------------------------------------------------------------------

SIMULATE_HELP = """\
Dry-run a canary rollout on synthetic traffic, in virtual time, with the real state
machine and analysis.  No cluster, no Prometheus: answers "would this config catch a
2x error regression, and how fast?" and "how often would it roll back a healthy
release?" before the config meets production.

examples:
  canaryd simulate --scenario healthy
  canaryd simulate --scenario error-regression --spec canary.yaml
  canaryd simulate --scenario-file my-incident.yaml --report out.html
  canaryd simulate --scenario healthy --runs 200 --seed 1 --json

exit codes:
  0  promoted            1  rolled back          2  usage or runtime error
  4  held or waiting for approval when the scenario ended
  (with --runs, 0 once all runs completed: read the outcome counts)
"""


#: The cohort ``canaryd simulate`` A/B-tests when a scenario asks for abTest and no
#: spec is given (the simulated mesh sends ``traffic.cohort_pct`` of requests with it).
DEFAULT_COHORT = {"headers": {"x-canary": {"exact": "insider"}}}


def _load_inputs(args: argparse.Namespace) -> tuple[CanarySpec, Scenario]:
    try:
        spec = load_spec_file(args.spec) if args.spec else parse_spec({})
    except SpecError as exc:
        raise CliError(_spec_error_text(exc, "--spec")) from None
    try:
        if args.scenario_file:
            scenario = load_scenario_file(args.scenario_file)
        else:
            scenario = get_scenario(args.scenario or "healthy")
    except ScenarioError as exc:
        raise CliError(str(exc)) from None
    if not args.spec and scenario.strategy == "abTest":
        spec = parse_spec({"strategy": "abTest", "match": [DEFAULT_COHORT]})
    elif not args.spec and scenario.strategy == "blueGreen":
        spec = parse_spec({"strategy": "blueGreen", "blueGreen": {"mirrorPercent": 100}})
    return spec, scenario


def _spec_error_text(exc: SpecError, flag: str) -> str:
    where = f"{flag} {exc.source}" if exc.source else flag
    if len(exc.problems) == 1:
        return f"{where}: {exc.problems[0]}"
    return f"{where}: {len(exc.problems)} problems: " + "; ".join(exc.problems)


class _LiveView:
    """Human progress for a single run: events as lines, the latest verdict live."""

    def __init__(self, out: TextIO, spec: CanarySpec, speed: float) -> None:
        self.out = out
        self.tty = out.isatty()
        self.spec = spec
        self.speed = speed
        self.last_t = 0.0
        self.live = False

    def _clear(self) -> None:
        if self.live:
            self.out.write("\r\033[2K")
            self.live = False

    def _pace(self, t_s: float) -> None:
        if self.speed > 0 and t_s > self.last_t:
            self.out.flush()
            time.sleep((t_s - self.last_t) / self.speed)
        self.last_t = max(self.last_t, t_s)

    def event(self, event: Event) -> None:
        self._clear()
        mark = "!" if event.warning else "·"
        self.out.write(f"{_clock(event.t_s)}  {mark} {event.reason:<15} {event.message}\n")

    def sample(self, sample: Sample, status: CanaryStatus) -> None:
        self._pace(sample.t_s)
        if not self.tty or not sample.decision:
            return
        self._clear()
        n = len(self.spec.steps)
        reason = sample.reasons[0] if sample.reasons else ""
        line = (
            f"{_clock(sample.t_s)}    step {status.step_index + 1}/{n} · canary "
            f"{status.canary_weight:>3}% · {sample.decision}: {reason}"
        )
        self.out.write(line[:160])
        self.out.flush()
        self.live = True

    def done(self) -> None:
        self._clear()


def _clock(t_s: float) -> str:
    minutes, seconds = divmod(int(t_s), 60)
    return f"{minutes:>3}:{seconds:02d}"


def _print_run(out: TextIO, result: RunResult) -> None:
    titles = {
        "promoted": "PROMOTED",
        "rolled_back": "ROLLED BACK",
        "held": "HELD (not finished when the scenario ended)",
        "waiting_approval": "WAITING FOR APPROVAL when the scenario ended",
        "failed": "FAILED",
    }
    out.write(f"\n{titles[result.outcome]} after {format_duration(result.duration_s)}\n")
    out.write(
        f"  canary served {result.canary_requests:,} requests, {result.canary_errors:,} errors\n"
    )
    out.write("  steps:\n")
    for step in result.steps:
        end = _clock(step.ended_s).strip() if step.ended_s is not None else "…"
        out.write(
            f"    {step.weight:>3}%  {_clock(step.started_s).strip():>6} → {end:<6}  "
            f"{step.verdict or '-'}\n"
        )
    out.write("  why:\n")
    for reason in result.reasons:
        out.write(f"    - {reason}\n")


def _print_monte_carlo(out: TextIO, mc: MonteCarlo) -> None:
    data = mc.to_json()
    runs = data["runs"]
    out.write(f"\n{runs} runs of scenario {mc.scenario}\n")
    for outcome, count in data["outcomes"].items():
        out.write(f"  {outcome:<17} {count:>6}  ({100 * count / runs:5.1f}%)\n")
    out.write(f"  median duration        {format_duration(data['median_duration_s'])}\n")
    out.write(f"  median canary errors   {data['median_canary_errors']:g}\n")


def cmd_simulate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.runs < 1:
        raise CliError("--runs must be at least 1")
    if args.speed < 0:
        raise CliError("--speed must be 0 (as fast as possible) or more")
    spec, scenario = _load_inputs(args)
    report_path = args.report
    if args.runs == 1:
        view = None if args.json else _LiveView(out, spec, args.speed)
        if view is not None:
            steps = " → ".join(f"{w}%" for w in spec.steps)
            out.write(
                f"canaryd simulate · scenario {scenario.name} · seed {args.seed} · steps {steps}"
                f" · interval {format_duration(spec.analysis.interval)}\n"
            )
            if scenario.description:
                out.write(f"  {scenario.description}\n")
        result = simulate_once(
            spec,
            scenario,
            args.seed,
            on_sample=view.sample if view else None,
            on_event=view.event if view else None,
        )
        if view is not None:
            view.done()
            _print_run(out, result)
        else:
            _emit_json(out, result.to_json())
        _write_report(report_path, result, spec, None, out if not args.json else err)
        return result.exit_code
    progress = _Progress(err, args.runs) if err.isatty() else None
    mc = simulate_many(spec, scenario, args.seed, args.runs, progress.update if progress else None)
    if progress is not None:
        progress.done()
    if args.json:
        _emit_json(out, mc.to_json())
    else:
        _print_monte_carlo(out, mc)
    _write_report(report_path, mc.runs[0], spec, mc, out if not args.json else err)
    return EXIT_OK


class _Progress:
    def __init__(self, err: TextIO, total: int) -> None:
        self.err, self.total, self.rolled_back = err, total, 0

    def update(self, done: int, result: RunResult) -> None:
        self.rolled_back += result.outcome == "rolled_back"
        self.err.write(f"\rrun {done}/{self.total} · rolled back so far: {self.rolled_back}")
        self.err.flush()

    def done(self) -> None:
        self.err.write("\r\033[2K")
        self.err.flush()


def _write_report(
    path: str | None,
    result: RunResult,
    spec: CanarySpec,
    mc: MonteCarlo | None,
    note: TextIO,
) -> None:
    if not path:
        return
    from canaryd.report import write_report  # noqa: PLC0415 - only when asked for

    try:
        write_report(path, result, spec, mc)
    except OSError as exc:
        raise CliError(f"--report {path}: cannot write the report: {exc.strerror or exc}") from None
    note.write(f"report written to {path}\n")


def _emit_json(out: TextIO, data: dict[str, Any]) -> None:
    out.write(json.dumps(data, allow_nan=False) + "\n")


# -- scenarios -----------------------------------------------------------------------------


def cmd_scenarios(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.name:
        try:
            scenario = get_scenario(args.name)
        except ScenarioError as exc:
            raise CliError(str(exc)) from None
        if args.json:
            _emit_json(out, scenario.model_dump(mode="json"))
        else:
            out.write(scenario.to_yaml())
        return EXIT_OK
    if args.json:
        _emit_json(
            out,
            {
                "scenarios": [
                    {"name": n, "description": s.description} for n, s in BUILTIN_SCENARIOS.items()
                ]
            },
        )
        return EXIT_OK
    width = max(len(n) for n in BUILTIN_SCENARIOS)
    for name, scenario in BUILTIN_SCENARIOS.items():
        out.write(f"{name:<{width}}  {scenario.description}\n")
    out.write(
        "\nShow one as a YAML file to start your own from: canaryd scenarios NAME > mine.yaml\n"
        "Run it: canaryd simulate --scenario-file mine.yaml\n"
    )
    return EXIT_OK


# -- validate ------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:  # a file that cannot be read is a usage error (2), not an invalid spec (1)
        with Path(args.file).open("rb"):
            pass
    except OSError as exc:
        raise CliError(f"{args.file}: cannot read it: {exc.strerror or exc}") from None
    try:
        spec = load_spec_file(args.file)
    except SpecError as exc:
        if args.json:
            _emit_json(
                out, {"file": args.file, "valid": False, "errors": exc.problems, "warnings": []}
            )
        else:
            count = len(exc.problems)
            out.write(f"{args.file}: invalid ({count} problem{'s' * (count > 1)})\n")
            for problem in exc.problems:
                out.write(f"  error: {problem}\n")
        return EXIT_REJECTED
    warnings = cluster_warnings(spec)
    valid = not (args.strict and warnings)
    if args.json:
        _emit_json(out, {"file": args.file, "valid": valid, "errors": [], "warnings": warnings})
    else:
        steps = " → ".join(
            f"{w}% + {m}% mirror" if (m := spec.mirror_pct(i)) else f"{w}%"
            for i, w in enumerate(spec.steps)
        )
        if spec.strategy == "abTest":
            plan = spec.step_traffic(0)  # one step: the cohort's
        else:
            plan = ("blue/green, " if spec.strategy == "blueGreen" else "") + f"steps {steps}"
        state = "valid" if valid else "invalid (--strict)"
        out.write(f"{args.file}: {state}; {plan}\n")
        for warning in warnings:
            out.write(f"  {'error' if args.strict else 'warning'}: {warning}\n")
    return EXIT_OK if valid else EXIT_REJECTED


# -- crd -----------------------------------------------------------------------------------


def cmd_crd(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from canaryd.crd import crd_yaml  # noqa: PLC0415 - keeps `canaryd simulate` start-up lean

    out.write(crd_yaml())
    return EXIT_OK


# -- convert -------------------------------------------------------------------------------

CONVERT_HELP = """\
Turn a Flagger Canary (flagger.app/v1beta1) into a canaryd Canary.  The canaryd YAML
goes to stdout; every Flagger field that does not carry over as it was is named on
stderr, one 'warning: PATH: what happened' line each.  Nothing is contacted or applied.

What maps: targetRef NAME -> stable NAME-primary and canary NAME (trigger auto,
copy-to-stable); stepWeights, or stepWeight up to maxWeight -> steps (ending at 100);
interval; request-success-rate min -> errorRate.maxPct; request-duration max -> the
p99 latency maxMs; confirm-rollout, confirm-traffic-increase and confirm-promotion
hooks -> approvals.before; event hooks -> notifications.webhooks.  The rest (threshold,
custom metric templates, load-test hooks, match, iterations, alerts...) is warned
about.  docs/migrating.md has the whole table.

FILE may hold several documents, or a kubectl List: each Flagger Canary is
converted, anything else is skipped with a warning.

examples:
  canaryd convert podinfo-canary.yaml > podinfo.yaml && canaryd validate podinfo.yaml
  kubectl get canaries.flagger.app -n test -o yaml | canaryd convert - --strict
  canaryd convert podinfo-canary.yaml --destination-rule podinfo --route primary
"""


def check_convert(args: argparse.Namespace) -> str | None:
    """The first problem with the flags taken together (a usage error), or None."""
    if (args.stable_subset or args.canary_subset) and not args.destination_rule:
        return "--stable-subset and --canary-subset go with --destination-rule NAME"
    return None


def _read_input(file: str) -> tuple[str, str]:
    """(text, name to show) of FILE, or of stdin for ``-``."""
    if file == "-":
        try:
            return sys.stdin.read(), "<stdin>"
        except UnicodeDecodeError as exc:
            raise CliError(f"<stdin>: not UTF-8 text: {exc.reason}") from None
    try:
        return Path(file).read_text(encoding="utf-8"), file
    except UnicodeDecodeError as exc:
        raise CliError(f"{file}: not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise CliError(f"{file}: cannot read it: {exc.strerror or exc}") from None


def cmd_convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from canaryd import convert  # noqa: PLC0415 - keeps other commands' start-up lean

    text, source = _read_input(args.file)
    options = convert.RoutingOptions(
        virtual_service=args.virtual_service,
        routes=tuple(args.route),
        destination_rule=args.destination_rule,
        stable_subset=args.stable_subset or "stable",
        canary_subset=args.canary_subset or "canary",
    )
    try:
        result = convert.convert_text(text, options)
    except convert.ConvertError as exc:
        raise CliError(one_line(f"{source}: {exc}")) from None
    out.write(convert.to_yaml(result.manifests))
    for warning in result.warnings:
        err.write(f"warning: {one_line(str(warning))}\n")
    return EXIT_REJECTED if args.strict and result.warnings else EXIT_OK


# -- parser --------------------------------------------------------------------------------


def _usage_line(prog: str, message: str) -> str:
    return f"{prog}: error: {one_line(message)} (see '{prog} --help')\n"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, _usage_line(self.prog, message))


#: Commands that need neither the Kubernetes client nor the web stack: when one of them
#: is run, only these are registered (``canaryd plan`` starts in 0.6 s instead of 1.3 s).
LIGHT_COMMANDS = frozenset({"simulate", "scenarios", "validate", "crd", "plan", "convert"})


def _command_of(argv: Sequence[str]) -> str | None:
    """The command an argument list names (its first word that is not a flag)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(light: bool = False) -> argparse.ArgumentParser:
    """The whole CLI; with ``light``, only :data:`LIGHT_COMMANDS`."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="canaryd",
        formatter_class=fmt,
        description=(
            "canaryd moves traffic to a new version in steps (10% → 50% → 100%) and, at\n"
            "every step, compares it with the stable version using anytime-valid\n"
            "statistics: it rolls back on evidence of harm, moves on when the evidence\n"
            "says the canary is fine, and holds when there is too little data."
        ),
        epilog=f"{EXIT_CODES_HELP}\nStart with: canaryd simulate --scenario error-spike",
    )
    parser.add_argument("--version", action="version", version=f"canaryd {_version()}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    sim = sub.add_parser(
        "simulate",
        help="dry-run a rollout on synthetic traffic (no cluster needed)",
        description=SIMULATE_HELP,
        formatter_class=fmt,
    )
    source = sim.add_mutually_exclusive_group()
    source.add_argument(
        "--scenario",
        metavar="NAME",
        help="built-in scenario (default: healthy); see 'canaryd scenarios'",
    )
    source.add_argument(
        "--scenario-file", metavar="FILE", help="scenario YAML file (see 'canaryd scenarios NAME')"
    )
    sim.add_argument(
        "--spec",
        metavar="FILE",
        help="Canary spec or resource YAML; only steps and analysis matter here "
        "(default: built-in defaults)",
    )
    sim.add_argument(
        "--seed",
        type=number_arg(int, inclusive=True),
        default=1,
        metavar="N",
        help="random seed, 0 or more (default: 1)",
    )
    sim.add_argument(
        "--runs",
        type=int,
        default=1,
        metavar="N",
        help="Monte Carlo: N runs with seeds N, N+1, … (default: 1)",
    )
    sim.add_argument(
        "--json",
        action="store_true",
        help="print exactly one JSON object and nothing else on stdout",
    )
    sim.add_argument(
        "--report", metavar="FILE.html", help="also write a self-contained HTML report with charts"
    )
    sim.add_argument(
        "--speed",
        type=float,
        default=0.0,
        metavar="X",
        help="pace the live view at X virtual seconds per real second "
        "(default: 0, as fast as possible)",
    )
    sim.set_defaults(handler=cmd_simulate)

    scen = sub.add_parser(
        "scenarios",
        help="list built-in scenarios, or print one as YAML",
        description="List the built-in traffic scenarios, or print one as a YAML file to edit.",
        epilog="exit codes: 0 listed or printed, 2 usage or runtime error (e.g. an unknown NAME)",
        formatter_class=fmt,
    )
    scen.add_argument("name", nargs="?", metavar="NAME", help="print this scenario as YAML")
    scen.add_argument("--json", action="store_true", help="machine-readable output")
    scen.set_defaults(handler=cmd_scenarios)

    val = sub.add_parser(
        "validate",
        help="check a Canary spec or resource YAML file",
        description=(
            "Check a YAML file holding a bare Canary spec or a whole Canary resource.\n"
            "Lists every problem with its field path.  Fields only a cluster needs\n"
            "(service, stable, canary, trafficRouting) are warnings unless --strict."
        ),
        epilog=(
            "exit codes: 0 valid, 1 invalid (with --strict: cluster fields missing too),\n"
            "  2 usage or runtime error (e.g. FILE cannot be read)"
        ),
        formatter_class=fmt,
    )
    val.add_argument("file", metavar="FILE")
    val.add_argument("--strict", action="store_true", help="treat missing cluster fields as errors")
    val.add_argument("--json", action="store_true", help="machine-readable output")
    val.set_defaults(handler=cmd_validate)

    crd = sub.add_parser(
        "crd",
        help="print the Canary CustomResourceDefinition (YAML)",
        description=(
            "Print the Canary CRD, generated from the spec model: install it with\n"
            "  canaryd crd | kubectl apply -f -\n"
            "manifests/base/crd.yaml holds the same output."
        ),
        epilog="exit codes: 0 printed, 2 runtime error",
        formatter_class=fmt,
    )
    crd.set_defaults(handler=cmd_crd)

    conv = sub.add_parser(
        "convert",
        help="turn a Flagger Canary into a canaryd Canary (YAML)",
        description=CONVERT_HELP,
        epilog=(
            "exit codes: 0 converted, 1 converted with warnings (--strict),\n"
            "  2 usage or runtime error (FILE cannot be read, malformed YAML, no Flagger\n"
            "  Canary in it, or one Flagger would reject)"
        ),
        formatter_class=fmt,
    )
    conv.add_argument("file", metavar="FILE", help="Flagger Canary YAML; - reads stdin")
    conv.add_argument(
        "--strict", action="store_true", help="exit 1 if anything did not carry over (a warning)"
    )
    conv.add_argument(
        "--virtual-service",
        metavar="NAME",
        help="the VirtualService whose weights canaryd shifts (default: the service's name, "
        "as the one Flagger generated)",
    )
    conv.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="NAME",
        help="an HTTP route of it to shift (repeatable; default: every route to both versions)",
    )
    conv.add_argument(
        "--destination-rule",
        metavar="NAME",
        help="split by this DestinationRule's subsets instead of by host "
        "(SERVICE and SERVICE-canary)",
    )
    conv.add_argument("--stable-subset", metavar="NAME", help="with --destination-rule (stable)")
    conv.add_argument("--canary-subset", metavar="NAME", help="with --destination-rule (canary)")
    conv.set_defaults(handler=cmd_convert, check=check_convert)

    if not light:
        from canaryd import cluster_cli  # noqa: PLC0415 - the kubernetes client loads only here

        cluster_cli.add_parsers(sub, fmt)
    from canaryd import plan_cli  # noqa: PLC0415

    plan_cli.add_parser(sub, fmt)
    if not light:
        from canaryd import playground  # noqa: PLC0415 - FastAPI and uvicorn load only here

        playground.add_parser(sub, fmt)
    for command in sub.choices.values():  # also after the command: canaryd status --debug
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
        )
    return parser


_DEBUG_HELP = "on an unexpected error (exit 2), also print its traceback"


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the CLI; returns the exit code (the console script exits with it).

    Whatever goes wrong ends as one ``canaryd…: error: …`` line on ``err`` and exit 2
    (``--debug``: with the traceback of an unexpected exception first)."""
    out = out or sys.stdout
    err = err or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # until the flags are parsed
    try:
        parser = build_parser(light=_command_of(argv) in LIGHT_COMMANDS)
        with contextlib.redirect_stderr(err):  # usage errors go where this call's errors go
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:
                if isinstance(exc.code, int):  # --help, --version: 0; a usage error: 2
                    return exc.code
                return EXIT_OK if exc.code is None else EXIT_ERROR
        debug = bool(getattr(args, "debug", False))
        check: Callable[[argparse.Namespace], str | None] | None = getattr(args, "check", None)
        problem = check(args) if check is not None else None
        if problem:  # flags that make no sense together: a usage error, like argparse's
            err.write(_usage_line(f"canaryd {args.command}", problem))
            return EXIT_ERROR
        return _dispatch(args, out, err)
    except CliError as exc:
        err.write(f"canaryd: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.write("\ncanaryd: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # the one place where any bug becomes one line and exit 2
        if debug:
            err.write("".join(traceback.format_exception(exc)))
        hint = "" if debug else " (run again with --debug for the traceback)"
        err.write(f"canaryd: error: unexpected {_describe(exc)}{hint}\n")
        return EXIT_ERROR


def _dispatch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if hasattr(args, "cluster_handler"):
        from canaryd.cluster_cli import ClusterError, handle  # noqa: PLC0415

        try:
            return handle(args, out)
        except ClusterError as exc:
            raise CliError(one_line(str(exc))) from None
    code: int = args.handler(args, out, err)
    return code


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line; an exception group's first exception, the others
    counted; credentials in URLs masked."""
    more = 0
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        more += len(exc.exceptions) - 1
        exc = exc.exceptions[0]
    message = redact(one_line(str(exc)))
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return f"{text} (and {more} more)" if more else text
