"""What `eval` costs: two checkpoints on two data sets of 3,000 images, against four bare evaluation passes.

    python benchmarks/eval_cost.py [--repeats 5]

(a) four ``session.evaluate`` passes, models open and data in memory: the floor; (b) the whole ``beta-diag eval
SGD ADAM --data test_3k --data train_5k --limit 3000 --json`` in this process (opening both checkpoints, reading
and checking the data, loss, per-class accuracy and confusions, the JSON). Goal (issue 28): b / a <= 1.2.
Interleaved, medians of --repeats (background load hits both alike).
"""

from __future__ import annotations

import argparse

from attribution_speed import interleaved_medians
from planted_faults import ADAM, SGD
from typer.testing import CliRunner

from beta_diag.cli import app
from beta_diag.session import DataChoice, open_session

TEST, TRAIN = str(SGD.parent / "fmnist_test_3k.safetensors"), str(SGD.parent / "fmnist_train_5k.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"command: python benchmarks/eval_cost.py --repeats {args.repeats}", flush=True)
    sessions = [open_session(p, device="cpu") for p in (SGD, ADAM)]
    sets = [sessions[0].load_data(DataChoice(spec, "test", 3000)) for spec in (TEST, TRAIN)]
    runner = CliRunner()
    command = ["eval", str(SGD), str(ADAM), "--data", TEST, "--data", TRAIN, "--split", "test", "--limit", "3000", "--json"]
    assert runner.invoke(app, command).exit_code == 0

    def bare() -> None:
        for s in sessions:
            for ds in sets:
                s.evaluate(ds)

    times = interleaved_medians({"four evaluation passes": bare, "beta-diag eval": lambda: runner.invoke(app, command)}, args.repeats)
    for name, seconds in times.items():
        print(f"  {name:24s} {seconds:.2f} s", flush=True)
    print(f"eval / four passes: {times['beta-diag eval'] / times['four evaluation passes']:.3f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
