"""Output directories: files written whole or not at all, and the rules every command follows for --out.

    --out names a file              an error (a directory is wanted)
    --out is missing or empty       created and used
    --out holds another command's
      or a user's files             an error: simba never writes into, or deletes, what it did not write
    --out holds this command's run  an error unless --resume (continue it) or --overwrite (replace it)

Each command marks its directories with one file (compare.yaml, recipe.yaml, results.json, ...): that
marker is how it knows a directory is its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from simba_cli.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str):
    """Write `text` to `path` through a temporary file beside it, so a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@contextmanager
def atomic_directory(directory: Path):
    """Yield a temporary directory beside `directory`; on success it replaces `directory` whole.

    Everything in it gets the permissions of a plain mkdir and open (a temporary directory is private, mode
    0700; a saved model must be readable by whoever may read its parent)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        mask = _umask()  # some writers (safetensors) make their files private: give everything the usual modes
        for path in tmp.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        tmp.chmod(0o777 & ~mask)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_not_file(out: Path):
    """`out` is a directory, or one that can be created: checked before any work, by making (and removing) a
    probe directory in its nearest existing ancestor."""
    out = Path(out)  # os.path's tests, not Path's: they say False where the system refuses to look
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; give a directory (it is created if needed)")
    if os.path.isdir(out):
        return
    parent = out.absolute().parent
    while not os.path.exists(parent) and parent != parent.parent:
        parent = parent.parent
    if not os.path.isdir(parent):
        raise UserError(f"--out {out} cannot be created: {parent} is a file; choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".simba-probe.", dir=parent))
    except OSError as e:
        raise UserError(f"--out {out} cannot be created in {parent} ({e.strerror}); choose another --out") from None


def check_out(out: Path, marker: str, command: str, overwrite: bool = False, resume: bool = False,
              resumable: bool = True) -> bool:
    """Check that `command` may write into `out`, before any work; True when there is a run to continue.

    Nothing is changed here: call `replace` (after all other checks) to clear an old run for --overwrite."""
    out = Path(out)
    check_not_file(out)
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not (out / marker).exists():
        raise UserError(f"{out} holds files that no `simba {command}` wrote (no {marker}); choose another --out")
    if resume and resumable:
        return True
    if overwrite:
        return False
    hint = "pass --resume to continue it or --overwrite to replace it" if resumable else \
        "pass --overwrite to replace it"
    raise UserError(f"{out} already holds a `simba {command}` run; {hint}, or choose another --out")


def replace(out: Path):
    """Empty `out` (a run of ours, as `check_out` established) and make sure it exists."""
    out = Path(out)
    if out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
