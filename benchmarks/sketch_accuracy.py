"""The bootstrap's dot products from rank's one-pass count sketch (``beta_diag.sketch``) against exact ones.

    python benchmarks/sketch_accuracy.py

On both sample checkpoints' errors (their bundled 3,000 test images), the exact <g_i, S_g> come from
torch.func per-example gradients; the sketched ones from the pass ``rank`` makes. Printed: the
per-group L1 error of the estimates, their smallest correlation with the exact values, and how far
the sketch moves a 2,000-replicate bootstrap of coherence (P(flagged), the ends of the score
interval as a share of its width), beside how far two default 200-replicate bootstraps of the exact
values differ from each other (the bootstrap's own noise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from beta_diag import configs, scores
from beta_diag.attribution import per_example_norms
from beta_diag.groups import layer_groups
from beta_diag.session import DataChoice, open_session

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    for which in ("sgd", "adam"):
        s = open_session(ROOT / "sample_checkpoints" / f"fmnist_resnet18w16_{which}_beta.safetensors", device="cpu")
        ds = s.load_data(DataChoice())
        pred = s.evaluate(ds)
        wrong = torch.nonzero(~pred.correct).flatten()
        n = wrong.numel()
        model = s.model.eval()
        params = {k: p.detach() for k, p in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, x, y):
            return F.cross_entropy(functional_call(model, (p, buffers), (x.unsqueeze(0),)).float(), y.unsqueeze(0))

        X = s.preprocess(ds.images[wrong])
        Y = ds.labels[wrong]
        found = layer_groups(model)
        exact = np.zeros((n, len(found)))
        per = {k: [] for k in params}
        for st in range(0, n, 16):
            gr = vmap(grad(loss), in_dims=(None, 0, 0))(params, X[st : st + 16], Y[st : st + 16])
            for k in params:
                per[k].append(gr[k].flatten(1).double())
        per = {k: torch.cat(v) for k, v in per.items()}
        for j, g in enumerate(found):
            exact[:, j] = sum((per[p] @ per[p].sum(0)).numpy() for p in g.param_names)
        got = per_example_norms(model, ds, wrong, s.preprocess, s.device, 64, [list(g.param_names) for g in found])
        summed_sq = np.array([sum(float(got.summed[p].double().pow(2).sum()) for p in g.param_names) for g in found])
        sk = got.sketch.dots(summed_sq)
        sq = got.sq_norms.numpy() @ np.stack([[1.0 if nm in g.param_names else 0.0 for g in found] for nm in got.names])
        base = {
            "correct": np.zeros((0, len(found))),
            "summed_norm": np.sqrt(summed_sq),
            "numel": np.array([g.numel for g in found], float),
            "weight_norm": np.ones(len(found)),
        }
        B = lambda dots, reps, seed: scores.bootstrap(scores.Matrices(sq, dots=dots, **base), configs.Metric.coherence, None, reps, seed)
        a, b, c, d = B(exact, 2000, 0), B(sk, 2000, 0), B(exact, 200, 1), B(exact, 200, 2)
        w = a.score_hi - a.score_lo
        rel = np.abs(sk - exact).sum(0) / np.abs(exact).sum(0)
        print(
            f"{which}: n={n} K={got.sketch.k} dots L1 rel err per group {np.round(rel, 3).tolist()} "
            f"corr min {min(np.corrcoef(sk[:, j], exact[:, j])[0, 1] for j in range(len(found))):.4f}"
        )
        print(
            f"  sketch vs exact (2000 reps): p_flagged {np.abs(a.p_flagged - b.p_flagged).max():.3f}, score CI ends "
            f"{np.max(np.abs(a.score_lo - b.score_lo) / w):.3f}/{np.max(np.abs(a.score_hi - b.score_hi) / w):.3f} of width"
        )
        print(
            f"  two 200-rep bootstraps (exact): p_flagged {np.abs(c.p_flagged - d.p_flagged).max():.3f}, score CI ends "
            f"{np.max(np.abs(c.score_lo - d.score_lo) / w):.3f}/{np.max(np.abs(c.score_hi - d.score_hi) / w):.3f}"
        )


if __name__ == "__main__":
    main()
