"""The command line answers --help, --version and usage errors without loading torch."""

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "torchvision", "matplotlib", "numpy")
PROBE = (
    "import sys\n"
    "from beta_diag.cli import app\n"
    "try:\n"
    "    app(args=sys.argv[1:], prog_name='beta-diag')\n"
    "except SystemExit as done:\n"
    "    code = done.code\n"
    "print('LOADED', [m for m in {heavy} if m in sys.modules], code, file=sys.stderr)\n"
)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--help"], 0),
        (["--version"], 0),
        (["rank", "--help"], 0),
        (["repair", "--help"], 0),
        (["rank"], 2),  # a missing checkpoint
        (["rank", "x.safetensors", "--metric", "bogus"], 2),
        (["bogus"], 2),
    ],
)
def test_answers_without_torch(args: list[str], code: int) -> None:
    run = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True, timeout=120, check=False)
    assert run.stderr.strip().splitlines()[-1] == f"LOADED [] {code}", run.stderr


def test_version_is_the_packages() -> None:
    from beta_diag import __version__

    run = subprocess.run([sys.executable, "-m", "beta_diag", "--version"], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout == f"beta-diag {__version__}\n"


def test_the_renderer_and_the_json_writer_import_no_torch() -> None:
    """report renders results and serial writes them; neither reaches down into model code (no circle through report)."""
    code = "import sys, beta_diag.report, beta_diag.serial; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_type_checkers_see_the_real_types_of_the_public_api(tmp_path: Path) -> None:
    """The lazy exports are typed: mypy flags a wrong argument to beta_diag.rank instead of seeing Any."""
    (tmp_path / "use.py").write_text("import beta_diag\n\nbeta_diag.rank(42)\nbeta_diag.evaluate\n")
    result = subprocess.run([str(Path(sys.executable).parent / "mypy"), str(tmp_path / "use.py")], capture_output=True, text=True)
    assert result.returncode == 1 and 'Argument 1 to "rank" has incompatible type "int"' in result.stdout, result.stdout
