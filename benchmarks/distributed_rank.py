"""rank throughput with 1 process vs 2 processes under torchrun, in one run, and a check that they agree.

    python benchmarks/distributed_rank.py [--quick] [--repeats 2]

Ranks the SGD sample on the 10,000-image Fashion-MNIST test set (--quick: the bundled 3,000) three
ways: one process with 2 threads (the default on this 2-core machine), one process with 1 thread,
and `torchrun --standalone --nproc_per_node 2` (1 thread each, torchrun's default). Prints images
per second, the ratios, and whether the 2-process JSON equals the 1-thread single process's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SGD = REPO / "sample_checkpoints" / "fmnist_resnet18w16_sgd_beta.safetensors"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def timed(head: list[str], args: list[str], threads: int) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    out = subprocess.run([*head, "beta_diag", *args], env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print("command: python benchmarks/distributed_rank.py" + (" --quick" if args.quick else "") + f" --repeats {args.repeats}")
    data = [] if args.quick else ["--data", "fashion-mnist"]
    images = 3000 if args.quick else 10000
    rank_args = ["rank", str(SGD), *data, "--device", "cpu", "--json", "--quiet"]
    one = [sys.executable, "-m"]
    two = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m"]
    best: dict[str, float] = {}
    outputs: dict[str, str] = {}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits every variant alike
        for name, head, threads in (
            ("1 process, 2 threads", one, 2),
            ("1 process, 1 thread", one, 1),
            ("2 processes, 1 thread each", two, 1),
        ):
            seconds, outputs[name] = timed(head, rank_args, threads)
            best[name] = min(best.get(name, float("inf")), seconds)
    base = best["1 process, 2 threads"]
    for name, seconds in best.items():
        print(f"{name:28s} {seconds:6.1f} s  {images / seconds:6.0f} images/s  time ratio {seconds / base:.2f}")
    same = outputs["2 processes, 1 thread each"] == outputs["1 process, 1 thread"]
    print(f"2-process JSON identical to the 1-thread single process: {same}")


if __name__ == "__main__":
    main()
