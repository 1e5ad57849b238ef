"""``canaryd convert``: a Flagger ``Canary`` as a canaryd ``Canary``, and a warning for
everything that does not carry over as it was.

Pure functions: parsed documents (or YAML text) in, canaryd manifests and warnings
out; nothing is read from or written to a cluster.

Rules the conversion keeps:

* Every field of the Flagger Canary is either mapped onto a canaryd field or named in
  exactly one warning (:class:`ConvertWarning`, ``path: message``).  A warning on a
  mapping or list covers what is inside it (a custom metric, a webhook), except the
  two that explain how a mapped section differs: ``spec.targetRef`` (the workload
  model) and ``spec.service`` (the routing objects), whose fields are each mapped or
  warned about on their own.  A mapped field whose meaning differs in canaryd (a
  webhook turned into an approval, maxWeight below 100) gets a warning too.
* Values Flagger reads as "not set" (``null``, ``false``, ``0`` where Flagger's
  default is 0, empty lists and mappings) are not warned about; nor is what the API
  server writes (``status``, ``metadata.uid``, ``resourceVersion``, …).
* A field of the wrong type is not a Flagger Canary Flagger would accept: a
  :class:`ConvertError` naming the field.
* The output always passes :func:`canaryd.spec.parse_spec`.

Fields Flagger does not set keep canaryd's defaults (the comparisons with stable,
the SLO burn check, ``stepDuration``…); docs/migrating.md explains them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml
from pydantic import ValidationError

from analysis.verdict import format_duration
from canaryd.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    MAX_INTERVAL_S,
    SLO,
    Analysis,
    SpecError,
    Webhook,
    parse_spec,
)
from simulator.yamlload import (
    MAX_YAML_CHARS,
    StrictLoader,
    YAMLInputError,
    one_line,
    short_repr,
    yaml_problem,
)

FLAGGER_GROUP = "flagger.app"
FLAGGER_API_VERSION = f"{FLAGGER_GROUP}/v1beta1"

#: Flagger's shortest and default analysis interval, seconds.
FLAGGER_MIN_INTERVAL_S = 10.0
FLAGGER_DEFAULT_INTERVAL_S = 60.0
#: canaryd's default step duration: a longer interval raises it (a step needs an evaluation).
DEFAULT_STEP_DURATION_S = 600.0
#: canaryd's default steps, used when Flagger's analysis shifts no traffic by weight.
DEFAULT_STEPS = [10, 50, 100]
#: canaryd's default relative tolerance of a latency comparison.
LATENCY_TOLERANCE = 0.2
MAX_LATENCY_MS = 3_600_000.0
MAX_NOTIFICATION_WEBHOOKS = 10

Path = tuple[str | int, ...]

#: What the API server writes into ``metadata``: dropped without a warning.
_SERVER_METADATA = frozenset(
    {
        "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
        "deletionGracePeriodSeconds", "managedFields", "selfLink", "finalizers",
        "ownerReferences",
    }
)  # fmt: skip
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

#: ``spec.service`` fields that shape the ClusterIP Services Flagger generates.
_SERVICE_FIELDS = frozenset(
    {
        "port", "portName", "targetPort", "appProtocol", "portDiscovery", "headless",
        "trafficDistribution", "apex", "primary", "canary", "unmanagedMetadata",
    }
)  # fmt: skip
#: ``spec.service`` fields that shape the VirtualService Flagger generates.
_VIRTUAL_SERVICE_FIELDS = frozenset(
    {
        "gateways", "gatewayRefs", "hosts", "delegation", "match", "rewrite", "retries",
        "timeout", "backendTimeout", "headers", "corsPolicy", "mirror",
    }
)  # fmt: skip


class ConvertError(ValueError):
    """Input that cannot be converted; the message is one line naming the place."""


@dataclass(frozen=True)
class ConvertWarning:
    """A Flagger field that did not carry over as it was: where, and what happened."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class RoutingOptions:
    """The routing objects the canaryd Canary names (Flagger generates its own).

    By default the VirtualService is the one Flagger generated (named after the
    service) and traffic is split by host: ``<service>`` for stable and
    ``<service>-canary`` for the canary.  With ``destination_rule``, by that
    DestinationRule's subsets.
    """

    virtual_service: str | None = None
    routes: tuple[str, ...] = ()
    destination_rule: str | None = None
    stable_subset: str = "stable"
    canary_subset: str = "canary"


@dataclass(frozen=True)
class Result:
    """The canaryd Canaries converted, in input order, and every warning."""

    manifests: list[dict[str, Any]]
    warnings: list[ConvertWarning]


def format_path(path: Path) -> str:
    """``("spec", "metrics", 0, "interval")`` → ``spec.metrics[0].interval``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _unset(value: object) -> bool:
    """What Flagger's ``omitempty`` fields read as "not set"."""
    return value is None or value is False or (isinstance(value, dict | list | str) and not value)


def _number_text(value: float) -> int | float:
    """``1.0`` → ``1``; ``0.09999999999999432`` → ``0.1``."""
    rounded = round(value, 6)
    return int(rounded) if rounded == int(rounded) else rounded


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNIT_S = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
    "h": 3600.0,
}  # fmt: skip


def go_duration(text: str) -> float | None:
    """Seconds of a Go ``time.ParseDuration`` string (``1m30s``, ``500ms``), or None."""
    body = text.strip().lstrip("+")
    if body == "0":
        return 0.0
    if not body or body.startswith("-") or _GO_DURATION_PART.sub("", body):
        return None
    return sum(float(n) * _GO_UNIT_S[u] for n, u in _GO_DURATION_PART.findall(body))


def is_flagger_canary(doc: object) -> bool:
    """A mapping with ``apiVersion: flagger.app/…`` and ``kind: Canary``."""
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("apiVersion"), str)
        and doc["apiVersion"].startswith(f"{FLAGGER_GROUP}/")
        and doc.get("kind") == "Canary"
    )


class _Canary:
    """One Flagger Canary being converted: what it read, and what it warned about."""

    def __init__(self, doc: Mapping[str, Any], options: RoutingOptions, prefix: Path) -> None:
        self.doc = doc
        self.options = options
        self.prefix = prefix
        self.covered: set[Path] = set()
        self.notes: dict[Path, list[str]] = {}

    # -- reading ---------------------------------------------------------------------

    def take(self, path: Path) -> None:
        """``path`` is mapped: no warning for it or anything inside it."""
        self.covered.add(path)

    def warn(self, path: Path, message: str) -> None:
        """One warning per path, covering what is inside it: a second message for a
        path joins the first."""
        self.covered.add(path)
        self.note(path, message)

    def note(self, path: Path, message: str) -> None:
        """A warning about how a mapped section differs; its fields are still each
        mapped or warned about on their own."""
        self.notes.setdefault(path, []).append(message)

    def fail(self, path: Path, message: str) -> NoReturn:
        raise ConvertError(one_line(f"{format_path(self.prefix + path)}: {message}"))

    def get(self, path: Path) -> Any:
        node: Any = self.doc
        for part in path:
            if isinstance(part, int):
                node = node[part] if isinstance(node, list) and part < len(node) else None
            else:
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                return None
        return node

    def mapping(self, path: Path) -> dict[str, Any] | None:
        value = self.get(path)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {short_repr(value)}")
        return value

    def sequence(self, path: Path) -> list[Any]:
        value = self.get(path)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {short_repr(value)}")
        return value

    def text(self, path: Path) -> str | None:
        value = self.get(path)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {short_repr(value)}")
        return value

    def integer(self, path: Path, low: int = 0, high: int | None = None) -> int | None:
        value = self.get(path)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected a whole number, got {short_repr(value)}")
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"{low} or more"
            self.fail(path, f"expected a whole number {bound}, got {value}")
        return value

    def number(self, path: Path) -> float | None:
        value = self.get(path)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"expected a number, got {short_repr(value)}")
        if not math.isfinite(value):
            self.fail(path, f"expected a finite number, got {value}")
        return float(value)

    def flag(self, path: Path) -> bool:
        value = self.get(path)
        if value is None:
            return False
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {short_repr(value)}")
        return value

    # -- the conversion ----------------------------------------------------------------

    def convert(self) -> tuple[dict[str, Any], list[ConvertWarning]]:
        self.take(("apiVersion",))
        self.take(("kind",))
        self.take(("status",))
        metadata = self.metadata()
        if self.mapping(("spec",)) is None:
            self.fail(("spec",), "required: a Flagger Canary has a spec")
        target = self.target()
        service = self.text(("spec", "service", "name")) or target
        self.take(("spec", "service", "name"))
        self.provider()
        spec: dict[str, Any] = {
            "service": service,
            "stable": {"deployment": f"{target}-primary"},
            "canary": {"deployment": target},
            "trafficRouting": {"istio": self.routing(service, target)},
            "trigger": "auto",
        }
        self.service_fields(service)
        analysis_path = self.analysis_path()
        steps = self.steps(analysis_path)
        spec["steps"] = steps
        analysis = self.analysis(analysis_path)
        if analysis:
            spec["analysis"] = analysis
        approvals, webhooks = self.webhooks(analysis_path, steps)
        if approvals:
            spec["approvals"] = {"before": approvals, "onTimeout": "hold"}
        if webhooks:
            spec["notifications"] = {"webhooks": webhooks}
        spec["promotion"] = {"mode": "copy-to-stable"}
        self.threshold(analysis_path, analysis)
        self.workload_fields(target)
        self.leftovers()
        manifest = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}
        try:
            parse_spec(manifest)
        except SpecError as exc:  # pragma: no cover - the conversion builds valid specs
            self.fail(("spec",), f"the converted Canary is invalid: {'; '.join(exc.problems)}")
        return manifest, self.warnings()

    def warnings(self) -> list[ConvertWarning]:
        ordered = sorted(self.notes.items(), key=lambda item: _position(self.doc, item[0]))
        return [
            ConvertWarning(format_path(self.prefix + path), one_line("; ".join(messages)))
            for path, messages in ordered
        ]

    def metadata(self) -> dict[str, Any]:
        meta = self.mapping(("metadata",))
        name = self.text(("metadata", "name"))
        if meta is None or not name:
            self.fail(("metadata", "name"), "required: the Canary's name")
        out: dict[str, Any] = {"name": name}
        namespace = self.text(("metadata", "namespace"))
        if namespace:
            out["namespace"] = namespace
        for key in ("labels", "annotations"):
            values = self.mapping(("metadata", key)) or {}
            kept = {k: v for k, v in values.items() if k != _LAST_APPLIED}
            if kept:
                out[key] = kept
            self.take(("metadata", key))
        for key in ("name", "namespace", *_SERVER_METADATA):
            self.take(("metadata", key))
        return out

    @property
    def name(self) -> str:
        return str(self.get(("metadata", "name")))

    @property
    def namespace(self) -> str | None:
        return self.text(("metadata", "namespace"))

    def target(self) -> str:
        path: Path = ("spec", "targetRef")
        if self.mapping(path) is None:
            self.fail(path, "required: the Deployment Flagger rolls out")
        kind = self.text((*path, "kind")) or "Deployment"
        if kind != "Deployment":
            self.fail((*path, "kind"), f"canaryd rolls out Deployments only, not a {kind}")
        name = self.text((*path, "name"))
        if not name:
            self.fail((*path, "name"), "required: the Deployment's name")
        for key in ("apiVersion", "kind", "name"):
            self.take((*path, key))
        ns = f" -n {self.namespace}" if self.namespace else ""
        self.note(
            path,
            f"Flagger generates and owns Deployment {name}-primary (stable) and scales {name} "
            f"(the canary) to zero between rollouts; canaryd creates nothing: converted to "
            f"stable.deployment {name}-primary and canary.deployment {name}, which must both "
            f"exist, with trigger: auto (a change to the pod template of {name} starts a rollout) "
            f"and promotion.mode copy-to-stable (that template is copied into {name}-primary "
            f"as Flagger does, but ConfigMaps and Secrets get no -primary copies). "
            f"{name}-primary and the Services belong to the Flagger Canary: delete it with "
            f"`kubectl delete canaries.flagger.app {self.name}{ns} --cascade=orphan`, "
            "or they are deleted with it",
        )
        return name

    def provider(self) -> None:
        path: Path = ("spec", "provider")
        provider = self.text(path)
        if provider is None or provider.split(":")[0] == "istio":
            self.take(path)
        else:
            self.warn(
                path,
                f"canaryd shifts Istio VirtualService weights only: converted for Istio, "
                f"not {provider}",
            )

    def routing(self, service: str, target: str) -> dict[str, Any]:
        opts = self.options
        vs_name = opts.virtual_service or service
        virtual_service: dict[str, Any] = {"name": vs_name}
        if opts.routes:
            virtual_service["routes"] = list(opts.routes)
        istio: dict[str, Any] = {"virtualService": virtual_service}
        routes = f"HTTP routes {', '.join(opts.routes)}" if opts.routes else "an HTTP route"
        if opts.destination_rule:
            istio["destinationRule"] = {
                "name": opts.destination_rule,
                "stableSubset": opts.stable_subset,
                "canarySubset": opts.canary_subset,
            }
            how = (
                f"VirtualService {vs_name} needs {routes} to host {service} with subsets "
                f"{opts.stable_subset} and {opts.canary_subset} of DestinationRule "
                f"{opts.destination_rule}, whose labels tell the pods of {target}-primary "
                f"from those of {target} (e.g. app: {target}-primary and app: {target}); "
                "Flagger generates no subsets"
            )
        else:
            how = (
                f"VirtualService {vs_name} needs {routes} with destinations host {service} "
                f"(stable) and {service}-canary (canary), the Services of those names "
                f"selecting the pods of {target}-primary and {target}; Flagger's generated "
                f"VirtualService routes to {service}-primary, not {service}: change that "
                "destination's host, or pass --destination-rule to split by subsets"
            )
        self.note(
            ("spec", "service"),
            "canaryd generates no Service, VirtualService or DestinationRule: it changes "
            f"only the weights of routes you own. {how}",
        )
        return istio

    def service_fields(self, service: str) -> None:
        for key, value in (self.mapping(("spec", "service")) or {}).items():
            path: Path = ("spec", "service", key)
            if _unset(value) or key == "name":
                continue
            if key in _SERVICE_FIELDS:
                self.warn(
                    path,
                    "shapes the Services Flagger generates; canaryd generates none: keep "
                    f"{service} and {service}-canary as they are (not converted)",
                )
            elif key in _VIRTUAL_SERVICE_FIELDS:
                self.warn(
                    path,
                    "shapes the VirtualService Flagger generates; canaryd changes only route "
                    "weights: write it into your VirtualService (not converted)",
                )
            elif key == "trafficPolicy":
                self.warn(
                    path,
                    "shapes the DestinationRules Flagger generates; canaryd generates none: "
                    "write it into your DestinationRule (not converted)",
                )

    def analysis_path(self) -> Path:
        analysis = self.get(("spec", "analysis"))
        legacy = self.get(("spec", "canaryAnalysis"))
        if not _unset(analysis):
            if not _unset(legacy):
                self.warn(
                    ("spec", "canaryAnalysis"),
                    "ignored: Flagger reads spec.analysis when both are set",
                )
            path: Path = ("spec", "analysis")
        elif not _unset(legacy):
            path = ("spec", "canaryAnalysis")
        else:
            self.warn(
                ("spec", "analysis"),
                "not set: Flagger promotes such a Canary without analysis; canaryd analyses "
                f"every rollout, here with its defaults (steps {_steps_text(DEFAULT_STEPS)})",
            )
            return ("spec", "analysis")
        if self.mapping(path) is None:  # pragma: no cover - _unset covers None
            self.fail(path, "expected a mapping")
        return path

    # -- steps -------------------------------------------------------------------------

    def steps(self, a: Path) -> list[int]:
        step = self.integer((*a, "stepWeight"), 0, 100) or 0
        raw_weights = self.sequence((*a, "stepWeights"))
        max_weight = self.integer((*a, "maxWeight"), 0, 100) or 0
        iterations = self.integer((*a, "iterations")) or 0
        match = self.sequence((*a, "match"))
        self.extras(a)
        if match:
            self.warn(
                (*a, "match"),
                "A/B routing by headers, cookies or source labels is not supported: canaryd "
                "splits traffic by weight only (not converted)",
            )
        if iterations:
            strategy = "A/B testing" if match else "blue/green"
            self.warn(
                (*a, "iterations"),
                f"Flagger ran {strategy}: {iterations} iterations of analysis, then all "
                "traffic at once; canaryd shifts traffic by weight only: converted to "
                f"canaryd's default steps {_steps_text(DEFAULT_STEPS)}",
            )
            for key in ("stepWeight", "stepWeights", "maxWeight"):
                if not _unset(self.get((*a, key))) and self.get((*a, key)) != 0:
                    self.warn((*a, key), "ignored by Flagger when iterations is set")
            return list(DEFAULT_STEPS)
        weights: list[int] = []
        max_path: Path
        if step:
            self.take((*a, "stepWeight"))
            if raw_weights:
                listed = self.step_weights(a, raw_weights, check=False)
                top = listed[-1] if listed else 100
                self.warn(
                    (*a, "stepWeights"),
                    f"Flagger steps by stepWeight ({step}%) when both are set, up to the last "
                    f"of these ({top}%): converted that way",
                )
                if max_weight:
                    self.warn((*a, "maxWeight"), "ignored by Flagger when stepWeights is set")
                max_path = (*a, "stepWeights")
            else:
                top = max_weight or 100
                self.take((*a, "maxWeight"))
                max_path = (*a, "maxWeight")
            weight = 0
            while weight < top:
                weight = min(weight + step, 100)
                weights.append(weight)
        elif raw_weights:
            weights = self.step_weights(a, raw_weights, check=True)
            self.take((*a, "stepWeights"))
            if max_weight:
                self.warn(
                    (*a, "maxWeight"),
                    "ignored by Flagger when stepWeights is set (the last of them is the maximum)",
                )
            max_path = (*a, "stepWeights")
        elif _unset(self.get(a)):  # no analysis at all: warned about as a whole
            return list(DEFAULT_STEPS)
        else:
            where: Path = (*a, "maxWeight") if max_weight else (*a, "stepWeight")
            self.warn(
                where,
                "no stepWeight or stepWeights: Flagger shifts no traffic by weight; converted "
                f"to canaryd's default steps {_steps_text(DEFAULT_STEPS)}",
            )
            return list(DEFAULT_STEPS)
        if not weights:
            weights = [100]
        if weights[-1] < 100:
            self.warn(
                max_path,
                f"Flagger promotes after {weights[-1]}% without sending all traffic to the "
                "canary; canaryd's last step is always 100%: the canary carries all traffic "
                "for one more step, judged against the limits alone (no stable to compare "
                "with), before it is promoted",
            )
            weights.append(100)
        return weights

    def step_weights(self, a: Path, raw: list[Any], *, check: bool) -> list[int]:
        """Flagger's ``stepWeights`` as canaryd steps: whole, increasing, 1 to 100."""
        path: Path = (*a, "stepWeights")
        weights: list[int] = []
        for i, value in enumerate(raw):
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail((*path, i), f"expected a whole number, got {short_repr(value)}")
            capped = min(value, 100)
            if capped >= 1 and (not weights or capped > weights[-1]):
                weights.append(capped)
        if check and weights != raw:
            self.warn(
                path,
                f"{raw} are not whole percentages increasing from 1 to 100: converted to {weights}",
            )
        return weights

    def extras(self, a: Path) -> None:
        """Analysis settings of Flagger's that canaryd has no place for."""
        messages = {
            "stepWeightPromotion": (
                "no staged promotion: once stable runs the promoted version canaryd sends it "
                "all traffic in one move (not converted)"
            ),
            "mirror": "traffic mirroring is not supported (not converted)",
            "mirrorWeight": "traffic mirroring is not supported (not converted)",
            "sessionAffinity": (
                "cookie-based session affinity is not supported: canaryd splits traffic by "
                "weight only (not converted)"
            ),
            "primaryReadyThreshold": (
                "canaryd moves traffic only while the Deployments are ready, with no "
                "percentage threshold (not converted)"
            ),
            "canaryReadyThreshold": (
                "canaryd moves traffic only once the canary's pods are ready, with no "
                "percentage threshold (not converted)"
            ),
        }
        for key, message in messages.items():
            value = self.get((*a, key))
            if not _unset(value) and value != 0:
                self.warn((*a, key), message)

    # -- analysis and metrics ----------------------------------------------------------

    def analysis(self, a: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        interval = self.interval(a)
        if interval is not None:
            out["interval"] = format_duration(interval)
            if interval > DEFAULT_STEP_DURATION_S:
                out["stepDuration"] = format_duration(interval)
                self.warn(
                    (*a, "interval"),
                    f"longer than canaryd's default stepDuration "
                    f"({format_duration(DEFAULT_STEP_DURATION_S)}): analysis.stepDuration set "
                    "to the interval, so that every step is evaluated at least once",
                )
        out.update(self.metrics(a))
        alerts = self.sequence((*a, "alerts"))
        if alerts:
            names = ", ".join(str(alert.get("name")) for alert in alerts if isinstance(alert, dict))
            self.warn(
                (*a, "alerts"),
                f"Flagger alert providers ({names or 'unnamed'}) are not converted: send "
                "canaryd's events to Slack with notifications.slack.channel (the daemon holds "
                "the token) or to notifications.webhooks",
            )
        return out

    def interval(self, a: Path) -> float | None:
        path: Path = (*a, "interval")
        text = self.text(path)
        if text is None:
            return None
        self.take(path)
        seconds = go_duration(text)
        if seconds is None:
            self.warn(
                path,
                f"{text!r} is not a Go duration, so Flagger uses its default "
                f"{format_duration(FLAGGER_DEFAULT_INTERVAL_S)}: converted to that",
            )
            return FLAGGER_DEFAULT_INTERVAL_S
        if seconds < FLAGGER_MIN_INTERVAL_S:
            self.warn(
                path,
                f"Flagger runs the analysis at most every "
                f"{format_duration(FLAGGER_MIN_INTERVAL_S)}: converted to that",
            )
            return FLAGGER_MIN_INTERVAL_S
        if seconds > MAX_INTERVAL_S:
            self.warn(
                path,
                f"canaryd evaluates at least every {format_duration(MAX_INTERVAL_S)}: "
                "converted to that",
            )
            return MAX_INTERVAL_S
        return seconds

    def metrics(self, a: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, metric in enumerate(self.sequence((*a, "metrics"))):
            path: Path = (*a, "metrics", i)
            if not isinstance(metric, dict):
                self.fail(path, f"expected a mapping, got {short_repr(metric)}")
            name = self.text((*path, "name")) or ""
            self.take((*path, "name"))
            if self.mapping((*path, "templateRef")) is not None:
                self.custom_metric(path, name)
            elif self.text((*path, "query")):
                self.warn(
                    path,
                    f"custom metric {name!r} (an inline query) is not converted: {_CUSTOM}",
                )
            elif name == "request-success-rate":
                if "errorRate" in out:
                    self.warn(path, "a second request-success-rate: only the first is converted")
                    continue
                limit = self.success_rate(path)
                if limit is not None:
                    out["errorRate"] = {"maxPct": limit}
            elif name == "request-duration":
                if "latency" in out:
                    self.warn(path, "a second request-duration: only the first is converted")
                    continue
                limit = self.duration(path)
                if limit is not None:
                    out["latency"] = [
                        {"percentile": 99, "relativeTolerance": LATENCY_TOLERANCE, "maxMs": limit},
                        {"percentile": 50, "relativeTolerance": LATENCY_TOLERANCE},
                    ]
            else:
                self.warn(
                    path,
                    f"metric {name!r} is neither a builtin (request-success-rate, "
                    "request-duration) nor has a templateRef or query: Flagger fails it every "
                    "time (not converted)",
                )
        return out

    def custom_metric(self, path: Path, name: str) -> None:
        ref: Path = (*path, "templateRef")
        template = self.text((*ref, "name")) or "?"
        namespace = self.text((*ref, "namespace")) or self.namespace
        where = f"{namespace}/{template}" if namespace else template
        bounds = self.threshold_range(path)
        self.warn(
            path,
            f"custom metric {name!r} (MetricTemplate {where}{bounds}) is not converted: {_CUSTOM}",
        )

    def threshold_range(self, path: Path) -> str:
        low = self.number((*path, "thresholdRange", "min"))
        high = self.number((*path, "thresholdRange", "max"))
        parts = ([f"min {low:g}"] if low is not None else []) + (
            [f"max {high:g}"] if high is not None else []
        )
        return f", thresholdRange {' '.join(parts)}" if parts else ""

    def builtin_bound(self, path: Path, bound: str) -> tuple[float | None, Path]:
        """The bound (``min`` or ``max``) of a builtin metric and where it was written:
        ``thresholdRange.<bound>``, else Flagger's older ``threshold``."""
        range_path: Path = (*path, "thresholdRange")
        legacy_path: Path = (*path, "threshold")
        legacy = self.number(legacy_path)
        if self.mapping(range_path) is not None:
            if legacy:
                self.warn(legacy_path, "ignored: Flagger reads thresholdRange when both are set")
            return self.number((*range_path, bound)), (*range_path, bound)
        if legacy:
            return legacy, legacy_path
        return None, (*range_path, bound)

    def window(self, path: Path) -> None:
        if self.text((*path, "interval")) is not None:
            self.warn(
                (*path, "interval"),
                "canaryd has no query window: it judges each step on all requests since the "
                "step began (not converted)",
            )

    def success_rate(self, path: Path) -> float | None:
        low, where = self.builtin_bound(path, "min")
        high_path: Path = (*path, "thresholdRange", "max")
        if self.number(high_path) is not None:
            self.warn(high_path, "an upper bound on the success rate has no canaryd equivalent")
        self.window(path)
        if low is None:
            self.warn(
                where,
                "not set: no error limit to convert (canaryd's default errorRate.maxPct applies)",
            )
            return None
        pct = _number_text(100.0 - low)
        if not 0 < pct <= 100:
            self.warn(
                where,
                f"a success rate of at least {low:g}% cannot be converted: canaryd's "
                "errorRate.maxPct lies above 0 and at most 100 (its default applies)",
            )
            return None
        self.take(where)
        slo = SLO()
        burn_bound = slo.burn_rate_limit * (100.0 - slo.availability_pct)
        if pct > burn_bound:
            self.warn(
                where,
                f"converted to analysis.errorRate.maxPct {pct:g}%, but canaryd's error limit "
                f"is the lower of maxPct and the SLO burn bound: {burn_bound:g}% with the "
                f"default analysis.slo (burnRateLimit {slo.burn_rate_limit:g} × "
                f"{100.0 - slo.availability_pct:g}% of errors allowed by availabilityPct "
                f"{slo.availability_pct:g}); set analysis.slo to the service's objective, or "
                f"null, if {pct:g}% is meant",
            )
        return pct

    def duration(self, path: Path) -> float | None:
        high, where = self.builtin_bound(path, "max")
        low_path: Path = (*path, "thresholdRange", "min")
        if self.number(low_path) is not None:
            self.warn(low_path, "a lower bound on latency has no canaryd equivalent")
        self.window(path)
        if high is None:
            self.warn(
                where,
                "not set: no latency limit to convert (canaryd's default latency checks apply)",
            )
            return None
        if not 0 < high <= MAX_LATENCY_MS:
            self.warn(
                where,
                f"{high:g} ms cannot be converted: canaryd's latency maxMs lies above 0 and "
                f"at most {MAX_LATENCY_MS:g} (its default latency checks apply)",
            )
            return None
        self.take(where)
        return _number_text(high)

    def threshold(self, a: Path, analysis: dict[str, Any]) -> None:
        path: Path = (*a, "threshold")
        failed_checks = self.integer(path)
        if not failed_checks:
            return
        settings = Analysis.model_validate(analysis)
        self.warn(
            path,
            f"no equivalent: Flagger rolls back after {failed_checks} failed checks and "
            "moves on one step per interval while checks pass; canaryd counts no failed "
            "checks: each step is a sequential test that rolls back as soon as the evidence "
            "of harm is strong enough (the chance of rolling back a healthy canary is at most "
            f"analysis.alpha, {settings.alpha:g}, for the whole rollout) and passes after "
            f"analysis.stepDuration ({format_duration(settings.step_duration)}) without a "
            f"regression, or early, after minStepDuration "
            f"({format_duration(settings.min_step_duration)}), once the evidence says the "
            "canary is fine",
        )

    # -- webhooks ----------------------------------------------------------------------

    def webhooks(self, a: Path, steps: list[int]) -> tuple[list[int], list[dict[str, Any]]]:
        before: set[int] = set()
        sinks: list[dict[str, Any]] = []
        approve = (
            f"canaryd does not call its URL: a person approves with `canaryd approve "
            f"{self.name}`, the dashboard or Slack (an automated gate can write the approval "
            "through canaryd's API), and the rollout waits until then (approvals.onTimeout: "
            "hold)"
        )
        for i, hook in enumerate(self.sequence((*a, "webhooks"))):
            path: Path = (*a, "webhooks", i)
            if not isinstance(hook, dict):
                self.fail(path, f"expected a mapping, got {short_repr(hook)}")
            kind = self.text((*path, "type")) or "rollout"
            name = self.text((*path, "name")) or f"#{i}"
            url = self.text((*path, "url")) or ""
            label = f"{kind} hook {name!r}"
            if kind == "confirm-rollout":
                before.add(steps[0])
                self.warn(
                    path,
                    f"{label}: converted to an approval before the first step "
                    f"(approvals.before {steps[0]}); {approve}; unlike Flagger's, the canary "
                    "Deployment already runs the new version while it waits",
                )
            elif kind == "confirm-traffic-increase":
                before.update(steps)
                self.warn(
                    path,
                    f"{label}: converted to an approval before every step (approvals.before "
                    f"{_steps_text(steps)}); {approve}",
                )
            elif kind == "confirm-promotion":
                before.add(100)
                self.warn(
                    path,
                    f"{label}: converted to an approval before the 100% step, the last before "
                    f"promotion (approvals.before 100); {approve}; while it waits canaryd keeps "
                    "judging the canary and rolls back on evidence of harm, as Flagger keeps "
                    "running its checks",
                )
            elif kind == "pre-rollout":
                self.warn(
                    path,
                    f"{label} is not converted: canaryd runs no tests before shifting traffic; "
                    "run them in the pipeline before the canary Deployment changes, or gate "
                    "the first step with approvals.before",
                )
            elif kind == "rollout":
                self.warn(
                    path,
                    f"{label} (a test or load generator called every interval) is not "
                    "converted: canaryd calls no hooks during the analysis and judges the "
                    "canary on the traffic it gets; run a load generator yourself if that is "
                    "too little (a step needs analysis.minRequests canary requests)",
                )
            elif kind == "post-rollout":
                self.warn(
                    path,
                    f"{label} is not converted: canaryd calls no hooks after a rollout; "
                    "notifications.webhooks with events [Promoted, RolledBack] receives "
                    "canaryd's event JSON at the end of each rollout instead",
                )
            elif kind == "rollback":
                self.warn(
                    path,
                    f"{label} is not converted: canaryd does not poll for a rollback; have the "
                    f"check run `canaryd abort {self.name}` or write the abort through "
                    "canaryd's API",
                )
            elif kind == "event":
                self.event_hook(path, label, url, hook, sinks)
            else:
                self.warn(path, f"unknown webhook type {kind!r}: not converted")
        return sorted(before), sinks

    def event_hook(
        self,
        path: Path,
        label: str,
        url: str,
        hook: dict[str, Any],
        sinks: list[dict[str, Any]],
    ) -> None:
        try:
            Webhook(url=url)
        except ValidationError as exc:
            problem = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            self.warn(path, f"{label} is not converted: {problem}")
            return
        if len(sinks) >= MAX_NOTIFICATION_WEBHOOKS:
            self.warn(
                path,
                f"{label} is not converted: a canaryd Canary has at most "
                f"{MAX_NOTIFICATION_WEBHOOKS} notification webhooks",
            )
            return
        sinks.append({"url": url})
        extra = ("metadata", "timeout", "retries", "disableTLS", "muteAlert")
        dropped = [k for k in extra if not _unset(hook.get(k))]
        rest = f"; its {_and(dropped)} are not carried over" if dropped else ""
        self.warn(
            path,
            f"{label}: converted to notifications.webhooks: canaryd POSTs its own event JSON "
            "(schema canaryd.io/event/v1), not Flagger's payload, signed with the daemon's "
            f"key (--webhook-secret-file; without one nothing is sent){rest}",
        )

    # -- the rest of the spec ----------------------------------------------------------

    def workload_fields(self, target: str) -> None:
        autoscaler = self.text(("spec", "autoscalerRef", "name"))
        if autoscaler:
            self.warn(
                ("spec", "autoscalerRef"),
                f"canaryd manages no autoscalers: the HPA {autoscaler}-primary Flagger "
                f"generated keeps scaling {target}-primary only if you keep it, and the HPA "
                f"{autoscaler} keeps scaling {target} (not converted)",
            )
        deadline = self.integer(("spec", "progressDeadlineSeconds"))
        if deadline is not None:
            self.warn(
                ("spec", "progressDeadlineSeconds"),
                "no equivalent: canaryd does not roll back a canary whose pods do not become "
                "ready; it moves no traffic until they are (Ready=False, CanaryNotReady), or "
                "until someone aborts; promotion.timeout bounds stable's rollout of the "
                "promoted version (not converted)",
            )
        if self.flag(("spec", "skipAnalysis")):
            self.warn(
                ("spec", "skipAnalysis"),
                f"no equivalent: canaryd analyses every rollout; `canaryd skip {self.name}` "
                "passes the current step (not converted)",
            )
        if self.flag(("spec", "revertOnDeletion")):
            self.warn(
                ("spec", "revertOnDeletion"),
                "set it to false before deleting the Flagger Canary, or Flagger reverts the "
                f"Services and routes to {target} as it goes, undoing what the converted Canary "
                "relies on; a canaryd Canary, when deleted, always returns all traffic to "
                "stable (finalizer canaryd.io/restore-traffic) and leaves the Deployments as "
                "they are",
            )
        if self.flag(("spec", "suspend")):
            self.warn(
                ("spec", "suspend"),
                "no equivalent: converted as active; trigger: manual would start rollouts only "
                "on `canaryd promote`",
            )
        if self.text(("spec", "metricsServer")):
            self.warn(
                ("spec", "metricsServer"),
                "canaryd reads the Prometheus the daemon is given (--prometheus-url), not one "
                "per Canary (not converted)",
            )
        for key in ("ingressRef", "routeRef", "upstreamRef"):
            if not _unset(self.get(("spec", key))):
                self.warn(
                    ("spec", key),
                    "for Flagger's ingress and gateway providers; canaryd shifts Istio "
                    "VirtualService weights only (not converted)",
                )

    def leftovers(self) -> None:
        """A warning for every field nothing above read or warned about."""
        inside = {p[:k] for p in self.covered for k in range(len(p))}

        def visit(path: Path, value: Any) -> None:
            if path in self.covered or _unset(value):
                return
            if path in inside and isinstance(value, dict):
                for key, child in value.items():
                    visit((*path, str(key)), child)
            elif path in inside and isinstance(value, list):
                for i, child in enumerate(value):
                    visit((*path, i), child)
            else:
                self.warn(path, "canaryd has no equivalent of this field (not converted)")

        visit((), self.doc)


_CUSTOM = (
    "canaryd has no per-query thresholds; it compares canary with stable on request, 5xx "
    "and latency counters (their PromQL can be replaced with metrics.queries, templates "
    "with $selector and $by): fold what the template measures into those if it is one of "
    "them, or watch it outside canaryd"
)


def _and(words: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join(filter(None, [", ".join(words[:-1]), words[-1]])) if words else ""


def _steps_text(steps: Sequence[int]) -> str:
    return ", ".join(str(w) for w in steps)


def _position(doc: Any, path: Path) -> tuple[int, ...]:
    """Where ``path`` lies in ``doc``, to sort warnings in the order of the input; a
    path the input does not hold sorts after its parent's existing children."""
    out: list[int] = []
    node = doc
    for part in path:
        if isinstance(node, dict) and part in node:
            out.append(list(node).index(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(part)
            node = node[part]
        else:
            out.append(len(node) if isinstance(node, dict | list) else 0)
            node = None
    return tuple(out)


def convert_canary(
    doc: Mapping[str, Any], options: RoutingOptions | None = None, prefix: Path = ()
) -> tuple[dict[str, Any], list[ConvertWarning]]:
    """A Flagger ``Canary`` (a parsed mapping) as a canaryd ``Canary`` manifest, and a
    warning for every field that did not carry over as it was.

    ``prefix`` goes before every path in warnings and errors (``documents[1]``).

    Raises:
        ConvertError: not a Flagger Canary, or one Flagger itself would reject (a field
            of the wrong type, no ``targetRef``) or canaryd cannot roll out (a DaemonSet).
    """
    if not is_flagger_canary(doc):
        what = _describe(doc)
        raise ConvertError(
            one_line(
                f"{format_path(prefix) + ': ' if prefix else ''}not a Flagger Canary ({what}); "
                f"expected apiVersion {FLAGGER_API_VERSION} and kind Canary"
            )
        )
    return _Canary(doc, options or RoutingOptions(), prefix).convert()


def _plain(value: object, limit: int = 60) -> str:
    """A string as it is (on one line, bounded), anything else as a short repr."""
    if isinstance(value, str):
        text = one_line(value)
        return text if len(text) <= limit else text[: limit - 1] + "…"
    return short_repr(value, limit)


def _describe(doc: object) -> str:
    """``Deployment shop/checkout (apps/v1)``, ``a list``, ``an empty document``."""
    if not isinstance(doc, dict):
        return f"a {type(doc).__name__}" if doc is not None else "an empty document"
    kind = _plain(doc.get("kind") or "no kind", 40)
    version = _plain(doc.get("apiVersion") or "no apiVersion")
    metadata = doc.get("metadata")
    meta = metadata if isinstance(metadata, dict) else {}
    name = meta.get("name")
    if name and meta.get("namespace"):
        name = f"{meta['namespace']}/{name}"
    return f"{kind} {_plain(name) + ' ' if name else ''}({version})"


def _skip_message(doc: object) -> str:
    if isinstance(doc, dict) and isinstance(doc.get("apiVersion"), str):
        group = doc["apiVersion"].split("/")[0]
        kind = doc.get("kind")
        if group == FLAGGER_GROUP and kind == "MetricTemplate":
            return (
                f"{_describe(doc)} is skipped: canaryd has no metric templates that return "
                "one value to hold against a threshold (its metrics.queries are PromQL "
                "counters of requests, 5xx and latency)"
            )
        if group == FLAGGER_GROUP and kind == "AlertProvider":
            return (
                f"{_describe(doc)} is skipped: canaryd sends events to the Slack channel and "
                "webhooks each Canary's notifications name"
            )
        if group == API_GROUP and kind == KIND:
            return f"{_describe(doc)} is already a canaryd Canary: skipped"
    return f"{_describe(doc)} is not a Flagger Canary: skipped"


def convert_documents(documents: Sequence[object], options: RoutingOptions | None = None) -> Result:
    """Convert every Flagger Canary among ``documents`` (items of a ``List`` too); the
    others are skipped with a warning.

    Raises:
        ConvertError: no Flagger Canary among them, or one that cannot be converted.
    """
    many = len(documents) > 1
    manifests: list[dict[str, Any]] = []
    warnings: list[ConvertWarning] = []
    seen: list[str] = []
    for n, doc in enumerate(documents):
        if doc is None:
            continue
        prefix: Path = ("documents", n) if many else ()
        items: list[tuple[Path, object]] = [(prefix, doc)]
        if isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List"):
            listed = doc.get("items") or []
            if not isinstance(listed, list):
                raise ConvertError(f"{format_path((*prefix, 'items'))}: expected a list")
            items = [((*prefix, "items", i), item) for i, item in enumerate(listed)]
        for where, item in items:
            if is_flagger_canary(item):
                assert isinstance(item, dict)
                manifest, found = convert_canary(item, options, where)
                manifests.append(manifest)
                warnings += found
            else:
                seen.append(_describe(item))
                warnings.append(
                    ConvertWarning(format_path(where) or "document", _skip_message(item))
                )
    if not manifests:
        found_text = f"; found {', '.join(seen[:3])}" if seen else ""
        more = f" and {len(seen) - 3} more" if len(seen) > 3 else ""
        raise ConvertError(
            one_line(
                f"no Flagger Canary in the input (apiVersion {FLAGGER_API_VERSION}, kind "
                f"Canary){found_text}{more}"
            )
        )
    return Result(manifests, warnings)


def load_documents(text: str) -> list[Any]:
    """Every YAML document in ``text``, read as strictly as :func:`simulator.yamlload.load_yaml`.

    Raises:
        YAMLInputError: a one-line reason.
    """
    if len(text) > MAX_YAML_CHARS:
        raise YAMLInputError(
            f"the input is {len(text):,} characters long; at most {MAX_YAML_CHARS:,} are read"
        )
    try:
        return list(yaml.load_all(text, Loader=StrictLoader))  # a SafeLoader: no objects
    except yaml.YAMLError as exc:
        raise YAMLInputError(yaml_problem(exc)) from None
    except RecursionError:
        raise YAMLInputError("the input nests mappings or lists too deeply to read") from None
    except ValueError as exc:  # a number too long to read
        raise YAMLInputError(one_line(str(exc))) from None


def convert_text(text: str, options: RoutingOptions | None = None) -> Result:
    """Convert the Flagger Canaries in a YAML text (one or more documents).

    Raises:
        ConvertError: malformed YAML, no Flagger Canary, or one that cannot be converted.
    """
    try:
        documents = load_documents(text)
    except YAMLInputError as exc:
        raise ConvertError(str(exc)) from None
    if all(doc is None for doc in documents):
        raise ConvertError(f"the input is empty: expected a Flagger Canary ({FLAGGER_API_VERSION})")
    return convert_documents(documents, options)


class _Dumper(yaml.SafeDumper):
    """Block style, but lists of plain values on one line: ``steps: [10, 50, 100]``."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = bool(data) and all(isinstance(v, int | float | str) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def to_yaml(manifests: Sequence[Mapping[str, Any]]) -> str:
    """The manifests as one YAML text, separated by ``---``."""
    return "---\n".join(
        yaml.dump(dict(m), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
        for m in manifests
    )
