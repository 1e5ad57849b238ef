"""End to end on real servers: a real Prometheus, the mesh emulator and ``canaryd run``.

Every process is real and talks over HTTP on 127.0.0.1: the Kubernetes API double
holds the Canary, Deployments and VirtualService; the mesh emulator
(``python -m simulator serve``) generates traffic that follows the VirtualService's
weights and exposes Istio's metrics; Prometheus (Debian's package) scrapes it every
second; ``canaryd run`` reads Prometheus and patches the VirtualService; a pipeline
runs ``canaryd promote --wait``.  Time is compressed: evaluations every 2 s, steps
of at most 20 s, and the emulator plays 10 s of traffic (1,000 requests) per second.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from kubernetes import client as k8s

from kubedouble.apiserver import KubeApiServer
from tests.conftest import NS, VIRTUAL_SERVICE
from tests.services import (
    PrometheusServer,
    backfilled_prometheus,
    istio_openmetrics,
    require_prometheus,
)
from tests.test_gatewayapi import GROUP, HTTP_ROUTE, PLURAL, VERSION

Obj = dict[str, Any]
VIRTUAL_SERVICE_ROUTE = VIRTUAL_SERVICE["spec"]["http"][0]
INTERVAL_S = 2.0
SPEED = 10.0

#: a canary that fails half its requests once it takes traffic: the breach is in the
#: first scrape that has canary traffic at all
OUTAGE = """
name: canary-outage
description: the canary fails half its requests
duration_s: 3600
traffic: {rps: 100}
stable: {error_rate: 0.005, latency_ms: {p50: 40, p99: 180}}
canary: {error_rate: 0.5, latency_ms: {p50: 40, p99: 180}}
"""


def _analysis(**extra: Any) -> Obj:
    return {
        "interval": f"{INTERVAL_S:g}s",
        "stepDuration": "20s",
        "minStepDuration": "4s",
        "minRequests": 100,
        "noData": {"holdFor": "60s", "then": "rollback"},
    } | extra


@dataclass
class Stack:
    kube: KubeApiServer
    kubeconfig: Path
    prometheus: PrometheusServer
    emulator: subprocess.Popen[str]
    daemon: subprocess.Popen[str]
    logs: Path

    def canary(self) -> Obj:
        obj = self.kube.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout")
        assert obj is not None
        return obj

    def status(self) -> Obj:
        return dict(self.canary().get("status") or {})

    def weight(self) -> int:
        vs = self.kube.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
        assert vs is not None
        route = vs["spec"]["http"][0]["route"]
        return int(next(d["weight"] for d in route if d["destination"]["subset"] == "canary"))

    def wait(self, what: str, predicate: Callable[[], bool], timeout_s: float) -> float:
        """Poll until ``predicate``; returns when it became true (monotonic s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return time.monotonic()
            if self.daemon.poll() is not None:
                pytest.fail(f"canaryd run exited ({self.daemon.returncode}):\n{self.log_tail()}")
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}; status: {self.status()}\n{self.log_tail()}")

    def promote(self, *flags: str) -> subprocess.Popen[str]:
        return self.command("promote", *flags)

    def command(self, verb: str, *flags: str) -> subprocess.Popen[str]:
        """``canaryd VERB checkout FLAGS`` as a pipeline or an engineer runs it."""
        argv = [sys.executable, "-m", "canaryd", verb, "checkout",
                "--kubeconfig", str(self.kubeconfig), *flags]  # fmt: skip
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, verb: str, *flags: str) -> str:
        """Run ``canaryd VERB checkout FLAGS`` to completion; its output (exit 0 asserted)."""
        proc = self.command(verb, *flags)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"canaryd {verb}: {out}"
        return out

    def log_events(self) -> list[Obj]:
        """The daemon's JSON log lines so far."""
        text = (self.logs / "daemon.log").read_text(errors="replace")
        events = []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:  # the line being written as we read
                    continue
        return events

    def log_tail(self, lines: int = 40) -> str:
        text = (self.logs / "daemon.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def _start_emulator(
    kubeconfig: Path, scenario: list[str], log: IO[str]
) -> tuple[subprocess.Popen[str], int]:
    argv = [sys.executable, "-m", "simulator", "serve", "--kubeconfig", str(kubeconfig),
            "--namespace", NS, "--port", "0", "--speed", f"{SPEED:g}", "--seed", "7",
            *scenario]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        pytest.fail(f"the mesh emulator did not start (exit {proc.returncode})")
    return proc, int(json.loads(line)["port"])


@pytest.fixture
def stack_factory(
    cluster: KubeApiServer, kubeconfig: Path, tmp_path: Path
) -> Iterator[Callable[..., Stack]]:
    require_prometheus()
    started: list[Any] = []

    def make(scenario: list[str], history: str | None = None, **analysis: Any) -> Stack:
        """The stack on ``scenario``; ``history``: an OpenMetrics file backfilled into
        Prometheus before it starts (which then also scrapes the emulator)."""
        api = cluster.api_client()
        try:
            k8s.CustomObjectsApi(api).patch_namespaced_custom_object(
                "canaryd.io", "v1alpha1", NS, "canaries", "checkout",
                {"spec": {"analysis": _analysis(**analysis)}},
            )  # fmt: skip
        finally:
            api.close()
        emulator_log = (tmp_path / "emulator.log").open("w")
        started.append(emulator_log)
        emulator, port = _start_emulator(kubeconfig, scenario, emulator_log)
        started.append(emulator)
        if history is None:
            prometheus = PrometheusServer([f"127.0.0.1:{port}"], scrape_interval_s=1.0)
        else:
            workdir = tmp_path / "prometheus"
            workdir.mkdir()
            prometheus = backfilled_prometheus(workdir, history)
            prometheus.set_targets([f"127.0.0.1:{port}"])
        prometheus.start()
        started.append(prometheus)
        daemon_log = (tmp_path / "daemon.log").open("w")
        started.append(daemon_log)
        argv = [sys.executable, "-m", "canaryd", "run", "--kubeconfig", str(kubeconfig),
                "--prometheus-url", prometheus.url, "--prometheus-timeout", "1s",
                "--no-leader-elect", "--resync", "1s", "--watch-timeout", "1s",
                "--slo-refresh", "2s", "--listen", "127.0.0.1:0"]  # fmt: skip
        daemon = subprocess.Popen(argv, stdout=daemon_log, stderr=subprocess.STDOUT, text=True)
        started.append(daemon)
        return Stack(cluster, kubeconfig, prometheus, emulator, daemon, tmp_path)

    yield make
    for thing in reversed(started):
        if isinstance(thing, subprocess.Popen):
            if thing.poll() is None:
                thing.terminate()
                try:
                    thing.wait(10)
                except subprocess.TimeoutExpired:
                    thing.kill()
                    thing.wait()
            if thing.stdout is not None:
                thing.stdout.close()
        elif isinstance(thing, PrometheusServer):
            thing.stop()
        else:
            thing.close()


def test_a_healthy_canary_is_promoted(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory(["--scenario", "healthy"], stepDuration="8s")
    pipeline = stack.promote("--revision", "v2", "--wait", "--timeout", "150s", "--poll", "0.5s")
    out, _ = pipeline.communicate(timeout=170)
    status = stack.status()
    assert pipeline.returncode == 0, f"{out}\n{status}\n{stack.log_tail()}"
    assert status["phase"] == "Succeeded"
    assert stack.weight() == 0  # stable runs the new version and takes all traffic
    verdict = status["lastVerdict"]
    assert verdict["decision"] == "pass"
    # judged on Prometheus data: real request counts of both arms at the last step
    errors = next(c for c in verdict["checks"] if c["name"] == "errors")
    assert errors["stats"]["canary_requests"] > 100  # counted from Prometheus's series
    assert not [e for e in stack.log_events() if e.get("level") == "error"], "errors in the log"


def test_a_canary_with_ten_times_the_errors_is_rolled_back_in_its_first_step(
    stack_factory: Callable[..., Stack],
) -> None:
    stack = stack_factory(["--scenario", "error-spike"])
    pipeline = stack.promote("--revision", "v2", "--wait", "--timeout", "60s", "--poll", "0.5s")
    out, _ = pipeline.communicate(timeout=80)
    status = stack.status()
    assert pipeline.returncode == 1, f"{out}\n{status}\n{stack.log_tail()}"
    assert status["phase"] == "RolledBack"
    assert status["stepIndex"] == 0, "rolled back after leaving the 10% step"
    assert stack.weight() == 0
    assert any("errors" in r for r in status["lastVerdict"]["reasons"]), status["lastVerdict"]


def test_a_breach_visible_in_prometheus_sets_weight_zero_within_an_interval_plus_2s(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    scenario = tmp_path / "outage.yaml"
    scenario.write_text(OUTAGE)
    stack = stack_factory(["--scenario-file", str(scenario)])
    stack.promote("--revision", "v2").communicate(timeout=30)
    query = ('sum(istio_requests_total{destination_workload="checkout-canary",'
             'response_code=~"5.."})')  # fmt: skip
    visible = stack.wait(
        "canary errors in Prometheus",
        lambda: bool(stack.prometheus.query(query)),
        timeout_s=30,
    )
    zero = stack.wait(
        "canary weight 0",
        lambda: stack.status().get("phase") == "RolledBack" and stack.weight() == 0,
        timeout_s=30,
    )
    latency_s = zero - visible
    print(f"breach visible in Prometheus -> weight 0: {latency_s:.2f}s (interval {INTERVAL_S:g}s)")
    assert latency_s <= INTERVAL_S + 2.0


def test_prometheus_down_mid_step_holds_and_its_return_resumes(
    stack_factory: Callable[..., Stack],
) -> None:
    # steps long enough that the canary is still at 10% when Prometheus goes away
    stack = stack_factory(["--scenario", "healthy"], stepDuration="60s", earlyPassRatio=None)
    stack.promote("--revision", "v2").communicate(timeout=30)
    stack.wait(
        "a verdict on Prometheus data",
        lambda: (stack.status().get("lastVerdict") or {}).get("decision") == "continue",
        timeout_s=30,
    )
    stack.prometheus.stop()
    stack.wait(
        "hold while Prometheus is down",
        lambda: stack.status().get("phase") == "Holding",
        timeout_s=15,
    )
    status = stack.status()
    assert "unreachable" in status.get("message", ""), status
    assert stack.weight() == 10 and status["stepIndex"] == 0  # neither rolled back nor passed
    stack.prometheus.restart()
    stack.wait(
        "analysis resumed",
        lambda: (
            stack.status().get("phase") == "Progressing"
            and (stack.status().get("lastVerdict") or {}).get("decision") == "continue"
        ),
        timeout_s=20,
    )
    assert stack.weight() == 10
    # the status is written before the event is told (log line, then Kubernetes Event):
    # the line follows within a reconcile
    stack.wait(
        "the Resumed event in the daemon's log",
        lambda: any(e.get("event") == "Resumed" for e in stack.log_events()),
        timeout_s=10,
    )


# -- an A/B test on a Gateway API HTTPRoute ----------------------------------------------


def test_an_ab_test_on_an_httproute_sends_the_cohort_to_the_canary_then_promotes(
    cluster: KubeApiServer, stack_factory: Callable[..., Stack]
) -> None:
    cluster.put_raw(GROUP, VERSION, PLURAL, copy.deepcopy(HTTP_ROUTE))
    obj = cluster.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout")
    assert obj is not None
    del obj["spec"]["steps"]
    obj["spec"] |= {
        "strategy": "abTest",
        "match": [{"headers": {"x-canary": {"exact": "insider"}}}],
        "trafficRouting": {"gatewayAPI": {"httpRoute": "checkout", "rules": ["api"]}},
    }
    cluster.put_raw("canaryd.io", "v1alpha1", "canaries", obj)
    stack = stack_factory(["--scenario", "abtest-healthy"], stepDuration="8s")

    def rules() -> list[Obj]:
        route = cluster.get(GROUP, VERSION, PLURAL, NS, "checkout")
        assert route is not None
        return list(route["spec"]["rules"])

    pipeline = stack.promote("--revision", "v2", "--wait", "--timeout", "120s", "--poll", "0.5s")
    stack.wait("the cohort's rule", lambda: rules()[0]["name"] == "api-canaryd-ab", 30)
    cohort = rules()[0]
    assert [b["weight"] for b in cohort["backendRefs"]] == [0, 100]
    assert cohort["matches"][0]["headers"] == [
        {"type": "Exact", "name": "x-canary", "value": "insider"}
    ]
    assert rules()[1:] == HTTP_ROUTE["spec"]["rules"]  # everyone else: the user's rules
    out, _ = pipeline.communicate(timeout=140)
    status = stack.status()
    assert pipeline.returncode == 0, f"{out}\n{status}\n{stack.log_tail()}"
    assert status["phase"] == "Succeeded" and [s["weight"] for s in status["history"]] == [100]
    errors = next(c for c in status["lastVerdict"]["checks"] if c["name"] == "errors")
    canary_n, stable_n = errors["stats"]["canary_requests"], errors["stats"]["stable_requests"]
    # judged on Prometheus's series: the canary served the cohort, 10% of requests
    assert 0.06 < canary_n / (canary_n + stable_n) < 0.14, errors["stats"]
    stack.wait("the cohort's rule removed", lambda: rules() == HTTP_ROUTE["spec"]["rules"], 20)


# -- blue/green, warmed up on mirrored traffic -------------------------------------------


def test_a_blue_green_warms_up_on_mirrored_traffic_then_switches_and_is_promoted(
    cluster: KubeApiServer, stack_factory: Callable[..., Stack]
) -> None:
    obj = cluster.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout")
    assert obj is not None
    del obj["spec"]["steps"]
    obj["spec"] |= {
        "strategy": "blueGreen",
        "blueGreen": {"mirrorPercent": 50, "scaleDownDelay": "6s"},
    }
    cluster.put_raw("canaryd.io", "v1alpha1", "canaries", obj)
    stack = stack_factory(["--scenario", "healthy"], stepDuration="8s", earlyPassRatio=None)

    def route() -> Obj:
        vs = cluster.get("networking.istio.io", "v1", "virtualservices", NS, "checkout")
        assert vs is not None
        return dict(vs["spec"]["http"][0])

    pipeline = stack.promote("--revision", "v2", "--wait", "--timeout", "90s", "--poll", "0.5s")
    stack.wait("the mirror", lambda: "mirror" in route(), 30)
    assert route()["mirrorPercentage"] == {"value": 50.0}
    assert route()["mirror"] == {"host": "checkout", "subset": "canary"}
    seen: list[tuple[int, bool]] = []  # (canary weight, mirrored) as the routes read
    while pipeline.poll() is None:
        state = (stack.weight(), "mirror" in route())
        if not seen or seen[-1] != state:
            seen.append(state)
        time.sleep(0.1)
    out, _ = pipeline.communicate(timeout=10)
    status = stack.status()
    assert pipeline.returncode == 0, f"{out}\n{status}\n{stack.log_tail()}"
    assert [s["weight"] for s in status["history"]] == [0, 100]
    warm_up = status["history"][0]["reasons"]
    # judged on Prometheus's series of the copies: canary vs stable at 1:2
    assert any(r.startswith("errors: canary") for r in warm_up), warm_up
    assert seen[0] == (0, True) and (100, False) in seen, seen  # copies, then the switch
    assert route() == VIRTUAL_SERVICE_ROUTE  # promoted: as the user wrote it


# -- the error-budget policy on a real Prometheus ----------------------------------------

HISTORY_STEP_S = 60
#: the Canary's objective and policy: 99% over a day (a budget of 1% errors)
SLO = {"availabilityPct": 99, "window": "1d", "budgetPolicy": {}}


def history(rps: float, error_ratio: float, fast_ratio: float = 0.0, fast_s: int = 0) -> str:
    """A day and an hour of the stable ``checkout``'s Istio counters up to now, at ``rps``
    with ``error_ratio`` errors (``fast_ratio`` in the last ``fast_s``), under a pod name
    of its own: the analysis follows each pod's series from its first value, so the
    history counts towards the error budget but not towards any step's figures."""
    now = int(time.time())
    ok = bad = 0.0
    ok_lines, bad_lines = [], []
    labels = (
        'reporter="destination",destination_workload="checkout",'
        f'destination_workload_namespace="{NS}",pod="checkout-history"'
    )
    steps = (86400 + 3600) // HISTORY_STEP_S
    for i in range(steps + 1):
        t = now - steps * HISTORY_STEP_S + i * HISTORY_STEP_S
        if i:
            n = rps * HISTORY_STEP_S
            ratio = fast_ratio if t > now - fast_s else error_ratio
            ok += n * (1 - ratio)
            bad += n * ratio
        ok_lines.append(f'istio_requests_total{{{labels},response_code="200"}} {ok:.1f} {t}')
        bad_lines.append(f'istio_requests_total{{{labels},response_code="503"}} {bad:.1f} {t}')
    return istio_openmetrics(ok_lines + bad_lines, [])


def test_with_30pct_of_the_budget_left_every_step_after_the_first_waits_for_approval(
    stack_factory: Callable[..., Stack],
) -> None:
    # 0.7% errors against a 1% budget: 30% left (the live traffic's 0.5% moves it little)
    stack = stack_factory(
        ["--scenario", "healthy"],
        history=history(1000, 0.007),
        slo=SLO,
        earlyPassRatio=None,
        stepDuration="6s",
    )
    stack.run("promote", "--revision", "v2")
    stack.wait(
        "the 50% step to wait for an approval",
        lambda: (
            stack.status().get("phase") == "WaitingApproval"
            and stack.status().get("pendingStepIndex") == 1
        ),
        timeout_s=60,
    )
    status = stack.status()
    assert stack.weight() == 10, "the first step needs no approval in this tier"
    assert "error-budget policy" in status["budgetHold"], status
    assert "availability SLO 99%" in status["budgetHold"]
    left = float(status["budgetHold"].split("error budget ")[1].split("%")[0])
    assert 25 <= left <= 35, status["budgetHold"]
    reasons = status["lastVerdict"]["reasons"]
    assert any(r.startswith("error-budget policy (approval)") for r in reasons), reasons
    time.sleep(2 * INTERVAL_S)
    assert stack.weight() == 10 and stack.status()["phase"] == "WaitingApproval"

    stack.run("approve", "--reason", "reviewed the budget")
    stack.wait("the 50% step", lambda: stack.weight() == 50, timeout_s=10)
    stack.wait(
        "the 100% step to wait for an approval",
        lambda: stack.status().get("pendingStepIndex") == 2,
        timeout_s=60,
    )
    assert stack.weight() == 50
    stack.run("approve")
    stack.wait("the 100% step", lambda: stack.weight() == 100, timeout_s=10)
    approvals = stack.status()["approvals"]
    assert [a["weight"] for a in approvals] == [50, 100]
    assert approvals[0]["reason"] == "reviewed the budget"


def test_a_fast_burn_freezes_releases_but_a_fix_goes_out(
    stack_factory: Callable[..., Stack],
) -> None:
    # clean for 23 h, then 20% errors for the last hour: 20x the budget's rate in the
    # 1h and 5m windows (the fast pair, 14.4x) and 17% of the day's budget left
    stack = stack_factory(
        ["--scenario", "healthy"],
        history=history(3000, 0.0, fast_ratio=0.2, fast_s=3600),
        slo=SLO,
        earlyPassRatio=None,
    )
    stack.run("promote", "--revision", "v2")
    stack.wait(
        "the rollout to wait at 0% for the fast burn",
        lambda: "fast burn 1h&5m" in (stack.status().get("budgetHold") or ""),
        timeout_s=30,
    )
    time.sleep(2 * INTERVAL_S)
    status = stack.status()
    assert status["phase"] == "WaitingApproval" and status["pendingStepIndex"] == 0, status
    assert stack.weight() == 0, "a frozen release takes no traffic"
    stack.run("approve", "--reason", "please")  # an override does not unfreeze
    time.sleep(2 * INTERVAL_S)
    assert stack.weight() == 0 and stack.status()["phase"] == "WaitingApproval"

    stack.run("promote", "--revision", "v3", "--fix")
    stack.wait("the fix's 10% step", lambda: stack.weight() == 10, timeout_s=15)
    status = stack.status()
    assert status["fix"] is True and status["revision"] == "v3", status
    events = [e for e in stack.log_events() if "fast burn" in str(e)]
    assert events, "the policy's decision was not logged"


@pytest.mark.parametrize(
    ("error_ratio", "left_pct"),
    # 80% left (normal) is not run here: the tier is read from this Prometheus in
    # tests/test_slo.py and the state machine's normal tier is tests/test_budget_policy.py's
    [(0.009, 10), (0.0105, -5)],
    ids=["10pct-left", "minus-5pct-left"],
)
def test_the_first_step_under_each_budget_matches_the_policy_table(
    stack_factory: Callable[..., Stack], error_ratio: float, left_pct: int
) -> None:
    stack = stack_factory(
        ["--scenario", "healthy"],
        history=history(1000, error_ratio),
        slo=SLO,
        earlyPassRatio=None,
        stepDuration="6s",
    )
    stack.run("promote", "--revision", "v2")
    hold = "override with an approval that gives a reason" if left_pct == 10 else "exhausted"
    stack.wait(
        "the rollout to wait at 0%",
        lambda: (
            hold in (stack.status().get("budgetHold") or "")
            and "remaining" in stack.status()["budgetHold"]
        ),  # the figures, not "unknown"
        timeout_s=30,
    )
    budget = stack.status()["budgetHold"]
    assert f"error budget {left_pct}" in budget or f"error budget {left_pct + 1}" in budget, budget
    time.sleep(2 * INTERVAL_S)
    assert stack.weight() == 0 and stack.status()["phase"] == "WaitingApproval"
    if left_pct == 10:  # override: an approval without a reason is not one
        stack.run("approve")
        time.sleep(2 * INTERVAL_S)
        assert stack.weight() == 0
        stack.run("approve", "--reason", "INC-7 fix reviewed by the SRE on call")
    else:  # exhausted: only a fix starts
        stack.run("promote", "--revision", "v3", "--fix")
    stack.wait("the 10% step", lambda: stack.weight() == 10, timeout_s=15)
    status = stack.status()
    if left_pct == 10:
        assert status["approvals"][-1]["reason"] == "INC-7 fix reviewed by the SRE on call"
    else:
        assert status["fix"] is True
