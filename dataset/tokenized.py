"""What the pretrain and SFT datasets share: jsonl → token ids in Arrow → shifted samples → padded batches.

A subclass says which jsonl keys it reads (`columns`), how to judge one record
(`record_problem`) and how to tokenize a batch of good records (`encode`). `encode`
returns, per record, the token ids and `loss_spans`: flat [start, end, start, end, ...]
half-open ranges of positions in the ids whose tokens the model must learn to predict.
Only these two short lists are stored in Arrow; the one-token shift happens in
`__getitem__` and padding in `collate`, so the cache does not depend on batch layout and stays small.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow.compute
import torch
from datasets import Features, List, Value

from .batch import collate
from .jsonl import DataError, bad_line_error, load_jsonl

ENCODED_FEATURES = Features({"input_ids": List(Value("int32")), "loss_spans": List(Value("int32"))})
# The cache key `datasets` makes names the encoding functions but not their code: a hash of this package's sources
# joins it, so rows cached by earlier code (another truncation, another chat rendering) are never served.
CODE_VERSION = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(Path(__file__).parent.glob("*.py")))
                              ).hexdigest()[:16]


class TokenizedJsonlDataset(torch.utils.data.Dataset):
    """Build once (cached by `datasets`), then serve shifted samples; counts what it skipped.

    `bad_lines`: malformed lines dropped under `skip_bad_lines=True`; `skipped`: samples
    left with no trainable token; `notes()` says both for the user.
    """

    columns = ()  # the jsonl keys each record needs
    features = ENCODED_FEATURES  # what `encode` returns per record, as stored in Arrow
    optional = ()  # columns a file may leave out (they read as null)
    nested = False  # the columns hold JSON whose shape varies by line (see `load_jsonl`)
    windows = False  # a stored row longer than max_length is several samples (pretraining's long documents)

    @staticmethod
    def record_problem(record):
        """None when the parsed jsonl `record` is usable, else what is wrong and how to fix it."""
        raise NotImplementedError

    @staticmethod
    def encode(records, tokenizer, max_length):
        """{"input_ids": [...], "loss_spans": [...]} for a batch of good records, ids at most `max_length` long (with
        `windows`, any length: the dataset serves a long row as several samples)."""
        raise NotImplementedError

    def __init__(self, path, tokenizer, max_length, skip_bad_lines=False):
        if max_length < 2:
            raise DataError(f"max_length (--max_seq_len) must be at least 2 tokens to hold one input and one target, got {max_length}")
        for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, token) is None:
                raise DataError(f"tokenizer {tokenizer.name_or_path} has no {token[:-3]}; use the project's tokenizer (--tokenizer_path model/tokenizer)")
        self.max_length, self.pad_id, self.tokenizer = max_length, tokenizer.pad_token_id, tokenizer
        records = load_jsonl(path, self.columns, self.record_problem, skip_bad_lines, self.optional, self.nested)
        try:
            encoded = records.map(
                _encode_batch,
                batched=True,
                with_indices=True,
                remove_columns=records.column_names,
                features=self.features,
                fn_kwargs=dict(
                    columns=self.columns,
                    record_problem=self.record_problem,
                    encode=self.encode,
                    names=list(self.features),
                    tokenizer=tokenizer,
                    max_length=max_length,
                    skip_bad_lines=skip_bad_lines,
                    code_version=CODE_VERSION,
                ),
                desc=f"Tokenizing {path}",
                num_proc=tokenizing_processes(path),
            )
        except _BadRecord as bad:
            raise bad_line_error(path, self.record_problem, f"record {bad.index + 1}: {bad.problem}") from None

        self.path, self.records = path, len(records)
        self.bad_lines = len(records) - len(encoded)
        has_target = self.usable(encoded)
        self.skipped = int((~has_target).sum())
        if not has_target.any():
            raise DataError(f"{path}: no usable sample left ({self.bad_lines} bad lines, {self.skipped} without a trainable token); fix the data or raise --max_seq_len")
        # Samples are read straight from the memory-mapped Arrow table (tens of microseconds
        # each, nothing held in RAM), and a Dataset pickles as a file reference for DataLoader workers.
        self.samples = encoded
        # With `windows`, a stored row longer than max_length (pretraining stores each document whole) is several
        # samples: windows of max_length ids, each starting on the last id of the one before, so every target is
        # trained once.
        rows = np.flatnonzero(has_target)
        windows = np.ones(len(rows), dtype=np.int64)
        if self.windows:
            windows = np.maximum(1, -(-(self.stored_lengths[rows] - 1) // (max_length - 1)))
        self.rows = np.repeat(rows, windows)  # each sample's Arrow row
        self.starts = (np.arange(len(self.rows)) - np.repeat(np.cumsum(windows) - windows, windows)) * (max_length - 1)
        self.split = int((windows > 1).sum())

    @staticmethod
    def usable(encoded):
        """Which encoded rows to keep: those with a trainable token."""
        return pyarrow.compute.list_value_length(encoded.data.column("loss_spans")).to_numpy() > 0

    def notes(self):
        """What building the dataset dropped, one line each, for the stage to tell the user."""
        notes = []
        if self.bad_lines:
            notes.append(f"{self.path}: skipped {self.bad_lines} bad lines of {self.records} (skip_bad_lines)")
        if self.skipped:
            notes.append(f"{self.path}: skipped {self.skipped} samples that kept no trainable token after "
                         f"truncation to {self.max_length} tokens")
        if self.split:
            notes.append(f"{self.path}: {self.split:,} documents longer than {self.max_length} tokens make "
                         f"{len(self.rows) - len(np.unique(self.rows)) + self.split:,} samples of at most that")
        return notes

    @property
    def stored_lengths(self):
        """Ids in each Arrow row."""
        return pyarrow.compute.list_value_length(self.samples.data.column("input_ids")).to_numpy()

    @property
    def lengths(self):
        """Tokens in each sample before padding, for batching samples of similar length together."""
        lengths = self.stored_lengths[self.rows] - self.starts
        return np.minimum(lengths, self.max_length) if self.windows else lengths

    def __len__(self):
        return len(self.rows)

    def token_pairs(self, max_tokens=None):
        """(token, next token) for every trained target of the samples, as two int64 arrays: the data's bigrams.
        With `max_tokens`, only those of a seeded random choice of documents holding about that many ids (a file
        grouped by source is sampled from every part of it)."""
        rows = np.unique(self.rows)
        if max_tokens is not None and self.stored_lengths[rows].sum() > max_tokens:
            rows = np.random.default_rng(0).permutation(rows)
            rows = np.sort(rows[: int(np.searchsorted(np.cumsum(self.stored_lengths[rows]), max_tokens)) + 1])
        table = self.samples.data.table.take(rows)
        ids, spans = (table.column(name).combine_chunks() for name in ("input_ids", "loss_spans"))
        values = ids.flatten().to_numpy().astype(np.int64)
        starts = ids.offsets.to_numpy()[:-1] - ids.offsets[0].as_py()  # each sample's first position in `values`
        span_rows = np.repeat(np.arange(len(rows)), np.diff(spans.offsets.to_numpy()) // 2)
        bounds = spans.flatten().to_numpy().reshape(-1, 2) + starts[span_rows, None]
        inside = np.zeros(len(values) + 1, dtype=np.int64)  # +1 where a span begins, -1 where it ends
        np.add.at(inside, bounds[:, 0], 1)
        np.add.at(inside, bounds[:, 1], -1)
        targets = np.flatnonzero(np.cumsum(inside[:-1]) > 0)  # never a sample's first position: spans start at 1
        return values[targets - 1], values[targets]

    def __getitem__(self, index):
        """(input_ids, targets, loss_mask), one shorter than the sample's ids; targets[t] follows input_ids[t]."""
        return shifted(*self.ids_and_targets(int(self.rows[index]), int(self.starts[index]), self.max_length))

    def ids_and_targets(self, row, start=0, length=None):
        """The stored ids of Arrow row `row` (`length` of them from `start`: a window of a long document reads no
        more of it) and a 0/1 tensor marking those inside its loss spans."""
        stored = self.samples.data.column("input_ids")[row].values
        if length is not None:
            stored = stored.slice(start, length)
        ids = torch.from_numpy(stored.to_numpy().astype(np.int64))
        spans = self.samples.data.column("loss_spans")[row].values.to_numpy()
        is_target = torch.zeros(len(ids), dtype=torch.long)
        for begin, end in spans.reshape(-1, 2) - start:
            is_target[max(begin, 0):max(end, 0)] = 1
        return ids, is_target

    def collate(self, samples):
        return collate(samples, self.pad_id)


def tokenizing_processes(path, bytes_per_process=64 * 2**20):
    """Every core for a large file; None (this process, no worker pool) for a small one, where starting workers
    costs more than it saves and an error would have to cross a process boundary."""
    processes = min(os.cpu_count() or 1, Path(path).stat().st_size // bytes_per_process)
    return processes if processes > 1 else None


def shifted(ids, is_target):
    """A sample from a sequence: each token's input is the one before it."""
    return ids[:-1], ids[1:], is_target[1:]


class _BadRecord(Exception):
    """Raised inside `map` to stop at the first bad record; turned into a DataError with its line number."""

    def __init__(self, index, problem):
        # Both in `args`: raised in a tokenizing worker, it is pickled back to the parent, which rebuilds it from
        # them (with the problem alone it could not, and the worker pool would wait forever).
        super().__init__(index, problem)
        self.index, self.problem = index, problem


def _encode_batch(batch, indices, columns, record_problem, encode, names, tokenizer, max_length, skip_bad_lines,
                  code_version):
    records = [dict(zip(columns, values)) for values in zip(*(batch[column] for column in columns))]
    good = []
    for index, record in zip(indices, records):
        problem = record_problem(record)
        if problem is None:
            good.append({**record, "_index": index})  # its record index, for an encoder that keeps it
        elif not skip_bad_lines:
            raise _BadRecord(index, problem)
    # Returning fewer rows than came in drops the bad ones; the caller counts them from the lengths.
    return encode(good, tokenizer, max_length) if good else {name: [] for name in names}
