"""PNG figures (matplotlib, the ``plot`` extra). Written atomically."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from beta_diag import distributed
from beta_diag.errors import ConfigError
from beta_diag.outputs import atomic_path, check_output
from beta_diag.schedules import BAND, critical_momentum
from beta_diag.shown import plain

REGIME_COLOUR = {"underdamped": "#d62728", "critical": "#2ca02c", "overdamped": "#1f77b4"}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        matplotlib.rcParams["text.parse_math"] = False  # a $ in a name or path is a dollar sign, not mathtext
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'beta-diag[plot]'") from None
    return plt


def _save(fig: Any, path: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    if distributed.is_main():  # under torchrun, process 0 alone writes (see checkpoint.save)
        check_output(path, force, inputs)
    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _write(fig: Any, path: Path, force: bool, inputs: tuple[Path, ...]) -> None:
    try:
        _save(fig, path, force, inputs)
    finally:
        _pyplot().close(fig)


def schedule_figure(schedules: list[dict[str, Any]]) -> Any:
    """The paper's Figures 1 and 3: LR; momentum against the critical curve; regime per epoch."""
    plt = _pyplot()
    fig, (ax_lr, ax_mu, ax_reg) = plt.subplots(1, 3, figsize=(15, 4))
    for sched in schedules:
        epochs = [h["epoch"] for h in sched["epochs"]]
        ax_lr.plot(epochs, [h["lr"] for h in sched["epochs"]], label=plain(sched["name"]))
        ax_mu.plot(epochs, [h["momentum"] for h in sched["epochs"]], label=plain(sched["name"]))
    ref = schedules[0]["epochs"]
    epochs = [h["epoch"] for h in ref]
    mu_c = [critical_momentum(h["lr"], clamp=None) for h in ref]
    ax_mu.plot(epochs, mu_c, "--", color="grey", label="critical 1-2*sqrt(lr)")
    ax_mu.fill_between(epochs, [m + BAND for m in mu_c], 1.0, color=REGIME_COLOUR["underdamped"], alpha=0.08, label="underdamped")
    ax_mu.fill_between(epochs, 0.0, [m - BAND for m in mu_c], color=REGIME_COLOUR["overdamped"], alpha=0.08, label="overdamped")
    ax_mu.set_ylim(0.3, 1.0)
    for row, sched in enumerate(schedules):
        for h in sched["epochs"]:
            ax_reg.barh(row, 1, left=h["epoch"] - 1, color=REGIME_COLOUR[h["regime"]])
    ax_reg.set_yticks(range(len(schedules)), [s["name"] for s in schedules])
    for ax, title in ((ax_lr, "learning rate"), (ax_mu, "momentum"), (ax_reg, "damping regime per epoch")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
    ax_lr.legend(fontsize=7)
    ax_mu.legend(fontsize=7)
    return fig


def schedule(schedules: list[dict[str, Any]], path: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Write ``schedule_figure`` as a PNG."""
    _write(schedule_figure(schedules), path, force, inputs)


def ranking_figure(r: Any) -> Any:
    """Scores per group in rank order with bootstrap 5-95% bars and P(flagged), flagged groups in red;
    beside it, when available, the drift profile along depth (each BatchNorm's KL, mean and variance parts)."""
    plt = _pyplot()
    layers = r.drift.layers if r.drift is not None and r.drift.available else ()
    width = max(6, 0.5 * len(r.groups))
    fig, axes = plt.subplots(1, 2 if layers else 1, figsize=(width + (max(6, 0.35 * len(layers)) if layers else 0), 4), squeeze=False)
    ax = axes[0][0]
    names = [g.name for g in r.groups]
    colours = ["#d62728" if g.flagged else "#7f7f7f" for g in r.groups]
    errs = [[max(0.0, g.score - g.score_lo) for g in r.groups], [max(0.0, g.score_hi - g.score) for g in r.groups]]
    ax.bar(range(len(names)), [g.score for g in r.groups], color=colours, yerr=errs, capsize=3)
    for i, g in enumerate(r.groups):
        if r.config.bootstrap:  # no replicates: no P(flagged) to show
            ax.annotate(f"P={g.p_flagged:.2f}", (i, g.score_hi), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), [plain(n) for n in names], rotation=45, ha="right")
    ax.set_ylabel(r.config.metric.value)
    ax.set_title(plain(r.flag_finding, None), fontsize=9)
    if layers:
        _drift_profile(axes[0][1], r.drift)
    fig.suptitle(textwrap.fill(plain(r.verdict, None), 180), fontsize=7)  # the cause first; a $ is not mathtext
    return fig


def ranking(r: Any, path: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Write ``ranking_figure`` as a PNG."""
    _write(ranking_figure(r), path, force, inputs)


def drift_figure(check: Any) -> Any:
    """``drift``: the drift profile along depth (each watched point's KL, mean and variance parts)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(check.drift.layers)), 4))
    _drift_profile(ax, check.drift)
    verdict = "shifted" if check.shifted else "no shift"
    fig.suptitle(plain(f"{verdict} (p = {check.p_value:.3g}, alpha {check.alpha:g}); {check.drift.finding}", None), fontsize=7)
    return fig


def drift(check: Any, path: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Write ``drift_figure`` as a PNG."""
    _write(drift_figure(check), path, force, inputs)


def _drift_profile(ax: Any, drift: Any) -> None:
    xs = range(len(drift.layers))
    tiny = drift.rule.floor * 1e-4  # log axis: a zero part is drawn at the bottom
    ax.bar(xs, [max(layer.mean_part, tiny) for layer in drift.layers], color="#1f77b4", label="mean part")
    ax.bar(
        xs,
        [max(layer.var_part, tiny) for layer in drift.layers],
        bottom=[max(layer.mean_part, tiny) for layer in drift.layers],
        color="#ff7f0e",
        label="variance part",
    )
    ax.axhline(drift.rule.floor, color="grey", linestyle=":", linewidth=1, label=f"floor {drift.rule.floor:g}")
    if drift.suspect_layer is not None:
        i = [layer.name for layer in drift.layers].index(drift.suspect_layer)
        ax.annotate(f"suspect: {drift.suspect}", (i, drift.layers[i].kl), ha="center", va="bottom", fontsize=8, color="#d62728")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [plain(layer.name) for layer in drift.layers], rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("KL vs the fingerprint" if drift.source == "fingerprint" else "KL of input statistics vs running statistics")
    ax.set_title("activation drift along depth", fontsize=9)
    ax.legend(fontsize=7)


def comparison_figure(c: Any) -> Any:
    """Rank bump chart: each group's rank in each input, flagged ranks marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.5 + 1.8 * len(c.rankings), 4))
    for name in c.group_names:
        rows = [r.group(name) for r in c.rankings]
        xs, ys = list(range(len(rows))), [g.rank for g in rows]
        ax.plot(xs, ys, "-", color="#bbbbbb")
        ax.scatter(xs, ys, c=["#d62728" if g.flagged else "#7f7f7f" for g in rows], zorder=3)
        ax.annotate(name, (len(rows) - 1 + 0.05, ys[-1]), va="center", fontsize=8)
    ax.set_xticks(range(len(c.rankings)), [plain(Path(lab).stem) for lab in c.labels], rotation=15)
    ax.set_ylabel("rank (1 = most implicated)")
    ax.invert_yaxis()
    ax.set_title(plain(c.verdict, None), fontsize=8)
    return fig


def comparison(c: Any, path: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Write ``comparison_figure`` as a PNG."""
    _write(comparison_figure(c), path, force, inputs)


def repair_figure(r: Any) -> Any:
    """Held-out errors per class before/after, the training loss per epoch, and the validation net per
    epoch (epoch 0: the original) with the epoch the gate kept."""
    plt = _pyplot()
    fig, (ax_cls, ax_loss, ax_val) = plt.subplots(1, 3, figsize=(16, 4))
    classes = list(r.surgical.verify.per_class)
    xs = range(len(classes))
    ax_cls.bar(
        [x - 0.2 for x in xs], [r.surgical.verify.per_class[c]["errors_before"] for c in classes], 0.4, label="before", color="#7f7f7f"
    )
    ax_cls.bar(
        [x + 0.2 for x in xs], [r.surgical.verify.per_class[c]["errors_after"] for c in classes], 0.4, label="after", color="#2ca02c"
    )
    ax_cls.set_xticks(list(xs), [plain(c) for c in classes], rotation=45, ha="right")
    ax_cls.set_title("held-out errors per class")
    ax_cls.legend()
    for name, arm in (("surgical", r.surgical), ("full", r.baseline)):
        if arm is not None:
            ax_loss.plot(
                [h["epoch"] for h in arm.history], [h.get("train_loss", float("nan")) for h in arm.history], marker="o", label=name
            )
            curve = arm.gate.curve
            line = ax_val.plot([c["epoch"] for c in curve], [c["val_net"] for c in curve], marker="o", label=name)[0]
            kept = curve[arm.gate.best_epoch]
            ax_val.scatter([kept["epoch"]], [kept["val_net"]], s=160, facecolors="none", edgecolors=line.get_color())
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training loss")
    ax_loss.legend()
    ax_val.axhline(0, color="grey", linewidth=1)
    ax_val.set_xlabel("epoch (0: the original)")
    ax_val.set_title(f"validation net (circled: kept; {'accepted' if r.accepted else 'original kept'})")
    ax_val.legend()
    return fig


def repair(r: Any, path: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Write ``repair_figure`` as a PNG."""
    _write(repair_figure(r), path, force, inputs)


def curves(runs: dict[str, list[list[dict[str, Any]]]], thresholds: list[float], path: Path, force: bool = False) -> None:
    """The paper's Figure 2: test accuracy per epoch for each method, mean over seeds with the min-max band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, histories in runs.items():
        epochs = [h["epoch"] for h in histories[0]]
        accs = [[100 * h["test_acc"] for h in hist] for hist in histories]
        columns = list(zip(*accs))
        ax.plot(epochs, [sum(c) / len(c) for c in columns], marker="o", markersize=3, label=f"{name} ({len(histories)} seeds)")
        ax.fill_between(epochs, [min(c) for c in columns], [max(c) for c in columns], alpha=0.15)
    for t in thresholds:
        ax.axhline(100 * t, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    _save(fig, path, force)
    plt.close(fig)


def confusion(matrix: list[list[float]], groups: list[str], title: str, path: Path, force: bool = False) -> None:
    """Planted faults: how often each damaged group (rows) is ranked first as each group (columns)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(groups), 0.8 + 0.6 * len(groups)))
    ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.annotate(f"{value:.2f}", (j, i), ha="center", va="center", fontsize=7, color="white" if value > 0.5 else "black")
    ax.set_xticks(range(len(groups)), [plain(g) for g in groups], rotation=45, ha="right")
    ax.set_yticks(range(len(groups)), groups)
    ax.set_xlabel("ranked first")
    ax.set_ylabel("damaged group")
    ax.set_title(plain(title, None), fontsize=9)
    _save(fig, path, force)
    plt.close(fig)
