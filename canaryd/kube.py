"""Kubernetes access for Canary resources, their commands, Events and Leases.

What it hides: the blocking ``kubernetes`` client.  Every call runs in a worker thread
with a deadline (never on the event loop), and every ``ApiException`` or connection
error is mapped in one place (:func:`map_errors`) onto :class:`KubeError`:

    KubeError
    ├── NotFoundError        404
    ├── ConflictError        409: a stale resourceVersion, or AlreadyExists
    ├── InvalidError         400 / 422: the request itself is wrong, retrying won't help
    ├── ForbiddenError       401 / 403
    └── UnavailableError     5xx, 429, timeouts, refused connections: retry later

Commands (promote, abort, approve, skip) live in the ``canaryd.io/commands``
annotation as a JSON list; the daemon acknowledges them by id in ``status``.  They
survive restarts and are auditable with ``kubectl get canary -o yaml``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from canaryd.metrics import KUBE_REQUESTS, kube_verb
from canaryd.ports import (  # the error types live in the ports module
    CanaryRef,
    ConflictError,
    ForbiddenError,
    InvalidError,
    KubeError,
    NotFoundError,
    UnavailableError,
)
from canaryd.redact import may_need_redaction, redact, redact_tree
from canaryd.rollout import Command, CommandKind
from canaryd.spec import API_GROUP, CanarySpec, SpecError, parse_spec
from canaryd.status import CanaryStatus

VERSION = "v1alpha1"
PLURAL = "canaries"
LIST_PAGE_SIZE = 500  # objects per page of a list
COMMANDS_ANNOTATION = f"{API_GROUP}/commands"
#: canaryd's finalizer: a Canary deleted mid-rollout has its traffic restored first
FINALIZER = f"{API_GROUP}/restore-traffic"
#: Handled commands are pruned from the annotation when a new one is added.
MAX_PENDING_COMMANDS = 20

T = TypeVar("T")


def _message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
    except (ValueError, TypeError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    text = str(message or exc.reason or "no message")
    return text if len(text) <= 500 else text[:500] + "…"


def map_error(exc: BaseException) -> KubeError:
    """The one place where client errors become :class:`KubeError` (original chained)."""
    if isinstance(exc, KubeError):
        return exc
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        message = _message(exc)
        kind: type[KubeError] = {
            404: NotFoundError,
            409: ConflictError,
            400: InvalidError,
            422: InvalidError,
            401: ForbiddenError,
            403: ForbiddenError,
        }.get(status, UnavailableError if status in (0, 429) or status >= 500 else KubeError)
        return kind(message, status, str(exc.reason or ""))
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return UnavailableError("the Kubernetes API did not answer in time")
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return UnavailableError(f"cannot reach the Kubernetes API: {exc}")
    return KubeError(f"unexpected error talking to the Kubernetes API: {exc!r}")


@contextlib.contextmanager
def map_errors() -> Iterator[None]:
    try:
        yield
    except (ApiException, urllib3.exceptions.HTTPError, OSError, TimeoutError) as exc:
        raise map_error(exc) from exc


@dataclass(frozen=True, slots=True)
class CanaryObject:
    """A Canary as read from the API.

    Attributes:
        ref: namespace and name.
        spec: the parsed spec, or None when it does not validate (see ``spec_error``).
        spec_error: why the spec is unusable, for a status condition.
        status: the status (the rollout's only state).
        commands: commands from the annotation, oldest first.
        resource_version: for optimistic concurrency on the next write.
        generation: ``metadata.generation`` (spec changes).
        uid: for Events' involvedObject.
        raw: the object as returned, for writes that must send it back whole.
    """

    ref: CanaryRef
    spec: CanarySpec | None
    spec_error: str | None
    status: CanaryStatus
    commands: tuple[Command, ...]
    resource_version: str
    generation: int
    uid: str
    raw: dict[str, Any]


def parse_commands(annotation: str | None) -> tuple[Command, ...]:
    """Commands from the annotation; malformed entries are skipped, not fatal."""
    if not annotation:
        return ()
    try:
        items = json.loads(annotation)
    except ValueError:
        return ()
    out = []
    for item in items if isinstance(items, list) else []:
        try:
            out.append(
                Command(
                    id=str(item["id"]),
                    kind=CommandKind(item["kind"]),
                    revision=item.get("revision"),
                    weight=item.get("weight"),
                    by=str(item.get("by", "")),
                    reason=str(item.get("reason", "")),
                    fix=item.get("fix") is True,
                )
            )
        except (KeyError, ValueError, TypeError):
            continue
    return tuple(out)


def command_json(command: Command, at: datetime) -> dict[str, Any]:
    data: dict[str, Any] = {"id": command.id, "kind": str(command.kind), "at": at.isoformat()}
    for key in ("revision", "weight", "by", "reason", "fix"):
        value = getattr(command, key)
        if value not in (None, "", False):
            data[key] = value
    return data


def new_command_id(kind: CommandKind, now: datetime) -> str:
    return f"{kind}-{now.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def new_command(
    kind: CommandKind,
    by: str,
    *,
    revision: str | None = None,
    weight: int | None = None,
    reason: str = "",
    fix: bool = False,
    now: datetime | None = None,
) -> Command:
    """A new command as the CLI and the status API write it (one code path): a fresh
    id, and for a promote without a revision, a timestamp as the revision."""
    now = now or datetime.now(UTC)
    if kind is CommandKind.PROMOTE and not revision:
        revision = now.strftime("%Y%m%d%H%M%S")
    return Command(
        id=new_command_id(kind, now),
        kind=kind,
        revision=revision if kind is CommandKind.PROMOTE else None,
        weight=weight if kind is CommandKind.APPROVE else None,
        by=by,
        reason=reason,
        fix=fix and kind is CommandKind.PROMOTE,
    )


def _as_dict(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise KubeError(f"the Kubernetes API answered with {type(value).__name__}, not an object")
    return value


@functools.lru_cache(maxsize=8192)
def _parse_spec_json(text: str) -> tuple[CanarySpec | None, str | None]:
    """A spec parsed once per distinct content (specs are frozen models)."""
    try:
        return parse_spec(json.loads(text)), None
    except SpecError as exc:
        return None, "; ".join(exc.problems)


def to_canary(raw: dict[str, Any]) -> CanaryObject:
    meta = raw.get("metadata") or {}
    ref = CanaryRef(meta.get("namespace", ""), meta.get("name", ""))
    # a round reads every Canary: validating each unchanged spec again costs more than
    # judging it, so parse by content (its canonical JSON) through a cache
    spec, error = _parse_spec_json(json.dumps(raw.get("spec") or {}, sort_keys=True))
    try:
        status = CanaryStatus.model_validate(raw.get("status") or {})
    except ValidationError:
        status = CanaryStatus()  # unreadable status: start afresh rather than crash
    annotations = meta.get("annotations") or {}
    return CanaryObject(
        ref=ref,
        spec=spec,
        spec_error=error,
        status=status,
        commands=parse_commands(annotations.get(COMMANDS_ANNOTATION)),
        resource_version=str(meta.get("resourceVersion", "")),
        generation=int(meta.get("generation") or 0),
        uid=str(meta.get("uid", "")),
        raw=raw,
    )


#: Whether the calls made now carry a decision (a rollback's or a step's status write,
#: the weights it moves): :meth:`Kube.call` runs them on threads of their own, so they
#: never queue behind the routine calls (progress refreshes, reads) of a thousand
#: other Canaries in the shared pool.  Set with :func:`decision_lane`.
_DECISION: contextvars.ContextVar[bool] = contextvars.ContextVar("decision", default=False)
#: Threads for decisions: few, since decisions are few; the routine pool is asyncio's.
DECISION_THREADS = 2
_decision_pool = concurrent.futures.ThreadPoolExecutor(
    DECISION_THREADS, thread_name_prefix="kube-decision"
)


@contextlib.contextmanager
def decision_lane(on: bool = True) -> Iterator[None]:
    """The Kubernetes calls made inside (in this task, and what it awaits) carry a
    decision when ``on``: they take the decision lane (see ``_DECISION``)."""
    token = _DECISION.set(on or _DECISION.get())
    try:
        yield
    finally:
        _DECISION.reset(token)


def in_decision_lane() -> bool:
    """Whether the calls made now take the decision lane."""
    return _DECISION.get()


class Kube:
    """Async access to the Kubernetes API for canaryd (blocking calls in threads).

    Args:
        api_client: a configured ``kubernetes.client.ApiClient``.
        timeout_s: deadline of each call, seconds.
    """

    def __init__(self, api_client: k8s.ApiClient, timeout_s: float = 10.0) -> None:
        self.api_client = api_client
        self.timeout_s = timeout_s
        self.custom = k8s.CustomObjectsApi(api_client)
        self.apps = k8s.AppsV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.coordination = k8s.CoordinationV1Api(api_client)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking client call in a thread, with the deadline and error mapping."""

        verb = kube_verb(getattr(fn, "__name__", "call"))

        def run() -> T:
            code = 200
            try:
                with map_errors():
                    return fn(*args, _request_timeout=self.timeout_s, **kwargs)
            except KubeError as exc:
                code = exc.status
                raise
            finally:
                KUBE_REQUESTS.labels(verb, str(code)).inc()

        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
        # cancellation that arrives as the call completes, and a daemon task that
        # survives its cancel never lets the daemon stop.
        try:
            async with asyncio.timeout(self.timeout_s + 1.0):
                if _DECISION.get():
                    loop = asyncio.get_running_loop()
                    return await loop.run_in_executor(_decision_pool, run)
                return await asyncio.to_thread(run)
        except TimeoutError as exc:
            raise map_error(exc) from exc

    # -- canaries --------------------------------------------------------------------------

    async def get_canary(self, ref: CanaryRef) -> CanaryObject:
        raw = await self.call(
            self.custom.get_namespaced_custom_object,
            API_GROUP, VERSION, ref.namespace, PLURAL, ref.name,
        )  # fmt: skip
        return to_canary(_as_dict(raw))

    async def list_canaries(self, namespace: str | None = None) -> list[CanaryObject]:
        return [to_canary(item) for item in await self.list_canaries_raw(namespace)]

    async def list_canaries_raw(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """The Canaries as the API returns them, unparsed (cheap for thousands), listed
        in pages of ``LIST_PAGE_SIZE``."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
            if token:
                page["_continue"] = token
            if namespace:
                raw = await self.call(
                    self.custom.list_namespaced_custom_object,
                    API_GROUP, VERSION, namespace, PLURAL, **page,
                )  # fmt: skip
            else:
                raw = await self.call(
                    self.custom.list_cluster_custom_object, API_GROUP, VERSION, PLURAL, **page
                )
            answer = _as_dict(raw)
            items += [_as_dict(item) for item in answer.get("items", [])]
            token = (answer.get("metadata") or {}).get("continue")
            if not token:
                return items

    async def write_status(self, canary: CanaryObject, status: CanaryStatus) -> CanaryObject:
        """Replace the status, if nobody changed the Canary since it was read.

        Raises:
            ConflictError: the resourceVersion is stale; read again and reconcile again.
        """
        dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        # anyone who reads Canaries reads this: no credentials.  Walking a status of
        # block sums and reasons costs more than its JSON text's two searches, so the
        # tree is walked only when the text has something redaction would change
        text = status.model_dump_json(by_alias=True, exclude_none=True)
        written = redact_tree(dumped) if may_need_redaction(text) else dumped
        body = {
            "apiVersion": f"{API_GROUP}/{VERSION}",
            "kind": "Canary",
            "metadata": {
                "name": canary.ref.name,
                "namespace": canary.ref.namespace,
                "resourceVersion": canary.resource_version,
            },
            "status": written,
        }
        custom = self.custom

        def replace_namespaced_custom_object_status(**options: Any) -> dict[str, Any]:
            # the answer undecoded by the client: a round writing every status spends
            # its CPU here, and only the resourceVersion is new (json.loads is C)
            response = custom.replace_namespaced_custom_object_status(
                API_GROUP, VERSION, canary.ref.namespace, PLURAL, canary.ref.name, body,
                _preload_content=False, **options,
            )  # fmt: skip
            data: bytes = response.data  # type: ignore[attr-defined]  # urllib3's response
            return _as_dict(json.loads(data))

        raw = await self.call(replace_namespaced_custom_object_status)
        # the write matched the resourceVersion read, so spec, metadata and commands are
        # as read; the status is the one written (parsed again only if redacted)
        if written != dumped:
            return to_canary(raw)
        meta = raw.get("metadata") or {}
        return replace(
            canary, status=status, resource_version=str(meta.get("resourceVersion", "")), raw=raw
        )

    async def set_finalizers(self, canary: CanaryObject, finalizers: list[str]) -> CanaryObject:
        """Replace the Canary's finalizers (a merge patch carrying the resourceVersion
        read: a concurrent change is a 409, never lost).

        Raises:
            ConflictError: the Canary changed since it was read.
        """
        body = {"metadata": {"resourceVersion": canary.resource_version, "finalizers": finalizers}}
        raw = await self.call(
            self.custom.patch_namespaced_custom_object,
            API_GROUP, VERSION, canary.ref.namespace, PLURAL, canary.ref.name, body,
            _content_type="application/merge-patch+json",
        )  # fmt: skip
        return to_canary(_as_dict(raw))

    async def remove_commands(self, canary: CanaryObject, ids: set[str]) -> CanaryObject:
        """Take the commands ``ids`` (acknowledged in status already) off the annotation,
        leaving the others exactly as written; the annotation goes when none is left.

        The status write that acknowledged them comes first, so a crash between the two
        leaves an acknowledged command on the annotation, which is skipped, never
        applied twice.

        Raises:
            ConflictError: the Canary changed since it was read (try next round).
        """
        annotations = (canary.raw.get("metadata") or {}).get("annotations") or {}
        try:
            items = json.loads(annotations.get(COMMANDS_ANNOTATION) or "[]")
        except ValueError:
            items = []
        kept = [
            i for i in (items if isinstance(items, list) else [])
            if not (isinstance(i, dict) and i.get("id") in ids)
        ]  # fmt: skip
        body = {
            "metadata": {
                "resourceVersion": canary.resource_version,
                "annotations": {COMMANDS_ANNOTATION: json.dumps(kept) if kept else None},
            }
        }
        raw = await self.call(
            self.custom.patch_namespaced_custom_object,
            API_GROUP, VERSION, canary.ref.namespace, PLURAL, canary.ref.name, body,
            _content_type="application/merge-patch+json",
        )  # fmt: skip
        return to_canary(_as_dict(raw))

    async def add_command(self, ref: CanaryRef, command: Command, attempts: int = 8) -> None:
        """Append a command to the annotation (read, modify, write with resourceVersion).

        Retries on conflict with a fresh read; commands already acknowledged in status
        are pruned so the annotation stays small.
        """
        for attempt in range(attempts):
            canary = await self.get_canary(ref)
            done = set(canary.status.acknowledged)
            pending = [c for c in canary.commands if c.id not in done][-MAX_PENDING_COMMANDS:]
            now = datetime.now(UTC)
            items = [command_json(c, now) for c in pending] + [command_json(command, now)]
            body = {
                "metadata": {
                    "resourceVersion": canary.resource_version,
                    "annotations": {COMMANDS_ANNOTATION: json.dumps(items)},
                }
            }
            try:
                await self.call(
                    self.custom.patch_namespaced_custom_object,
                    API_GROUP, VERSION, ref.namespace, PLURAL, ref.name, body,
                    _content_type="application/merge-patch+json",
                )  # fmt: skip
                return
            except ConflictError:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))

    # -- events ------------------------------------------------------------------------------

    async def emit_event(
        self, canary: CanaryObject, reason: str, message: str, *, warning: bool = False
    ) -> None:
        now = datetime.now(UTC)
        body = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(
                name=f"{canary.ref.name}.{secrets.token_hex(8)}", namespace=canary.ref.namespace
            ),
            involved_object=k8s.V1ObjectReference(
                api_version=f"{API_GROUP}/{VERSION}",
                kind="Canary",
                name=canary.ref.name,
                namespace=canary.ref.namespace,
                uid=canary.uid,
            ),
            reason=reason,
            message=redact(message)[:1024],
            type="Warning" if warning else "Normal",
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=k8s.V1EventSource(component="canaryd"),
        )
        await self.call(self.core.create_namespaced_event, canary.ref.namespace, body)
