"""repair's tables: the plan (``--dry-run``), the candidate search, and the summary of what was fixed and broken.
Torch-free, as ``report``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table

from beta_diag.report import stdout
from beta_diag.shown import bold, plain

if TYPE_CHECKING:
    from beta_diag.verdicts import RepairReport


def plan_table(plan: dict[str, Any]) -> None:
    """``Plan.to_dict()`` as a table."""
    out = stdout()
    table = Table("field", "value", title="repair plan (dry run: nothing trained or written)", title_justify="left")
    table.add_row("groups", plain(", ".join(plan["groups"]) or "the best candidate on validation", None))
    for cand in plan.get("candidates", []):
        table.add_row(
            "candidate", plain(f"{cand['name']}: {', '.join(cand['groups']) or 'no layer'} ({cand['trainable']:,} parameters)", None)
        )
    table.add_row("because", plain(plan.get("because", ""), None))
    table.add_row("trainable parameters", f"{plan['trainable']:,} of {plan['total']:,} ({100 * plan['fraction']:.1f}%)")
    t, v, w = plan["train_data"], plan["val_data"], plan["verify_data"]
    table.add_row("training data", f"{plain(t['spec'])} ({plain(t['split'])}, {t['examples']} examples, focus {t['focus']})")
    table.add_row("validation data", f"{plain(v['spec'])} ({plain(v['split'])}, {v['examples']} examples: {v['from']})")
    table.add_row("verification data", f"{plain(w['spec'])} ({plain(w['split'])}, {w['examples']} examples)")
    k = plan.get("keep_data")
    table.add_row("keep data", f"{plain(k['spec'])} ({plain(k['split'])}, {k['examples']} examples): must not get worse" if k else "none")
    c = plan["config"]
    table.add_row(
        "schedule", f"{c['epochs']} epochs, {plan['steps']} steps, {c['optimizer']} with {c['momentum']} momentum, cosine LR from {c['lr']}"
    )
    table.add_row("gate", f"keep the best epoch on validation; write it only if its gain has p <= {c['accept_p']:g}")
    table.add_row("frozen prefix cached", plan["cached_prefix"] or "no")
    table.add_row("estimated time", f"at most {plan['estimated_seconds']:.0f} s")
    out.print(table)


def search_table(found: dict[str, Any], examples: int) -> None:
    """--layers auto's search: every arm it ran, in order, the winner marked."""
    table = Table(
        "candidate",
        "lr",
        "trained",
        "epochs",
        "kept epoch",
        "val accuracy",
        "val net",
        "seconds",
        title=f"search on validation ({examples} examples; the gate corrects for {found['tries']} points)",
        title_justify="left",
    )
    for t in found["tried"]:
        name = f"{t['candidate']} (lr {t['lr']:g})" if t["lr"] is not None else t["candidate"]
        table.add_row(
            name + (" (won)" if name == found["winner"] else ""),
            "-" if t["lr"] is None else f"{t['lr']:g}",
            f"{100 * t['fraction']:.1f}%",
            f"{t['epochs']}" + (" (stopped)" if t["stopped_early"] else ""),
            str(t["best_epoch"]),
            f"{100 * t['val_acc']:.2f}%",
            f"{t['val_net']:+d}",
            f"{t['seconds']:.1f}",
        )
    stdout().print(table)
    for line in found["skipped"]:
        stdout().print(plain(f"skipped: {line}", None))


def repair_summary(r: RepairReport) -> None:
    out = stdout()
    table = Table(
        "arm",
        "groups",
        "trained",
        "seconds",
        "held-out accuracy",
        "fixed",
        "broken",
        "net (95%)",
        "p",
        "train-data net",
        title=f"verified on {plain(r.plan['verify_data']['spec'])} ({plain(r.plan['verify_data']['split'])}, never trained on)"
        + ("" if r.accepted else ": the kept epoch, not written"),
        title_justify="left",
    )
    for name, arm in (("full fine-tune" if r.full else "surgical", r.surgical), ("baseline: full fine-tune", r.baseline)):
        if arm is None:
            continue
        v = arm.verify
        lo, hi = v.net_interval
        table.add_row(
            name,
            plain(", ".join(arm.groups)),
            f"{100 * arm.trainable / r.plan['total']:.1f}%",
            f"{arm.seconds:.1f}",
            f"{100 * v.accuracy_before:.2f}% -> {100 * v.accuracy_after:.2f}%",
            str(v.fixed),
            str(v.broken),
            f"{v.net:+d} ({lo:+.0f} to {hi:+.0f})",
            f"{v.p_value:.2g}",
            "unlabelled" if arm.train is None else f"{arm.train.net:+d}",
        )
    out.print(table)
    if r.search:
        search_table(r.search, r.surgical.gate.examples)
    for name, arm in (("repair", r.surgical), ("baseline", r.baseline)):
        if arm is not None and arm.keep is not None:
            k = arm.keep
            out.print(
                f"keep data ({name}), {plain(r.plan['keep_data']['spec'])}: "
                f"{100 * k.accuracy_before:.2f}% -> {100 * k.accuracy_after:.2f}%, "
                f"fixed {k.fixed}, broke {k.broken}, p = {k.p_value:.2g}" + (" (forgets)" if arm.forgets else "")
            )
    per = Table("class", "errors before", "errors after", "fixed", "broken", title="held-out, per class (surgical)", title_justify="left")
    for cls, row in r.surgical.verify.per_class.items():
        per.add_row(plain(cls), str(row["errors_before"]), str(row["errors_after"]), str(row["fixed"]), str(row["broken"]))
    out.print(per)
    if r.compute_saving is not None:
        out.print(
            f"training time saved by the surgical repair: {100 * r.compute_saving:.0f}% of the full fine-tune's "
            "(a frozen prefix runs once, in the evaluation both need)"
        )
    g = r.surgical.gate
    curve = Table(
        "epoch",
        "val loss",
        "val accuracy",
        "fixed",
        "broken",
        "net",
        title=f"validation ({g.examples} examples, never verified on)",
        title_justify="left",
    )
    for point in g.curve:
        mark = " (kept)" if point["epoch"] == g.best_epoch else ""
        curve.add_row(
            f"{point['epoch']}{mark}",
            f"{point['val_loss']:.4f}",
            f"{100 * point['val_acc']:.2f}%",
            str(point["val_fixed"]),
            str(point["val_broken"]),
            f"{point['val_net']:+d}",
        )
    out.print(curve)
    out.print(bold(plain(r.verdict, None)))
