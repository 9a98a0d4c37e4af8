"""jsonl → tensors: the pretrain and SFT datasets, chat-template truncation and loss masks, the tokenizer.

Every data problem a user can cause raises `DataError` with the file, the line and the fix.
"""

from .batch import LENGTH_GROUP_STEPS, Batch, collate, epoch_order
from .jsonl import DataError
from .preference import PairBatch, PreferenceDataset
from .pretrain import PretrainDataset
from .sft import SFTDataset, truncate_qa
from .tokenizer import DEFAULT_TOKENIZER_PATH, load_tokenizer

__all__ = ["LENGTH_GROUP_STEPS", "Batch", "collate", "epoch_order", "DataError", "PairBatch", "PreferenceDataset", "PretrainDataset", "SFTDataset", "truncate_qa", "load_tokenizer", "DEFAULT_TOKENIZER_PATH"]
