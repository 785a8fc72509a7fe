"""The ``beta-diag`` app: the typer application every command registers on, the error handling that turns library
errors into one line and an exit code, and the notes said once on stderr. Each ``cli*`` module imports it; ``cli``
imports them all, so that importing ``beta_diag.cli`` registers every command."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Any

import typer

from beta_diag import distributed, entry
from beta_diag import options as opt
from beta_diag.errors import BetaDiagError, NoErrorsToDiagnose
from beta_diag.options import F
from beta_diag.shown import plain

app = typer.Typer(
    name="beta-diag",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Find the layer groups that carry a classifier's errors, compare across optimizers, repair just those.",
)


@app.callback()
def _root(version: opt.Version = False) -> None:
    """Find the layer groups that carry a classifier's errors, compare across optimizers, repair just those."""


def handle_errors(func: F) -> F:
    """Turn library errors into ``Error: ...`` + exit 1, Ctrl-C into exit 130; tracebacks only with --verbose."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", False)
        who = distributed.label()  # under torchrun, the other processes' errors are marked
        try:
            return func(*args, **kwargs)
        except NoErrorsToDiagnose as exc:
            if not who:
                print(f"Nothing to rank: {plain(exc, None)}", file=sys.stderr)
            raise typer.Exit(3) from None
        except BetaDiagError as exc:
            if verbose:
                traceback.print_exc()
            print(f"{who}Error: {plain(exc, None)}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print(f"{who}Error: {'terminated' if entry.TERMINATED else 'interrupted'}; no output was written", file=sys.stderr)
            raise typer.Exit(143 if entry.TERMINATED else 130) from None
        except typer.Exit:
            raise
        except BrokenPipeError:  # the reader of stdout left (| head): what it read is all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except Exception as exc:  # noqa: BLE001 - a bug: say so, keep the traceback for --verbose
            if verbose:
                traceback.print_exc()
            print(
                f"{who}Error: internal error ({type(exc).__name__}: {plain(exc, None)}); rerun with --verbose and report the traceback",
                file=sys.stderr,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def say_notes(source: object, notes: tuple[str, ...] | list[str]) -> None:
    """What opening a checkpoint assumed or converted, once on stderr, before the results and after the command
    succeeded (a failing command prints its one error line only). Assumptions about the user's model or data come
    first, as a warning block: a wrong one (the normalisation, the input size) explains results better than any layer."""
    if not distributed.is_main():
        return
    from beta_diag.infer import is_assumption

    assumed = [n for n in notes if is_assumption(n)]
    if assumed:
        print(f"Warning: {plain(source, None)}: not read from the checkpoint, assumed (results depend on it):", file=sys.stderr)
        for note in assumed:
            print(f"  - {plain(note, None)}", file=sys.stderr)
    for note in notes:
        if note not in assumed:
            print(f"Note: {plain(source, None)}: {plain(note, None)}", file=sys.stderr)
