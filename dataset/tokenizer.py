"""Load the project's tokenizer (byte-level BPE in model/tokenizer, made by scripts/train_tokenizer.py)."""

from pathlib import Path

import torch
from transformers import AutoTokenizer

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


def token_bytes(tokenizer):
    """[vocab] UTF-8 byte length of each token of a byte-level BPE (one byte per character of its token
    string), 0 for special tokens, which spell no text."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    lengths = [0 if i in special else len(token) for i, token in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer))))]
    return torch.tensor(lengths)
