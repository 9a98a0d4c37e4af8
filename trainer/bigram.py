"""The bigram warm start (`--bigram_steps`): a model from random init first learns which token follows which.

A small model spends its first training steps learning what a table of bigram counts holds. Those counts, taken
from the training data in one pass, are fitted here directly: the embedding, the final norm and the head are
trained, full-batch, to predict each token's successors through the path the network's output takes when the
blocks add nothing (logits = head(norm(embedding))). One full-batch step sees every bigram of the data at the cost
of a vocabulary-wide matrix product, where a training step sees a batch's. The fitted weights are ordinary weights
of the model: nothing of the model's shape or export changes.
"""

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from model.model import ChunkedCrossEntropy, softcap

from . import distributed
from .distributed import say
from .loop import keep_freed_memory

LEARNING_RATE = 0.1  # Adam's, on the embedding made unit-RMS, the norm and the head
MAX_TOKENS = 50_000_000  # the bigrams of at most this many tokens of the data are counted


def bigram_counts(dataset, vocab_size, max_tokens=MAX_TOKENS):
    """(token, next token, count) over the dataset's trained targets, sorted by token: int64, int64, float32."""
    previous, following = dataset.token_pairs(max_tokens)
    keys, counts = np.unique(previous * vocab_size + following, return_counts=True)
    return (torch.from_numpy(keys // vocab_size), torch.from_numpy(keys % vocab_size),
            torch.from_numpy(counts.astype(np.float32)))


def bigram_loss(model, rows, first_pair, previous_rows, following, counts, total):
    """The bigram cross-entropy in nats (a 0-d tensor), its gradient accumulated: the rows' logits a chunk at a
    time, each chunk's loss its row totals times log Z less the counted successors' logits, and the logits'
    gradient (row total x softmax - counts) / total written into one buffer."""
    embed, norm, head = model.model.embed_tokens, model.model.norm, model.get_output_embeddings()
    size = max(1, ChunkedCrossEntropy.CHUNK_ELEMENTS // head.weight.size(0))  # rows of logits at once
    loss = torch.zeros((), device=head.weight.device)
    for start in range(0, len(rows), size):
        chunk = slice(start, min(start + size, len(rows)))
        logits = softcap(head(norm(embed(rows[chunk]))), model.config.logit_softcap)
        pairs = slice(first_pair[chunk.start], first_pair[chunk.stop])
        at = (previous_rows[pairs] - start, following[pairs])
        with torch.no_grad():
            row_totals = torch.zeros(len(logits), device=logits.device).index_add_(0, at[0], counts[pairs])
            log_z = torch.logsumexp(logits, dim=-1)
            loss += (row_totals @ log_z - counts[pairs] @ logits[at]) / total
            grad = torch.sub(logits, log_z[:, None]).exp_().mul_(row_totals[:, None])
            grad.index_put_(at, -counts[pairs], accumulate=True).div_(total)
        logits.backward(grad)
    return loss


def warm_start(model, dataset, steps, device):
    """Fit `model`'s embedding, final norm and head to `dataset`'s bigram counts with `steps` full-batch Adam steps
    on `device`; the seconds it took (training time: the caller counts them with the run's)."""
    started = time.perf_counter()
    embed, norm, head = model.model.embed_tokens, model.model.norm, model.get_output_embeddings()
    previous, following, counts = (t.to(device) for t in bigram_counts(dataset, head.weight.size(0)))
    rows, previous_rows = torch.unique_consecutive(previous, return_inverse=True)
    first_pair = torch.searchsorted(previous_rows, torch.arange(len(rows) + 1, device=device)).tolist()
    total = counts.sum()
    parameters = list(dict.fromkeys([embed.weight, norm.weight, head.weight]))  # a tied head is the embedding
    model.to(device)
    if torch.device(device).type == "cpu":
        keep_freed_memory()  # the logits' buffers reused from step to step, not faulted in anew
    with torch.no_grad():
        if not model.config.tie_word_embeddings:  # the norm makes the loss blind to the scale; Adam's steps are not
            embed.weight.div_(embed.weight.pow(2).mean().sqrt())
    optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE, betas=(0.9, 0.95))
    bar = tqdm(range(steps), desc="bigram warm start", dynamic_ncols=True, disable=not distributed.is_main())
    first = None
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        loss = bigram_loss(model, rows, first_pair, previous_rows, following, counts, total)
        optimizer.step()
        first = loss if first is None else first
    for parameter in parameters:
        parameter.grad = None
    distributed.broadcast_from_main(parameters)  # every process trains from the same weights
    first, last = float(first), float(loss)  # the device's work done: the seconds are all of it
    seconds = time.perf_counter() - started
    say(f"bigram warm start: {len(previous):,} distinct bigrams of {int(total):,} target tokens, {steps} full-batch "
        f"steps in {seconds:.1f} s: {first / math.log(2):.3f} → {last / math.log(2):.3f} bits a token")
    return seconds
