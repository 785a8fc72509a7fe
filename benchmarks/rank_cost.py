"""Cost of a whole ``rank`` on Fashion-MNIST test: time vs its floor, and peak memory vs data size.

    python benchmarks/rank_cost.py [--quick] [--threads N]

(i) Times ``beta_diag.ranking.rank(session, data=DataChoice('fashion-mnist', 'test'), config=RankConfig())`` with the
sample checkpoint on the 10,000 test images, against a baseline measured in the same run, before and
after rank (their mean is used): one inference pass over all images (runtime.evaluate) plus one plain
batched forward + loss.sum().backward() over the errors (batches of 64). Goal: rank / baseline <= 1.3.
The time inside rank is split by wrapping (at run time, not in the source) data.load, evaluate,
per_example_norms and bootstrap. Also printed: this design's lower bound, evaluate plus one fwd+bwd
pass over the errors (norms, summed gradient and the bootstrap's sketch; ``--contrast`` adds a second), and
the anatomy of a pass: a forward plus a backward that reaches every layer's input without computing
weight gradients, which every exact per-example method runs; from it, the bounds any such method meets
here even if its per-layer work were free.
(ii) Peak RSS (ru_maxrss after rank returns) of rank on 2,000 and on 10,000 images, each in a fresh
subprocess (``--rss N``). Goal: the 10k peak is at most 1.1x the 2k peak. The children use 1 torch thread
unless --threads is given: memory does not depend on it, and on a busy machine 2 contending OpenMP
threads can make a run 10x slower.
``--quick`` uses 2,000 images for (i) and 500 vs 2,000 for (ii). Needs Debian's dataset-fashion-mnist;
without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from beta_diag import data as data_mod
from beta_diag import ranking, readers
from beta_diag import session as session_mod
from beta_diag.configs import RankConfig
from beta_diag.ranking import rank
from beta_diag.runtime import evaluate
from beta_diag.session import DataChoice, Session, open_session

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "sample_checkpoints" / "fmnist_resnet18w16_sgd_beta.safetensors"
CPU = torch.device("cpu")


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


@contextlib.contextmanager
def split_timer(log: list[tuple[str, float, int]]) -> Iterator[None]:
    """Wrap the steps rank calls (module attributes looked up at call time); log (step, seconds, peak RSS KiB after it)."""
    targets = [
        (data_mod, "load"),
        (session_mod, "evaluate"),
        (ranking, "per_example_norms"),
        (ranking, "bootstrap"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name in targets if hasattr(mod, name)]

    def wrap(name: str, fn: Callable) -> Callable:
        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            index = args[2] if name == "per_example_norms" and len(args) > 2 else None
            label = f"{name} (n={index.numel()})" if isinstance(index, torch.Tensor) else name
            log.append((label, time.perf_counter() - start, peak_kib()))
            return out

        return timed

    for mod, name, fn in saved:
        setattr(mod, name, wrap(name, fn))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def floor(session: Session, ds: data_mod.Dataset, index: torch.Tensor, weights: bool = True) -> float:
    """Seconds of one plain batched forward + backward of the summed loss over ``index``, batches of 64.
    ``weights=False``: the backward reaches every layer's input but computes no weight gradient, which is
    what any exact per-example gradient method must run before its per-layer work."""
    model = session.model.eval()
    start = time.perf_counter()
    for x, y, _ in data_mod.batches(ds, 64, CPU, index=index):
        inputs = session.preprocess(x).requires_grad_(not weights)
        loss = F.cross_entropy(model(inputs).float(), y, reduction="sum")
        if weights:
            model.zero_grad(set_to_none=True)
            loss.backward()
        else:
            torch.autograd.grad(loss, inputs)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def baseline(session: Session, ds: data_mod.Dataset) -> tuple[float, float, torch.Tensor]:
    """(evaluate seconds, fwd+bwd-on-errors seconds, error index)."""
    start = time.perf_counter()
    preds = evaluate(session.model, ds, session.preprocess, CPU)
    t_eval = time.perf_counter() - start
    wrong = torch.nonzero(~preds.correct).flatten()
    return t_eval, floor(session, ds, wrong), wrong


def time_cost(limit: int | None) -> None:
    session = open_session(CKPT, device="cpu")
    choice = DataChoice("fashion-mnist", "test", limit=limit)
    evaluate(
        session.model,
        data_mod.load(str(ROOT / "sample_checkpoints" / "fmnist_test_3k.safetensors"), "test", limit=64),
        session.preprocess,
        CPU,
    )  # warm-up
    start = time.perf_counter()
    ds = session.load_data(choice)
    t_load = time.perf_counter() - start
    baseline(session, ds)  # warm-up: the first full evaluation in a process runs slow
    rounds = 1 if limit is not None and limit <= 2000 else 3
    bases, totals = [baseline(session, ds)], []
    for _ in range(rounds):  # rank between baselines, alternately: this machine's speed drifts by tens of percent
        log: list[tuple[str, float, int]] = []
        with split_timer(log):
            start = time.perf_counter()
            result = rank(session, data=choice, config=RankConfig(control=0))
            totals.append(time.perf_counter() - start)
        bases.append(baseline(session, ds))
    wrong = bases[0][2]
    print(f"\n(i) {len(ds)} images, {wrong.numel()} errors; data load {t_load:.2f} s (not in the baseline); {rounds} round(s)")
    t_eval, t_floor = statistics.median(b[0] for b in bases), statistics.median(b[1] for b in bases)
    base, total = t_eval + t_floor, statistics.median(totals)
    for i, (e, f, _) in enumerate(bases):
        print(
            f"baseline {i + 1}: evaluate {e:.2f} s + fwd+bwd on errors {f:.2f} s ({1000 * f / wrong.numel():.1f} ms/error) = {e + f:.2f} s"
        )
    print(f"baseline (medians): {base:.2f} s; rank runs: {', '.join(f'{t:.2f}' for t in totals)} s (last one's steps below)")
    print(f"rank (median): {total:.2f} s, {len(result.error_index)} errors, verdict: {result.verdict}")
    print(f"  {'step inside rank':<34}{'seconds':>9}{'share':>8}{'vs baseline':>13}")
    for name, sec, _ in log:
        print(f"  {name:<34}{sec:>9.2f}{sec / total:>8.1%}{sec / base:>13.2f}")
    rest = total - sum(s for _, s, _ in log)
    print(f"  {'rest (scores, groups, records)':<34}{rest:>9.2f}{rest / total:>8.1%}{rest / base:>13.2f}")
    loaded = sum(s for n, s, _ in log if n == "load")
    print(f"ratio rank / baseline = {total / base:.2f} (rank incl. data load); {(total - loaded) / base:.2f} (excl. load)  [goal <= 1.3]")
    print(
        "  per round, rank / (the baselines on either side, mean): "
        f"{', '.join(f'{t / ((sum(bases[i][:2]) + sum(bases[i + 1][:2])) / 2):.2f}' for i, t in enumerate(totals))}"
    )
    bound = (t_eval + t_floor) / base
    print(f"lower bound of this design (evaluate + 1 fwd+bwd pass over the errors) / baseline = {bound:.2f}")
    # The anatomy uses the fastest of several runs of each piece (noise only ever adds time).
    t_in = min(floor(session, ds, wrong, weights=False) for _ in range(3))
    t_d = min(*(b[1] for b in bases), *(floor(session, ds, wrong) for _ in range(2)))
    t_e = min(b[0] for b in bases)
    print(
        f"anatomy (fastest of the runs): evaluate {t_e:.2f} s; fwd+bwd over the errors {t_d:.2f} s; fwd + bwd to every layer's input, "
        f"no weight gradients, {t_in:.2f} s = {t_in / t_d:.2f} of fwd+bwd"
    )
    print(
        f"  bounds with free per-layer work, / (evaluate + fwd+bwd): the default's one pass {(t_e + t_in) / (t_e + t_d):.2f}; "
        f"with --contrast's second pass {(t_e + 2 * t_in) / (t_e + t_d):.2f}; "
        f"any exact method vs a loop at (a) = k x (d): a/c <= k / {t_in / t_d:.2f}"
    )
    passes = [(n, sec) for n, sec, _ in log if n.startswith("per_example_norms")]
    print(
        "  in this rank, per-layer work beyond the forward and backward: "
        + "; ".join(f"{n} {sec:.2f} s - {t_in:.2f} s = {(sec - t_in) / t_d:.2f} of fwd+bwd" for n, sec in passes)
    )


def rss_child(n: int) -> None:
    """--rss N: one rank on N images in this fresh process; print RSS figures as JSON."""
    session = open_session(CKPT, device="cpu")
    before, log = peak_kib(), []
    start = time.perf_counter()
    with split_timer(log):
        result = rank(session, data=DataChoice("fashion-mnist", "test", limit=n), config=RankConfig(control=0))
    print(
        json.dumps(
            {
                "n": result.examples,
                "errors": len(result.error_index),
                "before_kib": before,
                "peak_kib": peak_kib(),
                "seconds": time.perf_counter() - start,
                "steps": [(name, kib) for name, _, kib in log],
            }
        )
    )


def rss_compare(small: int, large: int, threads: int | None) -> None:
    print(f"\n(ii) peak RSS (ru_maxrss) of rank, each in a fresh process with {threads or 1} torch thread(s)", flush=True)
    # ru_maxrss survives fork+exec (Linux records the forked copy's peak at exec), so a child started from this
    # big process would inherit its peak: start each through a tiny Python launcher instead.
    launcher = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    rows = {}
    for n in (small, large):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss", str(n), "--threads", str(threads or 1)]
        out = subprocess.run([sys.executable, "-c", launcher, *cmd], check=True, capture_output=True, text=True).stdout
        rows[n] = json.loads(out.strip().splitlines()[-1])
    print(f"  {'images':>7}{'errors':>8}{'peak before rank MiB':>22}{'peak after rank MiB':>21}{'growth MiB':>12}{'rank s':>8}")
    for r in rows.values():
        print(
            f"  {r['n']:>7}{r['errors']:>8}{r['before_kib'] / 1024:>22.1f}{r['peak_kib'] / 1024:>21.1f}"
            f"{(r['peak_kib'] - r['before_kib']) / 1024:>12.1f}{r['seconds']:>8.1f}"
        )
    for r in rows.values():
        print(f"  n={r['n']}: peak MiB after each step: " + ", ".join(f"{name} {kib / 1024:.0f}" for name, kib in r["steps"]))
    s, big = rows[small], rows[large]
    print(f"peak ratio {large} / {small} = {big['peak_kib'] / s['peak_kib']:.3f}  [goal <= 1.1]")
    if s["errors"] < RankConfig().batch_size:
        print(
            f"note: the {small}-image run has {s['errors']} errors, fewer than one attribution batch ({RankConfig().batch_size}), "
            "so its per_example_norms peak is smaller and the ratio overstates growth with the data size"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 images for timing, 500 vs 2,000 for memory")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default here, 1 in the --rss children)")
    parser.add_argument("--rss", type=int, metavar="N", help=argparse.SUPPRESS)  # helper mode for (ii)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss:
        rss_child(args.rss)
        return 0
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quick={args.quick}", flush=True)
    missing = readers.fashion_mnist_missing("test")
    if missing:
        print(
            f"SKIPPED: Fashion-MNIST test files {', '.join(missing)}(.gz) not found in {readers.FASHION_MNIST_ROOT}; "
            "install Debian's dataset-fashion-mnist to run this benchmark"
        )
        return 0
    start = time.perf_counter()
    time_cost(2000 if args.quick else None)
    rss_compare(*((500, 2000) if args.quick else (2000, 10000)), args.threads)
    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
