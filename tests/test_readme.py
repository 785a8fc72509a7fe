"""Every command in the README and in docs/ runs, and CI runs the README's own test command."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from beta_diag.cli import app
from tests.conftest import REPO, SAMPLES, sha

README = (REPO / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((REPO / "docs").glob("*.md"))}
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
SETUP = BLOCKS[:2]
LATER = BLOCKS[2:] + [b for text in DOCS.values() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)]  # README's, then docs'
COMMANDS = [line for block in LATER for line in block.splitlines() if line.startswith(("beta-diag ", "python examples/"))]
LAUNCHES = [line for block in LATER for line in block.splitlines() if line.startswith("torchrun ")]


def test_the_readme_leads() -> None:
    """About 200 lines, and a newcomer reaches the first worked output within the first 60; the reference is in docs/."""
    lines = README.splitlines()
    assert len(lines) <= 210
    assert any(line.startswith("```text") for line in lines[:60])
    assert {"commands.md", "data.md", "attribution.md", "torchrun.md", "layout.md"} <= set(DOCS)
    assert all(f"docs/{name}" in README for name in DOCS)  # every reference page is linked


def test_two_setup_commands_and_ci_uses_the_second() -> None:
    assert [len(b.strip().splitlines()) for b in SETUP] == [1, 1]
    install, tests = (b.strip() for b in SETUP)
    assert "pip install -e" in install and "beta-diag" in install
    assert tests.endswith("python -m pytest")
    assert tests in (REPO / ".ci" / "run").read_text()


def cli_args(command: str) -> list[str]:
    return shlex.split(command.split("&& ")[-1].removeprefix(".venv/bin/"), comments=True)[1:]


def expected_exit(command: str) -> int:
    """0, or the code a trailing ``# exits N`` comment names (repair's "nothing to repair" is 3)."""
    found = re.search(r"#\s*exits (\d+)\s*$", command)
    return int(found.group(1)) if found else 0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for all README commands, run in README order (later ones use earlier outputs)."""
    path = tmp_path_factory.mktemp("readme")
    (path / "sample_checkpoints").symlink_to(SAMPLES)
    (path / "examples").symlink_to(REPO / "examples")
    return path


@pytest.mark.parametrize("command", [SETUP[0].strip()] + COMMANDS)
def test_readme_command_runs(command: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    before = {p.name: sha(p) for p in SAMPLES.glob("*.safetensors")}
    if command.startswith("python "):  # the README's plain-PyTorch training script, as a user runs it
        run = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=workdir, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (command, run.stderr)
    else:
        result = CliRunner().invoke(app, cli_args(command))
        assert result.exit_code == expected_exit(command), (command, result.stderr)
    assert {p.name: sha(p) for p in SAMPLES.glob("*.safetensors")} == before  # inputs untouched


PYTHON = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_python_api_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python block, as written, from the README's folder: every command as a function."""
    assert len(PYTHON) == 1
    monkeypatch.chdir(workdir)
    before = {p.name: sha(p) for p in SAMPLES.glob("*.safetensors")}
    scope: dict = {}
    exec(compile(PYTHON[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["report"].accepted is False and not (workdir / "python_repaired.safetensors").exists()
    assert (workdir / "python_rank.json").is_file() and (workdir / "python_trained.safetensors").is_file()
    assert {p.name: sha(p) for p in SAMPLES.glob("*.safetensors")} == before


def test_readme_layout_lists_every_module() -> None:
    listed = set(re.findall(r"`([a-z_]+\.py)`", DOCS["layout.md"]))
    assert listed == {p.name for p in (REPO / "src" / "beta_diag").glob("*.py")} - {"__init__.py"}


def test_readme_lists_torchrun_launches() -> None:
    assert any("--standalone" in c for c in LAUNCHES) and any("$HEAD_NODE" in c for c in LAUNCHES)


@pytest.mark.parametrize("command", LAUNCHES)
def test_readme_torchrun_command_runs(command: str, workdir: Path) -> None:
    """Launched as written; a several-machine command runs as two machines on this one (HEAD_NODE=localhost)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HEAD_NODE": "127.0.0.1"}
    copies = 2 if "$HEAD_NODE" in command else 1
    procs = [
        subprocess.Popen(["bash", "-c", command], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(copies)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    if "--json" in command:
        import json

        json.loads(results[0][0])


def test_every_option_the_readme_names_exists() -> None:
    """Options named anywhere in the README (prose included) are options of some command; launcher
    options (torchrun's) and the evidence scripts' are theirs."""
    import typer.main

    group = typer.main.get_command(app)
    ours = {opt for cmd in [group, *group.commands.values()] for param in cmd.params for opt in param.opts + param.secondary_opts}
    ours |= {"--help"}  # every command's, added by click
    theirs = {"--standalone", "--nproc_per_node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"}
    prose = re.sub(r"`python benchmarks/[^`]*`", "", README + "".join(DOCS.values()))  # the evidence scripts' options are theirs
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", prose))
    assert {"--timings", "--auto-layers", "--arch", "--json"} <= named  # the test reads what it should
    assert named - ours - theirs == set()


def test_the_api_reference_matches_the_signatures() -> None:
    """docs/api.md is written from the exported names' signatures: a changed signature or a new export fails here
    until ``python docs/make_api.py`` is rerun, so the reference cannot drift from the code."""
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import make_api
    finally:
        sys.path.remove(str(REPO / "docs"))
    assert (REPO / "docs" / "api.md").read_text() == make_api.render(), "docs/api.md is stale: run python docs/make_api.py"
    assert "### `rank(ckpt: Openable | Session, *, data: DataChoice" in make_api.render()  # keyword-only after the first
