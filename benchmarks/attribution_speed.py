"""Speed of per-example gradient norms: beta_diag's batched hooks vs a loop, torch.func and the floor.

    python benchmarks/attribution_speed.py [--quick] [--threads N]

Per misclassified example, on (i) the sample checkpoint (ResNet-18-CIFAR width 16, 1x28x28) over
its errors on the bundled 3k test set and (ii) a full-width resnet18_cifar (width 64, 3x32x32,
random init, eval mode) on random images with random labels, it times:
  (a) loop:  one torch.autograd.grad of CE per example over all parameters, then per-parameter squared norms;
  (b) vmap:  torch.func vmap(grad(loss)) via functional_call, chunked, norms of the materialised gradients;
  (c) ours:  beta_diag.attribution.per_example_norms(..., batch_size=64);
  (d) floor: one plain batched forward + loss.sum().backward() in batches of 64.
(c) and (d) are the median of 3 repeats, run alternately; (a) and (b) run on a subset, reported per example.
Goals on the sample model: c/d <= 1.5 (near the cost of one backward) and a/c >= 10.
It is also a sanity check: the max entry-wise relative error of (c) and (b) against (a) is printed (want
< 1e-4), and of all three against a float64 loop (the ground truth) on the examples where (c) and (a)
differ most: float32 entries that are a tiny share of an example's norm can be off by more, in (a) too.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from beta_diag import data as data_mod
from beta_diag import models
from beta_diag.attribution import per_example_norms
from beta_diag.data import Dataset, Preprocess
from beta_diag.runtime import evaluate
from beta_diag.session import open_session

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "sample_checkpoints" / "fmnist_resnet18w16_sgd_beta.safetensors"
BUNDLE = ROOT / "sample_checkpoints" / "fmnist_test_3k.safetensors"
CPU = torch.device("cpu")
Result = dict[str, tuple[float, int]]  # method -> (seconds, examples timed)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each function, run alternately so background load hits them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def loop_norms(model: nn.Module, ds: Dataset, index: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """(a) One autograd.grad per example: (N, P) float64 squared norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in index.tolist():
        loss = F.cross_entropy(model(pre(ds.images[i : i + 1])).float(), ds.labels[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.stack([g.double().pow(2).sum() for g in grads]))
    return torch.stack(rows)


def vmap_norms(model: nn.Module, ds: Dataset, index: torch.Tensor, pre: Preprocess, chunk: int) -> torch.Tensor:
    """(b) torch.func per-sample gradients, materialised chunk by chunk: (N, P) float64."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (x.unsqueeze(0),)).float(), y.unsqueeze(0))

    per_sample = vmap(grad(loss_fn), in_dims=(None, 0, 0))
    out = []
    for start in range(0, index.numel(), chunk):
        idx = index[start : start + chunk]
        grads = per_sample(params, pre(ds.images[idx]), ds.labels[idx])
        out.append(torch.stack([grads[n].flatten(1).double().pow(2).sum(1) for n in params], 1))
    return torch.cat(out)


def floor(model: nn.Module, ds: Dataset, index: torch.Tensor, pre: Preprocess) -> None:
    """(d) Plain batched forward + backward of the summed loss, batches of 64."""
    for x, y, _ in data_mod.batches(ds, 64, CPU, index=index):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(pre(x)).float(), y, reduction="none").sum().backward()
    model.zero_grad(set_to_none=True)


def max_rel_err(test: torch.Tensor, ref: torch.Tensor, names: list[str] | None = None) -> str:
    """Largest entry-wise relative error; with ``names``, where it is and that entry's share of the example's squared norm."""
    rel = (test - ref).abs() / ref.abs().clamp_min(1e-30)
    i, j = divmod(int(rel.argmax()), rel.shape[1])
    total = float(((test.sum(1) - ref.sum(1)).abs() / ref.sum(1)).max())
    where = f" ({names[j]}, {float(ref[i, j] / ref[i].sum()):.0e} of the norm; per-example total {total:.0e})" if names else ""
    return f"{float(rel.max()):.2e}{where}"


def bench(label: str, model: nn.Module, ds: Dataset, index: torch.Tensor, pre: Preprocess, subset: int, chunk: int, exact: int) -> Result:
    model.eval()
    sub = index[:subset]
    print(f"\n== {label}: {index.numel()} examples for (c),(d); {sub.numel()} for (a),(b); vmap chunk {chunk}", flush=True)
    per_example_norms(model, ds, index[:8], pre, CPU, batch_size=64)  # warm-up
    floor(model, ds, index[:8], pre)
    res: Result = {}
    start = time.perf_counter()
    ref = loop_norms(model, ds, sub, pre)
    res["a loop"] = (time.perf_counter() - start, sub.numel())
    start = time.perf_counter()
    vm = vmap_norms(model, ds, sub, pre, chunk)
    res["b vmap"] = (time.perf_counter() - start, sub.numel())
    out: list[torch.Tensor] = []
    med = interleaved_medians(
        {
            "c": lambda: out.append(per_example_norms(model, ds, index, pre, CPU, batch_size=64).sq_norms),
            "d": lambda: floor(model, ds, index, pre),
        },
        3,
    )
    res["c per_example_norms"], res["d floor fwd+bwd"] = (med["c"], index.numel()), (med["d"], index.numel())
    ours = out[-1][: sub.numel()]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    print(
        f"check on {sub.numel()} examples x {ref.shape[1]} parameters: max rel err (c) vs (a) = {max_rel_err(ours, ref, names)}, "
        f"(b) vs (a) = {max_rel_err(vm, ref, names)}  [want < 1e-4]"
    )
    worst = ((ours - ref).abs() / ref.abs().clamp_min(1e-30)).amax(1).argsort(descending=True)[:exact]  # where (c), (a) disagree most
    exact_ref = loop_norms(copy.deepcopy(model).double(), ds, sub[worst], lambda x: pre(x).double())  # float64 ground truth
    print(
        f"vs a float64 loop on the {exact} examples where (c) and (a) differ most: (a) {max_rel_err(ref[worst], exact_ref, names)}, "
        f"(b) {max_rel_err(vm[worst], exact_ref, names)}, (c) {max_rel_err(ours[worst], exact_ref, names)}"
    )
    print(f"{'method':<22}{'examples':>9}{'seconds':>10}{'images/s':>11}{'ms/example':>12}")
    for name, (sec, n) in res.items():
        print(f"{name:<22}{n:>9}{sec:>10.3f}{n / sec:>11.1f}{1000 * sec / n:>12.2f}")
    per = {k: s / n for k, (s, n) in res.items()}
    cd, ac = per["c per_example_norms"] / per["d floor fwd+bwd"], per["a loop"] / per["c per_example_norms"]
    print(f"c/d = {cd:.2f}  (goal <= 1.5)   a/c = {ac:.1f}  (goal >= 10)   b/c = {per['b vmap'] / per['c per_example_norms']:.1f}")
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller subsets; finishes in under 3 minutes")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quick={args.quick}", flush=True)
    total = time.perf_counter()

    session = open_session(CKPT, device="cpu")
    ds = data_mod.load(str(BUNDLE), "test")
    preds = evaluate(session.model, ds, session.preprocess, CPU)
    wrong = torch.nonzero(~preds.correct).flatten()
    print(
        f"sample model: {sum(p.numel() for p in session.model.parameters()):,} parameters, accuracy {preds.accuracy:.4f} on {len(ds)}, "
        f"{wrong.numel()} errors" + (" (--quick: first 64 timed)" if args.quick else "")
    )
    bench(
        "(i) sample model, its errors on the 3k test bundle",
        session.model,
        ds,
        wrong[:64] if args.quick else wrong,
        session.preprocess,
        4 if args.quick else 32,
        16,
        2 if args.quick else 16,
    )

    torch.manual_seed(0)
    big = models.build("resnet18_cifar", {"width": 64, "in_channels": 3, "num_classes": 10}).eval()
    n = 8 if args.quick else 64
    images, labels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,))
    rand = Dataset(images, labels, tuple("0123456789"), "random", "test")
    print(f"\nfull-width model: {sum(p.numel() for p in big.parameters()):,} parameters, random init, {n} random images")
    bench(
        "(ii) resnet18_cifar width 64, random data",
        big,
        rand,
        torch.arange(n),
        Preprocess((3, 32, 32), (0.5,) * 3, (0.5,) * 3),
        2 if args.quick else 16,
        8,
        1 if args.quick else 4,
    )
    print(f"\ntotal wall time {time.perf_counter() - total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
