"""Tokenizers: the checkpoint's own when it ships one, else the family default.

state-spaces/mamba-* checkpoints ship no tokenizer; they were trained with EleutherAI/gpt-neox-20b's.
"""

from __future__ import annotations

from pathlib import Path

from simba_cli.errors import UserError
from simba_cli.models import hub

MAMBA_SSM_TOKENIZER = "EleutherAI/gpt-neox-20b"


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def load_tokenizer(model_dir: Path, override: str | None = None):
    from transformers import AutoTokenizer

    if override:
        directory = hub.resolve(override, "tokenizer", hub.TOKENIZER_FILES)
    elif has_tokenizer(model_dir):
        directory = model_dir
    else:
        directory = hub.resolve(MAMBA_SSM_TOKENIZER, "tokenizer", hub.TOKENIZER_FILES)
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {directory} ({type(e).__name__}); "
                        f"pass --tokenizer with a directory holding tokenizer.json") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
