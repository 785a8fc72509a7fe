import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from beta_diag import comparison as cmp
from beta_diag import ranking
from beta_diag.cli import app
from beta_diag.configs import RankConfig
from beta_diag.errors import ConfigError
from beta_diag.ranking import GroupScore, Ranking
from tests.conftest import sha

runner = CliRunner()


def made_up(scores: list[float], flagged: set[str], config: RankConfig = RankConfig(), boot: tuple = ((), ())) -> Ranking:
    names = tuple(f"g{i + 1}" for i in range(len(scores)))
    rks = ranking.ranks(np.array(scores))
    groups = tuple(
        sorted(
            (
                GroupScore(
                    name=n,
                    numel=1,
                    param_share=0.25,
                    scores={},
                    score=s,
                    rank=int(r),
                    flagged=n in flagged,
                    p_flagged=1.0,
                    rank_lo=r,
                    rank_hi=r,
                    score_lo=s,
                    score_hi=s,
                )
                for n, s, r in zip(names, scores, rks)
            ),
            key=lambda g: g.rank,
        )
    )
    return Ranking(
        checkpoint="ckpt",
        sha256="sha",
        data="data",
        split="test",
        limit=None,
        config=config,
        examples=10,
        accuracy=0.9,
        error_index=(1, 2),
        correct_sampled=2,
        groups=groups,
        bootstrap_flags=boot[0],
        bootstrap_ranks=boot[1],
        group_names=names,
    )


def test_figures_equal_hand_computation_with_ties() -> None:
    a = made_up([3, 2, 2, 1], {"g1"})  # ranks g1 1, g2 2, g3 3 (tie broken by model order), g4 4
    b = made_up([4, 1, 3, 2], {"g1", "g3"})  # ranks g1 1, g3 2, g4 3, g2 4
    pair = cmp.compare_rankings([a, b], ["A", "B"]).pairs[0]
    assert pair.overlap == {1: 1.0, 2: 0.5}  # top-1 {g1} both; top-2 {g1, g2} vs {g1, g3}
    assert pair.jaccard == 0.5
    # average ranks A (1, 2.5, 2.5, 4), B (1, 4, 2, 3): centred products 2.25 + 0 + 0 + 0.75 over sqrt(4.5 * 5)
    assert pair.spearman == pytest.approx(3 / math.sqrt(22.5))
    # pairs: 4 concordant, 1 discordant, 1 tied in A only -> (4 - 1) / sqrt(6 * 5)
    assert pair.kendall == pytest.approx(3 / math.sqrt(30))
    assert pair.p_same_flags is None and pair.overlap_ci == {}
    # chance: two random 1-of-4 draws agree with probability 1/4; two 2-of-4 draws share >= 1 with 1 - C(2,2)/C(4,2) = 5/6
    assert pair.p_chance == {1: pytest.approx(0.25), 2: pytest.approx(5 / 6)}
    assert pair.p_chance_flags == pytest.approx(0.5)  # |{g1} & B| >= 1 for a random 2-set B: 1 - C(3,2)/C(4,2)
    # parameter shares are equal: the share ranking is model order (g1, g2, ...); A's top-2 {g1, g2} = it, B's {g1, g3} half
    assert pair.share_overlap == {1: (1.0, 1.0), 2: (1.0, 0.5)}


def test_hypergeometric_tail_by_hand() -> None:
    assert cmp.p_overlap_by_chance(7, 3, 3, 3) == pytest.approx(1 / 35)  # the paper's "same 3 of 7": 1 in C(7, 3)
    assert cmp.p_overlap_by_chance(7, 3, 3, 0) == pytest.approx(1.0)
    assert cmp.p_overlap_by_chance(7, 2, 3, 2) == pytest.approx(5 / 35)  # B holds both of A's: C(5, 1) of C(7, 3)


def test_bootstrap_agreement() -> None:
    flags_a = ((True, False, False), (True, True, False))
    flags_b = ((True, False, False), (True, False, False))
    ranks_a = ((1, 2, 3), (2, 1, 3))
    ranks_b = ((1, 2, 3), (1, 3, 2))
    a = made_up([3, 2, 1], {"g1"}, boot=(flags_a, ranks_a))
    b = made_up([3, 2, 1], {"g1"}, boot=(flags_b, ranks_b))
    pair = cmp.compare_rankings([a, b]).pairs[0]
    assert pair.p_same_flags == 0.5
    assert pair.overlap_ci[1] == pytest.approx((0.05, 0.95))  # replicate overlaps@1: 1 and 0


def test_refusals() -> None:
    a = made_up([3, 2, 1], {"g1"})
    other = made_up([3, 2, 1, 0], {"g1"})
    with pytest.raises(ConfigError, match=r"has other layer groups than A \(differing: g4\)"):
        cmp.compare_rankings([a, other], ["A", "B"])
    seeded = made_up([3, 2, 1], {"g1"}, RankConfig(seed=4))
    with pytest.raises(ConfigError, match="B was ranked with seed=4, A with 0: rank both with the same options"):
        cmp.compare_rankings([a, seeded], ["A", "B"])
    with pytest.raises(ConfigError, match="two or more"):
        cmp.compare_rankings([a])


def test_self_comparison_and_saved_vs_fresh(tiny: dict[str, Path], tmp_path: Path) -> None:
    saved = tmp_path / "r.json"
    r = runner.invoke(app, ["rank", str(tiny["ckpt"]), "--out", str(saved), "--bootstrap", "40", "--quiet"])
    assert r.exit_code == 0, r.stderr
    result = runner.invoke(app, ["compare", str(tiny["ckpt"]), str(saved), "--bootstrap", "40", "--json"])
    assert result.exit_code == 0, result.stderr
    c = json.loads(result.stdout)
    pair = c["pairs"][0]
    assert all(v == 1.0 for v in pair["overlap_at_k"].values())
    assert pair["jaccard"] == pair["spearman"] == pair["kendall"] == pair["p_same_flags"] == 1.0
    assert c["verdict"].startswith("same ")
    k = len(c["inputs"][0]["flagged"])  # a model against itself: the chance of as much overlap is 1 / C(7, k)
    assert pair["p_chance_flags"] == pytest.approx(1 / math.comb(7, k)) and pair["p_chance_at_k"][str(k)] == pair["p_chance_flags"]
    assert c["verdict"].endswith(f"; P(as much overlap by chance) {1 / math.comb(7, k):.2g}")
    assert c["inputs"][0]["drift_suspect"] == c["inputs"][1]["drift_suspect"]
    assert set(pair["share_overlap_at_k"]) == set(pair["overlap_at_k"])
    again = cmp.compare([tiny["ckpt"], tiny["ckpt"]], config=RankConfig(bootstrap=40), device="cpu")
    assert again.pairs[0].spearman == 1.0 and again.rankings[0] == again.rankings[1]


def test_stale_saved_ranking_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(tiny["ckpt"].read_bytes())
    saved = tmp_path / "r.json"
    assert runner.invoke(app, ["rank", str(copy), "--out", str(saved), "--bootstrap", "5"]).exit_code == 0
    copy.write_bytes(tiny["ckpt"].read_bytes()[:-4] + b"\x00\x00\x00\x00")
    before = sha(copy)
    r = runner.invoke(app, ["compare", str(tiny["ckpt"]), str(saved)])
    assert r.exit_code == 1 and "is stale" in r.stderr and sha(copy) == before


def test_compare_cli_table_and_plot(tiny: dict[str, Path], tmp_path: Path) -> None:
    plot = tmp_path / "c.png"
    r = runner.invoke(app, ["compare", str(tiny["ckpt"]), str(tiny["ckpt"]), str(tiny["ckpt"]), "--bootstrap", "10", "--plot", str(plot)])
    assert r.exit_code == 0, r.stderr
    assert "flagged by all:" in r.stdout and "in all 3" in r.stdout
    assert "P(by chance)" in r.stdout and "overlap with parameter share" in r.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"
