"""The one output rule: what beta-diag may write, and how.

An output path is written only if it does not exist, or, with ``--force``, if it is a regular
file that is none of the command's inputs (checkpoints, data bundles, training and validation
data, rankings). Special files (devices, FIFOs, sockets), symbolic links and folders are refused
with the reason, and two outputs of one command may not share a path. Writes go to a temporary
name in the same folder, are flushed to disk (fsync), and are renamed onto the output; the rule
is checked again just before the rename.

Inputs have one rule too (``check_input``): a file is read only when it is a regular file (a link to one
is fine), so that a named pipe or a device never hangs a command or is read as data.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from beta_diag import distributed
from beta_diag.errors import OutputError

_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISLNK, "a symbolic link"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse_special(out: Path) -> None:
    """Refuse an existing output that is not a regular file (checked on the path itself: a link is refused as a link)."""
    try:
        mode = os.lstat(out).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    what = _kind(mode)
    if stat.S_ISLNK(mode):
        target = os.path.realpath(out)
        what += f" (to {target})"
    hint = "pass a file path to -o" if stat.S_ISDIR(mode) else "beta-diag replaces only regular files: choose another output path"
    raise OutputError(f"{out}: is {what}: {hint}")


def check_input(path: str | os.PathLike[str], what: str, error: type[Exception] = OutputError) -> None:
    """Refuse to open ``path`` for reading unless it is a regular file; a missing path is left to the caller's message."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror}: check the path and its permissions") from None
    if not stat.S_ISREG(mode):
        hint = "pass the file inside it" if stat.S_ISDIR(mode) else "beta-diag reads only regular files: save it to a file first"
        raise error(f"{path}: the {what} is {_kind(mode)}, not a file: {hint}")


def check_output(out: Path, force: bool, inputs: Iterable[Path] = (), checkpoint_file: bool = False) -> None:
    """Refuse an output that is an input, a special file or link, exists (without ``force``) or sits in a
    missing or read-only folder; with ``checkpoint_file``, also one not named ``*.safetensors``. Checked
    before any work is done, and again (``atomic_path``) just before the rename."""
    out = Path(out)
    if checkpoint_file and out.suffix.lower() != ".safetensors":
        raise OutputError(f"{out}: outputs are written as safetensors: give -o a name ending in .safetensors")
    _refuse_special(out)
    exists = out.exists()
    for src in inputs:
        if exists and Path(src).exists() and os.path.samefile(out, src):
            raise OutputError(f"{out}: output would overwrite an input: choose another output path")
    if exists and not force:
        raise OutputError(f"{out}: already exists: choose another output path or pass --force")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: folder does not exist: create it or choose another output path")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"{out.parent}: folder is not writable: choose another output path")


def preflight(outs: Mapping[str, Path | None], inputs: Iterable[Path], force: bool, checkpoint_file: str | None = None) -> None:
    """Every output of a command checked before any work (``check_output``), and no two sharing a path
    (``--out X --plot X`` would keep only the last). ``outs``: option -> path (None: not asked for);
    ``checkpoint_file``: the option that writes a checkpoint. Each write checks its own again (``atomic_path``)."""
    seen: dict[str, str] = {}
    given = tuple(inputs)
    for option, path in outs.items():
        if path is None:
            continue
        key = os.path.abspath(path)
        if key in seen:
            raise OutputError(f"{path}: named by both {seen[key]} and {option}: give each output its own path")
        seen[key] = option
        check_output(Path(path), force, given, checkpoint_file=option == checkpoint_file)


@contextlib.contextmanager
def atomic_path(out: Path, force: bool = True) -> Iterator[Path]:
    """Yield a new temporary file beside ``out`` (created exclusively: a planted link there is refused);
    flush it to disk and rename it onto ``out`` only if the block succeeds and ``out`` is still absent, or
    (with ``force``) a regular file. Errors while writing (a full disk) name the output.

    Under torchrun only process 0 writes: the others get os.devnull, so nothing is written twice.
    """
    if not distributed.is_main():
        yield Path(os.devnull)
        return
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        raise OutputError(f"{tmp}: a temporary file of this process already exists: remove it and run again") from None
    except OSError as exc:  # no free inodes or space, a read-only folder, no permission
        raise OutputError(
            f"{out}: cannot create a file beside it ({exc.strerror or exc}): free some space or choose another output path"
        ) from None
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would create it
            _refuse_special(out)  # it may have changed while we worked
            if not force and os.path.lexists(out):
                raise OutputError(f"{out}: appeared while this command ran: choose another output path or pass --force")
            os.replace(tmp, out)
        except OSError as exc:  # the disk is full, or the folder went away
            raise OutputError(f"{out}: cannot write ({exc.strerror or exc}): free some space or choose another output path") from None
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()
