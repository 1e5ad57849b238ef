"""Slack approvals through the whole daemon: a signed click on the daemon's own
``/slack/interactions`` moves the rollout on; an approval given while the daemon is
frozen, then killed, is acted on by the restarted one.

The Kubernetes API double over real HTTP, the Slack Web API double, simulated traffic
on compressed real time (as tests/test_daemon.py).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client as k8s

from canaryd import api
from canaryd.kube import Kube
from canaryd.outbox import Notifier
from canaryd.ports import CanaryRef
from canaryd.rollout import Command, CommandKind
from canaryd.slack import SlackInteractions, SlackSettings, SlackSink
from kubedouble.apiserver import KubeApiServer
from simulator import get_scenario
from tests.conftest import NS
from tests.slackdouble import SlackDouble, interaction_body, sign
from tests.test_daemon import Harness, canary_obj, canary_weight, phase, wait_for_canary

REF = CanaryRef(NS, "checkout")
SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
ALICE = "UALICE001"
Obj = dict[str, Any]


def gate_50(server: KubeApiServer) -> None:
    """The 50% step needs a yes from Alice in #deploys."""
    client = server.api_client()
    try:
        k8s.CustomObjectsApi(client).patch_namespaced_custom_object(
            "canaryd.io", "v1alpha1", NS, "canaries", "checkout",
            {"spec": {"approvals": {"before": [50], "slack": {"channel": "#deploys"},
                                    "approvers": [ALICE], "timeout": "10m"}}},
        )  # fmt: skip
    finally:
        client.close()


def _blocks(args: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = args.get("blocks") or []
    return list(json.loads(blocks) if isinstance(blocks, str) else blocks)


def approval_button(slack: SlackDouble) -> tuple[str, str]:
    """(channel, the Approve button's value) of the approval message posted."""
    for call in slack.calls("chat.postMessage", ok_only=True):
        for block in _blocks(call.args):
            for element in block.get("elements") or []:
                if element.get("action_id") == "canaryd_approve":
                    return str(call.args["channel"]), str(element["value"])
    raise AssertionError("no approval message with an Approve button was posted")


def click(
    channel: str, value: str, trigger: str, *, user: str = ALICE
) -> tuple[bytes, dict[str, str]]:
    body = interaction_body(
        "canaryd_approve", value, user, "alice", channel, "1700000000.000200", trigger
    )
    return body, {"Content-Type": "application/x-www-form-urlencoded",
                  **sign(body, SECRET, int(time.time()))}  # fmt: skip


def test_a_signed_click_on_the_daemons_endpoint_approves_and_the_rollout_moves_on(
    cluster: KubeApiServer,
) -> None:
    gate_50(cluster)

    async def scenario() -> tuple[Obj, list[int], SlackDouble]:
        with SlackDouble() as slack:
            settings = SlackSettings(
                token=slack.token, signing_secret=SECRET, api_url=slack.api_url,
                min_interval_s=0.0,
            )  # fmt: skip
            holder: list[Harness] = []
            sink = SlackSink(settings, lambda ref: holder[0].daemon.hub.get(ref))  # noqa: PLW0108
            async with Harness(cluster, get_scenario("healthy"), notifier=Notifier([sink])) as h:
                holder.append(h)
                interactions = SlackInteractions(settings, h.daemon.hub.get, h.kube.add_command)
                app = api.create_app(
                    h.daemon.hub, h.kube.add_command, slack_interactions=interactions.handle
                )
                sock = api.bind("127.0.0.1", 0)
                url = f"http://127.0.0.1:{sock.getsockname()[1]}/slack/interactions"
                stop = asyncio.Event()
                server = asyncio.create_task(
                    api.serve_threaded(app, sock, stop, h.daemon.hub.close), name="api"
                )
                try:
                    await h.command(CommandKind.PROMOTE, revision="v2")
                    await h.until(lambda o: phase(o) == "WaitingApproval")
                    await asyncio.sleep(1.0)  # the sink posts the approval message
                    channel, value = approval_button(slack)
                    assert json.loads(value) == {
                        "ns": NS,
                        "name": "checkout",
                        "revision": "v2",
                        "weight": 50,
                    }
                    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                        body, headers = click(channel, value, "t-1")
                        forged = await http.post(
                            url, content=body, headers={**headers, "X-Slack-Signature": "v0=00"}
                        )
                        assert forged.status_code == 401
                        stale = dict(headers, **sign(body, SECRET, int(time.time()) - 400))
                        assert (
                            await http.post(url, content=body, headers=stale)
                        ).status_code == 401
                        assert phase(canary_obj(cluster)) == "WaitingApproval"  # nothing moved
                        answer = await http.post(url, content=body, headers=headers)
                        assert answer.status_code == 200, answer.text
                        weights: list[int] = []

                        def at_50(obj: Obj) -> bool:
                            weights.append(canary_weight(cluster))
                            return canary_weight(cluster) == 50

                        obj = await h.until(at_50, timeout_s=20)
                        replay = await http.post(url, content=body, headers=headers)
                        assert replay.status_code == 200  # said in the message, not acted on
                    return obj, weights, slack
                finally:
                    stop.set()
                    await server

    obj, weights, slack = asyncio.run(scenario())
    approvals = obj["status"]["approvals"]
    assert len(approvals) == 1, approvals  # the replayed click added nothing
    assert approvals[0]["weight"] == 50 and ALICE in approvals[0]["by"] and approvals[0]["at"]
    assert set(weights) <= {10, 50}
    updates = [json.dumps(c.args) for c in slack.calls("chat.update", ok_only=True)]
    assert any("Approved by" in u and ALICE in u for u in updates), updates


def test_an_approval_given_before_a_killed_daemon_acts_is_acted_on_after_restart(
    cluster: KubeApiServer, kubeconfig: Path, tmp_path: Path
) -> None:
    gate_50(cluster)
    token_file, secret_file = tmp_path / "slack-token", tmp_path / "slack-secret"
    with SlackDouble() as slack:
        token_file.write_text(slack.token + "\n")
        secret_file.write_text(SECRET + "\n")
        argv = [sys.executable, "-m", "canaryd", "run", "--kubeconfig", str(kubeconfig),
                "--simulate", "healthy", "--simulate-speed", "60", "--no-leader-elect",
                "--resync", "1s", "--watch-timeout", "1s", "--listen", "127.0.0.1:0",
                "--slack-token-file", str(token_file), "--slack-signing-secret-file",
                str(secret_file), "--slack-api-url", slack.api_url]  # fmt: skip

        def wait(predicate: Callable[[Obj], bool], timeout_s: float = 40.0) -> Obj:
            return wait_for_canary(cluster, predicate, timeout_s)

        first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = cluster.api_client()
            kube = Kube(client)
            asyncio.run(kube.add_command(REF, Command(id="p1", kind=CommandKind.PROMOTE,
                                                      revision="v2")))  # fmt: skip
            wait(lambda o: phase(o) == "WaitingApproval")
            deadline = time.monotonic() + 10
            while True:  # the daemon's sink posts the approval message
                try:
                    channel, value = approval_button(slack)
                    break
                except AssertionError:
                    assert time.monotonic() < deadline, "no approval message posted"
                    time.sleep(0.1)
            first.send_signal(signal.SIGSTOP)  # frozen: it cannot act on anything now

            async def approve() -> tuple[int, dict[str, Any]]:
                canary = await kube.get_canary(REF)
                handler = SlackInteractions(
                    SlackSettings(token=slack.token, signing_secret=SECRET, api_url=slack.api_url),
                    lambda ref: canary, kube.add_command,
                )  # fmt: skip
                body, headers = click(channel, value, "t-restart")
                return await handler.handle(body, headers)

            status, _ = asyncio.run(approve())
            assert status == 200
            given = canary_obj(cluster)
            assert phase(given) == "WaitingApproval" and canary_weight(cluster) == 10
            assert "approve" in given["metadata"]["annotations"]["canaryd.io/commands"]
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            client.close()
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(10)
        second = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            moved = wait(lambda o: o["status"].get("canaryWeight") == 50)
            wait(lambda o: canary_weight(cluster) == 50, timeout_s=10)  # traffic follows
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0
    approvals = moved["status"]["approvals"]
    assert len(approvals) == 1 and approvals[0]["weight"] == 50
    assert ALICE in approvals[0]["by"] and approvals[0]["at"]


def test_slack_rate_limiting_and_failing_delays_no_step(cluster: KubeApiServer) -> None:
    client = cluster.api_client()
    try:
        k8s.CustomObjectsApi(client).patch_namespaced_custom_object(
            "canaryd.io", "v1alpha1", NS, "canaries", "checkout",
            {"spec": {"notifications": {"slack": {"channel": "#deploys"}}}},
        )  # fmt: skip
    finally:
        client.close()

    async def scenario(slack: SlackDouble) -> tuple[Obj, int]:
        settings = SlackSettings(token=slack.token, api_url=slack.api_url, min_interval_s=0.0)
        holder: list[Harness] = []
        sink = SlackSink(settings, lambda ref: holder[0].daemon.hub.get(ref))  # noqa: PLW0108
        async with Harness(cluster, get_scenario("healthy"), notifier=Notifier([sink])) as h:
            holder.append(h)
            slack.fail("chat.postMessage", 429, times=2)  # Retry-After: 1
            slack.fail("chat.postMessage", 500, times=3)
            slack.fail("chat.update", 500, times=3)
            await h.command(CommandKind.PROMOTE, revision="v2")
            done = await h.until(lambda o: phase(o) == "Succeeded")
            told = len(h.daemon.told)
            deadline = time.monotonic() + 30
            while True:  # the outbox may be empty while its last message is in flight
                sent = slack.calls("chat.postMessage", ok_only=True)
                sent += slack.calls("chat.update", ok_only=True)
                if "romoted" in json.dumps([c.args for c in sent]) and not len(sink.outbox):
                    break
                assert time.monotonic() < deadline, "Slack never caught up"
                await asyncio.sleep(0.1)
            return done, told

    with SlackDouble() as slack:
        done, told = asyncio.run(scenario(slack))
        failed = [c for c in slack.calls() if c.status in (429, 500)]
        posted = slack.calls("chat.postMessage", ok_only=True)
        updates = slack.calls("chat.update", ok_only=True)
    assert len(failed) == 8  # every failure was met, and retried past
    assert posted and updates and told >= 8
    texts = json.dumps([c.args for c in posted + updates])
    assert "Promoted" in texts or "promoted" in texts
    for step in done["status"]["history"]:  # on time: Slack's trouble cost no step
        took_s = (
            datetime.fromisoformat(step["endedAt"]) - datetime.fromisoformat(step["startedAt"])
        ).total_seconds()
        assert took_s <= 6.0 + 3.0, f"the {step['weight']}% step took {took_s:.1f} s"
