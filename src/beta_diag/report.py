"""Rendering: rich tables on stdout, progress on stderr, JSON. The only module that imports rich.

Plots live in ``plots`` (matplotlib, optional extra).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from beta_diag import distributed
from beta_diag.serial import dumps, without_timing
from beta_diag.shown import ShownConsole, bold, plain, times

ProgressFn = Callable[[str, int, int], None]  # as runtime.Progress: (task description, completed, total)

if TYPE_CHECKING:
    from beta_diag.comparison import Comparison, Pair
    from beta_diag.drift import Drift
    from beta_diag.evaluation import Evaluation  # the renderers' inputs, named for the type checker only (report imports no model code)
    from beta_diag.ranking import Ranking

REGIME_STYLE = {"underdamped": "red", "critical": "green", "overdamped": "blue"}


def stdout() -> Console:
    return ShownConsole(file=sys.stdout, width=None if sys.stdout.isatty() else 160)


def stderr() -> Console:
    return ShownConsole(file=sys.stderr, soft_wrap=True)


def print_json(value: Any, timings: bool = False) -> None:
    """``--json``: wall-clock fields only with ``--timings``, so the same command prints the same bytes."""
    sys.stdout.write(dumps(value if timings else without_timing(value)) + "\n")


PLAIN_EVERY = 10.0  # seconds between plain progress lines when stderr is no terminal (a log, a CI job)


def plain_progress() -> ProgressFn:
    """A progress callback printing one plain line to stderr at most every ``PLAIN_EVERY`` seconds (none before the
    first PLAIN_EVERY): phase, done/total, elapsed, and an estimate of what is left of the phase."""
    start = time.monotonic()
    last = [start]
    began: dict[str, float] = {}

    def update(description: str, done: int, total: int) -> None:
        now = time.monotonic()
        began.setdefault(description, now)
        if now - last[0] < PLAIN_EVERY:
            return
        last[0] = now
        took = now - began[description]
        left = f", about {took / done * (total - done):.0f} s left" if 0 < done < total else ""
        print(f"{plain(description)}: {done:,}/{total:,}, {now - start:.0f} s elapsed{left}", file=sys.stderr, flush=True)

    return update


@contextlib.contextmanager
def progress(quiet: bool = False) -> Iterator[ProgressFn | None]:
    """A progress callback drawing rich bars on stderr; on a stderr that is no terminal, plain lines every
    ``PLAIN_EVERY`` seconds; None when quiet."""
    console = stderr()
    if quiet or not distributed.is_main():  # under torchrun, process 0 tells
        yield None
        return
    if not console.is_terminal:
        yield plain_progress()
        return
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(description: str, done: int, total: int) -> None:
        if description not in tasks:
            tasks[description] = bars.add_task(description, total=total)
        bars.update(tasks[description], completed=done, total=total)

    with bars:
        yield update


def info_table(info: dict[str, Any]) -> None:
    out = stdout()
    meta = info["metadata"]
    out.print(bold(plain(info["path"], None)) + Text(f"  sha256 {info['sha256'][:16]}..."))
    table = Table("field", "value", title="metadata", title_justify="left")
    for key in ("arch", "arch_kwargs", "num_classes", "input_shape", "mean", "std", "dataset", "class_names"):
        if meta.get(key) not in (None, {}, []):
            table.add_row(key, json.dumps(meta[key]) if not isinstance(meta[key], str) else plain(meta[key], None))
    for key in ("training", "data", "repair"):
        if meta.get(key):
            table.add_row(key, json.dumps(meta[key], sort_keys=True))
    out.print(table)
    if info.get("groups"):
        groups = Table(
            "group", "parameters", "share", title=f"{info['parameters']:,} parameters in {len(info['groups'])} groups", title_justify="left"
        )
        for g in info["groups"]:
            groups.add_row(plain(g["name"]), f"{g['numel']:,}", f"{100 * g['share']:.2f}%")
        out.print(groups)
    fp = info.get("fingerprint")
    out.print(
        "fingerprint: none (record one with beta-diag fingerprint)"
        if not fp
        else f"fingerprint: {fp['points']} points ({', '.join(f'{n} {k}' for k, n in fp['kinds'].items())}) over {fp['images']:,} images"
        f" of {plain(fp['data'].get('spec'))} ({plain(fp['data'].get('split'))})"
    )
    summary = info.get("history_summary")
    if summary:
        regimes = ", ".join(f"{k} {100 * v:.0f}%" for k, v in summary["regimes"].items())
        acc = summary["final_test_acc"]
        took = "" if summary["seconds"] is None else f", {summary['seconds']:.0f} s"
        out.print(
            f"history: {summary['epochs']} epochs{took}, final test accuracy "
            f"{'n/a' if acc is None else f'{100 * acc:.2f}%'}; regimes: {regimes}"
        )


def fingerprint_summary(summary: dict[str, Any]) -> None:
    fp = summary["fingerprint"]
    stdout().print(
        f"wrote {plain(summary['path'], None)}: a fingerprint of {fp['points']} points over {fp['images']:,} images of "
        f"{plain(fp['data'].get('spec'))} ({plain(fp['data'].get('split'))}); sha256 {summary['sha256'][:16]}..."
    )


def drift_table(check: Any) -> None:
    """``drift``: one row per watched point in call order, then the suspect and the shift test's verdict."""
    d = check.drift
    out = stdout()
    against = "the fingerprint" if d.source == "fingerprint" else "the BatchNorm running statistics"
    table = Table(
        "point",
        "group",
        "drift (KL)",
        "noise",
        "jump",
        "max |z|",
        title=f"drift of {check.images:,} images of {plain(check.spec)} ({plain(check.split)}) against {against}",
        title_justify="left",
    )
    for layer, jump in zip(d.layers, (layer["jump"] for layer in d.to_dict()["layers"])):  # to_dict holds each jump
        table.add_row(
            plain(layer.name),
            plain(layer.group or layer.feeder_group or ""),
            f"{layer.kl:.3g}",
            f"{layer.noise:.2g}",
            f"x{times(jump)}",
            f"{check.per_point.get(layer.name, 0.0):.1f}",
        )
    out.print(table)
    out.print(plain(d.finding, None))
    verdict = "SHIFTED" if check.shifted else "no shift"
    worst = f"; the largest |z| {check.worst_z:.1f} at {plain(check.worst)}" if check.worst else ""
    out.print(bold(verdict) + Text(f": p = {check.p_value:.3g} (alpha {check.alpha:g}, Bonferroni over {check.tests:,} z-scores){worst}"))


def schedule_table(schedules: list[dict[str, Any]]) -> None:
    out = stdout()
    for sched in schedules:
        table = Table("epoch", "lr", "momentum", "mu_c", "zeta", "regime", "test acc", title=plain(sched["name"]), title_justify="left")
        for h in sched["epochs"]:
            acc = h.get("test_acc")
            table.add_row(
                str(h["epoch"]),
                f"{h['lr']:.5f}",
                f"{h['momentum']:.4f}",
                f"{h['mu_c']:.4f}",
                f"{h['zeta']:.3f}",
                Text(h["regime"], style=REGIME_STYLE[h["regime"]]),
                "" if acc is None else f"{100 * acc:.2f}%",
            )
        out.print(table)
        out.print("regimes: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sched["regimes"].items()))


def train_summary(result: dict[str, Any]) -> None:
    schedule_table([{"name": f"trained {result['path']}", "epochs": result["history"], "regimes": result["regimes"]}])
    stdout().print(f"wrote {plain(result['path'], None)} (sha256 {result['sha256'][:16]}...) in {result['seconds']:.1f} s")


def rank_table(ranking: Ranking) -> None:
    """The ranking as a table plus a one-line verdict."""
    out = stdout()
    metric = ranking.config.metric.value
    out.print(
        f"{plain(ranking.checkpoint, None)}: {ranking.examples} examples of {plain(ranking.data)} "
        f"({plain(ranking.split)}), accuracy {100 * ranking.accuracy:.2f}%, "
        f"{len(ranking.error_index)} errors"
        + (f", {ranking.correct_sampled} correct examples for contrast" if ranking.correct_sampled else "")
    )
    contrast = ranking.correct_sampled > 0  # scored with --contrast (or a metric that needs it)
    drift = ranking.drift if ranking.drift is not None and ranking.drift.available else None
    boot = ranking.config.bootstrap > 0  # without replicates there is no P(flagged) or interval to show
    table = Table(
        "rank",
        "group",
        "params",
        metric,
        "norm",
        *(["contrast"] if contrast else []),
        "flagged",
        "P(flagged)",
        "rank 90% CI",
        *(["drift"] if drift else []),
        title=f"ranked by {metric} ({ranking.config.granularity.value}s, {ranking.config.bootstrap} bootstrap replicates)"
        + ("; drift: the largest part of a BatchNorm's input drift charged to the group, over the drift before it" if drift else ""),
        title_justify="left",
    )
    for g in ranking.groups:
        style = "bold red" if g.flagged else None
        extra = [drift_cell(drift, g.name)] if drift else []
        table.add_row(
            str(g.rank),
            plain(g.name),
            f"{100 * g.param_share:.2f}%",
            f"{g.score:.4g}",
            f"{g.scores['norm']:.4g}",
            *([f"{g.scores['contrast']:.3g}"] if contrast else []),
            "yes" if g.flagged else "",
            *((f"{g.p_flagged:.2f}", f"{g.rank_lo:.0f}-{g.rank_hi:.0f}") if boot else ("not computed",) * 2),
            *extra,
            style=style,
        )
    out.print(table)
    if ranking.by_class:
        names = list(ranking.group_names)
        by = Table("class", *map(plain, names), title="mean share of the squared error gradient, by true class", title_justify="left")
        for cls, row in ranking.by_class.items():
            top = max(row, key=lambda n: row[n])
            by.add_row(plain(cls), *[bold(f"{row[n]:.2f}") if n == top else f"{row[n]:.2f}" for n in names])
        out.print(by)
    cause_lines(ranking)


def cause_lines(ranking: Ranking) -> None:
    """The verdict: the cause in plain words and the fix it suggests, then where (drift and flags)."""
    out = stdout()
    if ranking.cause is not None:
        c = ranking.cause
        out.print(
            Text("cause: ", style="bold")
            + Text(f"{c.kind}", style="bold red" if c.kind != "none" else "bold green")
            + Text(f": {plain(c.summary, None)}")
        )
        out.print(Text("suggested: ", style="bold") + Text(plain(c.suggested, None)))
    out.print(Text("where: ", style="bold") + Text(plain(ranking.place_finding, None)))


def drift_cell(drift: Drift, name: str) -> str | Text:
    """A group's charged drift jump, the suspect marked; blank for a group no BatchNorm is charged to."""
    value = (drift.groups or {}).get(name)
    if value is None:
        return ""
    text = f"x{times(value)}"
    return bold(f"{text} suspect") if name == drift.suspect else text


def compare_table(comparison: Comparison) -> None:
    """Side by side per group, the pairwise figures, and a verdict."""
    out = stdout()
    labels = [f"[{i + 1}]" for i in range(len(comparison.labels))]
    for label, r, path in zip(labels, comparison.rankings, comparison.labels):
        found = "" if r.drift is None else f"; {r.drift.finding}"
        cause = "" if r.cause is None else f"; cause {r.cause.kind}" + (f" at {r.cause.place}" if r.cause.place else "")
        out.print(
            Text(
                plain(
                    f"{label} {path}: accuracy {100 * r.accuracy:.2f}%, {len(r.error_index)} errors; "
                    f"flagged {', '.join(r.flagged)}{cause}{found}",
                    None,
                )
            )
        )
    metric = comparison.rankings[0].config.metric.value
    table = Table("group", *[f"{lab} rank" for lab in labels], *[f"{lab} {metric}" for lab in labels], *[f"{lab} flag" for lab in labels])
    order = sorted(comparison.group_names, key=lambda n: comparison.rankings[0].group(n).rank)
    for name in order:
        rows = [r.group(name) for r in comparison.rankings]
        table.add_row(
            plain(name), *[str(g.rank) for g in rows], *[f"{g.score:.4g}" for g in rows], *["yes" if g.flagged else "" for g in rows]
        )
    out.print(table)
    pairs = Table(
        "pair",
        "overlap@k (90% CI)",
        "P(by chance)",
        "overlap with parameter share",
        "Jaccard",
        "Spearman",
        "Kendall",
        "P(same flags)",
        title="pairwise; P(by chance): drawing k of the groups at random twice overlaps at least this much",
        title_justify="left",
    )
    for p in comparison.pairs:
        overlaps = ", ".join(f"@{k} {v:.2f}" + (f" ({comparison_ci(p, k)})" if k in p.overlap_ci else "") for k, v in p.overlap.items())
        chance = ", ".join(f"@{k} {v:.2g}" for k, v in p.p_chance.items())
        share = ", ".join(f"@{k} {a:.2f}/{b:.2f}" for k, (a, b) in p.share_overlap.items())
        pairs.add_row(
            f"{labels[p.a]} vs {labels[p.b]}",
            overlaps,
            chance,
            share,
            f"{p.jaccard:.2f}",
            f"{p.spearman:.2f}",
            f"{p.kendall:.2f}",
            "n/a" if p.p_same_flags is None else f"{p.p_same_flags:.2f}",
        )
    out.print(pairs)
    if len(comparison.rankings) > 2:
        out.print(
            plain(
                f"flagged by all: {', '.join(comparison.flagged_by_all) or 'none'}; "
                f"by a majority: {', '.join(comparison.flagged_by_majority) or 'none'}",
                None,
            )
        )
    out.print(bold(plain(comparison.verdict, None)))


def comparison_ci(pair: Pair, k: int) -> str:
    lo, hi = pair.overlap_ci[k]
    return f"{lo:.2f}-{hi:.2f}"


def eval_table(results: list[Evaluation]) -> None:
    """``eval``: one row per checkpoint and data set, then per-class accuracy side by side."""
    out = stdout()
    table = Table("", "checkpoint", "data", "examples", "accuracy", "mean loss", "top confusions (true -> predicted)")
    for i, r in enumerate(results):
        confused = ", ".join(f"{plain(c['true'], 24)} -> {plain(c['predicted'], 24)} {c['count']}" for c in r.confusions[:3])
        table.add_row(
            f"[{i + 1}]",
            plain(r.checkpoint),
            f"{plain(r.data)} ({plain(r.split)})",
            f"{r.examples:,}",
            f"{100 * r.accuracy:.2f}%",
            f"{r.mean_loss:.4f}",
            confused,
        )
    out.print(table)
    classes = list(dict.fromkeys(c for r in results for c in r.per_class))
    per = Table("class", *[f"[{i + 1}]" for i in range(len(results))], title="per-class accuracy, [n] as above", title_justify="left")
    for c in classes:
        per.add_row(plain(c), *[f"{100 * r.per_class[c]['accuracy']:.1f}%" if c in r.per_class else "" for r in results])
    out.print(per)
