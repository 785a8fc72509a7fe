"""What a fingerprint costs: recording one against an evaluation pass, and rank's drift from it against BatchNorm drift.

    python benchmarks/fingerprint_cost.py [--repeats 5]

The SGD sample, on the bundled 5,000 training images: (a) an evaluation pass (runtime.evaluate);
(b) ``fingerprint.record`` over the same images. Goal: b / a <= 1 plus what one pass of hooks adds, read
as "at most one evaluation pass": b / a <= 1.1. Then on the 3,000 test images: (c) a default ``rank`` of
the sample without a fingerprint (BatchNorm drift) and (d) of the same sample with one. Goal: d / c <= 1.05.
Interleaved, medians of --repeats (background load hits all alike). Also the file size with and without.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from attribution_speed import interleaved_medians
from planted_faults import SGD

from beta_diag import checkpoint, fingerprint
from beta_diag.ranking import rank
from beta_diag.session import DataChoice, open_session

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"command: python benchmarks/fingerprint_cost.py --repeats {args.repeats}", flush=True)
    session = open_session(SGD, device="cpu")
    train = session.load_data(DataChoice(str(SAMPLES / "fmnist_train_5k.safetensors"), "train"), default_split="train")
    found = fingerprint.record(session, train)
    printed = replace(session, ckpt=replace(session.ckpt, fingerprint=found))
    test = DataChoice(str(SAMPLES / "fmnist_test_3k.safetensors"))
    times = interleaved_medians(
        {
            "evaluate": lambda: session.evaluate(train),
            "record": lambda: fingerprint.record(session, train),
            "rank, BatchNorm drift": lambda: rank(session, data=test),
            "rank, fingerprint drift": lambda: rank(printed, data=test),
        },
        args.repeats,
    )
    for name, seconds in times.items():
        print(f"  {name:24s} {seconds:.2f} s", flush=True)
    print(f"record / evaluate: {times['record'] / times['evaluate']:.3f} (goal <= 1.1)")
    print(
        "rank with a fingerprint / rank with BatchNorm drift: "
        f"{times['rank, fingerprint drift'] / times['rank, BatchNorm drift']:.3f} (goal <= 1.05)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fp.safetensors"
        checkpoint.save(out, session.ckpt.state_dict, session.ckpt.metadata, fingerprint=found)
        print(f"file size with a fingerprint / without: {out.stat().st_size / SGD.stat().st_size:.4f} (goal < 1.01)")


if __name__ == "__main__":
    main()
