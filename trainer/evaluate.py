"""Held-out evaluation: batches of a dataset in eval mode, perplexity (exp of the mean masked cross-entropy over
every trained token) and bits per byte (the same losses over the UTF-8 bytes those tokens spell, which compares
models across tokenizers)."""

import math

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from model import token_cross_entropy

from .precision import autocast_context


def eval_batches(model, dataset, args, max_samples=None):
    """The first `max_samples` samples (all when None) in batches as training makes them, on the model's device,
    with the model in eval mode, without gradients and under the run's autocast."""
    samples = dataset if max_samples is None or max_samples >= len(dataset) else Subset(dataset, range(max_samples))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), autocast_context(args):
            for batch in tqdm(DataLoader(samples, batch_size=args.batch_size, collate_fn=dataset.collate),
                              desc="evaluating", leave=False):
                yield batch.to(device)
    finally:
        model.train(was_training)


def language_model_scores(model, dataset, args, max_samples=None, token_bytes=None):
    """{"perplexity": ...} and, given `token_bytes` (the UTF-8 length of each token id, 0 for special tokens),
    "bits per byte": Σ CE / (ln 2 · Σ bytes) over the trained tokens that spell text (an end token spells none
    and is left out of both sums, as nanochat counts)."""
    total_ce, total_tokens, text_ce, text_bytes = 0.0, 0, 0.0, 0
    for batch in eval_batches(model, dataset, args, max_samples):
        logits = model(batch.input_ids, **batch.model_inputs()).logits
        per_token = token_cross_entropy(logits, batch.targets)
        trained = batch.loss_mask.bool()
        total_ce += float(per_token[trained].sum())
        total_tokens += int(trained.sum())
        if token_bytes is not None:
            spelled = token_bytes.to(batch.targets.device)[batch.targets] * trained
            text_ce += float(per_token[spelled > 0].sum())
            text_bytes += int(spelled.sum())
    scores = {"perplexity": math.exp(total_ce / max(total_tokens, 1))}
    if token_bytes is not None:
        scores["bits per byte"] = text_ce / math.log(2) / max(text_bytes, 1)
    return scores
