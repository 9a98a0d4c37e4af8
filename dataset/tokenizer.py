"""Tokenizers: the project's (byte-level BPE in model/tokenizer, made by scripts/train_tokenizer.py), or the one
that travels with a checkpoint: every training run saves the tokenizer it trained with in its run folder, as
`tokenizer/` beside the weights, and whatever reads those weights later takes it from there unless told
otherwise (a Hugging Face directory carries its own)."""

from pathlib import Path

import torch
from transformers import AutoTokenizer

from model import atomic_folder
from model.convert import local_directory, names_hf_model

from .jsonl import DataError

DEFAULT_TOKENIZER_PATH = str(Path(__file__).resolve().parent.parent / "model" / "tokenizer")


def load_tokenizer(path=None):
    """The tokenizer saved in the local directory `path` (default: the project's own)."""
    path = Path(path if path is not None else DEFAULT_TOKENIZER_PATH)
    fix = "pass --tokenizer_path with a directory holding tokenizer.json (scripts/train_tokenizer.py makes one)"
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"no tokenizer at {path} (no tokenizer.json there); {fix}")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as error:
        reason = " ".join(str(error).split())  # one line, whatever the library wrote
        raise DataError(f"the tokenizer at {path} cannot be loaded ({reason}); {fix}") from None


def tokenizer_beside(weights) -> Path | None:
    """The tokenizer saved with the weights at `weights`: the `tokenizer/` folder beside a weights file, or a
    Hugging Face directory's (or Hub repo's) own files; None when there is none."""
    weights = Path(weights)
    if names_hf_model(weights) and not weights.is_dir():
        try:
            weights = local_directory(weights)  # a Hub repo id: its snapshot, as the weights load from
        except (OSError, ValueError):  # unreachable, or no valid repo id: loading the weights says which
            return None
    for directory in (weights, weights.parent / "tokenizer") if weights.is_dir() else (weights.parent / "tokenizer",):
        if (directory / "tokenizer.json").is_file():
            return directory
    return None


def same_tokenizer(a, b) -> bool:
    """The same vocabulary, merges, special tokens and chat template."""
    return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str() and a.chat_template == b.chat_template


def save_tokenizer(tokenizer, directory):
    """`tokenizer.save_pretrained` into a temporary folder swapped in for `directory`: a crash leaves the previous
    one whole."""
    atomic_folder(directory, lambda tmp: tokenizer.save_pretrained(str(tmp)))


def token_bytes(tokenizer):
    """[vocab] UTF-8 byte length of each token of a byte-level BPE (one byte per character of its token
    string), 0 for special tokens, which spell no text."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    lengths = [0 if i in special else len(token) for i, token in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer))))]
    return torch.tensor(lengths)
