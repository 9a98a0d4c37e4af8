"""Preference pairs for DPO: {"chosen": [messages], "rejected": [messages]} → two samples per pair.

Both sides are conversations in the SFT format that share every turn but the last and end
with different assistant answers (MiniMind's `dpo.jsonl` layout); a "tools" key beside them lists the tools both
may call. Each side goes through the
SFT chat template and truncation; its loss mask keeps only the final answer (and its end
token), the tokens whose log-probability DPO compares.
"""

from dataclasses import dataclass

import numpy as np
from datasets import Features, Value

from .batch import Batch, collate
from .jsonl import FIX
from .sft import SFTDataset, encode_together
from .tokenized import ENCODED_FEATURES, TokenizedJsonlDataset, shifted


@dataclass
class PairBatch:
    """`pairs` chosen rows followed by their rejected rows, one `Batch` so a model reads both in one forward."""

    both: Batch

    def __len__(self):
        return len(self.both) // 2

    @property
    def width(self):
        return self.both.width

    def padded_to(self, width):
        return PairBatch(self.both.padded_to(width))

    def pin_memory(self):
        return PairBatch(self.both.pin_memory())

    def to(self, device):
        return PairBatch(self.both.to(device))


class PreferenceDataset(TokenizedJsonlDataset):
    """Each item is (chosen sample, rejected sample), each an SFT-style (input_ids, targets, loss_mask)."""

    columns = ("chosen", "rejected", "tools")
    optional = ("tools",)
    nested = True
    # The chosen ids, then the rejected ones from `rejected_start`; loss_spans holds one span for each.
    features = Features({**ENCODED_FEATURES, "rejected_start": Value("int32")})

    def __init__(self, path, tokenizer, max_length, skip_bad_lines=False):
        SFTDataset.check_tokenizer(tokenizer)
        super().__init__(path, tokenizer, max_length, skip_bad_lines)

    @staticmethod
    def record_problem(record):
        for side in ("chosen", "rejected"):
            if record.get(side) is None:
                return (f'no "{side}" key (or it is null); preference lines look like {{"chosen": [messages], '
                        f'"rejected": [messages]}}, {FIX}')
            problem = SFTDataset.record_problem({"conversations": record[side], "tools": record.get("tools")})
            if problem:
                return problem.replace('"conversations"', f'"{side}"') if '"conversations"' in problem \
                    else f'"{side}": {problem}'
        if record["chosen"][:-1] != record["rejected"][:-1]:
            return ('"chosen" and "rejected" must share every turn but the last (the prompt) and differ only in '
                    f"the final assistant answer; {FIX}")
        return None

    @staticmethod
    def encode(records, tokenizer, max_length):
        # Both sides lose the same older exchanges, so the two answers follow one prompt.
        pairs = encode_together([[(record[side], record.get("tools")) for side in ("chosen", "rejected")]
                                 for record in records], tokenizer, max_length)
        encoded = {"input_ids": [], "loss_spans": [], "rejected_start": []}
        for (chosen, chosen_spans), (rejected, rejected_spans) in pairs:
            # A pair is kept while each side's last span still holds its own final answer: cut to the turns the
            # sides share (an earlier tool call, say), it would compare the same tokens with themselves.
            kept = bool(chosen_spans) and bool(rejected_spans) and (
                chosen[chosen_spans[-2]:chosen_spans[-1]] != rejected[rejected_spans[-2]:rejected_spans[-1]])
            encoded["input_ids"].append(chosen + rejected)
            encoded["loss_spans"].append(
                [*chosen_spans[-2:], *(start + len(chosen) for start in rejected_spans[-2:])] if kept else [])
            encoded["rejected_start"].append(len(chosen))
        return encoded

    def __getitem__(self, index):
        row = int(self.rows[index])
        split = self.samples.data.column("rejected_start")[row].as_py()
        ids, is_target = self.ids_and_targets(row)
        return shifted(ids[:split], is_target[:split]), shifted(ids[split:], is_target[split:])

    @property
    def lengths(self):
        total = super().lengths
        split = self.samples.data.column("rejected_start").to_numpy()[self.rows]
        return np.maximum(split, total - split)

    def collate(self, pairs):
        return PairBatch(collate([chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs], self.pad_id))
