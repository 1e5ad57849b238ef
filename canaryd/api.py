"""The status API and dashboard: FastAPI on uvicorn, inside ``canaryd run`` (design §6).

Reads come from the :class:`~canaryd.hub.StatusHub` (this replica's watch cache, so a
standby answers too); commands go onto the Canary through the same function the CLI
uses (:func:`canaryd.kube.new_command` + ``Kube.add_command``), so any replica can take
them and the leader acts on them.  Handlers run on the daemon's loop but only read
snapshots or await a Kubernetes call in a thread: a slow client never holds a
reconcile.

Security by default: commands need an ``operator`` bearer token (reads too, with
``reads_need_token``); tokens are kept as SHA-256 digests and compared in constant
time; every command writes an audit line; every response carries security headers;
request bodies are capped; CORS is off unless origins are given.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import anyio
import structlog
import uvicorn
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from canaryd.hub import StatusHub
from canaryd.kube import CanaryObject, new_command
from canaryd.metrics import HubCollector, exposition
from canaryd.ports import CanaryRef, ConflictError, KubeError, NotFoundError, UnavailableError
from canaryd.rollout import Command, CommandKind
from canaryd.status import Phase
from canaryd.views import (
    CanaryDetail,
    CanarySummary,
    CommandAccepted,
    ErrorBody,
    EventView,
    Series,
)

log = structlog.get_logger("canaryd.api")
audit = structlog.get_logger("canaryd.audit")

#: request bodies above this are refused (413) before they are read whole
MAX_BODY_BYTES = 64 * 1024

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", _CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)


class Role(StrEnum):
    VIEWER = "viewer"  #: may read
    OPERATOR = "operator"  #: may read and send commands


class TokenFileError(ValueError):
    """The token file cannot be used (one line for the user)."""


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class TokenStore:
    """Bearer tokens by SHA-256 digest, each with a name and a role.

    The file holds one token per line, ``TOKEN,NAME,ROLE`` (as Kubernetes' static token
    file; ROLE is ``viewer`` or ``operator``); blank lines and ``#`` comments are skipped.
    """

    entries: tuple[tuple[bytes, Identity], ...] = ()

    @classmethod
    def parse(cls, text: str, source: str = "token file") -> TokenStore:
        entries = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3 or not all(parts):
                raise TokenFileError(f"{source}, line {number}: expected TOKEN,NAME,ROLE")
            token, name, role = parts
            if len(token) < 16:
                raise TokenFileError(f"{source}, line {number}: a token needs 16+ characters")
            try:
                entries.append((_digest(token), Identity(name, Role(role))))
            except ValueError:
                raise TokenFileError(
                    f"{source}, line {number}: role {role!r} is not viewer or operator"
                ) from None
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise TokenFileError(f"cannot read the token file: {exc.strerror}: {path}") from None
        return cls.parse(text, str(path))

    @classmethod
    def of(cls, *tokens: tuple[str, Identity]) -> TokenStore:
        """A store of the given (token, identity) pairs."""
        return cls(tuple((_digest(token), who) for token, who in tokens))

    def lookup(self, token: str) -> Identity | None:
        """The identity of ``token``; every entry is compared, in constant time."""
        digest = _digest(token)
        found = None
        for known, identity in self.entries:
            if hmac.compare_digest(known, digest):
                found = identity
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """How the API serves.

    Attributes:
        tokens: who may do what.
        reads_need_token: reads (and the dashboard's data, /metrics) need a viewer token.
        cors_origins: origins allowed to call the API from a browser (none by default).
        max_body_bytes: larger request bodies are refused with 413.
    """

    tokens: TokenStore = field(default_factory=TokenStore)
    reads_need_token: bool = False
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = MAX_BODY_BYTES


#: writes a command onto the Canary (``Kube.add_command``)
Submit = Callable[[CanaryRef, Command], Awaitable[None]]
#: Slack's interactions endpoint: (raw body, headers) → (HTTP status, JSON answer)
SlackHandler = Callable[[bytes, Mapping[str, str]], Awaitable[tuple[int, dict[str, Any]]]]


class ApiError(Exception):
    """An answer other than 2xx, with a sentence for the person reading it."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class _Body(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )
    reason: str = Field(default="", max_length=500, description="recorded with the command")


class PromoteBody(_Body):
    revision: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$",
        description="revision label (default: a timestamp)",
    )
    fix: bool = Field(
        default=False,
        description="the release is a fix: the error-budget policy lets it start when frozen",
    )


class ApproveBody(_Body):
    step: int | None = Field(
        default=None, ge=1, le=100, description="the step's weight; default: the step waiting"
    )


class ReasonBody(_Body):
    pass


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "the body is not JSON"),
        (401, "no or unknown bearer token"),
        (403, "the token's role may not do this"),
        (404, "no such Canary"),
        (409, "the Canary is not in a state where this applies"),
        (413, "the body is too large"),
        (422, "the request is malformed"),
        (502, "the Kubernetes API refused the write"),
        (503, "Kubernetes is unavailable"),
    )
}


def create_app(
    hub: StatusHub,
    submit: Submit,
    settings: ApiSettings | None = None,
    *,
    readiness: Callable[[], tuple[bool, dict[str, object]]] = lambda: (True, {"ready": True}),
    leader: Callable[[], bool] = lambda: True,
    slack_interactions: SlackHandler | None = None,
) -> FastAPI:
    """The ASGI app of the status API, metrics and dashboard; with
    ``slack_interactions``, also ``POST /slack/interactions`` (Slack's signed button
    clicks: Slack's signature is the credential, not a bearer token)."""
    settings = settings or ApiSettings()
    app = FastAPI(
        title="canaryd",
        summary="Status and commands of canaryd's progressive rollouts",
        version="v1",
        docs_url=None,  # Swagger UI loads from a CDN: no external network
        redoc_url=None,
    )
    registry = CollectorRegistry(auto_describe=True)
    registry.register(HubCollector(hub, leader))
    #: encoded list answers by filter, while the hub's version is unchanged (pollers)
    lists: dict[tuple[str | None, Phase | None], tuple[int, bytes]] = {}

    def identity(authorization: str | None) -> Identity | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Unauthorized", "expected 'Authorization: Bearer TOKEN'")
        who = settings.tokens.lookup(token.strip())
        if who is None:
            raise ApiError(401, "Unauthorized", "unknown token")
        return who

    async def reader(
        authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    ) -> Identity | None:
        who = identity(authorization)
        if settings.reads_need_token and who is None:
            raise ApiError(401, "Unauthorized", "reads need a bearer token on this server")
        return who

    async def operator(
        authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    ) -> Identity:
        who = identity(authorization)
        if who is None:
            message = (
                "commands need an operator bearer token"
                if settings.tokens.entries
                else "commands need an operator bearer token, and this server has none "
                "configured (canaryd run --api-token-file FILE)"
            )
            raise ApiError(401, "Unauthorized", message)
        if who.role is not Role.OPERATOR:
            raise ApiError(
                403, "Forbidden", f"token {who.name!r} is a viewer: commands need operator"
            )
        return who

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.reason, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            problems.append(
                f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "")
            )
        return _error(422, "Invalid", "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed"}.get(
            exc.status_code, "Error"
        )
        message = {404: "no such endpoint", 400: "the request body is not valid JSON"}.get(
            exc.status_code, str(exc.detail)
        )
        response = _error(exc.status_code, reason, message)
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    def canary_or_404(namespace: str, name: str) -> CanaryRef:
        ref = CanaryRef(namespace, name)
        if hub.get(ref) is None:
            raise ApiError(404, "NotFound", f"Canary {ref} not found")
        return ref

    # -- reads -------------------------------------------------------------------------

    @app.get(
        "/api/v1/canaries",
        response_model=list[CanarySummary],
        responses=_ERRORS,
        tags=["canaries"],
        summary="Every Canary this replica sees, sorted by namespace and name",
    )
    async def list_canaries(
        _: Identity | None = Depends(reader),
        namespace: Annotated[str | None, Query(max_length=253)] = None,
        phase: Phase | None = None,
    ) -> Response:
        key = (namespace, phase)
        cached = lists.get(key)
        if cached is None or cached[0] != hub.version:
            if len(lists) > 64:
                lists.clear()
            body = json.dumps(hub.list_json(namespace, phase), separators=(",", ":")).encode()
            cached = lists[key] = (hub.version, body)
        return Response(cached[1], media_type="application/json")

    @app.get(
        "/api/v1/slos",
        responses=_ERRORS,
        tags=["slos"],
        summary="Every released service's SLO figures and error-budget policy tier",
    )
    async def list_slos(
        _: Identity | None = Depends(reader),
        namespace: Annotated[str | None, Query(max_length=253)] = None,
    ) -> JSONResponse:
        with hub.lock:
            rows = [
                slo.to_json()
                for key, slo in sorted(hub.slos.items())
                if namespace is None or key[0] == namespace
            ]
        return JSONResponse(rows)

    @app.get(
        "/api/v1/canaries/{namespace}/{name}",
        response_model=CanaryDetail,
        responses=_ERRORS,
        tags=["canaries"],
        summary="One Canary: spec summary, status, last verdict, history, approvals, events",
    )
    async def get_canary(
        namespace: str, name: str, _: Identity | None = Depends(reader)
    ) -> Response:
        detail = hub.detail(canary_or_404(namespace, name))
        assert detail is not None
        return JSONResponse(detail.model_dump(mode="json", by_alias=True))

    @app.get(
        "/api/v1/canaries/{namespace}/{name}/series",
        response_model=Series,
        responses=_ERRORS,
        tags=["canaries"],
        summary="Per-interval canary and stable figures of the current rollout",
    )
    async def get_series(
        namespace: str, name: str, _: Identity | None = Depends(reader)
    ) -> Response:
        series = hub.series(canary_or_404(namespace, name))
        assert series is not None
        return JSONResponse(series.model_dump(mode="json", by_alias=True))

    @app.get(
        "/api/v1/events",
        response_class=EventSourceResponse,
        responses={**_ERRORS, 200: {"model": EventView, "description": "an event stream"}},
        tags=["events"],
        summary="Server-Sent Events: phase changes, verdicts, weight changes",
        description=(
            "Each event's `id` can be given back as `Last-Event-ID` (header) or "
            "`lastEventId` (query) to resume; an event of type `reset` says the id is "
            "no longer held and the reader should reload."
        ),
    )
    async def events(
        _: Identity | None = Depends(reader),
        refs: list[CanaryRef] = Depends(_canary_filter),
        namespace: Annotated[str | None, Query(max_length=253)] = None,
        last_event_id: Annotated[
            str | None, Header(alias="Last-Event-ID", max_length=64, include_in_schema=False)
        ] = None,
        resume: Annotated[
            str | None, Query(alias="lastEventId", max_length=64, description="resume after")
        ] = None,
    ) -> AsyncIterator[ServerSentEvent]:
        sub = hub.subscribe(namespace, refs)  # before the replay: nothing falls between
        try:
            sent = ""
            after = last_event_id or resume
            if after:
                backlog = hub.events_after(after)
                if backlog is None:
                    reset = hub.reset_event(datetime.now(UTC))
                    yield _sse(reset, hub)
                    sent = reset.id
                else:
                    for event in backlog:
                        if sub.wants(event):
                            yield _sse(event, hub)
                            sent = event.id
            while True:
                item = await sub.queue.get()
                if item is None:
                    return  # fell behind (or stopping): the client resumes from the ring
                if not sent or _newer(item.id, sent):
                    yield _sse(item, hub)
                    sent = item.id
        finally:
            hub.unsubscribe(sub)

    # -- commands ------------------------------------------------------------------------

    async def command(
        ref: CanaryRef, who: Identity, request: Request, kind: CommandKind, **fields: Any
    ) -> JSONResponse:
        canary = hub.get(ref)
        where = request.client.host if request.client else ""
        try:
            if canary is None:
                raise ApiError(404, "NotFound", f"Canary {ref} not found")
            _check_applies(canary, kind, fields.get("weight"))
            cmd = new_command(kind, who.name, **fields)
            try:
                async with asyncio.timeout(30):
                    await submit(ref, cmd)
            except NotFoundError:
                raise ApiError(404, "NotFound", f"Canary {ref} not found") from None
            except ConflictError:
                raise ApiError(
                    409, "Conflict", f"Canary {ref} kept changing; try the command again"
                ) from None
            except (UnavailableError, TimeoutError):
                raise ApiError(
                    503, "Unavailable", "the Kubernetes API is unavailable; try again"
                ) from None
            except KubeError as exc:
                raise ApiError(
                    502, "KubernetesError", f"the Kubernetes API refused: {exc}"
                ) from None
        except ApiError as exc:
            audit.warning(
                "command refused", who=who.name, role=str(who.role), command=str(kind),
                canary=str(ref), result=exc.status, why=exc.message, client=where,
            )  # fmt: skip
            raise
        audit.info(
            "command accepted", who=who.name, role=str(who.role), command=str(kind),
            canary=str(ref), id=cmd.id, result=202, client=where,
        )  # fmt: skip
        body = CommandAccepted(
            id=cmd.id, kind=str(kind), namespace=ref.namespace, name=ref.name, by=who.name,
            revision=cmd.revision, weight=cmd.weight,
        )  # fmt: skip
        return JSONResponse(body.model_dump(mode="json", by_alias=True), status_code=202)

    command_doc: dict[str, Any] = {
        "status_code": 202,
        "response_model": CommandAccepted,
        "responses": _ERRORS,
        "tags": ["commands"],
    }

    @app.post(
        "/api/v1/canaries/{namespace}/{name}/promote",
        summary="Start a rollout of a revision",
        **command_doc,
    )
    async def promote(
        namespace: str,
        name: str,
        request: Request,
        who: Identity = Depends(operator),
        body: PromoteBody | None = None,
    ) -> JSONResponse:
        body = body or PromoteBody()
        return await command(
            CanaryRef(namespace, name), who, request, CommandKind.PROMOTE,
            revision=body.revision, reason=body.reason, fix=body.fix,
        )  # fmt: skip

    @app.post(
        "/api/v1/canaries/{namespace}/{name}/abort",
        summary="Roll back now (canary weight 0 first)",
        **command_doc,
    )
    async def abort(
        namespace: str,
        name: str,
        request: Request,
        who: Identity = Depends(operator),
        body: ReasonBody | None = None,
    ) -> JSONResponse:
        reason = body.reason if body else ""
        return await command(
            CanaryRef(namespace, name), who, request, CommandKind.ABORT, reason=reason
        )

    @app.post(
        "/api/v1/canaries/{namespace}/{name}/approve",
        summary="Approve the step waiting (or, with step, one ahead of time)",
        **command_doc,
    )
    async def approve(
        namespace: str,
        name: str,
        request: Request,
        who: Identity = Depends(operator),
        body: ApproveBody | None = None,
    ) -> JSONResponse:
        body = body or ApproveBody()
        return await command(
            CanaryRef(namespace, name), who, request, CommandKind.APPROVE,
            weight=body.step, reason=body.reason,
        )  # fmt: skip

    @app.post(
        "/api/v1/canaries/{namespace}/{name}/skip",
        summary="Treat the current step as passed",
        **command_doc,
    )
    async def skip(
        namespace: str,
        name: str,
        request: Request,
        who: Identity = Depends(operator),
        body: ReasonBody | None = None,
    ) -> JSONResponse:
        reason = body.reason if body else ""
        return await command(
            CanaryRef(namespace, name), who, request, CommandKind.SKIP, reason=reason
        )

    if slack_interactions is not None:
        handle_slack = slack_interactions

        @app.post(
            "/slack/interactions",
            tags=["slack"],
            summary="Slack's interactive button clicks (Approve, Abort), signed by Slack",
            responses={401: {"description": "bad or stale Slack signature"}},
        )
        async def slack(request: Request) -> JSONResponse:
            body = await request.body()
            status, answer = await handle_slack(body, dict(request.headers))
            return JSONResponse(answer, status_code=status)

    # -- probes, metrics, dashboard ------------------------------------------------------------

    @app.get("/healthz", tags=["probes"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["probes"],
        summary="Kubernetes reachable; leader or standby stated",
        responses={503: {"description": "not ready"}},
    )
    async def readyz() -> JSONResponse:
        ok, body = readiness()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["probes"], summary="Prometheus metrics", response_class=Response)
    async def metrics(_: Identity | None = Depends(reader)) -> Response:
        return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)

    web = resources.files("canaryd") / "web"
    if web.is_dir():
        index = Path(str(web / "index.html"))

        @app.get("/", include_in_schema=False)
        async def dashboard() -> FileResponse:
            return FileResponse(index, media_type="text/html; charset=utf-8")

        app.mount("/static", StaticFiles(directory=str(web)), name="static")

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        )
    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes)
    return app


async def _canary_filter(
    canary: Annotated[
        list[str] | None, Query(description="NAMESPACE/NAME, repeatable", max_length=100)
    ] = None,
) -> list[CanaryRef]:
    """The ``canary`` filter of the event stream (checked before the stream starts)."""
    refs = []
    for item in canary or ():
        ns, sep, nm = item.partition("/")
        if not sep or not ns or not nm or "/" in nm:
            raise ApiError(422, "Invalid", f"canary {item!r}: expected NAMESPACE/NAME")
        refs.append(CanaryRef(ns, nm))
    return refs


def _check_applies(canary: CanaryObject, kind: CommandKind, weight: int | None) -> None:
    """409 (or 422) when a command cannot do anything in the Canary's phase."""
    phase, spec = canary.status.phase, canary.spec
    if spec is None:
        raise ApiError(409, "Conflict", f"the Canary's spec is invalid: {canary.spec_error}")
    if kind is CommandKind.ABORT and not phase.active:
        raise ApiError(409, "Conflict", f"nothing to abort: the Canary is {phase}")
    if kind is CommandKind.SKIP and phase not in (Phase.PROGRESSING, Phase.HOLDING):
        raise ApiError(409, "Conflict", f"no step to skip: the Canary is {phase}")
    if kind is CommandKind.APPROVE:
        if weight is not None and weight not in spec.steps:
            steps = ", ".join(f"{s}" for s in spec.steps)
            raise ApiError(422, "Invalid", f"step {weight} is not one of the steps ({steps})")
        if weight is None and phase is not Phase.WAITING_APPROVAL:
            raise ApiError(
                409, "Conflict", f"no step is waiting for approval: the Canary is {phase}"
            )
        if weight is not None and not phase.active:
            raise ApiError(409, "Conflict", f"no rollout to approve: the Canary is {phase}")


def _error(status: int, reason: str, message: str) -> JSONResponse:
    body = ErrorBody(status=status, reason=reason, message=message)
    return JSONResponse(body.model_dump(mode="json", by_alias=True), status_code=status)


def _sse(event: EventView, hub: StatusHub) -> ServerSentEvent:
    return ServerSentEvent(raw_data=hub.encoded(event), event=str(event.type), id=event.id)


def _newer(event_id: str, than: str) -> bool:
    a, b = event_id.rpartition("-"), than.rpartition("-")
    if a[0] != b[0]:
        return True
    return int(a[2]) > int(b[2])


class Guard:
    """ASGI middleware: security headers on every answer, and a cap on request bodies."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(send)
            return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _TooLargeError
            return message

        async def with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                headers = list(message["headers"])
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, limited, with_headers)
        except _TooLargeError:
            if not started:
                await self._too_large(send)
        except Exception as exc:
            if not (started and _client_gone(exc)):
                raise
            # an event stream whose client went away mid-send: nothing to answer, and
            # nothing wrong with the server (no "Exception in ASGI application")
            log.debug("client went away", path=scope.get("path"))

    async def _too_large(self, send: Send) -> None:
        body = (
            ErrorBody(
                status=413,
                reason="RequestEntityTooLarge",
                message=f"request bodies are limited to {self.max_body_bytes} bytes",
            )
            .model_dump_json(by_alias=True)
            .encode()
        )
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send(
            {"type": "http.response.start", "status": 413, "headers": [*headers, *SECURITY_HEADERS]}
        )
        await send({"type": "http.response.body", "body": body})


class _TooLargeError(Exception):
    pass


def _client_gone(exc: BaseException) -> bool:
    """True when ``exc`` (or every exception of a group) says the client's connection
    or the stream feeding it is gone."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_client_gone(e) for e in exc.exceptions)
    return isinstance(exc, anyio.BrokenResourceError | anyio.ClosedResourceError | ConnectionError)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) → (host, port); ValueError with a sentence."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "0.0.0.0", int(port_text)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), or OSError saying which address failed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it a small answer waits ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers (the daemon owns SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    app: FastAPI, sock: socket.socket, stop: asyncio.Event, close_streams: Callable[[], None]
) -> None:
    """Serve ``app`` on ``sock`` with uvicorn, on this loop, until ``stop`` is set.

    On stop, ``close_streams`` ends the open event streams at once; other requests get
    two seconds to finish.
    """
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=2,
        ws="none",
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="api-server")
    stopper = asyncio.create_task(stop.wait(), name="api-stop")
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        close_streams()
        stopper.cancel()
        await task


async def serve_threaded(
    app: FastAPI, sock: socket.socket, stop: asyncio.Event, close_streams: Callable[[], None]
) -> None:
    """:func:`serve` on an event loop of its own, in a thread named ``api``, until ``stop``
    (an event of the calling loop) is set.

    API clients never queue the control loop's work behind theirs: requests are parsed,
    answered and streamed on the API's loop, which reads the hub (thread-safe) and sends
    commands through the Kubernetes client like the CLI does.
    """
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        inner = asyncio.Event()
        box["loop"], box["stop"] = asyncio.get_running_loop(), inner
        ready.set()
        await serve(app, sock, inner, close_streams)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="api", daemon=True)
    thread.start()
    await asyncio.to_thread(ready.wait)
    done = asyncio.create_task(asyncio.to_thread(thread.join), name="api-thread")
    stopper = asyncio.create_task(stop.wait(), name="api-stop")
    try:
        await asyncio.wait({done, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if "loop" in box and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # its loop already closed
                box["loop"].call_soon_threadsafe(box["stop"].set)
        await asyncio.shield(done)
    if "error" in box:
        raise box["error"]
