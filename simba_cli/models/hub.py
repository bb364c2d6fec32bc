"""Resolve a model or tokenizer reference to a local directory: a path, a zoo name, or a hub repo id.

Hub downloads go through huggingface_hub's snapshot cache, so HF_HUB_OFFLINE=1 and a pre-filled cache
(or HF_HUB_CACHE pointing at one) work without a network.
"""

from __future__ import annotations

import re
from pathlib import Path

from simba_cli.errors import UserError
from simba_cli.models import zoo

# The weight files `models.checkpoint` reads, one format at a time (a repo may ship both, and other .bin files
# such as training_args.bin): safetensors first, the .bin files only where there are none
MODEL_FILES = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
BIN_FILES = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UnknownModel(UserError):
    """A reference that is no directory, zoo model or hub repo id."""


def resolve(ref: str, what: str = "model", patterns: list[str] | None = None) -> Path:
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{ref} is a file; give the {what}'s directory")
    if zoo_dir := zoo.path(ref):
        return zoo_dir
    if _REPO_ID.match(ref):
        if patterns is not None:
            return download(ref, patterns, what)
        directory = download(ref, MODEL_FILES + TOKENIZER_FILES, what)
        return directory if any(directory.glob("model*.safetensors")) else download(ref, BIN_FILES, what)
    raise UnknownModel(f"no {what} {ref!r}: not a directory, not a zoo model ({', '.join(zoo.names()) or 'none'}), "
                    f"and not a hub repo id like state-spaces/mamba-130m")


def download(repo_id: str, patterns: list[str], what: str = "model") -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError as e:
        raise UserError(f"{what} {repo_id!r} does not exist on the Hugging Face hub; check the name") from e
    except LocalEntryNotFoundError as e:
        raise UserError(f"{what} {repo_id!r} is not in the local hub cache and the hub is unreachable "
                        f"(offline?); download it where there is a network, or give a local directory") from e
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"cannot download {what} {repo_id!r} ({type(e).__name__}); give a local directory") from e
