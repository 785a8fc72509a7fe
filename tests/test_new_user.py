"""A new user's day (issue 28): data paths that travel, class names folders can hold, signs of life, eval."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import SAMPLES
from typer.testing import CliRunner

from beta_diag.cli import app

runner = CliRunner()
SGD = SAMPLES / "fmnist_resnet18w16_sgd_beta.safetensors"


def test_a_copied_checkpoint_names_the_option_that_replaces_its_missing_data(tmp_path: Path) -> None:
    copy = tmp_path / "sgd.safetensors"
    shutil.copy(SGD, copy)
    for args, option in (
        (["rank", copy], "--data"),
        (["repair", copy, "--data", SAMPLES / "fmnist_test_3k.safetensors", "--layers", "fc", "--dry-run"], "--train-data"),
    ):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 1 and "(was the checkpoint copied without it?)" in result.stderr, result.output
        assert result.stderr.strip().endswith(f"pass {option} with the data") and str(tmp_path) in result.stderr
    # with the bundles beside it, the same relative names resolve from the checkpoint's own folder, wherever it is run from
    shutil.copy(SAMPLES / "fmnist_test_3k.safetensors", tmp_path)
    result = runner.invoke(app, ["drift", str(copy), "--limit", "200", "--quiet"])
    assert result.exit_code in (0, 4) and "fmnist_test_3k.safetensors" in "".join(result.stdout.split()), result.output
