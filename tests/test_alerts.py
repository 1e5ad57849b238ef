"""The PrometheusRule in manifests/monitoring: valid to ``promtool check rules``, and each
alert fires in one ``promtool test rules`` case and stays quiet in another
(``tests/alert_rules_test.yaml``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULE = ROOT / "manifests" / "monitoring" / "prometheusrule.yaml"
CASES = Path(__file__).resolve().parent / "alert_rules_test.yaml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: run `make test` (apt-get install -y prometheus)")
    return found


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    doc = yaml.safe_load(RULE.read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}, sort_keys=False))
    shutil.copy(CASES, tmp_path / "test.yaml")
    return path


def test_the_rules_pass_promtool_check(rules: Path) -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(rules)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_fires_and_stays_quiet_as_its_cases_say(rules: Path) -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", "test.yaml"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=rules.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULE.read_text())["spec"]["groups"]
        for rule in group["rules"]
    }
    tested = {
        case["alertname"]
        for test in yaml.safe_load(CASES.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert alerts == tested
