"""Credentials in URLs never reach logs, a Canary's status or its Events (issue #12)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canaryd.daemon import Daemon, DaemonSettings
from canaryd.istio import IstioRouter
from canaryd.kube import Kube
from canaryd.logs import configure
from canaryd.prometheus import PrometheusMetrics, PrometheusSettings
from canaryd.redact import redact
from canaryd.rollout import Command, CommandKind
from canaryd.workloads import Deployments
from kubedouble.apiserver import KubeApiServer
from tests.conftest import NS
from tests.test_daemon import REF, canary_obj

SECRET = "s3cr3t-pa55"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://admin:s3cr3t-pa55@prom:9090/x", "http://***@prom:9090/x"),
        (
            "at https://tok@prom.example/api/prom failed",
            "at https://***@prom.example/api/prom failed",
        ),
        ("GET /q?query=up&access_token=s3cr3t-pa55&x=1", "GET /q?query=up&access_token=***&x=1"),
        ("'http://a:s3cr3t-pa55@h' and http://b:s3cr3t-pa55@k", "'http://***@h' and http://***@k"),
        ("no url here: a@b.c, x=1", "no url here: a@b.c, x=1"),
        ("http://prom:9090/api/v1/query?query=up", "http://prom:9090/api/v1/query?query=up"),
    ],
)
def test_redact_hides_credentials_and_keeps_the_rest(text: str, shown: str) -> None:
    assert redact(text) == shown


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_prometheus_credentials_reach_neither_logs_nor_status_nor_events(
    cluster: KubeApiServer,
) -> None:
    url = f"http://admin:{SECRET}@127.0.0.1:{_closed_port()}"
    stream = io.StringIO()
    configure("debug", json_output=True)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)

    async def scenario() -> dict[str, Any]:
        api = cluster.api_client()
        kube = Kube(api, timeout_s=5.0)
        router = IstioRouter(kube)
        metrics = PrometheusMetrics(PrometheusSettings(url=url, timeout_s=0.5, retries=1))
        settings = DaemonSettings(resync_s=1.0, watch_timeout_s=1.0, drain_s=5.0)
        daemon = Daemon(kube, metrics, router, Deployments(kube), settings)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop), name="daemon")
        try:
            await kube.add_command(REF, Command(id="p1", kind=CommandKind.PROMOTE, by="test"))
            for _ in range(200):
                obj = canary_obj(cluster)
                if "Prometheus" in json.dumps(obj.get("status") or {}):
                    return obj
                await asyncio.sleep(0.1)
            raise AssertionError(f"no metrics error in status: {obj.get('status')}")
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            metrics.close()
            api.close()

    try:
        obj = asyncio.run(scenario())
    finally:
        configure("info", json_output=True)
    status_text = json.dumps(obj["status"])
    assert "127.0.0.1" in status_text  # the error is there, with the host
    assert SECRET not in status_text and "admin" not in status_text
    events = cluster.list_objects("", "v1", "events", NS)
    assert events, "the daemon records Events"
    assert all(SECRET not in json.dumps(e) for e in events)
    logs = stream.getvalue()
    assert "prometheus" in logs.lower()
    assert SECRET not in logs


def test_redact_tree_reaches_every_string_and_keeps_every_other_leaf() -> None:
    from types import MappingProxyType

    from canaryd.redact import redact_tree

    url = "http://u:p@prom:9090/?token=abc"
    tree: dict[str, Any] = {
        "n": [1, 2.5, None, True, [3, {"deep": url}]],
        "t": (url, 4),
        "m": MappingProxyType({"k": url}),
    }
    out = redact_tree(tree)
    assert out["n"][:4] == [1, 2.5, None, True] and out["n"][4][0] == 3
    masked = "http://***@prom:9090/?token=***"
    assert out["n"][4][1]["deep"] == masked
    assert out["t"] == [masked, 4] and out["m"] == {"k": masked}
    assert tree["n"][4][1]["deep"] == url  # a new tree: the input is left as it was


_PIECES = [*"ab:/@?&;=#'\"\\ \n\t\x01é", "http://", "token=", "sig="]
_URLISH = st.lists(st.sampled_from(_PIECES), max_size=20).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(_URLISH, max_size=4))
def test_the_json_pre_check_never_skips_a_tree_redaction_would_change(texts: list[str]) -> None:
    """``write_status`` skips the tree walk when its JSON text has no match: that must
    never skip a string :func:`redact` would change, whatever JSON escapes."""
    from canaryd.redact import may_need_redaction

    if any(redact(t) != t for t in texts):
        assert may_need_redaction(json.dumps({"reasons": texts}, ensure_ascii=False))
        assert may_need_redaction(json.dumps({"reasons": texts}))
