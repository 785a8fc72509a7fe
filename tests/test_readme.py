"""Every command in the README runs, and CI runs the README's own test command."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from beta_diag.cli import app
from tests.conftest import REPO, SAMPLES, sha

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
SETUP = BLOCKS[:2]
COMMANDS = [line for block in BLOCKS[2:] for line in block.splitlines() if line.startswith("beta-diag ")]


def test_two_setup_commands_and_ci_uses_the_second() -> None:
    assert [len(b.strip().splitlines()) for b in SETUP] == [1, 1]
    install, tests = (b.strip() for b in SETUP)
    assert "pip install -e" in install and "beta-diag" in install
    assert tests.endswith("python -m pytest")
    assert tests in (REPO / ".ci" / "run").read_text()


def cli_args(command: str) -> list[str]:
    return shlex.split(command.split("&& ")[-1].removeprefix(".venv/bin/"))[1:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for all README commands, run in README order (later ones use earlier outputs)."""
    path = tmp_path_factory.mktemp("readme")
    (path / "sample_checkpoints").symlink_to(SAMPLES)
    return path


@pytest.mark.parametrize("command", [SETUP[0].strip()] + COMMANDS)
def test_readme_command_runs(command: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    before = {p.name: sha(p) for p in SAMPLES.glob("*.safetensors")}
    result = CliRunner().invoke(app, cli_args(command))
    assert result.exit_code == 0, (command, result.stderr)
    assert {p.name: sha(p) for p in SAMPLES.glob("*.safetensors")} == before  # inputs untouched
