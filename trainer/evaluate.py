"""Held-out evaluation: batches of a dataset in eval mode, and perplexity (exp of the mean masked cross-entropy
over every trained token)."""

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from model import masked_cross_entropy

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


def perplexity(model, dataset, args, max_samples=None):
    """Token-weighted: exp(Σ masked CE / Σ mask) over the first `max_samples` samples (all when None)."""
    total_ce, total_tokens = 0.0, 0
    for batch in eval_batches(model, dataset, args, max_samples):
        logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits
        tokens = int(batch.loss_mask.sum())
        total_ce += masked_cross_entropy(logits, batch.targets, batch.loss_mask).item() * tokens
        total_tokens += tokens
    return float(torch.exp(torch.tensor(total_ce / max(total_tokens, 1))))
