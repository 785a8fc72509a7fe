"""Choose the drift rule's constants on some seeds of the planted faults, report them on the others.

    python benchmarks/drift_rule.py RESULTS.json [MORE.json ...] [--choose 0,1]

RESULTS.json comes from ``benchmarks/planted_faults.py --out`` or ``benchmarks/planted_fingerprint.py --out``
(several files, e.g. one per sample, are pooled); each row keeps the damaged model's drift
profile, so the rule (``beta_diag.drift.localise``) can be re-applied with other constants without
re-running. On the seeds in --choose, every rule (floor, threshold, unmoved: ``beta_diag.drift.Rule``)
of a small grid is scored by hits@1 (the suspect is the damaged group; no suspect counts as naming
the groups after the last BatchNorm, where drift cannot see, so "all but fc" is reported too: there
drift names the damaged group only by elimination) under one constraint: no suspect on the
undamaged samples. The best (ties: the library's defaults first, then the smaller threshold) is then
reported on the held-out seeds, per fault kind, beside coherence, Auto-RGN and random choice, which
need no choosing.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from beta_diag.drift import Drift, Rule, localise

GRID = [Rule(*c) for c in itertools.product((1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (2.0, 4.0, 8.0, 16.0, 32.0), (0.0, 1.0, 2.0, 4.0))]


def named(d: Drift, rule: Rule) -> str | None:
    """The group the rule names: the suspect, or, without one, the first group after the last BatchNorm."""
    suspect = localise(d.layers, rule)[0]
    return suspect if suspect is not None else (d.downstream[0] if d.downstream else None)


def hits(rows: list[dict], rule: Rule) -> float:
    return float(np.mean([named(Drift.from_dict(r["drift"]), rule) == r["group"] for r in rows])) if rows else float("nan")


def first(rows: list[dict], score: str) -> float:
    """hits@1 of another score, over the rows that carry it (planted_fingerprint.py's convnext rows do not: NaN)."""
    ranked = [r["ranks"][score] == 1 for r in rows if score in r.get("ranks", {})]
    return float(np.mean(ranked)) if ranked else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--choose", default="0,1", help="seeds used to choose; the others are held out")
    args = parser.parse_args()
    print(f"command: python benchmarks/drift_rule.py {' '.join(map(str, args.results))} --choose {args.choose}")
    loaded = [json.loads(p.read_text()) for p in args.results]
    rows = [r for res in loaded for r in res["rows"]]
    # "groups": one list (planted_faults.py, one architecture) or one per sample (planted_fingerprint.py)
    count = {r["sample"]: len(g if isinstance(g := res["groups"], list) else g[r["sample"]]) for res in loaded for r in res["rows"]}
    chosen = {int(s) for s in args.choose.split(",")}
    choose = [r for r in rows if r["seed"] in chosen]
    held = [r for r in rows if r["seed"] not in chosen]
    healthy = {k: Drift.from_dict(v["drift"]) for res in loaded for k, v in res["healthy"].items()}
    print(f"{len(choose)} damaged models to choose on (seeds {sorted(chosen)}), {len(held)} held out; samples {', '.join(healthy)}")
    print(f"{'floor':>8s} {'threshold':>9s} {'unmoved':>7s} {'hits@1 (choose)':>15s} {'healthy suspects':>16s}")
    best = None
    for rule in GRID:
        fp = sum(localise(d.layers, rule)[0] is not None for d in healthy.values())
        h = hits(choose, rule)
        print(f"{rule.floor:8.0e} {rule.threshold:9.0f} {rule.unmoved:7.0f} {h:15.3f} {fp:16d}")
        key = (fp == 0, h, rule == Rule(), -rule.threshold)
        if best is None or key > best[0]:
            best = (key, rule)
    assert best is not None
    rule = best[1]
    print(f"\nchosen on seeds {sorted(chosen)}: {rule} (library default: {Rule()})")
    for label, part in (("chosen seeds", choose), ("held-out seeds", held)):
        by_kind: dict[str, list[dict]] = defaultdict(list)
        for r in part:
            by_kind[r["kind"]].append(r)
        print(f"\n{label}: hits@1 of the damaged group ({len(part)} models; random {np.mean([1 / count[r['sample']] for r in part]):.2f})")
        print(f"{'kind':10s} {'models':>6s} {'drift':>6s} {'coherence':>9s} {'auto_rgn':>8s}")
        blind = [r for r in part if r["group"] not in Drift.from_dict(r["drift"]).downstream]  # drift names fc only by elimination
        for kind, rs in [*sorted(by_kind.items()), ("all", part), ("all but fc", blind)]:
            print(f"{kind:10s} {len(rs):6d} {hits(rs, rule):6.2f} {first(rs, 'coherence'):9.2f} {first(rs, 'auto_rgn'):8.2f}")
        misses = [
            (r["sample"], r["kind"], r["group"], named(Drift.from_dict(r["drift"]), rule))
            for r in part
            if named(Drift.from_dict(r["drift"]), rule) != r["group"]
        ]
        print("drift misses (sample, kind, damaged -> named): " + "; ".join(f"{s} {k} {g} -> {n}" for s, k, g, n in misses))
    for sample, d in healthy.items():
        suspect = localise(d.layers, rule)[0]
        print(
            f"undamaged {sample}: {'no suspect' if suspect is None else 'suspect ' + suspect}; "
            f"largest drift {max(layer.kl for layer in d.layers):.2e}"
        )


if __name__ == "__main__":
    main()
