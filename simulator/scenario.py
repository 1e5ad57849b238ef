"""Scenarios: what the simulated stable and canary versions do, and when that changes.

A scenario is written in YAML (this format is a contract with users)::

    name: checkout-2x-errors
    description: optional free text
    duration_s: 3600                     # optional, default 3600; virtual run length
    traffic: {rps: 100}                  # total requests/s; optional daily: true, start_hour: 9
    stable: {error_rate: 0.005, latency_ms: {p50: 40, p99: 180}}
    canary: {error_rate: 0.010, latency_ms: {p50: 40, p99: 180}}
    events:                              # optional; each changes one version from at_s on
      - {at_s: 300, version: canary, error_rate: 0.05}
      - {at_s: 600, version: both, latency_ms: {p99: 400}}
    noise: {error_cv: 0.5, period_s: 60} # optional: bursty, not independent, errors

``noise`` makes errors overdispersed, as real traffic's are: ``error_cv`` is the
coefficient of variation of a Gamma multiplier (mean 1) on each arm's error rate, drawn
independently for each arm every ``period_s``; ``bursts_per_hour`` bursts of failed
requests from one client (``burst_errors`` of them on average, geometric) land on one
arm, chosen by traffic share.  Without it, requests are independent.

An event's ``version`` is ``stable``, ``canary`` or ``both``; it may change any subset of
``error_rate``, ``latency_ms.p50``, ``latency_ms.p99`` and ``rps`` (total traffic, for
which ``version`` is ignored and may be left out).  Events apply from ``at_s`` on, in
order of ``at_s`` (events at the same time in the order written).

Loading never lets a pydantic or YAML exception escape: every problem becomes a
:class:`ScenarioError` whose message names the file, the line or the field path.
"""

from __future__ import annotations

import difflib
import itertools
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from simulator.traffic import Behaviour, daily_factor, daily_factor_mean
from simulator.yamlload import YAMLInputError, load_yaml, one_line

#: Bounds that keep one run quick and its numbers sane (numpy's Poisson sampler fails
#: from about 1e19 requests a tick; every tick looks at every event).
MAX_RPS = 1e9
MAX_DURATION_S = 86_400.0  # one virtual day
MAX_EVENTS = 1_000

#: The two arms a behaviour can be asked for.
VersionName = Literal["stable", "canary"]
#: What an event may change: one arm or both.
EventTarget = Literal["stable", "canary", "both"]

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
_VERSIONS: tuple[VersionName, ...] = ("stable", "canary")


class ScenarioError(Exception):
    """A scenario could not be found, read, parsed or validated.

    The message is meant for a person: it names the source, and the YAML line or the
    field path (such as ``canary.error_rate``) at fault.
    """


class Latency(BaseModel):
    """Latency quantiles of one version, in milliseconds."""

    model_config = _MODEL_CONFIG

    p50: float = Field(gt=0, description="median latency, in ms")
    p99: float = Field(gt=0, description="99th-percentile latency, in ms; at least p50")

    @model_validator(mode="after")
    def _check_order(self) -> Self:
        if self.p99 < self.p50:
            raise ValueError(f"p99 ({self.p99:g} ms) must be >= p50 ({self.p50:g} ms)")
        return self


class PartialLatency(BaseModel):
    """New latency quantiles set by an event, in milliseconds; either may be left out."""

    model_config = _MODEL_CONFIG

    p50: float | None = Field(default=None, gt=0, description="new median latency, in ms")
    p99: float | None = Field(default=None, gt=0, description="new p99 latency, in ms")


def _default_latency() -> Latency:
    return Latency(p50=40.0, p99=180.0)


class VersionSpec(BaseModel):
    """How one version (stable or canary) behaves at the start of a scenario."""

    model_config = _MODEL_CONFIG

    error_rate: float = Field(
        default=0.005, ge=0, le=1, description="probability that a request is a 5xx, 0..1"
    )
    latency_ms: Latency = Field(
        default_factory=_default_latency, description="latency quantiles, in ms"
    )

    def behaviour(self) -> Behaviour:
        """This specification as a :class:`~simulator.traffic.Behaviour`."""
        return Behaviour(self.error_rate, self.latency_ms.p50, self.latency_ms.p99)


class Traffic(BaseModel):
    """Total request rate arriving at the service (both arms together)."""

    model_config = _MODEL_CONFIG

    rps: float = Field(gt=0, le=MAX_RPS, description="total requests per second")
    daily: bool = Field(
        default=False, description="multiply rps by a daily curve (0.5 at 03:00, 1.5 at 15:00)"
    )
    cohort_pct: int = Field(
        default=10,
        ge=1,
        le=100,
        description=(
            "share of requests in an A/B test's cohort (they carry its headers), in %; "
            "used when the Canary's strategy is abTest"
        ),
    )
    start_hour: float = Field(
        default=9.0, ge=0, lt=24, description="hour of day (0..24) at which the scenario starts"
    )


class Event(BaseModel):
    """A change, from ``at_s`` seconds on, to one or both versions or to total traffic."""

    model_config = _MODEL_CONFIG

    at_s: float = Field(ge=0, description="when the change takes effect, in s from the start")
    version: EventTarget | None = Field(
        default=None, description="stable, canary or both; required unless only rps changes"
    )
    error_rate: float | None = Field(default=None, ge=0, le=1, description="new 5xx probability")
    latency_ms: PartialLatency | None = Field(
        default=None, description="new latency quantiles, in ms"
    )
    rps: float | None = Field(
        default=None, gt=0, le=MAX_RPS, description="new total requests per second"
    )

    @property
    def changes_behaviour(self) -> bool:
        """True when the event changes an error rate or a latency quantile."""
        latency = self.latency_ms
        return self.error_rate is not None or (
            latency is not None and (latency.p50 is not None or latency.p99 is not None)
        )

    @property
    def targets(self) -> tuple[VersionName, ...]:
        """The versions whose behaviour this event changes (none for an rps-only event)."""
        if not self.changes_behaviour or self.version is None:
            return ()
        if self.version == "both":
            return _VERSIONS
        return (self.version,)

    @model_validator(mode="after")
    def _check_changes_something(self) -> Self:
        if not self.changes_behaviour and self.rps is None:
            raise ValueError(
                "an event must change at least one of error_rate, latency_ms.p50, "
                "latency_ms.p99 or rps"
            )
        if self.changes_behaviour and self.version is None:
            raise ValueError(
                "an event that changes error_rate or latency_ms needs "
                "'version: stable | canary | both'"
            )
        return self

    def apply(self, behaviour: Behaviour) -> Behaviour:
        """``behaviour`` with this event's error rate and latency changes applied."""
        latency = self.latency_ms
        return Behaviour(
            error_rate=behaviour.error_rate if self.error_rate is None else self.error_rate,
            p50_ms=behaviour.p50_ms if latency is None or latency.p50 is None else latency.p50,
            p99_ms=behaviour.p99_ms if latency is None or latency.p99 is None else latency.p99,
        )


class Noise(BaseModel):
    """Overdispersed errors: what makes real traffic's error counts burstier than a
    binomial's (a sick pod, one bad client, a retry storm)."""

    model_config = _MODEL_CONFIG

    error_cv: float = Field(
        default=0.0,
        ge=0,
        le=3,
        description="coefficient of variation of each arm's Gamma error-rate multiplier",
    )
    period_s: float = Field(
        default=60.0, gt=0, le=3600, description="how often the multipliers are redrawn, in s"
    )
    bursts_per_hour: float = Field(
        default=0.0, ge=0, le=3600, description="bursts of failed requests from one client"
    )
    burst_errors: float = Field(
        default=20.0, ge=1, le=1e6, description="mean failed requests in one burst"
    )

    @property
    def active(self) -> bool:
        return self.error_cv > 0 or self.bursts_per_hour > 0


class Scenario(BaseModel):
    """A complete simulated situation: traffic, both versions, and timed changes."""

    model_config = _MODEL_CONFIG

    name: str = Field(min_length=1, description="short identifier")
    description: str = Field(default="", description="free text")
    duration_s: float = Field(
        default=3600.0, gt=0, le=MAX_DURATION_S, description="virtual run length, in s"
    )
    traffic: Traffic
    stable: VersionSpec
    canary: VersionSpec
    events: tuple[Event, ...] = Field(default=(), max_length=MAX_EVENTS)
    noise: Noise | None = Field(default=None, description="overdispersed errors, or none")
    strategy: Literal["canary", "abTest", "blueGreen"] = Field(
        default="canary",
        description=(
            "the rollout strategy the scenario exercises: without a spec of its own, "
            "canaryd simulate rolls out with that strategy's defaults (abTest: the "
            "cohort is traffic.cohort_pct of requests; blueGreen: a warm-up on a mirror "
            "of every request, then the switch)"
        ),
    )

    @model_validator(mode="after")
    def _check_events(self) -> Self:
        state = {version: self._spec(version) for version in _VERSIONS}
        for index, event in self._ordered_events():
            for version in event.targets:
                latency = event.latency_ms
                p50 = state[version][1] if latency is None or latency.p50 is None else latency.p50
                p99 = state[version][2] if latency is None or latency.p99 is None else latency.p99
                if p99 < p50:
                    raise ValueError(
                        f"events[{index}] (at_s={event.at_s:g}) leaves {version} latency "
                        f"p99 {p99:g} ms below p50 {p50:g} ms"
                    )
                error_rate = state[version][0] if event.error_rate is None else event.error_rate
                state[version] = (error_rate, p50, p99)
        return self

    def _spec(self, version: VersionName) -> tuple[float, float, float]:
        spec = self.stable if version == "stable" else self.canary
        return spec.error_rate, spec.latency_ms.p50, spec.latency_ms.p99

    def _ordered_events(self) -> list[tuple[int, Event]]:
        """Events with their index as written, in the order they apply (stable by at_s)."""
        return sorted(enumerate(self.events), key=lambda item: item[1].at_s)

    def behaviour_at(self, version: VersionName, t_s: float) -> Behaviour:
        """Behaviour of ``version`` in force at ``t_s`` seconds (events with at_s <= t_s)."""
        if version not in _VERSIONS:
            raise ValueError(f"version must be 'stable' or 'canary', got {version!r}")
        behaviour = (self.stable if version == "stable" else self.canary).behaviour()
        for _, event in self._ordered_events():
            if event.at_s > t_s:
                break
            if version in event.targets:
                behaviour = event.apply(behaviour)
        return behaviour

    def base_rps_at(self, t_s: float) -> float:
        """Total requests per second at ``t_s`` after rps events, before the daily curve."""
        rps = self.traffic.rps
        for _, event in self._ordered_events():
            if event.at_s > t_s:
                break
            if event.rps is not None:
                rps = event.rps
        return rps

    def rps_at(self, t_s: float) -> float:
        """Total requests per second at ``t_s``: rps events and the daily curve applied."""
        rps = self.base_rps_at(t_s)
        if self.traffic.daily:
            rps *= daily_factor(t_s, self.traffic.start_hour)
        return rps

    def expected_requests(self, t0_s: float, t1_s: float) -> float:
        """Expected total requests in ``[t0_s, t1_s)``: the exact integral of :meth:`rps_at`."""
        if t1_s < t0_s:
            raise ValueError(f"t1_s ({t1_s!r}) must not be before t0_s ({t0_s!r})")
        cuts = [t for t in self.change_points() if t0_s < t < t1_s]
        bounds = [t0_s, *cuts, t1_s]
        total = 0.0
        for start_s, end_s in itertools.pairwise(bounds):
            rate = self.base_rps_at(start_s)
            if self.traffic.daily:
                rate *= daily_factor_mean(start_s, end_s, self.traffic.start_hour)
            total += rate * (end_s - start_s)
        return total

    def change_points(self) -> tuple[float, ...]:
        """Sorted distinct event times, in seconds: where behaviour or base rps may change."""
        return tuple(sorted({event.at_s for event in self.events}))

    def to_yaml(self) -> str:
        """This scenario in the user YAML format; :func:`load_scenario_text` reads it back."""
        data = _tidy(self.model_dump(mode="json", exclude_none=True))
        lines = [_yaml_entry("name", data["name"])]
        if self.description:
            lines.append(_yaml_entry("description", data["description"]))
        lines.append(_yaml_entry("duration_s", data["duration_s"]))
        traffic = data["traffic"]
        if not self.traffic.daily:
            traffic = {"rps": traffic["rps"]} | (
                {"cohort_pct": traffic["cohort_pct"]} if self.traffic.cohort_pct != 10 else {}
            )
        lines.append(f"traffic: {_yaml_flow(traffic)}")
        lines.append(f"stable: {_yaml_flow(data['stable'])}")
        lines.append(f"canary: {_yaml_flow(data['canary'])}")
        if data["events"]:
            lines.append("events:")
            lines.extend(f"  - {_yaml_flow(event)}" for event in data["events"])
        if "noise" in data:
            lines.append(f"noise: {_yaml_flow(data['noise'])}")
        if self.strategy != "canary":
            lines.append(_yaml_entry("strategy", data["strategy"]))
        return "\n".join(lines) + "\n"


_YAML_WIDTH = 1 << 30


def _tidy(value: Any) -> Any:
    """Whole floats as ints, for readable YAML (pydantic turns them back into floats)."""
    if isinstance(value, dict):
        return {key: _tidy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_tidy(item) for item in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _yaml_entry(key: str, value: Any) -> str:
    return yaml.safe_dump(
        {key: value}, sort_keys=False, allow_unicode=True, width=_YAML_WIDTH
    ).rstrip("\n")


def _yaml_flow(value: Any) -> str:
    return yaml.safe_dump(
        value, default_flow_style=True, sort_keys=False, allow_unicode=True, width=_YAML_WIDTH
    ).strip()


# --------------------------------------------------------------------------- loading


def _format_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation such as ``X | None`` or ``tuple[X, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        model = _model_in(arg)
        if model is not None:
            return model
    return None


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """Valid field names of the model found at ``loc`` inside a scenario (empty if none)."""
    model: type[BaseModel] = Scenario
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = _model_in(field.annotation) if field is not None else None
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _describe(error: ErrorDetails) -> str:
    loc = tuple(error["loc"])
    path = _format_path(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        field, parent = str(loc[-1]), loc[:-1]
        message = f"unknown field '{path}'"
        valid = _fields_at(parent)
        close = difflib.get_close_matches(field, valid, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean '{_format_path((*parent, close[0]))}'?"
        elif valid:
            message += f"; valid fields here: {', '.join(valid)}"
        return message
    if kind == "missing":
        return f"missing required field '{path}'"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        message = "expected a mapping of fields"
    else:
        message = error["msg"].removeprefix("Value error, ")
        got = error.get("input")
        if isinstance(got, str | int | float | bool):
            message += f" (got {got!r})"
    return f"{path}: {message}" if path else message


def _describe_validation(exc: ValidationError, source: str) -> str:
    problems = [one_line(_describe(error)) for error in exc.errors(include_url=False)]
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems in scenario: " + "; ".join(problems)


def load_scenario_text(text: str, source: str = "<string>") -> Scenario:
    """Parse and validate a scenario from YAML ``text``.

    Args:
        text: the scenario in the user YAML format.
        source: where the text came from, used in error messages.

    Raises:
        ScenarioError: on a YAML syntax error or an invalid scenario.
    """
    try:
        data = load_yaml(text)
    except YAMLInputError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    if data is None:
        raise ScenarioError(f"{source}: the scenario is empty")
    if not isinstance(data, dict):
        raise ScenarioError(
            f"{source}: expected a mapping of scenario fields (name, traffic, stable, "
            f"canary, ...) at the top level, got {type(data).__name__}"
        )
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(_describe_validation(exc, source)) from exc


def load_scenario_file(path: str | os.PathLike[str]) -> Scenario:
    """Read, parse and validate a scenario YAML file.

    Raises:
        ScenarioError: if the file is missing or unreadable, or its content is invalid.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ScenarioError(f"scenario file not found: {file}") from exc
    except IsADirectoryError as exc:
        raise ScenarioError(f"scenario path is a directory, not a file: {file}") from exc
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"scenario file is not valid UTF-8 text: {file}") from exc
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario file {file}: {exc.strerror or exc}") from exc
    return load_scenario_text(text, source=str(file))


# --------------------------------------------------------------------------- built-ins

_BASE_RPS = 100.0
_BASE_ERROR_RATE = 0.005
_BASE_P50_MS = 40.0
_BASE_P99_MS = 180.0


def _version(
    error_rate: float = _BASE_ERROR_RATE, p50_ms: float = _BASE_P50_MS, p99_ms: float = _BASE_P99_MS
) -> VersionSpec:
    return VersionSpec(error_rate=error_rate, latency_ms=Latency(p50=p50_ms, p99=p99_ms))


def _builtin(
    name: str,
    description: str,
    *,
    canary: VersionSpec | None = None,
    rps: float = _BASE_RPS,
    events: tuple[Event, ...] = (),
    noise: Noise | None = None,
    strategy: Literal["canary", "abTest", "blueGreen"] = "canary",
) -> Scenario:
    return Scenario(
        name=name,
        description=description,
        duration_s=3600.0,
        traffic=Traffic(rps=rps),
        stable=_version(),
        canary=_version() if canary is None else canary,
        events=events,
        noise=noise,
        strategy=strategy,
    )


def _gradual_degradation_events() -> tuple[Event, ...]:
    start_s, end_s, step_s = 300.0, 1800.0, 60.0
    start_rate, end_rate = _BASE_ERROR_RATE, 0.05
    events = []
    at_s = start_s + step_s
    while at_s <= end_s:
        rate = start_rate + (end_rate - start_rate) * (at_s - start_s) / (end_s - start_s)
        events.append(Event(at_s=at_s, version="canary", error_rate=round(rate, 6)))
        at_s += step_s
    return tuple(events)


_COMMON = "100 rps, p50 40 ms, p99 180 ms, 3600 s"

#: Built-in scenarios by name, in a fixed order (the one ``canaryd scenarios`` lists).
BUILTIN_SCENARIOS: Mapping[str, Scenario] = MappingProxyType(
    {
        scenario.name: scenario
        for scenario in (
            _builtin("healthy", f"canary identical to stable: 0.5% errors, {_COMMON}"),
            _builtin(
                "error-spike",
                f"canary errors 10x stable from the start (5% vs 0.5%); {_COMMON}",
                canary=_version(error_rate=0.05),
            ),
            _builtin(
                "error-regression",
                f"canary errors 2x stable (1.0% vs 0.5%); {_COMMON}",
                canary=_version(error_rate=0.010),
            ),
            _builtin(
                "latency-regression",
                "canary latency 1.5x stable (p50 60 vs 40 ms, p99 270 vs 180 ms); "
                "100 rps, 0.5% errors, 3600 s",
                canary=_version(p50_ms=60.0, p99_ms=270.0),
            ),
            _builtin(
                "latency-tail",
                "canary p99 2x stable (360 vs 180 ms), p50 unchanged at 40 ms; "
                "100 rps, 0.5% errors, 3600 s",
                canary=_version(p99_ms=360.0),
            ),
            _builtin(
                "gradual-degradation",
                "canary like stable until 300 s, then its errors climb linearly from 0.5% "
                f"to 5% at 1800 s (an event every 60 s); {_COMMON}",
                events=_gradual_degradation_events(),
            ),
            _builtin(
                "low-traffic",
                "canary identical to stable at only 2 rps: 0.5% errors, p50 40 ms, "
                "p99 180 ms, 3600 s",
                rps=2.0,
            ),
            _builtin(
                "bursty-healthy",
                "canary identical to stable, but each arm's error rate varies from minute "
                "to minute (Gamma multiplier, CV 0.5, independently per arm, mean 0.5%); "
                + _COMMON,
                noise=Noise(error_cv=0.5, period_s=60.0),
            ),
            _builtin(
                "bursty-regression",
                "canary errors 2x stable (1.0% vs 0.5%) on bursty traffic (each arm's rate "
                f"varies minute to minute, Gamma CV 0.5); {_COMMON}",
                canary=_version(error_rate=0.010),
                noise=Noise(error_cv=0.5, period_s=60.0),
            ),
            _builtin(
                "client-bursts",
                "canary identical to stable; 12 times an hour one client's retry storm "
                f"fails ~30 requests at once, on whichever arm serves it; {_COMMON}",
                noise=Noise(bursts_per_hour=12.0, burst_errors=30.0),
            ),
            _builtin(
                "stable-incident",
                "shared incident, not the canary's fault: both versions' errors jump from "
                f"0.5% to 8% at 300 s and return to 0.5% at 900 s; {_COMMON}",
                events=(
                    Event(at_s=300.0, version="both", error_rate=0.08),
                    Event(at_s=900.0, version="both", error_rate=_BASE_ERROR_RATE),
                ),
            ),
            _builtin(
                "abtest-healthy",
                "A/B test (strategy abTest): the cohort, 10% of requests, goes to a canary "
                f"identical to stable; {_COMMON}",
                strategy="abTest",
            ),
            _builtin(
                "abtest-regression",
                "A/B test (strategy abTest): the cohort, 10% of requests, goes to a canary "
                f"with 5x stable's errors (2.5% vs 0.5%); {_COMMON}",
                canary=_version(error_rate=0.025),
                strategy="abTest",
            ),
            _builtin(
                "bluegreen-healthy",
                "blue/green (strategy blueGreen): the new version warms up on a mirror of "
                "every request, then takes all traffic; identical to stable; " + _COMMON,
                strategy="blueGreen",
            ),
            _builtin(
                "bluegreen-regression",
                "blue/green (strategy blueGreen): the new version has 5x stable's errors "
                "(2.5% vs 0.5%), caught on the mirrored warm-up before any user sees it; "
                + _COMMON,
                canary=_version(error_rate=0.025),
                strategy="blueGreen",
            ),
        )
    }
)


def get_scenario(name: str) -> Scenario:
    """The built-in scenario called ``name``.

    Raises:
        ScenarioError: if there is no such built-in scenario (suggesting a close name).
    """
    try:
        return BUILTIN_SCENARIOS[name]
    except KeyError:
        pass
    message = f"unknown scenario {name!r}; built-in scenarios: {', '.join(BUILTIN_SCENARIOS)}"
    close = difflib.get_close_matches(name, list(BUILTIN_SCENARIOS), n=1, cutoff=0.6)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    raise ScenarioError(message)
