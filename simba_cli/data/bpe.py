"""A byte-level BPE tokenizer trained with `tokenizers`, wrapped for transformers' tokenizer interface.

Training is deterministic for the same documents and vocabulary size, and cached under the simba cache
directory by a hash of both, so every model of the zoo shares one tokenizer.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

EOS = "<|endoftext|>"


def cache_dir() -> Path:
    return Path(os.environ.get("SIMBA_CACHE", Path.home() / ".cache" / "simba"))


def train_bpe(docs: list[str], vocab_size: int):
    """A PreTrainedTokenizerFast trained on `docs` (no special handling of bos; eos = pad = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS,
                                   unk_token=None, model_max_length=1_000_000)


def cached_bpe(docs: list[str], vocab_size: int):
    from transformers import AutoTokenizer

    key = hashlib.sha256(str(vocab_size).encode() + b"\0" + "\0".join(docs).encode()).hexdigest()[:16]
    directory = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{key}"
    if (directory / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(directory))
    tok = train_bpe(docs, vocab_size)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(directory)
    except OSError:  # another process finished first
        pass
    return AutoTokenizer.from_pretrained(str(directory))
