"""The ``Canary`` spec (design §3) as pydantic models, and loading it from YAML.

Field names are the camelCase names users write in YAML (``stepDuration``,
``minRequests``); Python code uses their snake_case attributes.  Durations are
written like Kubernetes and Go write them (``30s``, ``1m``, ``1h30m``, or a plain
number of seconds) and held as float seconds.

Every default works: an empty spec is a valid spec for ``canaryd simulate``.  The
fields that only a cluster needs (``service``, ``stable``, ``canary``,
``trafficRouting``) are optional here; :func:`cluster_warnings` names the ones a
cluster would miss.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PlainSerializer,
    PrivateAttr,
    StrictInt,
    ValidationError,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from analysis.budget import DEFAULT_WINDOW_S
from analysis.verdict import format_duration
from canaryd.events import EventReason
from simulator.yamlload import YAMLInputError, load_yaml, one_line, short_repr

API_GROUP = "canaryd.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "Canary"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

MAX_DURATION_S = 7 * 86400.0
"""Longest duration any field takes but an SLO window: a week (``1e9h`` is a typo, not a plan)."""
MAX_SLO_WINDOW_S = 90 * 86400.0
"""Longest SLO compliance window: 90 days."""
MIN_INTERVAL_S = 1.0
"""Shortest ``analysis.interval``: Prometheus scrapes every 15 s or so; 1 ms only spins."""
MAX_INTERVAL_S = 3600.0
MAX_STEP_DURATION_S = 86400.0
MAX_NAME_CHARS = 253
"""A Kubernetes object name's limit."""


class SpecError(ValueError):
    """A spec or resource that cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[str], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(self.problems))


def parse_duration(value: object, maximum_s: float = MAX_DURATION_S) -> float:
    """A duration in seconds from ``90``, ``"90s"``, ``"1m30s"``, ``"1.5h"``, ``"500ms"``,
    at most ``maximum_s``."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '1m'")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer past 1.8e308
            raise ValueError(f"durations are at most {format_duration(maximum_s)}") from None
    elif isinstance(value, str):
        text = value.strip().lower()
        negative = text.startswith("-")
        body = text.lstrip("+-")
        if re.fullmatch(r"\d+(\.\d+)?", body):
            seconds = float(body)
        elif body and _DURATION_PART.sub("", body) == "":
            seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(body))
        else:
            raise ValueError(
                f"{short_repr(value)} is not a duration; write it like 30s, 1m, 10m, 1h30m "
                "or a number of seconds"
            )
        seconds = -seconds if negative else seconds
    else:
        raise ValueError("a duration must be a number of seconds or a string like '1m'")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be finite")
    if seconds < 0:
        raise ValueError(f"durations cannot be negative (got {short_repr(value)})")
    if seconds > maximum_s:
        raise ValueError(f"durations are at most {format_duration(maximum_s)}")
    return seconds


_DURATION_SCHEMA = WithJsonSchema(
    {
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "description": "duration: seconds, or a string like 30s, 1m, 1h30m",
    }
)
#: An SLO compliance window: a duration of up to 90 days (``30d``).
Window = Annotated[
    float,
    BeforeValidator(functools.partial(parse_duration, maximum_s=MAX_SLO_WINDOW_S)),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    _DURATION_SCHEMA,
]
#: A duration: float seconds in Python, ``"10m"``-style strings in YAML/JSON.
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "description": "duration: seconds, or a string like 30s, 1m, 1h30m",
        }
    ),
]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
        allow_inf_nan=False,
    )


class WorkloadRef(_Model):
    """A Deployment in the Canary's namespace."""

    deployment: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="Deployment name")


class VirtualServiceRef(_Model):
    """A user-owned Istio VirtualService whose named HTTP routes canaryd patches."""

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    routes: list[Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]] = Field(
        default_factory=list,
        max_length=100,
        description="names of the HTTP routes to shift; empty means every route of the host",
    )


class DestinationRuleRef(_Model):
    """Subsets of a DestinationRule that separate stable and canary pods."""

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    stable_subset: str = Field(default="stable", min_length=1, max_length=MAX_NAME_CHARS)
    canary_subset: str = Field(default="canary", min_length=1, max_length=MAX_NAME_CHARS)


class IstioRouting(_Model):
    """Istio routing: a VirtualService, split by DestinationRule subsets or by host."""

    virtual_service: VirtualServiceRef
    destination_rule: DestinationRuleRef | None = Field(
        default=None, description="omit to split by host (one Service per version)"
    )


class GatewayAPIRouting(_Model):
    """Gateway API routing: the ``backendRefs`` weights of named rules of a user-owned
    ``gateway.networking.k8s.io/v1`` HTTPRoute (Istio, Envoy Gateway, Cilium, Kong…)."""

    http_route: str = Field(
        min_length=1, max_length=MAX_NAME_CHARS, description="the HTTPRoute's name"
    )
    rules: list[Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]] = Field(
        default_factory=list,
        max_length=100,
        description=(
            "names of the rules to shift (HTTPRoute rules' `name`); empty means every rule "
            "whose backendRefs include both Services"
        ),
    )
    stable_service: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="the stable backendRef's Service (default: spec.service)",
    )
    canary_service: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="the canary backendRef's Service (default: <spec.service>-canary)",
    )


class TrafficRouting(_Model):
    """How traffic is shifted between stable and canary: one of ``istio`` and
    ``gatewayAPI``."""

    istio: IstioRouting | None = None
    gateway_api: GatewayAPIRouting | None = Field(default=None, alias="gatewayAPI")
    on_drift: Literal["hold", "reassert"] = Field(
        default="hold",
        description=(
            "when someone else changes the weights canaryd set: 'hold' reports it "
            "(TrafficDrift condition and Event) and holds the rollout until the routes "
            "read canaryd's weight again or a command moves it; 'reassert' writes "
            "canaryd's weight back. A finished rollout never rewrites its weights"
        ),
    )

    @model_validator(mode="after")
    def _one_router(self) -> TrafficRouting:
        given = [k for k, v in (("istio", self.istio), ("gatewayAPI", self.gateway_api)) if v]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of istio and gatewayAPI"
                + (" (both are set)" if len(given) == 2 else "")
            )
        return self


class ErrorRateCheck(_Model):
    """Canary-vs-stable error rate (5xx responses)."""

    relative_tolerance: float = Field(
        default=0.0,
        ge=0,
        le=10,
        description=(
            "canary errors up to (1 + tolerance) × stable's are accepted; 0 means "
            "'no worse than stable' (traffic volume then sets how small a difference "
            "can be told apart within a step)"
        ),
    )
    max_pct: float | None = Field(
        default=5.0, gt=0, le=100, description="absolute limit on the canary's error %"
    )


class LatencyCheck(_Model):
    """Canary-vs-stable latency at one percentile."""

    percentile: float = Field(gt=0, lt=100, description="e.g. 50, 90, 95, 99")
    relative_tolerance: float = Field(default=0.2, ge=0, le=10)
    max_ms: float | None = Field(
        default=None, gt=0, le=3_600_000, description="absolute limit, ms (at most an hour)"
    )


class LatencyObjective(_Model):
    """A latency objective: ``targetPct`` of requests answered within ``thresholdMs``."""

    threshold_ms: float = Field(gt=0, le=3_600_000, description="e.g. 500")
    target_pct: float = Field(default=99.0, gt=0, lt=100, description="e.g. 99")


class BudgetPolicy(_Model):
    """The error-budget policy: what may ship as the budget runs low (design §5–6).

    Budget remaining below ``approvalBelowPct``: every step after the first needs an
    approval; below ``overrideBelowPct``: a new rollout needs an override command;
    exhausted, or a pair of windows burning at ``fastBurnFactor``× or faster: only
    fixes start (``canaryd promote --fix``) and running rollouts hold.
    """

    approval_below_pct: float = Field(default=50.0, ge=0, le=100)
    override_below_pct: float = Field(default=20.0, ge=0, le=100)
    fast_burn_factor: float = Field(default=6.0, gt=0, le=10_000)

    @model_validator(mode="after")
    def _ordered(self) -> BudgetPolicy:
        if self.override_below_pct > self.approval_below_pct:
            raise ValueError(
                f"overrideBelowPct ({self.override_below_pct:g}) must not exceed "
                f"approvalBelowPct ({self.approval_below_pct:g})"
            )
        return self


class SLO(_Model):
    """The service's objectives: the canary's burn check, the service's error budget
    (figures from the same Prometheus source), and optionally the release policy."""

    availability_pct: float = Field(default=99.9, gt=0, lt=100)
    burn_rate_limit: float = Field(default=14.4, gt=0, le=10_000)
    latency: LatencyObjective | None = Field(default=None, description="optional")
    window: Window = Field(
        default=DEFAULT_WINDOW_S,
        ge=3600.0,
        le=90 * 86400.0,
        description="compliance window (default 30d; 1h to 90d)",
    )
    budget_policy: BudgetPolicy | None = Field(
        default=None,
        description="apply the error-budget policy to rollouts; null: figures only",
    )


class NoData(_Model):
    """What to do when metrics stop arriving."""

    hold_for: Duration = Field(
        default=300.0, le=MAX_STEP_DURATION_S, description="how long to hold without data"
    )
    then: Literal["rollback", "pause"] = Field(
        default="rollback", description="rollback, or pause for a person's approval"
    )


def _default_latency() -> list[LatencyCheck]:
    return [
        LatencyCheck(percentile=99, relative_tolerance=0.2, max_ms=1000),
        LatencyCheck(percentile=50, relative_tolerance=0.2),
    ]


class Analysis(_Model):
    """When and how each step is judged."""

    interval: Duration = Field(default=60.0, description="how often to evaluate: from 1s to 1h")
    step_duration: Duration = Field(
        default=600.0,
        le=MAX_STEP_DURATION_S,
        description="a step passes after this long with no regression (at most 24h)",
    )
    min_step_duration: Duration = Field(default=120.0, description="no step passes sooner")
    min_requests: StrictInt = Field(
        default=200, ge=1, le=1_000_000_000, description="canary requests before a pass"
    )
    alpha: float = Field(default=0.01, description="false-rollback budget for the rollout")
    error_rate: ErrorRateCheck = Field(default_factory=ErrorRateCheck)
    latency: list[LatencyCheck] = Field(default_factory=_default_latency, max_length=10)
    slo: SLO | None = Field(default_factory=SLO)
    no_data: NoData = Field(default_factory=NoData)
    early_pass_ratio: float | None = Field(
        default=1.5,
        gt=1,
        le=100,
        description=(
            "a step passes early (after minStepDuration) once, for every check, the 95% "
            "confidence sequence for the canary/stable ratio lies below this; null disables"
        ),
    )

    @field_validator("alpha")
    @classmethod
    def _alpha_in_unit_interval(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(
                f"alpha is a probability of rolling back a healthy canary and must lie "
                f"strictly between 0 and 1 (got {v}); 0.01 is a good default"
            )
        return v

    @field_validator("interval")
    @classmethod
    def _interval_bounded(cls, v: float) -> float:
        if not MIN_INTERVAL_S <= v <= MAX_INTERVAL_S:
            raise ValueError(
                f"must be from {format_duration(MIN_INTERVAL_S)} to "
                f"{format_duration(MAX_INTERVAL_S)} (got {format_duration(v)}); Prometheus "
                "scrapes every 15s or so, and 30s-60s suits most services"
            )
        return v

    @field_validator("step_duration")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be longer than 0s")
        return v

    @model_validator(mode="after")
    def _durations_consistent(self) -> Analysis:
        if self.min_step_duration > self.step_duration:
            raise ValueError(
                f"minStepDuration ({format_duration(self.min_step_duration)}) is longer than "
                f"stepDuration ({format_duration(self.step_duration)})"
            )
        tolerances = [self.error_rate.relative_tolerance] + [
            c.relative_tolerance for c in self.latency
        ]
        if self.early_pass_ratio is not None and self.early_pass_ratio <= 1 + max(tolerances):
            raise ValueError(
                f"earlyPassRatio ({self.early_pass_ratio:g}) must be above 1 + relativeTolerance "
                f"({1 + max(tolerances):g}): a canary could pass early while evidence against it "
                "is still building"
            )
        if self.interval > self.step_duration:
            raise ValueError(
                f"interval ({format_duration(self.interval)}) is longer than stepDuration "
                f"({format_duration(self.step_duration)}): a step would end before its "
                "first evaluation"
            )
        return self


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

#: Istio's standard metrics, destination reporter (what the sidecar of the pod that
#: served the request counts).  ``$selector`` becomes the label matchers of the
#: Canaries judged in one round; ``$by`` the labels that tell them apart.
ISTIO_REQUESTS = 'sum by ($by) (istio_requests_total{reporter="destination",$selector})'
ISTIO_ERRORS = (
    'sum by ($by) (istio_requests_total{reporter="destination",response_code=~"5..",$selector})'
)
ISTIO_LATENCY = (
    "sum by ($by, le) "
    '(istio_request_duration_milliseconds_bucket{reporter="destination",$selector})'
)


class MetricQueries(_Model):
    """PromQL templates for meshes without Istio's metrics.

    Each template is an instant query returning cumulative counters.  Write
    ``$selector`` inside the metric's braces and ``$by`` in its ``sum by``: canaryd
    fills in the label matchers and grouping labels of every Canary judged in the
    round, so one query serves them all.  Example::

        requests: sum by ($by) (http_requests_total{$selector})
        errors: sum by ($by) (http_requests_total{code=~"5..",$selector})
        latency: sum by ($by, le) (http_request_duration_seconds_bucket{$selector})
        latencyUnit: s
    """

    requests: str = Field(min_length=1, max_length=4096, description="PromQL: cumulative requests")
    errors: str = Field(
        min_length=1, max_length=4096, description="PromQL: cumulative 5xx responses"
    )
    latency: str | None = Field(
        default=None,
        max_length=4096,
        description="PromQL: cumulative latency histogram buckets, grouped by le as well",
    )
    latency_unit: Literal["ms", "s"] = Field(
        default="ms", description="unit of the histogram's le edges"
    )

    @field_validator("requests", "errors", "latency")
    @classmethod
    def _has_placeholders(cls, v: str | None) -> str | None:
        if v is None:
            return v
        missing = [p for p in ("$selector", "$by") if p not in v]
        if missing:
            raise ValueError(
                f"the template must contain {' and '.join(missing)}: canaryd fills in the "
                "label matchers ($selector, inside the braces) and grouping labels ($by, in "
                "`sum by`) so that one query serves every Canary"
            )
        return v


MAX_ARM_VALUE_CHARS = 253
"""Longest ``stableValue``/``canaryValue``: a Kubernetes object name's limit."""


class Metrics(_Model):
    """Where the Prometheus source finds this Canary's two arms.

    Defaults fit Istio: series of ``istio_requests_total`` and
    ``istio_request_duration_milliseconds_bucket`` whose ``destination_workload`` is
    the stable or the canary Deployment, in the Canary's namespace.  Subsets are told
    apart by a version label instead: ``armLabel: destination_version`` with
    ``stableValue``/``canaryValue`` set to the subsets' ``version`` label values.
    """

    arm_label: str = Field(
        default="destination_workload",
        description="the label whose value tells stable from canary series",
    )
    stable_value: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ARM_VALUE_CHARS,
        description="its value on stable's series (default: stable.deployment)",
    )
    canary_value: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ARM_VALUE_CHARS,
        description="its value on canary's series (default: canary.deployment)",
    )
    namespace_label: str | None = Field(
        default="destination_workload_namespace",
        description="the label holding the Canary's namespace; null to not match on it",
    )
    pod_label: str | None = Field(
        default="pod",
        description=(
            "the label naming the pod that reported a series: counter resets and pods "
            "that come and go are handled per pod; null to handle them per arm"
        ),
    )
    selector: str = Field(
        default="",
        max_length=1024,
        description=(
            'extra label matchers for every query, e.g. destination_service_name="checkout"'
        ),
    )
    queries: MetricQueries | None = Field(
        default=None, description="PromQL templates; default: Istio's standard metrics"
    )

    @field_validator("arm_label", "namespace_label", "pod_label")
    @classmethod
    def _label_name(cls, v: str | None) -> str | None:
        if v is not None and not _LABEL_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)")
        return v

    @field_validator("stable_value", "canary_value")
    @classmethod
    def _arm_value(cls, v: str | None) -> str | None:
        if v is not None and (not v.isprintable() or v != v.strip()):
            raise ValueError(
                f"{v!r} has control characters or surrounding spaces; "
                "a label value of a Deployment or subset has neither"
            )
        return v

    @field_validator("selector")
    @classmethod
    def _matchers_only(cls, v: str) -> str:
        v = v.strip().strip(",")
        if any(c in v for c in "{}"):
            raise ValueError(
                'write label matchers without braces, e.g. destination_service_name="checkout"'
            )
        return v

    def templates(self) -> tuple[str, str, str | None]:
        """(requests, errors, latency) PromQL templates."""
        if self.queries is None:
            return ISTIO_REQUESTS, ISTIO_ERRORS, ISTIO_LATENCY
        return self.queries.requests, self.queries.errors, self.queries.latency

    def latency_edge_ms(self) -> float:
        """Milliseconds per unit of the histogram's ``le`` edges."""
        return 1000.0 if self.queries is not None and self.queries.latency_unit == "s" else 1.0


class SlackApproval(_Model):
    """Ask for approvals in a Slack channel."""

    channel: str = Field(min_length=1, max_length=80, description="channel name or ID")


#: Slack user IDs (U…, W…) and user-group IDs (S…).
SLACK_ID = re.compile(r"^[UWS][A-Z0-9]{2,20}$")


class Approvals(_Model):
    """Steps that wait for a person's approval before they start."""

    before: list[StrictInt] = Field(
        default_factory=list, description="step weights (%) that need approval to enter"
    )
    slack: SlackApproval | None = None
    approvers: list[str] = Field(
        default_factory=list,
        max_length=100,
        description=(
            "Slack user IDs (U…) or user-group IDs (S…) allowed to approve in Slack; "
            "empty: anyone in the channel"
        ),
    )
    timeout: Duration = Field(default=3600.0, description="how long to wait for approval")
    on_timeout: Literal["abort", "hold"] = Field(
        default="abort",
        description="abort the rollout, or hold at the current step until someone decides",
    )

    @field_validator("on_timeout", mode="before")
    @classmethod
    def _legacy_wait(cls, v: object) -> object:
        return "hold" if v == "wait" else v  # "wait" was this setting's first name

    @field_validator("approvers")
    @classmethod
    def _slack_ids(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if not SLACK_ID.match(a)]
        if bad:
            raise ValueError(
                f"approvers are Slack user IDs (U…) or user-group IDs (S…), got {bad[:3]}"
            )
        return v


class SlackNotifications(_Model):
    """Where this Canary's rollout messages go in Slack."""

    channel: str | None = Field(
        default=None,
        min_length=1,
        max_length=80,
        description="channel name or ID (default: the approvals channel, then the daemon's)",
    )


class Webhook(_Model):
    """An HTTP endpoint that receives every event (or the listed ones) as signed JSON."""

    url: str = Field(min_length=8, max_length=2048, description="http(s) URL")
    events: list[str] = Field(
        default_factory=list, max_length=50, description="event reasons to send; empty: all"
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"a webhook URL is http:// or https:// with a host, got {v!r}")
        if parts.username or parts.password:
            raise ValueError(
                "a webhook URL carries no credentials: canaryd signs each request instead"
            )
        return v

    @field_validator("events")
    @classmethod
    def _known_reasons(cls, v: list[str]) -> list[str]:
        known = {r.value for r in EventReason}
        bad = [e for e in v if e not in known]
        if bad:
            raise ValueError(f"unknown event reasons {bad[:3]}; known: {', '.join(sorted(known))}")
        return v


class Notifications(_Model):
    """Where this Canary's events go besides Kubernetes Events, logs and MQTT."""

    slack: SlackNotifications | None = None
    webhooks: list[Webhook] = Field(default_factory=list, max_length=10)


class Promotion(_Model):
    """What happens once the last step has passed."""

    mode: Literal["copy-to-stable", "weights-only"] = Field(
        default="copy-to-stable",
        description="copy the canary's pod template into stable, or only move traffic",
    )
    timeout: Duration = Field(
        default=600.0, description="how long to wait for stable to roll out the new version"
    )


class Mirror(_Model):
    """Traffic mirroring on a step: a copy of ``percent`` % of the requests stable
    serves is sent to the canary too; its answers are discarded, so users never see
    them, and the step is judged on them."""

    percent: int = Field(ge=1, le=100, description="share of requests copied to the canary")


class Step(_Model):
    """One step written as a mapping: a weight, and what else happens at it."""

    weight: StrictInt = Field(ge=0, le=100, description="canary traffic, percent")
    mirror: Mirror | None = None


class BlueGreen(_Model):
    """``strategy: blueGreen``: the new version warms up with no user traffic (judged on
    mirrored copies of it when ``mirrorPercent`` is set), then takes all traffic in one
    switch, while the old version keeps running for ``scaleDownDelay``: a rollback in
    that time is one weight write back to it."""

    mirror_percent: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="warm up on a copy of this share of live requests, judged against stable",
    )
    approval: bool = Field(default=False, description="an approval before the switch")
    scale_down_delay: Duration = Field(
        default=600.0,
        description=(
            "after the switch, how long the new version is judged on all traffic with "
            "the old one still running (instant rollback), before it is promoted"
        ),
    )

    def steps(self) -> list[Any]:
        """The step plan: the warm-up on copies (when mirrored), then the switch."""
        warm_up = [{"weight": 0, "mirror": {"percent": self.mirror_percent}}]
        return [*(warm_up if self.mirror_percent else []), 100]


#: JSON schema of one entry of ``steps``: a weight, or a ``Step`` mapping.  Kubernetes'
#: structural schemas cannot say "an integer or an object", so the CRD keeps the entry
#: as written and canaryd validates it (``canaryd validate``, the Ready condition).
_STEP_ITEM_SCHEMA = {
    "x-kubernetes-preserve-unknown-fields": True,
    "description": "a canary weight (10), or {weight: 0, mirror: {percent: 50}}",
}


#: A header name as HTTP allows it (RFC 9110 token).
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,256}$")


class StringMatch(_Model):
    """How a header's value is matched: exactly one of ``exact``, ``prefix``, ``regex``
    (Istio's ``StringMatch``; HTTPRoute header matches take ``exact`` and ``regex``)."""

    exact: str | None = Field(default=None, max_length=4096)
    prefix: str | None = Field(default=None, min_length=1, max_length=4096)
    regex: str | None = Field(default=None, min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _one_kind(self) -> StringMatch:
        given = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of exact, prefix and regex"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from None
        return self

    def kind_value(self) -> tuple[str, str]:
        """(``exact``/``prefix``/``regex``, the value)."""
        for kind in ("exact", "prefix", "regex"):
            value = getattr(self, kind)
            if value is not None:
                return kind, value
        raise AssertionError("validated: one kind is set")


class CohortMatch(_Model):
    """Requests of an A/B test's cohort: every header named here matches (a cookie is
    the ``cookie`` header, matched by ``regex``)."""

    headers: dict[str, StringMatch] = Field(min_length=1, max_length=16)

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, StringMatch]) -> dict[str, StringMatch]:
        bad = [h for h in headers if not _HEADER_NAME.match(h)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))} is not an HTTP header name")
        return headers


class CanarySpec(_Model):
    """``spec`` of a ``Canary`` resource."""

    service: str | None = Field(
        default=None, min_length=1, max_length=MAX_NAME_CHARS, description="Istio host / app label"
    )
    stable: WorkloadRef | None = None
    canary: WorkloadRef | None = None
    traffic_routing: TrafficRouting | None = None
    steps: Annotated[
        list[StrictInt],
        WithJsonSchema({"type": "array", "items": _STEP_ITEM_SCHEMA}),
    ] = Field(
        default_factory=lambda: [10, 50, 100],
        description=(
            "canary weights (%); ends at 100. A step may be a mapping: {weight: 0, "
            "mirror: {percent: 50}} copies half of stable's requests to the canary"
        ),
    )
    analysis: Analysis = Field(default_factory=Analysis)
    metrics: Metrics = Field(
        default_factory=Metrics, description="where the Prometheus source finds both arms"
    )
    approvals: Approvals = Field(default_factory=Approvals)
    notifications: Notifications = Field(default_factory=Notifications)
    promotion: Promotion = Field(default_factory=Promotion)
    trigger: Literal["manual", "auto"] = Field(
        default="manual",
        description=(
            "manual: rollouts start on `canaryd promote`; auto: also when the canary "
            "Deployment's pod template changes"
        ),
    )
    strategy: Literal["canary", "abTest", "blueGreen"] = Field(
        default="canary",
        description=(
            "canary: shift a share of all traffic step by step (steps); abTest: send the "
            "requests that match `match` to the canary for one analysed step "
            "(analysis.stepDuration), then promote; blueGreen: warm up with no user "
            "traffic (on mirrored copies with blueGreen.mirrorPercent), then switch all "
            "of it at once, the old version kept for blueGreen.scaleDownDelay; abTest "
            "and blueGreen plan their own steps"
        ),
    )
    blue_green: BlueGreen | None = Field(
        default=None, alias="blueGreen", description="strategy blueGreen's settings"
    )
    match: list[CohortMatch] = Field(
        default_factory=list,
        max_length=8,
        description=(
            "abTest's cohort: requests matching any entry go to the canary, e.g. "
            "[{headers: {x-canary: {exact: insider}}}]"
        ),
    )

    #: each step's mirror percent, 0 for none (from the steps written as mappings)
    _mirror_pcts: tuple[int, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _step_mappings(cls, data: Any, handler: ModelWrapValidatorHandler[CanarySpec]) -> Any:
        """Steps written as mappings become their weights; their mirrors are kept
        beside them (``mirror_pct``) and written back out by the serializer."""
        mirrors: tuple[int, ...] = ()
        if isinstance(data, Mapping):
            data = cls._strategy_plan(data)
        steps = data.get("steps") if isinstance(data, Mapping) else None
        if isinstance(steps, list) and any(isinstance(x, Mapping) for x in steps):
            weights: list[Any] = []
            pcts: list[int] = []
            for i, item in enumerate(steps):
                if not isinstance(item, Mapping):
                    weights.append(item)
                    pcts.append(0)
                    continue
                try:
                    step = Step.model_validate(item)
                except ValidationError as exc:
                    raise ValueError("; ".join(describe_errors(exc, Step, f"steps[{i}]"))) from None
                weights.append(step.weight)
                pcts.append(step.mirror.percent if step.mirror else 0)
            data = {**data, "steps": weights}
            mirrors = tuple(pcts)
        spec = handler(data)
        if not isinstance(spec, CanarySpec):
            return spec
        if any(mirrors):
            spec._mirror_pcts = mirrors
            spec._mirrors_valid()
        if spec.steps and spec.steps[0] == 0 and not spec.mirror_pct(0):
            raise ValueError(
                "a 0% step sends the canary nothing to judge: mirror traffic to it "
                "({weight: 0, mirror: {percent: 50}}) or start at a weight above 0"
            )
        return spec

    @staticmethod
    def _strategy_plan(data: Mapping[str, Any]) -> Mapping[str, Any]:
        """The steps abTest and blueGreen plan for themselves, written into ``data``
        (given steps must be those: a spec dumped and read back).

        An A/B test routes a cohort, not weights: one step, the cohort's (canaryWeight
        is then the cohort's share on the canary: 100).  A blue/green is a warm-up on
        mirrored copies (when ``mirrorPercent`` is set), then the switch, with the
        approval before it when asked; its settings default when left out."""
        strategy = data.get("strategy")
        if strategy == "abTest":
            if "steps" in data and data["steps"] != [100]:
                raise ValueError(
                    "strategy abTest sends the cohort (match) to the canary in one step: "
                    "remove steps (weight steps are the canary strategy's)"
                )
            return {**data, "steps": [100]}
        if strategy != "blueGreen":
            return data
        raw = data.get("blueGreen", data.get("blue_green")) or {}
        try:
            plan = BlueGreen.model_validate(raw)
        except ValidationError as exc:
            raise ValueError("; ".join(describe_errors(exc, BlueGreen, "blueGreen"))) from None
        steps = plan.steps()
        if "steps" in data and data["steps"] != steps:
            raise ValueError(
                "strategy blueGreen plans its own steps (a warm-up, then the switch to 100%): "
                "remove steps; blueGreen.mirrorPercent warms up on mirrored traffic"
            )
        out = {k: v for k, v in data.items() if k != "blue_green"}
        out |= {"steps": steps, "blueGreen": raw}  # left out: its defaults
        if plan.approval:
            approvals = dict(data.get("approvals") or {})
            before = approvals.get("before") or []
            if isinstance(before, list) and 100 not in before:
                approvals["before"] = [*before, 100]
            out["approvals"] = approvals
        return out

    def own_step_duration_s(self, step_index: int) -> float | None:
        """How long step ``step_index`` is judged when not ``stepDuration``: under
        blueGreen, the switch's ``scaleDownDelay`` (the old version kept); else None."""
        if self.blue_green is not None and self.steps[step_index : step_index + 1] == [100]:
            return self.blue_green.scale_down_delay
        return None

    def _mirrors_valid(self) -> None:
        for weight, pct in zip(self.steps, self._mirror_pcts, strict=True):
            if pct and weight == 100:
                raise ValueError(
                    "a 100% step has no stable traffic left to mirror: mirror a step below 100"
                )
        if self.strategy == "abTest":
            raise ValueError("strategy abTest routes a cohort, it has no steps to mirror")

    @field_serializer("steps")
    def _steps_out(self, steps: list[int]) -> list[Any]:
        if not self._mirror_pcts:
            return list(steps)
        return [
            {"weight": w, "mirror": {"percent": p}} if p else w
            for w, p in zip(steps, self._mirror_pcts, strict=True)
        ]

    def mirror_pct(self, step_index: int) -> int:
        """The share of stable's requests copied to the canary at step ``step_index``."""
        pcts = self._mirror_pcts
        return pcts[step_index] if 0 <= step_index < len(pcts) else 0

    @property
    def mirrors(self) -> bool:
        """Whether any step mirrors traffic."""
        return any(self._mirror_pcts)

    @model_validator(mode="after")
    def _blue_green_valid(self) -> CanarySpec:
        if self.strategy != "blueGreen" and self.blue_green is not None:
            raise ValueError("blueGreen applies only to strategy blueGreen")
        return self

    @model_validator(mode="after")
    def _ab_test_valid(self) -> CanarySpec:
        if self.strategy != "abTest":
            if self.match:
                raise ValueError("match applies only to strategy abTest (set strategy: abTest)")
            return self
        if not self.match:
            raise ValueError(
                "strategy abTest needs match: the cohort's requests, e.g. "
                "[{headers: {x-canary: {exact: insider}}}]"
            )
        if self.promotion.mode == "weights-only":
            raise ValueError(
                "strategy abTest promotes by copying the canary's template to stable; "
                "promotion.mode weights-only would leave everyone else on the old version"
            )
        routing = self.traffic_routing
        if routing is not None and routing.gateway_api is not None:
            prefixed = sorted(
                name
                for m in self.match
                for name, how in m.headers.items()
                if how.prefix is not None
            )
            if prefixed:
                raise ValueError(
                    f"HTTPRoute header matches are exact or regex, not prefix (header "
                    f"{', '.join(prefixed)}): write regex '^value' instead"
                )
        return self

    def analysis_steps(self) -> tuple[int, ...]:
        """The steps as the analysis plans its checks (``analysis.engine.plan_checks``):
        a step below 100% has stable traffic beside it to compare with, a 100% step only
        its limits.  An A/B test's one step sends the cohort alone to the canary, and
        stable serves everyone else: it is a comparing step, its cohort's share of all
        traffic below 100 (1 stands for it; the engine reads shares from the counts)."""
        return (1,) if self.strategy == "abTest" else tuple(self.steps)

    def step_traffic(self, step_index: int) -> str:
        """What step ``step_index`` sends the canary, in words for messages and events."""
        weight = self.steps[step_index]
        if self.strategy == "abTest":
            shapes = {"exact": "{name}: {value}", "prefix": "{name}: {value}*"}
            cohort = " or ".join(
                ", ".join(
                    shapes.get(kind, "{name} =~ /{value}/").format(name=name, value=value)
                    for name, (kind, value) in ((n, h.kind_value()) for n, h in m.headers.items())
                )
                for m in self.match
            )
            return f"the A/B cohort ({cohort}) on the canary, everyone else on stable"
        mirror = self.mirror_pct(step_index)
        if mirror:
            return (
                f"{weight}% of traffic on the canary, and a {mirror}% mirror of the rest "
                "(answers discarded: users stay on stable)"
            )
        return f"{weight}% of traffic on the canary"

    def traffic_share_pct(self, weight_pct: int, cohort_pct: int) -> int:
        """The share of all requests the canary serves at ``weight_pct``: the weight
        itself, or under abTest that share of the cohort (``cohort_pct`` of requests)."""
        if self.strategy == "abTest":
            return round(weight_pct * cohort_pct / 100)
        return weight_pct

    @field_validator("steps")
    @classmethod
    def _steps_valid(cls, steps: list[int]) -> list[int]:
        if not steps:
            raise ValueError("needs at least one step, and the last must be 100")
        bad = [w for i, w in enumerate(steps) if not 0 < w <= 100 and (w, i) != (0, 0)]
        if bad:
            raise ValueError(
                f"weights are canary traffic percentages from 1 to 100 (0 only for a first "
                f"step that mirrors traffic); got {bad} in {steps}"
            )
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"weights must increase from step to step (got {steps})")
        if steps[-1] != 100:
            raise ValueError(
                f"the last step must be 100 (got {steps}): a canary is promoted only after "
                "it has carried all traffic"
            )
        return steps

    @model_validator(mode="after")
    def _approvals_name_steps(self) -> CanarySpec:
        unknown = [w for w in self.approvals.before if w not in self.steps]
        if unknown:
            raise ValueError(
                f"approvals.before names weights {unknown} that are not steps {self.steps}"
            )
        return self

    def arm_values(self) -> tuple[str | None, str | None]:
        """The values of ``metrics.armLabel`` on stable's and canary's series:
        ``metrics.stableValue``/``canaryValue``, else the Deployments' names."""
        stable = self.metrics.stable_value or (self.stable.deployment if self.stable else None)
        canary = self.metrics.canary_value or (self.canary.deployment if self.canary else None)
        return stable, canary


def _model_at(model: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The pydantic model class that the error location ``loc`` points into."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or isinstance(part, int):
            continue
        field = next(
            (f for name, f in current.model_fields.items() if part in (name, f.alias)), None
        )
        if field is None:
            return current
        current = _first_model(field.annotation)
    return current


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def describe_errors(error: ValidationError, model: type[BaseModel], prefix: str) -> list[str]:
    """Each pydantic error as one line a person understands, naming the field path."""
    lines = []
    for err in error.errors():
        loc = [p for p in err["loc"] if p != "__root__"]
        path = ".".join([prefix] + [f"[{p}]" if isinstance(p, int) else str(p) for p in loc])
        path = path.replace(".[", "[")
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            names = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
            close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
            msg = "unknown field" + (f"; did you mean '{close[0]}'?" if close else "")
            if names and not close:
                msg += f" (known fields: {', '.join(names)})"
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            bad_input = err.get("input")
            if err["type"] not in ("value_error", "assertion_error") and not isinstance(
                bad_input, dict | list
            ):
                msg += f" (got {short_repr(bad_input)})"
        lines.append(one_line(f"{path}: {msg}"))
    return lines


def parse_spec(data: Mapping[str, Any] | None, source: str = "") -> CanarySpec:
    """A spec from a bare spec mapping or a whole ``Canary`` resource mapping.

    Raises:
        SpecError: listing every problem, each naming its field path.
    """
    data = dict(data or {})
    prefix = "spec"
    if "kind" in data or "apiVersion" in data or "metadata" in data:
        problems = []
        if data.get("apiVersion") != API_VERSION:
            got = short_repr(data.get("apiVersion"))
            problems.append(f"apiVersion: expected '{API_VERSION}', got {got}")
        if data.get("kind") != KIND:
            problems.append(f"kind: expected '{KIND}', got {short_repr(data.get('kind'))}")
        spec_data = data.get("spec") or {}
        if not isinstance(spec_data, dict):
            problems.append("spec: must be a mapping")
            spec_data = {}
        if problems:
            try:
                CanarySpec.model_validate(spec_data)
            except ValidationError as exc:
                problems += describe_errors(exc, CanarySpec, prefix)
            raise SpecError(problems, source)
        data = spec_data
    try:
        return CanarySpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(describe_errors(exc, CanarySpec, prefix), source) from None


def load_spec_text(text: str, source: str = "<string>") -> CanarySpec:
    """Parse YAML text holding a bare spec or a whole ``Canary`` resource."""
    try:
        data = load_yaml(text)
    except YAMLInputError as exc:
        raise SpecError([str(exc)], source) from None
    if data is not None and not isinstance(data, dict):
        raise SpecError(
            [f"expected a mapping (a spec or a Canary resource), got {type(data).__name__}"],
            source,
        )
    return parse_spec(data, source)


def load_spec_file(path: str | Path) -> CanarySpec:
    """Parse a YAML file holding a bare spec or a whole ``Canary`` resource."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(["file not found"], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"cannot read the file: {exc}"], str(path)) from None
    return load_spec_text(text, str(path))


def cluster_warnings(spec: CanarySpec) -> list[str]:
    """Fields a cluster rollout needs that this spec leaves out (simulation needs none)."""
    missing = []
    if not spec.service:
        missing.append("spec.service: not set; `canaryd run` needs the Istio host")
    if spec.stable is None:
        missing.append("spec.stable.deployment: not set; `canaryd run` needs the stable Deployment")
    if spec.canary is None:
        missing.append("spec.canary.deployment: not set; `canaryd run` needs the canary Deployment")
    if spec.traffic_routing is None:
        missing.append(
            "spec.trafficRouting: not set; `canaryd run` needs a VirtualService (istio) or "
            "an HTTPRoute (gatewayAPI)"
        )
    return missing
