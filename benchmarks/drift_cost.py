"""What activation drift adds to `rank`: the evaluation pass with and without the drift hooks, against a whole rank.

    python benchmarks/drift_cost.py [--quick] [--repeats 5]

Times, interleaved (so background load hits them alike; medians of --repeats), with the SGD sample
on Fashion-MNIST's 10,000 test images (the bundled 3,000 without Debian's dataset-fashion-mnist):
(a) the evaluation pass rank makes (runtime.evaluate); (b) the same pass with drift.Recorder's hooks
committing every batch, plus the profile and the suspect (Recorder.result); (c) a whole default
``rank`` (which includes (b)). Goal: (b - a) / c <= 0.05, drift adds at most 5% to rank's time.
--quick: 1,000 images, 2 repeats.
"""

from __future__ import annotations

import argparse

import torch
from attribution_speed import interleaved_medians
from rank_cost import CKPT

from beta_diag import readers
from beta_diag.configs import RankConfig
from beta_diag.data import Dataset
from beta_diag.drift import Recorder
from beta_diag.groups import layer_groups
from beta_diag.ranking import rank
from beta_diag.runtime import evaluate
from beta_diag.session import DataChoice, Session, open_session


def test_images(session: Session, quick: bool) -> Dataset:
    """Fashion-MNIST's 10,000 test images (the bundled 3,000 without Debian's dataset-fashion-mnist); 1,000 when quick."""
    spec = None if readers.fashion_mnist_missing("test") else "fashion-mnist"
    return session.load_data(DataChoice(spec, limit=1000 if quick else None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    print(
        f"command: python benchmarks/drift_cost.py{' --quick' if args.quick else f' --repeats {repeats}'}; "
        f"torch threads {torch.get_num_threads()}"
    )
    session = open_session(CKPT, device="cpu")
    ds = test_images(session, args.quick)
    groups = layer_groups(session.model)

    def with_drift() -> None:
        rec = Recorder(session.model)
        try:
            evaluate(session.model, ds, session.preprocess, session.device, on_batch=rec.commit)
        finally:
            rec.remove()
        rec.result(groups)

    t = interleaved_medians(
        {
            "evaluate": lambda: evaluate(session.model, ds, session.preprocess, session.device),
            "evaluate + drift": with_drift,
            "rank": lambda: rank(session, data=DataChoice(), config=RankConfig(control=0), dataset=ds),
        },
        repeats,
    )
    print(f"{len(ds)} images of {ds.spec}; medians of {repeats} interleaved runs")
    for name, seconds in t.items():
        print(f"  {name:17s} {seconds:7.2f} s")
    added = t["evaluate + drift"] - t["evaluate"]
    print(
        f"drift adds {added:.3f} s: {100 * added / t['evaluate']:.1f}% of the evaluation pass, "
        f"{100 * added / t['rank']:.1f}% of rank (goal <= 5%)"
    )


if __name__ == "__main__":
    main()
