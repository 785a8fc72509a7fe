"""Planted faults against a fingerprint: does drift from recorded activation statistics name the damaged group?

    python benchmarks/planted_fingerprint.py [--quick] [--samples convnext,sgd,adam] [--seeds 0,1,2] [--out results.json]

``convnext``: the bundled sample without BatchNorm (GroupNorm/LayerNorm only), with the fingerprint `train`
recorded on its 30,000 training images. Each group is damaged by each fault kind that applies to it
(noise, quant, prune, dead: no running statistics to shift), at the scale that costs about 10 points of
held-out accuracy (``planted_faults.calibrate``), and evaluated on the 3,000 test images with the fingerprint's
hooks: one pass each. (Coherence and Auto-RGN, the other scores, are left out here: per-example gradients of
the 7x7 depthwise convolutions took about a minute per model on this machine.)

``sgd``, ``adam``: the two BatchNorm samples, given the fingerprint `beta-diag fingerprint` records by default
(the checkpoint's own training data, the 5,000-image bundle). The damaged models are those of
``planted_drift_{sgd,adam}_results.json`` (every kind, bn_shift and bn_var included), rebuilt from their recorded
scale and seed, so that fingerprint drift and BatchNorm drift are compared on the same models; each is evaluated
once with the fingerprint's hooks, and the other scores' ranks are carried over from that file.

Rows keep each drift profile, so ``benchmarks/drift_rule.py`` can choose the rule on seeds 0-1 and report seed 2.
--quick: the convnext sample, noise, seed 0, the first 1,000 test images.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from planted_faults import ADAM, SAMPLES, SGD, damage, planted

from beta_diag import fingerprint
from beta_diag.drift import Drift
from beta_diag.groups import Group, layer_groups
from beta_diag.session import DataChoice, Session, open_session

HERE = Path(__file__).resolve().parent
CONVNEXT = SAMPLES / "fmnist_convnext24_adam_beta.safetensors"
KINDS = ("noise", "quant", "prune", "dead")  # the kinds with no BatchNorm statistics to damage


def drift_of(session: Session, ds: object, groups: list[Group]) -> tuple[Drift, float]:
    """(fingerprint drift, accuracy) of ``session``'s model on ``ds``: one evaluation pass."""
    recorder = fingerprint.recorder(session.ckpt.fingerprint, session.model, groups)
    try:
        preds = session.evaluate(ds, on_batch=recorder.commit)  # type: ignore[arg-type]
    finally:
        recorder.remove()
    return recorder.result(groups), float(preds.correct.float().mean())


def suspect_of(d: Drift) -> str:
    return d.suspect or "none"


def convnext_rows(ds: object, calib: object, kinds: list[str], seeds: list[int]) -> tuple[list[str], dict, list[dict]]:
    session = open_session(CONVNEXT, device="cpu")
    assert session.ckpt.fingerprint is not None, f"{CONVNEXT.name} carries no fingerprint: run sample_checkpoints/make_samples.py"
    groups = layer_groups(session.model)
    names = [g.name for g in groups]
    healthy, accuracy = drift_of(session, ds, groups)
    base = session.evaluate(calib).accuracy  # type: ignore[arg-type]
    print(f"convnext undamaged: accuracy {100 * accuracy:.1f}%; {healthy.finding}", flush=True)
    rows: list[dict] = []
    for kind, group, seed, scale, model, drop in planted(session, calib, names, kinds, seeds, base):
        d, acc = drift_of(replace(session, model=model), ds, groups)
        rows.append(
            {
                "sample": "convnext",
                "kind": kind,
                "group": group,
                "seed": seed,
                "scale": scale,
                "drop": accuracy - acc,
                "drift": d.to_dict(),
            }
        )
        print(
            f"convnext {kind:6s} {group:6s} seed {seed}: scale {scale:.3g}, drop {100 * rows[-1]['drop']:.1f} pts "
            f"(calibration {100 * drop:.1f}); drift names {suspect_of(d)}",
            flush=True,
        )
    return names, {"convnext": {"accuracy": accuracy, "drift": healthy.to_dict()}}, rows


def batchnorm_rows(sample: str, ds: object, kinds: list[str], seeds: list[int]) -> tuple[list[str], dict, list[dict]]:
    session = open_session({"sgd": SGD, "adam": ADAM}[sample], device="cpu")
    start = time.perf_counter()
    train = session.load_data(DataChoice(split="train"))  # what `beta-diag fingerprint` records on by default
    found = fingerprint.record(session, train)
    session = replace(session, ckpt=replace(session.ckpt, fingerprint=found))
    print(f"{sample}: fingerprint of {found.images} training images in {time.perf_counter() - start:.1f} s", flush=True)
    groups = layer_groups(session.model)
    names = [g.name for g in groups]
    healthy, accuracy = drift_of(session, ds, groups)
    print(f"{sample} undamaged: accuracy {100 * accuracy:.1f}%; {healthy.finding}", flush=True)
    earlier = json.loads((HERE / f"planted_drift_{sample}_results.json").read_text())
    rows: list[dict] = []
    for old in earlier["rows"]:
        if old["kind"] not in kinds or old["seed"] not in seeds:
            continue
        model = damage(session.model, old["group"], old["kind"], old["scale"], old["seed"])
        assert model is not None
        d, acc = drift_of(replace(session, model=model), ds, groups)
        rows.append(
            {
                **{k: old[k] for k in ("sample", "kind", "group", "seed", "scale", "drop")},
                "ranks": old["ranks"],
                "batchnorm_drift": old["drift"],
                "drift": d.to_dict(),
            }
        )
        print(
            f"{sample} {old['kind']:8s} {old['group']:7s} seed {old['seed']}: drop {100 * (accuracy - acc):.1f} pts "
            f"(recorded {100 * old['drop']:.1f}); fingerprint drift names {suspect_of(d)}, BatchNorm drift named "
            f"{Drift.from_dict(old['drift']).suspect or 'none'}",
            flush=True,
        )
    return names, {sample: {"accuracy": accuracy, "drift": healthy.to_dict()}}, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", default="convnext,sgd,adam")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--kinds", default="noise,bn_shift,bn_var,quant,prune,dead")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(
        "command: python benchmarks/planted_fingerprint.py"
        + (" --quick" if args.quick else f" --samples {args.samples} --seeds {args.seeds} --kinds {args.kinds}"),
        flush=True,
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    kinds = ["noise"] if args.quick else args.kinds.split(",")
    samples = ["convnext"] if args.quick else args.samples.split(",")
    out: dict = {"groups": {}, "healthy": {}, "rows": []}
    for sample in samples:
        session = open_session(CONVNEXT if sample == "convnext" else SGD, device="cpu")  # the test bundle they share
        ds = session.load_data(DataChoice(limit=1000 if args.quick else None))
        if sample == "convnext":
            calib = ds if args.quick else session.load_data(DataChoice(limit=1000))
            names, healthy, rows = convnext_rows(ds, calib, [k for k in kinds if k in KINDS], seeds)
        else:
            names, healthy, rows = batchnorm_rows(sample, ds, kinds, seeds)
        out["groups"][sample] = names
        out["healthy"].update(healthy)
        out["rows"].extend(rows)
        named = [Drift.from_dict(r["drift"]).suspect == r["group"] for r in rows]
        print(f"{sample}: fingerprint drift names the damaged group in {sum(named)} of {len(rows)} (library rule)", flush=True)
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(out, separators=(",", ":")))  # compact: every row keeps two drift profiles


if __name__ == "__main__":
    main()
