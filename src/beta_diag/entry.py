"""The console script's first step: SIGTERM ends a command as Ctrl-C does (nothing half-written, exit 143), then
the command line is imported, Ctrl-C while it loads being exit 130 (torch loads later, inside the command, under
its own handler)."""

from __future__ import annotations

import signal
import sys
from types import FrameType

TERMINATED = False  # SIGTERM arrived: the KeyboardInterrupt it raised ends the command with exit 143, not 130


def _terminate(signum: int, frame: FrameType | None) -> None:
    global TERMINATED
    TERMINATED = True
    raise KeyboardInterrupt  # unwinds as Ctrl-C does: temporary files removed, nothing renamed into place


def main() -> None:
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        from beta_diag.cli import main as run
    except KeyboardInterrupt:
        print(f"Error: {'terminated' if TERMINATED else 'interrupted'} while starting; nothing was written", file=sys.stderr)
        raise SystemExit(143 if TERMINATED else 130) from None
    run()
