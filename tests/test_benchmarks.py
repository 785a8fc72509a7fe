"""The evidence scripts' quick modes run end to end, so the scripts cannot rot."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from beta_diag import readers

REPO = Path(__file__).resolve().parents[1]
FMNIST_TRAIN = not readers.fashion_mnist_missing("train")


def run_script(name: str, *args: str) -> str:
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), "--quick", *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_planted_faults_quick(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    npz = tmp_path / "m.npz"
    stdout = run_script("planted_faults.py", "--out", str(out), "--figure", str(tmp_path / "confusion.png"), "--matrices", str(npz))
    assert "hits@1" in stdout and "coherence" in stdout and "auto_rgn" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 and all(0.0 < r["drop"] for r in rows) and all(1 <= r["ranks"]["coherence"] <= 7 for r in rows)
    assert all(1 <= r["ranks"]["auto_rgn"] <= 7 for r in rows)
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    scored = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "planted_scores.py"), str(out), str(npz), "--choose", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert scored.returncode == 0 and "coherence (default)" in scored.stdout, scored.stderr
    assert all(r["drift"]["available"] and 1 <= r["ranks"]["drift"] <= 7 for r in rows)
    rule = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "drift_rule.py"), str(out), "--choose", "0"], capture_output=True, text=True, timeout=120
    )
    assert rule.returncode == 0, rule.stderr
    assert "chosen on seeds [0]: Rule(floor=" in rule.stdout and "undamaged sgd: no suspect" in rule.stdout


def test_auto_layers_and_shifts_quick(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    stdout = run_script("auto_layers.py", "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert {"flags", "suspect", "both"} <= set(row) and "damaged group chosen" in stdout
    assert row["both"]["trainable"] >= max(row["flags"]["trainable"], row["suspect"]["trainable"])
    out = tmp_path / "s.json"
    stdout = run_script("shifts.py", "--out", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["shift"] == "invert" and row["shifted_accuracy"] < row["clean_accuracy"] and row["oracle"] in ("conv1", "fc")
    assert row["full"]["trainable"] > row["per_group"]["fc"]["trainable"] and "oracle rec." in stdout


def figures(pattern: str, text: str) -> list[float]:
    """Every number ``pattern``'s first group captures in ``text`` (at least one)."""
    found = [float(m) for m in re.findall(pattern, text, flags=re.MULTILINE)]
    assert found, (pattern, text)
    return found


def test_drift_cost_quick() -> None:
    out = run_script("drift_cost.py")
    seconds = figures(r"^  \S.*?(\d+\.\d+) s$", out.replace("\r", ""))  # every timed step took some time
    assert len(seconds) >= 3 and all(0 < t < 600 for t in seconds)
    (share,) = figures(r"(-?\d+\.\d)% of rank \(goal <= 5%\)", out)
    assert -100 < share < 100  # a share of rank, whatever this machine's noise (no timing goal is asserted in a test)


def test_planted_repair_quick(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    stdout = run_script("planted_repair.py", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and "recovered" in stdout
    for row in rows:
        assert row["full"]["trainable"] > row["auto"]["trainable"]
        assert row["auto"]["net"] == row["auto"]["fixed"] - row["auto"]["broken"]
        assert row["auto"]["accepted"] is (row["auto"]["recovered"] != 0.0)  # a refused repair ships the damaged model


def test_repair_gate_quick(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    # the healthy part only: its shifts part is superseded by search_repair.py, whose figures BENCHMARKS.md now records
    stdout = run_script("repair_gate.py", "--part", "healthy", "--out", str(out))
    result = json.loads(out.read_text())
    assert [r["sample"] for r in result["healthy"]] == ["sgd"] and "shifts" not in result
    assert "1 of 1 runs kept the original" in stdout  # the healthy SGD sample: the gate ships nothing
    for row in result["healthy"]:
        assert row["net"] == (row["candidate_net"] if row["accepted"] else 0)


@pytest.mark.skipif(not FMNIST_TRAIN, reason="reproduce.py trains on Fashion-MNIST from Debian's dataset-fashion-mnist")
def test_reproduce_quick(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    stdout = run_script("reproduce.py", "--work", str(tmp_path / "work"), "--out", str(out), "--figures", str(tmp_path / "fig"))
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"constant", "beta", "hybrid", "onecycle", "adam"}
    assert all(len(r[0]["history"]) == 2 for r in result["runs"].values())
    assert result["runs"]["beta"][0]["regimes"]["critical"] == 1.0  # beta momentum tracks the critical curve by construction
    assert len(result["per_seed"]) == 1 and "SGD/Adam" in stdout
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {"reproduce_schedules.png", "reproduce_accuracy.png"}


@pytest.mark.skipif(not FMNIST_TRAIN, reason="needs Debian's dataset-fashion-mnist for the selection images")
def test_repair_defaults_quick(tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    stdout = run_script("repair_defaults.py", "--out", str(out))
    result = json.loads(out.read_text())
    assert all(-1.0 <= v <= 1.5 for v in result["recovered"].values())  # share of the damage won back
    assert f"{result['chosen'][0]}:{result['chosen'][1]}" in result["recovered"] and all(len(n) == 1 for n in result["nets"].values())
    assert max(result["recovered"].values()) > 0.3  # some learning rate of the grid repairs the damaged fc
    assert "(1) damaged models: fc (noise, seed 0)" in stdout
    assert "(2) healthy sample: layer4 + fc, net on 1000 selection images (permutation positions [35000, 36000))" in stdout
    assert "chosen: lr " in stdout and "(3) on the verification data" in stdout


def test_repair_defaults_rule() -> None:
    """Recovery first (within 2 points of the best), then the worst-seed net, then the mean."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from repair_defaults import choose

    recovered = {(0.01, 0.0): 0.87, (0.003, 0.0): 0.86, (0.003, 1.0): 0.71, (0.001, 0.0): 0.84}
    nets = {(0.01, 0.0): [-3, -18, 0], (0.003, 0.0): [0, 11, 7], (0.003, 1.0): [4, 13, 10], (0.001, 0.0): [5, 6, 7]}
    assert choose(recovered, nets) == (0.003, 0.0)  # (0.003, 1) nets best but repairs less; (0.001, 0) is 3 points short
    nets[(0.01, 0.0)] = [0, 20, 10]
    assert choose(recovered, nets) == (0.01, 0.0)  # same worst seed as (0.003, 0): the mean decides


def test_cli_startup_quick() -> None:
    (worst,) = figures(r"slowest beta-diag answer (\d+\.\d+) s", run_script("cli_startup.py"))
    assert 0 < worst < 60


def test_peers_quick() -> None:
    """Runs with or without the optional peers (BackPACK, Opacus): each missing one is said and skipped."""
    stdout = run_script("peers.py")
    totals = figures(r"values: beta-diag [^:]*: .*per example from a float64 loop (\d\.\de[-+]\d+)", stdout)
    assert len(totals) == 2 and max(totals) < 1e-4  # each error's total squared norm, against float64
    ratios = figures(r"^beta-diag .*\s(\d+\.\d+)$", stdout.replace("\r", ""))
    assert len(ratios) == 2 and all(r > 0 for r in ratios)


def test_cause_cost_quick() -> None:
    out = run_script("cause_cost.py")
    assert "cause: none; the control pass and probe add" in out  # the healthy sample
    (share,) = figures(r"(-?\d+\.\d)% of rank \(goal <= 25%\)", out)
    assert -100 < share < 1000


def test_monitoring_quick(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    run_script("monitoring.py", "--out", str(out))
    rows = json.loads(out.read_text())["sgd"]
    assert set(rows) == {"100", "500"}
    for row in rows.values():  # contrast x0.3 moves the first layer's output by many standard errors: every batch detected
        assert row["contrast-2"]["auroc"] == 1.0 and row["contrast-2"]["detect_at_alpha"] == 1.0 and 0 <= row["false_alarms"] <= 1
