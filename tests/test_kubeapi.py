"""The Kubernetes API double answers like an API server, as seen through the real client."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import pytest
import yaml
from kubernetes import client, config, dynamic, watch
from kubernetes.client.exceptions import ApiException

from kubedouble.apiserver import (
    CANARIES,
    JSON_PATCH,
    KUBECONFIG_NAME,
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    KubeApiServer,
    RequestRecord,
)

ROOT = Path(__file__).resolve().parent.parent
G, V, P = "canaryd.io", "v1alpha1", "canaries"
ISTIO = "networking.istio.io"
NS = "shop"
# The client's APIs are typed (models with every field Optional, custom objects as
# ``object``); these tests read the answers dynamically.
CustomApi: TypeAlias = Any  # client.CustomObjectsApi
AppsApi: TypeAlias = Any  # client.AppsV1Api
CONFLICT_MESSAGE = (
    'Operation cannot be fulfilled on canaries.canaryd.io "demo": the object has been '
    "modified; please apply your changes to the latest version and try again"
)


# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[KubeApiServer]:
    with KubeApiServer() as srv:
        yield srv
    assert srv.internal_errors == []


@pytest.fixture
def api(server: KubeApiServer) -> Iterator[client.ApiClient]:
    api_client = server.api_client()
    yield api_client
    api_client.close()


@pytest.fixture
def crs(api: client.ApiClient) -> CustomApi:
    return client.CustomObjectsApi(api)


@pytest.fixture
def apps(api: client.ApiClient) -> AppsApi:
    return client.AppsV1Api(api)


def canary(name: str = "demo", labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "Canary",
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": {"service": "checkout", "steps": [10, 50, 100], **spec},
    }


def deployment(name: str = "web", replicas: int | None = 2) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": name}},
        "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {
                "containers": [
                    {"name": "app", "image": "app:v1"},
                    {"name": "proxy", "image": "envoy:1"},
                ]
            },
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}, "spec": spec}


def create(crs: CustomApi, body: dict[str, Any], ns: str = NS) -> dict[str, Any]:
    created: dict[str, Any] = crs.create_namespaced_custom_object(G, V, ns, P, body)
    return created


def read(crs: CustomApi, name: str = "demo") -> dict[str, Any]:
    obj: dict[str, Any] = crs.get_namespaced_custom_object(G, V, NS, P, name)
    return obj


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def failure(call: Callable[[], object]) -> tuple[ApiException, dict[str, Any]]:
    """The ApiException ``call`` raises, and its Status body."""
    with pytest.raises(ApiException) as caught:
        call()
    body: dict[str, Any] = json.loads(caught.value.body or "null")
    assert body["kind"] == "Status"
    assert body["status"] == "Failure"
    assert body["code"] == caught.value.status
    return caught.value, body


def take(w: watch.Watch, stream: Iterator[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The first ``count`` events of a watch stream, then stop it."""
    events: list[dict[str, Any]] = []
    for event in stream:
        events.append(event)
        if len(events) == count:
            break
    w.stop()
    stream.close()  # type: ignore[attr-defined]
    return events


def until_named(
    w: watch.Watch, stream: Iterator[dict[str, Any]], name: str
) -> list[tuple[str, str]]:
    """(type, name) of every event up to and including the first one for ``name``."""
    seen: list[tuple[str, str]] = []
    for event in stream:
        seen.append((event["type"], event["raw_object"]["metadata"]["name"]))
        if seen[-1][1] == name:
            break
    w.stop()
    stream.close()  # type: ignore[attr-defined]
    return seen


def raw_get(server: KubeApiServer, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def in_background(
    work: Callable[[], object], once_watched: KubeApiServer | None = None
) -> Callable[[], None]:
    """Run ``work`` in a thread (once a watch is open on ``once_watched``, if given); the
    returned function joins the thread and re-raises its error."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            if once_watched is not None:
                once_watched.wait_for_watches(1)
            work()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> None:
        thread.join(timeout=10)
        assert not thread.is_alive()
        if errors:
            raise errors[0]

    return join


# -- create, get, errors -------------------------------------------------------------------


def test_create_answers_201_with_server_set_metadata_and_drops_status(
    crs: CustomApi,
) -> None:
    body = canary() | {"status": {"phase": "Succeeded"}}
    created, status_code, _ = crs.create_namespaced_custom_object_with_http_info(G, V, NS, P, body)
    assert status_code == 201
    meta = created["metadata"]
    assert meta["name"] == "demo"
    assert meta["namespace"] == NS
    assert meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0
    assert len(meta["uid"]) == 36
    assert dt.datetime.strptime(meta["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
    assert "status" not in created  # the status subresource owns .status
    assert read(crs) == created


def test_creating_twice_is_409_already_exists(crs: CustomApi) -> None:
    create(crs, canary())
    error, body = failure(lambda: create(crs, canary()))
    assert (error.status, error.reason) == (409, "Conflict")
    assert body["reason"] == "AlreadyExists"
    assert body["message"] == 'canaries.canaryd.io "demo" already exists'
    assert body["details"] == {"name": "demo", "group": G, "kind": P}


def test_get_of_a_missing_object_is_404_with_a_status_body(crs: CustomApi, apps: AppsApi) -> None:
    error, body = failure(lambda: read(crs, "ghost"))
    assert (error.status, error.reason) == (404, "Not Found")
    assert body["reason"] == "NotFound"
    assert body["message"] == 'canaries.canaryd.io "ghost" not found'
    assert body["details"] == {"name": "ghost", "group": G, "kind": P}
    _, body = failure(lambda: apps.read_namespaced_deployment("ghost", NS))
    assert body["message"] == 'deployments.apps "ghost" not found'


def test_unknown_paths_are_404_and_wrong_methods_405(server: KubeApiServer, crs: CustomApi) -> None:
    status, raw = raw_get(server, "/apis/nope.example.com/v1/namespaces/x/things")
    assert status == 404
    assert json.loads(raw)["message"] == "the server could not find the requested resource"
    error, _ = failure(lambda: crs.list_namespaced_custom_object(G, V, NS, "nopes"))
    assert error.status == 404
    assert raw_get(server, f"/apis/{G}/{V}/namespaces/{NS}/{P}/demo/scale")[0] == 404
    assert raw_get(server, f"/apis/{G}/v9/namespaces/{NS}/{P}")[0] == 404
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request("POST", f"/apis/{G}/{V}/namespaces/{NS}/{P}/demo", body=b"{}")
        response = connection.getresponse()
        assert response.status == 405
        assert json.loads(response.read())["reason"] == "MethodNotAllowed"
    finally:
        connection.close()


def test_create_checks_namespace_kind_and_resource_version(crs: CustomApi) -> None:
    wrong_ns = canary() | {"metadata": {"name": "demo", "namespace": "elsewhere"}}
    assert failure(lambda: create(crs, wrong_ns))[0].status == 400
    wrong_kind = canary() | {"kind": "VirtualService"}
    assert failure(lambda: create(crs, wrong_kind))[0].status == 400
    with_rv = canary() | {"metadata": {"name": "demo", "resourceVersion": "7"}}
    assert failure(lambda: create(crs, with_rv))[0].status == 500
    generated = create(crs, canary() | {"metadata": {"generateName": "demo-"}})
    assert generated["metadata"]["name"].startswith("demo-")
    assert len(generated["metadata"]["name"]) == len("demo-") + 5


# -- resourceVersion, generation, preconditions ----------------------------------------------


def test_resource_version_increases_on_every_write(server: KubeApiServer, crs: CustomApi) -> None:
    seen = [rv(create(crs, canary()))]
    seen.append(
        rv(crs.patch_namespaced_custom_object(G, V, NS, P, "demo", {"spec": {"steps": [5, 100]}}))
    )
    seen.append(
        rv(
            crs.patch_namespaced_custom_object(
                G, V, NS, P, "demo", {"metadata": {"labels": {"x": "1"}}}
            )
        )
    )
    seen.append(
        rv(
            crs.patch_namespaced_custom_object_status(
                G, V, NS, P, "demo", {"status": {"phase": "Progressing"}}
            )
        )
    )
    current = read(crs)
    current["spec"]["service"] = "cart"
    seen.append(rv(crs.replace_namespaced_custom_object(G, V, NS, P, "demo", current)))
    listed = crs.list_namespaced_custom_object(G, V, NS, P)
    assert int(listed["metadata"]["resourceVersion"]) == seen[-1] == server.resource_version
    seen.append(rv(crs.delete_namespaced_custom_object(G, V, NS, P, "demo")))
    assert seen == sorted(set(seen)), seen
    assert server.resource_version == seen[-1]


def test_a_write_that_changes_nothing_keeps_the_resource_version(
    server: KubeApiServer, crs: CustomApi
) -> None:
    created = create(crs, canary())
    same = crs.patch_namespaced_custom_object(
        G, V, NS, P, "demo", {"spec": {"service": "checkout"}}
    )
    assert rv(same) == rv(created)
    assert rv(crs.replace_namespaced_custom_object(G, V, NS, P, "demo", created)) == rv(created)
    assert server.resource_version == rv(created)
    assert server.writes == 3  # the requests were still writes


def test_stale_replace_is_409_conflict_with_the_real_message(crs: CustomApi) -> None:
    stale = create(crs, canary())
    crs.patch_namespaced_custom_object(G, V, NS, P, "demo", {"spec": {"service": "cart"}})
    stale["spec"]["service"] = "mine"
    error, body = failure(lambda: crs.replace_namespaced_custom_object(G, V, NS, P, "demo", stale))
    assert (error.status, error.reason) == (409, "Conflict")
    assert body["reason"] == "Conflict"
    assert body["message"] == CONFLICT_MESSAGE
    assert body["details"] == {"name": "demo", "group": G, "kind": P}
    assert read(crs)["spec"]["service"] == "cart"
    del stale["metadata"]["resourceVersion"]  # no precondition: last writer wins
    assert (
        crs.replace_namespaced_custom_object(G, V, NS, P, "demo", stale)["spec"]["service"]
        == "mine"
    )
    ghost = canary("ghost")
    assert (
        failure(lambda: crs.replace_namespaced_custom_object(G, V, NS, P, "ghost", ghost))[0].status
        == 404
    )


def test_patch_carrying_a_stale_resource_version_is_409(crs: CustomApi) -> None:
    old = rv(create(crs, canary()))
    new = rv(crs.patch_namespaced_custom_object(G, V, NS, P, "demo", {"spec": {"service": "a"}}))
    stale = {"metadata": {"resourceVersion": str(old)}, "spec": {"service": "b"}}
    _, body = failure(lambda: crs.patch_namespaced_custom_object(G, V, NS, P, "demo", stale))
    assert body["message"] == CONFLICT_MESSAGE
    ops = [{"op": "replace", "path": "/metadata/resourceVersion", "value": str(old)},
           {"op": "replace", "path": "/spec/service", "value": "b"}]  # fmt: skip
    error, _ = failure(
        lambda: crs.patch_namespaced_custom_object(
            G, V, NS, P, "demo", ops, _content_type=JSON_PATCH
        )
    )
    assert error.status == 409
    fresh = {"metadata": {"resourceVersion": str(new)}, "spec": {"service": "b"}}
    assert crs.patch_namespaced_custom_object(G, V, NS, P, "demo", fresh)["spec"]["service"] == "b"


def test_generation_bumps_on_spec_changes_only(crs: CustomApi) -> None:
    def generation() -> int:
        return int(read(crs)["metadata"]["generation"])

    create(crs, canary())
    crs.patch_namespaced_custom_object(G, V, NS, P, "demo", {"metadata": {"labels": {"a": "b"}}})
    crs.patch_namespaced_custom_object_status(G, V, NS, P, "demo", {"status": {"phase": "Idle"}})
    assert generation() == 1
    crs.patch_namespaced_custom_object(G, V, NS, P, "demo", {"spec": {"steps": [20, 100]}})
    assert generation() == 2
    crs.patch_namespaced_custom_object(G, V, NS, P, "demo", {"spec": {"steps": [20, 100]}})
    assert generation() == 2  # same spec: no change
    crs.patch_namespaced_custom_object(G, V, NS, P, "demo", {"spec": {"service": None}})
    assert generation() == 3


# -- the status subresource ---------------------------------------------------------------


def test_status_writes_change_only_status(crs: CustomApi) -> None:
    created = create(crs, canary())
    sneaky = {
        "metadata": {"labels": {"sneaky": "yes"}},
        "spec": {"service": "hijacked"},
        "status": {"phase": "Progressing", "stepIndex": 0},
    }
    patched = crs.patch_namespaced_custom_object_status(G, V, NS, P, "demo", sneaky)
    assert patched["status"] == {"phase": "Progressing", "stepIndex": 0}
    assert patched["spec"] == created["spec"]
    assert patched["metadata"]["labels"] == {"app": "demo"}
    assert patched["metadata"]["generation"] == 1
    assert rv(patched) > rv(created)
    replaced = crs.replace_namespaced_custom_object_status(
        G, V, NS, P, "demo", patched | {"status": {"phase": "Holding"}, "spec": {"service": "x"}}
    )
    assert replaced["status"] == {"phase": "Holding"}
    assert replaced["spec"]["service"] == "checkout"
    stale = patched | {"status": {"phase": "Failed"}}
    assert failure(
        lambda: crs.replace_namespaced_custom_object_status(G, V, NS, P, "demo", stale)
    )[0].status == 409  # fmt: skip


def test_main_resource_writes_ignore_status(crs: CustomApi) -> None:
    create(crs, canary())
    crs.patch_namespaced_custom_object_status(G, V, NS, P, "demo", {"status": {"phase": "Idle"}})
    patched = crs.patch_namespaced_custom_object(
        G, V, NS, P, "demo", {"spec": {"service": "cart"}, "status": {"phase": "Succeeded"}}
    )
    assert patched["status"] == {"phase": "Idle"}
    assert patched["spec"]["service"] == "cart"
    body = read(crs)
    body["status"] = {"phase": "Failed"}
    body["spec"]["service"] = "basket"
    replaced = crs.replace_namespaced_custom_object(G, V, NS, P, "demo", body)
    assert replaced["status"] == {"phase": "Idle"}
    assert replaced["spec"]["service"] == "basket"


# -- patch flavours --------------------------------------------------------------------------


def test_content_type_chooses_merge_patch_or_json_patch(
    server: KubeApiServer, crs: CustomApi
) -> None:
    before = create(crs, canary())
    ops = [{"op": "replace", "path": "/spec/service", "value": "cart"}]
    # kubernetes 37 sends a list body as a merge patch unless told otherwise: a 400, no harm
    error, body = failure(lambda: crs.patch_namespaced_custom_object(G, V, NS, P, "demo", ops))
    assert error.status == 400
    assert body["reason"] == "BadRequest"
    assert server.get(G, V, P, NS, "demo") == before
    assert server.requests[-1] == RequestRecord(
        "PATCH", f"/apis/{G}/{V}/namespaces/{NS}/{P}/demo", MERGE_PATCH
    )
    patched = crs.patch_namespaced_custom_object(G, V, NS, P, "demo", ops, _content_type=JSON_PATCH)
    assert patched["spec"]["service"] == "cart"
    assert server.requests[-1].content_type == JSON_PATCH
    # RFC 7386: null deletes, objects merge, lists are replaced
    merged = crs.patch_namespaced_custom_object(
        G,
        V,
        NS,
        P,
        "demo",
        {"spec": {"service": None, "steps": [100], "analysis": {"alpha": 0.01}}},
    )
    assert merged["spec"] == {"steps": [100], "analysis": {"alpha": 0.01}}


def test_json_patch_operations(crs: CustomApi) -> None:
    create(crs, canary(analysis={"interval": "1m", "alpha": 0.01}))
    ops = [
        {"op": "add", "path": "/spec/steps/1", "value": 25},
        {"op": "add", "path": "/spec/steps/-", "value": 100},
        {"op": "remove", "path": "/spec/analysis/interval"},
        {"op": "replace", "path": "/spec/service", "value": "cart"},
        {"op": "add", "path": "/metadata/annotations", "value": {}},
        {"op": "copy", "from": "/spec/service", "path": "/metadata/annotations/canaryd.io~1svc"},
        {"op": "move", "from": "/spec/steps/0", "path": "/spec/first"},
        {"op": "test", "path": "/spec/first", "value": 10},
    ]
    patched = crs.patch_namespaced_custom_object(G, V, NS, P, "demo", ops, _content_type=JSON_PATCH)
    assert patched["spec"] == {
        "service": "cart",
        "steps": [25, 50, 100, 100],
        "analysis": {"alpha": 0.01},
        "first": 10,
    }
    assert patched["metadata"]["annotations"] == {"canaryd.io/svc": "cart"}
    assert patched["metadata"]["generation"] == 2


def test_json_patch_failing_test_op_is_422_and_changes_nothing(
    server: KubeApiServer, crs: CustomApi
) -> None:
    before = create(crs, canary())
    ops = [
        {"op": "replace", "path": "/spec/service", "value": "cart"},
        {"op": "test", "path": "/spec/steps/0", "value": 99},
    ]
    error, body = failure(
        lambda: crs.patch_namespaced_custom_object(
            G, V, NS, P, "demo", ops, _content_type=JSON_PATCH
        )
    )
    assert (error.status, error.reason) == (422, "Unprocessable Entity")
    assert body["reason"] == "Invalid"
    assert "testing value /spec/steps/0 failed" in json.dumps(body["details"])
    missing = [{"op": "remove", "path": "/spec/nothing"}]
    error, _ = failure(
        lambda: crs.patch_namespaced_custom_object(
            G, V, NS, P, "demo", missing, _content_type=JSON_PATCH
        )
    )
    assert error.status == 422
    assert server.get(G, V, P, NS, "demo") == before


def test_strategic_merge_patch_merges_containers_by_name(
    server: KubeApiServer, apps: AppsApi
) -> None:
    apps.create_namespaced_deployment(NS, deployment())
    new_image = {
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "app:v2"}]}}}
    }
    patched = apps.patch_namespaced_deployment("web", NS, new_image)
    assert server.requests[-1].content_type == STRATEGIC_MERGE_PATCH  # the client's choice
    containers = [(c.name, c.image) for c in patched.spec.template.spec.containers]
    assert containers == [("app", "app:v2"), ("proxy", "envoy:1")]
    drop = {"spec": {"template": {"spec": {"containers": [{"name": "proxy", "$patch": "delete"}]}}}}
    patched = apps.patch_namespaced_deployment("web", NS, drop)
    assert [c.name for c in patched.spec.template.spec.containers] == ["app"]
    both = deployment()["spec"]["template"]["spec"]["containers"]
    restored = apps.patch_namespaced_deployment(
        "web", NS, {"spec": {"template": {"spec": {"containers": both}}}}
    )
    assert [c.name for c in restored.spec.template.spec.containers] == ["app", "proxy"]
    # the first body again, as a merge patch: it replaces the whole list
    merged = apps.patch_namespaced_deployment("web", NS, new_image, _content_type=MERGE_PATCH)
    assert [(c.name, c.image) for c in merged.spec.template.spec.containers] == [("app", "app:v2")]


def test_custom_resources_refuse_strategic_merge_and_apply_patches(
    crs: CustomApi,
) -> None:
    create(crs, canary())
    for content_type in (STRATEGIC_MERGE_PATCH, "application/apply-patch+yaml"):

        def patch(content_type: str = content_type) -> object:
            return crs.patch_namespaced_custom_object(
                G, V, NS, P, "demo", {"spec": {"service": "x"}}, _content_type=content_type
            )

        error, body = failure(patch)
        assert (error.status, body["reason"]) == (415, "UnsupportedMediaType")
        assert body["message"].startswith("the body of the request was in an unknown format")
    assert read(crs)["spec"]["service"] == "checkout"


# -- watches -----------------------------------------------------------------------------------


def test_watch_streams_create_patch_status_delete_in_order(
    server: KubeApiServer, crs: CustomApi
) -> None:
    def writes() -> None:
        server.wait_for_watches(1)
        create(crs, canary())
        crs.patch_namespaced_custom_object(G, V, NS, P, "demo", {"spec": {"service": "cart"}})
        crs.patch_namespaced_custom_object_status(
            G, V, NS, P, "demo", {"status": {"phase": "Idle"}}
        )
        crs.delete_namespaced_custom_object(G, V, NS, P, "demo")

    w = watch.Watch()
    stream = w.stream(
        crs.list_namespaced_custom_object, G, V, NS, P,
        resource_version=str(server.resource_version), timeout_seconds=5,
    )  # fmt: skip
    join = in_background(writes)
    events = take(w, stream, 4)
    join()
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]
    objects = [e["object"] for e in events]
    assert objects[1]["spec"]["service"] == "cart"
    assert objects[2]["status"] == {"phase": "Idle"}
    versions = [rv(o) for o in objects]
    assert versions == sorted(set(versions))
    assert versions[-1] == server.resource_version


def test_watch_from_a_resource_version_replays_only_later_events(
    server: KubeApiServer, crs: CustomApi
) -> None:
    create(crs, canary("a"))
    since = server.resource_version
    crs.patch_namespaced_custom_object(G, V, NS, P, "a", {"spec": {"service": "x"}})
    create(crs, canary("b"))
    create(crs, canary("other"), ns="elsewhere")
    crs.delete_namespaced_custom_object(G, V, NS, P, "a")
    create(crs, canary("zz-end"))
    w = watch.Watch()
    stream = w.stream(
        crs.list_namespaced_custom_object,
        G,
        V,
        NS,
        P,
        resource_version=str(since),
        timeout_seconds=5,
    )
    seen = until_named(w, stream, "zz-end")
    assert seen == [("MODIFIED", "a"), ("ADDED", "b"), ("DELETED", "a"), ("ADDED", "zz-end")]


def test_watch_without_a_resource_version_starts_with_the_current_objects(
    server: KubeApiServer, crs: CustomApi
) -> None:
    create(crs, canary("a"))
    create(crs, canary("b"))
    crs.delete_namespaced_custom_object(G, V, NS, P, "a")
    w = watch.Watch()
    stream = w.stream(crs.list_namespaced_custom_object, G, V, NS, P, timeout_seconds=5)
    join = in_background(lambda: create(crs, canary("c")), once_watched=server)
    seen = until_named(w, stream, "c")
    join()
    assert seen == [("ADDED", "b"), ("ADDED", "c")]


def test_watch_from_a_compacted_resource_version_gets_410_expired(
    server: KubeApiServer, crs: CustomApi
) -> None:
    old = rv(create(crs, canary()))
    crs.patch_namespaced_custom_object(G, V, NS, P, "demo", {"spec": {"service": "x"}})
    server.compact()
    path = f"/apis/{G}/{V}/namespaces/{NS}/{P}?watch=1&resourceVersion={old}"
    status, raw = raw_get(server, path)
    assert status == 200
    lines = raw.decode().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired"
    assert event["object"]["message"].startswith(f"too old resource version: {old} (")
    w = watch.Watch()
    with pytest.raises(ApiException) as caught:
        list(
            w.stream(
                crs.list_namespaced_custom_object,
                G,
                V,
                NS,
                P,
                resource_version=str(old),
                timeout_seconds=5,
            )
        )
    assert caught.value.status == 410


def test_history_limit_bounds_what_a_watch_can_replay() -> None:
    with KubeApiServer(history_limit=2) as server:
        for name in ("a", "b", "c", "d"):
            server.put_raw(G, V, P, canary(name) | {"metadata": {"name": name, "namespace": NS}})
        path = f"/apis/{G}/{V}/namespaces/{NS}/{P}?watch=true&resourceVersion=1"
        _, raw = raw_get(server, path)  # b's write is forgotten: answered at once, no wait
        assert json.loads(raw)["object"]["code"] == 410
        with server.api_client() as api:
            crs: CustomApi = client.CustomObjectsApi(api)
            w = watch.Watch()
            stream = w.stream(
                crs.list_namespaced_custom_object, G, V, NS, P,
                resource_version="2", timeout_seconds=5,
            )  # fmt: skip
            assert until_named(w, stream, "d") == [("ADDED", "c"), ("ADDED", "d")]


def test_timeout_seconds_ends_the_stream(crs: CustomApi) -> None:
    start = time.monotonic()
    stream = watch.Watch().stream(
        crs.list_namespaced_custom_object, G, V, NS, P,
        timeout_seconds=1, _request_timeout=5,  # a client-side limit: fail, never hang
    )  # fmt: skip
    events = list(stream)
    elapsed = time.monotonic() - start
    assert events == []
    assert 0.9 <= elapsed < 3


def test_watch_label_and_field_selectors(server: KubeApiServer, crs: CustomApi) -> None:
    create(crs, canary("a", {"tier": "web"}))
    create(crs, canary("b", {"tier": "db"}))
    since = str(server.resource_version)
    crs.patch_namespaced_custom_object(G, V, NS, P, "a", {"metadata": {"labels": {"tier": "db"}}})
    crs.patch_namespaced_custom_object(G, V, NS, P, "b", {"metadata": {"labels": {"tier": "web"}}})
    crs.patch_namespaced_custom_object(G, V, NS, P, "a", {"spec": {"service": "x"}})
    crs.patch_namespaced_custom_object(G, V, NS, P, "b", {"spec": {"service": "y"}})
    create(crs, canary("zz", {"tier": "web"}))
    w = watch.Watch()
    stream = w.stream(
        crs.list_namespaced_custom_object, G, V, NS, P,
        label_selector="tier=web", resource_version=since, timeout_seconds=5,
    )  # fmt: skip
    # leaving the selector reads as DELETED, entering it as ADDED
    assert until_named(w, stream, "zz") == [
        ("DELETED", "a"), ("ADDED", "b"), ("MODIFIED", "b"), ("ADDED", "zz"),
    ]  # fmt: skip
    w = watch.Watch()
    stream = w.stream(
        crs.list_namespaced_custom_object, G, V, NS, P,
        field_selector="metadata.name=zz", timeout_seconds=5,
    )  # fmt: skip
    assert take(w, stream, 1)[0]["object"]["metadata"]["name"] == "zz"


def test_cluster_wide_list_and_watch_cover_every_namespace(
    server: KubeApiServer, crs: CustomApi
) -> None:
    create(crs, canary("a"), ns="one")
    create(crs, canary("b"), ns="two")
    listed = crs.list_cluster_custom_object(G, V, P)
    assert [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in listed["items"]] == [
        ("one", "a"), ("two", "b"),
    ]  # fmt: skip
    assert [
        o["metadata"]["name"] for o in crs.list_namespaced_custom_object(G, V, "two", P)["items"]
    ] == ["b"]
    only_b = crs.list_cluster_custom_object(G, V, P, field_selector="metadata.name=b")["items"]
    assert [o["metadata"]["name"] for o in only_b] == ["b"]
    w = watch.Watch()
    stream = w.stream(crs.list_cluster_custom_object, G, V, P, timeout_seconds=5)
    join = in_background(lambda: create(crs, canary("c"), ns="three"), once_watched=server)
    assert until_named(w, stream, "c") == [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c")]
    join()


def test_stopping_the_server_ends_an_open_watch_promptly() -> None:
    server = KubeApiServer().start()
    api = server.api_client()
    try:
        events: list[dict[str, Any]] = []
        crs = client.CustomObjectsApi(api)
        join = in_background(
            lambda: events.extend(
                watch.Watch().stream(
                    crs.list_namespaced_custom_object, G, V, NS, P, timeout_seconds=30
                )
            )
        )
        server.wait_for_watches(1)
        start = time.monotonic()
        server.stop()
        join()
        assert time.monotonic() - start < 2
        assert events == []
    finally:
        api.close()
        server.stop()


# -- Deployments ---------------------------------------------------------------------------


def test_deployment_controller_finishes_rollouts_at_once(apps: AppsApi) -> None:
    created = apps.create_namespaced_deployment(NS, deployment(replicas=3))
    assert created.status is None  # the create response predates the controller
    live = apps.read_namespaced_deployment("web", NS)
    assert live.status.observed_generation == live.metadata.generation == 1
    assert live.status.replicas == live.status.updated_replicas == 3
    assert live.status.ready_replicas == live.status.available_replicas == 3
    progressing = [c for c in live.status.conditions if c.type == "Progressing"]
    assert progressing[0].reason == "NewReplicaSetAvailable"
    assert int(live.metadata.resource_version) > int(created.metadata.resource_version)
    apps.patch_namespaced_deployment(
        "web", NS, {"spec": {"template": {"metadata": {"labels": {"v": "2"}}}}}
    )
    live = apps.read_namespaced_deployment("web", NS)
    assert live.status.observed_generation == live.metadata.generation == 2
    apps.create_namespaced_deployment(NS, deployment("lone", replicas=None))
    lone = apps.read_namespaced_deployment("lone", NS)
    assert lone.spec.replicas == lone.status.ready_replicas == 1  # defaulted


def test_frozen_rollouts_never_finish_until_released(server: KubeApiServer, apps: AppsApi) -> None:
    apps.create_namespaced_deployment(NS, deployment("stable"))
    apps.create_namespaced_deployment(NS, deployment("canary"))
    server.freeze_rollouts(True, namespace=NS, name="canary")
    bump = {"spec": {"template": {"metadata": {"annotations": {"rev": "2"}}}}}
    apps.patch_namespaced_deployment("stable", NS, bump)
    apps.patch_namespaced_deployment("canary", NS, bump)
    canary_dep = apps.read_namespaced_deployment("canary", NS)
    assert (canary_dep.metadata.generation, canary_dep.status.observed_generation) == (2, 1)
    assert apps.read_namespaced_deployment("stable", NS).status.observed_generation == 2
    server.freeze_rollouts(True)
    apps.patch_namespaced_deployment("stable", NS, {"spec": {"replicas": 4}})
    assert apps.read_namespaced_deployment("stable", NS).status.observed_generation == 2
    server.freeze_rollouts(False)
    for name, generation in (("canary", 2), ("stable", 3)):
        status = apps.read_namespaced_deployment(name, NS).status
        assert status.observed_generation == generation


def test_deployment_watch_sees_the_controller_writes(server: KubeApiServer, apps: AppsApi) -> None:
    apps.create_namespaced_deployment(NS, deployment())
    w = watch.Watch()
    stream = w.stream(apps.list_namespaced_deployment, NS, timeout_seconds=5)
    join = in_background(
        lambda: apps.patch_namespaced_deployment("web", NS, {"spec": {"replicas": 5}}),
        once_watched=server,
    )
    events = take(w, stream, 3)
    join()
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "MODIFIED"]
    assert all(isinstance(e["object"], client.V1Deployment) for e in events)
    spec_write, status_write = events[1]["object"], events[2]["object"]
    assert (spec_write.metadata.generation, spec_write.status.observed_generation) == (2, 1)
    assert (status_write.status.observed_generation, status_write.status.ready_replicas) == (2, 5)


def test_scale_subresource(apps: AppsApi) -> None:
    apps.create_namespaced_deployment(NS, deployment(replicas=2))
    scale = apps.read_namespaced_deployment_scale("web", NS)
    assert (scale.kind, scale.spec.replicas, scale.status.replicas) == ("Scale", 2, 2)
    assert scale.status.selector == "app=web"
    scaled = apps.patch_namespaced_deployment_scale("web", NS, {"spec": {"replicas": 5}})
    assert scaled.spec.replicas == 5
    live = apps.read_namespaced_deployment("web", NS)
    assert (live.spec.replicas, live.metadata.generation, live.status.ready_replicas) == (5, 2, 5)
    error, body = failure(lambda: apps.replace_namespaced_deployment_scale("web", NS, scale))
    assert (error.status, body["reason"]) == (409, "Conflict")
    assert body["message"].startswith('Operation cannot be fulfilled on deployments.apps "web"')
    fresh = apps.read_namespaced_deployment_scale("web", NS)
    fresh.spec.replicas = 0
    assert apps.replace_namespaced_deployment_scale("web", NS, fresh).spec.replicas == 0
    negative = {"spec": {"replicas": -1}}
    assert (
        failure(lambda: apps.patch_namespaced_deployment_scale("web", NS, negative))[0].status
        == 422
    )


def test_deleting_a_deployment_answers_a_success_status(apps: AppsApi) -> None:
    created = apps.create_namespaced_deployment(NS, deployment())
    options = {"preconditions": {"uid": "not-the-uid"}}
    assert (
        failure(lambda: apps.delete_namespaced_deployment("web", NS, body=options))[0].status == 409
    )
    gone = apps.delete_namespaced_deployment("web", NS)
    status = gone if isinstance(gone, dict) else gone.to_dict()
    assert status["status"] == "Success"
    assert status["details"]["uid"] == created.metadata.uid
    assert failure(lambda: apps.delete_namespaced_deployment("web", NS))[0].status == 404


# -- Leases, Events, selectors -----------------------------------------------------------------


def test_lease_create_and_replace_with_optimistic_concurrency(api: client.ApiClient) -> None:
    leases: Any = client.CoordinationV1Api(api)
    renewed = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
    lease = client.V1Lease(
        metadata=client.V1ObjectMeta(name="canaryd-leader"),
        spec=client.V1LeaseSpec(
            holder_identity="pod-a", lease_duration_seconds=15, renew_time=renewed
        ),
    )
    first = leases.create_namespaced_lease(NS, lease)
    assert first.spec.renew_time == renewed
    taken = leases.read_namespaced_lease("canaryd-leader", NS)
    taken.spec.holder_identity = "pod-b"
    second = leases.replace_namespaced_lease("canaryd-leader", NS, taken)
    assert second.spec.holder_identity == "pod-b"
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    first.spec.holder_identity = "pod-c"
    error, body = failure(lambda: leases.replace_namespaced_lease("canaryd-leader", NS, first))
    assert error.status == 409
    assert body["message"].startswith(
        'Operation cannot be fulfilled on leases.coordination.k8s.io "canaryd-leader": '
        "the object has been modified"
    )
    assert leases.read_namespaced_lease("canaryd-leader", NS).spec.holder_identity == "pod-b"


def test_events_can_be_created_and_listed(api: client.ApiClient) -> None:
    core: Any = client.CoreV1Api(api)
    for name in ("demo", "other"):
        core.create_namespaced_event(
            NS,
            client.CoreV1Event(
                metadata=client.V1ObjectMeta(generate_name=f"{name}."),
                involved_object=client.V1ObjectReference(kind="Canary", name=name, namespace=NS),
                reason="Promoted", message=f"{name} promoted", type="Normal",
            ),
        )  # fmt: skip
    events = core.list_namespaced_event(NS, field_selector="involvedObject.name=demo").items
    assert [(e.reason, e.message) for e in events] == [("Promoted", "demo promoted")]
    assert events[0].metadata.name.startswith("demo.")
    assert len(core.list_namespaced_event(NS).items) == 2
    assert (
        failure(lambda: core.list_namespaced_event(NS, field_selector="spec.x=1"))[0].status == 400
    )


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=web", ["a", "b"]),
        ("app==web,tier!=back", ["a"]),
        ("tier in (front, back)", ["a", "b"]),
        ("tier notin (front)", ["b", "c"]),
        ("tier", ["a", "b"]),
        ("!tier", ["c"]),
        ("app=db", ["c"]),
        ("", ["a", "b", "c"]),
    ],
)
def test_label_selectors_on_list(crs: CustomApi, selector: str, expected: list[str]) -> None:
    create(crs, canary("a", {"app": "web", "tier": "front"}))
    create(crs, canary("b", {"app": "web", "tier": "back"}))
    create(crs, canary("c", {"app": "db"}))
    listed = crs.list_namespaced_custom_object(G, V, NS, P, label_selector=selector)
    assert [o["metadata"]["name"] for o in listed["items"]] == expected


def test_a_malformed_label_selector_is_400(crs: CustomApi) -> None:
    error, body = failure(
        lambda: crs.list_namespaced_custom_object(G, V, NS, P, label_selector="a=(b")
    )
    assert (error.status, body["reason"]) == (400, "BadRequest")


# -- fault injection and the request log ------------------------------------------------------


def test_injected_failures_hit_the_next_matching_requests(
    server: KubeApiServer, crs: CustomApi
) -> None:
    create(crs, canary())
    server.clear_log()
    fault = server.inject(verb="PATCH", path_contains="/status", status=409, times=1)
    status_patch = {"status": {"phase": "Progressing"}}
    error, body = failure(
        lambda: crs.patch_namespaced_custom_object_status(G, V, NS, P, "demo", status_patch)
    )
    assert (error.status, body["reason"], body["message"]) == (409, "Conflict", CONFLICT_MESSAGE)
    assert "status" not in read(crs)  # the failed request did nothing
    crs.patch_namespaced_custom_object_status(G, V, NS, P, "demo", status_patch)
    assert (fault.hits, fault.times) == (1, 0)
    server.inject(verb="list", status=503, times=2)
    for _ in range(2):
        error, body = failure(lambda: crs.list_namespaced_custom_object(G, V, NS, P))
        assert (error.status, body["reason"]) == (503, "ServiceUnavailable")
    assert read(crs)["status"] == status_patch["status"]  # a get is not a list
    assert len(crs.list_namespaced_custom_object(G, V, NS, P)["items"]) == 1
    server.inject(verb="create", status=500)
    error, body = failure(lambda: create(crs, canary("b")))
    assert (error.status, body["reason"]) == (500, "InternalError")
    path = f"/apis/{G}/{V}/namespaces/{NS}/{P}"
    assert server.requests == [
        RequestRecord("PATCH", f"{path}/demo/status", MERGE_PATCH),
        RequestRecord("GET", f"{path}/demo", None),
        RequestRecord("PATCH", f"{path}/demo/status", MERGE_PATCH),
        RequestRecord("GET", path, None),
        RequestRecord("GET", path, None),
        RequestRecord("GET", f"{path}/demo", None),
        RequestRecord("GET", path, None),
        RequestRecord("POST", path, None),  # this client sends no Content-Type
    ]
    assert server.writes == 1


def test_concurrent_writers_with_retry_on_conflict_lose_no_update(
    server: KubeApiServer, crs: CustomApi
) -> None:
    create(crs, canary(counter=0))

    def increment(times: int) -> None:
        for _ in range(times):
            while True:
                current = read(crs)
                current["spec"]["counter"] += 1
                try:
                    crs.replace_namespaced_custom_object(G, V, NS, P, "demo", current)
                    break
                except ApiException as error:
                    assert error.status == 409

    joins = [in_background(lambda: increment(10)) for _ in range(4)]
    for join in joins:
        join()
    assert read(crs)["spec"]["counter"] == 40
    assert read(crs)["metadata"]["generation"] == 41


# -- Istio versions, discovery, kubeconfig, in-process access ------------------------------


def test_istio_kinds_are_served_at_every_version_from_one_store(
    crs: CustomApi,
) -> None:
    vs = {
        "metadata": {"name": "checkout"},
        "spec": {"hosts": ["checkout"], "http": [{"name": "primary"}]},
    }
    created = crs.create_namespaced_custom_object(ISTIO, "v1", NS, "virtualservices", vs)
    old = crs.get_namespaced_custom_object(ISTIO, "v1beta1", NS, "virtualservices", "checkout")
    assert old["apiVersion"] == f"{ISTIO}/v1beta1"
    assert old["metadata"]["uid"] == created["metadata"]["uid"]
    weights = {"spec": {"http": [{"name": "primary", "route": [{"weight": 100}]}]}}
    crs.patch_namespaced_custom_object(
        ISTIO, "v1alpha3", NS, "virtualservices", "checkout", weights
    )
    now = crs.get_namespaced_custom_object(ISTIO, "v1", NS, "virtualservices", "checkout")
    assert now["apiVersion"] == f"{ISTIO}/v1"
    assert now["spec"]["http"][0]["route"] == [{"weight": 100}]
    dr = {"metadata": {"name": "checkout"}, "spec": {"subsets": [{"name": "stable"}]}}
    crs.create_namespaced_custom_object(ISTIO, "v1beta1", NS, "destinationrules", dr)
    rules = crs.list_namespaced_custom_object(ISTIO, "v1", NS, "destinationrules")["items"]
    assert [(r["apiVersion"], r["metadata"]["name"]) for r in rules] == [
        (f"{ISTIO}/v1", "checkout")
    ]


def test_discovery_serves_the_table(
    server: KubeApiServer, api: client.ApiClient, tmp_path: Path
) -> None:
    _, raw = raw_get(server, "/apis")
    groups = {g["name"]: [v["version"] for v in g["versions"]] for g in json.loads(raw)["groups"]}
    assert groups[G] == [V]
    assert groups[ISTIO] == ["v1", "v1beta1", "v1alpha3"]
    _, raw = raw_get(server, f"/apis/{G}/{V}")
    resources = {r["name"]: r for r in json.loads(raw)["resources"]}
    assert resources[P]["kind"] == "Canary"
    assert resources[P]["namespaced"] is True
    assert "canaries/status" in resources
    assert "watch" in resources[P]["verbs"]
    dyn = dynamic.DynamicClient(api, cache_file=str(tmp_path / "discovery.json"))  # type: ignore[no-untyped-call]
    canaries = dyn.resources.get(api_version=f"{G}/{V}", kind="Canary")
    canaries.create(body=canary(), namespace=NS)
    assert [c.metadata.name for c in canaries.get(namespace=NS).items] == ["demo"]
    deployments = dyn.resources.get(api_version="apps/v1", kind="Deployment")
    assert deployments.namespaced is True
    assert dyn.version["kubernetes"]["major"] == "1"


def test_kubeconfig_works_with_load_kube_config(server: KubeApiServer, tmp_path: Path) -> None:
    path = server.write_kubeconfig(tmp_path / "kubeconfig")
    written = yaml.safe_load(path.read_text())
    assert written == server.kube_config_dict()
    assert written["current-context"] == KUBECONFIG_NAME == "kubeapi-double"
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=configuration)
    assert configuration.host == server.url
    with client.ApiClient(configuration) as api:
        client.CustomObjectsApi(api).create_namespaced_custom_object(G, V, NS, P, canary())
    assert server.get(G, V, P, NS, "demo") is not None


def test_in_process_accessors_copy_and_seed(
    server: KubeApiServer, crs: CustomApi, apps: AppsApi
) -> None:
    create(crs, canary())
    copy_ = server.get(G, V, P, NS, "demo")
    assert copy_ is not None
    copy_["spec"]["service"] = "mutated"
    assert read(crs)["spec"]["service"] == "checkout"
    assert server.get(G, V, P, NS, "missing") is None
    half_done = deployment("seeded") | {
        "metadata": {"name": "seeded", "namespace": NS, "generation": 3},
        "status": {"observedGeneration": 2, "replicas": 2},
    }
    stored = server.put_raw("apps", "v1", "deployments", half_done)
    assert rv(stored) == server.resource_version
    live = apps.read_namespaced_deployment("seeded", NS)
    assert (live.metadata.generation, live.status.observed_generation) == (3, 2)  # no controller
    assert [o["metadata"]["name"] for o in server.list_objects("apps", "v1", "deployments")] == [
        "seeded"
    ]
    assert server.delete_raw("apps", "v1", "deployments", NS, "seeded") is True
    assert failure(lambda: apps.read_namespaced_deployment("seeded", NS))[0].status == 404


def test_the_canary_entry_matches_the_crd_manifest(crs: CustomApi) -> None:
    crd = yaml.safe_load((ROOT / "manifests" / "base" / "crd.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    assert (CANARIES.group, CANARIES.version) == (crd["spec"]["group"], version["name"])
    assert (CANARIES.plural, CANARIES.kind) == (
        crd["spec"]["names"]["plural"],
        crd["spec"]["names"]["kind"],
    )
    assert CANARIES.namespaced == (crd["spec"]["scope"] == "Namespaced")
    assert CANARIES.status_subresource == ("status" in version.get("subresources", {}))
    installed = crs.create_cluster_custom_object(
        "apiextensions.k8s.io", "v1", "customresourcedefinitions", crd
    )
    assert "namespace" not in installed["metadata"]
    got = crs.get_cluster_custom_object(
        "apiextensions.k8s.io", "v1", "customresourcedefinitions", "canaries.canaryd.io"
    )
    assert got["spec"]["group"] == G


def test_finalizers_hold_a_deleted_object_until_the_last_is_removed(
    server: KubeApiServer, api: client.ApiClient
) -> None:
    leases: Any = client.CoordinationV1Api(api)
    body = client.V1Lease(
        metadata=client.V1ObjectMeta(name="held", finalizers=["a.io/x", "b.io/y"])
    )
    leases.create_namespaced_lease(NS, body)
    stream = watch.Watch()
    version = leases.read_namespaced_lease("held", NS).metadata.resource_version
    leases.delete_namespaced_lease("held", NS)
    held = leases.read_namespaced_lease("held", NS)  # still there, marked
    assert held.metadata.deletion_timestamp is not None
    leases.delete_namespaced_lease("held", NS)  # again: nothing changes
    assert leases.read_namespaced_lease("held", NS).metadata.resource_version == (
        held.metadata.resource_version
    )
    held.metadata.finalizers = ["a.io/x", "b.io/y", "c.io/z"]
    error, problem = failure(lambda: leases.replace_namespaced_lease("held", NS, held))
    assert error.status == 422 and "no new finalizers can be added" in problem["message"]
    one = leases.patch_namespaced_lease("held", NS, {"metadata": {"finalizers": ["b.io/y"]}})
    assert one.metadata.finalizers == ["b.io/y"] and one.metadata.deletion_timestamp
    leases.patch_namespaced_lease("held", NS, {"metadata": {"finalizers": []}})
    error, _ = failure(lambda: leases.read_namespaced_lease("held", NS))
    assert error.status == 404
    kinds = [
        e["type"]
        for e in stream.stream(
            leases.list_namespaced_lease, NS, resource_version=version, timeout_seconds=1
        )
    ]
    assert kinds == ["MODIFIED", "MODIFIED", "DELETED"]
