"""Stable and canary workloads as Kubernetes Deployments (the ``Workloads`` port).

Promotion (``promotion.mode: copy-to-stable``) copies the canary Deployment's pod
template into the stable Deployment, marked with the revision in the annotation
``canaryd.io/revision``; :meth:`Deployments.stable_revision` reports that revision only
once the stable Deployment has rolled it out (observedGeneration caught up, every
replica updated and available).  Rollback and the end of a promotion scale the canary
Deployment to 0.  Every write is a read-modify-write with the resourceVersion read.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from canaryd.kube import Kube
from canaryd.ports import CanaryRef, ConflictError, KubeError, NotFoundError, WorkloadError
from canaryd.spec import API_GROUP, CanarySpec

REVISION_ANNOTATION = f"{API_GROUP}/revision"
#: Replicas the canary had when canaryd scaled it to 0; restored before the next rollout.
REPLICAS_ANNOTATION = f"{API_GROUP}/replicas-before-scale-down"
TEMPLATE_HASH_LEN = 16  # hex digits of sha256 kept in status.templateHash


def _names(spec: CanarySpec) -> tuple[str, str]:
    if spec.stable is None or spec.canary is None:
        raise WorkloadError("spec.stable.deployment and spec.canary.deployment must be set")
    return spec.stable.deployment, spec.canary.deployment


def template_digest(deployment: Mapping[str, Any]) -> str:
    """A short hash (``TEMPLATE_HASH_LEN`` hex digits of sha256) of a Deployment's pod
    spec, from its JSON as the API serves it: the same from a read and from a watch."""
    pod = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    digest = hashlib.sha256(json.dumps(pod, sort_keys=True).encode()).hexdigest()
    return digest[:TEMPLATE_HASH_LEN]


def rolled_out(deployment: Any) -> bool:
    """True when a Deployment's current spec is fully rolled out and available."""
    meta, spec, status = deployment.metadata, deployment.spec, deployment.status
    if status is None or meta is None or spec is None:
        return False
    want = spec.replicas if spec.replicas is not None else 1
    return bool(
        (status.observed_generation or 0) >= (meta.generation or 0)
        and (status.updated_replicas or 0) >= want
        and (status.available_replicas or 0) >= want
        and (status.replicas or 0) <= want
    )


def _same_containers(a: Any, b: Any) -> bool:
    """True when two pod templates run the same containers (images and commands)."""
    a_spec, b_spec = getattr(a, "spec", None), getattr(b, "spec", None)
    return bool(a_spec and b_spec and a_spec.containers == b_spec.containers)


class Deployments:
    """The ``Workloads`` port on two Deployments in the Canary's namespace."""

    def __init__(self, kube: Kube, attempts: int = 5) -> None:
        self.kube = kube
        self.attempts = attempts

    async def _read(self, namespace: str, name: str) -> Any:
        try:
            return await self.kube.call(self.kube.apps.read_namespaced_deployment, name, namespace)
        except NotFoundError as exc:
            raise WorkloadError(f"Deployment {namespace}/{name} not found") from exc

    async def check(self, ref: CanaryRef, spec: CanarySpec) -> None:
        """Raise WorkloadError naming a missing Deployment."""
        for name in _names(spec):
            await self._read(ref.namespace, name)

    async def _update(self, namespace: str, name: str, change: Callable[[Any], bool]) -> None:
        """Read, ``change`` (False: nothing to do), replace with the resourceVersion read;
        on a conflict read again and retry."""
        for attempt in range(self.attempts):
            deployment = await self._read(namespace, name)
            if not change(deployment):
                return
            try:
                await self.kube.call(
                    self.kube.apps.replace_namespaced_deployment, name, namespace, deployment
                )
                return
            except ConflictError:
                await asyncio.sleep(0.05 * (attempt + 1))
        raise KubeError(f"Deployment {namespace}/{name}: too many conflicting writers")

    def _digest(self, deployment: Any) -> str:
        """sha256 (hex) of a Deployment's pod spec: what the pods run."""
        serialised = self.kube.api_client.sanitize_for_serialization(deployment.spec.template.spec)
        return hashlib.sha256(json.dumps(serialised, sort_keys=True).encode()).hexdigest()

    async def _read_json(self, namespace: str, name: str) -> dict[str, Any]:
        """A Deployment as the API sent it (JSON, not decoded into the client's models)."""
        try:
            response: Any = await self.kube.call(
                self.kube.apps.read_namespaced_deployment, name, namespace,
                _preload_content=False,
            )  # fmt: skip
        except NotFoundError as exc:
            raise WorkloadError(f"Deployment {namespace}/{name} not found") from exc
        try:
            data = json.loads(response.data)
        except ValueError as exc:
            raise WorkloadError(f"Deployment {namespace}/{name}: unreadable answer") from exc
        if not isinstance(data, dict):
            raise WorkloadError(f"Deployment {namespace}/{name}: unreadable answer")
        return data

    async def template_hash(self, ref: CanaryRef, spec: CanarySpec) -> str:
        """A short hash of the canary's pod spec (one read), recorded when a rollout
        starts; a different hash later means the analysed template was changed."""
        _, canary_name = _names(spec)
        return template_digest(await self._read_json(ref.namespace, canary_name))

    async def promote_stable(
        self, ref: CanaryRef, spec: CanarySpec, revision: str, template_hash: str | None = None
    ) -> None:
        """Copy the canary's pod template into stable (idempotent).  With
        ``template_hash``, refuse (WorkloadError) when the canary no longer runs the
        template that was analysed."""
        stable_name, canary_name = _names(spec)
        canary = await self._read(ref.namespace, canary_name)
        if template_hash is not None:
            # the digest is of the Deployment as JSON (as its watch sees it), hence the
            # raw read; the template copied is the typed read's, made just before it.
            # A change between the two reads shows in the second: refused too.
            now_hash = template_digest(await self._read_json(ref.namespace, canary_name))
            if now_hash != template_hash:
                raise WorkloadError(
                    f"not promoting: the canary's pod template is {now_hash}, not the "
                    f"{template_hash} that was analysed"
                )

        def copy_template(stable: Any) -> bool:
            annotations = dict(stable.metadata.annotations or {})
            template = copy.deepcopy(canary.spec.template)
            done = annotations.get(REVISION_ANNOTATION) == revision
            if done and _same_containers(stable.spec.template, template):
                return False
            # the stable keeps its own pod labels, so its selector still matches
            if stable.spec.template.metadata is not None and template.metadata is not None:
                template.metadata.labels = stable.spec.template.metadata.labels
            stable.spec.template = template
            annotations[REVISION_ANNOTATION] = revision
            stable.metadata.annotations = annotations
            return True

        await self._update(ref.namespace, stable_name, copy_template)

    async def stable_revision(self, ref: CanaryRef, spec: CanarySpec) -> str | None:
        """The revision stable has fully rolled out, or None while it is rolling."""
        stable_name, _ = _names(spec)
        stable = await self._read(ref.namespace, stable_name)
        if not rolled_out(stable):
            return None
        revision = (stable.metadata.annotations or {}).get(REVISION_ANNOTATION)
        return str(revision) if revision is not None else None

    async def canary_revision(self, ref: CanaryRef, spec: CanarySpec) -> str | None:
        """A revision id for the canary's pod template, or None when it runs what stable
        runs (nothing new to roll out).  For ``trigger: auto``."""
        stable_name, canary_name = _names(spec)
        canary = await self._read(ref.namespace, canary_name)
        stable = await self._read(ref.namespace, stable_name)
        if _same_containers(canary.spec.template, stable.spec.template):
            return None
        return f"auto-{self._digest(canary)[:12]}"

    async def scale_canary(self, ref: CanaryRef, spec: CanarySpec, replicas: int) -> None:
        """Scale the canary Deployment (idempotent); scaling to 0 remembers the count."""
        _, canary_name = _names(spec)

        def scale(canary: Any) -> bool:
            current = canary.spec.replicas if canary.spec.replicas is not None else 1
            if current == replicas:
                return False
            annotations = dict(canary.metadata.annotations or {})
            if replicas == 0 and current > 0:
                annotations[REPLICAS_ANNOTATION] = str(current)
            canary.metadata.annotations = annotations
            canary.spec.replicas = replicas
            return True

        await self._update(ref.namespace, canary_name, scale)

    async def canary_replicas(self, ref: CanaryRef, spec: CanarySpec) -> int:
        """The canary Deployment's desired replicas (0 once canaryd scaled it down)."""
        _, canary_name = _names(spec)
        canary = await self._read(ref.namespace, canary_name)
        return int(canary.spec.replicas if canary.spec.replicas is not None else 1)

    async def ensure_canary_ready(self, ref: CanaryRef, spec: CanarySpec) -> str | None:
        """Before traffic moves to the canary: scale it back up if canaryd scaled it to 0
        after an earlier rollout, and say why not yet while it has no available pods."""
        _, canary_name = _names(spec)
        canary = await self._read(ref.namespace, canary_name)
        want = canary.spec.replicas if canary.spec.replicas is not None else 1
        if want == 0:
            before = (canary.metadata.annotations or {}).get(REPLICAS_ANNOTATION, "1")
            restore = max(1, int(before)) if before.isdigit() else 1
            await self.scale_canary(ref, spec, restore)
            return f"scaling Deployment {canary_name} back up to {restore} before routing to it"
        available = (canary.status.available_replicas or 0) if canary.status else 0
        if available < 1:
            return f"waiting for pods of Deployment {canary_name} (0/{want} available)"
        return None
