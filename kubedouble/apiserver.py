"""A Kubernetes API server test double that speaks real HTTP, for controller and CLI tests.

:class:`KubeApiServer` listens on ``127.0.0.1`` (a free port) in a background thread and
answers the subset of the Kubernetes REST API that canaryd uses, closely enough that the
official ``kubernetes`` Python client (typed APIs, ``CustomObjectsApi``, ``Watch``,
``load_kube_config``, ``DynamicClient`` discovery) cannot tell it from a real API server::

    with KubeApiServer() as server:
        api = server.api_client()
        ...  # kubernetes.client.CustomObjectsApi(api), AppsV1Api(api), Watch().stream(...)
        api.close()

What it hides (what behaves like the real server):

* Resources, from a table of :class:`ResourceType` (add a kind in one line): apps/v1
  Deployments (``/status`` and ``/scale``), coordination.k8s.io/v1 Leases, core v1 Events
  and Namespaces, networking.istio.io VirtualServices and DestinationRules (served at v1,
  v1beta1 and v1alpha3 from one store), gateway.networking.k8s.io HTTPRoutes (v1 and
  v1beta1), apiextensions.k8s.io/v1 CRDs, and canaryd.io/v1alpha1
  Canaries (``/status``).  Namespaces need not exist first.
* Server-set metadata: ``resourceVersion`` (one global counter, like etcd's revision),
  ``uid``, ``creationTimestamp``, ``generation`` (1 on create; +1 when anything but
  ``metadata`` -- and ``status``, for kinds with a status subresource -- changes).
* Verbs: get, list, watch, create (201 / 409 AlreadyExists), update (PUT; 409 Conflict on a
  stale ``metadata.resourceVersion``, 404 when missing), patch (the ``Content-Type`` picks
  RFC 7386 merge patch, RFC 6902 JSON patch, or strategic merge patch; a stale
  ``resourceVersion`` in the patched object is a 409), delete (with DeleteOptions
  preconditions) and deletecollection.  An update or patch that changes nothing is a
  no-op, as on a real server: no new ``resourceVersion``, no watch event.
* Status subresource: ``/status`` writes change only ``.status``; main-resource writes keep
  the stored ``.status`` (and ``create`` drops it).
* A Deployment controller: after every spec change of a Deployment its status is set to a
  finished rollout (``observedGeneration``, replica counts, Available/Progressing
  conditions) in a second write, unless :meth:`KubeApiServer.freeze_rollouts` holds it.
* Errors are ``Status`` bodies with the real server's reasons, codes and wording.
* Watches (``?watch=1``): chunked newline-delimited JSON events for every write, replay
  from a retained history after a given ``resourceVersion``, ``410 Expired`` ERROR events
  for versions older than the history, synthetic ADDED events when no version is given,
  ``timeoutSeconds``, label and field selectors (objects moving in or out of a label
  selector arrive as ADDED / DELETED, like the watch cache does).
* Discovery: ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/{group}``,
  ``/apis/{group}/{version}``.
* Test hooks: fault injection (:meth:`KubeApiServer.inject`), a request log
  (:attr:`KubeApiServer.requests`), a write counter (:attr:`KubeApiServer.writes`), in-process
  accessors (:meth:`KubeApiServer.get`, :meth:`KubeApiServer.list_objects`,
  :meth:`KubeApiServer.put_raw`, :meth:`KubeApiServer.delete_raw`), forced history
  compaction (:meth:`KubeApiServer.compact`), and kubeconfig helpers.

What it does NOT implement (a client relying on these will not be tested by the double):

* Authentication, authorization, RBAC, admission (webhooks or built-in), TLS, API priority
  and fairness, audit.  Any request is allowed.  Inject 401/403/429 to test those paths.
* Schema validation and defaulting: objects are stored as sent (the only defaulting is a
  Deployment's ``spec.replicas`` = 1).  The CRD's OpenAPI schema is not enforced and
  unknown fields are kept; ``fieldValidation`` is ignored.  ``dryRun`` is refused (400)
  rather than silently persisted.
* Server-side apply (``application/apply-patch+yaml`` answers 415), ``managedFields``,
  ``fieldManager``.  Strategic merge patch is approximated: maps merge, ``null`` deletes,
  lists of objects that all have a ``name`` merge by name (``$patch: delete`` / ``replace``
  honoured), every other list is replaced; Kubernetes' other merge keys (``containerPort``,
  ``mountPath``, ``ip``...) and ``$retainKeys`` / ``$setElementOrder`` are not known.  As
  on a real server, custom resources refuse strategic merge patch with 415.
* Graceful deletion periods, owner references and garbage collection, namespace
  termination, finalizers on ``deletecollection``: delete removes an object without
  finalizers at once.  (Finalizers on a single delete are honoured: the object gets a
  ``deletionTimestamp`` and stays until an update removes the last one, and no new
  finalizer may be added meanwhile.)
* Pagination is simplified: ``limit`` / ``continue`` page through the objects in key
  order, but each page is read from the latest state (the real server serves every page
  from the first page's snapshot, or 410 once that is compacted).  ``resourceVersion`` /
  ``resourceVersionMatch`` on a list are ignored (the list is always the latest state).
  Watch bookmarks, ``sendInitialEvents``, protobuf, CBOR, YAML responses, ``Table`` output.
* Controllers other than the Deployment rollout simulation: no ReplicaSets, Pods, Services
  or Endpoints, no progress deadlines (a frozen rollout never reports
  ``ProgressDeadlineExceeded``), no HPA.  ``/scale`` exists for Deployments only.
* Conversion between versions: the Istio alias versions share one stored object and only
  ``apiVersion`` is rewritten on the way out.
* Field selectors other than ``metadata.name`` / ``metadata.namespace`` (and the Event
  fields real servers index); other fields answer 400 like a real server.

This module must not import ``canaryd``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import queue
import re
import secrets
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Self
from urllib.parse import parse_qs, unquote, urlsplit

import kubernetes.client
import yaml

__all__ = [
    "CANARIES",
    "CUSTOM_RESOURCE_DEFINITIONS",
    "DEFAULT_RESOURCES",
    "DEPLOYMENTS",
    "DESTINATION_RULES",
    "EVENTS",
    "HTTP_ROUTES",
    "JSON_PATCH",
    "KUBECONFIG_NAME",
    "LEASES",
    "MERGE_PATCH",
    "NAMESPACES",
    "STRATEGIC_MERGE_PATCH",
    "VIRTUAL_SERVICES",
    "ApiError",
    "Fault",
    "KubeApiServer",
    "PatchError",
    "RequestRecord",
    "ResourceType",
    "WriteRecord",
    "json_patch",
    "merge_patch",
    "parse_label_selector",
    "strategic_merge_patch",
]

Obj = dict[str, Any]

MERGE_PATCH: Final = "application/merge-patch+json"
JSON_PATCH: Final = "application/json-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"
APPLY_PATCH: Final = "application/apply-patch+yaml"
#: The cluster, context and user name in :meth:`KubeApiServer.kube_config_dict`.
KUBECONFIG_NAME: Final = "kubeapi-double"

_WRITE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_ALL_VERBS: Final = ("create", "delete", "deletecollection", "get", "list", "patch", "update")
_SERVER_METADATA: Final = (
    "name", "namespace", "uid", "creationTimestamp", "generation",
    "deletionTimestamp", "deletionGracePeriodSeconds",
)  # fmt: skip


@dataclass(frozen=True)
class ResourceType:
    """One kind the double serves; the table of these is the whole API surface."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    scale_subresource: bool = False
    #: built-in kinds accept strategic merge patch; custom resources answer 415
    strategic_merge: bool = False
    #: DELETE answers with the deleted object (custom resources) instead of a Status
    delete_returns_object: bool = False
    #: further versions served from the same store (only ``apiVersion`` differs)
    extra_versions: tuple[str, ...] = ()
    #: field-selector labels besides ``metadata.name`` and ``metadata.namespace``
    field_labels: tuple[str, ...] = ()
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return self.api_version_for(self.version)

    def api_version_for(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    @property
    def versions(self) -> tuple[str, ...]:
        return (self.version, *self.extra_versions)

    @property
    def resource(self) -> str:
        """``plural.group`` as the API server names it in messages (``deployments.apps``)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


DEPLOYMENTS: Final = ResourceType(
    "apps", "v1", "deployments", "Deployment",
    status_subresource=True, scale_subresource=True, strategic_merge=True, short_names=("deploy",),
)  # fmt: skip
LEASES: Final = ResourceType("coordination.k8s.io", "v1", "leases", "Lease", strategic_merge=True)
EVENTS: Final = ResourceType(
    "", "v1", "events", "Event", strategic_merge=True, short_names=("ev",),
    field_labels=(
        "involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
        "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
        "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type",
    ),
)  # fmt: skip
NAMESPACES: Final = ResourceType(
    "", "v1", "namespaces", "Namespace",
    namespaced=False, status_subresource=True, strategic_merge=True, short_names=("ns",),
)  # fmt: skip
VIRTUAL_SERVICES: Final = ResourceType(
    "networking.istio.io", "v1", "virtualservices", "VirtualService",
    status_subresource=True, delete_returns_object=True,
    extra_versions=("v1beta1", "v1alpha3"), short_names=("vs",),
)  # fmt: skip
DESTINATION_RULES: Final = ResourceType(
    "networking.istio.io", "v1", "destinationrules", "DestinationRule",
    status_subresource=True, delete_returns_object=True,
    extra_versions=("v1beta1", "v1alpha3"), short_names=("dr",),
)  # fmt: skip
HTTP_ROUTES: Final = ResourceType(
    "gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute",
    status_subresource=True, delete_returns_object=True, extra_versions=("v1beta1",),
)  # fmt: skip
CANARIES: Final = ResourceType(
    "canaryd.io", "v1alpha1", "canaries", "Canary",
    status_subresource=True, delete_returns_object=True, short_names=("can",),
)  # fmt: skip
CUSTOM_RESOURCE_DEFINITIONS: Final = ResourceType(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
    namespaced=False, status_subresource=True, strategic_merge=True, short_names=("crd", "crds"),
)  # fmt: skip

DEFAULT_RESOURCES: Final[tuple[ResourceType, ...]] = (
    DEPLOYMENTS,
    LEASES,
    EVENTS,
    NAMESPACES,
    VIRTUAL_SERVICES,
    DESTINATION_RULES,
    HTTP_ROUTES,
    CANARIES,
    CUSTOM_RESOURCE_DEFINITIONS,
)


# --------------------------------------------------------------------------------------
# Errors, as the API server words them


class ApiError(Exception):
    """A failure answered as a ``Status`` body."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body


def _details(rt: ResourceType, name: str, **extra: Any) -> Obj:
    details: Obj = {"name": name}
    if rt.group:
        details["group"] = rt.group
    details["kind"] = rt.plural
    details.update(extra)
    return details


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.resource} "{name}" not found', _details(rt, name))


def _already_exists(rt: ResourceType, name: str) -> ApiError:
    message = f'{rt.resource} "{name}" already exists'
    return ApiError(409, "AlreadyExists", message, _details(rt, name))


_MODIFIED: Final = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def _conflict(rt: ResourceType, name: str, why: str = _MODIFIED) -> ApiError:
    message = f'Operation cannot be fulfilled on {rt.resource} "{name}": {why}'
    return ApiError(409, "Conflict", message, _details(rt, name))


def _invalid(rt: ResourceType, name: str, message: str, causes: Sequence[Obj] = ()) -> ApiError:
    details = _details(rt, name, kind=rt.kind)
    if causes:
        details["causes"] = list(causes)
    return ApiError(422, "Invalid", message, details)


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _path_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def _method_not_allowed() -> ApiError:
    message = "the server does not allow this method on the requested resource"
    return ApiError(405, "MethodNotAllowed", message, {})


def _unsupported_media(accepted: Iterable[str]) -> ApiError:
    message = (
        "the body of the request was in an unknown format - accepted media types include: "
        + ", ".join(accepted)
    )
    return ApiError(415, "UnsupportedMediaType", message)


def _internal(message: str) -> ApiError:
    return ApiError(500, "InternalError", f"Internal error occurred: {message}", {})


_FAULT_DEFAULTS: Final[Mapping[int, tuple[str, str]]] = {
    400: ("BadRequest", "the server rejected our request for an unknown reason"),
    401: ("Unauthorized", "Unauthorized"),
    403: ("Forbidden", "forbidden: injected fault"),
    404: ("NotFound", "the server could not find the requested resource"),
    405: ("MethodNotAllowed", "the server does not allow this method on the requested resource"),
    409: ("Conflict", f"Operation cannot be fulfilled: {_MODIFIED}"),
    410: ("Expired", "too old resource version"),
    422: ("Invalid", "the server rejected our request due to an error in our request"),
    429: ("TooManyRequests", "the server has received too many requests and has asked us to try "
          "again later"),
    500: ("InternalError", "Internal error occurred: injected fault"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    504: ("Timeout", "the server was unable to return a response in the time allotted, but may "
          "still be processing the request"),
}  # fmt: skip


# --------------------------------------------------------------------------------------
# Selectors

_KEY: Final = r"[A-Za-z0-9][A-Za-z0-9._/-]*"
_VALUE: Final = r"[A-Za-z0-9._-]*"
_SET_TERM: Final = re.compile(rf"({_KEY})\s+(in|notin)\s*\(([^()]*)\)")
_EQ_TERM: Final = re.compile(rf"({_KEY})\s*(==|!=|=)\s*({_VALUE})")
_NOT_EXISTS_TERM: Final = re.compile(rf"!\s*({_KEY})")
_EXISTS_TERM: Final = re.compile(_KEY)


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        match self.op:
            case "=" | "in":
                return value is not None and value in self.values
            case "!=" | "notin":
                return value is None or value not in self.values
            case "exists":
                return value is not None
            case _:
                return value is None


def _split_terms(text: str) -> list[str]:
    terms: list[str] = []
    depth = start = 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(text[start:i].strip())
            start = i + 1
    terms.append(text[start:].strip())
    return terms


def parse_label_selector(text: str | None) -> tuple[_Requirement, ...]:
    """Equality (``a=b``, ``a==b``, ``a!=b``), set (``a in (x,y)``, ``a notin (x)``) and
    existence (``a``, ``!a``) requirements, comma-separated.  Raises :class:`ApiError` 400."""
    if text is None or not text.strip():
        return ()
    requirements = []
    for term in _split_terms(text):
        if m := _SET_TERM.fullmatch(term):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            requirements.append(_Requirement(m.group(1), m.group(2), values))
        elif m := _EQ_TERM.fullmatch(term):
            op = "=" if m.group(2) == "==" else m.group(2)
            requirements.append(_Requirement(m.group(1), op, frozenset({m.group(3)})))
        elif m := _NOT_EXISTS_TERM.fullmatch(term):
            requirements.append(_Requirement(m.group(1), "!exists"))
        elif _EXISTS_TERM.fullmatch(term):
            requirements.append(_Requirement(term, "exists"))
        else:
            raise _bad_request(f"unable to parse requirement: found '{term}' in '{text}'")
    return tuple(requirements)


def _parse_field_selector(text: str | None, rt: ResourceType) -> tuple[tuple[str, str, str], ...]:
    if text is None or not text.strip():
        return ()
    allowed = {"metadata.name", "metadata.namespace", *rt.field_labels}
    terms = []
    for term in _split_terms(text):
        m = re.fullmatch(r"([A-Za-z0-9._]+)\s*(==|!=|=)\s*(.*)", term)
        if m is None:
            raise _bad_request(f"invalid field selector: '{term}'")
        if m.group(1) not in allowed:
            raise _bad_request(f'field label not supported: "{m.group(1)}"')
        terms.append((m.group(1), "=" if m.group(2) == "==" else m.group(2), m.group(3).strip()))
    return tuple(terms)


def _field_value(obj: Obj, dotted: str) -> str:
    node: Any = obj
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return ""
    return node if isinstance(node, str) else json.dumps(node)


@dataclass(frozen=True)
class _Filter:
    labels: tuple[_Requirement, ...] = ()
    fields: tuple[tuple[str, str, str], ...] = ()

    def matches(self, obj: Obj) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if not all(req.matches(labels) for req in self.labels):
            return False
        for path, op, value in self.fields:
            if (_field_value(obj, path) == value) != (op == "="):
                return False
        return True


def _key_of(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta["name"]))


@dataclass(frozen=True)
class _Page:
    """``limit`` and ``continue`` of a list request."""

    limit: int | None
    after: tuple[str, str] | None  # the key of the previous page's last object

    @classmethod
    def of(cls, params: Mapping[str, str]) -> _Page:
        limit: int | None = None
        if params.get("limit"):
            try:
                limit = int(params["limit"])
            except ValueError:
                raise _bad_request(f"limit must be an integer: {params['limit']!r}") from None
            limit = limit if limit > 0 else None  # 0: no limit, as on a real server
        after = None
        token = params.get("continue")
        if token:
            try:
                data = json.loads(base64.urlsafe_b64decode(token.encode()))
                after = (str(data["after"][0]), str(data["after"][1]))
            except (ValueError, KeyError, IndexError, TypeError):
                raise _bad_request("continue key is not valid") from None
        return cls(limit, after)

    @staticmethod
    def token(after: tuple[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps({"after": list(after)}).encode()).decode()


# --------------------------------------------------------------------------------------
# Patches


class PatchError(Exception):
    """A JSON patch operation could not apply (the server answers 422)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new document."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _is_named_list(items: list[Any]) -> bool:
    return bool(items) and all(
        isinstance(i, dict) and isinstance(i.get("name"), str) for i in items
    )


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Kubernetes strategic merge patch, approximated: a merge patch in which lists of
    objects that all carry ``name`` merge item by item on ``name``."""
    if not isinstance(patch, dict):
        return _strip_directives(copy.deepcopy(patch))
    if patch.get("$patch") == "replace":
        return _strip_directives(copy.deepcopy(patch))
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif isinstance(value, list) and _is_named_list(value):
            current = result.get(key)
            result[key] = _merge_named_list(current if isinstance(current, list) else [], value)
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _merge_named_list(current: list[Any], patch: list[Obj]) -> list[Any]:
    if any(item.get("$patch") == "replace" for item in patch):
        return [_strip_directives(i) for i in patch if i.get("$patch") != "replace"]
    merged = copy.deepcopy(current)
    for item in patch:
        names = [old.get("name") if isinstance(old, dict) else None for old in merged]
        index = names.index(item["name"]) if item["name"] in names else None
        if item.get("$patch") == "delete":
            if index is not None:
                del merged[index]
        elif index is None:
            merged.append(strategic_merge_patch(None, item))
        else:
            merged[index] = strategic_merge_patch(merged[index], item)
    return merged


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise PatchError(f"invalid JSON pointer: {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]] if path else []


def _index(container: list[Any], token: str, *, allow_end: bool) -> int:
    if allow_end and token == "-":
        return len(container)
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        raise PatchError(f"invalid array index: {token!r}")
    index = int(token)
    if index > len(container) or (index == len(container) and not allow_end):
        raise PatchError(f"array index out of range: {index}")
    return index


def _resolve(doc: Any, tokens: list[str]) -> Any:
    node = doc
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"missing key: {token!r}")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, allow_end=False)]
        else:
            raise PatchError(f"cannot descend into a scalar at {token!r}")
    return node


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _resolve(doc, tokens[:-1])
    if isinstance(parent, dict):
        parent[tokens[-1]] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, tokens[-1], allow_end=True), value)
    else:
        raise PatchError("cannot add to a scalar")
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _resolve(doc, tokens[:-1])
    if isinstance(parent, dict):
        if tokens[-1] not in parent:
            raise PatchError(f"missing key: {tokens[-1]!r}")
        return parent.pop(tokens[-1])
    if isinstance(parent, list):
        return parent.pop(_index(parent, tokens[-1], allow_end=False))
    raise PatchError("cannot remove from a scalar")


def json_patch(doc: Any, operations: list[Any]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test) on a copy of ``doc``.
    Raises :class:`PatchError` when an operation cannot apply or a ``test`` fails."""
    doc = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise PatchError(f"invalid operation: {op!r}")
        kind, path = op["op"], _pointer(op.get("path"))
        if kind in {"add", "replace", "test"} and "value" not in op:
            raise PatchError(f"operation {kind} needs a value")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            if path:
                _remove(doc, path)
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "test":
            if not _json_equal(_resolve(doc, path), op["value"]):
                raise PatchError(f"testing value {op.get('path')} failed")
        elif kind in {"move", "copy"}:
            source = _pointer(op.get("from"))
            if kind == "move" and path[: len(source)] == source and path != source:
                raise PatchError("cannot move a value into one of its children")
            value = _remove(doc, source) if kind == "move" else copy.deepcopy(_resolve(doc, source))
            doc = _add(doc, path, value)
        else:
            raise PatchError(f"unexpected kind: {kind!r}")
    return doc


# --------------------------------------------------------------------------------------
# Routing


@dataclass(frozen=True)
class _Route:
    rt: ResourceType
    version: str
    namespace: str | None  # None: all namespaces (namespaced kinds) or cluster-scoped
    name: str | None
    subresource: str | None
    watch_prefix: bool = False

    @property
    def key_namespace(self) -> str:
        return (self.namespace or "") if self.rt.namespaced else ""

    def verb(self, method: str, params: Mapping[str, str]) -> str:
        watch = self.watch_prefix or _truthy(params.get("watch"))
        if method == "GET":
            return "watch" if watch else ("get" if self.name else "list")
        if method == "DELETE":
            return "delete" if self.name else "deletecollection"
        return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def _given(value: Any, current: str) -> bool:
    """True when a precondition ``value`` is set and differs from ``current``."""
    return value not in (None, "") and str(value) != current


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in {"1", "true", "yes"}


class RequestRecord(NamedTuple):
    """One request the double received (path without the query string)."""

    method: str
    path: str
    content_type: str | None


class WriteRecord(NamedTuple):
    """One successful write, in the order the double applied them (its audit log).

    ``path`` has no name on a create: ``name`` is the object's; ``agent`` is the
    client's ``User-Agent`` (who wrote); ``holder`` is a Lease's ``spec.holderIdentity``
    after the write (None for other kinds, or no holder)."""

    method: str
    path: str
    name: str | None
    agent: str | None
    holder: str | None


def writes_by_non_holders(
    log: Iterable[WriteRecord],
    lease: re.Pattern[str],
    target: re.Pattern[str],
    shard_of: Callable[[str], int],
) -> tuple[int, list[str]]:
    """Sharded writers' audit: ``(writes to a shard's objects, those by a non-holder)``.

    A Lease write whose name matches ``lease`` (group 1: the shard number) sets that
    shard's holder (a DELETE clears it); any other write whose path matches ``target``
    (group 1: the object's name, mapped to its shard by ``shard_of``) by an agent whose
    ``User-Agent`` names it in parentheses must come from that shard's holder as of the
    last Lease write before it.  Writes by agents that name no one are not counted."""
    holder: dict[int, str | None] = {}
    total, bad = 0, []
    for n, record in enumerate(log):
        agent = re.search(r"\((\w+)\)", record.agent or "")
        who = agent.group(1) if agent else None
        held = lease.match(record.name or "") if "/leases" in record.path else None
        if held:
            holder[int(held.group(1))] = record.holder if record.method != "DELETE" else None
        elif who is not None and (hit := target.search(record.path)):
            total += 1
            shard = shard_of(hit.group(1))
            if holder.get(shard) != who:
                bad.append(
                    f"#{n} {record.method} {record.path} by {who}, holder {holder.get(shard)}"
                )
    return total, bad


@dataclass
class Fault:
    """An injected failure: the next ``times`` matching requests get ``status``."""

    verb: str | None
    path_contains: str | None
    status: int
    times: int
    message: str | None = None
    hits: int = 0

    def matches(self, method: str, verb: str | None, raw_path: str) -> bool:
        if self.times <= 0:
            return False
        if self.verb is not None and self.verb.upper() != method and self.verb.lower() != verb:
            return False
        return self.path_contains is None or self.path_contains in raw_path


@dataclass(frozen=True)
class _Change:
    rv: int
    rt: ResourceType
    namespace: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    old: Obj | None


@dataclass
class _Watcher:
    rt: ResourceType
    namespace: str | None
    version: str
    filter: _Filter
    queue: queue.SimpleQueue[_Change | None] = field(default_factory=queue.SimpleQueue)

    def wants(self, change: _Change) -> bool:
        return change.rt == self.rt and self.namespace in (None, change.namespace)

    def render(self, change: _Change) -> Obj | None:
        """The event this watcher sees for ``change``, or None (label transitions become
        ADDED/DELETED, as the API server's watch cache reports them)."""
        now = self.filter.matches(change.obj)
        if change.type == "MODIFIED":
            before = change.old is not None and self.filter.matches(change.old)
            kind = {(True, True): "MODIFIED", (False, True): "ADDED", (True, False): "DELETED"}
            event_type = kind.get((before, now))
        else:
            event_type = change.type if now else None
        if event_type is None:
            return None
        return {"type": event_type, "object": _present(self.rt, change.obj, self.version)}


@dataclass
class _Reply:
    code: int
    body: Obj


@dataclass
class _WatchPlan:
    watcher: _Watcher | None
    initial: list[Obj]
    deadline: float | None


def _present(rt: ResourceType, obj: Obj, version: str) -> Obj:
    if version == rt.version or "apiVersion" not in obj:
        return obj
    return {**obj, "apiVersion": rt.api_version_for(version)}


def _selector_string(obj: Obj) -> str:
    match_labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))


# --------------------------------------------------------------------------------------
# The HTTP layer


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], double: KubeApiServer) -> None:
        self.double = double
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        if isinstance(request, socket.socket):
            with self._connections_lock:
                self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        if isinstance(request, socket.socket):
            with self._connections_lock:
                self._connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Unblock every handler thread parked on a keep-alive connection."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away
            return
        self.double._record_internal_error(traceback.format_exc())


#: On stop, how long open watches get to end their streams cleanly, seconds.
_STOP_WATCHES_S = 1.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle's algorithm and
        # the client's delayed ACK add 40 ms to every response
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        outcome = self.server.double._handle(
            method, self.path, self.headers.get("Content-Type"), body,
            self.headers.get("User-Agent"),
        )  # fmt: skip
        if isinstance(outcome, _WatchPlan):
            self._stream(outcome)
        else:
            data = json.dumps(outcome.body).encode()
            self.send_response(outcome.code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def _chunk(self, event: Obj) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _stream(self, plan: _WatchPlan) -> None:
        self.close_connection = True
        double = self.server.double
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache, private")
            self.end_headers()
            while (
                double.watches_stalled.is_set()
                and not double._stopping
                and (plan.deadline is None or time.monotonic() < plan.deadline)
            ):  # stalled from the start: not even the replay of what it missed
                time.sleep(0.05)
            if double.watches_stalled.is_set():
                plan = _WatchPlan(plan.watcher, [], plan.deadline)
            for event in plan.initial:
                self._chunk(event)
            watcher = plan.watcher
            while watcher is not None:
                wait = 0.2
                if plan.deadline is not None:
                    wait = min(wait, plan.deadline - time.monotonic())
                    if wait <= 0:
                        break
                if double._stopping:
                    break
                if double.watches_stalled.is_set():  # open, silent: events stay queued
                    time.sleep(wait)
                    continue
                try:
                    change = watcher.queue.get(timeout=wait)
                except queue.Empty:
                    if self._client_gone():
                        break
                    continue
                if change is None:  # the server is stopping
                    break
                if (rendered := watcher.render(change)) is not None:
                    self._chunk(rendered)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            if plan.watcher is not None:
                double._unsubscribe(plan.watcher)


# --------------------------------------------------------------------------------------
# The double


class KubeApiServer:
    """An in-memory Kubernetes API server on ``127.0.0.1``; see the module docstring.

    ``with KubeApiServer() as server:`` starts and stops it; so do :meth:`start` and
    :meth:`stop`.  ``history_limit`` is how many writes watches can replay (older
    ``resourceVersion`` values get ``410 Expired``); ``clock`` gives timestamps (epoch s).
    """

    def __init__(
        self,
        *,
        resources: Sequence[ResourceType] = DEFAULT_RESOURCES,
        history_limit: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be at least 1")
        self._resources = tuple(resources)
        self._by_path: dict[tuple[str, str, str], ResourceType] = {}
        for rt in self._resources:
            for version in rt.versions:
                self._by_path[(rt.group, version, rt.plural)] = rt
        self._clock = clock
        self._lock = threading.RLock()
        self._objects: dict[ResourceType, dict[tuple[str, str], Obj]] = {
            rt: {} for rt in self._resources
        }
        self._rv = 0
        self._history: deque[_Change] = deque(maxlen=history_limit)
        self._compacted_rv = 0
        self._watchers: list[_Watcher] = []
        self._faults: list[Fault] = []
        self._requests: list[RequestRecord] = []
        self._writes = 0
        self._write_log: list[WriteRecord] = []
        self._frozen_all = False
        self._frozen: set[tuple[str | None, str]] = set()
        self._stopping = False
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.internal_errors: list[str] = []
        """Tracebacks of bugs in the double itself (answered as 500s); tests may assert empty."""
        self.watches_stalled = threading.Event()
        """While set, open watch streams stay open but deliver nothing (a silently stalled
        connection); what they missed follows when it is cleared."""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        if self._httpd is not None:
            raise RuntimeError("already started")
        self._stopping = False
        self._httpd = _HttpServer(("127.0.0.1", 0), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="kubeapi-double",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: open watches end at once, keep-alive connections are closed."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        with self._lock:
            self._stopping = True
            for watcher in self._watchers:
                watcher.queue.put(None)
        httpd.shutdown()
        # let every watch write its stream's last chunk before the sockets go: dropped
        # first, a client on a loaded machine read "response ended prematurely"
        deadline = time.monotonic() + _STOP_WATCHES_S
        while time.monotonic() < deadline:
            with self._lock:
                if not self._watchers:
                    break
            time.sleep(0.005)
        httpd.drop_connections()
        httpd.server_close()  # joins the handler threads
        thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- client helpers ----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not running")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kube_config_dict(self, namespace: str = "default") -> Obj:
        """A kubeconfig (cluster, context and user all named ``kubeapi-double``, no auth)."""
        name = KUBECONFIG_NAME
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": {"server": self.url}}],
            "users": [{"name": name, "user": {}}],
            "contexts": [
                {"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}
            ],
            "current-context": name,
            "preferences": {},
        }

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.kube_config_dict(namespace), sort_keys=False))
        return path

    def api_client(self) -> kubernetes.client.ApiClient:
        """A client for this server; the caller closes it (``api_client.close()``)."""
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        return kubernetes.client.ApiClient(configuration)

    # -- test hooks --------------------------------------------------------------------

    def inject(
        self,
        *,
        verb: str | None = None,
        path_contains: str | None = None,
        status: int = 500,
        times: int = 1,
        message: str | None = None,
    ) -> Fault:
        """Fail the next ``times`` requests whose HTTP method or Kubernetes verb
        (get, list, watch, create, update, patch, delete, deletecollection) is ``verb`` and
        whose path (with query) contains ``path_contains``, with a ``Status`` of ``status``.
        A 409 reads like a conflicting writer's; the request has no other effect."""
        if status not in _FAULT_DEFAULTS:
            raise ValueError(f"no Status reason known for {status}: {sorted(_FAULT_DEFAULTS)}")
        fault = Fault(verb, path_contains, status, times, message)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def writes(self) -> int:
        """Successful (2xx) POST/PUT/PATCH/DELETE requests, no-op updates included."""
        with self._lock:
            return self._writes

    @property
    def write_log(self) -> list[WriteRecord]:
        """Every successful write so far, in the order applied (a copy)."""
        with self._lock:
            return list(self._write_log)

    def clear_log(self) -> None:
        """Forget the request and write logs and reset the write counter."""
        with self._lock:
            self._requests.clear()
            self._write_log.clear()
            self._writes = 0

    @property
    def resource_version(self) -> int:
        """The latest resourceVersion handed out."""
        with self._lock:
            return self._rv

    @property
    def open_watches(self) -> int:
        with self._lock:
            return len(self._watchers)

    def wait_for_watches(self, count: int = 1, timeout: float = 5.0) -> None:
        """Block until at least ``count`` watches are open (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        while self.open_watches < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.open_watches} watches open, wanted {count}")
            time.sleep(0.005)

    def compact(self) -> None:
        """Drop the watch history, like etcd compaction: a watch from any resourceVersion
        older than the current one gets ``410 Expired``."""
        with self._lock:
            self._history.clear()
            self._compacted_rv = self._rv

    def freeze_rollouts(
        self, frozen: bool = True, *, namespace: str | None = None, name: str | None = None
    ) -> None:
        """Hold (or release) the simulated Deployment controller: while held, spec changes
        leave ``status.observedGeneration`` behind.  Without ``name``, for every Deployment
        (unfreezing without a name releases all).  Released Deployments finish at once."""
        with self._lock:
            if name is None:
                self._frozen_all = frozen
                if not frozen:
                    self._frozen.clear()
            elif frozen:
                self._frozen.add((namespace, name))
            else:
                self._frozen.discard((namespace, name))
            if not frozen:
                for rt in self._resources:
                    if self._is_deployment(rt):
                        for ns, obj_name in list(self._objects[rt]):
                            self._roll_out(rt, ns, obj_name)

    # -- in-process accessors ----------------------------------------------------------

    def _type(self, group: str, version: str, plural: str) -> ResourceType:
        try:
            return self._by_path[(group, version, plural)]
        except KeyError:
            raise KeyError(f"the double does not serve {group}/{version} {plural}") from None

    def get(
        self, group: str, version: str, plural: str, namespace: str | None, name: str
    ) -> Obj | None:
        """A deep copy of the stored object, or None."""
        rt = self._type(group, version, plural)
        with self._lock:
            obj = self._objects[rt].get(((namespace or "") if rt.namespaced else "", name))
            return None if obj is None else copy.deepcopy(_present(rt, obj, version))

    def list_objects(
        self, group: str, version: str, plural: str, namespace: str | None = None
    ) -> list[Obj]:
        """Deep copies of the stored objects (all namespaces when ``namespace`` is None)."""
        rt = self._type(group, version, plural)
        with self._lock:
            return [
                copy.deepcopy(_present(rt, obj, version))
                for (ns, _), obj in sorted(self._objects[rt].items())
                if namespace is None or ns == namespace
            ]

    def put_raw(self, group: str, version: str, plural: str, obj: Obj) -> Obj:
        """Store ``obj`` as given (status included, no generation logic, no simulated
        controller), filling only missing metadata (namespace ``default``, uid,
        creationTimestamp, generation 1); it gets a new resourceVersion and watches see it
        (ADDED or MODIFIED).  Returns a copy of what was stored."""
        rt = self._type(group, version, plural)
        new = copy.deepcopy(obj)
        meta = new.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError("put_raw needs metadata.name")
        new.setdefault("apiVersion", rt.api_version)
        new.setdefault("kind", rt.kind)
        if rt.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", self._timestamp())
        meta.setdefault("generation", 1)
        ns = meta.get("namespace", "")
        with self._lock:
            exists = (ns, meta["name"]) in self._objects[rt]
            committed = self._commit(rt, ns, meta["name"], new, "MODIFIED" if exists else "ADDED")
            return copy.deepcopy(committed)

    def delete_raw(
        self, group: str, version: str, plural: str, namespace: str | None, name: str
    ) -> bool:
        """Delete without API semantics (watches see DELETED); False when absent."""
        rt = self._type(group, version, plural)
        ns = (namespace or "") if rt.namespaced else ""
        with self._lock:
            current = self._objects[rt].get((ns, name))
            if current is None:
                return False
            self._commit(rt, ns, name, copy.deepcopy(current), "DELETED")
            return True

    # -- request handling --------------------------------------------------------------

    def _record_internal_error(self, text: str) -> None:
        with self._lock:
            self.internal_errors.append(text)

    def _handle(
        self,
        method: str,
        raw_path: str,
        content_type: str | None,
        body: bytes,
        agent: str | None = None,
    ) -> _Reply | _WatchPlan:
        parts = urlsplit(raw_path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        media = content_type.split(";")[0].strip().lower() if content_type else None
        with self._lock:
            self._requests.append(RequestRecord(method, parts.path, media))
        try:
            route: _Route | Obj | None = None
            route_error: ApiError | None = None
            try:
                route = self._route(parts.path)
            except ApiError as error:
                route_error = error
            verb = route.verb(method, params) if isinstance(route, _Route) else None
            self._raise_fault(method, verb, raw_path, route)
            if route_error is not None:
                raise route_error
            if not isinstance(route, _Route):
                if method != "GET":
                    raise _method_not_allowed()
                return _Reply(200, route or {})
            outcome = self._execute(route, method, params, media, body)
            if method in _WRITE_METHODS and isinstance(outcome, _Reply):
                holder, name = None, route.name
                if isinstance(outcome.body, dict) and outcome.body.get("kind") != "Status":
                    name = (outcome.body.get("metadata") or {}).get("name") or name
                    if route.rt is LEASES:
                        holder = (outcome.body.get("spec") or {}).get("holderIdentity")
                with self._lock:
                    self._writes += 1
                    self._write_log.append(WriteRecord(method, parts.path, name, agent, holder))
            return outcome
        except ApiError as error:
            return _Reply(error.code, error.status())
        except Exception as error:  # a bug in the double: say so loudly
            self._record_internal_error(traceback.format_exc())
            return _Reply(500, _internal(f"kubeapi double: {error!r}").status())

    def _raise_fault(
        self, method: str, verb: str | None, raw_path: str, route: _Route | Obj | None
    ) -> None:
        with self._lock:
            fault = next((f for f in self._faults if f.matches(method, verb, raw_path)), None)
            if fault is None:
                return
            fault.times -= 1
            fault.hits += 1
        reason, message = _FAULT_DEFAULTS[fault.status]
        error = ApiError(fault.status, reason, message)
        if isinstance(route, _Route) and route.name is not None:
            if fault.status == 409:
                error = _conflict(route.rt, route.name)
            elif fault.status == 404:
                error = _not_found(route.rt, route.name)
            else:
                error.details = _details(route.rt, route.name)
        if fault.message is not None:
            error.message = fault.message
        raise error

    def _route(self, path: str) -> _Route | Obj:
        segments = [unquote(s) for s in path.split("/") if s]
        if segments == ["version"]:
            return self._version_info()
        if not segments or segments[0] not in {"api", "apis"}:
            raise _path_not_found()
        if segments[0] == "api":
            if len(segments) == 1:
                return self._api_versions()
            group, version, rest = "", segments[1], segments[2:]
        else:
            if len(segments) == 1:
                return self._group_list()
            if len(segments) == 2:
                return {"kind": "APIGroup", "apiVersion": "v1", **self._group(segments[1])}
            group, version, rest = segments[1], segments[2], segments[3:]
        if not rest:
            return self._resource_list(group, version)
        watch_prefix = rest[0] == "watch"
        if watch_prefix:
            rest = rest[1:]
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            candidate = self._by_path.get((group, version, rest[2]))
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise _path_not_found()
        rt = self._by_path.get((group, version, rest[0]))
        if rt is None or (rt.namespaced and namespace is None and len(rest) > 1):
            raise _path_not_found()
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        allowed = {"status"} if rt.status_subresource else set()
        if rt.scale_subresource:
            allowed.add("scale")
        if sub is not None and sub not in allowed:
            raise _path_not_found()
        return _Route(rt, version, namespace, name, sub, watch_prefix)

    def _execute(
        self,
        route: _Route,
        method: str,
        params: Mapping[str, str],
        media: str | None,
        body: bytes,
    ) -> _Reply | _WatchPlan:
        rt, ns, name, version = route.rt, route.key_namespace, route.name, route.version
        if "dryRun" in params:
            raise _bad_request("dryRun is not supported by the kubeapi test double")

        def reply(code: int, obj: Obj) -> _Reply:
            return _Reply(code, _present(rt, obj, version))

        if name is None:
            query = _Filter(
                parse_label_selector(params.get("labelSelector")),
                _parse_field_selector(params.get("fieldSelector"), rt),
            )
            scope = route.namespace if rt.namespaced else None
            if method == "GET":
                if route.verb(method, params) == "watch":
                    return self._open_watch(route, scope, query, params)
                page = _Page.of(params)
                return _Reply(200, self._list(rt, scope, query, version, page))
            if method == "POST" and (route.namespace is not None or not rt.namespaced):
                return reply(201, self._create(rt, ns, _decode_object(body, media)))
            if method == "DELETE":
                return _Reply(200, self._delete_collection(rt, scope, query, version))
            raise _method_not_allowed()

        if method == "GET" and route.verb(method, params) == "watch":
            query = _Filter(fields=(("metadata.name", "=", name),))
            return self._open_watch(route, route.namespace, query, params)
        if route.subresource == "scale":
            if method == "GET":
                return _Reply(200, self._scale_of(self._require(rt, ns, name)))
            if method == "PUT":
                return _Reply(200, self._update_scale(rt, ns, name, _decode_object(body, media)))
            if method == "PATCH":
                return _Reply(200, self._patch(rt, ns, name, body, media, "scale"))
            raise _method_not_allowed()
        if method == "GET":
            return reply(200, self._require(rt, ns, name))
        if method == "PUT":
            obj = _decode_object(body, media)
            with self._lock:
                return reply(200, self._replace(rt, ns, name, obj, route.subresource))
        if method == "PATCH":
            return reply(200, self._patch(rt, ns, name, body, media, route.subresource))
        if method == "DELETE" and route.subresource is None:
            options = _decode_object(body, media) if body.strip() else {}
            return _Reply(200, self._delete(rt, ns, name, options, version))
        raise _method_not_allowed()

    # -- discovery ---------------------------------------------------------------------

    def _version_info(self) -> Obj:
        return {
            "major": "1",
            "minor": "31",
            "gitVersion": "v1.31.0-kubeapi-double",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2024-01-01T00:00:00Z",
            "goVersion": "go1.22.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    def _api_versions(self) -> Obj:
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}
            ],
        }

    def _group(self, group: str) -> Obj:
        versions: list[str] = []
        for rt in self._resources:
            if rt.group == group and group:
                versions.extend(v for v in rt.versions if v not in versions)
        if not versions:
            raise _path_not_found()
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    def _group_list(self) -> Obj:
        groups = list(dict.fromkeys(rt.group for rt in self._resources if rt.group))
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [self._group(g) for g in groups],
        }

    def _resource_list(self, group: str, version: str) -> Obj:
        resources: list[Obj] = []
        for rt in self._resources:
            if rt.group != group or version not in rt.versions:
                continue
            entry: Obj = {
                "name": rt.plural,
                "singularName": rt.kind.lower(),
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": [*_ALL_VERBS, "watch"],
            }
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            resources.append(entry)
            sub_verbs = ["get", "patch", "update"]
            base = {"singularName": "", "namespaced": rt.namespaced, "verbs": sub_verbs}
            if rt.status_subresource:
                resources.append({"name": f"{rt.plural}/status", "kind": rt.kind, **base})
            if rt.scale_subresource:
                resources.append(
                    {"name": f"{rt.plural}/scale", "group": "autoscaling", "version": "v1",
                     "kind": "Scale", **base}
                )  # fmt: skip
        if not resources:
            raise _path_not_found()
        group_version = f"{group}/{version}" if group else version
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }

    # -- the store (callers hold no lock; every method below takes it) -----------------

    def _timestamp(self) -> str:
        return datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _require(self, rt: ResourceType, ns: str, name: str) -> Obj:
        with self._lock:
            obj = self._objects[rt].get((ns, name))
        if obj is None:
            raise _not_found(rt, name)
        return obj

    def _commit(self, rt: ResourceType, ns: str, name: str, obj: Obj, event: str) -> Obj:
        """Store ``obj`` (which nobody may mutate afterwards) under a new resourceVersion,
        remember the change and hand it to the watches.  Caller holds the lock."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        store = self._objects[rt]
        old = store.get((ns, name))
        if event == "DELETED":
            store.pop((ns, name), None)
        else:
            store[(ns, name)] = obj
        change = _Change(self._rv, rt, ns, event, obj, old)
        if len(self._history) == self._history.maxlen:
            self._compacted_rv = self._history[0].rv
        self._history.append(change)
        for watcher in self._watchers:
            if watcher.wants(change):
                watcher.queue.put(change)
        return obj

    def _check_type(self, rt: ResourceType, body: Obj) -> None:
        api_version, kind = body.get("apiVersion"), body.get("kind")
        served = {rt.api_version_for(v) for v in rt.versions}
        if api_version and api_version not in served:
            raise _bad_request(
                f"the API version in the data ({api_version}) does not match the expected "
                f"API version ({rt.api_version})"
            )
        if kind and kind != rt.kind:
            raise _bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )

    @staticmethod
    def _metadata(body: Obj) -> Obj:
        meta = body.get("metadata")
        if meta is None:
            return {}
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        return meta

    @staticmethod
    def _apply_defaults(rt: ResourceType, obj: Obj) -> None:
        if KubeApiServer._is_deployment(rt) and isinstance(obj.get("spec"), dict):
            obj["spec"].setdefault("replicas", 1)

    @staticmethod
    def _spec_changed(rt: ResourceType, old: Obj, new: Obj) -> bool:
        ignored = {"metadata", "apiVersion", "kind"}
        if rt.status_subresource:
            ignored.add("status")
        keys = (set(old) | set(new)) - ignored
        return any(old.get(k) != new.get(k) for k in keys)

    def _create(self, rt: ResourceType, ns: str, body: Obj) -> Obj:
        self._check_type(rt, body)
        meta = self._metadata(body)
        if rt.namespaced and meta.get("namespace") not in (None, "", ns):
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        if meta.get("resourceVersion"):
            raise _internal("resourceVersion should not be set on objects to be created")
        new = copy.deepcopy(body)
        new["apiVersion"], new["kind"] = rt.api_version, rt.kind
        new["metadata"] = new_meta = copy.deepcopy(meta)
        with self._lock:
            name = meta.get("name")
            if not name:
                prefix = meta.get("generateName")
                if not prefix:
                    raise _invalid(
                        rt, "", f"{rt.kind}.{rt.group} is invalid: metadata.name: Required value",
                        [{"reason": "FieldValueRequired", "field": "metadata.name"}],
                    )  # fmt: skip
                alphabet = "bcdfghjklmnpqrstvwxz2456789"
                name = prefix + "".join(secrets.choice(alphabet) for _ in range(5))
            if (ns, name) in self._objects[rt]:
                raise _already_exists(rt, name)
            new_meta["name"] = name
            if rt.namespaced:
                new_meta["namespace"] = ns
            else:
                new_meta.pop("namespace", None)
            new_meta["uid"] = str(uuid.uuid4())
            new_meta["creationTimestamp"] = self._timestamp()
            new_meta["generation"] = 1
            for server_owned in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                new_meta.pop(server_owned, None)
            if rt.status_subresource:
                new.pop("status", None)
            self._apply_defaults(rt, new)
            committed = self._commit(rt, ns, name, new, "ADDED")
            self._roll_out(rt, ns, name)
            return committed

    def _replace(self, rt: ResourceType, ns: str, name: str, body: Obj, sub: str | None) -> Obj:
        """PUT semantics (also the last step of PATCH and /scale).  Caller holds the lock."""
        current = self._require(rt, ns, name)
        meta = self._metadata(body)
        if meta.get("name") not in (None, "", name):
            raise _bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL "
                f"({name})"
            )
        if rt.namespaced and meta.get("namespace") not in (None, "", ns):
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        current_meta = current["metadata"]
        if _given(meta.get("resourceVersion"), current_meta["resourceVersion"]):
            raise _conflict(rt, name)
        if _given(meta.get("uid"), current_meta["uid"]):
            raise _conflict(
                rt, name,
                f"Precondition failed: UID in precondition: {current_meta['uid']}, UID in "
                f"object meta: {meta['uid']}",
            )  # fmt: skip
        if sub == "status":
            new = copy.deepcopy(current)
            if body.get("status") is None:
                new.pop("status", None)
            else:
                new["status"] = copy.deepcopy(body["status"])
        else:
            self._check_type(rt, body)
            new = copy.deepcopy(body)
            new["apiVersion"], new["kind"] = rt.api_version, rt.kind
            new["metadata"] = new_meta = copy.deepcopy(meta)
            for key in (*_SERVER_METADATA, "resourceVersion"):
                if key in current_meta:
                    new_meta[key] = current_meta[key]
                else:
                    new_meta.pop(key, None)
            if rt.status_subresource:
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
                else:
                    new.pop("status", None)
            self._apply_defaults(rt, new)
            if self._spec_changed(rt, current, new):
                new_meta["generation"] = int(current_meta.get("generation", 0)) + 1
        if new == current:  # a no-op: the real server writes nothing either
            return current
        if "deletionTimestamp" in current_meta and sub is None:
            added = set(new["metadata"].get("finalizers") or []) - set(
                current_meta.get("finalizers") or []
            )
            if added:
                raise _invalid(
                    rt, name,
                    f'{rt.kind}.{rt.group} "{name}" is invalid: metadata.finalizers: '
                    f"Forbidden: no new finalizers can be added if the object is being deleted, "
                    f"found new finalizers {sorted(added)}",
                    [{"reason": "FieldValueForbidden", "field": "metadata.finalizers"}],
                )  # fmt: skip
            if not new["metadata"].get("finalizers"):  # the last finalizer went: gone
                new["metadata"].pop("finalizers", None)
                return self._commit(rt, ns, name, new, "DELETED")
        committed = self._commit(rt, ns, name, new, "MODIFIED")
        if committed["metadata"].get("generation") != current_meta.get("generation"):
            self._roll_out(rt, ns, name)
        return committed

    def _patch(
        self, rt: ResourceType, ns: str, name: str, body: bytes, media: str | None, sub: str | None
    ) -> Obj:
        accepted = [JSON_PATCH, MERGE_PATCH] + (
            [STRATEGIC_MERGE_PATCH] if rt.strategic_merge else []
        )
        if media not in accepted:
            raise _unsupported_media([*accepted, APPLY_PATCH] if media == APPLY_PATCH else accepted)
        try:
            patch = json.loads(body or b"null")
        except ValueError as error:
            raise _bad_request(f"error decoding patch: {error}") from None
        with self._lock:
            current = self._require(rt, ns, name)
            doc = self._scale_of(current) if sub == "scale" else current
            if media == JSON_PATCH:
                if not isinstance(patch, list):
                    raise _bad_request(
                        "json: cannot unmarshal object into Go value of type jsonpatch.Patch "
                        "(a JSON patch is a list of operations)"
                    )
                try:
                    patched = json_patch(doc, patch)
                except PatchError as error:
                    raise _invalid(
                        rt, name, "the server rejected our request due to an error in our request",
                        [{"reason": "FieldValueInvalid", "message": str(error)}],
                    ) from None  # fmt: skip
            else:
                if not isinstance(patch, dict):
                    raise _bad_request(
                        f"error decoding patch: a {media} body must be a JSON object, got "
                        f"{type(patch).__name__}; send JSON patch operations as {JSON_PATCH}"
                    )
                merge = merge_patch if media == MERGE_PATCH else strategic_merge_patch
                patched = merge(doc, patch)
            if not isinstance(patched, dict):
                raise _bad_request("the patched document is not an object")
            if sub == "scale":
                return self._update_scale(rt, ns, name, patched)
            return self._replace(rt, ns, name, patched, sub)

    def _delete(self, rt: ResourceType, ns: str, name: str, options: Obj, version: str) -> Obj:
        preconditions = options.get("preconditions") or {}
        with self._lock:
            current = self._require(rt, ns, name)
            meta = current["metadata"]
            wanted_rv, wanted_uid = preconditions.get("resourceVersion"), preconditions.get("uid")
            if _given(wanted_uid, meta["uid"]):
                raise _conflict(
                    rt, name,
                    f"Precondition failed: UID in precondition: {wanted_uid}, UID in object "
                    f"meta: {meta['uid']}",
                )  # fmt: skip
            if _given(wanted_rv, meta["resourceVersion"]):
                raise _conflict(
                    rt, name,
                    f"the ResourceVersion in the precondition ({wanted_rv}) does not match the "
                    f"ResourceVersion in record ({meta['resourceVersion']}). The object might "
                    "have been modified",
                )  # fmt: skip
            if meta.get("finalizers"):  # marked for deletion; gone once they are removed
                if "deletionTimestamp" in meta:
                    return _present(rt, current, version)
                marked = copy.deepcopy(current)
                marked["metadata"]["deletionTimestamp"] = self._timestamp()
                marked["metadata"]["deletionGracePeriodSeconds"] = 0
                return _present(rt, self._commit(rt, ns, name, marked, "MODIFIED"), version)
            deleted = self._commit(rt, ns, name, copy.deepcopy(current), "DELETED")
        if rt.delete_returns_object:
            return _present(rt, deleted, version)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": _details(rt, name, uid=meta["uid"]),
        }

    def _matching(self, rt: ResourceType, scope: str | None, query: _Filter) -> list[Obj]:
        return [
            obj
            for (ns, _), obj in sorted(self._objects[rt].items())
            if (scope is None or ns == scope) and query.matches(obj)
        ]

    def _list(
        self,
        rt: ResourceType,
        scope: str | None,
        query: _Filter,
        version: str,
        page: _Page | None = None,
    ) -> Obj:
        with self._lock:
            items = self._matching(rt, scope, query)
            rv = self._rv
        meta: Obj = {"resourceVersion": str(rv)}
        if page is not None:
            if page.after is not None:
                items = [o for o in items if _key_of(o) > page.after]
            if page.limit is not None and len(items) > page.limit:
                rest = len(items) - page.limit
                items = items[: page.limit]
                meta["continue"] = _Page.token(_key_of(items[-1]))
                meta["remainingItemCount"] = rest
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version_for(version),
            "metadata": meta,
            "items": [_present(rt, obj, version) for obj in items],
        }

    def _delete_collection(
        self, rt: ResourceType, scope: str | None, query: _Filter, version: str
    ) -> Obj:
        with self._lock:
            deleted = [
                self._commit(rt, obj["metadata"].get("namespace", ""), obj["metadata"]["name"],
                             copy.deepcopy(obj), "DELETED")
                for obj in self._matching(rt, scope, query)
            ]  # fmt: skip
            rv = self._rv
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version_for(version),
            "metadata": {"resourceVersion": str(rv)},
            "items": [_present(rt, obj, version) for obj in deleted],
        }

    # -- watches -----------------------------------------------------------------------

    def _open_watch(
        self, route: _Route, scope: str | None, query: _Filter, params: Mapping[str, str]
    ) -> _WatchPlan:
        timeout = params.get("timeoutSeconds")
        deadline = None
        if timeout:
            try:
                deadline = time.monotonic() + float(timeout)
            except ValueError:
                raise _bad_request(f"invalid timeoutSeconds: {timeout!r}") from None
        since = params.get("resourceVersion") or "0"
        if not since.isdigit():
            raise _bad_request(f"invalid resource version: {since!r}")
        watcher = _Watcher(route.rt, scope, route.version, query)
        with self._lock:
            if self._stopping:
                raise ApiError(503, "ServiceUnavailable", "the server is shutting down")
            if since == "0":
                objects = self._matching(route.rt, scope, query)
                initial = [
                    {"type": "ADDED", "object": _present(route.rt, obj, route.version)}
                    for obj in objects
                ]
            elif int(since) < self._compacted_rv:
                oldest = self._compacted_rv + 1
                message = f"too old resource version: {since} ({oldest})"
                error = ApiError(410, "Expired", message).status()
                return _WatchPlan(None, [{"type": "ERROR", "object": error}], None)
            else:
                changes = [c for c in self._history if c.rv > int(since) and watcher.wants(c)]
                initial = [e for c in changes if (e := watcher.render(c)) is not None]
            self._watchers.append(watcher)
        return _WatchPlan(watcher, initial, deadline)

    def _unsubscribe(self, watcher: _Watcher) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._watchers.remove(watcher)

    # -- Deployments: /scale and the simulated controller ------------------------------

    @staticmethod
    def _is_deployment(rt: ResourceType) -> bool:
        return rt.group == "apps" and rt.plural == "deployments"

    @staticmethod
    def _scale_of(obj: Obj) -> Obj:
        meta = obj["metadata"]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                key: meta[key]
                for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if key in meta
            },
            "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 1)},
            "status": {
                "replicas": (obj.get("status") or {}).get("replicas", 0),
                "selector": _selector_string(obj),
            },
        }

    def _update_scale(self, rt: ResourceType, ns: str, name: str, body: Obj) -> Obj:
        with self._lock:
            current = self._require(rt, ns, name)
            meta = self._metadata(body)
            if _given(meta.get("resourceVersion"), current["metadata"]["resourceVersion"]):
                raise _conflict(rt, name)
            replicas = (body.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
                raise ApiError(
                    422, "Invalid",
                    f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: '
                    f"{json.dumps(replicas)}: must be greater than or equal to 0",
                    {"name": name, "group": "autoscaling", "kind": "Scale"},
                )  # fmt: skip
            new = copy.deepcopy(current)
            new.setdefault("spec", {})["replicas"] = replicas
            return self._scale_of(self._replace(rt, ns, name, new, None))

    def _is_frozen(self, ns: str, name: str) -> bool:
        return self._frozen_all or (ns, name) in self._frozen or (None, name) in self._frozen

    def _roll_out(self, rt: ResourceType, ns: str, name: str) -> None:
        """The Deployment controller, done instantly: status catches up with the spec."""
        if not self._is_deployment(rt) or self._is_frozen(ns, name):
            return
        current = self._objects[rt].get((ns, name))
        if current is None:
            return
        generation = current["metadata"].get("generation", 1)
        replicas = (current.get("spec") or {}).get("replicas", 1)
        status = current.get("status") or {}
        if status.get("observedGeneration") == generation and status.get("replicas") == replicas:
            return
        now = self._timestamp()
        new = copy.deepcopy(current)
        new["status"] = {
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                 "message": "Deployment has minimum availability.",
                 "lastUpdateTime": now, "lastTransitionTime": now},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                 "message": f'ReplicaSet "{name}" has successfully progressed.',
                 "lastUpdateTime": now, "lastTransitionTime": now},
            ],
        }  # fmt: skip
        self._commit(rt, ns, name, new, "MODIFIED")


def _decode_object(body: bytes, media: str | None) -> Obj:
    try:
        if media is not None and media.endswith("yaml"):
            decoded = yaml.safe_load(body.decode())
        else:
            decoded = json.loads(body or b"null")
    except (ValueError, yaml.YAMLError) as error:
        raise _bad_request(f"the body of the request could not be decoded: {error}") from None
    if not isinstance(decoded, dict):
        raise _bad_request(
            f"the body of the request must be an object, got {type(decoded).__name__}"
        )
    return decoded
