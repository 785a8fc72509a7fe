"""The bootstrap's dot products from the one pass's count sketch, against the exact ones."""

import numpy as np
import pytest
import torch

from beta_diag import configs, data, groups, models, scores, sketch
from beta_diag.attribution import per_example_norms
from tests.conftest import make_images
from tests.test_attribution import loop_reference, randomise_bn

CPU = torch.device("cpu")


def test_buckets_fit_the_budget() -> None:
    assert sketch.buckets(242, 7) == 4096  # the sample's errors: the full sketch
    assert sketch.buckets(10_000, 20) == 128 * 2 == sketch.MIN_BUCKETS
    assert sketch.buckets(5_000, 7) * 5_000 * 7 * 2 <= sketch.BUDGET_BYTES


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sketched_dots_track_the_exact_ones_and_move_the_bootstrap_less_than_its_own_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sketch, "MAX_BUCKETS", 256)  # every group but the smallest is folded: 256 buckets for up to 9,248 parameters
    torch.manual_seed(0)
    model = randomise_bn(models.build("resnet18_cifar", {"width": 4, "in_channels": 1, "num_classes": 4}))
    images, labels = make_images(48, channels=1, size=16)
    ds = data.Dataset(images, labels, tuple("abcd"), "synthetic", "test")
    pre = data.Preprocess((1, 16, 16), (0.3,), (0.3,))
    found = groups.layer_groups(model)
    got = per_example_norms(model, ds, torch.arange(48), pre, CPU, batch_size=16, sketch_groups=[g.param_names for g in found])
    ref = loop_reference(model, ds, pre)
    assert got.sketch is not None and got.sketch.k == 256
    exact = np.stack([sum((ref[p] @ ref[p].sum(0)).numpy() for p in g.param_names) for g in found], 1)
    summed_sq = exact.sum(0)
    sketched = got.sketch.dots(summed_sq)
    folded = [j for j, g in enumerate(found) if g.numel > 256]
    assert len(folded) >= 4
    for j in folded:  # estimates, unbiased, close to the exact dot products
        assert np.corrcoef(sketched[:, j], exact[:, j])[0, 1] > 0.98, found[j].name
    for j in set(range(len(found))) - set(folded):  # exact where the group fits in the buckets
        assert np.allclose(sketched[:, j], exact[:, j], rtol=2e-2, atol=1e-2 * np.abs(exact[:, j]).max()), found[j].name
    sq = np.stack([sum(ref[p].pow(2).sum(1).numpy() for p in g.param_names) for g in found], 1)
    base = {
        "correct": np.zeros((0, len(found))),
        "summed_norm": np.sqrt(summed_sq),
        "numel": np.array([g.numel for g in found], float),
        "weight_norm": np.ones(len(found)),
    }
    a = scores.bootstrap(scores.Matrices(sq, dots=exact, **base), configs.Metric.coherence, None, 2000, 0)
    b = scores.bootstrap(scores.Matrices(sq, dots=sketched, **base), configs.Metric.coherence, None, 2000, 0)
    c = scores.bootstrap(scores.Matrices(sq, dots=exact, **base), configs.Metric.coherence, None, 200, 1)
    d = scores.bootstrap(scores.Matrices(sq, dots=exact, **base), configs.Metric.coherence, None, 200, 2)
    width = a.score_hi - a.score_lo
    # the sketch moves the bootstrap (2,000 replicates) less than two default 200-replicate bootstraps differ
    assert np.abs(a.p_flagged - b.p_flagged).max() <= np.abs(c.p_flagged - d.p_flagged).max() + 0.02
    for lo_hi in ("score_lo", "score_hi"):
        moved = np.abs(getattr(a, lo_hi) - getattr(b, lo_hi)) / width
        noise = np.abs(getattr(c, lo_hi) - getattr(d, lo_hi)) / width
        assert moved.max() < noise.max(), lo_hi


def test_a_layer_with_more_rows_than_buckets_wraps_with_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 output rows into 16 buckets (the projection's r is 1): still unbiased, close to the exact dots."""
    monkeypatch.setattr(sketch, "MAX_BUCKETS", 16)
    monkeypatch.setattr(sketch, "MIN_BUCKETS", 16)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 40), torch.nn.ReLU(), torch.nn.Linear(40, 4)).eval()
    images, labels = make_images(40, channels=1, size=8)
    ds = data.Dataset(images, labels, tuple("abcd"), "synthetic", "test")
    pre = data.Preprocess((1, 8, 8), (0.3,), (0.3,))
    groups_ = [["1.weight", "1.bias"], ["3.weight", "3.bias"]]
    ref = loop_reference(model, ds, pre)
    exact = np.stack([sum((ref[p] @ ref[p].sum(0)).numpy() for p in g) for g in groups_], 1)
    runs = []
    for seed in (2**63 - 1, *range(63)):  # the largest --seed too
        got = per_example_norms(model, ds, torch.arange(40), pre, CPU, batch_size=16, sketch_groups=groups_, seed=seed)
        assert got.sketch is not None and got.sketch.k == 16 and not got.sketch.materialise("1.weight")
        runs.append(got.sketch.dots(exact.sum(0)))
        assert runs[-1].sum(0) == pytest.approx(exact.sum(0), rel=1e-9)
    # one sketch this small (one projection per row, 40 rows in 16 buckets) is noisy; unbiased, the mean
    # of 64 (fixed seeds) closes in on the exact dots
    first, mean = np.corrcoef(runs[0][:, 0], exact[:, 0])[0, 1], np.corrcoef(np.mean(runs, 0)[:, 0], exact[:, 0])[0, 1]
    assert mean > 0.9 and mean > first + 0.3
