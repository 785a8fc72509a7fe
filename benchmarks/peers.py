"""Per-example gradient norms beside the peers: BackPACK and Opacus, on the same errors, in one run.

    python benchmarks/peers.py [--runs 5] [--threads 1] [--quick]

On the SGD sample checkpoint's errors on its bundled 3,000 test images (batches of 64, eval-mode
BatchNorm), each method computes every parameter's per-example squared gradient norm of the summed
cross-entropy; the runs are interleaved and each time is the median over ``--runs``, as a ratio to
the floor measured in the same run (one plain batched forward + backward):

- beta-diag: ``per_example_norms`` (norms only), and as ``rank`` runs it (norms, the exact summed
  gradient and the count sketch of every error's gradient per group, in one pass);
- BackPACK (``backpack-for-pytorch``): ``extend(model)`` and the ``BatchL2Grad`` extension, whose
  backward also gives the summed gradient;
- Opacus: ``GradSampleModule`` (hooks), then the norms of the per-sample gradients. Opacus captures
  activations only in train mode and has no per-sample rule for BatchNorm (whose training-mode
  statistics mix examples), so each BatchNorm2d is swapped for ``FrozenBatchNorm``: the same eval-mode
  affine map with the running statistics held as plain constants (not buffers), weight and bias as
  parameters, and a registered per-sample rule; the model then runs in train mode, computing
  exactly what the eval-mode model computes (checked);
- a plain per-example loop (one autograd.grad per example), on a subset, per example.

Values, on the first 16 errors: the largest relative difference of each method's squared norms from a
plain float32 per-example loop (the same arithmetic), over every example and parameter, and of each
example's total from a float64 loop. (Entry-wise, float32 itself is off float64 by up to 3e-2 on
bn1.weight of one example, where that entry is 4e-4 of the example's total: a forward-pass rounding,
shared by every float32 method.) BackPACK and Opacus are optional extras
(``pip install backpack-for-pytorch opacus``, never required): a missing one is reported and skipped.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from beta_diag.attribution import per_example_norms
from beta_diag.groups import layer_groups
from beta_diag.session import DataChoice, open_session

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "sample_checkpoints" / "fmnist_resnet18w16_sgd_beta.safetensors"
BATCH = 64


class FrozenBatchNorm(nn.Module):
    """An eval-mode BatchNorm2d whose running statistics are constants rather than buffers (for Opacus)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        assert bn.running_var is not None and bn.running_mean is not None
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        self.scale = (bn.running_var.detach() + bn.eps).rsqrt()
        self.shift = bn.running_mean.detach().clone()

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift[:, None, None]) * self.scale[:, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalised(x) * self.weight[:, None, None] + self.bias[:, None, None]


def frozen_norms(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, FrozenBatchNorm(child))
        else:
            frozen_norms(child)
    return model


def batches(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y), BATCH)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="64 errors, 2 runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = 2 if args.quick else args.runs
    print(f"command: python benchmarks/peers.py --runs {runs} --threads {args.threads}" + (" --quick" if args.quick else ""))
    session = open_session(CKPT, device="cpu")
    model = session.model.eval()
    ds = session.load_data(DataChoice())
    wrong = torch.nonzero(~session.evaluate(ds).correct).flatten()
    if args.quick:
        wrong = wrong[:64]
    x, y = session.preprocess(ds.images[wrong]), ds.labels[wrong]
    names = [n for n, _ in model.named_parameters()]
    found = [list(g.param_names) for g in layer_groups(model)]
    print(f"{len(wrong)} errors of {CKPT.name} on its 3,000 test images, batches of {BATCH}, {args.threads} thread(s)")

    def floor() -> None:
        for xb, yb in batches(x, y):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb, reduction="sum").backward()

    def ours(sketch: bool) -> Callable[[], torch.Tensor]:
        return lambda: per_example_norms(model, ds, wrong, session.preprocess, session.device, BATCH, found if sketch else None).sq_norms

    methods: dict[str, Callable[[], torch.Tensor | None]] = {
        "floor: plain forward+backward": lambda: floor(),  # type: ignore[func-returns-value]
        "beta-diag per-example norms": ours(False),
        "beta-diag as rank runs it (+ summed gradient, sketch)": ours(True),
    }
    notes = []
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad

        bp_model = extend(copy.deepcopy(model).eval())

        def backpack_norms() -> torch.Tensor:
            rows = []
            for xb, yb in batches(x, y):
                bp_model.zero_grad(set_to_none=True)
                with backpack(BatchL2Grad()):
                    F.cross_entropy(bp_model(xb), yb, reduction="sum").backward()
                rows.append(torch.stack([p.batch_l2 for p in bp_model.parameters()], 1))
            return torch.cat(rows).double()

        methods["BackPACK BatchL2Grad (+ summed gradient)"] = backpack_norms
    except ImportError:
        notes.append("BackPACK not installed (pip install backpack-for-pytorch): skipped")
    try:
        from opacus import GradSampleModule
        from opacus.grad_sample import register_grad_sampler

        @register_grad_sampler(FrozenBatchNorm)
        def _frozen_bn_samples(layer: FrozenBatchNorm, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
            return {layer.weight: (backprops * layer.normalised(activations[0])).sum((2, 3)), layer.bias: backprops.sum((2, 3))}

        plain = frozen_norms(copy.deepcopy(model))
        with torch.no_grad():
            assert torch.allclose(plain.train()(x[:BATCH]), model(x[:BATCH]), rtol=1e-4, atol=1e-5)  # train mode, eval maths
        op_model = GradSampleModule(plain.train(), loss_reduction="sum")

        def opacus_norms() -> torch.Tensor:
            rows = []
            for xb, yb in batches(x, y):
                op_model.zero_grad(set_to_none=True)
                F.cross_entropy(op_model(xb), yb, reduction="sum").backward()
                rows.append(torch.stack([p.grad_sample.flatten(1).pow(2).sum(1) for p in op_model.parameters()], 1))
            return torch.cat(rows).double()

        methods["Opacus GradSampleModule (frozen BatchNorm)"] = opacus_norms
    except ImportError:
        notes.append("Opacus not installed (pip install opacus): skipped")

    def loop(n: int) -> torch.Tensor:
        params = list(model.parameters())
        out = []
        for i in range(n):
            grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
            out.append(torch.stack([g.double().pow(2).sum() for g in grads]))
        return torch.stack(out)

    # values: every method against plain per-example loops on the first 16 errors, in float32 (the same
    # arithmetic as every method) entry by entry, and in float64 per example (the sum over parameters)
    f32 = loop(16)
    reference = copy.deepcopy(model).double()
    f64 = torch.stack(
        [
            torch.stack(
                [
                    g.pow(2).sum()
                    for g in torch.autograd.grad(
                        F.cross_entropy(reference(x[i : i + 1].double()), y[i : i + 1]), list(reference.parameters())
                    )
                ]
            )
            for i in range(16)
        ]
    )
    for name, fn in methods.items():
        got = fn()
        if got is not None:
            got = got[:16].double()
            entry = float(((got - f32).abs() / f32.abs().clamp_min(1e-30)).max())
            total = float(((got.sum(1) - f64.sum(1)).abs() / f64.sum(1)).max())
            print(
                f"values: {name}: max relative difference, entry-wise from a float32 "
                f"loop {entry:.1e}; per example from a float64 loop {total:.1e}"
            )
    loop_n = 16 if args.quick else 48
    times: dict[str, list[float]] = {name: [] for name in methods}
    times[f"per-example loop ({loop_n} errors, scaled)"] = []
    for _ in range(runs):  # interleaved
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        loop(loop_n)
        times[f"per-example loop ({loop_n} errors, scaled)"].append((time.perf_counter() - start) * len(wrong) / loop_n)
    base = statistics.median(times["floor: plain forward+backward"])
    print(f"{'method':58s} {'median s':>9s} {'x floor':>8s}")
    for name, ts in times.items():
        print(f"{name:58s} {statistics.median(ts):9.3f} {statistics.median(ts) / base:8.2f}")
    for note in notes:
        print(note)
    assert names  # every method covers the same parameters, in model order


if __name__ == "__main__":
    main()
