"""``canaryd convert``: Flagger Canaries (``tests/flagger/``, written from Flagger's
documented schema) become canaryd Canaries that validate, with the mapped values
asserted and exactly one warning for every field that does not carry over."""

from __future__ import annotations

import copy
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from canaryd import cli
from canaryd.cli import main
from canaryd.convert import (
    ConvertError,
    ConvertWarning,
    Result,
    RoutingOptions,
    convert_canary,
    convert_documents,
    convert_text,
    go_duration,
    to_yaml,
)
from canaryd.spec import CanarySpec, parse_spec

FLAGGER = Path(__file__).resolve().parent / "flagger"
EXAMPLES = sorted(FLAGGER.glob("*.yaml"))


def convert_file(name: str, options: RoutingOptions | None = None) -> Result:
    return convert_text((FLAGGER / name).read_text(), options)


def only(name: str) -> tuple[dict[str, Any], CanarySpec, dict[str, str]]:
    """The one converted manifest of an example, its parsed spec, and warnings by path."""
    result = convert_file(name)
    assert len(result.manifests) == 1
    manifest = result.manifests[0]
    return manifest, parse_spec(manifest), {w.path: w.message for w in result.warnings}


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(err: str) -> None:
    assert err.startswith("canaryd: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert "Traceback" not in err


def flagger_canary(**analysis: Any) -> dict[str, Any]:
    return {
        "apiVersion": "flagger.app/v1beta1",
        "kind": "Canary",
        "metadata": {"name": "podinfo", "namespace": "test"},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo"},
            "service": {"port": 9898},
            "analysis": {"interval": "1m", **analysis},
        },
    }


# -- every example: valid output, one warning per unmapped field ---------------------------

#: Input fields a conversion maps onto canaryd's without a warning of their own.
MAPPED = [
    r"apiVersion", r"kind", r"metadata\.(name|namespace|labels\..+)", r"spec\.provider",
    r"spec\.service\.name", r"spec\.targetRef\.(apiVersion|kind|name)",
    r"spec\.analysis\.(interval|stepWeight|maxWeight)",
    r"spec\.analysis\.stepWeights\[\d+\]", r"spec\.analysis\.metrics\[\d+\]\.name",
    r"spec\.analysis\.metrics\[\d+\]\.(thresholdRange\.(min|max)|threshold)",
    r"spec\.skipAnalysis",  # false: Flagger's default, canaryd's only behaviour
]  # fmt: skip


def leaves(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in leaves(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list) and node and any(isinstance(v, dict | list) for v in node):
        return [leaf for i, v in enumerate(node) for leaf in leaves(v, f"{path}[{i}]")]
    if isinstance(node, list) and node:
        return [f"{path}[{i}]" for i in range(len(node))]
    return [path]


#: Warnings about how a mapped section differs: they do not cover the fields inside.
NOTES = {"spec.targetRef", "spec.service"}


def covering(leaf: str, warnings: list[ConvertWarning]) -> list[ConvertWarning]:
    return [
        w
        for w in warnings
        if leaf == w.path or (w.path not in NOTES and leaf.startswith((f"{w.path}.", f"{w.path}[")))
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_converts_to_a_valid_canary(path: Path) -> None:
    result = convert_text(path.read_text())
    assert result.manifests
    for manifest in result.manifests:
        spec = parse_spec(manifest, str(path))
        assert manifest["apiVersion"] == "canaryd.io/v1alpha1" and manifest["kind"] == "Canary"
        assert spec.steps[-1] == 100
        assert spec.service and spec.stable and spec.canary and spec.traffic_routing
    paths = [w.path for w in result.warnings]
    assert len(paths) == len(set(paths)), "a path was warned about twice"
    assert all("\n" not in str(w) for w in result.warnings)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_field_is_mapped_or_named_in_exactly_one_warning(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    many = len(documents) > 1
    result = convert_text(path.read_text())
    for n, doc in enumerate(documents):
        prefix = f"documents[{n}]" if many else ""
        if doc.get("kind") != "Canary":
            assert prefix in {w.path for w in result.warnings}, "a skipped document"
            continue
        mine = [
            ConvertWarning(w.path.removeprefix(f"{prefix}."), w.message)
            for w in result.warnings
            if not prefix or w.path.startswith(f"{prefix}.")
        ]
        for leaf in leaves(doc):
            found = covering(leaf, mine)
            assert len(found) <= 1, (leaf, found)
            if not any(re.fullmatch(p, leaf) for p in MAPPED):
                assert len(found) == 1, f"{path.name}: {leaf} is neither mapped nor warned about"


def test_warnings_follow_the_order_of_the_input() -> None:
    result = convert_file("istio-stepweights.yaml")
    paths = [w.path for w in result.warnings]
    assert paths[:3] == ["spec.targetRef", "spec.progressDeadlineSeconds", "spec.autoscalerRef"]
    assert paths.index("spec.service") < paths.index("spec.service.port")
    assert paths[-1] == "spec.analysis.metrics[1].interval"


# -- Istio with stepWeights ----------------------------------------------------------------


def test_istio_stepweights_maps_steps_metrics_workloads_and_routing() -> None:
    manifest, spec, warnings = only("istio-stepweights.yaml")
    assert manifest["metadata"] == {
        "name": "checkout",
        "namespace": "shop",
        "labels": {"team": "payments"},
    }
    assert spec.steps == [5, 10, 25, 50, 100]
    assert spec.analysis.interval == 30.0
    assert spec.analysis.error_rate.max_pct == 1  # success rate at least 99%
    p99, p50 = spec.analysis.latency
    assert (p99.percentile, p99.max_ms, p99.relative_tolerance) == (99, 500, 0.2)
    assert (p50.percentile, p50.max_ms) == (50, None)
    assert spec.service == "checkout"
    assert spec.stable is not None and spec.stable.deployment == "checkout-primary"
    assert spec.canary is not None and spec.canary.deployment == "checkout"
    assert spec.trigger == "auto" and spec.promotion.mode == "copy-to-stable"
    assert spec.traffic_routing is not None and spec.traffic_routing.istio is not None
    assert spec.traffic_routing.istio.virtual_service.name == "checkout"
    assert spec.traffic_routing.istio.destination_rule is None  # split by host
    assert set(warnings) == {
        "spec.targetRef", "spec.progressDeadlineSeconds", "spec.autoscalerRef",
        "spec.service", "spec.service.port", "spec.service.targetPort",
        "spec.service.gateways", "spec.service.hosts", "spec.service.trafficPolicy",
        "spec.service.retries", "spec.analysis.threshold", "spec.analysis.stepWeights",
        "spec.analysis.metrics[0].interval", "spec.analysis.metrics[1].interval",
    }  # fmt: skip
    assert "checkout-primary" in warnings["spec.targetRef"]
    assert "--cascade=orphan" in warnings["spec.targetRef"]
    assert "-n shop" in warnings["spec.targetRef"]
    assert "checkout-canary" in warnings["spec.service"]
    assert "VirtualService checkout" in warnings["spec.service"]
    assert "failed checks" in warnings["spec.analysis.threshold"]
    assert "sequential test" in warnings["spec.analysis.threshold"]
    assert "after 50%" in warnings["spec.analysis.stepWeights"]


def test_the_latency_checks_written_are_canaryds_defaults_but_the_limit() -> None:
    _, spec, _ = only("istio-stepweights.yaml")
    defaults = parse_spec({}).analysis.latency
    assert [(c.percentile, c.relative_tolerance) for c in spec.analysis.latency] == [
        (c.percentile, c.relative_tolerance) for c in defaults
    ]


# -- webhooks ------------------------------------------------------------------------------


def test_istio_webhooks_gates_become_approvals_and_event_hooks_notifications() -> None:
    _, spec, warnings = only("istio-webhooks.yaml")
    assert spec.steps == [10, 30, 60, 100]
    assert spec.approvals.before == [10, 100]  # confirm-rollout, confirm-promotion
    assert spec.approvals.on_timeout == "hold"  # Flagger's gates wait until opened
    assert [w.url for w in spec.notifications.webhooks] == ["https://events.example.com/flagger"]
    assert spec.notifications.webhooks[0].events == []
    assert spec.analysis.error_rate.max_pct == 0.5
    hooks = {p: m for p, m in warnings.items() if p.startswith("spec.analysis.webhooks")}
    assert sorted(hooks) == [f"spec.analysis.webhooks[{i}]" for i in range(7)]
    assert "approvals.before 10" in hooks["spec.analysis.webhooks[0]"]
    assert "canaryd approve podinfo" in hooks["spec.analysis.webhooks[0]"]
    assert "pre-rollout hook 'smoke-test' is not converted" in hooks["spec.analysis.webhooks[1]"]
    assert "rollout hook 'load-test'" in hooks["spec.analysis.webhooks[2]"]  # no type: rollout
    assert "approvals.before 100" in hooks["spec.analysis.webhooks[3]"]
    assert "post-rollout hook 'cleanup' is not converted" in hooks["spec.analysis.webhooks[4]"]
    assert "canaryd abort podinfo" in hooks["spec.analysis.webhooks[5]"]
    assert "notifications.webhooks" in hooks["spec.analysis.webhooks[6]"]
    assert "metadata and retries are not carried over" in hooks["spec.analysis.webhooks[6]"]
    assert "on-call" in warnings["spec.analysis.alerts"]
    for text in warnings.values():  # hook commands and metadata are never echoed
        assert "hey -z" not in text and "prod-eu" not in text and "healthz" not in text


def test_confirm_traffic_increase_needs_an_approval_before_every_step() -> None:
    doc = flagger_canary(
        stepWeight=25,
        webhooks=[{"name": "gate", "type": "confirm-traffic-increase", "url": "http://g/"}],
    )
    manifest, warnings = convert_canary(doc)
    assert manifest["spec"]["steps"] == [25, 50, 75, 100]
    assert manifest["spec"]["approvals"]["before"] == [25, 50, 75, 100]
    assert [w.path for w in warnings if "webhooks" in w.path] == ["spec.analysis.webhooks[0]"]


def test_an_event_hook_canaryd_cannot_call_is_warned_about_without_its_secret() -> None:
    doc = flagger_canary(
        stepWeight=50,
        webhooks=[{"name": "e", "type": "event", "url": "https://bot:s3cret@hooks.example/"}],
    )
    manifest, warnings = convert_canary(doc)
    assert "notifications" not in manifest["spec"]
    (hook,) = [w for w in warnings if w.path == "spec.analysis.webhooks[0]"]
    assert "is not converted" in hook.message and "credentials" in hook.message
    assert "s3cret" not in hook.message


# -- custom metric templates ---------------------------------------------------------------


def test_custom_metric_templates_are_named_and_their_templates_skipped() -> None:
    result = convert_file("custom-metric-templates.yaml")
    (manifest,) = result.manifests
    spec = parse_spec(manifest)
    warnings = {w.path: w.message for w in result.warnings}
    assert "MetricTemplate istio-system/not-found-percentage" in warnings["documents[0]"]
    assert "skipped" in warnings["documents[0]"]
    assert "MetricTemplate orders/queue-depth" in warnings["documents[1]"]
    first = warnings["documents[2].spec.analysis.metrics[1]"]
    assert "custom metric '404s percentage'" in first
    assert "MetricTemplate istio-system/not-found-percentage" in first
    assert "thresholdRange max 5" in first and "metrics.queries" in first
    second = warnings["documents[2].spec.analysis.metrics[2]"]
    assert "MetricTemplate orders/queue-depth" in second  # the Canary's namespace
    assert not any(p.startswith("documents[2].spec.analysis.metrics[2].") for p in warnings)
    assert spec.service == "orders-api"  # spec.service.name, not the Deployment's
    assert spec.stable is not None and spec.stable.deployment == "orders-primary"
    assert spec.traffic_routing is not None and spec.traffic_routing.istio is not None
    assert spec.traffic_routing.istio.virtual_service.name == "orders-api"
    assert spec.analysis.interval == 120.0
    assert spec.analysis.error_rate.max_pct == 5
    slo = warnings["documents[2].spec.analysis.metrics[0].thresholdRange.min"]
    assert "maxPct 5%" in slo and "1.44%" in slo and "analysis.slo" in slo


# -- maxWeight + stepWeight ----------------------------------------------------------------


def test_linear_weights_end_at_the_first_step_at_or_past_max_weight_then_100() -> None:
    _, spec, warnings = only("maxweight-stepweight.yaml")
    assert spec.steps == [20, 40, 60, 100]  # as Flagger: 20, 40, 60, then promotion
    p99, _ = spec.analysis.latency
    assert p99.max_ms == 250
    assert spec.analysis.error_rate.max_pct == 2  # the older metrics[].threshold: 98%
    assert "after 60%" in warnings["spec.analysis.maxWeight"]
    assert "spec.analysis.stepWeightPromotion" in warnings
    assert "spec.skipAnalysis" not in warnings  # false: nothing to say
    assert "spec.analysis.metrics[1].threshold" in warnings  # 2% is above the SLO bound


@pytest.mark.parametrize(
    ("analysis", "steps", "warned"),
    [
        ({"maxWeight": 50, "stepWeight": 20}, [20, 40, 60, 100], {"maxWeight"}),
        ({"maxWeight": 50, "stepWeight": 10}, [10, 20, 30, 40, 50, 100], {"maxWeight"}),
        ({"stepWeight": 30}, [30, 60, 90, 100], set()),
        ({"maxWeight": 100, "stepWeight": 25}, [25, 50, 75, 100], set()),
        ({"stepWeights": [1, 2, 10, 80]}, [1, 2, 10, 80, 100], {"stepWeights"}),
        ({"stepWeights": [10, 50, 100]}, [10, 50, 100], set()),
        ({"stepWeights": [0, 5, 5, 150]}, [5, 100], {"stepWeights"}),
        ({"stepWeights": [10, 50], "maxWeight": 20}, [10, 50, 100], {"stepWeights", "maxWeight"}),
        ({"stepWeight": 10, "stepWeights": [10, 40]}, [10, 20, 30, 40, 100], {"stepWeights"}),
        ({"iterations": 10}, [10, 50, 100], {"iterations"}),
        ({}, [10, 50, 100], {"stepWeight"}),
    ],
)
def test_weights_as_flagger_steps_through_them(
    analysis: dict[str, Any], steps: list[int], warned: set[str]
) -> None:
    manifest, warnings = convert_canary(flagger_canary(**analysis))
    assert manifest["spec"]["steps"] == steps
    parse_spec(manifest)
    paths = {w.path.removeprefix("spec.analysis.") for w in warnings}
    assert paths - {"spec.targetRef", "spec.service", "spec.service.port"} == warned


def test_blue_green_and_ab_testing_are_warned_about_and_get_default_steps() -> None:
    _, spec, warnings = only("istio-ab-testing.yaml")
    assert spec.steps == [10, 50, 100]
    assert "A/B testing" in warnings["spec.analysis.iterations"]
    assert "headers" in warnings["spec.analysis.match"]
    assert not any(p.startswith("spec.analysis.match[") for p in warnings)
    _, warnings_bg = convert_canary(flagger_canary(iterations=5, stepWeight=10))
    texts = {w.path: w.message for w in warnings_bg}
    assert "blue/green" in texts["spec.analysis.iterations"]
    assert "ignored by Flagger" in texts["spec.analysis.stepWeight"]


# -- intervals and other fields ------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "seconds", "warned"),
    [
        ("1m", 60, False),
        ("1m30s", 90, False),
        ("5s", 10, True),  # Flagger's floor
        ("2h", 3600, True),  # canaryd's ceiling
        ("soon", 60, True),  # Flagger falls back to 1m
        ("15m", 900, True),  # stepDuration raised to match
    ],
)
def test_interval(interval: str, seconds: float, warned: bool) -> None:
    manifest, warnings = convert_canary(flagger_canary(interval=interval, stepWeight=50))
    spec = parse_spec(manifest)
    assert spec.analysis.interval == seconds
    assert spec.analysis.step_duration >= spec.analysis.interval
    assert ("spec.analysis.interval" in [w.path for w in warnings]) is warned


def test_go_durations() -> None:
    assert go_duration("1m30s") == 90 and go_duration("500ms") == 0.5 and go_duration("0") == 0
    assert go_duration("1.5h") == 5400
    assert go_duration("90") is None and go_duration("-1m") is None and go_duration("1d") is None


def test_unknown_and_server_fields() -> None:
    doc = flagger_canary(stepWeight=50, sessionAffinity={"cookieName": "c"})
    doc["metadata"].update(uid="1", resourceVersion="7", generation=3)
    doc["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
        "owner": "web-team",
    }
    doc["status"] = {"phase": "Succeeded", "canaryWeight": 0}
    doc["spec"].update(
        skipAnalysis=True, suspend=True, revertOnDeletion=True, metricsServer="http://p:9090",
        provider="linkerd", futureField={"a": 1, "b": [1, 2]},
    )  # fmt: skip
    doc["spec"]["service"]["portDiscovery"] = False  # unset: not warned about
    manifest, warnings = convert_canary(doc)
    assert manifest["metadata"] == {
        "name": "podinfo",
        "namespace": "test",
        "annotations": {"owner": "web-team"},
    }
    paths = {w.path: w.message for w in warnings}
    assert not any(p.startswith(("status", "metadata")) for p in paths)
    for key in ("skipAnalysis", "suspend", "revertOnDeletion", "metricsServer", "provider"):
        assert f"spec.{key}" in paths, key
    assert "canaryd skip podinfo" in paths["spec.skipAnalysis"]
    assert "linkerd" in paths["spec.provider"]
    assert paths["spec.futureField"].startswith("canaryd has no equivalent")
    assert not any(p.startswith("spec.futureField.") for p in paths)
    assert "spec.analysis.sessionAffinity" in paths
    assert "spec.service.portDiscovery" not in paths


def test_a_canary_without_analysis_gets_canaryds_defaults_and_one_warning() -> None:
    doc = flagger_canary()
    del doc["spec"]["analysis"]
    manifest, warnings = convert_canary(doc)
    assert manifest["spec"]["steps"] == [10, 50, 100]
    assert "analysis" not in manifest["spec"]
    assert [w.path for w in warnings if "analysis" in w.path] == ["spec.analysis"]


def test_legacy_canary_analysis() -> None:
    doc = flagger_canary()
    doc["spec"]["canaryAnalysis"] = doc["spec"].pop("analysis") | {"stepWeight": 50}
    manifest, warnings = convert_canary(doc)
    assert manifest["spec"]["steps"] == [50, 100]
    assert manifest["spec"]["analysis"]["interval"] == "1m"
    both = copy.deepcopy(doc)
    both["spec"]["analysis"] = {"stepWeight": 25}
    manifest, warnings = convert_canary(both)
    assert manifest["spec"]["steps"] == [25, 50, 75, 100]
    assert "spec.canaryAnalysis" in [w.path for w in warnings]


def test_subset_routing_options() -> None:
    options = RoutingOptions(
        virtual_service="public", routes=("primary",), destination_rule="podinfo",
        stable_subset="v1", canary_subset="v2",
    )  # fmt: skip
    manifest, warnings = convert_canary(flagger_canary(stepWeight=50), options)
    spec = parse_spec(manifest)
    assert spec.traffic_routing is not None and spec.traffic_routing.istio is not None
    istio = spec.traffic_routing.istio
    assert istio is not None
    assert (istio.virtual_service.name, istio.virtual_service.routes) == ("public", ["primary"])
    assert istio.destination_rule is not None
    assert (istio.destination_rule.stable_subset, istio.destination_rule.canary_subset) == (
        "v1",
        "v2",
    )
    (routing,) = [w.message for w in warnings if w.path == "spec.service"]
    assert "subsets v1 and v2 of DestinationRule podinfo" in routing
    assert "HTTP routes primary" in routing


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["spec"]["analysis"].update(stepWeight="ten"), "spec.analysis.stepWeight:"),
        (lambda d: d["spec"]["analysis"].update(stepWeight=120), "from 0 to 100"),
        (lambda d: d["spec"]["analysis"].update(metrics="all"), "spec.analysis.metrics: expected"),
        (lambda d: d["spec"]["analysis"].update(interval=60), "expected a string"),
        (lambda d: d["spec"].pop("targetRef"), "spec.targetRef: required"),
        (lambda d: d["spec"]["targetRef"].update(kind="DaemonSet"), "Deployments only"),
        (lambda d: d["metadata"].pop("name"), "metadata.name: required"),
        (lambda d: d.update(kind="Deployment"), "not a Flagger Canary"),
    ],
)
def test_input_flagger_would_reject_is_an_error(change: Any, message: str) -> None:
    doc = flagger_canary(stepWeight=50)
    change(doc)
    with pytest.raises(ConvertError, match=re.escape(message)):
        convert_canary(doc)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    children: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        children = [p for k, v in node.items() for p in _paths(v, (*path, k))]
    elif isinstance(node, list):
        children = [p for i, v in enumerate(node) for p in _paths(v, (*path, i))]
    return [path, *children]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_any_odd_value_anywhere_is_a_valid_spec_or_a_one_line_error(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    odd = (None, 7, -3, 1e308, float("nan"), "x", "", True, [1], [{"a": 1}], {"a": 1})
    for where in _paths(documents)[1:]:
        for value in odd:
            changed = copy.deepcopy(documents)
            node: Any = changed
            for part in where[:-1]:
                node = node[part]
            node[where[-1]] = value
            try:
                result = convert_documents(changed)
            except ConvertError as exc:
                assert "\n" not in str(exc), (where, value)
                continue
            for manifest in result.manifests:
                parse_spec(manifest)
            assert all("\n" not in str(w) for w in result.warnings), (where, value)


def test_documents_and_lists() -> None:
    canary = flagger_canary(stepWeight=50)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "podinfo"}}
    listed = {"apiVersion": "v1", "kind": "List", "items": [canary, service]}
    result = convert_documents([listed])
    assert len(result.manifests) == 1
    skipped = [w for w in result.warnings if w.path == "items[1]"]
    assert skipped and "Service podinfo (v1) is not a Flagger Canary" in skipped[0].message
    assert any(w.path == "items[0].spec.targetRef" for w in result.warnings)
    result = convert_documents([None, canary, canary])
    assert len(result.manifests) == 2
    assert any(w.path.startswith("documents[2].spec") for w in result.warnings)
    with pytest.raises(ConvertError, match=r"no Flagger Canary in the input.*Service podinfo"):
        convert_documents([service])
    text = to_yaml(result.manifests)
    assert text.count("---\n") == 1
    assert [parse_spec(d).steps for d in yaml.safe_load_all(text)] == [[50, 100], [50, 100]]


# -- the command line ----------------------------------------------------------------------


def test_cli_prints_yaml_on_stdout_and_warnings_on_stderr(tmp_path: Path) -> None:
    source = FLAGGER / "istio-webhooks.yaml"
    code, out, err = run("convert", str(source))
    assert code == 0
    expected = convert_text(source.read_text())
    assert yaml.safe_load(out) == expected.manifests[0]  # round-trips
    lines = err.splitlines()
    assert lines == [f"warning: {w}" for w in expected.warnings]
    assert all(re.match(r"warning: [\w.\[\]]+: \S", line) for line in lines)
    written = tmp_path / "podinfo.yaml"
    written.write_text(out)
    code, text, _ = run("validate", str(written), "--strict")
    assert code == 0 and "valid; steps 10% → 30% → 60% → 100%" in text


def test_cli_strict_exits_1_when_anything_did_not_carry_over() -> None:
    code, out, err = run("convert", str(FLAGGER / "maxweight-stepweight.yaml"), "--strict")
    assert code == 1
    assert parse_spec(yaml.safe_load(out)).steps == [20, 40, 60, 100]  # printed all the same
    assert "warning: spec.analysis.threshold: " in err


def test_cli_reads_stdin_and_several_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (FLAGGER / "custom-metric-templates.yaml").read_text()
    text += "---\n" + (FLAGGER / "istio-stepweights.yaml").read_text()
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code, out, err = run("convert", "-")
    assert code == 0, err
    names = [d["metadata"]["name"] for d in yaml.safe_load_all(out)]
    assert names == ["orders", "checkout"]
    assert "warning: documents[0]: MetricTemplate istio-system/not-found-percentage" in err
    assert "warning: documents[3].spec.analysis.stepWeights: " in err


def test_cli_routing_flags() -> None:
    code, out, _ = run(
        "convert", str(FLAGGER / "istio-stepweights.yaml"), "--virtual-service", "public",
        "--route", "primary", "--route", "api", "--destination-rule", "checkout",
    )  # fmt: skip
    assert code == 0
    istio = yaml.safe_load(out)["spec"]["trafficRouting"]["istio"]
    assert istio == {
        "virtualService": {"name": "public", "routes": ["primary", "api"]},
        "destinationRule": {"name": "checkout", "stableSubset": "stable", "canarySubset": "canary"},
    }
    code, out, err = run("convert", "x.yaml", "--canary-subset", "v2")
    assert (code, out) == (2, "")
    assert err.startswith("canaryd convert: error: --stable-subset and --canary-subset go with")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("spec: [\n", "YAML syntax error at line 2"),
        ("a: 1\na: 2\n", "found duplicate key"),
        ("", "the input is empty"),
        ("- just\n- a list\n", "no Flagger Canary in the input"),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: podinfo}\n",
            "no Flagger Canary in the input (apiVersion flagger.app/v1beta1, kind Canary); "
            "found Deployment podinfo (apps/v1)",
        ),
        (
            "apiVersion: canaryd.io/v1alpha1\nkind: Canary\nmetadata: {name: a}\n",
            "found Canary a (canaryd.io/v1alpha1)",
        ),
        (
            "apiVersion: flagger.app/v1beta1\nkind: Canary\nmetadata: {name: a}\n"
            "spec: {targetRef: {name: a}, analysis: {stepWeights: five}}\n",
            "spec.analysis.stepWeights: expected a list, got 'five'",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "in.yaml"
    path.write_text(content)
    code, out, err = run("convert", str(path))
    assert (code, out) == (2, "")
    assert_one_line_error(err)
    assert err.startswith(f"canaryd: error: {path}: ")
    assert message in err


def test_cli_unreadable_file() -> None:
    code, _, err = run("convert", "/nonexistent/flagger.yaml")
    assert code == 2
    assert_one_line_error(err)
    assert "cannot read it: No such file or directory" in err


def test_cli_help_has_an_example_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("convert", "--help")[0] == 0
    text = capsys.readouterr().out
    assert "examples:\n  canaryd convert " in text
    assert "exit codes: 0 converted, 1 converted with warnings (--strict)" in text
    assert "docs/migrating.md" in text


def test_convert_is_a_light_command() -> None:
    """It needs neither the Kubernetes client nor the web stack."""
    assert "convert" in cli.LIGHT_COMMANDS
    code = (
        "import io, sys\n"
        "from canaryd.cli import main\n"
        f"rc = main(['convert', {str(FLAGGER / 'istio-stepweights.yaml')!r}], io.StringIO(), "
        "io.StringIO())\n"
        "heavy = sorted(m for m in ('kubernetes', 'fastapi', 'uvicorn') if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "0 []", done.stderr


def test_the_migration_guide_shows_what_convert_prints() -> None:
    """docs/migrating.md's example output is the converter's output for its input."""
    guide = (Path(__file__).resolve().parent.parent / "docs" / "migrating.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", guide, re.DOTALL)
    flagger = next(b for b in blocks if "flagger.app/v1beta1" in b and "kind: Canary" in b)
    result = convert_text(flagger)
    assert to_yaml(result.manifests) in blocks
    warned = re.search(r"```text\n(warning: .*?)```", guide, re.DOTALL)
    assert warned, "the guide shows the warnings"
    shown = [line.split(": ", 2)[1] for line in warned.group(1).splitlines()]
    assert shown == [w.path for w in result.warnings]
