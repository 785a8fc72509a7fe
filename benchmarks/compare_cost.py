"""Cost of `compare` against ranking one checkpoint, measured in one run (goal: <= 2.1x).

    python benchmarks/compare_cost.py [--quick]

Times beta_diag.ranking.rank on the SGD sample, then beta_diag.comparison.compare on the SGD and
Adam samples with the same options, both on the bundled 3,000 test images (--quick: 1,000).
Repeats each twice and keeps the faster, since these machines are noisy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from beta_diag.comparison import compare
from beta_diag.configs import RankConfig
from beta_diag.ranking import rank
from beta_diag.session import DataChoice

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
SGD = SAMPLES / "fmnist_resnet18w16_sgd_beta.safetensors"
ADAM = SAMPLES / "fmnist_resnet18w16_adam_beta.safetensors"


def best_of(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print("command: python benchmarks/compare_cost.py" + (" --quick" if args.quick else ""))
    choice = DataChoice(limit=1000 if args.quick else None)
    config = RankConfig(control=0)
    one = best_of(2, lambda: rank(SGD, data=choice, config=config, device="cpu"))
    both = best_of(2, lambda: compare([SGD, ADAM], data=choice, config=config, device="cpu"))
    print(f"rank one checkpoint: {one:.2f} s; compare two: {both:.2f} s; ratio {both / one:.2f}x (goal <= 2.1x)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
