"""How fast the command line answers when it has nothing to compute: whole processes, timed.

    python benchmarks/cli_startup.py [--runs 7] [--quick]

Times the installed console script ``beta-diag`` for ``--help``, ``--version``, ``rank --help`` and a
usage error (``rank`` without a checkpoint), interleaved with two baselines measured in the same run:
a bare interpreter (``python -c pass``) and an interpreter that imports torch (what every command
paid before the command line stopped loading torch to answer these). Prints each median, its ratio
to the bare interpreter, and the import-torch baseline. Goal (issue 19): each answer under 0.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXE = Path(sys.executable).parent / "beta-diag"
CASES = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "python -c 'import torch' (baseline)": [sys.executable, "-c", "import torch"],
    "beta-diag --help": [str(EXE), "--help"],
    "beta-diag --version": [str(EXE), "--version"],
    "beta-diag rank --help": [str(EXE), "rank", "--help"],
    "beta-diag rank (usage error, exit 2)": [str(EXE), "rank"],
}


def once(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 runs each")
    args = parser.parse_args()
    runs = 2 if args.quick else args.runs
    print(f"command: python benchmarks/cli_startup.py --runs {runs}")
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(runs):  # interleaved, so that the machine's drift hits every case alike
        for name, command in CASES.items():
            times[name].append(once(command))
    bare = statistics.median(times["python -c pass (baseline)"])
    print(f"{'process':40s} {'median s':>9s} {'x bare python':>14s}")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"{name:40s} {median:9.3f} {median / bare:14.1f}")
    worst = max(statistics.median(ts) for name, ts in times.items() if name.startswith("beta-diag"))
    print(f"slowest beta-diag answer {worst:.3f} s: goal under 0.5 s {'met' if worst < 0.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
