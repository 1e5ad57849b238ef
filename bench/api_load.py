"""Status API benchmark (issue #11): request latency with 1,000 canaries in the cache, and
the control loop's round time with and without API load on loopback.

    .venv/bin/python bench/api_load.py                 # both parts
    .venv/bin/python bench/api_load.py --part latency  # list/detail p50/p99 only
    .venv/bin/python bench/api_load.py --part rounds --canaries 100 --seconds 20

Part 1 serves an app whose hub holds N canaries (default 1,000) with uvicorn in a
thread and times sequential GETs of the list and of one detail from the main thread.
Part 2 runs the playground's daemon and API (simulated traffic; the Kubernetes API double
in a process of its own, as a real API server would be) with N canaries on a 1 s
interval and reports the median and p90 round time (first reconcile start to last
reconcile end of each tick) in alternating windows: without load, then while a second
process keeps 200 clients polling the list once a second and 50 SSE subscribers open.
Targets: list p99 <= 50 ms; round time under load within 10% of without.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from canaryd.api import ApiSettings, bind, create_app, serve
from canaryd.hub import StatusHub
from canaryd.kube import to_canary
from canaryd.logs import configure
from canaryd.playground import Playground, Sample
from canaryd.status import CanaryStatus, CheckRecord, Phase, VerdictRecord
from tests.conftest import canary


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _hub(n: int) -> StatusHub:
    hub = StatusHub()
    verdict = VerdictRecord(
        decision="continue",
        at=datetime.now(UTC),
        reasons=["errors: canary 0.50% vs stable 0.50%"],
        checks=[CheckRecord(name="errors", status="ok", e_value=0.4, threshold=250, reason="ok")],
    )
    for i in range(n):
        obj = copy.deepcopy(canary(f"svc-{i:04d}"))
        obj["metadata"] |= {"namespace": f"team-{i % 20}", "resourceVersion": str(i + 1)}
        status = CanaryStatus(
            phase=Phase.PROGRESSING, revision="v2", canary_weight=10, last_verdict=verdict
        )
        obj["status"] = status.to_json()
        hub.update(to_canary(obj))
    return hub


async def _noop(*_: object) -> None:
    return None


def latency(n: int, requests: int) -> None:
    hub = _hub(n)
    app = create_app(hub, _noop, ApiSettings())
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(serve(app, sock, stop, hub.close),), daemon=True
    )
    thread.start()
    time.sleep(0.5)
    with httpx.Client(base_url=url, timeout=10) as http:
        for path, label in (
            ("/api/v1/canaries", f"list of {n}"),
            ("/api/v1/canaries/team-3/svc-0003", "detail"),
        ):
            http.get(path).raise_for_status()
            times = []
            for _ in range(requests):
                t0 = time.perf_counter()
                http.get(path).raise_for_status()
                times.append((time.perf_counter() - t0) * 1000)
            print(
                f"{label:<14} p50 {_pct(times, 0.5):6.2f} ms   p99 {_pct(times, 0.99):6.2f} ms"
                f"   ({requests} sequential requests)"
            )
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)


LOAD = """
import asyncio, sys, httpx
url = sys.argv[1]
async def poll(http):
    while True:
        try:
            await http.get("/api/v1/canaries")
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1.0)
async def stream(http):
    while True:
        try:
            async with http.stream("GET", "/api/v1/events") as r:
                async for _ in r.aiter_lines():
                    pass
        except httpx.HTTPError:
            await asyncio.sleep(0.5)
async def main():
    limits = httpx.Limits(max_connections=300)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        await asyncio.gather(*[poll(http) for _ in range(200)], *[stream(http) for _ in range(50)])
asyncio.run(main())
"""


KUBE = """
import sys
sys.path.insert(0, sys.argv[1])
from canaryd.playground import Sample, seed
from kubedouble.apiserver import KubeApiServer
n, interval_s = int(sys.argv[2]), float(sys.argv[3])
samples = tuple(Sample(f"svc-{i:03d}", "healthy", "") for i in range(n))
server = KubeApiServer().start()
client = server.api_client()
seed(server, client, samples, interval_s)
print(server.url, flush=True)
sys.stdin.read()  # until the bench closes our stdin
server.stop()
"""


def _pin(proc: subprocess.Popen[str] | subprocess.Popen[bytes], cpu: int | None) -> None:
    """Pin a child process to ``cpu`` (None: leave it to the scheduler)."""
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})


def rounds(n: int, seconds: float, pairs: int, pin: bool = False) -> None:
    """Round time with and without API load, in alternating windows (quiet, loaded, quiet,
    ...) so that the rollouts' phases are the same mix in both. The Kubernetes API double
    runs in its own process, as the real API server would: in this one it would share the
    daemon's GIL and the comparison would measure the double.  With ``pin``, the daemon
    (this process) runs on CPU 0 and the double and the load generator on CPU 1, so the
    comparison shows the daemon's own cost of serving the API, not three processes
    competing for two cores."""
    if pin:
        os.sched_setaffinity(0, {0})
    root = str(Path(__file__).resolve().parent.parent)
    interval_s = 1.0
    kube = subprocess.Popen(
        [sys.executable, "-c", KUBE, root, str(n), str(interval_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    _pin(kube, 1 if pin else None)
    assert kube.stdout is not None and kube.stdin is not None
    kube_url = kube.stdout.readline().strip()
    configure("warning")
    samples = tuple(Sample(f"svc-{i:03d}", "healthy", "") for i in range(n))
    pg = Playground(
        host="127.0.0.1",
        port=0,
        speed=60,
        interval_s=interval_s,
        restart_after_s=1.0,
        samples=samples,
        kube_url=kube_url,
    )
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(pg.run(stop),), daemon=True)
    thread.start()
    time.sleep(8)  # every canary discovered and rolling

    def window() -> list[float]:
        assert pg.daemon is not None
        start = time.time()
        time.sleep(seconds)
        return [
            r.duration_s * 1000
            for tick, r in list(pg.daemon.rounds.items())
            if start + 1 < tick < start + seconds and r.reconciles >= n // 2
        ]

    quiet: list[float] = []
    busy: list[float] = []
    subs = 0
    for _ in range(pairs):
        quiet += window()
        load = subprocess.Popen([sys.executable, "-c", LOAD, pg.url])
        _pin(load, 1 if pin else None)
        time.sleep(3)  # every client connected
        busy += window()
        subs = max(subs, pg.hub.subscribers)
        load.terminate()
        load.wait(10)
        time.sleep(1)
    loop.call_soon_threadsafe(stop.set)
    thread.join(20)
    kube.stdin.close()
    kube.wait(20)
    for label, values in (("no API load", quiet), ("200 pollers + 50 SSE", busy)):
        print(
            f"{label:<22} rounds {len(values):3d}  median {statistics.median(values):7.1f} ms"
            f"   p90 {_pct(values, 0.9):7.1f} ms   ({n} canaries, 1 s interval)"
        )
    change = statistics.median(busy) / statistics.median(quiet) - 1
    where = "; daemon pinned to CPU 0, double and load to CPU 1" if pin else ""
    print(
        f"median round time under load: {change:+.1%} (SSE subscribers under load: {subs}{where})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--part", choices=["latency", "rounds", "all"], default="all")
    parser.add_argument("--canaries", type=int, default=0, help="default 1000 / 100")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0, help="per window")
    parser.add_argument("--pairs", type=int, default=3, help="quiet/loaded window pairs")
    parser.add_argument(
        "--pin", action="store_true", help="daemon on CPU 0; the double and the load on CPU 1"
    )
    args = parser.parse_args()
    if args.part in ("latency", "all"):
        latency(args.canaries or 1000, args.requests)
    if args.part in ("rounds", "all"):
        rounds(args.canaries or 100, args.seconds, args.pairs, args.pin)


if __name__ == "__main__":
    main()
