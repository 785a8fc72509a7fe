import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from beta_diag import data, ranking
from beta_diag.cli import app
from beta_diag.configs import Metric
from beta_diag.ranking import Matrices
from beta_diag.session import open_session
from tests.conftest import sha

runner = CliRunner()


def run(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_flag_rule_largest_gap_bounded() -> None:
    assert ranking.flag_count(np.array([5.0, 4.0, 1.0, 0.5, 0.4, 0.3, 0.2])) == 2
    assert ranking.flag_count(np.array([9.0, 1.0, 0.9, 0.8])) == 1
    # the gap after position 4 is largest, but at most floor(7/2) = 3 groups are flagged: exactly 3 here
    assert ranking.flag_count(np.array([10.0, 9.9, 9.8, 9.7, 0.0, 0.0, 0.0])) == 3
    assert ranking.flag_count(np.array([3.0, 2.0, 1.0]), top_k=2) == 2
    assert ranking.flags(np.array([1.0, 3.0, 2.0]), top_k=2).tolist() == [False, True, True]
    assert ranking.ranks(np.array([1.0, 3.0, 3.0])).tolist() == [3, 1, 2]  # ties: model order


def test_scores_by_hand() -> None:
    m = Matrices(
        errors=np.array([[9.0, 16.0], [1.0, 4.0]]),
        correct=np.array([[1.0, 1.0], [4.0, 0.0]]),
        summed_norm=np.array([3.0, 4.0]),
        numel=np.array([4.0, 16.0]),
        weight_norm=np.array([2.0, 0.5]),
        dots=np.array([[6.0, 10.0], [3.0, 6.0]]),
    )
    s = ranking.scores(m)
    assert s["norm"].tolist() == [2.0, 3.0]  # mean(3, 1), mean(4, 2)
    assert s["per_param"].tolist() == [1.0, 0.75]
    assert s["weight_rel"].tolist() == [1.0, 6.0]
    assert s["norm_correct"].tolist() == [1.5, 0.5]
    assert np.allclose(s["contrast"], [2.0 / 1.5, 6.0])
    assert np.allclose(s["share"], [0.4, 0.6])
    # shares: errors (9/25, 16/25), (1/5, 4/5); correct (1/2, 1/2), (1, 0)
    assert np.allclose(s["specific"], [(9 / 25 + 1 / 5) / 2 - 0.75, (16 / 25 + 4 / 5) / 2 - 0.25])
    # ||S_g|| = 3 and 4 (the dots sum to its square); coherence = ||S|| / sum of norms
    assert np.allclose(s["coherence"], [3.0 / 4.0, 4.0 / 6.0])
    # a bootstrap replicate projects on S: weights (2, 0) give (2 * 6 / 3) / (2 * 3) and (2 * 10 / 4) / (2 * 4)
    assert np.allclose(ranking.scores(m, np.array([[2.0, 0.0]]), np.ones((1, 2)))["coherence"], [[4.0 / 6.0, 5.0 / 8.0]])
    # without the correct sample, the scores that need it are not computed
    bare = ranking.scores(replace(m, correct=np.zeros((0, 2))))
    assert all(np.isnan(bare[k]).all() for k in ("contrast", "specific", "norm_correct")) and np.allclose(bare["coherence"], s["coherence"])


def test_rank_api_and_saved_round_trip(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = ranking.rank(tiny["ckpt"], config=ranking.RankConfig(bootstrap=50), device="cpu")
    assert len(result.groups) == 7 and [g.rank for g in result.groups] == list(range(1, 8))
    assert 1 <= len(result.flagged) <= 3
    assert result.matrices.errors.shape == (len(result.error_index), 7)
    assert f"{len(result.flagged)} of 7 groups flagged: {', '.join(result.flagged)}" in result.verdict
    assert result.drift is not None and result.drift.available
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result.to_dict()))
    assert ranking.load(path) == result


def test_rank_cli_json_is_deterministic(tiny: dict[str, Path], tmp_path: Path) -> None:
    outs = []
    for _ in range(2):
        r = run("rank", tiny["ckpt"], "--json", "--device", "cpu", "--bootstrap", "30")
        assert r.exit_code == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    parsed = json.loads(outs[0])
    assert parsed["format"] == "beta-diag-ranking" and parsed["sha256"] == sha(tiny["ckpt"])


@pytest.mark.parametrize("granularity", ["block", "module"])
@pytest.mark.parametrize("metric", [m.value for m in Metric])
def test_every_metric_and_granularity(tiny: dict[str, Path], granularity: str, metric: str) -> None:
    r = run("rank", tiny["ckpt"], "--json", "--granularity", granularity, "--metric", metric, "--bootstrap", "5", "--top-k", "2")
    assert r.exit_code == 0, r.stderr
    parsed = json.loads(r.stdout)
    assert len(parsed["flagged"]) == 2 and parsed["config"]["metric"] == metric
    scores = [g["score"] for g in parsed["groups"]]
    assert all(s is not None and np.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True)
    assert all(g["scores"][metric] == g["score"] for g in parsed["groups"])


def test_rank_table_plot_out_and_by_class(tiny: dict[str, Path], tmp_path: Path) -> None:
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    r = run("rank", tiny["ckpt"], "--by-class", "--out", out, "--plot", plot, "--bootstrap", "10", "--groups", "layer*,fc")
    assert r.exit_code == 0, r.stderr
    assert "groups flagged:" in " ".join(r.stdout.split()) and "where: " in r.stdout and "│ c3 " in r.stdout  # the by-class table
    saved = json.loads(out.read_text())
    assert saved["group_names"] == ["layer1", "layer2", "layer3", "layer4", "fc"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def perfect_bundle(tiny: dict[str, Path], path: Path) -> Path:
    """Two examples of different classes that the tiny model gets right."""
    session = open_session(tiny["ckpt"], device="cpu")
    ds = data.load(str(tiny["test"]))
    preds = session.evaluate(ds)
    picks = []
    for c in range(4):
        hits = torch.nonzero(preds.correct & (ds.labels == c)).flatten()
        if hits.numel():
            picks.append(int(hits[0]))
    assert len(picks) >= 2
    data.save_bundle(path, ds.subset(torch.tensor(picks)))
    return path


def test_rank_edge_cases(tiny: dict[str, Path], tmp_path: Path) -> None:
    perfect = run("rank", tiny["ckpt"], "--data", perfect_bundle(tiny, tmp_path / "perfect.safetensors"))
    assert perfect.exit_code == 3 and perfect.stderr.startswith("Nothing to rank: the model classifies all")
    ds = data.load(str(tiny["test"]))
    one = tmp_path / "one.safetensors"
    data.save_bundle(one, ds.subset(torch.nonzero(ds.labels == 1).flatten()))
    cases = [
        (["--data", one], "holds only 1 class(es): pass data with at least 2 classes"),
        (["--top-k", "9"], "--top-k 9: there are 7 groups; pass a number from 1 to 7"),
        (["--groups", "nothing*"], "--groups nothing* matches no group: names are conv1, bn1"),
        (["--limit", "0"], "--limit 0: pass a positive number of examples"),
        (["--out", tiny["ckpt"]], "output would overwrite an input"),
    ]
    for args, message in cases:
        r = run("rank", tiny["ckpt"], *args)
        assert r.exit_code == 1 and r.stderr.startswith("Error: ") and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_by_class_is_each_classs_mean_share_of_its_errors_gradients(tiny: dict[str, Path]) -> None:
    """``by_class[c][g]``: over the errors whose true class is c, the mean share of group g in each error's squared
    gradient norm, against a plain loop (one autograd.grad per error) on the same errors."""
    from beta_diag.configs import DataChoice, RankConfig
    from beta_diag.groups import layer_groups

    r = ranking.rank(tiny["damaged"], config=RankConfig(bootstrap=0, control=0, by_class=True), device="cpu")
    session = open_session(tiny["damaged"], device="cpu")
    ds = session.load_data(DataChoice())
    model, params = session.model, dict(session.model.named_parameters())
    expected: dict[str, dict[str, list[float]]] = {}
    for i in r.error_index:
        x, y = session.preprocess(ds.images[i : i + 1]), ds.labels[i : i + 1]
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        sq = {g.name: sum(float(grads[n].double().pow(2).sum()) for n in g.param_names) for g in layer_groups(model)}
        total = sum(sq.values())
        for name, value in sq.items():
            expected.setdefault(ds.class_names[int(y)], {}).setdefault(name, []).append(value / total)
    assert r.by_class is not None and set(r.by_class) == set(expected) and len(expected) >= 2
    for cls, groups in expected.items():
        assert r.by_class[cls] == pytest.approx({g: float(np.mean(v)) for g, v in groups.items()}, rel=1e-4, abs=1e-7)
        assert sum(r.by_class[cls].values()) == pytest.approx(1.0)
