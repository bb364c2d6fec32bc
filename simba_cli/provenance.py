"""What every output directory records about how it was made: versions, git commit, command, seed."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = ("simba-cli", "torch", "numba", "triton", "transformers", "lm_eval", "tokenizers", "mamba_ssm")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the simba source tree this code runs from (with '-dirty' if modified), if it is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def provenance(**extra) -> dict:
    """Versions, commit and the command line, plus whatever the caller adds (seed, device, ...)."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]]
    return {"versions": versions(), "git_commit": git_commit(), "command": " ".join(argv), **extra}


def model_fingerprint(name: str) -> str:
    """A short fingerprint of a model's files, so that results computed from other weights under the same name
    (a retrained zoo model, an updated directory) are never reused: a hash of every file's name, size and
    first and last MiB (cheap on multi-GB checkpoints) of the directory the model loads from (`hub.resolve`: a
    local directory, a zoo model, or a hub id's snapshot in the hub cache, downloaded now if need be); the name
    itself where there is none. A pruned artifact's fingerprint includes its base model's (the artifact
    directory may hold only simba.yaml)."""
    import hashlib

    from simba_cli.errors import UserError
    from simba_cli.models.hub import resolve

    try:
        directory = resolve(name)
    except UserError:
        return name
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(directory)}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    from simba_cli.simba.artifact import is_artifact, read_artifact

    if is_artifact(str(directory)) and (base := read_artifact(directory)[0]) != str(directory):
        h.update(model_fingerprint(base).encode())
    return h.hexdigest()[:16]
