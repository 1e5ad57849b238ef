"""A local stand-in for Slack's Web API and incoming webhooks, for slack_sdk to talk to.

:class:`SlackDouble` serves, over real HTTP on 127.0.0.1 in a background thread::

    POST /api/chat.postMessage        ok, channel (an ID), ts ("1700000000.000100", …)
    POST /api/chat.update             ok, channel, ts (message_not_found once deleted)
    GET  /api/usergroups.users.list   ok, users of ``groups[usergroup]``
    POST /api/auth.test               ok, user_id, team_id
    POST /hooks/T/B/X                 "ok" (an incoming webhook)
    POST /actions/…                   "ok" (an interaction's response_url)

Every request is recorded (:class:`Call`) in a thread-safe list; the bearer token is
checked (``invalid_auth`` otherwise); :meth:`SlackDouble.fail` makes the next N calls of
a method answer 429 (``Retry-After: 1``, ``ratelimited``) or 500.

:func:`sign` and :func:`interaction_body` build what Slack sends to an app's
interactivity endpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

WEBHOOK_PATH = "/hooks/T/B/X"
RESPONSE_PATH = "/actions/"


@dataclass(frozen=True)
class Call:
    """One request the double answered.

    Attributes:
        method: Web API method (``chat.postMessage``) or ``webhook``.
        args: the arguments, from the JSON body, the form body and the query string.
        auth: the ``Authorization`` header ("" when absent).
        at_s: ``time.monotonic()`` when it arrived.
        status: the HTTP status answered.
    """

    method: str
    args: dict[str, Any]
    auth: str
    at_s: float
    status: int


@dataclass
class _State:
    token: str
    groups: dict[str, list[str]]
    calls: list[Call] = field(default_factory=list)
    failures: dict[str, list[int]] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    ts: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)


def _channel_id(channel: str) -> str:
    """A channel ID for a name (``#deploys`` → ``CDEPLOYS``); IDs stay as they are."""
    name = channel.lstrip("#")
    if name[:1] in ("C", "G", "D") and name.isupper():
        return name
    return "C" + "".join(ch for ch in name.upper() if ch.isalnum())


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet tests

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _args(self, query: str) -> dict[str, Any]:
        args: dict[str, Any] = {k: v[0] for k, v in parse_qs(query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        kind = self.headers.get("Content-Type", "")
        if raw and "json" in kind:
            args.update(json.loads(raw))
        elif raw:
            args.update({k: v[0] for k, v in parse_qs(raw.decode()).items()})
        for key in ("blocks",):  # slack_sdk sends blocks as a JSON string in forms
            if isinstance(args.get(key), str):
                args[key] = json.loads(args[key])
        return args

    def _serve(self) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        args = self._args(url.query)
        auth = self.headers.get("Authorization", "")
        if url.path == WEBHOOK_PATH:
            method = "webhook"
        elif url.path.startswith(RESPONSE_PATH):
            method = "response"
        elif url.path.startswith("/api/"):
            method = url.path.removeprefix("/api/")
        else:
            self._answer(404, "not_found", {"ok": False, "error": "unknown_url"}, args, auth)
            return
        with state.lock:
            queued = state.failures.get(method)
            failure = queued.pop(0) if queued else None
        if failure == 429:
            body = {"ok": False, "error": "ratelimited"}
            self._answer(429, method, body, args, auth, {"Retry-After": "1"})
            return
        if failure is not None:
            self._answer(failure, method, {"ok": False, "error": "internal_error"}, args, auth)
            return
        if method in ("webhook", "response"):
            self._answer(200, method, "ok", args, auth)
            return
        if auth != f"Bearer {state.token}":
            self._answer(200, method, {"ok": False, "error": "invalid_auth"}, args, auth)
            return
        self._answer(200, method, self._result(method, args), args, auth)

    def _result(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        state = self.server.state
        if method == "chat.postMessage":
            channel = str(args.get("channel", ""))
            if channel.lstrip("#").startswith("missing"):
                return {"ok": False, "error": "channel_not_found"}
            with state.lock:
                ts = f"1700000000.{next(state.ts) * 100:06d}"
            message = {"type": "message", "text": args.get("text"), "ts": ts}
            if "blocks" in args:
                message["blocks"] = args["blocks"]
            if "thread_ts" in args:
                message["thread_ts"] = args["thread_ts"]
            return {"ok": True, "channel": _channel_id(channel), "ts": ts, "message": message}
        if method == "chat.update":
            with state.lock:
                gone = args.get("ts") in state.deleted
            if gone:
                return {"ok": False, "error": "message_not_found"}
            return {
                "ok": True,
                "channel": args.get("channel"),
                "ts": args.get("ts"),
                "text": args.get("text"),
            }
        if method == "usergroups.users.list":
            group = str(args.get("usergroup", ""))
            if group not in state.groups:
                return {"ok": False, "error": "no_such_subteam"}
            return {"ok": True, "users": list(state.groups[group])}
        if method == "auth.test":
            return {"ok": True, "user_id": "UBOT", "team_id": "T1", "user": "canaryd"}
        return {"ok": False, "error": "unknown_method"}

    def _answer(
        self,
        status: int,
        method: str,
        body: dict[str, Any] | str,
        args: dict[str, Any],
        auth: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        state = self.server.state
        with state.lock:
            state.calls.append(Call(method, args, auth, time.monotonic(), status))
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        kind = "text/plain" if isinstance(body, str) else "application/json; charset=utf-8"
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class SlackDouble:
    """Slack's Web API and an incoming webhook on 127.0.0.1 (a context manager)."""

    def __init__(
        self, token: str = "xoxb-test-token", groups: dict[str, list[str]] | None = None
    ) -> None:
        self.token = token
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = _State(token=token, groups=dict(groups or {}))
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="slackdouble", daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def api_url(self) -> str:
        """For ``SlackSettings.api_url`` (``AsyncWebClient(base_url=…)``)."""
        return f"{self.base_url}/api/"

    @property
    def webhook_url(self) -> str:
        return f"{self.base_url}{WEBHOOK_PATH}"

    @property
    def response_url(self) -> str:
        """For :func:`interaction_body`: where the handler answers the clicker alone."""
        return f"{self.base_url}{RESPONSE_PATH}T1/1/x"

    def __enter__(self) -> SlackDouble:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def set_groups(self, groups: dict[str, list[str]]) -> None:
        with self._server.state.lock:
            self._server.state.groups = dict(groups)

    def delete(self, ts: str) -> None:
        """Delete message ``ts``: ``chat.update`` of it answers ``message_not_found``."""
        with self._server.state.lock:
            self._server.state.deleted.add(ts)

    def fail(self, method: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with ``status`` (429: with
        ``Retry-After: 1``)."""
        with self._server.state.lock:
            self._server.state.failures.setdefault(method, []).extend([status] * times)

    def calls(self, method: str | None = None, *, ok_only: bool = False) -> list[Call]:
        """The calls so far (of ``method``; with ``ok_only``, only those answered 200)."""
        with self._server.state.lock:
            calls = list(self._server.state.calls)
        return [
            c
            for c in calls
            if (method is None or c.method == method) and (not ok_only or c.status == 200)
        ]


def sign(body: bytes, secret: str, timestamp: int) -> dict[str, str]:
    """Slack's v0 request-signing headers for ``body`` sent at ``timestamp``."""
    base = f"v0:{timestamp}:".encode() + body
    digest = hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": str(timestamp), "X-Slack-Signature": f"v0={digest}"}


def interaction_body(
    action_id: str,
    value: str,
    user_id: str,
    username: str,
    channel: str,
    message_ts: str,
    trigger_id: str,
    *,
    blocks: list[dict[str, Any]] | None = None,
    response_url: str = "https://hooks.slack.com/actions/T1/1/x",
) -> bytes:
    """A ``block_actions`` interaction as Slack POSTs it: form-encoded ``payload=``
    (``blocks``: the message's blocks; ``response_url``: e.g.
    :attr:`SlackDouble.response_url`)."""
    payload = {
        "type": "block_actions",
        "team": {"id": "T1", "domain": "example"},
        "user": {"id": user_id, "username": username, "name": username, "team_id": "T1"},
        "api_app_id": "A1",
        "token": "legacy-verification-token",
        "container": {
            "type": "message",
            "message_ts": message_ts,
            "channel_id": channel,
            "is_ephemeral": False,
        },
        "trigger_id": trigger_id,
        "channel": {"id": channel, "name": "deploys"},
        "message": {"type": "message", "ts": message_ts, "text": "", "blocks": blocks or []},
        "response_url": response_url,
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "canaryd_approval",
                "value": value,
                "action_ts": "1700000001.000001",
                "text": {"type": "plain_text", "text": action_id},
            }
        ],
    }
    return urlencode({"payload": json.dumps(payload)}).encode()
