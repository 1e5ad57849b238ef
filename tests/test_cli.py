"""The CLI contract: commands, flags, JSON fields and exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from canaryd.cli import main


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def run_json(*argv: str) -> tuple[int, dict[str, Any]]:
    code, out, err = run(*argv, "--json")
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"--json prints exactly one JSON object (stderr: {err!r})"
    return code, json.loads(lines[0])


def test_healthy_promotes_with_the_documented_json() -> None:
    code, data = run_json("simulate", "--scenario", "healthy", "--seed", "1")
    assert code == 0
    assert set(data) == {
        "scenario", "seed", "outcome", "duration_s", "canary_requests", "canary_errors",
        "steps", "reasons",
    }  # fmt: skip
    assert data["outcome"] == "promoted"
    assert data["seed"] == 1
    assert [s["weight"] for s in data["steps"]] == [10, 50, 100]
    assert all(s["verdict"] == "pass" for s in data["steps"])
    assert set(data["steps"][0]) == {"weight", "started_s", "ended_s", "verdict", "reasons"}
    assert data["canary_requests"] > 0
    assert data["duration_s"] == data["steps"][-1]["ended_s"]


def test_error_spike_rolls_back_during_the_ten_percent_step() -> None:
    code, data = run_json("simulate", "--scenario", "error-spike", "--seed", "1")
    assert code == 1
    assert data["outcome"] == "rolled_back"
    assert len(data["steps"]) == 1
    assert data["steps"][0]["weight"] == 10
    assert data["steps"][0]["verdict"] == "rollback"
    assert data["reasons"][0].startswith("rolled back: errors: canary")


def scenario_file(tmp_path: Path, canary_error: float, rps: float = 100) -> str:
    path = tmp_path / "scenario.yaml"
    path.write_text(
        f"name: custom\n"
        f"traffic: {{rps: {rps}}}\n"
        f"stable: {{error_rate: 0.005, latency_ms: {{p50: 40, p99: 180}}}}\n"
        f"canary: {{error_rate: {canary_error}, latency_ms: {{p50: 40, p99: 180}}}}\n"
    )
    return str(path)


def test_scenario_file_with_5x_errors_rolls_back(tmp_path: Path) -> None:
    code, data = run_json("simulate", "--scenario-file", scenario_file(tmp_path, 0.025))
    assert (code, data["outcome"], data["scenario"]) == (1, "rolled_back", "custom")


def test_scenario_file_identical_to_stable_promotes(tmp_path: Path) -> None:
    code, data = run_json("simulate", "--scenario-file", scenario_file(tmp_path, 0.005))
    assert (code, data["outcome"]) == (0, "promoted")


def test_scenario_file_events_change_the_outcome(tmp_path: Path) -> None:
    path = Path(scenario_file(tmp_path, 0.005))
    path.write_text(
        path.read_text() + "events:\n  - {at_s: 900, version: canary, error_rate: 0.05}\n"
    )
    code, data = run_json("simulate", "--scenario-file", str(path))
    assert (code, data["outcome"]) == (1, "rolled_back")
    assert data["duration_s"] > 900
    assert data["steps"][0]["verdict"] == "pass"


def test_monte_carlo_healthy_rolls_back_at_most_two_percent() -> None:
    code, data = run_json("simulate", "--scenario", "healthy", "--runs", "200", "--seed", "1")
    assert code == 0
    assert data["runs"] == 200
    assert sum(data["outcomes"].values()) == 200
    assert data["outcomes"]["rolled_back"] <= 4
    assert data["outcomes"]["promoted"] >= 190
    assert set(data) == {
        "scenario", "runs", "outcomes", "median_duration_s", "median_canary_errors", "results",
    }  # fmt: skip
    assert len(data["results"]) == 200
    assert "steps" not in data["results"][0]
    assert [r["seed"] for r in data["results"][:3]] == [1, 2, 3]


def test_monte_carlo_detects_a_2x_regression_in_most_runs() -> None:
    _, data = run_json("simulate", "--scenario", "error-regression", "--runs", "50", "--seed", "1")
    assert data["outcomes"]["rolled_back"] >= 45


def test_a_run_of_a_batch_is_reproduced_by_its_seed() -> None:
    _, batch = run_json("simulate", "--scenario", "error-regression", "--runs", "3", "--seed", "5")
    _, single = run_json("simulate", "--scenario", "error-regression", "--seed", "6")
    assert batch["results"][1] == {k: v for k, v in single.items() if k != "steps"}


def test_partial_spec_file_is_used(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "steps: [20, 100]\n"
        "analysis: {interval: 10s, stepDuration: 2m, minStepDuration: 1m, earlyPassRatio: null}\n"
    )
    code, data = run_json("simulate", "--scenario", "healthy", "--spec", str(spec))
    assert code == 0
    assert [s["weight"] for s in data["steps"]] == [20, 100]
    assert data["duration_s"] == 240


def test_approvals_in_the_spec_end_waiting(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("approvals: {before: [50], timeout: 2h}\n")
    code, data = run_json("simulate", "--scenario", "healthy", "--spec", str(spec))
    assert (code, data["outcome"]) == (4, "waiting_approval")


def test_too_short_a_scenario_ends_held(tmp_path: Path) -> None:
    path = Path(scenario_file(tmp_path, 0.005))
    path.write_text(path.read_text() + "duration_s: 300\n")
    code, data = run_json("simulate", "--scenario-file", str(path))
    assert (code, data["outcome"], data["duration_s"]) == (4, "held", 300)


def test_human_output_shows_steps_decisions_and_summary() -> None:
    code, out, _ = run("simulate", "--scenario", "error-spike")
    assert code == 1
    assert "StepStarted" in out
    assert "RolledBack" in out
    assert "ROLLED BACK after" in out
    assert "errors: canary" in out


def test_report_is_written(tmp_path: Path) -> None:
    report = tmp_path / "r.html"
    code, out, _ = run("simulate", "--scenario", "error-spike", "--report", str(report))
    assert code == 1
    html = report.read_text()
    assert html.count("data-chart=") == 3
    assert f"report written to {report}" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "--scenario", "nope"], "unknown scenario 'nope'"),
        (["simulate", "--scenario-file", "/nonexistent.yaml"], "not found"),
        (["simulate", "--spec", "/nonexistent.yaml"], "--spec /nonexistent.yaml: file not found"),
        (["simulate", "--runs", "0"], "--runs must be at least 1"),
        (["simulate", "--report", "/nonexistent-dir/r.html"], "cannot write the report"),
    ],
)
def test_errors_are_one_clear_line_with_exit_2(argv: list[str], message: str) -> None:
    code, _, err = run(*argv)
    assert code == 2
    assert err.startswith("canaryd: error: ")
    assert message in err
    assert "Traceback" not in err


def test_usage_errors_exit_2() -> None:
    code, _, _ = run("simulate", "--scenario", "healthy", "--scenario-file", "x.yaml")
    assert code == 2
    assert run("frobnicate")[0] == 2
    assert run()[0] == 2


def test_scenarios_lists_the_builtins_and_prints_one_as_yaml(tmp_path: Path) -> None:
    code, out, _ = run("scenarios")
    assert code == 0
    for name in (
        "healthy", "error-spike", "error-regression", "latency-regression", "latency-tail",
        "gradual-degradation", "low-traffic", "stable-incident",
    ):  # fmt: skip
        assert name in out
    code, yaml_text, _ = run("scenarios", "error-regression")
    assert code == 0
    path = tmp_path / "copy.yaml"
    path.write_text(yaml_text)
    _, data = run_json("simulate", "--scenario-file", str(path), "--seed", "3")
    _, builtin = run_json("simulate", "--scenario", "error-regression", "--seed", "3")
    assert data == builtin


def test_validate(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("steps: [10, 100]\n")
    code, out, _ = run("validate", str(good))
    assert code == 0
    assert "valid" in out
    assert "warning: spec.stable.deployment" in out
    assert run("validate", str(good), "--strict")[0] == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [10, 50]\nanalysis: {alpha: 2}\n")
    code, out, _ = run("validate", str(bad))
    assert code == 1
    assert "invalid (2 problems)" in out
    assert "error: spec.steps: the last step must be 100" in out
    code, data = run_json("validate", str(bad))
    assert (code, data["valid"], len(data["errors"])) == (1, False, 2)


def test_console_script_runs_as_a_real_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "canaryd", "simulate", "--scenario", "error-spike", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["outcome"] == "rolled_back"
    assert proc.stderr == ""


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run("simulate", "--help")
    out = capsys.readouterr().out
    assert code == 0
    for flag in (
        "--scenario",
        "--scenario-file",
        "--spec",
        "--seed",
        "--runs",
        "--json",
        "--report",
    ):
        assert flag in out
    assert "exit codes" in out
    assert "examples" in out
