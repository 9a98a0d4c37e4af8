"""jsonl → tensors: the pretrain and SFT datasets, chat-template truncation and loss masks, the tokenizer.

Every data problem a user can cause raises `DataError` with the file, the line and the fix.
"""

from .batch import LENGTH_GROUP_STEPS, Batch, Packed, collate, epoch_order
from .jsonl import DataError
from .preference import PairBatch, PreferenceDataset
from .pretrain import PretrainDataset
from .prompts import PromptDataset
from .sft import SFTDataset, truncate_turns
from .tokenizer import (DEFAULT_TOKENIZER_PATH, load_tokenizer, same_tokenizer, save_tokenizer, token_bytes,
                        tokenizer_beside)


def text_or_chat_dataset(path, tokenizer, max_length, skip_bad_lines=False):
    """An SFTDataset for a file of {"conversations": ...} lines, else a PretrainDataset (its first line tells)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:  # the dataset names a line that is not UTF-8
            first = next((line for line in f if line.strip()), "")
    except OSError:
        first = ""  # the dataset names the missing or unreadable file
    dataset_class = SFTDataset if '"conversations"' in first else PretrainDataset
    return dataset_class(path, tokenizer, max_length, skip_bad_lines=skip_bad_lines)

__all__ = ["LENGTH_GROUP_STEPS", "Batch", "Packed", "collate", "epoch_order", "DataError", "PairBatch", "PreferenceDataset", "PretrainDataset", "PromptDataset", "SFTDataset", "truncate_turns", "load_tokenizer", "DEFAULT_TOKENIZER_PATH", "same_tokenizer", "save_tokenizer", "tokenizer_beside",
           "text_or_chat_dataset", "token_bytes"]
