"""The evidence scripts' quick modes run end to end, so the scripts cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    scored = subprocess.run([sys.executable, str(REPO / "benchmarks" / "planted_scores.py"), str(out), str(npz), "--choose", "0"],
                            capture_output=True, text=True, timeout=120)
    assert scored.returncode == 0 and "coherence (default)" in scored.stdout, scored.stderr


def test_planted_repair_quick(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    stdout = run_script("planted_repair.py", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and "recovered" in stdout
    for row in rows:
        assert row["full"]["trainable"] > row["auto"]["trainable"]
        assert row["auto"]["net"] == row["auto"]["fixed"] - row["auto"]["broken"]


def test_reproduce_quick(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    stdout = run_script("reproduce.py", "--work", str(tmp_path / "work"), "--out", str(out), "--figures", str(tmp_path / "fig"))
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"constant", "beta", "hybrid", "onecycle", "adam"}
    assert all(len(r[0]["history"]) == 2 for r in result["runs"].values())
    assert result["runs"]["beta"][0]["regimes"]["critical"] == 1.0  # beta momentum tracks the critical curve by construction
    assert len(result["per_seed"]) == 1 and "SGD/Adam" in stdout
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {"reproduce_schedules.png", "reproduce_accuracy.png"}
