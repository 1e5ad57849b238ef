"""Where the CLI's cluster commands go: straight to Kubernetes, or through the status API.

``canaryd status|promote|abort|approve|skip`` talk to a :class:`Backend`: the
:class:`KubeBackend` writes commands onto the Canary with a kubeconfig; the
:class:`HttpBackend` (``--server URL`` or ``CANARYD_SERVER``, token from
``CANARYD_TOKEN`` or ``--token-file``) posts them to a daemon's API, which writes the
same command.  Output and exit codes are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from canaryd.kube import CanaryObject, Kube, new_command
from canaryd.ports import CanaryRef, KubeError, NotFoundError, UnavailableError
from canaryd.rollout import Command, CommandKind
from canaryd.shards import GROUP_LABEL, ROLE_LABEL, shard_of
from canaryd.slo import service_name
from canaryd.status import CanaryStatus

#: ``GET /api/v1/slos`` rows: each service's figures and tier (``ServiceSlo.to_json``).
SloRows = list[dict[str, Any]]


class BackendError(Exception):
    """A one-line error for the user (exit 2)."""


@dataclass(frozen=True, slots=True)
class CanaryView:
    """What the CLI shows of a Canary."""

    ref: CanaryRef
    status: CanaryStatus
    steps: tuple[int, ...]
    #: the service it releases (``spec.service``, else its stable Deployment)
    service: str | None = None


@dataclass(frozen=True, slots=True)
class ShardView:
    """Which replica holds which shard (``canaryd run --shards N``).

    Attributes:
        holders: each shard's holder, None for none (or a Lease that ran out).
    """

    holders: tuple[str | None, ...]

    def of(self, ref: CanaryRef) -> str:
        """``shard 2 of 4, held by pod-b`` for one Canary."""
        shard = shard_of(ref, len(self.holders))
        holder = self.holders[shard]
        held = f"held by {holder}" if holder else "held by no replica now"
        return f"shard {shard} of {len(self.holders)}, {held}"

    def line(self) -> str:
        """``shards (4): 0,2 pod-a · 1 pod-b · 3 unheld`` for the list view."""
        by: dict[str, list[int]] = {}
        for i, holder in enumerate(self.holders):
            by.setdefault(holder or "unheld", []).append(i)
        parts = [f"{','.join(map(str, shards))} {who}" for who, shards in sorted(by.items())]
        return f"shards ({len(self.holders)}): " + " · ".join(parts)


class Backend(Protocol):
    async def submit(
        self,
        ref: CanaryRef,
        kind: CommandKind,
        by: str,
        *,
        revision: str | None = None,
        weight: int | None = None,
        reason: str = "",
        fix: bool = False,
    ) -> Command: ...

    async def get(self, ref: CanaryRef) -> CanaryView:
        """Raises UnavailableError when it is worth trying again."""
        ...

    async def list(self, namespace: str | None) -> list[CanaryView]: ...

    async def slos(self, namespace: str | None) -> SloRows:
        """Every service's SLO figures as a running daemon last read them."""
        ...

    async def shards(self) -> ShardView | None:
        """Who holds which shard, when the daemons run sharded (None otherwise, or
        when it cannot be read: the rest of ``status`` does not depend on it)."""
        ...

    async def close(self) -> None: ...


def _view(canary: CanaryObject) -> CanaryView:
    spec = canary.spec
    return CanaryView(
        canary.ref,
        canary.status,
        tuple(spec.steps if spec else ()),
        service_name(spec) if spec else None,
    )


class KubeBackend:
    def __init__(
        self, kube: Kube, lease_namespace: str = "default", lease_name: str = "canaryd-leader"
    ) -> None:
        self.kube = kube
        self.lease_namespace = lease_namespace
        self.lease_name = lease_name

    async def shards(self) -> ShardView | None:
        """From the shard Leases (``<lease-name>-shard-<i>``): a holder whose Lease's
        renewTime is older than its duration (by this machine's clock) counts as none."""
        try:
            listed = await self.kube.call(
                self.kube.coordination.list_namespaced_lease,
                self.lease_namespace,
                label_selector=f"{GROUP_LABEL}={self.lease_name},{ROLE_LABEL}=shard",
            )
        except KubeError:
            return None
        prefix = f"{self.lease_name}-shard-"
        found: dict[int, str | None] = {}
        now = datetime.now(UTC)
        for lease in listed.items:
            name = str(lease.metadata.name if lease.metadata else "")
            if not name.startswith(prefix) or not name[len(prefix) :].isdigit():
                continue
            spec = lease.spec
            holder = spec.holder_identity if spec else None
            renewed = spec.renew_time if spec else None
            duration_s = (spec.lease_duration_seconds if spec else None) or 0
            ran_out = renewed is not None and (now - renewed).total_seconds() > duration_s > 0
            if ran_out:
                holder = None
            found[int(name[len(prefix) :])] = holder or None
        if not found:
            return None
        return ShardView(tuple(found.get(i) for i in range(max(found) + 1)))

    async def submit(
        self,
        ref: CanaryRef,
        kind: CommandKind,
        by: str,
        *,
        revision: str | None = None,
        weight: int | None = None,
        reason: str = "",
        fix: bool = False,
    ) -> Command:
        command = new_command(kind, by, revision=revision, weight=weight, reason=reason, fix=fix)
        try:
            await self.kube.add_command(ref, command)
        except NotFoundError:
            raise BackendError(f"Canary {ref} not found") from None
        return command

    async def get(self, ref: CanaryRef) -> CanaryView:
        try:
            canary = await self.kube.get_canary(ref)
        except NotFoundError:
            raise BackendError(f"Canary {ref} not found") from None
        return _view(canary)

    async def list(self, namespace: str | None) -> list[CanaryView]:
        return [_view(c) for c in await self.kube.list_canaries(namespace)]

    async def slos(self, namespace: str | None) -> SloRows:
        raise BackendError(
            "the SLO figures live in a running canaryd: ask it with --server URL, or give "
            "--prometheus-url to read them now"
        )

    async def close(self) -> None:
        return None


class HttpBackend:
    """The status API of a running daemon."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise BackendError(f"--server {url!r}: expected an http:// or https:// URL")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout_s)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise UnavailableError(
                f"cannot reach {self.url}: {exc or type(exc).__name__}"
            ) from None
        if response.status_code >= 500:
            raise UnavailableError(
                f"{self.url} answered {response.status_code}: {_message(response)}"
            )
        if response.status_code >= 400:
            raise BackendError(_message(response))
        return response.json()

    async def submit(
        self,
        ref: CanaryRef,
        kind: CommandKind,
        by: str,
        *,
        revision: str | None = None,
        weight: int | None = None,
        reason: str = "",
        fix: bool = False,
    ) -> Command:
        body: dict[str, Any] = {"reason": reason} if reason else {}
        if kind is CommandKind.PROMOTE and revision:
            body["revision"] = revision
        if kind is CommandKind.PROMOTE and fix:
            body["fix"] = True
        if kind is CommandKind.APPROVE and weight is not None:
            body["step"] = weight
        try:
            answer = await self._call(
                "POST", f"/api/v1/canaries/{ref.namespace}/{ref.name}/{kind}", json=body
            )
        except UnavailableError as exc:
            raise BackendError(str(exc)) from None
        return Command(
            id=str(answer["id"]),
            kind=kind,
            revision=answer.get("revision"),
            weight=answer.get("weight"),
            by=str(answer.get("by", "")),
            reason=reason,
        )

    async def get(self, ref: CanaryRef) -> CanaryView:
        body = await self._call("GET", f"/api/v1/canaries/{ref.namespace}/{ref.name}")
        spec = body.get("spec") or {}
        return CanaryView(
            ref,
            CanaryStatus.model_validate(body["status"]),
            tuple(body["summary"]["steps"]),
            spec.get("service"),
        )

    async def list(self, namespace: str | None) -> list[CanaryView]:
        params = {"namespace": namespace} if namespace else {}
        try:
            rows = await self._call("GET", "/api/v1/canaries", params=params)
            return [await self.get(CanaryRef(r["namespace"], r["name"])) for r in rows]
        except UnavailableError as exc:
            raise BackendError(str(exc)) from None

    async def slos(self, namespace: str | None) -> SloRows:
        params = {"namespace": namespace} if namespace else {}
        try:
            rows = await self._call("GET", "/api/v1/slos", params=params)
        except UnavailableError as exc:
            raise BackendError(str(exc)) from None
        return [dict(r) for r in rows] if isinstance(rows, list) else []

    async def shards(self) -> ShardView | None:
        """From ``/readyz`` of the replica asked (its view of the shard Leases)."""
        try:
            response = await self.http.get("/readyz")
            body = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        shards = body.get("shards") if isinstance(body, dict) else None
        if not isinstance(shards, dict) or not isinstance(shards.get("holders"), dict):
            return None
        holders = shards["holders"]
        count = int(shards.get("count") or len(holders))
        return ShardView(tuple(holders.get(str(i)) or None for i in range(count)))

    async def close(self) -> None:
        await self.http.aclose()


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return f"HTTP {response.status_code}"
