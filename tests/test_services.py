"""The Prometheus harness of tests/services.py, against Debian's real Prometheus.

A tiny in-process exporter (prometheus_client's HTTP server on 127.0.0.1) is scraped
every second.  The lifecycle test pays Prometheus's discovery delay twice (~5-6 s before
the first scrape of a fresh start), so it checks everything it can per start.
"""

from __future__ import annotations

import socket
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from tests import services
from tests.services import (
    PrometheusError,
    PrometheusQueryError,
    PrometheusServer,
    Result,
    require_prometheus,
)

COUNTER = "svc_test_requests_total"


@contextmanager
def exporter(registry: CollectorRegistry) -> Iterator[str]:
    """Serve ``registry`` on a free 127.0.0.1 port; yields its ``host:port``."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def value(result: Result) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def gone(pid: int) -> bool:
    """The process has exited and been reaped: no zombie left behind."""
    return not Path(f"/proc/{pid}").exists()


def test_config_scrapes_the_mesh_job_with_the_exporters_labels(tmp_path: Path) -> None:
    prom = PrometheusServer(
        ["127.0.0.1:9100", "localhost:9101"],
        scrape_interval_s=0.5,
        workdir=tmp_path,
        extra_config={
            "global": {"external_labels": {"env": "test"}},
            "scrape_configs": [{"job_name": "x"}],
        },
    )
    config = prom.config()
    assert config["global"] == {
        "scrape_interval": "500ms",
        "evaluation_interval": "500ms",
        "external_labels": {"env": "test"},
    }
    mesh, extra = config["scrape_configs"]
    assert mesh == {
        "job_name": "mesh",
        "honor_labels": True,
        "scrape_interval": "500ms",
        "scrape_timeout": "500ms",
        "static_configs": [{"targets": ["127.0.0.1:9100", "localhost:9101"]}],
    }
    assert extra == {"job_name": "x"}
    assert (
        PrometheusServer([], scrape_interval_s=30).config()["scrape_configs"][0]["scrape_timeout"]
        == "10s"
    )
    assert [services._duration(s) for s in (1, 1.0, 15, 0.25, 1.5)] == [
        "1s",
        "1s",
        "15s",
        "250ms",
        "1500ms",
    ]
    with pytest.raises(ValueError, match="at least 1ms"):
        PrometheusServer([], scrape_interval_s=0)
    for bad in ("http://127.0.0.1:9100", "127.0.0.1:9100/metrics", "127.0.0.1"):
        with pytest.raises(ValueError, match="host:port"):
            PrometheusServer([bad])
    with pytest.raises(TypeError):
        PrometheusServer("127.0.0.1:9100")
    with pytest.raises(RuntimeError, match="no port"):
        _ = prom.url


def test_a_missing_prometheus_fails_the_test_with_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert services.prometheus_binary() is None
    with pytest.raises(pytest.fail.Exception) as failed:
        require_prometheus()
    assert "make test" in str(failed.value) and "apt-get install -y prometheus" in str(failed.value)
    prom = PrometheusServer([])
    with pytest.raises(PrometheusError, match="apt-get install -y prometheus"):
        prom.start()
    prom.close()


def test_a_config_prometheus_rejects_fails_start_with_the_log_tail() -> None:
    require_prometheus()
    prom = PrometheusServer(["127.0.0.1:9"], extra_config={"global": {"scrape_interval": "often"}})
    try:
        with pytest.raises(PrometheusError, match="exited") as failed:
            prom.start()
        assert "often" in str(failed.value), "the log's tail names the bad value"
        assert not prom.running
    finally:
        prom.close()
    assert not prom.workdir.exists()


def test_a_port_taken_before_prometheus_binds_it_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_prometheus()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        fresh = services._free_port
        monkeypatch.setattr(services, "_free_port", lambda: next(ports, None) or fresh())
        with PrometheusServer([]) as prom:
            assert prom.port != taken
            assert prom.query("vector(1)")[0]["value"][1] == "1"
            assert "address already in use" in prom.log_path.read_text()


def test_queries_answers_errors_and_timeouts(tmp_path: Path) -> None:
    require_prometheus()
    with PrometheusServer([], workdir=tmp_path / "prom") as prom:
        assert prom.url == f"http://127.0.0.1:{prom.port}"
        assert value(prom.query("1 + 1")) == 2.0  # a scalar, as a one-sample result
        assert prom.query('vector(3) * on() group_left label_replace(vector(1), "a", "b", "", "")')
        with pytest.raises(PrometheusQueryError, match="bad_data") as bad:
            prom.wait_for("sum(", timeout_s=10)  # a bad expression fails at once
        assert bad.value.error_type == "bad_data"
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="no_such_metric"):
            prom.wait_for("no_such_metric", timeout_s=0.5)
        assert time.monotonic() - start < 3
        pid = prom.pid
        assert pid is not None
    assert gone(pid)
    assert (tmp_path / "prom" / "prometheus.yml").exists(), "a given workdir is kept"


def test_scrape_stop_restart_and_reload() -> None:
    """One server through its life: reload, scrapes, down, back with its data, scrapes again."""
    require_prometheus()
    reg_a, reg_b = CollectorRegistry(), CollectorRegistry()
    requests = Counter("svc_test_requests", "requests", registry=reg_a)
    pods = Gauge("svc_test_pod_info", "a pod", ["instance", "pod"], registry=reg_b)
    pods.labels(instance="checkout-7f9c", pod="checkout-7f9c-x2").set(1)
    requests.inc(3)
    with exporter(reg_a) as a, exporter(reg_b) as b, PrometheusServer([a]) as prom:
        # reloaded before its first scrape: the first scrapes already include b
        prom.set_targets([a, b])
        assert prom.targets == [a, b]
        assert f"- {b}" in prom.config_path.read_text()
        prom.wait_scraped(timeout_s=20)
        assert value(prom.wait_for(COUNTER, timeout_s=5)) == 3.0
        info = prom.query("svc_test_pod_info")
        # honor_labels: the exporter's instance label wins over the target's
        assert [r["metric"]["instance"] for r in info] == ["checkout-7f9c"], info
        assert info[0]["metric"]["pod"] == "checkout-7f9c-x2"
        samples = value(prom.query(f"count_over_time({COUNTER}[1h])"))

        port, pid = prom.port, prom.pid
        assert pid is not None
        prom.stop()
        assert not prom.running and gone(pid)
        with pytest.raises(urllib.error.URLError) as refused:
            prom.query(COUNTER)
        assert isinstance(refused.value.reason, ConnectionRefusedError)
        prom.stop()  # stopping twice is fine
        requests.inc(2)  # counted while Prometheus is down

        prom.restart()
        assert prom.running and prom.port == port and prom.pid != pid
        # the same data directory: what was scraped before is still there
        assert value(prom.query(f"count_over_time({COUNTER}[1h])")) >= samples
        assert value(prom.query(f"max_over_time({COUNTER}[1h])")) >= 3.0
        # and scraping resumes with the targets set by the reload
        prom.wait_for(COUNTER, lambda r: bool(r) and value(r) == 5.0, timeout_s=20)
        prom.wait_scraped(timeout_s=5)
        workdir = prom.workdir
    assert not prom.running
    assert not workdir.exists(), "the temporary workdir is removed on exit"
