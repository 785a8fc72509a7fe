"""Hardening III, rule 1: text from files and paths reaches the terminal and plots literally. Rich markup prints
as itself, escape sequences and newlines are shown escaped, long names are cut, and `$` in a plot is a dollar;
SIGTERM ends a command as Ctrl-C does."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import save_file
from typer.testing import CliRunner

from beta_diag import checkpoint, data
from beta_diag.cli import app
from beta_diag.shown import plain

runner = CliRunner()
HOSTILE = ["[bold red]red[/]", "\x1b]0;owned\x07\x1b[2J", "two\nlines", "[link=file:///etc/passwd]x[/link]", "$x^2$ " + "y" * 300]


def hostile_copy(t: dict[str, Path], tmp: Path) -> tuple[Path, Path]:
    """The tiny checkpoint and test bundle with hostile class names and a hostile metadata value."""
    ck = checkpoint.load(t["ckpt"])
    meta = ck.metadata.to_strings()
    meta.update(class_names=json.dumps(HOSTILE[:4]), dataset="[/]\x1b[31m")
    ckpt = tmp / "[bold]model[red].safetensors"
    save_file(ck.state_dict, str(ckpt), metadata=meta)
    ds = data.load(str(t["test"]), "test")
    bundle = tmp / "$data$ [red].safetensors"
    data.save_bundle(bundle, dataclasses.replace(ds, class_names=tuple(HOSTILE[:4])))
    return ckpt, bundle


def shows_literally(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text  # no escape sequence reaches the terminal
    assert "internal error" not in text and "Traceback" not in text


def test_plain_makes_every_character_visible_and_cuts_long_values() -> None:
    assert plain("a\x1b[2Jb\nc\td\u202e") == "a\\x1b[2Jb\\x0ac\\x09d\\u202e"
    assert plain("[bold]x[/]") == "[bold]x[/]" and plain("é 名前") == "é 名前"
    cut = plain("y" * 300)
    assert len(cut) == 120 and cut.endswith("\u2026") and plain("y" * 300, None) == "y" * 300


def test_hostile_names_print_as_themselves_in_every_table_note_and_error(tiny: dict[str, Path], tmp_path: Path) -> None:
    ckpt, bundle = hostile_copy(tiny, tmp_path)
    info = runner.invoke(app, ["info", str(ckpt)])
    assert info.exit_code == 0, info.output
    shows_literally(info.output)
    assert "[bold]model[red].safetensors" in info.stdout and "[/]\\x1b[31m" in info.stdout and "[bold red]red[/]" in info.stdout
    ranked = runner.invoke(
        app, ["rank", str(ckpt), "--data", str(bundle), "--by-class", "--bootstrap", "0", "--plot", str(tmp_path / "$r$.png")]
    )
    assert ranked.exit_code == 0, ranked.output
    shows_literally(ranked.output)
    assert "two\\x0alines" in ranked.stdout and "[link=file:///etc/passwd]x[/link]" in ranked.stdout
    assert "\\x1b]0;owned\\x07" in ranked.stdout
    assert (tmp_path / "$r$.png").read_bytes()[:4] == b"\x89PNG"  # a $ in the path is no mathtext
    missing = runner.invoke(app, ["rank", str(tmp_path / "[/]gone\x1b[2J.safetensors")])
    assert missing.exit_code == 1
    shows_literally(missing.output)
    assert "[/]gone\\x1b[2J.safetensors" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_sigterm_ends_a_command_like_ctrl_c_with_nothing_left_behind(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    args = ["train", "--data", tiny["train"], "--test-data", tiny["test"], "--arch-arg", "width=2", "--epochs", "1000", "-o", out]
    proc = subprocess.Popen(
        [sys.executable, "-m", "beta_diag", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ
    )
    time.sleep(8)  # well into training (imports take a few seconds)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("Error: terminated")  # in training, or still starting on a loaded machine
    assert list(tmp_path.iterdir()) == []  # no temporary file stays


def test_every_command_shows_hostile_names_literally(tiny: dict[str, Path], tmp_path: Path) -> None:
    ckpt, bundle = hostile_copy(tiny, tmp_path)
    name, data_name = "[bold]model[red].safetensors", "$data$ [red].safetensors"
    for args, shown in (
        (["compare", ckpt, ckpt, "--data", bundle, "--bootstrap", "0", "--plot", tmp_path / "$c$.png"], name),
        (["repair", ckpt, "--data", bundle, "--train-data", tiny["train"], "--layers", "fc", "--dry-run"], data_name),
        (["drift", ckpt, "--data", bundle, "--plot", tmp_path / "$d$.png"], data_name),
        (["schedule", ckpt], name),
        (["fingerprint", ckpt, "--data", bundle, "-o", tmp_path / "[red]fp[red].safetensors"], "[red]fp[red].safetensors"),
    ):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code in (0, 4), (args[0], result.output)
        shows_literally(result.output)
        assert "".join(shown.split()) in "".join(result.stdout.split()), (args[0], result.output)  # tables may wrap a long path
