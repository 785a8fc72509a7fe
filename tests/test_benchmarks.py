"""The planted-fault benchmark's quick mode runs end to end, so the script cannot rot."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_planted_faults_quick(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "planted_faults.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "hits@1" in run.stdout and "coherence" in run.stdout
    import json

    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 and all(0.0 < r["drop"] for r in rows) and all(1 <= r["ranks"]["coherence"] <= 7 for r in rows)
