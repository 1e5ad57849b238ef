"""The one list-and-watch loop (``simulator.informer``), on the API double over HTTP:
paginated lists, watch events, 410 → relist, back-off after errors, for a typed kind
(Deployments) as for custom resources."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client as k8s

from kubedouble import KubeApiServer
from simulator.informer import Informer
from tests.conftest import NS, deployment

Obj = dict[str, Any]


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s")
        time.sleep(0.01)


class Recorder:
    """What an informer handed over, and every list call it made."""

    def __init__(self, apps: k8s.AppsV1Api) -> None:
        self.apps = apps
        self.lists: list[list[Obj]] = []
        self.events: list[tuple[str, str]] = []
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def list_fn(self, **kwargs: Any) -> Any:
        with self.lock:
            self.calls.append(dict(kwargs))
        return self.apps.list_namespaced_deployment(NS, **kwargs)

    def on_list(self, items: list[Obj]) -> None:
        with self.lock:
            self.lists.append(items)

    def on_event(self, kind: str, obj: Obj) -> None:
        with self.lock:
            self.events.append((kind, str(obj["metadata"]["name"])))

    def page_calls(self) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if not c.get("watch")]


@pytest.fixture
def apps(kubeapi: KubeApiServer) -> Iterator[k8s.AppsV1Api]:
    api = kubeapi.api_client()
    apps = k8s.AppsV1Api(api)
    for i in range(5):
        apps.create_namespaced_deployment(NS, deployment(f"app-{i}", "shop/app:1", "stable"))
    yield apps
    api.close()


@pytest.fixture
def informer(apps: k8s.AppsV1Api) -> Iterator[tuple[Informer, Recorder]]:
    recorder = Recorder(apps)
    informer = Informer(
        recorder.list_fn,
        "deployments in test",
        recorder.on_list,
        recorder.on_event,
        threading.Event(),
        watch_timeout_s=1.0,
        page_size=2,
    )
    informer.start()
    yield informer, recorder
    informer.halt.set()
    informer.stop()


def test_the_first_list_comes_in_pages_and_then_changes_come_by_watch(
    informer: tuple[Informer, Recorder], apps: k8s.AppsV1Api
) -> None:
    inf, rec = informer
    assert inf.synced.wait(5)
    assert sorted(o["metadata"]["name"] for o in rec.lists[0]) == [f"app-{i}" for i in range(5)]
    pages = rec.page_calls()
    assert [c["limit"] for c in pages] == [2, 2, 2]  # 5 objects, pages of 2
    assert "_continue" not in pages[0] and all(c["_continue"] for c in pages[1:])
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "x:2"}]}}}}
    apps.patch_namespaced_deployment("app-3", NS, patch)
    wait_for(lambda: ("MODIFIED", "app-3") in rec.events)
    apps.delete_namespaced_deployment("app-1", NS)
    wait_for(lambda: ("DELETED", "app-1") in rec.events)
    assert len(rec.lists) == 1  # no relist while the watch is healthy


def test_an_expired_watch_lists_again_and_misses_nothing(
    informer: tuple[Informer, Recorder], kubeapi: KubeApiServer, apps: k8s.AppsV1Api
) -> None:
    inf, rec = informer
    assert inf.synced.wait(5)
    time.sleep(0.3)  # the watch is open
    # a write the watch is not told of, then compaction: its renewal gets 410
    lease = {"metadata": {"name": "other", "namespace": NS}, "spec": {}}
    kubeapi.put_raw("coordination.k8s.io", "v1", "leases", copy.deepcopy(lease))
    kubeapi.compact()
    wait_for(lambda: len(rec.lists) >= 2, timeout_s=5.0)
    apps.create_namespaced_deployment(NS, deployment("app-new", "shop/app:1", "stable"))
    wait_for(lambda: ("ADDED", "app-new") in rec.events)


def test_a_failing_api_is_retried_with_back_off(
    kubeapi: KubeApiServer, apps: k8s.AppsV1Api
) -> None:
    kubeapi.inject(verb="list", path_contains="deployments", status=500, times=3)
    recorder = Recorder(apps)
    halt = threading.Event()
    inf = Informer(
        recorder.list_fn, "deployments in test", recorder.on_list, recorder.on_event, halt,
        watch_timeout_s=1.0,
    )  # fmt: skip
    started = time.monotonic()
    inf.start()
    try:
        assert inf.synced.wait(10)
        waited_s = time.monotonic() - started
        # three failures: 0.5 + 1 + 2 s of back-off before the list that works
        assert waited_s >= 3.0, waited_s
        assert len(recorder.page_calls()) == 4
        assert len(recorder.lists[0]) == 5
    finally:
        halt.set()
        inf.stop()


def test_the_daemons_resync_list_reads_every_page(
    cluster: KubeApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import canaryd.kube
    from canaryd.kube import Kube
    from tests.conftest import canary

    api = cluster.api_client()
    try:
        for i in range(4):
            k8s.CustomObjectsApi(api).create_namespaced_custom_object(
                "canaryd.io", "v1alpha1", NS, "canaries", canary(f"more-{i}")
            )
        monkeypatch.setattr(canaryd.kube, "LIST_PAGE_SIZE", 2)
        before = len(cluster.requests)
        names = [o["metadata"]["name"] for o in asyncio.run(Kube(api).list_canaries_raw(NS))]
        lists = [r for r in cluster.requests[before:] if r.path.endswith("/canaries")]
    finally:
        api.close()
    assert sorted(names) == sorted(["checkout", *(f"more-{i}" for i in range(4))])
    assert len(lists) == 3  # 5 Canaries in pages of 2
