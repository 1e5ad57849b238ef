"""Real services for tests and benchmarks: a Prometheus server scraping given targets.

:class:`PrometheusServer` runs ``/usr/bin/prometheus`` (Debian's package, 2.42; ``make
test`` installs it) on a free 127.0.0.1 port, scraping one job, ``mesh``, whose static
targets are the ``host:port`` of ``/metrics`` endpoints::

    with PrometheusServer(["127.0.0.1:9100"], scrape_interval_s=1.0) as prom:
        prom.wait_scraped()
        prom.query("sum(istio_requests_total)")

The server can be stopped and started again on the same port with the same data
directory (:meth:`PrometheusServer.restart`), to play "Prometheus went away and came
back", and its targets changed on the fly (:meth:`PrometheusServer.set_targets`).

Timing, measured with Debian's 2.42: the server is ready ~0.1 s after it starts, but
its first scrape comes ~5-6 s later, and a changed target list is picked up 5-10 s
after the reload: target discovery and the scrape manager each batch changes into 5 s
ticks, and 2.42 cannot shorten them.  Wait with :meth:`PrometheusServer.wait_scraped`
or :meth:`PrometheusServer.wait_for` rather than sleeping.

This module does not need pytest (``bench/`` scripts import it); only
:func:`require_prometheus` does, and imports it when called.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

__all__ = [
    "PrometheusError",
    "PrometheusQueryError",
    "PrometheusServer",
    "prometheus_binary",
    "require_prometheus",
]

JOB = "mesh"
#: how often the readiness and :meth:`PrometheusServer.wait_for` loops poll
POLL_S = 0.2
_READY_POLL_S = 0.05
#: fresh ports tried when another process takes the one picked before Prometheus binds it
_PORT_ATTEMPTS = 5
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy

Result = list[dict[str, Any]]


class PrometheusError(RuntimeError):
    """Prometheus did not start, exited, or rejected a reload; the message has its log tail."""


class PrometheusQueryError(ValueError):
    """Prometheus's HTTP API answered a query with ``"status": "error"``."""

    def __init__(self, expr: str, error_type: str, error: str) -> None:
        super().__init__(f"{error_type}: {error} (query: {expr})")
        self.error_type = error_type
        self.error = error


def prometheus_binary() -> str | None:
    """The ``prometheus`` executable on ``PATH``, or ``None`` when it is not installed."""
    return shutil.which("prometheus")


def require_prometheus() -> str:
    """The ``prometheus`` executable; fails the calling test, never skips it, if missing."""
    binary = prometheus_binary()
    if binary is None:
        import pytest

        pytest.fail(
            "Prometheus is not installed (no `prometheus` on PATH), and this test needs a real one:"
            " run `make test`, which installs it, or `apt-get install -y prometheus`",
            pytrace=False,
        )
    return binary


def _duration(seconds: float) -> str:
    """A Prometheus duration: ``1s``, ``15s``, ``500ms``."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"a Prometheus duration must be at least 1ms, not {seconds!r}s")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now (it may be taken before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> list[str]:
    """A prefix for the command line that SIGTERMs the server when this process dies.

    So that a test run that is killed (a timeout, ``kill -9``) leaves no server behind:
    util-linux's ``setpriv --pdeathsig`` (Linux; it execs the server in its place).  The
    signal follows the *thread* that starts the server, so only from the main thread.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


class _Owned:
    """What a server owns; cleaned up by :meth:`PrometheusServer.close`, or on collection.

    Kept apart from the server so that a ``weakref.finalize`` can hold it: a server that
    is dropped or outlived by the interpreter still ends its process and removes its
    temporary directory, instead of leaving them (and a ResourceWarning) behind.
    """

    def __init__(self, tmpdir: Path | None) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmpdir = tmpdir

    def stop(self, timeout_s: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self, timeout_s: float = 10.0) -> None:
        self.stop(timeout_s)
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


class PrometheusServer:
    """A real Prometheus on 127.0.0.1 scraping ``targets`` as the job ``mesh``.

    Args:
        targets: ``host:port`` of the ``/metrics`` endpoints to scrape (no scheme).
        scrape_interval_s: scrape and rule-evaluation interval; the scrape timeout is
            the interval, at most 10 s.
        workdir: holds ``prometheus.yml``, ``prometheus.log`` and ``data/``; kept
            afterwards.  Default: a temporary directory that :meth:`close` (or leaving
            the ``with`` block) removes.
        extra_config: top-level keys merged into ``prometheus.yml`` (``rule_files``,
            ``global``...); its ``scrape_configs`` are added after the ``mesh`` job.
        extra_args: more command-line flags for ``prometheus``.
        port: the port to listen on; default: a free one, picked by :meth:`start`.
        binary: the ``prometheus`` executable; default: the one on ``PATH``.
        ready_timeout_s: how long :meth:`start` waits for ``/-/ready``.
        stop_timeout_s: how long :meth:`stop` waits after SIGTERM before SIGKILL.

    The ``mesh`` job has ``honor_labels: true``: labels the exporter sets (``pod``,
    ``instance``, ``job``...) win over the ones Prometheus attaches.  ``up`` and the
    other synthetic series carry ``job="mesh"`` and ``instance`` = the target string.
    """

    def __init__(
        self,
        targets: Sequence[str],
        scrape_interval_s: float = 1.0,
        workdir: Path | None = None,
        extra_config: Mapping[str, Any] | None = None,
        *,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        binary: str | None = None,
        ready_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self._interval = _duration(scrape_interval_s)
        self._timeout = _duration(min(scrape_interval_s, 10.0))
        self._targets = self._check_targets(targets)
        self._extra_config = dict(extra_config or {})
        self._extra_args = list(extra_args)
        self._port = port
        self._binary = binary
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        if workdir is None:
            tmpdir = Path(tempfile.mkdtemp(prefix="prometheus-"))
            self.workdir = tmpdir
        else:
            tmpdir = None
            self.workdir = Path(workdir)
        self._owned = _Owned(tmpdir)
        self._finalizer = weakref.finalize(self, _Owned.close, self._owned)

    # -- where things are --------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port Prometheus listens on (fixed by the first :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("PrometheusServer has no port before start()")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, the base URL of the HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "prometheus.yml"

    @property
    def data_dir(self) -> Path:
        """The TSDB directory, kept across :meth:`restart`."""
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        """Prometheus's stdout and stderr, appended to across restarts."""
        return self.workdir / "prometheus.log"

    @property
    def targets(self) -> list[str]:
        return list(self._targets)

    @property
    def running(self) -> bool:
        proc = self._owned.proc
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._owned.proc.pid if self._owned.proc is not None else None

    def config(self) -> dict[str, Any]:
        """The configuration :meth:`start` and :meth:`set_targets` write."""
        job: dict[str, Any] = {
            "job_name": JOB,
            "honor_labels": True,
            "scrape_interval": self._interval,
            "scrape_timeout": self._timeout,
            "static_configs": [{"targets": list(self._targets)}],
        }
        extra = dict(self._extra_config)
        more_jobs = list(extra.pop("scrape_configs", None) or [])
        global_ = {"scrape_interval": self._interval, "evaluation_interval": self._interval}
        global_.update(extra.pop("global", None) or {})
        return {"global": global_, **extra, "scrape_configs": [job, *more_jobs]}

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start Prometheus and wait until ``/-/ready`` answers 200.

        The first start picks the port (unless given); later ones reuse it and the data
        directory.  Raises :class:`PrometheusError`, with the log's tail, if Prometheus
        exits or is not ready within ``ready_timeout_s``.
        """
        if self.running:
            raise RuntimeError(f"Prometheus is already running on {self.url}")
        self._owned.stop(self.stop_timeout_s)  # reap one that exited by itself
        binary = self._binary or prometheus_binary()
        if binary is None:
            raise PrometheusError(
                "Prometheus is not installed (no `prometheus` on PATH): run `make test`,"
                " which installs it, or `apt-get install -y prometheus`"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self._write_config()
        pick = self._port is None
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            if pick:
                self._port = _free_port()
            try:
                self._launch(binary)
                return
            except PrometheusError:
                # another process took the port between _free_port() and Prometheus's bind
                if not (pick and attempt < _PORT_ATTEMPTS and self._port_taken()):
                    raise

    def stop(self) -> None:
        """SIGTERM Prometheus and wait for it to exit (SIGKILL after ``stop_timeout_s``).

        Keeps the port, the data directory and the log, for :meth:`start` or
        :meth:`restart`.  Does nothing if it is not running.
        """
        self._owned.stop(self.stop_timeout_s)

    def restart(self) -> None:
        """:meth:`stop`, then :meth:`start` again on the same port with the same data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """:meth:`stop`, and remove the working directory if it is a temporary one."""
        self._owned.close(self.stop_timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "no port yet"
        state = "running" if self.running else "stopped"
        return f"<PrometheusServer {where} {state} targets={self._targets}>"

    def set_targets(self, targets: Sequence[str]) -> None:
        """Scrape ``targets`` instead: rewrite the configuration and reload it if running.

        Prometheus picks the change up within 5-10 s of the reload; see
        :meth:`wait_scraped`.  Raises :class:`PrometheusError` if the reload fails.
        """
        self._targets = self._check_targets(targets)
        self._write_config()
        if not self.running:
            return
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        try:
            with _HTTP.open(request, timeout=30) as response:
                response.read()
        except urllib.error.HTTPError as e:
            with e:
                body = e.read().decode(errors="replace").strip()
            raise PrometheusError(f"reload failed ({e.code}): {body}\n{self._tail()}") from None

    # -- queries ------------------------------------------------------------------------

    def query(self, expr: str, timeout_s: float = 10.0) -> Result:
        """Evaluate ``expr`` now; returns ``data.result``.

        A vector is a list of ``{"metric": {...}, "value": [ts, "v"]}``, a matrix of
        ``{"metric": {...}, "values": [[ts, "v"], ...]}``; a scalar or string comes back
        as ``[{"metric": {}, "value": [ts, "v"]}]``.  Raises
        :class:`PrometheusQueryError` for an error answer (a bad expression...) and
        ``urllib.error.URLError`` (an ``OSError``) when Prometheus cannot be reached.
        """
        params = urllib.parse.urlencode({"query": expr})
        try:
            with _HTTP.open(f"{self.url}/api/v1/query?{params}", timeout=timeout_s) as response:
                body: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as e:
            with e:
                raw = e.read()
            try:
                body = json.loads(raw)
            except ValueError:
                raise e from None
            if not isinstance(body, dict) or body.get("status") != "error":
                raise e from None
        if body.get("status") != "success":
            raise PrometheusQueryError(expr, str(body.get("errorType")), str(body.get("error")))
        data: dict[str, Any] = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: Result = data["result"]
        return result

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[Result], bool] = bool,
        timeout_s: float = 30.0,
    ) -> Result:
        """Query ``expr`` every 0.2 s until ``predicate(result)``; returns that result.

        The default predicate waits for a non-empty result.  While Prometheus cannot be
        reached or answers with a server error, keeps polling; a bad expression raises
        at once.  Raises :class:`TimeoutError` (with the last result or error, and the
        log's tail) after ``timeout_s``, and :class:`PrometheusError` if Prometheus exits.
        """
        deadline = time.monotonic() + timeout_s
        last: object = "no answer yet"
        while True:
            try:
                result = self.query(expr, timeout_s=max(0.5, min(5.0, timeout_s)))
            except PrometheusQueryError as e:
                if e.error_type == "bad_data":
                    raise
                last = e
            except OSError as e:
                last = e
            else:
                if predicate(result):
                    return result
                last = result
            if self._owned.proc is not None and not self.running:
                raise PrometheusError(f"Prometheus exited while waiting for {expr}\n{self._tail()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{expr!r} did not satisfy the predicate within {timeout_s:g}s;"
                    f" last: {last}\n{self._tail()}"
                )
            time.sleep(POLL_S)

    def wait_scraped(self, timeout_s: float = 30.0) -> None:
        """Wait until every target has been scraped successfully: its ``up`` is 1.

        A fresh Prometheus scrapes for the first time ~5-6 s after it starts, and new
        targets 5-10 s after :meth:`set_targets`.
        """
        want = set(self._targets)

        def all_up(result: Result) -> bool:
            up = {r["metric"].get("instance") for r in result if r["value"][1] == "1"}
            return want <= up

        self.wait_for(f'up{{job="{JOB}"}}', all_up, timeout_s)

    # -- internals ----------------------------------------------------------------------

    @staticmethod
    def _check_targets(targets: Sequence[str]) -> list[str]:
        if isinstance(targets, str):
            raise TypeError("targets is a list of host:port strings, not one string")
        for target in targets:
            if "://" in target or "/" in target or ":" not in target:
                raise ValueError(f"a target is host:port, without scheme or path: {target!r}")
        return list(targets)

    def _write_config(self) -> None:
        """Write ``prometheus.yml`` atomically: a reload never reads half a file."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".yml.tmp")
        tmp.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        tmp.replace(self.config_path)

    def _argv(self, binary: str) -> list[str]:
        return [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",  # POST /-/reload for set_targets()
            "--log.level=warn",
            *self._extra_args,
        ]

    def _launch(self, binary: str) -> None:
        """Run Prometheus and wait for ``/-/ready``; on failure it is stopped again."""
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting on port {self.port}\n".encode())
            log.flush()
            self._owned.proc = subprocess.Popen(
                [*_die_with_parent(), *self._argv(binary)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        try:
            self._wait_ready()
        except BaseException:
            self._owned.stop(self.stop_timeout_s)
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            proc = self._owned.proc
            assert proc is not None
            code = proc.poll()
            if code is not None:
                raise PrometheusError(f"Prometheus exited ({code}) on start\n{self._tail()}")
            try:
                with _HTTP.open(f"{self.url}/-/ready", timeout=1.0) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as e:  # 503 until the TSDB is open
                e.close()
            except OSError:  # connection refused: not listening yet
                pass
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"Prometheus was not ready on {self.url} within {self.ready_timeout_s:g}s\n"
                    f"{self._tail()}"
                )
            time.sleep(_READY_POLL_S)

    def _port_taken(self) -> bool:
        return "address already in use" in self._tail(5)

    def _tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path}:\n{tail}"


def _main(argv: Sequence[str]) -> int:
    """``python -m tests.services HOST:PORT...``: run Prometheus in the foreground."""
    if not argv:
        print("usage: python -m tests.services HOST:PORT [HOST:PORT...]", file=sys.stderr)
        return 2
    with PrometheusServer(list(argv)) as prom:
        print(f"Prometheus on {prom.url}, scraping {', '.join(argv)}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while prom.running:
                time.sleep(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))


def istio_openmetrics(requests: Sequence[str], buckets: Sequence[str]) -> str:
    """An OpenMetrics file of Istio request counters and latency bucket series, each
    series' samples in time order (``promtool`` backfills it)."""
    return (
        "\n".join(
            [
                "# TYPE istio_requests counter",
                *requests,
                "# TYPE istio_request_duration_milliseconds_bucket gauge",
                *buckets,
                "# EOF",
            ]
        )
        + "\n"
    )


def backfilled_prometheus(workdir: Path, openmetrics: str) -> PrometheusServer:
    """A Prometheus (not started) whose data directory holds ``openmetrics``'s
    history, backfilled with ``promtool tsdb create-blocks-from openmetrics``."""
    require_prometheus()
    source = workdir / "history.om"
    source.write_text(openmetrics)
    subprocess.run(
        [
            "promtool",
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            str(source),
            str(workdir / "data"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return PrometheusServer([], workdir=workdir)
