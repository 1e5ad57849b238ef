"""Scale benchmark: one daemon judging N active canaries every round (issue 5, design §7).

Run: ``python bench/scale.py [--sizes 100,1000,5000] [--rounds 6] [--out bench/results]``

For each N, everything is real and separate, as in production:

* the Kubernetes API double, in its own process, holding N Canaries (each with a
  pending ``promote``), their 2N Deployments, N VirtualServices and N DestinationRules;
* the mesh emulator (``python -m simulator serve``), in its own process, generating each
  canary's traffic at the weight its VirtualService routes and exposing Istio's metrics;
* a real Prometheus scraping the emulator;
* the daemon (this process): the real :class:`canaryd.daemon.Daemon` with the
  Prometheus source, the Istio router and the Deployments port.

Every Canary starts its rollout at once and stays in its 10% step (steps of 30 min), so
each round judges all N.  Per N it reports, over the measured rounds (after two
warm-up rounds): round wall time (median, p99: first reconcile's start to the last
one's end, status writes and any weight changes included), daemon CPU seconds per
round, peak RSS of the daemon, Kubernetes writes per round and Prometheus queries per
round.  Results go to ``--out`` as ``scale.md`` and ``scale.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NS = "scale"


# -- the API double's process -----------------------------------------------------------------


def _objects(i: int) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The cluster objects of canary ``i``: (group, version, plural, object)."""
    from canaryd.kube import COMMANDS_ANNOTATION

    name = f"svc{i}"
    meta = {"name": name, "namespace": NS}

    def deployment(dep: str, track: str, replicas: int) -> dict[str, Any]:
        labels = {"app": name, "track": track}
        return {
            "metadata": {"name": dep, "namespace": NS},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "app", "image": f"{name}:{track}"}]},
                },
            },
            "status": {
                "observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas,
                "updatedReplicas": replicas, "availableReplicas": replicas,
            },
        }  # fmt: skip

    route = [
        {"destination": {"host": name, "subset": "stable"}, "weight": 100},
        {"destination": {"host": name, "subset": "canary"}, "weight": 0},
    ]
    command = {"id": f"bench-{i}", "kind": "promote", "revision": "v2", "by": "bench",
               "at": "2026-01-01T00:00:00Z"}  # fmt: skip
    canary = {
        "metadata": meta | {"annotations": {COMMANDS_ANNOTATION: json.dumps([command])}},
        "spec": {
            "service": name,
            "stable": {"deployment": name},
            "canary": {"deployment": f"{name}-canary"},
            "trafficRouting": {"istio": {
                "virtualService": {"name": name, "routes": ["http-primary"]},
                "destinationRule": {"name": name},
            }},
            "steps": [10, 50, 100],
            "analysis": {"interval": "{interval}", "stepDuration": "30m",
                         "minStepDuration": "20m", "noData": {"holdFor": "30m"}},
        },
    }  # fmt: skip
    return [
        ("apps", "v1", "deployments", deployment(name, "stable", 2)),
        ("apps", "v1", "deployments", deployment(f"{name}-canary", "canary", 1)),
        ("networking.istio.io", "v1", "virtualservices",
         {"metadata": meta, "spec": {"hosts": [name], "http": [
             {"name": "http-primary", "route": route}]}}),
        ("networking.istio.io", "v1", "destinationrules",
         {"metadata": meta, "spec": {"host": name, "subsets": [
             {"name": "stable", "labels": {"track": "stable"}},
             {"name": "canary", "labels": {"track": "canary"}}]}}),
        ("canaryd.io", "v1alpha1", "canaries", canary),
    ]  # fmt: skip


def populate(server: Any, n: int, interval: str) -> None:
    """Put N canaries' objects into the API double, analysed every ``interval``."""
    for i in range(n):
        for group, version, plural, obj in _objects(i):
            if plural == "canaries":
                obj["spec"]["analysis"]["interval"] = interval
            server.put_raw(group, version, plural, obj)


def serve_kubeapi(n: int, interval: str, workdir: Path) -> None:
    """Child mode: the API double with N canaries; serves until stdin closes."""
    from kubedouble.apiserver import KubeApiServer

    with KubeApiServer() as server:
        populate(server, n, interval)
        path = server.write_kubeconfig(workdir / "kubeconfig", namespace=NS)
        print(json.dumps({"kubeconfig": str(path), "writes": server.writes}), flush=True)
        for _ in sys.stdin:  # each line asks for the write count so far
            print(json.dumps({"writes": server.writes}), flush=True)


# -- one size ----------------------------------------------------------------------------


def _child(argv: list[str], log: IO[str]) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            text=True, cwd=ROOT)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"{argv[1:4]} did not start (exit {proc.wait()}); see {log.name}")
    return proc, dict(json.loads(line))


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def _drive(
    n: int,
    kubeconfig: str,
    prom_url: str,
    rounds: int,
    interval_s: float,
    kubeapi: subprocess.Popen[str],
    status_refresh_s: float,
) -> dict[str, Any]:
    """Run the daemon until ``rounds`` measured rounds have ended; their statistics."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    from canaryd.daemon import Daemon, DaemonSettings
    from canaryd.istio import IstioRouter
    from canaryd.kube import Kube
    from canaryd.prometheus import PrometheusMetrics, PrometheusSettings
    from canaryd.workloads import Deployments

    configuration = k8s.Configuration()
    k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = 32
    api = k8s.ApiClient(configuration)
    kube = Kube(api, timeout_s=30.0)
    router = IstioRouter(kube)
    source = PrometheusMetrics(PrometheusSettings(url=prom_url, timeout_s=20.0))
    daemon = Daemon(
        kube, source, router, Deployments(kube),
        DaemonSettings(resync_s=60.0, metrics_timeout_s=25.0, drain_s=30.0,
                       status_refresh_s=status_refresh_s),
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop), name="daemon")
    per_tick: dict[float, dict[str, float]] = {}

    def api_writes() -> int:
        """Writes the API double has taken so far (status, VirtualServices, Events...)."""
        assert kubeapi.stdin is not None and kubeapi.stdout is not None
        kubeapi.stdin.write("writes\n")
        kubeapi.stdin.flush()
        return int(json.loads(kubeapi.stdout.readline())["writes"])

    def active() -> int:
        """Canaries still in a rollout: a healthy one may still be rolled back by chance
        (α per rollout), and then it is no longer judged every round."""
        return sum(1 for t in daemon.canaries.values() if t.interval_s is not None)

    def judged_all() -> list[Any]:
        """The rounds that judged every active canary, oldest first."""
        floor = min(n, active()) if daemon.canaries else n
        return [r for r in daemon.rounds.values() if r.reconciles >= floor]

    seen_queries = 0
    seen_writes = await asyncio.to_thread(api_writes)
    cpu_mark = time.process_time()
    last_tick: float | None = None
    reported = 0
    deadline = time.monotonic() + (rounds + 6) * interval_s + 600
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            if task.done():
                task.result()
            now_tick = (time.time() // interval_s) * interval_s
            if now_tick != last_tick:
                # a new tick: book the queries and CPU of the round that just ended
                cpu = time.process_time()
                writes = await asyncio.to_thread(api_writes)
                if last_tick is not None:
                    per_tick[last_tick] = {
                        "queries": source.stats["queries"] - seen_queries,
                        "cpu_s": cpu - cpu_mark,
                        "writes": writes - seen_writes,
                    }
                cpu_mark, seen_writes = cpu, writes
                seen_queries = source.stats["queries"]
                last_tick = now_tick
            full = judged_all()
            for r in full[reported:]:
                if r.tick_s < (last_tick or 0):  # ended: show progress on long runs
                    reported += 1
                    label = "warm-up" if reported <= 2 else f"{reported - 2}/{rounds}"
                    print(f"N={n}: round {label}: {r.duration_s:.2f}s", file=sys.stderr)
            if len(full) >= rounds + 2 and (last_tick or 0) > full[-1].tick_s:
                break
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        source.close()
        api.close()
    full = judged_all()[2 : 2 + rounds]
    if not full:
        raise SystemExit(
            f"N={n}: no round judged all canaries; rounds: {list(daemon.rounds.values())[-5:]}"
        )
    durations = [r.duration_s for r in full]
    booked = [per_tick[r.tick_s] for r in full if r.tick_s in per_tick]
    return {
        "n": n,
        "rounds": len(full),
        "round_s_median": statistics.median(durations),
        "round_s_p99": max(durations)
        if len(durations) < 100
        else statistics.quantiles(durations, n=100)[98],
        "cpu_s_per_round": statistics.median(b["cpu_s"] for b in booked) if booked else None,
        "status_writes_per_round": statistics.median(r.writes for r in full),
        "writes_per_round": statistics.median(b["writes"] for b in booked) if booked else None,
        "queries_per_round": statistics.median(b["queries"] for b in booked) if booked else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "active_at_end": active(),
        "failures": daemon.stats["failures"],
        "conflicts": daemon.stats["conflicts"],
    }


def run_size(
    n: int, rounds: int, interval_s: float, scrape_s: float, status_refresh_s: float
) -> dict[str, Any]:
    """One N in a fresh child process (so peak RSS is this N's own)."""
    argv = [sys.executable, __file__, "--one", str(n), "--rounds", str(rounds),
            "--interval", f"{interval_s:g}", "--scrape", f"{scrape_s:g}",
            "--status-refresh", f"{status_refresh_s:g}"]  # fmt: skip
    # the child's progress and errors go straight to our stderr; its result is stdout's
    out = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"N={n} failed (exit {out.returncode}); see above")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def one_size(
    n: int, rounds: int, interval_s: float, scrape_s: float, status_refresh_s: float
) -> dict[str, Any]:
    import logging

    from canaryd.logs import configure
    from tests.services import PrometheusServer

    with tempfile.TemporaryDirectory(prefix="canaryd-scale-") as tmp:
        work = Path(tmp)
        logs = (work / "children.log").open("w")
        # the daemon logs as in production (JSON, info), to a file: stderr shows progress
        configure("info")
        daemon_log = (work / "daemon.log").open("w")
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(daemon_log)
        procs: list[subprocess.Popen[str]] = []
        prom = None
        try:
            started = time.monotonic()
            kubeapi, info = _child(
                [sys.executable, __file__, "--kubeapi-child", str(n), "--interval",
                 f"{interval_s:g}", "--workdir", str(work)], logs)  # fmt: skip
            procs.append(kubeapi)
            emulator, emu = _child(
                [sys.executable, "-m", "simulator", "serve", "--kubeconfig", info["kubeconfig"],
                 "--namespace", NS, "--port", "0", "--scenario", "healthy",
                 "--exposition", "fast"], logs)  # fmt: skip
            procs.append(emulator)
            prom = PrometheusServer([f"127.0.0.1:{emu['port']}"], scrape_interval_s=scrape_s,
                                    workdir=work / "prometheus")  # fmt: skip
            prom.start()
            print(f"N={n}: set up in {time.monotonic() - started:.1f}s", file=sys.stderr)
            result = asyncio.run(
                _drive(
                    n, info["kubeconfig"], prom.url, rounds, interval_s, kubeapi, status_refresh_s
                )
            )
            result["interval_s"] = interval_s
            result["scrape_s"] = scrape_s
            result["status_refresh_s"] = status_refresh_s
            return result
        except BaseException:
            daemon_log.flush()
            logs.flush()
            for name in ("daemon.log", "children.log"):
                tail = (work / name).read_text(errors="replace").splitlines()[-20:]
                print(f"--- last lines of {name}:", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            daemon_log.close()
            if prom is not None:
                prom.stop()
            for proc in reversed(procs):
                _stop(proc)
            logs.close()


def _table(results: list[dict[str, Any]]) -> str:
    head = (
        "| canaries | round median (s) | round p99 (s) | daemon CPU s/round | peak RSS (MB) "
        "| k8s writes/round | Prometheus queries/round |\n"
        "|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {r['n']:,} | {r['round_s_median']:.2f} | {r['round_s_p99']:.2f} | "
        f"{r['cpu_s_per_round'] or 0:.2f} | {r['peak_rss_mb']:.0f} | "
        f"{r['writes_per_round'] or 0:.0f} | "
        f"{r['queries_per_round'] or 0:.0f} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="100,1000,5000", help="canary counts (default 100,1000,5000)"
    )
    parser.add_argument(
        "--rounds", type=int, default=6, help="measured rounds per size (default 6)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--interval", type=float, default=0, help="seconds; default by size")
    parser.add_argument("--scrape", type=float, default=0, help="seconds; default by size")
    parser.add_argument(
        "--status-refresh",
        type=float,
        default=30.0,
        help="the daemon's status_refresh_s: an unchanged 'continue' verdict is written at "
        "most this often (default 30, as canaryd run; 0 writes every round, as the "
        "default 1-minute interval does)",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kubeapi-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kubeapi_child is not None:
        serve_kubeapi(args.kubeapi_child, f"{args.interval:g}s", args.workdir)
        return
    if args.one is not None:
        result = one_size(args.one, args.rounds, args.interval, args.scrape, args.status_refresh)
        print(json.dumps(result))
        return
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        interval_s = args.interval or (10.0 if n <= 1000 else 30.0)
        scrape_s = args.scrape or (2.0 if n <= 1000 else 5.0)
        result = run_size(n, args.rounds, interval_s, scrape_s, args.status_refresh)
        print(json.dumps(result), file=sys.stderr)
        results.append(result)
    table = _table(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.md").write_text(table + "\n")
    (args.out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
