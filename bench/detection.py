"""Detection benchmark: canaryd against Flagger-, Kayenta-style rules and the oracle SPRT.

Every method rolls the same canaries out on the same simulated traffic (run ``i`` of
every method and scenario uses seed ``--seed + i``) with the same steps (10 → 50 →
100 %), 1-minute evaluations and 10-minute steps; only the judging rule differs.  The
baselines live in ``bench/baselines.py``; canaryd runs through the public
``canaryd.simulate.simulate_once``, so it measures whatever engine is current.

Reported per scenario and method: false-rollback rate (healthy canaries), detection rate
(regressions), median and 90th-percentile requests (both arms, and canary only) and bad
canary requests served before the rollback, median time to rollback, and for healthy
canaries the median time to 100 % weight and to promotion.  A Markdown table
(``detection.md``), a chart (``detection.png``) and the numbers (``summary.json``) go to
``--out``; the tables are also printed.  Run from the repository root::

    python bench/detection.py [--runs N] [--interval S] [--out DIR] [--jobs J]
        [--scenarios a,b] [--methods x,y]

``--interval`` (seconds, default 60) sets every method's evaluation interval; issue 15's
targets are stated at 10 s.

The result does not depend on ``--jobs``: work is split into (scenario, method, seed
chunk) tasks and put back in seed order.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import (
    FlaggerJudge,
    KayentaJudge,
    OracleSprtJudge,
    Outcome,
    RunRecord,
    run_rollout,
)
from scenarios import BY_KEY, SUITE, BenchScenario

#: One method: run one rollout of a scenario with a seed.
Runner = Callable[[BenchScenario, int], RunRecord]
#: A task for a worker: (scenario key, method, first seed, number of runs).
Task = tuple[str, str, int, int]
#: Runs of one (scenario key, method), in seed order.
Results = dict[tuple[str, str], list[RunRecord]]

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
INF = math.inf


_OUTCOMES: dict[str, Outcome] = {
    "promoted": "promoted",
    "rolled_back": "rolled_back",
    "held": "held",
    "waiting_approval": "waiting_approval",
    "failed": "failed",
}


#: Every method's evaluation interval, seconds (``--interval``; set before workers fork).
_INTERVAL = {"s": 60.0}


def set_interval(seconds: float) -> None:
    """Evaluate every method every ``seconds`` (call before :func:`run_benchmark`)."""
    _INTERVAL["s"] = float(seconds)
    _canaryd_spec.cache_clear()


def interval_s() -> float:
    return _INTERVAL["s"]


@functools.cache
def _canaryd_spec(early_pass: bool) -> Any:
    from analysis.verdict import format_duration
    from canaryd.spec import parse_spec

    analysis: dict[str, Any] = {"interval": format_duration(interval_s())}
    if not early_pass:
        analysis["earlyPassRatio"] = None
    return parse_spec({"analysis": analysis})


def run_canaryd(bench: BenchScenario, seed: int, *, early_pass: bool = True) -> RunRecord:
    """One canaryd rollout through ``canaryd.simulate.simulate_once``, as a record.

    Requests are tallied from the evaluations' interval counts after t = 0 (a warm-up
    before t = 0, if the driver has one, is not part of the rollout).
    """
    from canaryd.simulate import simulate_once

    result = simulate_once(_canaryd_spec(early_pass), bench.scenario, seed)
    samples = [sample for sample in result.samples if sample.t_s > 0]
    reached = [step.started_s for step in result.steps if step.weight == 100]
    return RunRecord(
        seed=seed,
        outcome=_OUTCOMES[result.outcome],
        end_s=result.duration_s,
        reached_100_s=reached[0] if reached else None,
        requests=sum(s.stable.requests + s.canary.requests for s in samples),
        canary_requests=sum(s.canary.requests for s in samples),
        bad_canary_requests=sum(bench.bad_requests(s.canary) for s in samples),
    )


#: The methods, in the order tables list them.
METHODS: dict[str, Runner] = {
    "canaryd": functools.partial(run_canaryd, early_pass=True),
    "canaryd-no-early-pass": functools.partial(run_canaryd, early_pass=False),
    "oracle-sprt": lambda bench, seed: run_rollout(
        bench, OracleSprtJudge(bench), seed, interval_s=interval_s()
    ),
    "kayenta": lambda bench, seed: run_rollout(
        bench, KayentaJudge(), seed, interval_s=interval_s()
    ),
    "flagger-1": lambda bench, seed: run_rollout(
        bench, FlaggerJudge(1), seed, interval_s=interval_s()
    ),
    "flagger-5": lambda bench, seed: run_rollout(
        bench, FlaggerJudge(5), seed, interval_s=interval_s()
    ),
}

METHOD_NOTES = {
    "canaryd": "canaryd, default spec (early pass at ratio 1.5)",
    "canaryd-no-early-pass": "canaryd, `earlyPassRatio: null` (fixed 10-minute steps)",
    "oracle-sprt": "Wald's SPRT told the true rates (α 0.01, β 0.05): the lower bound",
    "kayenta": "Kayenta-style Mann-Whitney U judge on error rate and p99, every interval",
    "flagger-1": "Flagger-style: success ≥ 99% and p99 ≤ 500 ms per minute, threshold 1",
    "flagger-5": "Flagger-style, threshold 5",
}


# --------------------------------------------------------------------------- running


def _run_task(task: Task) -> tuple[Task, list[RunRecord], float]:
    key, method, first_seed, count = task
    started = time.process_time()
    runner, bench = METHODS[method], BY_KEY[key]
    records = [runner(bench, first_seed + i) for i in range(count)]
    return task, records, time.process_time() - started


def make_tasks(
    keys: Sequence[str], methods: Sequence[str], runs: int, base_seed: int, chunk: int
) -> list[Task]:
    """(scenario, method, first seed, count) tasks covering seeds ``base_seed + 0..runs-1``."""
    return [
        (key, method, base_seed + start, min(chunk, runs - start))
        for key in keys
        for method in methods
        for start in range(0, runs, chunk)
    ]


def run_benchmark(
    keys: Sequence[str],
    methods: Sequence[str],
    runs: int,
    *,
    base_seed: int = 0,
    jobs: int = 1,
    chunk: int = 50,
    progress: Callable[[str], None] | None = None,
) -> Results:
    """Run every method on every scenario ``runs`` times; records in seed order.

    With ``jobs`` > 1 the tasks run in forked worker processes; the records are the same
    whatever ``jobs`` and ``chunk`` are.
    """
    tasks = make_tasks(keys, methods, runs, base_seed, chunk)
    if any(method.startswith("canaryd") for method in methods):
        # Import canaryd once, before forking, rather than in every worker.
        from canaryd import simulate  # noqa: F401

        _canaryd_spec(True)
        _canaryd_spec(False)
    pending = {(key, method): 0 for key in keys for method in methods}
    for key, method, _, _ in tasks:
        pending[key, method] += 1
    parts: dict[tuple[str, str], list[tuple[int, list[RunRecord]]]] = {k: [] for k in pending}
    cpu = dict.fromkeys(pending, 0.0)
    started = time.perf_counter()

    def finished(outputs: Iterable[tuple[Task, list[RunRecord], float]]) -> None:
        for (key, method, first_seed, _), records, seconds in outputs:
            parts[key, method].append((first_seed, records))
            cpu[key, method] += seconds
            pending[key, method] -= 1
            if pending[key, method] == 0 and progress is not None:
                elapsed = time.perf_counter() - started
                progress(
                    f"[{elapsed:7.1f} s] {key} × {method}: {runs} runs, "
                    f"{cpu[key, method]:.1f} s CPU"
                )

    if jobs <= 1:
        finished(map(_run_task, tasks))
    else:
        context = multiprocessing.get_context("fork")
        with context.Pool(jobs) as pool:
            finished(pool.imap_unordered(_run_task, tasks))
    return {
        combo: [record for _, records in sorted(chunks) for record in records]
        for combo, chunks in parts.items()
    }


# --------------------------------------------------------------------------- summary


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank ``q``-quantile (an observed value; ``inf`` entries allowed), NaN if empty."""
    if not values:
        return math.nan
    return float(np.quantile(np.asarray(values, dtype=np.float64), q, method="inverted_cdf"))


@dataclass(frozen=True, slots=True)
class Summary:
    """One (scenario, method) cell of the benchmark.

    Quantiles are over all runs: a run that was not rolled back counts as ``inf`` in
    the rollback columns (its harm was never stopped), and one that was not promoted as
    ``inf`` in the promotion columns.
    """

    scenario: str
    method: str
    healthy: bool
    runs: int
    rolled_back: int
    promoted: int
    other: int
    marginal_runs: int
    median_time_to_rollback_s: float
    median_requests: float
    p90_requests: float
    median_canary_requests: float
    p90_canary_requests: float
    median_bad_canary_requests: float
    p90_bad_canary_requests: float
    median_time_to_100_s: float
    median_time_to_promotion_s: float


def summarize(bench: BenchScenario, method: str, records: Sequence[RunRecord]) -> Summary:
    """The reported statistics of ``records`` (one method's runs on ``bench``)."""

    def until_rollback(value: Callable[[RunRecord], float]) -> list[float]:
        return [value(r) if r.outcome == "rolled_back" else INF for r in records]

    rolled_back = sum(r.outcome == "rolled_back" for r in records)
    promoted = sum(r.outcome == "promoted" for r in records)
    requests = until_rollback(lambda r: r.requests)
    canary = until_rollback(lambda r: r.canary_requests)
    bad = until_rollback(lambda r: r.bad_canary_requests)
    return Summary(
        scenario=bench.key,
        method=method,
        healthy=bench.healthy,
        runs=len(records),
        rolled_back=rolled_back,
        promoted=promoted,
        other=len(records) - rolled_back - promoted,
        marginal_runs=sum(r.marginal_steps > 0 for r in records),
        median_time_to_rollback_s=quantile(until_rollback(lambda r: r.end_s), 0.5),
        median_requests=quantile(requests, 0.5),
        p90_requests=quantile(requests, 0.9),
        median_canary_requests=quantile(canary, 0.5),
        p90_canary_requests=quantile(canary, 0.9),
        median_bad_canary_requests=quantile(bad, 0.5),
        p90_bad_canary_requests=quantile(bad, 0.9),
        median_time_to_100_s=quantile(
            [INF if r.reached_100_s is None else r.reached_100_s for r in records], 0.5
        ),
        median_time_to_promotion_s=quantile(
            [r.end_s if r.outcome == "promoted" else INF for r in records], 0.5
        ),
    )


def summarize_all(results: Mapping[tuple[str, str], Sequence[RunRecord]]) -> list[Summary]:
    """Summaries in suite order, then method order."""
    order = {bench.key: i for i, bench in enumerate(SUITE)}
    methods = {method: i for i, method in enumerate(METHODS)}
    combos = sorted(results, key=lambda c: (order.get(c[0], len(order)), methods.get(c[1], 99)))
    return [summarize(BY_KEY[key], method, results[key, method]) for key, method in combos]


# --------------------------------------------------------------------------- formatting


def fmt_count(value: float) -> str:
    """``1234`` → ``1.2k``; ``inf`` → ``∞``; NaN → ``—``."""
    if math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞"
    if value < 1000:
        return f"{value:.0f}"
    if value < 1_000_000:
        return f"{value / 1000:.1f}k"
    return f"{value / 1_000_000:.2f}M"


def fmt_minutes(seconds: float) -> str:
    """Seconds as minutes (``540`` → ``9 min``); ``inf`` → ``∞``; NaN → ``—``."""
    if math.isnan(seconds):
        return "—"
    if math.isinf(seconds):
        return "∞"
    minutes = seconds / 60.0
    return f"{minutes:.0f} min" if minutes == round(minutes) else f"{minutes:.1f} min"


def fmt_share(count: int, runs: int) -> str:
    """``12.3% (123/1000)``."""
    return f"{100.0 * count / runs:.1f}% ({count}/{runs})" if runs else "—"


def _pair(median: float, p90: float, fmt: Callable[[float], str]) -> str:
    return f"{fmt(median)} / {fmt(p90)}"


def _title(key: str) -> str:
    bench = BY_KEY.get(key)
    return bench.title if bench is not None else key


def _marginal(summary: Summary) -> str:
    return fmt_share(summary.marginal_runs, summary.runs) if summary.method == "kayenta" else "—"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def healthy_table(summaries: Sequence[Summary]) -> list[str]:
    """Markdown lines: healthy canaries (rollback is a false rollback)."""
    header = (
        "scenario",
        "method",
        "false rollbacks",
        "promoted",
        "held / other",
        "time to 100% (median)",
        "time to promotion (median)",
        "marginal (Kayenta)",
    )
    rows = (
        (
            _title(s.scenario),
            s.method,
            fmt_share(s.rolled_back, s.runs),
            fmt_share(s.promoted, s.runs),
            fmt_share(s.other, s.runs),
            fmt_minutes(s.median_time_to_100_s),
            fmt_minutes(s.median_time_to_promotion_s),
            _marginal(s),
        )
        for s in summaries
        if s.healthy
    )
    return _table(header, rows)


def regression_table(summaries: Sequence[Summary]) -> list[str]:
    """Markdown lines: regressed canaries (rollback is a detection)."""
    header = (
        "scenario",
        "method",
        "detected",
        "time to rollback (median)",
        "requests before rollback (median / p90)",
        "canary requests (median / p90)",
        "bad canary requests (median / p90)",
        "marginal (Kayenta)",
    )
    rows = (
        (
            _title(s.scenario),
            s.method,
            fmt_share(s.rolled_back, s.runs),
            fmt_minutes(s.median_time_to_rollback_s),
            _pair(s.median_requests, s.p90_requests, fmt_count),
            _pair(s.median_canary_requests, s.p90_canary_requests, fmt_count),
            _pair(s.median_bad_canary_requests, s.p90_bad_canary_requests, fmt_count),
            _marginal(s),
        )
        for s in summaries
        if not s.healthy
    )
    return _table(header, rows)


def target_lines(summaries: Sequence[Summary]) -> list[str]:
    """The issue's targets, where the needed cells were run."""
    cells = {(s.scenario, s.method): s for s in summaries}
    lines = []
    early = cells.get(("healthy-1000rps", "canaryd"))
    fixed = cells.get(("healthy-1000rps", "canaryd-no-early-pass"))
    if early and fixed:
        a, b = early.median_time_to_100_s, fixed.median_time_to_100_s
        if math.isfinite(a) and math.isfinite(b) and b > 0:
            gain = 100.0 * (1.0 - a / b)
            verdict = "met" if gain >= 40.0 else "NOT met"
            lines.append(
                f"- Healthy at 1,000 rps, median time to 100%: canaryd {fmt_minutes(a)} vs "
                f"{fmt_minutes(b)} without early pass: {gain:.0f}% sooner "
                f"(target ≥ 40%: {verdict})."
            )
        else:
            lines.append(
                f"- Healthy at 1,000 rps, median time to 100%: canaryd {fmt_minutes(a)} vs "
                f"{fmt_minutes(b)} without early pass (target ≥ 40% sooner: NOT met)."
            )
    caught = cells.get(("errors-x2-1000rps", "canaryd"))
    if caught:
        rate = caught.rolled_back / caught.runs if caught.runs else 0.0
        verdict = "met" if rate >= 0.99 else "NOT met"
        lines.append(
            f"- Errors ×2 at 1,000 rps caught by canaryd in "
            f"{fmt_share(caught.rolled_back, caught.runs)} of runs (target ≥ 99%: {verdict})."
        )
    return lines + issue_15_lines(summaries)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _rate(cell: Summary) -> float:
    return cell.rolled_back / cell.runs if cell.runs else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.inf


def _healthy_rate(summaries: Sequence[Summary], method: str, keys: Sequence[str]) -> float | None:
    """False rollbacks of ``method`` over the healthy scenarios in ``keys`` (pooled)."""
    cells = [s for s in summaries if s.method == method and s.healthy and s.scenario in keys]
    runs = sum(s.runs for s in cells)
    return sum(s.rolled_back for s in cells) / runs if runs else None


def issue_15_lines(summaries: Sequence[Summary]) -> list[str]:
    """Issue 15's targets and its restated comparison rows, where the cells were run."""
    cells = {(s.scenario, s.method): s for s in summaries}
    lines: list[str] = []
    c2, o2 = cells.get(("errors-x2", "canaryd")), cells.get(("errors-x2", "oracle-sprt"))
    if c2 and o2:
        r = _ratio(c2.median_requests, o2.median_requests)
        lines.append(
            f"- Errors ×2 at 100 rps, median requests to rollback: canaryd "
            f"{fmt_count(c2.median_requests)} vs the oracle SPRT's {fmt_count(o2.median_requests)}"
            f" ({r:.2f}×; target ≤ 1.3×: {_met(r <= 1.3)})."
        )
        r = _ratio(c2.median_bad_canary_requests, o2.median_bad_canary_requests)
        lines.append(
            f"- Errors ×2, median bad canary requests: canaryd "
            f"{fmt_count(c2.median_bad_canary_requests)} vs the oracle's "
            f"{fmt_count(o2.median_bad_canary_requests)} ({r:.2f}×; target ≤ 1.5×: "
            f"{_met(r <= 1.5)})."
        )
    healthy_keys = [s.scenario for s in summaries if s.healthy]
    independent = [k for k in healthy_keys if k not in ("bursty-healthy", "client-bursts")]
    ours = _healthy_rate(summaries, "canaryd", independent)
    if c2:
        for rule in ("flagger-1", "flagger-5"):
            theirs, cell = (
                _healthy_rate(summaries, rule, independent),
                cells.get(("errors-x2", rule)),
            )
            if theirs is None or ours is None or cell is None:
                continue
            if theirs < ours:
                lines.append(
                    f"- Errors ×2 against {rule}: its false-rollback rate is lower "
                    f"({100 * theirs:.1f}% vs {100 * ours:.1f}%), so the comparison does not apply."
                )
                continue
            ok = c2.median_bad_canary_requests <= cell.median_bad_canary_requests
            lines.append(
                f"- Errors ×2 against {rule} (false rollbacks {100 * theirs:.1f}% vs canaryd's "
                f"{100 * ours:.1f}%): median bad canary requests "
                f"{fmt_count(c2.median_bad_canary_requests)} vs "
                f"{fmt_count(cell.median_bad_canary_requests)} (target: no more: {_met(ok)})."
            )
    regressions = sorted({s.scenario for s in summaries if not s.healthy})

    def detection(method: str) -> float | None:
        rows = [cells[k, method] for k in regressions if (k, method) in cells]
        runs = sum(r.runs for r in rows)
        return sum(r.rolled_back for r in rows) / runs if runs else None

    mine = detection("canaryd")
    for base in ("kayenta", "flagger-1", "flagger-5"):
        theirs = _healthy_rate(summaries, base, healthy_keys)
        ours_all = _healthy_rate(summaries, "canaryd", healthy_keys)
        found = detection(base)
        if theirs is None or ours_all is None or found is None or mine is None:
            continue
        fewer = theirs / ours_all if ours_all > 0 else math.inf
        fewer_text = "∞" if math.isinf(fewer) else f"{fewer:.1f}"
        comparable = mine >= found - 0.05
        lines.append(
            f"- False rollbacks against {base}, every healthy scenario: canaryd "
            f"{100 * ours_all:.2f}% vs {100 * theirs:.2f}% ({fewer_text}× fewer), detection "
            f"{100 * mine:.1f}% vs {100 * found:.1f}% (target ≥ 3× fewer at comparable "
            f"detection: {_met(fewer >= 3.0 and comparable)})."
        )
    for key in regressions:
        k, o, c = (
            cells.get((key, "kayenta")),
            cells.get((key, "oracle-sprt")),
            cells.get((key, "canaryd")),
        )
        if not (k and o and c):
            continue
        slow = _ratio(k.median_time_to_rollback_s, o.median_time_to_rollback_s)
        if slow < 3.0:
            continue
        fast = _ratio(k.median_time_to_rollback_s, c.median_time_to_rollback_s)
        lines.append(
            f"- {_title(key)}: Kayenta {fmt_minutes(k.median_time_to_rollback_s)} is {slow:.1f}× "
            f"the oracle's; canaryd {fmt_minutes(c.median_time_to_rollback_s)} ({fast:.1f}× "
            f"faster than Kayenta; target ≥ 3×: {_met(fast >= 3.0)})."
        )
    c15 = cells.get(("errors-x1.5", "canaryd"))
    if c15:
        lines.append(
            f"- Errors ×1.5 detected by canaryd in {fmt_share(c15.rolled_back, c15.runs)} "
            f"(target ≥ 85%: {_met(_rate(c15) >= 0.85)})."
        )
    worst = [cells[k, "canaryd"] for k in independent if (k, "canaryd") in cells]
    if worst:
        top = max(worst, key=_rate)
        lines.append(
            f"- Healthy scenarios (independent requests), worst false-rollback rate: "
            f"{_title(top.scenario)} {fmt_share(top.rolled_back, top.runs)} "
            f"(target ≤ 0.5% each: {_met(_rate(top) <= 0.005)})."
        )
    for key in ("bursty-healthy", "client-bursts"):
        cell = cells.get((key, "canaryd"))
        if cell:
            lines.append(
                f"- {_title(key)}: {fmt_share(cell.rolled_back, cell.runs)} false rollbacks "
                f"(target ≤ 1%: {_met(_rate(cell) <= 0.01)})."
            )
    bursty = cells.get(("bursty-x2", "canaryd"))
    if bursty:
        lines.append(
            f"- {_title('bursty-x2')}: detected in {fmt_share(bursty.rolled_back, bursty.runs)} "
            f"(target ≥ 99%: {_met(_rate(bursty) >= 0.99)})."
        )
    return lines


def _interval_text() -> str:
    seconds = interval_s()
    return "1-minute" if seconds == 60 else f"{seconds:g}-second"


def markdown_report(
    summaries: Sequence[Summary], *, runs: int, base_seed: int, wall_s: float | None = None
) -> str:
    """The whole Markdown report: notes, both tables and the targets."""
    timing = f", {wall_s:.0f} s wall time" if wall_s is not None else ""
    methods = list(dict.fromkeys(s.method for s in summaries))
    lines = [
        "# Detection benchmark",
        "",
        f"{runs} runs per scenario and method, seeds {base_seed}..{base_seed + runs - 1} "
        f"(the same seeds, so the same simulated traffic, for every method){timing}.",
        f"Every method uses steps 10 → 50 → 100%, {_interval_text()} intervals and "
        "10-minute steps.",
        "",
        *(f"- `{m}`: {METHOD_NOTES.get(m, m)}" for m in methods),
        "",
        "Requests count both arms from t = 0 until the rollback decision; bad canary "
        "requests are canary errors, plus in latency scenarios canary requests slower than "
        "the bucket edge at or above the stable's true p99 (p50 for the p50 scenario). "
        "Medians and p90s are nearest-rank over all runs: a run never rolled back counts as "
        "∞ in the rollback columns, a run never promoted as ∞ in the promotion columns.",
        "",
        "## Healthy canaries",
        "",
        *healthy_table(summaries),
        "",
        "## Regressions",
        "",
        *regression_table(summaries),
    ]
    targets = target_lines(summaries)
    if targets:
        lines += ["", "## Targets", "", *targets]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- chart


def write_chart(summaries: Sequence[Summary], path: Path) -> None:
    """Grouped bars: false rollbacks, detection, median bad canary requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(s.method for s in summaries))
    cells = {(s.scenario, s.method): s for s in summaries}
    healthy = list(dict.fromkeys(s.scenario for s in summaries if s.healthy))
    regressed = list(dict.fromkeys(s.scenario for s in summaries if not s.healthy))
    panels: list[tuple[str, list[str], Callable[[Summary], float], bool]] = [
        (
            "False rollbacks, healthy canaries (%)",
            healthy,
            lambda s: 100 * s.rolled_back / s.runs,
            False,
        ),
        (
            "Detection, regressed canaries (%)",
            regressed,
            lambda s: 100 * s.rolled_back / s.runs,
            False,
        ),
        (
            "Bad canary requests before rollback (median; ∞ = not rolled back in most runs)",
            regressed,
            lambda s: s.median_bad_canary_requests,
            True,
        ),
    ]
    panels = [panel for panel in panels if panel[1]]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 4.5 * len(panels)), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, (title, keys, value, log) in zip(axes[:, 0], panels, strict=True):
        for m, method in enumerate(methods):
            xs, ys, infinite = [], [], []
            for k, key in enumerate(keys):
                cell = cells.get((key, method))
                if cell is None:
                    continue
                x = k + (m - (len(methods) - 1) / 2) * width
                y = value(cell)
                if math.isinf(y):
                    infinite.append(x)
                elif not math.isnan(y):
                    xs.append(x)
                    ys.append(max(y, 0.5) if log else y)
            color = f"C{m % 10}"
            ax.bar(xs, ys, width, label=method, color=color)
            for x in infinite:
                ax.annotate(
                    "∞",
                    (x, 0.99),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="top",
                    color=color,
                    fontsize=13,
                    fontweight="bold",
                )
        ax.set_title(title)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([_title(key) for key in keys], rotation=20, ha="right")
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncols=min(len(methods), 6), fontsize=10)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.35 / (4.5 * len(panels))))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: infinite values as the string ``"inf"``, NaN as ``null``."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[name] = None if math.isnan(value) else "inf"
        else:
            out[name] = value
    return out


def _names(text: str | None, known: Sequence[str], what: str) -> list[str]:
    if text is None:
        return list(known)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}"
        )
    return list(dict.fromkeys(names))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="canaryd detection benchmark against Flagger/Kayenta-style baselines"
    )
    parser.add_argument("--runs", type=int, default=1000, help="runs per scenario and method")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (fork)"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed: run i uses seed + i")
    parser.add_argument(
        "--interval",
        type=float,
        default=60.0,
        help="seconds between evaluations, for every method (issue 15's targets: 10)",
    )
    parser.add_argument("--chunk", type=int, default=50, help="runs per worker task")
    parser.add_argument("--scenarios", help=f"comma-separated subset of: {', '.join(BY_KEY)}")
    parser.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="DIR",
        help="run nothing: rewrite DIR's detection.md and detection.png from its summary.json",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        keys = _names(args.scenarios, list(BY_KEY), "scenario")
        methods = _names(args.methods, list(METHODS), "method")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.runs < 1 or args.jobs < 1 or args.chunk < 1:
        parser.error("--runs, --jobs and --chunk must be at least 1")
    if not 1.0 <= args.interval <= 600.0:
        parser.error("--interval must lie between 1 and 600 seconds")
    set_interval(args.interval)
    if args.render is not None:
        return render(args.render, args.runs, args.seed)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    progress(
        f"detection benchmark: {len(keys)} scenarios × {len(methods)} methods × {args.runs} "
        f"runs, {args.jobs} jobs"
    )
    started = time.perf_counter()
    results = run_benchmark(
        keys,
        methods,
        args.runs,
        base_seed=args.seed,
        jobs=args.jobs,
        chunk=args.chunk,
        progress=progress,
    )
    wall_s = time.perf_counter() - started
    summaries = summarize_all(results)
    report = markdown_report(summaries, runs=args.runs, base_seed=args.seed, wall_s=wall_s)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "detection.md").write_text(report, encoding="utf-8")
    (out / "summary.json").write_text(
        json.dumps([_jsonable(asdict(s)) for s in summaries], indent=1) + "\n",
        encoding="utf-8",
    )
    write_chart(summaries, out / "detection.png")
    print(report)
    progress(f"done in {wall_s:.1f} s; wrote {out / 'detection.md'}, {out / 'detection.png'}")
    return 0


def load_summaries(path: Path) -> list[Summary]:
    """The summaries a run wrote to ``summary.json`` ("inf" back to ∞, null to NaN)."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for row in rows:
        fixed: dict[str, Any] = {
            k: (math.inf if v == "inf" else math.nan if v is None else v) for k, v in row.items()
        }
        out.append(Summary(**fixed))
    return out


def render(out: Path, runs: int, base_seed: int) -> int:
    """``--render``: the report and chart again from a run's numbers (``--interval``
    must be the run's, for the notes)."""
    summaries = load_summaries(out / "summary.json")
    runs = max((s.runs for s in summaries), default=runs)
    report = markdown_report(summaries, runs=runs, base_seed=base_seed)
    (out / "detection.md").write_text(report, encoding="utf-8")
    write_chart(summaries, out / "detection.png")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
