"""Load the project's tokenizer (byte-level BPE in model/tokenizer, made by scripts/train_tokenizer.py)."""

from pathlib import Path

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
