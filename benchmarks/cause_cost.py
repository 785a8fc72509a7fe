"""What the cause adds to `rank`: a default rank with and without the control pass and the recalibration probe.

    python benchmarks/cause_cost.py [--quick] [--repeats 3]

Times, interleaved (so background load hits them alike; medians of --repeats), a default ``rank`` of
the SGD sample on Fashion-MNIST's 10,000 test images (the bundled 3,000 without Debian's
dataset-fashion-mnist) with ``--control 1000`` (the default) and with ``--no-control``, both on the
same decoded data. The control reads a seeded 1,000 of the bundled training images, decoded inside
the timed call as rank does. Goal: (with - without) / without <= 0.25. --quick: 1,000 images,
control 200, 1 repeat.
"""

from __future__ import annotations

import argparse

import torch
from attribution_speed import interleaved_medians
from drift_cost import test_images
from rank_cost import CKPT

from beta_diag.configs import DEFAULT_CONTROL, RankConfig
from beta_diag.ranking import rank
from beta_diag.session import DataChoice, open_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    control = 200 if args.quick else DEFAULT_CONTROL
    print(
        f"command: python benchmarks/cause_cost.py{' --quick' if args.quick else f' --repeats {repeats}'}; "
        f"torch threads {torch.get_num_threads()}"
    )
    session = open_session(CKPT, device="cpu")
    ds = test_images(session, args.quick)
    causes = {}

    def with_control() -> None:
        causes["kind"] = rank(session, data=DataChoice(), config=RankConfig(control=control), dataset=ds).cause

    t = interleaved_medians(
        {
            "rank --no-control": lambda: rank(session, data=DataChoice(), config=RankConfig(control=0), dataset=ds),
            f"rank --control {control}": with_control,
        },
        repeats,
    )
    print(f"{len(ds)} images of {ds.spec}; medians of {repeats} interleaved runs")
    for name, seconds in t.items():
        print(f"  {name:20s} {seconds:7.2f} s")
    base, full = t["rank --no-control"], t[f"rank --control {control}"]
    print(
        f"cause: {causes['kind'].kind}; the control pass and probe add {full - base:.2f} s: "
        f"{100 * (full - base) / base:.1f}% of rank (goal <= 25%)"
    )


if __name__ == "__main__":
    main()
