"""List-and-watch: one cache-feeding loop for any Kubernetes kind, in a thread.

The one implementation of the informer pattern in the project: the daemon
(``canaryd run``: Canaries and Deployments) and the mesh emulator
(:mod:`simulator.serve`: Canaries and VirtualServices) both keep their caches with it.
It lives beside the simulator for the same reason as :mod:`simulator.yamlload`: the
simulator must not import ``canaryd``, and ``canaryd`` may import this.

One :class:`Informer` keeps one kind in one scope (a namespace, or the cluster):

* **list**, in pages of ``page_size`` (``limit`` / ``continue``), handing every object
  to ``on_list``; then
* **watch** from the list's ``resourceVersion`` (with bookmarks), handing each
  ``ADDED`` / ``MODIFIED`` / ``DELETED`` to ``on_event``.  A watch the server ends is
  renewed from the last version seen;
* an expired version (**410 Gone**, as an HTTP error or an ``ERROR`` event) means a
  fresh list at once; any other error a fresh list after a **back-off** (0.5 s,
  doubling up to 5 s), logged once per failure.

Objects are handed over as the JSON dicts the API sent (no model decoding).  The
callbacks run on the informer's thread.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

Obj = dict[str, Any]
#: ``list_fn(**kwargs)``: a ``kubernetes`` client list call bound to its scope (group,
#: version, plural, namespace already given), e.g. ``functools.partial(
#: custom.list_namespaced_custom_object, group, version, namespace, plural)``.
ListFn = Callable[..., Any]


def custom_list_fn(
    api: Any, group: str, version: str, plural: str, namespace: str | None
) -> ListFn:
    """The list call of one custom resource kind in one scope (``None``: every
    namespace), for an :class:`Informer`; ``api`` is a ``CustomObjectsApi``."""
    if namespace:
        return functools.partial(
            api.list_namespaced_custom_object, group, version, namespace, plural
        )
    return functools.partial(api.list_cluster_custom_object, group, version, plural)


def _untyped(list_fn: ListFn) -> ListFn:
    """``list_fn`` without its docstring and annotations, from which the client's watch
    would learn a model type and decode every event into it (a Deployment event costs
    milliseconds that way); only the JSON is used here."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return list_fn(*args, **kwargs)

    return call


class _ExpiredError(Exception):
    """The watch's resourceVersion is too old (410): list again."""


@dataclass(eq=False)
class Informer:
    """Keeps one kind in one scope current: list (paginated), then watch from there.

    Attributes:
        list_fn: the scope's list call (see :data:`ListFn`).
        scope: a name for logs, e.g. ``"canaries in shop"``.
        on_list: every object of the scope, after each (re)list.
        on_event: each watch event after that, as ``(type, object)``.
        halt: set to stop; :meth:`stop` then ends an open watch at once.
        watch_timeout_s: each watch request ends after this and is renewed, seconds.
        page_size: objects per list page.
        synced: set once the first list has been handed over.
    """

    list_fn: ListFn
    scope: str
    on_list: Callable[[list[Obj]], None]
    on_event: Callable[[str, Obj], None]
    halt: threading.Event
    watch_timeout_s: float = 60.0
    page_size: int = 500
    synced: threading.Event = field(default_factory=threading.Event)
    _watch: Any = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"informer {self.scope}", daemon=True)
        self._thread.start()

    def interrupt(self) -> None:
        """Set ``halt`` and end an open watch, without waiting for the thread."""
        self.halt.set()
        stream = self._watch
        if stream is not None:
            stream.stop()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the watch at once and wait for the thread (``halt`` must be set)."""
        thread = self._thread
        deadline = time.monotonic() + timeout_s
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            stream = self._watch
            if stream is not None:
                stream.stop()  # shuts the socket down: the blocked read returns
            thread.join(0.05)

    def list_all(self) -> tuple[list[Obj], str]:
        """Every object of the scope (in pages) and the list's resourceVersion."""
        items: list[Obj] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size}
            if token:
                kwargs["_continue"] = token
            response = self.list_fn(**kwargs, _preload_content=False, _request_timeout=(10, 60))
            page = json.loads(response.data)
            if not isinstance(page, dict):
                raise TypeError(f"listing {self.scope}: unexpected answer")
            items += [i for i in page.get("items") or [] if isinstance(i, dict)]
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def run(self) -> None:
        """The loop (on the calling thread) until ``halt`` is set."""
        version = ""
        failures = 0
        while not self.halt.is_set():
            try:
                if not version:
                    items, version = self.list_all()
                    self.on_list(items)
                    self.synced.set()
                version = self._follow(version)
                failures = 0
            except _ExpiredError:
                log.debug("watch of %s expired; relisting", self.scope)
                version = ""
            except ApiException as exc:
                if exc.status == 410:
                    log.debug("watch of %s expired; relisting", self.scope)
                    version = ""
                    continue
                failures += 1
                version = self._failed(exc, failures)
            except Exception as exc:  # the API is unreachable, or the stream broke
                failures += 1
                version = self._failed(exc, failures)

    def _failed(self, exc: BaseException, failures: int) -> str:
        """Log, back off (0.5 s, doubling up to 5 s), and ask for a fresh list."""
        if not self.halt.is_set():
            delay_s = min(5.0, 0.25 * 2**failures)
            if isinstance(exc, ApiException):
                why = f"HTTP {exc.status} {exc.reason}"
            else:
                why = " ".join(str(exc).split())[:300] or type(exc).__name__
            log.warning("watch of %s failed, retrying in %.1f s: %s", self.scope, delay_s, why)
            self.halt.wait(delay_s)
        return ""

    def _follow(self, version: str) -> str:
        """Watch from ``version`` until the server ends the watch; the last version seen."""
        stream = self._watch = watch.Watch()
        timeout_s = max(1, int(self.watch_timeout_s))
        try:
            events = stream.stream(
                _untyped(self.list_fn),
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_s,
                _request_timeout=(10, timeout_s + 10),
            )
            for event in events:
                if self.halt.is_set():
                    break
                obj = event.get("raw_object")
                kind = event.get("type")
                if kind == "ERROR":
                    code = obj.get("code") if isinstance(obj, dict) else None
                    if code == 410:
                        raise _ExpiredError
                    raise RuntimeError(f"watch of {self.scope}: error event {obj!r:.200}")
                if not isinstance(obj, dict):
                    continue
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_event(kind, obj)
        finally:
            self._watch = None
        return version
