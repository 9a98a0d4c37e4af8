"""Samples → batches: the `Batch` every objective reads, the padding collate, and the epoch's sample order.

A sample is `(input_ids, targets, loss_mask)` at its exact length. `collate` pads a list of
them to the longest and builds the attention mask from the lengths it already knows, so no
column is padding for every row and nothing downstream re-derives lengths from pad ids.

`attention_mask` numbers the documents of a row: 1 for the row's text, 0 for padding.
A packed row (several documents back to back) numbers them 1, 2, 3, ...; the model keeps
attention inside each document and restarts positions at each one, so the same `Batch`
carries packed and padded rows alike.
"""

import bisect
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F


@dataclass
class Batch:
    """[rows, width] tensors; `targets[r, t]` is the token after `input_ids[r, t]`, trained where `loss_mask` is 1.

    What the loop and the model need to know of its shape is counted on the host by `collate`, so reading it
    never waits for the device: `tokens`, the real (non-padding) input tokens, `trained`, the positions the loss
    mask trains, and `one_document_per_row`, true when no row holds more than one document and padding only ends
    rows (then the causal kernel alone masks right, and the model builds no mask)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor
    tokens: int = 0
    trained: int = 0
    one_document_per_row: bool = True

    def __len__(self):
        return self.input_ids.size(0)

    @property
    def width(self):
        return self.input_ids.size(1)

    def padded_to(self, width):
        """The same rows padded on the right to `width` positions, padding being neither trained nor attended."""
        if width <= self.width:
            return self
        return replace(self, **{name: F.pad(t, (0, width - self.width)) for name, t in self.tensors().items()})

    def tensors(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device):
        """On `device`; from pinned memory the copies do not wait for the device."""
        return replace(self, **{name: t.to(device, non_blocking=True) for name, t in self.tensors().items()})

    def pin_memory(self):
        """In page-locked memory (the DataLoader's `pin_memory=True` calls it in its own thread on CUDA)."""
        return replace(self, **{name: t.pin_memory() for name, t in self.tensors().items()})

    def model_inputs(self):
        """The keyword arguments of the model's forward for these rows."""
        return {"attention_mask": self.attention_mask, "one_document_per_row": self.one_document_per_row}


def collate(samples, pad_id):
    """Pad `(input_ids, targets, loss_mask)` samples to the longest one; padding is never trained or attended.
    A packed sample carries a fourth tensor, the document number of each position (see `Packed`)."""
    width = max(len(sample[0]) for sample in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    targets = torch.full_like(input_ids, pad_id)
    loss_mask = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    one_document_per_row = True
    for row, (ids, target, mask, *documents) in enumerate(samples):
        input_ids[row, : len(ids)] = ids
        targets[row, : len(ids)] = target
        loss_mask[row, : len(ids)] = mask
        attention_mask[row, : len(ids)] = documents[0] if documents else 1
        one_document_per_row = one_document_per_row and (not documents or bool((documents[0] == 1).all()))
    return Batch(input_ids, targets, loss_mask, attention_mask, tokens=sum(len(sample[0]) for sample in samples),
                 trained=int(loss_mask.sum()), one_document_per_row=one_document_per_row)


class Packed(torch.utils.data.Dataset):
    """A dataset's samples back to back in rows of at most `max_length - 1` positions, each sample whole: no padding
    inside a row, and every sample keeps its own targets and loss mask (none crosses into the next). The rows are
    filled in file order, a new one begun when the next sample does not fit, or (`best_fit`) longest sample first,
    each into the fullest row it fits (best-fit decreasing, as nanochat packs: fewer, fuller rows). `isolated` keeps
    attention and positions inside each sample (the attention mask numbers them 1, 2, ...); otherwise a row attends
    as one sequence (a cheaper causal kernel)."""

    def __init__(self, dataset, isolated=True, best_fit=False):
        self.dataset, self.isolated = dataset, isolated
        inputs = dataset.lengths - 1  # a sample of n ids has n - 1 input positions
        self.packs = (best_fit_rows if best_fit else next_fit_rows)(inputs.tolist(), dataset.max_length - 1)
        self.lengths = [int(inputs[pack].sum()) for pack in self.packs]  # positions per row, for the data order
        self.samples_per_row = len(dataset) / max(len(self.packs), 1)

    def __len__(self):
        return len(self.packs)

    def __getitem__(self, index):
        parts = [self.dataset[i] for i in self.packs[index]]
        ids, targets, mask = (torch.cat([part[column] for part in parts]) for column in range(3))
        documents = torch.cat([torch.full((len(part[0]),), number if self.isolated else 1)
                               for number, part in enumerate(parts, start=1)])
        return ids, targets, mask, documents

    def collate(self, samples):
        return self.dataset.collate(samples)

    def notes(self):
        return self.dataset.notes() + [f"{self.dataset.path}: packed {len(self.dataset):,} samples into "
                                       f"{len(self.packs):,} rows ({self.samples_per_row:.1f} per row)"]

    def __getattr__(self, name):  # path, tokenizer, max_length, ... of the packed dataset
        if name == "dataset":  # not set yet (unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def next_fit_rows(lengths, capacity):
    """Sample indices grouped into rows of at most `capacity` positions, in order, a new row when one does not fit."""
    rows, current, used = [], [], 0
    for index, length in enumerate(lengths):
        if current and used + length > capacity:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    return rows + [current] if current else rows


def best_fit_rows(lengths, capacity):
    """Best-fit decreasing: longest first, each sample into the row with the least room that still holds it, else a
    new row. Rows are kept in buckets by the room they have left (at most `capacity` distinct values), so each
    sample costs a bisection over those values, not a scan of the rows."""
    rows, by_room, rooms = [], {}, []  # rooms: the sorted room values that have a row
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms[at]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room], rooms[at]
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        left = room - length
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(row)
    return rows


# Optimizer steps whose samples are sorted by length together (see epoch_order).
LENGTH_GROUP_STEPS = 32


def epoch_order(lengths, seed, epoch, samples_per_step):
    """The epoch's sample order: one seeded permutation, grouped by length a window at a time.

    Batches are padded to their longest sample, so a batch mixing a 20-token poem with a
    250-token article is mostly padding. Within each window of LENGTH_GROUP_STEPS steps the
    shuffled samples are sorted by length and the window's steps are shuffled back, so each
    step holds samples of similar length while the order stays random at the scale of
    windows. It depends only on (seed, epoch, global batch), so a resumed run and any process
    count see the same order.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator)
    lengths = torch.as_tensor(lengths)
    window = samples_per_step * LENGTH_GROUP_STEPS
    grouped = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[lengths[chunk].argsort(descending=True, stable=True)]
        steps = chunk.split(samples_per_step)
        # Only the epoch's last step can be short; it stays last, or every later step would be cut off-boundary.
        full = len(steps) if len(steps[-1]) == samples_per_step else len(steps) - 1
        grouped += [steps[i] for i in torch.randperm(full, generator=generator).tolist()] + list(steps[full:])
    return torch.cat(grouped).tolist() if grouped else []
