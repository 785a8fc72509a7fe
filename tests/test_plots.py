"""The figures show the results they are drawn from: each figure's data and axes against the result's own values
(the command-line tests check that the PNG is written; these check what it shows)."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest

from beta_diag import monitor, plots
from beta_diag.comparison import compare_rankings
from beta_diag.configs import DataChoice, RankConfig, RepairConfig, repair_training
from beta_diag.ranking import Ranking, rank
from beta_diag.repairing import repair
from beta_diag.schedules import critical_momentum, planned_runs
from beta_diag.session import open_session

matplotlib.use("Agg")
RED, GREY = (0.839, 0.153, 0.157), (0.498, 0.498, 0.498)  # flagged, not flagged


@pytest.fixture(scope="module")
def ranked(tiny: dict[str, Path]) -> Ranking:
    return rank(tiny["damaged"], config=RankConfig(bootstrap=20, control=0), device="cpu")


def labels(ticks: list) -> list[str]:
    return [t.get_text() for t in ticks]


def test_the_ranking_figure_shows_each_groups_score_and_flag(ranked: Ranking) -> None:
    fig = plots.ranking_figure(ranked)
    scores_ax = fig.axes[0]
    bars = scores_ax.patches
    assert [b.get_height() for b in bars] == pytest.approx([g.score for g in ranked.groups])  # rank order
    assert labels(scores_ax.get_xticklabels()) == [g.name for g in ranked.groups]
    assert [tuple(round(c, 3) for c in b.get_facecolor()[:3]) for b in bars] == [RED if g.flagged else GREY for g in ranked.groups]
    assert any(g.flagged for g in ranked.groups) and scores_ax.get_title() == ranked.flag_finding
    p_texts = [t.get_text() for t in scores_ax.texts]
    assert p_texts == [f"P={g.p_flagged:.2f}" for g in ranked.groups]
    assert ranked.drift is not None and ranked.drift.available and len(fig.axes) >= 2  # the drift profile beside it
    profile = fig.axes[1]
    assert labels(profile.get_xticklabels()) == [layer.name for layer in ranked.drift.layers]
    floor = ranked.drift.rule.floor * 1e-4
    heights = [b.get_height() for b in profile.patches]
    n = len(ranked.drift.layers)
    assert heights[:n] == pytest.approx([max(layer.mean_part, floor) for layer in ranked.drift.layers])
    assert heights[n:] == pytest.approx([max(layer.var_part, floor) for layer in ranked.drift.layers])


def test_the_comparison_figure_draws_each_groups_rank_in_each_input(ranked: Ranking) -> None:
    reordered = compare_rankings([ranked, ranked], ["a.safetensors", "b.safetensors"])
    fig = plots.comparison_figure(reordered)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == len(reordered.group_names)
    for line, name in zip(lines, reordered.group_names):
        assert list(line.get_ydata()) == [r.group(name).rank for r in reordered.rankings]
    assert labels(ax.get_xticklabels()) == ["a", "b"] and ax.yaxis_inverted()


def test_the_schedule_figure_draws_each_schedule_and_the_critical_curve() -> None:
    runs = planned_runs()
    fig = plots.schedule_figure(runs)
    ax_lr, ax_mu, ax_reg = fig.axes[:3]
    for line, run in zip(ax_lr.get_lines(), runs):
        assert line.get_label() == run["name"] and list(line.get_ydata()) == pytest.approx([h["lr"] for h in run["epochs"]])
    for line, run in zip(ax_mu.get_lines(), runs):
        assert list(line.get_ydata()) == pytest.approx([h["momentum"] for h in run["epochs"]])
    critical = ax_mu.get_lines()[len(runs)]
    assert list(critical.get_ydata()) == pytest.approx([critical_momentum(h["lr"], clamp=None) for h in runs[0]["epochs"]])
    colours = [tuple(round(c, 3) for c in b.get_facecolor()[:3]) for b in ax_reg.patches]
    expected = [h["regime"] for run in runs for h in run["epochs"]]
    assert len(colours) == len(expected)
    hexes = {k: tuple(round(c, 3) for c in matplotlib.colors.to_rgb(v)) for k, v in plots.REGIME_COLOUR.items()}
    assert colours == [hexes[r] for r in expected] and "underdamped" in expected and "critical" in expected


def test_the_drift_figure_draws_each_points_kl_parts(tiny: dict[str, Path]) -> None:
    session = open_session(tiny["ckpt"], device="cpu")
    check = monitor.check(session, session.load_data(DataChoice()), 0.05)
    fig = plots.drift_figure(check)
    ax = fig.axes[0]
    layers = check.drift.layers
    heights = np.array([b.get_height() for b in ax.patches])
    bottoms = np.array([b.get_y() for b in ax.patches])
    total = heights[len(layers) :] + bottoms[len(layers) :]  # the variance part stacked on the mean part
    floor = check.drift.rule.floor * 1e-4
    assert total == pytest.approx([max(x.mean_part, floor) + max(x.var_part, floor) for x in layers])
    assert labels(ax.get_xticklabels()) == [x.name for x in layers]
    assert ("no shift" if not check.shifted else "shifted") in fig._suptitle.get_text()


def test_the_repair_figure_shows_errors_per_class_and_the_gates_curve(tiny: dict[str, Path], tmp_path: Path) -> None:
    config = RepairConfig(training=repair_training(epochs=2, batch_size=64, lr=0.02), accept_p=1.0)
    report = repair(tiny["damaged"], layers=["fc"], output=tmp_path / "r.safetensors", config=config, device="cpu")
    fig = plots.repair_figure(report)
    ax_cls, ax_loss, ax_val = fig.axes[:3]
    per_class = report.surgical.verify.per_class
    classes = list(per_class)
    heights = [b.get_height() for b in ax_cls.patches]
    assert heights == [per_class[c]["errors_before"] for c in classes] + [per_class[c]["errors_after"] for c in classes]
    assert sum(heights[: len(classes)]) > sum(heights[len(classes) :])  # the damaged head: fewer errors after
    (loss_line,) = ax_loss.get_lines()
    assert list(loss_line.get_ydata()) == pytest.approx([h.get("train_loss", float("nan")) for h in report.surgical.history], nan_ok=True)
    val_line = ax_val.get_lines()[0]
    assert list(val_line.get_ydata()) == [c["val_net"] for c in report.surgical.gate.curve]
    assert ("accepted" if report.accepted else "original kept") in ax_val.get_title()
