"""The status API in-process (httpx over ASGI): every endpoint, status code and error
body, auth and audit, security headers; the event stream over a real uvicorn server."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from analysis.counts import ArmCounts, Observation
from canaryd.api import (
    ApiSettings,
    Identity,
    Role,
    TokenFileError,
    TokenStore,
    bind,
    create_app,
    serve,
)
from canaryd.hub import StatusHub
from canaryd.kube import Kube, parse_commands, to_canary
from canaryd.ports import CanaryRef
from canaryd.rollout import Command
from canaryd.status import CanaryStatus, CheckRecord, Phase, VerdictRecord
from kubedouble.apiserver import KubeApiServer
from tests.conftest import NS, canary

OPERATOR = "op-token-0123456789abcdef"
VIEWER = "viewer-token-0123456789ab"
T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
Obj = dict[str, Any]
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def raw(name: str, status: CanaryStatus, *, version: int = 1, ns: str = NS) -> Obj:
    obj = copy.deepcopy(canary(name))
    obj["metadata"] |= {
        "namespace": ns,
        "resourceVersion": str(version),
        "creationTimestamp": "2026-12-04T11:00:00Z",
        "uid": f"uid-{name}",
    }
    obj["status"] = status.to_json()
    return obj


def waiting() -> CanaryStatus:
    verdict = VerdictRecord(
        decision="pass",
        at=T0,
        reasons=["step passed: 600s with no evidence of regression"],
        checks=[
            CheckRecord(
                name="errors", status="ok", e_value=1.3, threshold=250.0, reason="errors fine",
                stats={"canary_rate": 0.005, "stable_rate": 0.005},
            )
        ],
    )  # fmt: skip
    return CanaryStatus(
        phase=Phase.WAITING_APPROVAL,
        revision="v2",
        step_index=0,
        canary_weight=10,
        pending_step_index=1,
        phase_since=T0,
        last_verdict=verdict,
        message="waiting for approval to move to 50%",
    )


class Recorder:
    """The submit port: commands the API wrote."""

    def __init__(self) -> None:
        self.commands: list[tuple[CanaryRef, Command]] = []

    async def __call__(self, ref: CanaryRef, command: Command) -> None:
        self.commands.append((ref, command))


def make_hub() -> StatusHub:
    hub = StatusHub()
    hub.update(to_canary(raw("cart", waiting())))
    hub.update(to_canary(raw("checkout", CanaryStatus())))
    hub.update(to_canary(raw("search", CanaryStatus(), ns="web")))
    return hub


TOKENS = TokenStore.of(
    (OPERATOR, Identity("alice", Role.OPERATOR)), (VIEWER, Identity("bob", Role.VIEWER))
)


@pytest.fixture
async def client() -> AsyncIterator[tuple[httpx.AsyncClient, StatusHub, Recorder]]:
    hub, submit = make_hub(), Recorder()
    app = create_app(hub, submit, ApiSettings(tokens=TOKENS))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        yield http, hub, submit


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and body["reason"]
    assert words in body["message"], body


# -- reads ------------------------------------------------------------------------------


async def test_list_sorted_and_filtered_by_namespace_and_phase(client: Any) -> None:
    http, hub, _ = client
    rows = (await http.get("/api/v1/canaries")).json()
    assert [(r["namespace"], r["name"]) for r in rows] == [
        (NS, "cart"), (NS, "checkout"), ("web", "search"),
    ]  # fmt: skip
    cart = rows[0]
    assert cart["phase"] == "WaitingApproval" and cart["canaryWeight"] == 10
    assert cart["waitingApprovalFor"] == 50 and cart["lastDecision"] == "pass"
    assert cart["steps"] == [10, 50, 100] and cart["revision"] == "v2"
    only_web = (await http.get("/api/v1/canaries", params={"namespace": "web"})).json()
    assert [r["name"] for r in only_web] == ["search"]
    waiting_rows = (await http.get("/api/v1/canaries", params={"phase": "WaitingApproval"})).json()
    assert [r["name"] for r in waiting_rows] == ["cart"]
    assert_error(await http.get("/api/v1/canaries", params={"phase": "Bogus"}), 422, "phase")
    # a cached answer never outlives a change
    hub.update(to_canary(raw("checkout", CanaryStatus(phase=Phase.HOLDING), version=9)))
    rows = (await http.get("/api/v1/canaries")).json()
    assert [r["phase"] for r in rows] == ["WaitingApproval", "Holding", "Idle"]


async def test_detail_has_spec_summary_verdict_with_numbers_and_events(client: Any) -> None:
    http, _, _ = client
    body = (await http.get(f"/api/v1/canaries/{NS}/cart")).json()
    assert body["summary"]["name"] == "cart"
    assert body["spec"]["steps"] == [10, 50, 100] and body["spec"]["intervalS"] == 1.0
    assert body["spec"]["virtualService"] == "checkout"
    assert body["spec"]["strategy"] == "canary" and body["spec"]["stepMirrorsPct"] == [0, 0, 0]
    assert body["spec"]["stepTraffic"][0] == "10% of traffic on the canary"
    check = body["lastVerdict"]["checks"][0]
    assert check["eValue"] == 1.3 and check["threshold"] == 250.0
    assert check["stats"]["canary_rate"] == 0.005
    assert body["status"]["phase"] == "WaitingApproval"  # as stored on the Canary
    assert [e["type"] for e in body["events"]] == ["added"]
    assert_error(await http.get(f"/api/v1/canaries/{NS}/nope"), 404, f"{NS}/nope")
    assert_error(await http.get("/api/v1/nothing"), 404, "no such endpoint")


async def test_series_are_per_interval_increases_and_skip_counter_resets(client: Any) -> None:
    http, hub, _ = client
    ref = CanaryRef(NS, "cart")

    def obs(canary_req: int, canary_err: int, stable_req: int) -> Observation:
        return Observation(
            stable=ArmCounts(stable_req, stable_req // 200),
            canary=ArmCounts(canary_req, canary_err),
        )

    for i, o in enumerate(
        [obs(100, 1, 1000), obs(300, 5, 3000), obs(50, 0, 100), obs(250, 2, 2100)]
    ):
        hub.round(
            ref, T0 + timedelta(minutes=i), revision="v2", weight=10, step_index=0,
            observation=o, verdict=None,
        )  # fmt: skip
    points = (await http.get(f"/api/v1/canaries/{NS}/cart/series")).json()["points"]
    # the third observation went down (a restarted exporter): no point for it
    assert [(p["canary"]["requests"], p["canary"]["errors"]) for p in points] == [
        (200, 4),
        (200, 2),
    ]
    assert points[0]["canary"]["errorRatePct"] == 2.0
    assert points[0]["stable"]["requests"] == 2000 and points[0]["canaryWeight"] == 10
    assert_error(await http.get(f"/api/v1/canaries/{NS}/nope/series"), 404, "not found")


# -- commands and auth ----------------------------------------------------------------------


async def test_commands_need_an_operator_token(client: Any) -> None:
    http, _, submit = client
    url = f"/api/v1/canaries/{NS}/cart/approve"
    assert_error(await http.post(url), 401, "operator bearer token")
    assert_error(await http.post(url, headers=bearer("wrong-token-0123456789")), 401, "unknown")
    assert_error(await http.post(url, headers={"Authorization": "Basic abc"}), 401, "Bearer")
    assert_error(await http.post(url, headers=bearer(VIEWER)), 403, "viewer")
    assert submit.commands == []
    ok = await http.post(url, headers=bearer(OPERATOR))
    assert ok.status_code == 202, ok.text
    body = ok.json()
    assert body["kind"] == "approve" and body["by"] == "alice" and body["name"] == "cart"
    [(ref, command)] = submit.commands
    assert ref == CanaryRef(NS, "cart") and command.id == body["id"] and command.by == "alice"


async def test_command_errors_say_why(client: Any) -> None:
    http, _, submit = client
    h = bearer(OPERATOR)
    base = f"/api/v1/canaries/{NS}"
    assert_error(await http.post(f"{base}/nope/abort", headers=h), 404, "not found")
    assert_error(await http.post(f"{base}/checkout/abort", headers=h), 409, "nothing to abort")
    assert_error(await http.post(f"{base}/checkout/skip", headers=h), 409, "no step to skip")
    assert_error(await http.post(f"{base}/checkout/approve", headers=h), 409, "waiting")
    assert_error(
        await http.post(f"{base}/cart/approve", headers=h, json={"step": 30}), 422, "not one of"
    )
    assert_error(
        await http.post(f"{base}/checkout/promote", headers=h, json={"revision": "a b"}),
        422, "revision",
    )  # fmt: skip
    assert_error(
        await http.post(f"{base}/checkout/promote", headers=h, json={"bogus": 1}), 422, "bogus"
    )
    assert_error(
        await http.post(f"{base}/checkout/promote", headers=h, content=b"x" * 70_000),
        413, "limited",
    )  # fmt: skip
    assert submit.commands == []
    done = await http.post(f"{base}/checkout/promote", headers=h, json={"revision": "v7"})
    assert done.status_code == 202
    assert submit.commands[0][1].revision == "v7"


async def test_every_command_is_audited_and_no_token_is_ever_logged(client: Any) -> None:
    http, _, _ = client
    with capture_logs() as logs:
        await http.post(f"/api/v1/canaries/{NS}/cart/approve", headers=bearer(OPERATOR))
        await http.post(f"/api/v1/canaries/{NS}/checkout/abort", headers=bearer(OPERATOR))
        await http.post(f"/api/v1/canaries/{NS}/cart/skip", headers=bearer(VIEWER))
    audit = [e for e in logs if e["event"].startswith("command")]
    assert [(e["event"], e["command"], e["result"], e["who"]) for e in audit] == [
        ("command accepted", "approve", 202, "alice"),
        ("command refused", "abort", 409, "alice"),
    ]
    assert audit[0]["canary"] == f"{NS}/cart" and audit[0]["id"]
    text = json.dumps(logs, default=str)
    assert OPERATOR not in text and VIEWER not in text


async def test_reads_can_require_a_token() -> None:
    app = create_app(make_hub(), Recorder(), ApiSettings(tokens=TOKENS, reads_need_token=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as h:
        assert_error(await h.get("/api/v1/canaries"), 401, "reads need")
        assert_error(await h.get("/metrics"), 401, "reads need")
        assert (await h.get("/api/v1/canaries", headers=bearer(VIEWER))).status_code == 200
        assert (await h.get("/healthz")).status_code == 200  # probes stay open


async def test_security_headers_on_every_answer(client: Any) -> None:
    http, _, _ = client
    for response in (
        await http.get("/api/v1/canaries"),
        await http.get("/api/v1/nothing"),
        await http.post(f"/api/v1/canaries/{NS}/cart/abort"),
        await http.get("/healthz"),
        await http.get("/openapi.json"),
    ):
        csp = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "access-control-allow-origin" not in response.headers  # CORS off by default
    assert (await http.get("/docs")).status_code == 404  # no Swagger UI from a CDN


async def test_cors_only_for_configured_origins() -> None:
    app = create_app(make_hub(), Recorder(), ApiSettings(cors_origins=("https://ops.example",)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as h:
        ok = await h.get("/api/v1/canaries", headers={"Origin": "https://ops.example"})
        assert ok.headers["access-control-allow-origin"] == "https://ops.example"
        other = await h.get("/api/v1/canaries", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_token_file_format_and_errors(tmp_path: Any) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# team tokens\n{OPERATOR},alice,operator\n\n{VIEWER},bob,viewer\n")
    store = TokenStore.load(path)
    assert store.lookup(OPERATOR) == Identity("alice", Role.OPERATOR)
    assert store.lookup(VIEWER) == Identity("bob", Role.VIEWER)
    assert store.lookup("nope") is None
    assert OPERATOR not in repr(store)  # kept hashed
    for text, words in (
        ("abc,alice,operator", "16+"),
        (f"{OPERATOR},alice,admin", "not viewer or operator"),
        (f"{OPERATOR},alice", "TOKEN,NAME,ROLE"),
    ):
        path.write_text(text)
        with pytest.raises(TokenFileError, match=words):
            TokenStore.load(path)
    with pytest.raises(TokenFileError, match="cannot read"):
        TokenStore.load(tmp_path / "missing")


async def test_a_command_lands_on_the_canary_in_kubernetes(cluster: KubeApiServer) -> None:
    api_client = cluster.api_client()
    try:
        kube = Kube(api_client, timeout_s=5.0)
        hub = StatusHub()
        hub.update(await kube.get_canary(CanaryRef(NS, "checkout")))
        app = create_app(hub, kube.add_command, ApiSettings(tokens=TOKENS))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as http:
            response = await http.post(
                f"/api/v1/canaries/{NS}/checkout/promote",
                headers=bearer(OPERATOR),
                json={"revision": "v2", "reason": "release 2"},
            )
        assert response.status_code == 202, response.text
        obj = cluster.get("canaryd.io", "v1alpha1", "canaries", NS, "checkout")
        assert obj is not None
        [command] = parse_commands(obj["metadata"]["annotations"]["canaryd.io/commands"])
        assert command.id == response.json()["id"]
        assert (command.kind, command.revision, command.by, command.reason) == (
            "promote", "v2", "alice", "release 2",
        )  # fmt: skip
    finally:
        api_client.close()


# -- the event stream, over a real server --------------------------------------------------------


async def _read_events(url: str, headers: dict[str, str], n: int) -> list[tuple[str, str, Obj]]:
    events: list[tuple[str, str, Obj]] = []
    async with httpx.AsyncClient(timeout=10) as http, http.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        async for line in r.aiter_lines():
            if line.startswith(":"):
                continue
            if not line:
                if "data" in fields:
                    events.append(
                        (fields.get("id", ""), fields.get("event", ""), json.loads(fields["data"]))
                    )
                    if len(events) == n:
                        return events
                fields = {}
                continue
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")
    return events


async def test_event_stream_filters_and_resumes_from_last_event_id() -> None:
    hub = make_hub()
    app = create_app(hub, Recorder())
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, sock, stop, hub.close))
    base = f"http://127.0.0.1:{port}/api/v1/events"
    try:
        await asyncio.sleep(0.2)
        reader = asyncio.create_task(_read_events(f"{base}?canary={NS}/cart", {}, 2))
        await asyncio.sleep(0.3)
        moved = waiting().model_copy(update={"phase": Phase.PROGRESSING, "canary_weight": 50})
        hub.update(to_canary(raw("checkout", CanaryStatus(canary_weight=10), version=2)))
        hub.update(to_canary(raw("cart", moved, version=3)))
        got = await asyncio.wait_for(reader, 10)
        assert [(kind, e["name"]) for _, kind, e in got] == [("phase", "cart"), ("weight", "cart")]
        assert got[1][2]["canary"]["canaryWeight"] == 50
        assert "WaitingApproval → Progressing" in got[0][2]["message"]
        # resume after the phase event: the weight event is replayed from the ring
        replay = await asyncio.wait_for(
            _read_events(f"{base}?canary={NS}/cart", {"Last-Event-ID": got[0][0]}, 1), 10
        )
        assert replay[0][0] == got[1][0]
        # an id from another process (or too old): told to reload
        reset = await asyncio.wait_for(_read_events(base, {"Last-Event-ID": "zzz-1"}, 1), 10)
        assert reset[0][1] == "reset"
        async with httpx.AsyncClient() as http:
            bad = await http.get(f"{base}?canary=nons")
        assert bad.status_code == 422 and "NAMESPACE/NAME" in bad.json()["message"]
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


async def test_a_slow_subscriber_is_cut_off_and_never_blocks_publishing() -> None:
    hub = StatusHub(subscriber_queue=4)
    slow = hub.subscribe()
    for version in range(1, 30):
        hub.update(
            to_canary(
                raw("checkout", CanaryStatus(canary_weight=version % 2 * 10), version=version)
            )
        )
    assert hub.subscribers == 0 and hub.dropped > 0
    items = []
    while not slow.queue.empty():
        items.append(slow.queue.get_nowait())
    assert items == [None]  # told to end; it resumes from the ring with Last-Event-ID
    assert hub.events_after(hub.boot + "-3") is not None


async def test_the_standby_answers_reads_from_its_own_cache(cluster: KubeApiServer) -> None:
    from canaryd.daemon import Daemon, DaemonSettings
    from canaryd.istio import IstioRouter
    from canaryd.leader import LeaseSettings
    from canaryd.simsource import SimulatedMetrics
    from canaryd.workloads import Deployments
    from simulator import get_scenario

    clients, daemons = [], []
    for identity in ("a", "b"):
        api_client = cluster.api_client()
        clients.append(api_client)
        kube = Kube(api_client, timeout_s=5.0)
        router = IstioRouter(kube)
        lease = LeaseSettings("default", "canaryd-leader", identity, 3.0, 1.0, 0.2)
        settings = DaemonSettings(resync_s=0.5, watch_timeout_s=1.0, lease=lease, drain_s=2.0)
        metrics = SimulatedMetrics(get_scenario("healthy"), router, speed=60)
        daemons.append(Daemon(kube, metrics, router, Deployments(kube), settings))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run(stop)) for d in daemons]
    try:
        for _ in range(100):
            if {d.role for d in daemons} == {"leader", "standby"} and all(
                len(d.hub) for d in daemons
            ):
                break
            await asyncio.sleep(0.1)
        standby = next(d for d in daemons if d.role == "standby")
        app = create_app(standby.hub, standby.kube.add_command, readiness=standby.readiness)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://s"
        ) as h:
            ready = await h.get("/readyz")
            assert ready.status_code == 200 and ready.json()["role"] == "standby"
            detail = await h.get(f"/api/v1/canaries/{NS}/checkout")
            assert detail.status_code == 200 and detail.json()["summary"]["name"] == "checkout"
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        for api_client in clients:
            api_client.close()


async def test_a_client_leaving_an_event_stream_is_not_a_server_error() -> None:
    """An event stream whose client has gone fails inside the SSE machinery with a group
    of anyio BrokenResourceError (seen in bench/api_load.py each time its 50 subscribers
    were killed): the guard ends the request quietly instead of letting uvicorn log
    "Exception in ASGI application" with a traceback.  Any other error still raises, and
    an error before the response started is still a server error."""
    import anyio
    from starlette.types import Message

    from canaryd.api import Guard

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    def app_failing_with(exc: BaseException, *, started: bool) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            if started:
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send(
                    {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True}
                )
            raise exc

        return app

    scope = {"type": "http", "path": "/api/v1/events", "headers": []}
    gone = ExceptionGroup("unhandled errors in a TaskGroup", [anyio.BrokenResourceError()])
    await Guard(app_failing_with(gone, started=True))(scope, receive, send)  # quiet
    assert sent[0]["status"] == 200
    nested = ExceptionGroup("outer", [gone, ConnectionResetError()])
    await Guard(app_failing_with(nested, started=True))(scope, receive, send)
    with pytest.raises(ExceptionGroup):  # a real bug inside the group is not hidden
        mixed = ExceptionGroup("outer", [anyio.BrokenResourceError(), KeyError("x")])
        await Guard(app_failing_with(mixed, started=True))(scope, receive, send)
    with pytest.raises(ExceptionGroup):  # nothing was answered yet: a server error
        await Guard(app_failing_with(gone, started=False))(scope, receive, send)
