"""The console script's first step: import the command line, turning Ctrl-C while it loads into exit 130 (torch loads later, inside the command, under its own handler)."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from beta_diag.cli import main as run
    except KeyboardInterrupt:
        print("Error: interrupted while starting; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    run()
