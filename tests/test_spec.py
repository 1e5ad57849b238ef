"""Spec model: defaults that work, durations, and messages a person understands."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.verdict import format_duration
from canaryd.spec import (
    CanarySpec,
    SpecError,
    cluster_warnings,
    load_spec_file,
    load_spec_text,
    parse_duration,
    parse_spec,
)

FULL_RESOURCE = """\
apiVersion: canaryd.io/v1alpha1
kind: Canary
metadata: {name: checkout, namespace: shop}
spec:
  service: checkout
  stable: {deployment: checkout}
  canary: {deployment: checkout-canary}
  trafficRouting:
    istio:
      virtualService: {name: checkout, routes: [http-primary]}
      destinationRule: {name: checkout, stableSubset: stable, canarySubset: canary}
  steps: [10, 50, 100]
  analysis:
    interval: 1m
    stepDuration: 10m
    minStepDuration: 2m
    minRequests: 200
    alpha: 0.01
    errorRate: {relativeTolerance: 0.2, maxPct: 5}
    latency:
      - {percentile: 99, relativeTolerance: 0.2, maxMs: 1000}
      - {percentile: 50, relativeTolerance: 0.2}
    slo: {availabilityPct: 99.9, burnRateLimit: 14.4}
    noData: {holdFor: 5m, then: rollback}
  approvals: {before: [50, 100], slack: {channel: "#deploys"}, timeout: 1h, onTimeout: abort}
  promotion: {mode: copy-to-stable}
"""


def problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return info.value.problems


def test_the_design_example_parses_with_its_values() -> None:
    spec = load_spec_text(FULL_RESOURCE)
    assert spec.traffic_routing is not None and spec.traffic_routing.istio is not None
    assert spec.traffic_routing.istio.virtual_service.routes == ["http-primary"]
    assert spec.analysis.interval == 60.0
    assert spec.analysis.step_duration == 600.0
    assert spec.analysis.no_data.hold_for == 300.0
    assert spec.approvals.before == [50, 100]
    assert spec.approvals.timeout == 3600.0
    assert cluster_warnings(spec) == []


def test_an_empty_spec_has_working_defaults() -> None:
    spec = parse_spec({})
    assert spec.steps == [10, 50, 100]
    assert spec.analysis.alpha == 0.01
    assert spec.analysis.min_requests == 200
    assert spec.promotion.mode == "copy-to-stable"
    assert len(cluster_warnings(spec)) == 4


def test_the_partial_spec_from_the_issue_is_valid() -> None:
    spec = parse_spec({"steps": [10, 50, 100], "analysis": {"interval": "10s"}})
    assert spec.analysis.interval == 10.0
    assert spec.analysis.step_duration == 600.0


def test_spec_round_trips_through_json_with_duration_strings() -> None:
    spec = load_spec_text(FULL_RESOURCE)
    dumped = spec.model_dump(mode="json", by_alias=True)
    assert dumped["analysis"]["stepDuration"] == "10m"
    assert CanarySpec.model_validate(dumped) == spec


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), ("90", 90.0), ("45s", 45.0), ("1m30s", 90.0), ("1.5h", 5400.0), ("500ms", 0.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_duration_formatting() -> None:
    assert [format_duration(s) for s in (600, 90, 3600, 5400, 0.5, 0)] == [
        "10m", "1m30s", "1h", "1h30m", "0.5s", "0s",
    ]  # fmt: skip


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.integers(0, 7 * 86400 * 1000))
def test_every_formatted_duration_parses_back_to_the_same_seconds(ms: int) -> None:
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"steps": [10, 50]}, "spec.steps: the last step must be 100 (got [10, 50])"),
        (
            {"steps": [10, 0, 100]},
            "spec.steps: weights are canary traffic percentages from 1 to 100",
        ),
        ({"steps": [0, 50, 100]}, "spec: a 0% step sends the canary nothing to judge"),
        (
            {"steps": [10, {"weight": 100, "mirror": {"percent": 10}}]},
            "a 100% step has no stable traffic left to mirror",
        ),
        ({"steps": [{"weight": 0, "mirorr": {}}, 100]}, "steps[0].mirorr: unknown field"),
        (
            {"steps": [{"weight": 0, "mirror": {"percent": 101}}, 100]},
            "steps[0].mirror.percent",
        ),
        (
            {
                "steps": [{"weight": 0, "mirror": {"percent": 50}}, 100],
                "strategy": "abTest",
                "match": [{"headers": {"x": {"exact": "y"}}}],
            },
            "remove steps",
        ),
        ({"steps": [10, 150]}, "got [150]"),
        ({"steps": [50, 10, 100]}, "weights must increase from step to step"),
        ({"steps": []}, "needs at least one step"),
        ({"analysis": {"interval": "-1m"}}, "spec.analysis.interval: durations cannot be negative"),
        ({"analysis": {"stepDuration": "ten minutes"}}, "'ten minutes' is not a duration"),
        ({"analysis": {"alpha": 1.5}}, "spec.analysis.alpha: alpha is a probability"),
        ({"analysis": {"alpha": 0}}, "strictly between 0 and 1"),
        (
            {"analysis": {"minStepDuration": "20m"}},
            "minStepDuration (20m) is longer than stepDuration (10m)",
        ),
        (
            {"analysis": {"stepduration": "5m"}},
            "spec.analysis.stepduration: unknown field; did you mean 'stepDuration'?",
        ),
        ({"analysis": {"errorRate": {"maxPct": 150}}}, "spec.analysis.errorRate.maxPct"),
        ({"approvals": {"before": [30]}}, "approvals.before names weights [30] that are not steps"),
        ({"promotion": {"mode": "yolo"}}, "spec.promotion.mode"),
    ],
)
def test_nonsense_is_rejected_with_a_message_a_person_understands(
    data: dict[str, object], expected: str
) -> None:
    assert any(expected in p for p in problems(data)), problems(data)


def test_every_problem_is_listed_not_just_the_first() -> None:
    found = problems({"steps": [10, 50], "analysis": {"alpha": 2, "interval": "x"}})
    assert len(found) == 3


def test_resource_with_wrong_kind_is_rejected() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"apiVersion": "v1", "kind": "Deployment", "spec": {}})
    assert info.value.problems[:2] == [
        "apiVersion: expected 'canaryd.io/v1alpha1', got 'v1'",
        "kind: expected 'Canary', got 'Deployment'",
    ]


def test_yaml_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [10, 50, 100\nanalysis: {}\n")
    with pytest.raises(SpecError) as info:
        load_spec_file(bad)
    assert "YAML syntax error at line" in info.value.problems[0]
    assert str(bad) in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_spec_file(tmp_path / "nope.yaml")


def test_a_list_is_not_a_spec() -> None:
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec_text("- 10\n- 100\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("steps: [10, 100]\nsteps: [100]\n", "found duplicate key 'steps'"),
        ("analysis: {alpha: 0.01, alpha: 0.5}\n", "found duplicate key 'alpha'"),
        ("steps: [" * 2000 + "]" * 2000 + "\n", "nests mappings or lists too deeply"),
        ("analysis: {minRequests: " + "9" * 5000 + "}\n", "number too long to read"),
    ],
)
def test_yaml_that_a_plain_loader_accepts_silently_or_crashes_on_is_one_line(
    text: str, expected: str
) -> None:
    with pytest.raises(SpecError) as info:
        load_spec_text(text)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"analysis": {"alpha": float("nan")}}, "spec.analysis.alpha"),
        ({"analysis": {"errorRate": {"maxPct": float("inf")}}}, "spec.analysis.errorRate.maxPct"),
        ({"analysis": {"slo": {"burnRateLimit": float("inf")}}}, "burnRateLimit"),
        ({"steps": [True, 100]}, "spec.steps"),
        ({"analysis": {"minRequests": 1e32}}, "spec.analysis.minRequests"),
        ({"analysis": {"minRequests": True}}, "spec.analysis.minRequests"),
        ({"analysis": {"interval": "1ms"}}, "spec.analysis.interval"),
        ({"analysis": {"interval": "1000000000h"}}, "spec.analysis.interval"),
        ({"analysis": {"stepDuration": "30d"}}, "spec.analysis.stepDuration"),
        ({"analysis": {"noData": {"holdFor": "9999h"}}}, "spec.analysis.noData.holdFor"),
        ({"service": "x" * 300}, "spec.service"),
    ],
)
def test_values_a_controller_cannot_act_on_are_rejected(
    data: dict[str, object], expected: str
) -> None:
    found = problems(data)
    assert any(expected in p for p in found), found


def test_the_bounds_leave_ordinary_values_alone() -> None:
    spec = parse_spec(
        {"analysis": {"interval": "1s", "stepDuration": "24h", "minRequests": 1_000_000}}
    )
    assert spec.analysis.interval == 1.0 and spec.analysis.min_requests == 1_000_000
