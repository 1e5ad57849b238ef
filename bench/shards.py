"""Sharding benchmark (issue 19): N canaries on R replica processes sharing S shards.

Run: ``python bench/shards.py [--canaries 10000] [--replicas 4] [--shards 8]
[--interval 30] [--rounds 3] [--lease 15] [--out bench/results]``

Everything is a separate process, as in production:

* the Kubernetes API double holding N Canaries (each with a pending ``promote``), their
  Deployments, VirtualServices and DestinationRules (``bench/scale.py``'s objects);
* R replicas, each the real :class:`canaryd.daemon.Daemon` with ``shards=S`` and its
  own identity, on simulated traffic (``canaryd run --simulate healthy`` does the
  same; Prometheus is ``bench/scale.py``'s subject, not this one's), writing every
  round (``status_refresh_s`` 0).

It reports each replica's round time (median over the measured rounds: first
reconcile's start to the last one's end, for the Canaries it holds) and the Canaries
it reconciled per round; then kills one replica with SIGKILL and reports how long the
others took to hold every shard (from the kill to the last survivor's log line saying
it took one); and, from the double's write log, how many writes of a Canary's objects
(its status, VirtualService, Deployments) came from a replica that was not, by the
last write of the Canary's shard Lease before it, that shard's holder (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scale import NS, populate  # noqa: E402  (this directory: python bench/shards.py)

LEASE = "canaryd"
_TARGET = re.compile(r"/(?:canaries|virtualservices|deployments)/(svc\d+)(?:-canary)?(?:/|$)")


def double_writes(log: list[Any], shards: int) -> tuple[int, int]:
    """(writes of Canaries' objects by replicas, of them by a non-holder)."""
    from canaryd.ports import CanaryRef
    from canaryd.shards import shard_of
    from kubedouble.apiserver import writes_by_non_holders

    total, bad = writes_by_non_holders(
        log,
        re.compile(rf"^{LEASE}-shard-(\d+)$"),
        _TARGET,
        lambda name: shard_of(CanaryRef(NS, name), shards),
    )
    return total, len(bad)


def serve_kubeapi(n: int, interval: str, shards: int, workdir: Path) -> None:
    """Child: the API double with N canaries; answers ``check`` lines on stdin."""
    from kubedouble.apiserver import KubeApiServer

    with KubeApiServer(history_limit=50_000) as server:
        populate(server, n, interval)
        path = server.write_kubeconfig(workdir / "kubeconfig", namespace=NS)
        print(json.dumps({"kubeconfig": str(path)}), flush=True)
        for _ in sys.stdin:
            total, bad = double_writes(server.write_log, shards)
            print(json.dumps({"replica_writes": total, "double_writes": bad}), flush=True)


async def replica(identity: str, kubeconfig: str, shards: int, lease_s: float) -> None:
    """Child: one replica; JSON lines on stdout (shards held, rounds ended)."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    from canaryd.daemon import Daemon, DaemonSettings
    from canaryd.istio import IstioRouter
    from canaryd.kube import Kube
    from canaryd.leader import LeaseSettings
    from canaryd.simsource import SimulatedMetrics
    from canaryd.workloads import Deployments
    from simulator import get_scenario

    configuration = k8s.Configuration()
    k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = 32
    api = k8s.ApiClient(configuration)
    api.user_agent = f"canaryd-bench ({identity})"
    kube = Kube(api, timeout_s=30.0)
    router = IstioRouter(kube)
    metrics = SimulatedMetrics(get_scenario("healthy"), router, speed=1.0, seed=7)
    lease = LeaseSettings(NS, LEASE, identity, lease_s, lease_s * 2 / 3, 1.0)
    settings = DaemonSettings(
        lease=lease, shards=shards, resync_s=60.0, drain_s=30.0, status_refresh_s=0.0,
        metrics_timeout_s=25.0, watch_timeout_s=120.0,
    )  # fmt: skip
    daemon = Daemon(kube, metrics, router, Deployments(kube), settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.create_task(daemon.run(stop), name="daemon")
    held: list[int] | None = None
    told: set[float] = set()
    assert daemon.shards is not None
    try:
        while not task.done():
            await asyncio.sleep(0.2)
            now = daemon.shards.held
            if now != held:
                held = now
                print(json.dumps({"t": time.time(), "held": held}), flush=True)
            for tick, stats in list(daemon.rounds.items()):
                interval = next(
                    (t.interval_s for t in daemon.canaries.values() if t.interval_s), None
                )
                if interval is None or tick in told or tick > time.time() - 1.5 * interval:
                    continue
                told.add(tick)
                print(json.dumps({"round": tick, "duration_s": stats.duration_s,
                                  "reconciles": stats.reconciles, "writes": stats.writes,
                                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                  / 1024}), flush=True)  # fmt: skip
        task.result()
    finally:
        api.close()


def _child(argv: list[str], log: IO[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            text=True, cwd=ROOT)  # fmt: skip


class Reader:
    """Collects a replica's JSON lines in a thread."""

    def __init__(self, identity: str, proc: subprocess.Popen[str]) -> None:
        import threading

        self.identity, self.proc = identity, proc
        self.held: list[tuple[float, list[int]]] = []
        self.rounds: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if "held" in item:
                self.held.append((item["t"], item["held"]))
            elif "round" in item:
                self.rounds.append(item)

    @property
    def now_held(self) -> list[int]:
        return self.held[-1][1] if self.held else []


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="canaryd-shards-") as tmp:
        work = Path(tmp)
        logs = (work / "children.log").open("w")
        procs: list[subprocess.Popen[str]] = []
        try:
            started = time.monotonic()
            kubeapi = _child(
                [sys.executable, __file__, "--kubeapi-child", "--canaries", str(args.canaries),
                 "--interval", f"{args.interval:g}", "--shards", str(args.shards),
                 "--workdir", str(work)], logs,
            )  # fmt: skip
            procs.append(kubeapi)
            assert kubeapi.stdout is not None and kubeapi.stdin is not None
            line = kubeapi.stdout.readline()
            if not line:
                raise SystemExit(f"the API double did not start; see {logs.name}")
            kubeconfig = json.loads(line)["kubeconfig"]
            print(f"{args.canaries} canaries in the double in "
                  f"{time.monotonic() - started:.0f}s", file=sys.stderr)  # fmt: skip
            readers = []
            for number in range(args.replicas):
                identity = f"r{number}"
                proc = _child([sys.executable, __file__, "--replica", identity, "--kubeconfig",
                               kubeconfig, "--shards", str(args.shards), "--lease",
                               f"{args.lease:g}"], logs)  # fmt: skip
                procs.append(proc)
                readers.append(Reader(identity, proc))
            # measured rounds: after every replica holds its share and two rounds passed
            deadline = time.monotonic() + 1800
            while any(len(r.rounds) < args.rounds + 2 for r in readers):
                if time.monotonic() > deadline:
                    raise SystemExit("replicas did not report their rounds in 30 min")
                if any(p.poll() is not None for p in procs):
                    raise SystemExit(f"a child exited; see {logs.name}")
                time.sleep(1)
            per_replica = {}
            for r in readers:
                measured = r.rounds[2 : 2 + args.rounds]
                since = measured[0]["round"]
                per_replica[r.identity] = {
                    "shards": r.now_held,
                    # shards taken or lost during the measured rounds (0 when stable)
                    "shard_changes": sum(1 for t, _ in r.held if t >= since),
                    "round_s_median": statistics.median(x["duration_s"] for x in measured),
                    "canaries_per_round": statistics.median(x["reconciles"] for x in measured),
                    "writes_per_round": statistics.median(x["writes"] for x in measured),
                    "peak_rss_mb": max(x["rss_mb"] for x in measured),
                }
                print(f"{r.identity}: {per_replica[r.identity]}", file=sys.stderr)
            victim = readers[0]
            lost = set(victim.now_held)
            killed = time.time()
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            survivors = readers[1:]
            while set().union(*(r.now_held for r in survivors)) != set(range(args.shards)):
                if time.time() - killed > 10 * args.lease:
                    raise SystemExit("the killed replica's shards were not taken over")
                time.sleep(0.2)
            took_s = max(t for r in survivors for t, _ in r.held) - killed
            print(f"shards {sorted(lost)} taken over in {took_s:.1f}s", file=sys.stderr)
            time.sleep(2 * args.interval)  # the survivors reconcile the lost canaries
            for proc in procs[1:]:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs[1:]:  # they drain (drain_s 30) and release their shards
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    print(f"a replica did not stop in 120 s; killed (see {logs.name})",
                          file=sys.stderr)  # fmt: skip
                    proc.kill()
                    proc.wait()
            kubeapi.stdin.write("check\n")
            kubeapi.stdin.flush()
            check = json.loads(kubeapi.stdout.readline())
            return {
                "canaries": args.canaries, "replicas": args.replicas, "shards": args.shards,
                "interval_s": args.interval, "lease_s": args.lease,
                "per_replica": per_replica, "takeover_s": took_s, "lost_shards": sorted(lost),
                **check,
            }  # fmt: skip
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            logs.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--canaries", type=int, default=10_000)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    parser.add_argument("--lease", type=float, default=15.0, help="lease duration, s")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--kubeapi-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--replica", help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kubeapi_child:
        serve_kubeapi(args.canaries, f"{args.interval:g}s", args.shards, args.workdir)
        return
    if args.replica:
        from canaryd.logs import configure

        configure("warning")
        asyncio.run(replica(args.replica, args.kubeconfig, args.shards, args.lease))
        return
    result = run(args)
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shards.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
