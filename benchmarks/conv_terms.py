"""Per-layer cost of per-example gradient norms against the summed weight gradient of the same batch.

    python benchmarks/conv_terms.py [--batch 64]

For each convolution and the linear layer of the SGD sample, on a batch of its bundled test images:
(s) the summed weight gradient a plain backward computes (``torch.nn.grad.conv2d_weight``, or one
matmul for the linear layer) against (p) the per-example squared norms beta-diag computes for that
layer (``attribution._module_grads``, whichever path it picks). p/s is how much the per-layer work
of an attribution pass costs beyond the weight gradients it replaces. Median of 7 runs each, the two
alternating (attribution_speed.interleaved_medians), after one warm-up call.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from attribution_speed import BUNDLE, CKPT, interleaved_medians
from torch import nn

from beta_diag import attribution, data
from beta_diag.session import open_session


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print(f"command: python benchmarks/conv_terms.py --batch {args.batch}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    session = open_session(CKPT, device="cpu")
    ds = data.load(str(BUNDLE), "test", limit=args.batch)
    recorder = attribution._Recorder(session.model)
    inputs = session.preprocess(ds.images).requires_grad_(True)
    loss = F.cross_entropy(session.model(inputs), ds.labels, reduction="sum")
    torch.autograd.grad(loss, inputs)
    recorder.remove()
    modules = dict(session.model.named_modules())
    print(f"{'layer':<22}{'input':>16}{'s: summed ms':>14}{'p: per-example ms':>19}{'p/s':>7}")
    total_s = total_p = 0.0
    for name, calls in recorder.calls.items():
        module = modules[name]
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        x, g = calls[0]
        if isinstance(module, nn.Conv2d):

            def summed() -> torch.Tensor:
                return torch.nn.grad.conv2d_weight(x, module.weight.shape, g, module.stride, module.padding, module.dilation, module.groups)
        else:

            def summed() -> torch.Tensor:
                return g.t() @ x

        fns = {"s": summed, "p": lambda: attribution._module_grads(module, calls, None, f"{name}.")}
        for fn in fns.values():
            fn()  # warm-up
        med = interleaved_medians(fns, 7)
        s, p = 1000 * med["s"], 1000 * med["p"]
        total_s, total_p = total_s + s, total_p + p
        print(f"{name:<22}{tuple(x.shape[1:])!s:>16}{s:>14.2f}{p:>19.2f}{p / s:>7.1f}")
    print(f"{'all':<22}{'':>16}{total_s:>14.2f}{total_p:>19.2f}{total_p / total_s:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
