"""How fast ``canaryd plan`` answers (issue 15: under 2 s).

Times the plan itself (``canaryd.plan.make_plan``, median of ``--repeat`` runs) for a
few traffic profiles at a 1-minute and a 10-second interval, and the whole command as a
user runs it (a fresh process: Python start-up and imports included).  Run from the
repository root::

    python bench/plan_speed.py [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from canaryd.plan import TrafficProfile, make_plan
from canaryd.spec import parse_spec
from simulator import get_scenario

PROFILES = {
    "100 req/s": TrafficProfile(100.0, 0.005, 40.0, 180.0),
    "2 req/s": TrafficProfile(2.0, 0.005, 40.0, 180.0),
    "bursty (CV 0.5)": TrafficProfile.of_scenario(get_scenario("bursty-regression")),
    "1000 req/s": TrafficProfile(1000.0, 0.005, 40.0, 180.0),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (median)")
    args = parser.parse_args()
    print("| traffic | interval | make_plan (median) | whole command (median) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for interval in ("1m", "10s"):
            spec = parse_spec({"analysis": {"interval": interval}})
            spec_file = Path(tmp) / f"spec-{interval}.yaml"
            spec_file.write_text(f"analysis: {{interval: {interval}}}\n")
            for label, profile in PROFILES.items():
                inner = []
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    make_plan(spec, profile)
                    inner.append(time.perf_counter() - started)
                argv = [
                    sys.executable, "-m", "canaryd", "plan", "--spec", str(spec_file),
                    "--rps", f"{profile.rps:g}", "--error-pct", f"{100 * profile.error_rate:g}",
                    "--error-cv", f"{profile.error_cv:g}",
                ]  # fmt: skip
                outer = []
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    subprocess.run(argv, check=True, capture_output=True)
                    outer.append(time.perf_counter() - started)
                print(
                    f"| {label} | {interval} | {statistics.median(inner):.2f} s "
                    f"| {statistics.median(outer):.2f} s |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
